"""COSEE training (docs/method.md section 4): sample weights, the OSC hinge and the loss on hand-made tensors, the epoch
signal range, and training with `DE3Trainer`."""

import math

import pytest
import torch
from datasets import Dataset

from de3_transformers import DE3Trainer, DE3TrainingArguments
from de3_transformers.losses import COSEEState, cosee_loss, cosee_sample_weights, online_signal_calibration
from de3_transformers.signals import normalized_energy

from conftest import mixed_length_batch, tiny_model


def softmax_of_distances(exit_layer: int, layers=(1, 2, 3), beta: float = 1.0) -> list[float]:
    values = [math.exp(-beta * abs(layer - exit_layer)) for layer in layers]
    return [value / sum(values) for value in values]


def test_sample_weights_centre_on_the_simulated_exit_layer():
    # Exits at layers 1, 2, 3; signals of the two exits below the top for three samples; exit when below 0.5.
    signals = torch.tensor([[0.2, 0.9, 0.9],   # exit at layer 1: sample 0 leaves
                            [0.1, 0.3, 0.8]])  # layer 2: sample 1 leaves; sample 2 reaches the top
    weights = cosee_sample_weights(signals, torch.tensor([0.5]), [1, 2, 3], beta=1.0)
    assert weights.shape == (1, 3, 3)
    for sample, exit_layer in enumerate((1, 2, 3)):
        torch.testing.assert_close(weights[0, :, sample], torch.tensor(softmax_of_distances(exit_layer)))
    # Distances count encoder layers, not exit positions.
    sparse = cosee_sample_weights(signals, torch.tensor([0.5]), [2, 4, 6], beta=1.0)
    torch.testing.assert_close(sparse[0, :, 0], torch.tensor(softmax_of_distances(2, (2, 4, 6))))


def test_sample_weights_per_threshold_for_signals_above_the_threshold_and_at_beta_zero():
    signals = torch.tensor([[0.6], [0.8]])  # max prob of one sample at two exits; exits when above the threshold
    weights = cosee_sample_weights(signals, torch.tensor([0.5, 0.7, 0.9]), [1, 2, 3], beta=2.0, exits_below=False)
    for row, exit_layer in enumerate((1, 2, 3)):
        torch.testing.assert_close(weights[row, :, 0], torch.tensor(softmax_of_distances(exit_layer, beta=2.0)))
    uniform = cosee_sample_weights(signals, torch.tensor([0.5]), [1, 2, 3], beta=0.0)
    torch.testing.assert_close(uniform, torch.full((1, 3, 1), 1 / 3))


def test_online_signal_calibration_hinge():
    correct = torch.tensor([[True, True, False, False]])
    # Easy mean 0.15, hard mean 0.7: separated by more than the margin, so no loss.
    assert online_signal_calibration(torch.tensor([[0.1, 0.2, 0.8, 0.6]]), correct, margin=0.3).item() == 0.0
    # Easy mean 0.5, hard mean 0.6: 0.5 - 0.6 + 0.3 = 0.2.
    value = online_signal_calibration(torch.tensor([[0.4, 0.6, 0.5, 0.7]]), correct, margin=0.3)
    assert value.item() == pytest.approx(0.2)
    # Reversed for a signal that grows with confidence: 0.6 - 0.5 + 0.3.
    reversed_value = online_signal_calibration(torch.tensor([[0.4, 0.6, 0.5, 0.7]]), correct, 0.3, exits_below=False)
    assert reversed_value.item() == pytest.approx(0.4)
    # Averaged over exits; an exit whose samples are all right (no hard sample) adds 0.
    signals = torch.tensor([[0.4, 0.6, 0.5, 0.7], [0.9, 0.9, 0.9, 0.9]])
    two_exits = online_signal_calibration(signals, torch.tensor([[True, True, False, False], [True] * 4]), margin=0.3)
    assert two_exits.item() == pytest.approx(0.1)


def test_online_signal_calibration_gradient_pushes_easy_down_and_hard_up():
    signals = torch.tensor([[0.4, 0.6, 0.5, 0.7]], requires_grad=True)
    online_signal_calibration(signals, torch.tensor([[True, True, False, False]]), margin=0.3).backward()
    assert (signals.grad[0, :2] > 0).all() and (signals.grad[0, 2:] < 0).all()


