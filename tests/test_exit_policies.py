"""Exit policies (docs/method.md section 3): each rule on hand-made signals, compact `predict_early` against the replay on a
full forward for every policy, custom policies, calibration of any policy, the learning-to-exit head and FLOPs."""

import math
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

from de3_transformers import calibrate
from de3_transformers.calibration import tradeoff_curve
from de3_transformers.evaluation import collect_exit_signals
from de3_transformers.exit_policies import (
    EXIT_POLICIES,
    ExitView,
    ThresholdPolicy,
    get_exit_policy,
    register_exit_policy,
)
from de3_transformers.flops import FlopsCounter
from de3_transformers.losses import learning_to_exit_loss
from de3_transformers.signals import hybrid_indicator
from de3_transformers.simulation import simulate_first_exits, simulate_policy

from conftest import mixed_length_batch, tiny_model, train_prototypes


def logits_for(top_probability: float) -> list[float]:
    """Two-class logits whose class 0 has probability `top_probability`."""
    return [math.log(top_probability), math.log(1 - top_probability)]


def views_from(predictions=None, entropies=None, scores=None, labels=None, logits=None):
    """One-sample `ExitView`s of the exits below the top, from per-exit values."""
    count = len(next(values for values in (predictions, entropies, scores, logits) if values is not None))
    views = []
    for index in range(count):
        if logits is not None:
            exit_logits = torch.tensor([logits[index]])
        else:
            exit_logits = torch.zeros(1, 2)
            if predictions is not None:
                exit_logits[0, predictions[index]] = 1.0
        views.append(ExitView(
            exit_index=index, layer=index + 1, logits=exit_logits,
            entropy=None if entropies is None else torch.tensor([entropies[index]]),
            exit_scores=None if scores is None else torch.tensor([scores[index]]),
            labels=None if labels is None else torch.tensor([labels]),
        ))
    return views


def first_exit(policy, views) -> int:
    return int(simulate_first_exits(policy, views)[0])


# Each rule on hand-made signal sequences; index len(views) is the top exit (the fallback).


@pytest.mark.parametrize("threshold, expected", [(0.35, 2), (0.5, 1), (0.05, 4), (0.0, 4)])
def test_entropy_leaves_at_the_first_exit_below_the_threshold(threshold, expected):
    views = views_from(entropies=[0.9, 0.4, 0.3, 0.6])
    assert first_exit(get_exit_policy("entropy", threshold=threshold), views) == expected


@pytest.mark.parametrize("threshold, expected", [(0.85, 2), (0.65, 1), (0.95, 3)])
def test_max_prob_leaves_at_the_first_exit_above_the_threshold(threshold, expected):
    views = views_from(logits=[logits_for(0.6), logits_for(0.7), logits_for(0.9)])
    assert first_exit(get_exit_policy("max_prob", threshold=threshold), views) == expected


def test_energy_is_the_sigmoid_of_minus_logsumexp():
    logits = [[2.0, 1.0], [4.0, 3.0], [0.0, -1.0]]
    energies = [1 / (1 + math.exp(math.log(math.exp(a) + math.exp(b)))) for a, b in logits]  # sigmoid(-lse)
    policy = get_exit_policy("energy", threshold=0.03)
    assert policy.signal(views_from(logits=logits)[1]).item() == pytest.approx(energies[1], rel=1e-5)
    assert energies[0] > 0.03 > energies[1]
    assert first_exit(policy, views_from(logits=logits)) == 1


def test_patience_counts_unchanged_predictions_and_resets_on_a_change():
    policy = get_exit_policy("patience", patience=2)
    assert first_exit(policy, views_from(predictions=[0, 1, 1, 1, 0])) == 3
    assert first_exit(policy, views_from(predictions=[0, 0, 1, 1, 1])) == 4  # the change at exit 2 resets the count
    assert first_exit(policy, views_from(predictions=[0, 1, 0, 1, 0])) == 5  # never patient: the top answers
    assert first_exit(get_exit_policy("patience", patience=0), views_from(predictions=[1, 0])) == 0


