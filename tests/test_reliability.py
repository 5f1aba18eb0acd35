"""Reliability II: no silent wrong answers (docs/reliability.md). Each test is one guarantee."""

import pytest
import torch

from de3_transformers.exit_policies import get_exit_policy
from de3_transformers.signals import hybrid_indicator
from de3_transformers.simulation import simulate_policy

from conftest import mixed_length_batch, tiny_model, train_prototypes


# 1. A NaN or inf anywhere never looks confident.

# Each policy with a setting that sends every finite sample out at the first exit.
EVERYONE_LEAVES = [
    ("de3", {"threshold": 2.0, "lam": 1.0}), ("entropy", {"threshold": 2.0}), ("max_prob", {"threshold": -1.0}),
    ("energy", {"threshold": 2.0}), ("patience", {"patience": 0}),
    ("patient_confident", {"threshold": 2.0, "patience": 1}),
    ("learned", {"threshold": -1.0}),
]


@pytest.mark.parametrize("name, parameters", EVERYONE_LEAVES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_no_policy_leaves_on_a_non_finite_exit(name, parameters, bad):
    model = train_prototypes(tiny_model(learning_to_exit=True))
    input_ids, attention_mask = mixed_length_batch(batch_size=8)
    policy = get_exit_policy(name, **parameters)
    assert set(model.predict_early(input_ids, attention_mask, policy=policy).sample_exit_layers.tolist()) == {1}
    with torch.no_grad():
        model.exit_classifiers[0].bias[0] = bad
    result = model.predict_early(input_ids, attention_mask, policy=policy)
    assert set(result.sample_exit_layers.tolist()) == {2} and torch.isfinite(result.logits).all()
    with torch.no_grad():
        full = model(input_ids=input_ids, attention_mask=attention_mask, output_exit_signals=True)
    replay = simulate_policy(policy, full.exit_logits, model.config.exit_layers, full.entropy, full.distance_ratio,
                             full.exit_scores)
    assert torch.equal(replay.sample_exit_layers, result.sample_exit_layers)


def test_nan_prototypical_features_never_look_confident():
    model = train_prototypes(tiny_model())
    input_ids, attention_mask = mixed_length_batch(batch_size=8)
    with torch.no_grad():
        model.prototype_networks[0].bias[0] = float("nan")
    result = model.predict_early(input_ids, attention_mask, threshold=2.0, lam=1.0)
    assert 1 not in result.sample_exit_layers.tolist()


def test_edr_of_nan_is_nan_not_certain():
    entropy, ratio = torch.tensor([float("nan"), 0.5, 0.0]), torch.tensor([0.5, float("nan"), 0.0])
    edr = hybrid_indicator(entropy, ratio, 1.0)
    assert edr[:2].isnan().all() and edr[2] == 0.0  # E = DR = 0 is still the limit 0


def test_a_non_finite_answer_raises_naming_the_exit():
    model = train_prototypes(tiny_model())
    input_ids, attention_mask = mixed_length_batch(batch_size=8)
    with torch.no_grad():
        model.classifier.bias[1] = float("nan")
    with pytest.raises(FloatingPointError, match=r"not finite .* exit layer\(s\) \[4\]"):
        model.predict_early(input_ids, attention_mask, threshold=0.0)


# 2. Training never saves NaN silently (the trainer's own check: below, with the trainer tests of this file).


def test_saving_refuses_non_finite_prototypes_and_keeps_the_previous_checkpoint(tmp_path):
    model = train_prototypes(tiny_model())
    model.save_pretrained(tmp_path)
    before = (tmp_path / "model.safetensors").read_bytes()
    with torch.no_grad():
        model.prototype_memory.prototypes[1, 2, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"not finite .*\(layer 2, class 2\).*learning rate"):
        model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").read_bytes() == before


def test_a_non_finite_prototype_update_raises_and_changes_nothing():
    model = train_prototypes(tiny_model())
    prototypes = model.prototype_memory.prototypes.clone()
    features = torch.randn(3, 6, model.config.proto_dim)
    features[0, 0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match="prototype update is not finite"):
        model.prototype_memory.observe(features, torch.arange(6) % 3, 0.5)
    assert torch.equal(model.prototype_memory.prototypes, prototypes)


# 3. Prototypes are valid before they are used.


@pytest.mark.parametrize("value, reason", [(float("nan"), "not finite"), (float("inf"), "not finite"),
                                           (0.0, "zero")])
def test_unusable_initialised_prototypes_raise_naming_the_pair(value, reason):
    model = train_prototypes(tiny_model())
    input_ids, attention_mask = mixed_length_batch(batch_size=4)
    model.predict_early(input_ids, attention_mask, threshold=0.5, lam=1.0)  # passes, and is remembered
    with torch.no_grad():
        model.prototype_memory.prototypes[2, 1] = value  # an in-place change: checked again
    with pytest.raises(RuntimeError, match=rf"{reason} at \(layer 3, class 1\)"):
        model.predict_early(input_ids, attention_mask, threshold=0.5, lam=1.0)
    model.predict_early(input_ids, attention_mask, threshold=0.5, lam=0.0)  # entropy alone does not read them


def test_calibration_refuses_unusable_prototypes():
    from de3_transformers import calibrate

    model = train_prototypes(tiny_model())
    input_ids, attention_mask = mixed_length_batch(batch_size=12)
    rows = [{"input_ids": ids[mask.bool()].tolist(), "label": index % 3}
            for index, (ids, mask) in enumerate(zip(input_ids, attention_mask))]
    with torch.no_grad():
        model.prototype_memory.prototypes[0, 0] = float("nan")
    with pytest.raises(RuntimeError, match=r"not finite at \(layer 1, class 0\)"):
        calibrate(model, rows, target_speedup=1.5, lam=1.0)


def test_prototypes_of_another_shape_come_back_uninitialised(tmp_path):
    from transformers import AutoModelForSequenceClassification

    train_prototypes(tiny_model()).save_pretrained(tmp_path)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path, proto_dim=16, ignore_mismatched_sizes=True)
    assert loaded.config.proto_dim == 16 and not loaded.prototype_memory.initialized.any()
    input_ids, attention_mask = mixed_length_batch(batch_size=4)
    with pytest.raises(RuntimeError, match="not initialised"):
        loaded.predict_early(input_ids, attention_mask, threshold=0.5, lam=1.0)