def test_cosee_loss_is_the_weighted_cross_entropy_averaged_over_thresholds():
    torch.manual_seed(0)
    exit_logits, labels = torch.randn(3, 5, 2), torch.tensor([0, 1, 1, 0, 1])
    per_exit = torch.stack([torch.nn.functional.cross_entropy(logits, labels, reduction="none")
                            for logits in exit_logits])  # [3, 5]
    thresholds = torch.tensor([0.2, 0.35, 0.5])
    parts = cosee_loss(exit_logits, labels, thresholds, [1, 2, 3], beta=10.0, margin=0.3, signal="energy")
    weights = cosee_sample_weights(normalized_energy(exit_logits[:-1]), thresholds, [1, 2, 3], 10.0)
    expected = torch.stack([(weights[t] * per_exit).sum(0).mean() for t in range(3)]).mean()
    torch.testing.assert_close(parts.ce_loss, expected)
    # beta 0 (the start of the warm-up) is plain joint cross-entropy, the mean over exits.
    start = cosee_loss(exit_logits, labels, thresholds, [1, 2, 3], beta=0.0, margin=0.3)
    torch.testing.assert_close(start.ce_loss, per_exit.mean())
    with pytest.raises(ValueError, match="unknown"):
        cosee_loss(exit_logits, labels, thresholds, [1, 2, 3], 1.0, 0.3, signal="patience")


def test_state_range_of_the_previous_epoch():
    state = COSEEState()
    assert (state.low, state.high) == (0.0, 1.0)  # the first epoch draws from [0, 1]
    state.observe(torch.tensor([0.3, 0.5]))
    state.observe(torch.tensor([[0.4, 0.7]]))
    assert (state.low, state.high) == (0.0, 1.0)  # applied only at the end of the epoch
    state.end_epoch()
    assert (state.low, state.high) == pytest.approx((0.3, 0.7))
    drawn = state.thresholds(1000, "cpu")
    assert drawn.min() >= 0.3 and drawn.max() <= 0.7 and drawn.std() > 0.1
    state.end_epoch()  # nothing seen since: the range stays
    assert (state.low, state.high) == pytest.approx((0.3, 0.7))
    state.observe(torch.tensor([0.5]))
    state.end_epoch(reduce_max=lambda seen: torch.maximum(seen, torch.tensor([-0.1, 0.9])))  # another process saw more
    assert (state.low, state.high) == pytest.approx((0.1, 0.9))


def test_model_loss_with_the_cosee_objective_and_dar():
    model = tiny_model(training_objective="cosee", dar_alpha=0.5, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0).train()
    input_ids, attention_mask = mixed_length_batch(batch_size=6)
    labels = torch.arange(6) % 3
    model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)  # initialises the prototypes
    torch.manual_seed(5)
    out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, output_exit_signals=True)
    assert out.osc_loss is not None and out.kd_loss is None
    torch.testing.assert_close(out.loss, out.ce_loss + 0.5 * out.dar_loss + 0.1 * out.osc_loss)
    torch.manual_seed(5)  # the same thresholds
    thresholds = model.cosee_state.thresholds(5, "cpu")
    expected = cosee_loss(out.exit_logits.transpose(0, 1), labels, thresholds, [1, 2, 3, 4], 10.0, 0.3)
    torch.testing.assert_close(out.ce_loss, expected.ce_loss)
    out.loss.backward()
    assert model.bert.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0
    # The training forwards widened this epoch's signal range.
    model.cosee_state.end_epoch()
    assert 0 < model.cosee_state.low < model.cosee_state.high < 1


def test_trainer_warms_up_beta_sets_the_range_each_epoch_and_logs_osc(tmp_path):
    model = tiny_model(training_objective="cosee", cosee_signal="entropy")
    input_ids, attention_mask = mixed_length_batch(batch_size=16)
    data = Dataset.from_dict({"input_ids": input_ids.tolist(), "attention_mask": attention_mask.tolist(),
                              "labels": (torch.arange(16) % 3).tolist()})
    progress = []

    class Probe(DE3Trainer):
        def compute_loss(self, model, inputs, **kwargs):
            progress.append(model.cosee_state.progress)
            return super().compute_loss(model, inputs, **kwargs)

    args = DE3TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, num_train_epochs=2,
                                use_cpu=True, report_to=[], save_strategy="no", logging_steps=1)
    trainer = Probe(model=model, args=args, train_dataset=data)
    trainer.train()
    assert progress == [0.0, 0.25, 0.5, 0.75]  # t / T at each of the 4 steps
    state = model.cosee_state
    assert (state.low, state.high) != (0.0, 1.0) and 0 <= state.low < state.high <= 1
    logged = [entry for entry in trainer.state.log_history if "osc_loss" in entry]
    assert len(logged) == 4


def test_config_checks_the_cosee_fields():
    for bad in (dict(training_objective="fast"), dict(cosee_signal="patience"), dict(cosee_num_thresholds=0),
                dict(cosee_beta=-1.0), dict(cosee_margin=float("nan"))):
        with pytest.raises(ValueError, match=next(iter(bad))):
            tiny_model(**bad)
