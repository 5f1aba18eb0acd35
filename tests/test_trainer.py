"""DE3Trainer: the loss, logged parts, prototype updates per optimizer step, DDP, resume, evaluation."""

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import TrainingArguments

from de3_transformers import DE3Trainer, DE3TrainingArguments, build_exit_policy, simulate_policy

from conftest import mixed_length_batch, tiny_model, train_prototypes

NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def dataset(size=12, seed=3):
    input_ids, attention_mask = mixed_length_batch(batch_size=size, seed=seed)
    return Dataset.from_dict({"input_ids": input_ids.tolist(), "attention_mask": attention_mask.tolist(),
                              "labels": [i % 3 for i in range(size)]})


def arguments(tmp_path, **overrides):
    defaults = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, per_device_eval_batch_size=5,
                    learning_rate=1e-3, num_train_epochs=1, use_cpu=True, report_to=[], save_strategy="no",
                    logging_steps=1, train_sampling_strategy="sequential", seed=0)
    return DE3TrainingArguments(**{**defaults, **overrides})


def features_by_exit(model, data):
    """Prototypical features `[E, N, P]` of every sample, recomputed outside the trainer."""
    with torch.no_grad():
        hidden = model.eval()(input_ids=torch.tensor(data["input_ids"]),
                              attention_mask=torch.tensor(data["attention_mask"]),
                              output_hidden_states=True).hidden_states
        pooler = model.base_model.pooler
        return torch.stack([net(pooler(hidden[layer])) for net, layer in
                            zip(model.prototype_networks, model.config.exit_layers)])


def class_means(features, labels):
    labels = torch.tensor(labels)
    return torch.stack([features[:, labels == k].mean(1) for k in range(3)], dim=1)


def test_trainer_loss_equals_the_model_loss(tmp_path):
    model = train_prototypes(tiny_model())
    trainer = DE3Trainer(model=model, args=arguments(tmp_path))
    batch = {"input_ids": torch.tensor(dataset()["input_ids"]), "attention_mask": torch.tensor(dataset()["attention_mask"]),
             "labels": torch.tensor(dataset()["labels"])}
    assert trainer.compute_loss(model, batch).item() == model(**batch).loss.item()


def test_training_logs_every_loss_part_and_exit_accuracy(tmp_path):
    trainer = DE3Trainer(model=tiny_model(), args=arguments(tmp_path), train_dataset=dataset())
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 3
    for entry in logged:
        assert {"ce_loss", "dar_loss", "exit_1_accuracy", "exit_4_accuracy"} <= set(entry)
    assert logged[0]["dar_loss"] == 0.0 and logged[-1]["dar_loss"] > 0  # prototypes exist only after step 1


def test_prototypes_update_once_per_optimizer_step_from_every_micro_batch(tmp_path):
    model = tiny_model(**NO_DROPOUT)
    data = dataset(size=12)
    expected = features_by_exit(model, data)  # learning rate 0: features stay fixed during training
    args = arguments(tmp_path, per_device_train_batch_size=3, gradient_accumulation_steps=2, learning_rate=0.0)
    DE3Trainer(model=model, args=args, train_dataset=data).train()
    first, second = class_means(expected[:, :6], data["labels"][:6]), class_means(expected[:, 6:], data["labels"][6:])
    # step 1 sets the prototypes to the means over both micro-batches (6 samples, every class twice);
    # step 2 blends once with gamma = 0.5; a per-micro-batch update would give a different result.
    torch.testing.assert_close(model.prototype_memory.prototypes, 0.5 * first + 0.5 * second, atol=1e-5, rtol=0)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_process_ddp_keeps_prototypes_identical_and_equal_to_one_process(tmp_path):
    worker = Path(__file__).with_name("ddp_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(worker.parent)}
    (tmp_path / "ddp").mkdir(), (tmp_path / "single").mkdir()
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
              str(worker), str(tmp_path / "ddp"), "4"]
    for command in (launch, [sys.executable, str(worker), str(tmp_path / "single"), "8"]):
        run = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / "ddp" / f"rank{rank}.pt") for rank in (0, 1))
    single = torch.load(tmp_path / "single" / "rank0.pt")
    assert rank0["initialized"].all()
    for name in ("prototypes", "initialized", "classifier"):
        assert torch.equal(rank0[name], rank1[name]), name
    torch.testing.assert_close(rank0["prototypes"], single["prototypes"], atol=1e-5, rtol=0)
    torch.testing.assert_close(rank0["classifier"], single["classifier"], atol=1e-5, rtol=0)