def test_patient_confident_needs_consecutive_confident_exits():
    policy = get_exit_policy("patient_confident", threshold=0.2, patience=2)
    assert first_exit(policy, views_from(entropies=[0.1, 0.5, 0.1, 0.1, 0.1])) == 3
    assert first_exit(policy, views_from(entropies=[0.1, 0.5, 0.1, 0.5])) == 4  # reset each time: fallback
    single = get_exit_policy("patient_confident", threshold=0.2, patience=1)
    assert first_exit(single, views_from(entropies=[0.3, 0.1])) == 1  # patience 1 is the entropy rule


def test_learned_policy_leaves_when_the_score_is_above_the_threshold():
    policy = get_exit_policy("learned", threshold=0.7)
    assert first_exit(policy, views_from(scores=[0.2, 0.7, 0.8])) == 2  # strictly above
    assert first_exit(policy, views_from(scores=[0.2, 0.3])) == 2


def test_oracle_leaves_at_the_first_right_exit():
    assert first_exit(get_exit_policy("oracle"), views_from(predictions=[1, 1, 0, 1], labels=0)) == 2
    assert first_exit(get_exit_policy("oracle"), views_from(predictions=[1, 1], labels=0)) == 2


def test_de3_policy_is_edr_below_the_threshold():
    entropy, ratio = 0.4, 0.1
    edr = 2 / (1 / ratio + 1 / entropy)  # lam = 1
    views = [ExitView(0, 1, torch.zeros(1, 2), entropy=torch.tensor([entropy]), distance_ratio=torch.tensor([ratio]))]
    assert first_exit(get_exit_policy("de3", threshold=edr + 1e-4, lam=1.0), views) == 0
    assert first_exit(get_exit_policy("de3", threshold=edr - 1e-4, lam=1.0), views) == 1
    assert first_exit(get_exit_policy("de3", threshold=0.41, lam=0.0), views) == 0  # lam 0: entropy alone


def test_a_tensor_of_thresholds_replays_them_all_at_once():
    views = views_from(entropies=[0.9, 0.4, 0.3, 0.6])
    policy = get_exit_policy("patient_confident", threshold=torch.tensor([[0.35], [0.5], [0.95]]), patience=2)
    assert simulate_first_exits(policy, views)[:, 0].tolist() == [4, 2, 1]


@pytest.mark.parametrize("name, parameters, message", [
    ("entropy", {"threshold": float("nan")}, "threshold=nan"),
    ("max_prob", {"threshold": "high"}, "threshold='high'"),
    ("patience", {"patience": 1.5}, "integer"),
    ("patient_confident", {"threshold": 0.2, "patience": 0}, ">= 1"),
    ("nonsense", {}, "unknown"),
])
def test_bad_policy_parameters_are_rejected(name, parameters, message):
    with pytest.raises(ValueError, match=message):
        get_exit_policy(name, **parameters)


# Compact inference against the replay on a full forward, for every policy.


@pytest.fixture
def lte_model(backbone):
    return train_prototypes(tiny_model(backbone, learning_to_exit=True, exit_pooling="mean"))


def spread(values: torch.Tensor) -> list[float]:
    return [float(q) for q in torch.quantile(values.flatten().float(), torch.tensor([0.2, 0.5, 0.8]))]


