"""`DE3Trainer`: the stock `transformers.Trainer` with the DE3 objective's bookkeeping (docs/method.md section 2).

The loss itself comes from the model's forward (its training objective's loss plus `dar_alpha` times DAR). The
trainer adds what a `Trainer` cannot know about:
- the callbacks of the model's training objective (`objectives`), such as COSEE's, which keep its progress and
  signal range current;
- prototypes are updated once per optimizer step, from the class statistics of every micro-batch of the step
  (gradient accumulation) and of every process (all-reduced under DDP);
- the loss parts and the accuracy of every exit are logged to the usual loggers;
- evaluation reports, beside the task metrics of the full model, the accuracy of every exit alone and the accuracy
  and layer speed-up of early exit at the configured threshold and lambda, from the same single evaluation pass.
"""

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import EvalPrediction, Trainer, TrainerCallback, TrainingArguments
from transformers.utils import logging

from .configuration_de3 import check_exit_parameters
from .exit_policies import build_exit_policy
from .simulation import simulate_policy


logger = logging.get_logger(__name__)


@dataclass
class DE3TrainingArguments(TrainingArguments):
    """[`TrainingArguments`] plus the early-exit evaluation settings of [`DE3Trainer`].

    Args:
        eval_early_exit (`bool`, defaults to `True`):
            Report early-exit accuracy and layer speed-up, and the accuracy of every exit, at evaluation.
        eval_threshold (`float`, *optional*):
            Threshold of the model's exit policy (`config.early_exit_policy`, DE3 by default) for the early-exit
            evaluation; defaults to the model's `config.early_exit_threshold`.
        eval_lambda (`float`, *optional*):
            EDR lambda for the early-exit evaluation; defaults to the model's `config.early_exit_lambda`.

    Raises:
        ValueError: for a threshold or lambda that is negative, infinite or NaN.
    """

    eval_early_exit: bool = field(default=True, metadata={"help": "Report early-exit metrics at evaluation."})
    eval_threshold: float | None = field(default=None, metadata={"help": "Early-exit threshold for evaluation."})
    eval_lambda: float | None = field(default=None, metadata={"help": "EDR lambda for evaluation."})

    def __post_init__(self):
        super().__post_init__()
        check_exit_parameters(
            0.0 if self.eval_threshold is None else self.eval_threshold,
            0.0 if self.eval_lambda is None else self.eval_lambda,
        )