def test_two_process_ddp_merges_the_cosee_signal_range(tmp_path):
    worker = Path(__file__).with_name("ddp_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(worker.parent)}
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
              str(worker), str(tmp_path), "4", "cosee"]
    run = subprocess.run(launch, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1))
    assert not torch.equal(rank0["local"], rank1["local"])  # each process saw its own shard's signals
    assert rank0["cosee_range"] == rank1["cosee_range"]  # and all draw from the merged range
    merged = (min(rank0["local"][0], rank1["local"][0]).item(), max(rank0["local"][1], rank1["local"][1]).item())
    assert rank0["cosee_range"] == pytest.approx(merged)


def test_resume_from_checkpoint_restores_prototypes_exactly(tmp_path):
    from transformers import TrainerCallback

    class Snapshot(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.memory = {name: tensor.clone() for name, tensor in model.prototype_memory.state_dict().items()}

    data = dataset(size=16)
    args = arguments(tmp_path, max_steps=2, save_strategy="steps", save_steps=2)
    trained = tiny_model(**NO_DROPOUT)
    DE3Trainer(model=trained, args=args, train_dataset=data).train()
    snapshot = Snapshot()
    resumed = DE3Trainer(model=tiny_model(seed=99, **NO_DROPOUT), args=arguments(tmp_path, max_steps=3),
                         train_dataset=data, callbacks=[snapshot])
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert snapshot.memory["initialized"].all()
    assert torch.equal(snapshot.memory["prototypes"], trained.prototype_memory.prototypes)
    assert torch.equal(snapshot.memory["initialized"], trained.prototype_memory.initialized)


def test_resumed_training_continues_like_uninterrupted_training(tmp_path):
    from transformers import TrainerCallback

    class StopAfterTwoSteps(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step == 2

    data = dataset(size=16)
    straight = tiny_model(**NO_DROPOUT)
    DE3Trainer(model=straight, args=arguments(tmp_path / "a", max_steps=4), train_dataset=data).train()
    args = arguments(tmp_path / "b", max_steps=4, save_strategy="steps", save_steps=2)
    DE3Trainer(model=tiny_model(**NO_DROPOUT), args=args, train_dataset=data, callbacks=[StopAfterTwoSteps()]).train()
    resumed = tiny_model(seed=99, **NO_DROPOUT)
    DE3Trainer(model=resumed, args=args, train_dataset=data).train(
        resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-2"))
    torch.testing.assert_close(resumed.prototype_memory.prototypes, straight.prototype_memory.prototypes,
                               atol=1e-6, rtol=0)


def test_evaluation_reports_every_exit_and_early_exit_like_predict_early(tmp_path):
    model = train_prototypes(tiny_model())
    eval_data = dataset(size=13, seed=8)
    trainer = DE3Trainer(model=model, args=arguments(tmp_path, eval_threshold=0.6, eval_lambda=1.0),
                         eval_dataset=eval_data,
                         compute_metrics=lambda p: {"mean_prediction": float(p.predictions.argmax(-1).mean())})
    metrics = trainer.evaluate()
    result = model.predict_early(torch.tensor(eval_data["input_ids"]), torch.tensor(eval_data["attention_mask"]),
                                 threshold=0.6, lam=1.0)
    labels = torch.tensor(eval_data["labels"])
    assert metrics["eval_early_exit_speedup"] == pytest.approx(result.speedup)
    assert metrics["eval_early_exit_accuracy"] == pytest.approx((result.logits.argmax(-1) == labels).float().mean().item())
    assert metrics["eval_early_exit_mean_prediction"] == pytest.approx(result.logits.argmax(-1).float().mean().item())
    full = model(input_ids=torch.tensor(eval_data["input_ids"]), attention_mask=torch.tensor(eval_data["attention_mask"]))
    for index, layer in enumerate(model.config.exit_layers):
        expected = (full.exit_logits[:, index].argmax(-1) == labels).float().mean().item()
        assert metrics[f"eval_exit_{layer}_accuracy"] == pytest.approx(expected)
    assert metrics["eval_accuracy"] == metrics["eval_exit_4_accuracy"]
    assert "eval_loss" in metrics and "eval_mean_prediction" in metrics


def test_plain_training_arguments_work_with_config_defaults(tmp_path):
    model = train_prototypes(tiny_model())
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], per_device_eval_batch_size=4)
    eval_data = dataset()
    metrics = DE3Trainer(model=model, args=args, eval_dataset=eval_data).evaluate()
    # The config's defaults (DE3, threshold 0.2, lambda 1), as predict_early runs them.
    expected = model.predict_early(torch.tensor(eval_data["input_ids"]), torch.tensor(eval_data["attention_mask"]))
    assert metrics["eval_early_exit_speedup"] == pytest.approx(expected.speedup)
    labels = torch.tensor(eval_data["labels"])
    assert metrics["eval_early_exit_accuracy"] == pytest.approx((expected.logits.argmax(-1) == labels).float().mean().item())


def test_trainer_rejects_a_model_without_prototypes(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    plain = BertForSequenceClassification(BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2,
                                                     num_attention_heads=2, intermediate_size=64))
    with pytest.raises(TypeError, match="DE3 models"):
        DE3Trainer(model=plain, args=arguments(tmp_path))


@pytest.mark.parametrize("field, value", [("eval_threshold", float("nan")), ("eval_lambda", -1.0)])
def test_training_arguments_validate_the_early_exit_settings(tmp_path, field, value):
    with pytest.raises(ValueError, match="out of range"):
        arguments(tmp_path, **{field: value})


def test_trainer_keeps_a_de3_model_card_and_drafts_one_otherwise(tmp_path):
    from de3_transformers.model_card import write_model_card

    model = tiny_model()
    trainer = DE3Trainer(model=model, args=arguments(tmp_path))
    trainer.create_model_card(model_name="draft")
    assert "de3-transformers" not in (tmp_path / "README.md").read_text()  # the Trainer's own draft
    write_model_card(tmp_path, model, task_name="sst2", dataset_name="nyu-mll/glue")
    ours = (tmp_path / "README.md").read_text()
    trainer.create_model_card(model_name="draft")
    assert (tmp_path / "README.md").read_text() == ours


def test_bf16_mixed_precision_training_and_evaluation_stay_finite(tmp_path):
    model = tiny_model()
    trainer = DE3Trainer(model=model, args=arguments(tmp_path, bf16=True, num_train_epochs=2),
                         train_dataset=dataset(), eval_dataset=dataset(seed=4))
    trainer.train()
    metrics = trainer.evaluate()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert all(torch.isfinite(torch.tensor([entry["loss"], entry["dar_loss"]])).all() for entry in logged)
    assert model.prototype_memory.initialized.all() and torch.isfinite(model.prototype_memory.prototypes).all()
    # The early-exit metric is the configured policy replayed on the bf16 evaluation's own exit outputs.
    logits, exit_logits, entropy, ratio = (torch.as_tensor(array) for array in trainer.predict(dataset(seed=4)).predictions)
    assert torch.isfinite(exit_logits).all() and exit_logits.shape == (12, 4, 3)
    replay = simulate_policy(build_exit_policy(model.config), exit_logits, model.config.exit_layers,
                             entropy, ratio)
    assert metrics["eval_early_exit_speedup"] == pytest.approx(replay.speedup)


def test_loss_is_scaled_for_gradient_accumulation(tmp_path):
    model = tiny_model(dar_alpha=0.0, **NO_DROPOUT)  # no DAR: the loss does not depend on the prototypes
    data = dataset(size=8)
    with torch.no_grad():
        losses = [model(**{name: torch.tensor(data[name][start:start + 2]) for name in data.column_names}).loss
                  for start in range(0, 8, 2)]
    args = arguments(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2, learning_rate=0.0,
                     logging_steps=1)
    trainer = DE3Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    # one log per optimizer step, each the mean of its two micro-batch losses (not their sum)
    expected = [(losses[0] + losses[1]).item() / 2, (losses[2] + losses[3]).item() / 2]
    assert logged == pytest.approx(expected, abs=1e-3)


def test_a_failed_training_run_leaves_prototype_updates_immediate(tmp_path):
    from transformers import TrainerCallback

    class Fail(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            raise RuntimeError("simulated crash")

    model = tiny_model()
    trainer = DE3Trainer(model=model, args=arguments(tmp_path), train_dataset=dataset(), callbacks=[Fail()])
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer.train()
    assert not model.prototype_memory.defer_updates
    input_ids, attention_mask = mixed_length_batch(batch_size=3)
    model.train()(input_ids=input_ids, attention_mask=attention_mask, labels=torch.tensor([0, 1, 2]))
    assert model.prototype_memory.initialized.all()


def test_a_multi_process_launch_that_is_not_distributed_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it; without --use_cpu the Trainer stays NOT_PARALLEL
    with pytest.raises(ValueError, match="--use_cpu"):
        DE3Trainer(model=tiny_model(), args=arguments(tmp_path, use_cpu=False), train_dataset=dataset())


def test_torchrun_on_cpu_without_use_cpu_stops_every_process_with_the_fix(tmp_path):
    script = tmp_path / "launch.py"
    script.write_text(textwrap.dedent(f"""
        from conftest import tiny_model
        from de3_transformers import DE3Trainer, DE3TrainingArguments
        args = DE3TrainingArguments(output_dir={str(tmp_path / "out")!r}, report_to=[])
        DE3Trainer(model=tiny_model(), args=args)
    """))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent), "CUDA_VISIBLE_DEVICES": ""}
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
              f"--master_port={free_port()}", str(script)]
    run = subprocess.run(launch, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode != 0
    assert run.stderr.count("pass --use_cpu") >= 2, run.stderr[-3000:]  # each process says what to do
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