# 4. The checkpoint knows which layers its exits were trained at.


def test_loading_exits_at_other_layers_than_they_were_trained_at_raises(tmp_path):
    from transformers import AutoModelForSequenceClassification

    model = train_prototypes(tiny_model(exit_layers=[2, 4]))
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"trained after layers \[2, 4\].*after \[1, 4\].*exit_layers=\[2, 4\]"):
        AutoModelForSequenceClassification.from_pretrained(tmp_path, exit_layers=[1, 4])
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path)  # its own config: as saved
    assert loaded.prototype_memory.exit_layers.tolist() == [2]


# 8. Load errors name the right cause.


def test_the_fit_error_reads_the_saved_sizes_from_the_weights(tmp_path):
    import json

    from transformers import AutoModelForSequenceClassification

    train_prototypes(tiny_model()).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    # A config edited by hand after saving: it no longer tells what the weights hold.
    config["id2label"] = {str(index): f"L{index}" for index in range(5)}
    config["label2id"] = {f"L{index}": index for index in range(5)}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"which have num_labels=3 and exit_layers=\[1, 2, 3, 4\]"):
        AutoModelForSequenceClassification.from_pretrained(tmp_path)


def test_a_same_size_corruption_of_the_prototypes_is_caught_at_load(tmp_path):
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForSequenceClassification

    train_prototypes(tiny_model()).save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    weights["prototype_memory.initialized"][1, 0] = False  # a flipped byte: set, but marked uninitialised
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(OSError, match=r"inconsistent .*set while marked uninitialised.*\(layer 2, class 0\)"):
        AutoModelForSequenceClassification.from_pretrained(tmp_path)