class PrototypeUpdateCallback(TrainerCallback):
    """Holds prototype statistics during each optimizer step and applies them once it is taken."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        model.prototype_memory.defer_updates = True

    def on_step_end(self, args, state, control, model=None, **kwargs):
        model.prototype_memory.apply_pending(model.config.prototype_momentum)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        model.prototype_memory.apply_pending(model.config.prototype_momentum)
        model.prototype_memory.defer_updates = False


class DE3Trainer(Trainer):
    """A [`Trainer`] for DE3 models ([`DE3BertForSequenceClassification`], [`DE3RobertaForSequenceClassification`]).

    Use it as the stock `Trainer`; `args` may be [`DE3TrainingArguments`] (plain `TrainingArguments` work with the
    defaults). `compute_metrics`, if given, is applied to the full model's predictions and, prefixed
    `early_exit_`, to the early-exit predictions. `predict()` returns as predictions the tuple
    `(logits, exit_logits [N, num_exits, K], entropy [N, num_exits - 1], distance_ratio [N, num_exits - 1])`, the
    last absent while prototypes are uninitialised.

    Raises:
        TypeError: if the model is not a DE3 model.
        ValueError: for a multi-process launch (`WORLD_SIZE > 1`) that `transformers` did not make distributed (on a
            CPU machine without `use_cpu=True`), and for several GPUs in one process (`nn.DataParallel`).
    """

    def __init__(self, model=None, args=None, *trainer_args, compute_metrics=None, **kwargs):
        if model is not None and not hasattr(model, "prototype_memory"):
            raise TypeError(
                f"DE3Trainer trains DE3 models, got {type(model).__name__}. Build one with "
                "DE3BertForSequenceClassification.from_backbone(...) or AutoModelForSequenceClassification with a "
                "DE3 config."
            )
        super().__init__(model, args, *trainer_args, compute_metrics=self._compute_de3_metrics, **kwargs)
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched > 1 and self.args.world_size == 1:
            # On a machine without GPUs `transformers` does not turn a torchrun / accelerate launch into DDP unless it
            # is told to run on CPU; every process would then train its own model and write the same output_dir.
            raise ValueError(
                f"This is one of {launched} processes (WORLD_SIZE={launched}), but the Trainer is not running "
                "distributed data parallel, so each process would train a model of its own. On a machine without "
                "GPUs pass --use_cpu (TrainingArguments(use_cpu=True)) to train with DDP over the processes; or run "
                "a single process."
            )
        if self.args.n_gpu > 1:
            # `nn.DataParallel` replicates the model per step: prototype statistics would land on the throwaway
            # replicas.
            raise ValueError(
                f"DE3Trainer does not support nn.DataParallel ({self.args.n_gpu} GPUs in one process); launch with "
                "`torchrun --nproc_per_node N` or `accelerate launch` for distributed data parallel training."
            )
        self.task_metrics = compute_metrics
        self.add_callback(PrototypeUpdateCallback())
        de3_model = self.accelerator.unwrap_model(self.model)
        for callback in de3_model.objective.callbacks():
            self.add_callback(callback)
        # Per-batch scalars (loss parts) the evaluation loop must not try to concatenate as predictions.
        self._not_predictions = [*de3_model.loss_part_names, "hidden_states"]
        self._running_parts: dict[str, torch.Tensor] = {}
        self._running_batches = 0

    def create_model_card(self, *args, **kwargs) -> None:
        """Keeps a DE3 model card already in `output_dir` (see `de3_transformers.model_card`), which carries the
        calibrated exit settings and trade-off table; otherwise writes the `Trainer`'s draft card."""
        card = Path(self.args.output_dir) / "README.md"
        if card.is_file() and "de3-transformers" in card.read_text(encoding="utf-8"):
            return
        super().create_model_card(*args, **kwargs)

    # Training

    def train(self, *args, **kwargs):
        self._running_parts, self._running_batches = {}, 0
        memory = self.accelerator.unwrap_model(self.model).prototype_memory
        try:
            return super().train(*args, **kwargs)
        finally:  # also when training fails: later forwards must update prototypes again, without stale statistics
            memory.defer_updates = False
            memory.discard_pending()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The model's loss; in training also its parts for the logs, and a check that it is finite.

        Raises:
            FloatingPointError: when the training loss is NaN or inf, before the step is taken (on every process).
        """
        outputs = model(**{**inputs, "output_exit_signals": True})
        if model.training and "labels" in inputs:
            self._check_finite(outputs.loss)
            self._accumulate_parts(outputs, inputs["labels"])
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def _check_finite(self, loss: torch.Tensor) -> None:
        # The Trainer itself would log a non-finite loss as the running mean (`logging_nan_inf_filter`) and go on
        # training, then save NaN weights. Every process learns of any process's NaN, so all stop together.
        not_finite = (~torch.isfinite(loss.detach())).float()
        if self.accelerator.num_processes > 1:
            not_finite = self.accelerator.reduce(not_finite, reduction="sum")
        if not_finite.item():
            raise FloatingPointError(
                f"The training loss is not finite at step {self.state.global_step + 1} (epoch "
                f"{self.state.epoch or 0:.2f}): training diverged, and it was stopped before the step was taken. Likely "
                f"causes: a learning rate too high ({self.args.learning_rate:g}), or an fp16 overflow (train in bf16 or "
                "fp32, or lower the learning rate)."
            )

    @torch.no_grad()
    def _accumulate_parts(self, outputs, labels) -> None:
        model = self.accelerator.unwrap_model(self.model)
        correct = (outputs.exit_logits.argmax(-1) == labels.view(-1, 1)).float().mean(dim=0)
        parts = {name: getattr(outputs, name) for name in model.loss_part_names}
        exit_layers = model.config.exit_layers
        parts.update({f"exit_{layer}_accuracy": correct[index] for index, layer in enumerate(exit_layers)})
        for name, value in parts.items():
            self._running_parts[name] = self._running_parts.get(name, 0.0) + value.detach().float()
        self._running_batches += 1

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        # Training logs (they carry "loss") get the mean of each part since the last log, averaged over processes.
        if "loss" in logs and self._running_batches:
            names = sorted(self._running_parts)
            means = torch.stack([self._running_parts[name] for name in names]) / self._running_batches
            means = self.accelerator.reduce(means.to(self.args.device), reduction="mean")
            logs = {**logs, **{name: round(value, 4) for name, value in zip(names, means.tolist())}}
            self._running_parts, self._running_batches = {}, 0
        super().log(logs, *args, **kwargs)

    # Evaluation

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        ignore_keys = self._not_predictions + list(ignore_keys or [])
        return super().prediction_step(
            model, {**inputs, "output_exit_signals": True}, prediction_loss_only, ignore_keys=ignore_keys
        )

    def _compute_de3_metrics(self, prediction: EvalPrediction) -> dict[str, float]:
        model = self.accelerator.unwrap_model(self.model)
        config = model.config
        logits, exit_logits, entropy, *rest = (torch.as_tensor(array) for array in prediction.predictions)
        labels = torch.as_tensor(prediction.label_ids)
        metrics = self._task_metrics(logits, labels, prefix="")
        if not getattr(self.args, "eval_early_exit", True):
            return metrics
        # `None` outputs are dropped from the tuple: the ratio is there iff every prototype is initialised (eval mode
        # does not change them), the scores iff the model has learning-to-exit heads.
        ratio = rest[0] if model.prototype_memory.all_initialized else None
        scores = rest[-1] if config.learning_to_exit else None
        for index, layer in enumerate(config.exit_layers):
            metrics[f"exit_{layer}_accuracy"] = _accuracy(exit_logits[:, index], labels)
        policy = build_exit_policy(config, threshold=getattr(self.args, "eval_threshold", None),
                                   lam=getattr(self.args, "eval_lambda", None))
        if ratio is None and policy.needs_distance_ratio:
            logger.warning("Early-exit metrics skipped: some prototypes are not initialised yet (train first).")
            return metrics
        exits = simulate_policy(policy, exit_logits, config.exit_layers, entropy, ratio, scores, labels)
        metrics.update(self._task_metrics(exits.logits, labels, prefix="early_exit_"))
        metrics["early_exit_speedup"] = exits.speedup
        return metrics

    def _task_metrics(self, logits: torch.Tensor, labels: torch.Tensor, prefix: str) -> dict[str, float]:
        metrics = {f"{prefix}accuracy": _accuracy(logits, labels)}
        if self.task_metrics is not None:
            task = self.task_metrics(EvalPrediction(predictions=logits.numpy(), label_ids=labels.numpy()))
            metrics.update({f"{prefix}{name}": value for name, value in task.items()})
        return metrics


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float(np.mean((logits.argmax(-1) == labels).numpy()))


__all__ = ["DE3Trainer", "DE3TrainingArguments", "PrototypeUpdateCallback"]