@pytest.mark.parametrize("name", sorted(EXIT_POLICIES))
def test_every_policy_agrees_with_its_replay_on_a_full_forward(lte_model, name):
    input_ids, attention_mask = mixed_length_batch(batch_size=16, seed=7, pad_token_id=lte_model.config.pad_token_id)
    labels = torch.arange(16) % 3
    with torch.no_grad():
        full = lte_model(input_ids=input_ids, attention_mask=attention_mask, output_exit_signals=True)
    probabilities = full.exit_logits[:, :-1].softmax(-1).amax(-1)
    energy = torch.sigmoid(-torch.logsumexp(full.exit_logits[:, :-1], dim=-1))
    edr = hybrid_indicator(full.entropy, full.distance_ratio, 1.0)
    settings = {
        "de3": [{"threshold": value, "lam": 1.0} for value in spread(edr)],
        "entropy": [{"threshold": value} for value in spread(full.entropy)],
        "max_prob": [{"threshold": value} for value in spread(probabilities)],
        "energy": [{"threshold": value} for value in spread(energy)],
        "patience": [{"patience": value} for value in (0, 1, 2)],
        "patient_confident": [{"threshold": value, "patience": 2} for value in spread(full.entropy)],
        "learned": [{"threshold": value} for value in spread(full.exit_scores)],
        "oracle": [{}],
    }[name]
    seen = set()
    for parameters in settings:
        policy = get_exit_policy(name, **parameters)
        result = lte_model.predict_early(input_ids, attention_mask, policy=policy, labels=labels)
        simulated = simulate_policy(policy, full.exit_logits, lte_model.config.exit_layers, full.entropy,
                                    full.distance_ratio, full.exit_scores, labels)
        assert result.sample_exit_layers.tolist() == simulated.sample_exit_layers.tolist()
        torch.testing.assert_close(result.logits, simulated.logits, atol=1e-5, rtol=0)
        seen.update(result.sample_exit_layers.tolist())
    assert name == "oracle" or len(seen) >= 2  # samples left at different exits: compaction was exercised


def test_stateful_policy_state_follows_the_samples_through_compaction():
    """Patience state is per sample: a sample whose neighbours left keeps its own count (batch order invariance)."""
    model = train_prototypes(tiny_model("bert"))
    input_ids, attention_mask = mixed_length_batch(batch_size=10, seed=3)
    batched = model.predict_early(input_ids, attention_mask, policy="patience", patience=1)
    order = torch.randperm(10, generator=torch.Generator().manual_seed(0))
    shuffled = model.predict_early(input_ids[order], attention_mask[order], policy="patience", patience=1)
    assert shuffled.sample_exit_layers.tolist() == batched.sample_exit_layers[order].tolist()
    for row in range(10):
        alone = model.predict_early(input_ids[row : row + 1], attention_mask[row : row + 1], policy="patience",
                                    patience=1)
        assert alone.sample_exit_layers.item() == batched.sample_exit_layers[row].item()


def test_policy_choice_errors_name_the_fix(trained_model):
    input_ids, attention_mask = mixed_length_batch(batch_size=4)
    with pytest.raises(ValueError, match="needs a threshold"):
        trained_model.predict_early(input_ids, attention_mask, policy="entropy")
    with pytest.raises(ValueError, match="learning_to_exit=True"):
        trained_model.predict_early(input_ids, attention_mask, policy="learned", threshold=0.5)
    with pytest.raises(ValueError, match="needs labels"):
        trained_model.predict_early(input_ids, attention_mask, policy="oracle")
    with pytest.raises(ValueError, match="not both"):
        trained_model.predict_early(input_ids, attention_mask, policy=get_exit_policy("entropy"), threshold=0.1)
    with pytest.raises(ValueError, match="unknown"):
        trained_model.predict_early(input_ids, attention_mask, policy="fastest", threshold=0.1)


def test_a_registered_custom_policy_runs_in_predict_early_and_calibration():
    @dataclass
    class MarginPolicy(ThresholdPolicy):
        name: ClassVar[str] = "test_margin"
        exits_below: ClassVar[bool] = False

        def signal(self, view):
            top2 = view.logits.float().softmax(-1).topk(2, dim=-1).values
            return top2[..., 0] - top2[..., 1]

    register_exit_policy(MarginPolicy)
    try:
        model = train_prototypes(tiny_model("bert"))
        input_ids, attention_mask = mixed_length_batch(batch_size=12, seed=4)
        rows = [{"input_ids": ids[mask.bool()].tolist(), "label": index % 3}
                for index, (ids, mask) in enumerate(zip(input_ids, attention_mask))]
        result = calibrate(model, rows, target_speedup=2.0, policy="test_margin")
        assert result.policy == "test_margin" and result.speedup >= 2.0
        assert model.config.early_exit_policy == "test_margin"
        replay = model.predict_early(input_ids, attention_mask)  # the calibrated policy is now the default
        assert replay.speedup == pytest.approx(result.speedup)
    finally:
        del EXIT_POLICIES["test_margin"]
    with pytest.raises(TypeError, match="ExitPolicy"):
        register_exit_policy(object)