def test_training_stops_on_a_non_finite_loss_and_saves_nothing(tmp_path):
    from datasets import Dataset

    from de3_transformers import DE3Trainer, DE3TrainingArguments

    model = tiny_model()
    input_ids, attention_mask = mixed_length_batch(batch_size=24, seed=3)
    data = Dataset.from_dict({"input_ids": input_ids.tolist(), "attention_mask": attention_mask.tolist(),
                              "labels": [index % 3 for index in range(24)]})
    args = DE3TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, learning_rate=1e6,
                                num_train_epochs=3, use_cpu=True, report_to=[], save_strategy="steps", save_steps=2,
                                logging_steps=1, seed=0)
    with pytest.raises(FloatingPointError, match=r"not finite at step \d+ .*learning rate too high \(1e\+06\)"):
        DE3Trainer(model=model, args=args, train_dataset=data).train()
    memory = model.prototype_memory
    assert torch.isfinite(memory.prototypes).all() and memory.defer_updates is False
    for checkpoint in tmp_path.glob("checkpoint-*"):  # whatever was saved before the divergence is finite
        from safetensors.torch import load_file

        assert all(torch.isfinite(tensor).all() for tensor in load_file(checkpoint / "model.safetensors").values()
                   if tensor.is_floating_point())


# 7. Inputs validated, each with an error that names the fix.


@pytest.mark.parametrize("edit, error, message", [
    (lambda ids, mask, types: (ids, mask, types.fill_(2)), ValueError, r"token_type_ids hold segment ids in \[2, 2\]"),
    (lambda ids, mask, types: (ids, torch.zeros_like(mask, dtype=torch.float).masked_fill(mask == 0, -float("inf")),
                               types), ValueError, "attention_mask must hold 1 .* 0 for padding.*-inf"),
    (lambda ids, mask, types: (ids, mask * 2 - 1, types), ValueError, r"it holds \[-1\].*signed"),
    (lambda ids, mask, types: (ids.to(torch.int8), mask, types), TypeError, "int8.*cast with .long()"),
])
def test_inputs_that_would_give_a_silent_wrong_answer_are_rejected(edit, error, message):
    model = train_prototypes(tiny_model())
    input_ids, attention_mask = mixed_length_batch(batch_size=4)
    input_ids, attention_mask, token_type_ids = edit(input_ids % 100, attention_mask, torch.zeros_like(input_ids))
    with pytest.raises(error, match=message):
        model.predict_early(input_ids, attention_mask, token_type_ids, threshold=0.5)
    with pytest.raises(error, match=message):
        model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)


def test_a_lambda_that_would_overflow_the_score_is_rejected():
    model = train_prototypes(tiny_model())
    input_ids, attention_mask = mixed_length_batch(batch_size=4)
    with pytest.raises(ValueError, match=r"lam=1e\+39 is out of range: it must be at most 1e\+06"):
        model.predict_early(input_ids, attention_mask, threshold=0.5, lam=1e39)


def test_a_threshold_given_as_a_tensor_is_rejected():
    model = train_prototypes(tiny_model())
    input_ids, attention_mask = mixed_length_batch(batch_size=4)
    with pytest.raises(TypeError, match=r"threshold must be a Python number.*float\(value\)"):
        model.predict_early(input_ids, attention_mask, threshold=torch.tensor(0.5))


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
def test_labels_of_any_integer_dtype_are_class_ids(dtype):
    model = train_prototypes(tiny_model())  # eval mode: the loss, without dropout or a prototype update
    input_ids, attention_mask = mixed_length_batch(batch_size=6)
    labels = torch.arange(6) % 3
    expected = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    torch.testing.assert_close(
        model(input_ids=input_ids, attention_mask=attention_mask, labels=labels.to(dtype)).loss, expected)


