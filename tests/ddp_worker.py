"""Trains a tiny DE3 model with `DE3Trainer`; run by test_trainer.py with torchrun (2 processes) and alone.

Usage: python ddp_worker.py OUT_DIR PER_DEVICE_BATCH_SIZE [TRAINING_OBJECTIVE]
Writes OUT_DIR/rank{RANK}.pt with the prototypes, the initialised mask and one weight after training; with the
"cosee" objective also the signal range this process saw in the epoch and the range it ended with.
"""

import os
import sys

import torch
from datasets import Dataset

from de3_transformers import DE3Trainer, DE3TrainingArguments

from conftest import mixed_length_batch, tiny_model


def main(out_dir: str, batch_size: int, objective: str = "de3") -> None:
    model = tiny_model(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, training_objective=objective)
    seen, state = {}, getattr(model, "cosee_state", None)  # COSEE's objective adds it
    if state is not None:
        end_epoch = state.end_epoch

        def recording_end_epoch(reduce_max=None):
            seen["local"] = torch.tensor([-state._seen[0], state._seen[1]])  # before the processes are merged
            end_epoch(reduce_max)

        state.end_epoch = recording_end_epoch
    input_ids, attention_mask = mixed_length_batch(batch_size=24, seed=11)
    labels = [(3 * i + i // 5) % 3 for i in range(24)]  # every class in every global batch, uneven per rank
    data = Dataset.from_dict(
        {"input_ids": input_ids.tolist(), "attention_mask": attention_mask.tolist(), "labels": labels}
    )
    args = DE3TrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=batch_size, max_steps=3, learning_rate=1e-3,
        train_sampling_strategy="sequential", use_cpu=True, report_to=[],
        ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", 1)) > 1 else None,
        save_strategy="no", logging_steps=1, seed=0,
    )
    DE3Trainer(model=model, args=args, train_dataset=data).train()
    rank = int(os.environ.get("RANK", 0))
    memory = model.prototype_memory
    torch.save({"prototypes": memory.prototypes, "initialized": memory.initialized,
                "classifier": model.classifier.weight.detach(), **seen,
                "cosee_range": None if state is None else (state.low, state.high)},
               os.path.join(out_dir, f"rank{rank}.pt"))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), *sys.argv[3:])