# Calibration of the baselines.


@pytest.fixture
def labelled_rows():
    input_ids, attention_mask = mixed_length_batch(batch_size=24, seed=11)
    return [{"input_ids": ids[mask.bool()].tolist(), "label": index % 3}
            for index, (ids, mask) in enumerate(zip(input_ids, attention_mask))]


@pytest.mark.parametrize("policy, extra", [
    ("entropy", {}), ("max_prob", {}), ("energy", {}), ("patience", {}), ("learned", {}),
    ("patient_confident", {"patience_grid": [1, 2]}),
])
def test_every_baseline_calibrates_and_predict_early_reproduces_it(lte_model, labelled_rows, policy, extra):
    result = calibrate(lte_model, labelled_rows, target_speedup=1.5, policy=policy, **extra)
    assert result.policy == policy and result.speedup >= 1.5
    assert lte_model.config.early_exit_policy == policy
    # the curve runs from 1x upward
    assert result.curve[0].speedup == pytest.approx(1.0) or policy == "patience"
    speeds = [point.speedup for point in result.curve]
    assert speeds == sorted(speeds)
    input_ids = [torch.tensor(row["input_ids"]) for row in labelled_rows]
    padded = torch.nn.utils.rnn.pad_sequence(input_ids, batch_first=True)
    mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(ids) for ids in input_ids], batch_first=True)
    replay = lte_model.predict_early(padded, mask)  # the calibrated policy and parameters are the defaults now
    labels = torch.tensor([row["label"] for row in labelled_rows])
    assert replay.speedup == pytest.approx(result.speedup)
    assert (replay.logits.argmax(-1) == labels).double().mean().item() == pytest.approx(result.accuracy)


def test_oracle_is_a_single_point_above_every_policy(lte_model, labelled_rows):
    signals = collect_exit_signals(lte_model, labelled_rows)
    (oracle,) = tradeoff_curve(signals, policy="oracle")
    predictions = signals.exit_logits.argmax(-1)  # [N, E]
    any_exit_right = (predictions == signals.labels.view(-1, 1)).any(dim=1)
    assert oracle.accuracy == pytest.approx(any_exit_right.double().mean().item())
    for name in ("entropy", "de3", "patience"):
        for point in tradeoff_curve(signals, policy=name):
            assert point.accuracy <= oracle.accuracy + 1e-12
    with pytest.raises(ValueError, match="nothing to calibrate"):
        calibrate(lte_model, None, policy="oracle", signals=signals)


def test_a_patience_that_cannot_reach_the_target_is_skipped_or_named(lte_model, labelled_rows):
    # patience 3 cannot leave before the 4th exit (the top of this 4-layer model): at most 1x.
    result = calibrate(lte_model, labelled_rows, target_speedup=2.0, policy="patient_confident",
                       patience_grid=[1, 3])
    assert result.parameters["patience"] == 1
    with pytest.raises(ValueError, match="cannot reach a 2.0x"):
        calibrate(lte_model, labelled_rows, target_speedup=2.0, policy="patient_confident", patience=3)


@pytest.mark.parametrize("kwargs, message", [
    ({"policy": "entropy", "lam": 1.0}, "apply to the de3 policy"),
    ({"policy": "patience", "patience_grid": [1, 2]}, "apply to the patient_confident policy"),
    ({"policy": "patient_confident", "patience": 1, "patience_grid": [1]}, "not both"),
])
def test_parameters_of_another_policy_are_rejected_by_calibration(lte_model, labelled_rows, kwargs, message):
    with pytest.raises(ValueError, match=message):
        calibrate(lte_model, labelled_rows, **kwargs)


# BERxiT learning-to-exit head.


def test_learning_to_exit_loss_is_the_mse_to_exit_correctness():
    exit_logits = torch.tensor([[[2.0, 0.0], [0.0, 2.0]], [[0.0, 1.0], [1.0, 0.0]], [[1.0, 0.0], [1.0, 0.0]]])
    labels = torch.tensor([0, 0])
    scores = torch.tensor([[0.9, 0.2], [0.5, 0.6]])  # exits 0 and 1; correctness [1, 0] and [0, 1]
    expected = ((0.9 - 1) ** 2 + 0.2**2 + 0.5**2 + (0.6 - 1) ** 2) / 4
    assert learning_to_exit_loss(scores, exit_logits, labels).item() == pytest.approx(expected)