@pytest.mark.parametrize("policy, labels, message", [
    ("entropy", torch.tensor([0, 1]), "Got 2 labels for a batch of 4"),
    ("oracle", torch.tensor([0, 1, 2, 7]), r"class indices in \[0, 3\)"),
])
def test_predict_early_checks_the_labels_it_is_given(policy, labels, message):
    model = train_prototypes(tiny_model())
    input_ids, attention_mask = mixed_length_batch(batch_size=4)
    with pytest.raises(ValueError, match=message):
        model.predict_early(input_ids, attention_mask, policy=policy, threshold=0.5, labels=labels)


# 5. predict_early is safe to call from several threads on one model, in any mode.


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_predict_early_from_several_threads_equals_the_sequential_answers(mode):
    from concurrent.futures import ThreadPoolExecutor

    model = train_prototypes(tiny_model(hidden_dropout_prob=0.5, attention_probs_dropout_prob=0.5))
    batches = [mixed_length_batch(batch_size=16, seed=seed) for seed in range(12)]
    expected = [model.predict_early(ids, mask, threshold=0.9, lam=1.0) for ids, mask in batches]
    model.train(mode == "train")
    if mode == "train":
        model.bert.embeddings.eval()  # a frozen part inside a model in train mode
    modes = {name: module.training for name, module in model.named_modules()}
    with ThreadPoolExecutor(max_workers=6) as pool:
        answers = list(pool.map(lambda batch: model.predict_early(*batch, threshold=0.9, lam=1.0), batches * 8))
    for index, answer in enumerate(answers):
        reference = expected[index % len(batches)]
        assert torch.equal(answer.sample_exit_layers, reference.sample_exit_layers)
        torch.testing.assert_close(answer.logits, reference.logits, atol=1e-5, rtol=0)
    assert {name: module.training for name, module in model.named_modules()} == modes


# 6. COSEE and MPEE training resume exactly.


@pytest.mark.parametrize("objective", [dict(training_objective="cosee"),
                                       dict(training_objective="mpee", token_exit_ratio=0.5, exit_memory=0.9)])
def test_resumed_cosee_and_mpee_training_continue_like_uninterrupted_training(tmp_path, objective):
    from datasets import Dataset
    from transformers import TrainerCallback

    from de3_transformers import DE3Trainer, DE3TrainingArguments

    class StopAfterThreeSteps(TrainerCallback):  # in the middle of the second epoch
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step == 3

    def arguments(folder, **overrides):
        return DE3TrainingArguments(output_dir=str(folder), per_device_train_batch_size=4, learning_rate=1e-3,
                                    max_steps=6, use_cpu=True, report_to=[], logging_steps=1, seed=0,
                                    train_sampling_strategy="sequential", **overrides)

    input_ids, attention_mask = mixed_length_batch(batch_size=8, seed=3)
    data = Dataset.from_dict({"input_ids": input_ids.tolist(), "attention_mask": attention_mask.tolist(),
                              "labels": [index % 3 for index in range(8)]})
    no_dropout = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **objective)
    straight = tiny_model(**no_dropout)
    DE3Trainer(model=straight, args=arguments(tmp_path / "a", save_strategy="no"), train_dataset=data).train()
    args = arguments(tmp_path / "b", save_strategy="steps", save_steps=3)
    DE3Trainer(model=tiny_model(**no_dropout), args=args, train_dataset=data,
               callbacks=[StopAfterThreeSteps()]).train()
    resumed = tiny_model(seed=99, **no_dropout)
    DE3Trainer(model=resumed, args=args, train_dataset=data).train(
        resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-3"))
    for (name, expected), actual in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(actual, expected, atol=1e-6, rtol=0, msg=name)
    if objective["training_objective"] == "cosee":
        assert (resumed.cosee_state.low, resumed.cosee_state.high) == (straight.cosee_state.low,
                                                                       straight.cosee_state.high)