def test_learning_to_exit_heads_train_without_touching_the_backbone(lte_model):
    input_ids, attention_mask = mixed_length_batch(batch_size=6)
    lte_model.train()
    output = lte_model(input_ids=input_ids, attention_mask=attention_mask, labels=torch.arange(6) % 3,
                       output_exit_signals=True)
    output.lte_loss.requires_grad_(False)
    assert output.exit_scores.shape == (6, 3) and ((output.exit_scores >= 0) & (output.exit_scores <= 1)).all()
    lte_model.zero_grad()
    scores = torch.stack([lte_model.exit_head(index, hidden, attention_mask).scores for index, hidden in
                          enumerate(lte_model(input_ids=input_ids, attention_mask=attention_mask,
                                              output_hidden_states=True).hidden_states[1:4])])
    learning_to_exit_loss(scores, output.exit_logits.detach().transpose(0, 1), torch.arange(6) % 3).backward()
    assert all(head.weight.grad is not None for head in lte_model.exit_scorers)
    assert all(parameter.grad is None for parameter in lte_model.backbone.parameters())
    lte_model.eval()


# FLOPs.


def test_flops_match_a_hand_count_for_a_tiny_config():
    model = tiny_model("bert", exit_pooling="mean")  # H=32, I=64, K=3, P=32, 4 layers
    counter = FlopsCounter.from_config(model.config)
    length = 10
    layer = 8 * length * 32 * 32 + 4 * length * length * 32 + 4 * length * 32 * 64  # 81,920 + 12,800 + 81,920
    head = length * 32 + 2 * 32 * 32 + 2 * 32 * 3  # mean pooling, pooler, classifier
    decision = 2 * 32 * 32 + 2 * 3 * 32  # prototypical network, distances
    assert counter.layer(torch.tensor([length])).item() == layer == 176_640
    assert counter.full(torch.tensor([length])).item() == 4 * layer + head
    # leaving at the second exit: 2 layers, 2 heads, 2 decisions; at the top: 4 layers, 4 heads, 3 decisions
    lengths = torch.tensor([length, length])
    spent = counter.early_exit(torch.tensor([1, 3]), lengths, prototypes=True)
    assert spent.tolist() == [2 * layer + 2 * head + 2 * decision, 4 * layer + 4 * head + 3 * decision]
    expected = 2 * (4 * layer + head) / spent.sum().item()
    assert counter.speedup(torch.tensor([1, 3]), lengths, prototypes=True).item() == pytest.approx(expected)
    assert counter.early_exit(torch.tensor([0]), torch.tensor([length]), scores=True).item() == layer + head + 64


def test_trainer_evaluation_uses_the_configured_policy_and_learning_to_exit_scores(tmp_path):
    from de3_transformers import DE3Trainer, DE3TrainingArguments

    model = train_prototypes(tiny_model("bert", learning_to_exit=True, early_exit_policy="learned",
                                        early_exit_threshold=0.5))
    input_ids, attention_mask = mixed_length_batch(batch_size=12, seed=13)
    rows = [{"input_ids": ids, "attention_mask": mask, "labels": torch.tensor(index % 3)}
            for index, (ids, mask) in enumerate(zip(input_ids, attention_mask))]
    args = DE3TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=5, report_to="none",
                                use_cpu=True)
    metrics = DE3Trainer(model=model, args=args, eval_dataset=rows).evaluate()
    with torch.no_grad():
        full = model(input_ids=input_ids, attention_mask=attention_mask, output_exit_signals=True)
    expected = simulate_policy(get_exit_policy("learned", threshold=0.5), full.exit_logits, model.config.exit_layers,
                               exit_scores=full.exit_scores)
    assert metrics["eval_early_exit_speedup"] == pytest.approx(expected.speedup)
    assert 0 < metrics["eval_early_exit_accuracy"] <= 1
