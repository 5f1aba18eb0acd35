"""Analysis tools: policy curves with the oracle, exit histograms, correctness estimation (Fig. 8), Spearman
(Table VII) and the plots."""

import pytest
import torch

from de3_transformers.analysis import (
    correctness_estimation_accuracy,
    default_policies,
    exit_histogram,
    plot_exit_histograms,
    plot_policy_comparison,
    policy_curves,
    signal_rank_correlation,
)
from de3_transformers.evaluation import ExitSignals, collect_exit_signals
from de3_transformers.exit_policies import get_exit_policy
from de3_transformers.simulation import simulate_first_exits

from conftest import mixed_length_batch, tiny_model, train_prototypes


def hand_signals() -> ExitSignals:
    # 3 exits (2 below the top), 4 samples, 2 classes; labels all 0. Written one row per exit, stored batch-first.
    exit_logits = torch.tensor([
        [[2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [0.0, 2.0]],  # exit 0 right for samples 0 and 2
        [[2.0, 0.0], [2.0, 0.0], [0.0, 2.0], [0.0, 2.0]],  # exit 1 right for samples 0 and 1
        [[2.0, 0.0], [2.0, 0.0], [2.0, 0.0], [2.0, 0.0]],
    ])
    entropy = torch.tensor([[0.1, 0.1, 0.5, 0.5], [0.3, 0.1, 0.1, 0.1]])
    ratio = torch.tensor([[0.1, 0.9, 0.1, 0.9], [0.9, 0.1, 0.9, 0.1]])
    return ExitSignals(exit_logits.transpose(0, 1), entropy.T, ratio.T, torch.zeros(4, dtype=torch.long), [1, 2, 3], 3)


def test_correctness_estimation_counts_agreements_of_signal_and_correctness():
    result = correctness_estimation_accuracy(hand_signals(), threshold=0.2, lam=1.0)
    # exit 0: entropy < 0.2 says [right, right, wrong, wrong]; truth [right, wrong, right, wrong] -> 2 of 4 agree
    # exit 1: entropy < 0.2 says [wrong, right, right, right]; truth [right, right, wrong, wrong] -> 1 of 4
    assert result["layers"] == [1, 2] and result["entropy"] == [0.5, 0.25]
    # EDR (lam 1) = 2 E DR / (E + DR): exit 0 [0.1, 0.18, 0.167, 0.64] -> says [R, R, R, W]: 3 of 4 agree
    # exit 1: [0.45, 0.1, 0.18, 0.1] -> says [W, R, R, R]: 1 of 4
    assert result["edr"] == [0.75, 0.25]


def test_spearman_of_entropy_and_distance_ratio_per_exit():
    result = signal_rank_correlation(hand_signals())
    assert result["layers"] == [1, 2]
    assert result["spearman"][0] == pytest.approx(0.0)  # ranks [1.5,1.5,3.5,3.5] vs [1.5,3.5,1.5,3.5]
    signals = hand_signals()
    signals.distance_ratio = signals.entropy.clone() * 2
    assert signal_rank_correlation(signals)["spearman"] == pytest.approx([1.0, 1.0])
    signals.distance_ratio = None
    with pytest.raises(ValueError, match="train the model"):
        signal_rank_correlation(signals)


def test_exit_histogram_counts_each_exit_layer():
    histogram = exit_histogram(hand_signals(), get_exit_policy("entropy", threshold=0.2))
    assert histogram == {1: 2, 2: 2, 3: 0}
    assert exit_histogram(hand_signals(), get_exit_policy("oracle")) == {1: 2, 2: 1, 3: 1}


@pytest.fixture
def lte_signals():
    model = train_prototypes(tiny_model("bert", learning_to_exit=True))
    input_ids, attention_mask = mixed_length_batch(batch_size=24, seed=9)
    rows = [{"input_ids": ids[mask.bool()].tolist(), "label": index % 3}
            for index, (ids, mask) in enumerate(zip(input_ids, attention_mask))]
    return collect_exit_signals(model, rows)


def test_policy_curves_cover_every_policy_with_the_oracle_as_a_point(lte_signals, tmp_path):
    curves = policy_curves(lte_signals)
    assert list(curves) == list(default_policies(lte_signals))
    assert {"de3", "learned", "patience", "oracle"} <= set(curves) and len(curves["oracle"]) == 1
    for label, curve in curves.items():
        if label != "oracle":
            assert curve[0].speedup == pytest.approx(1.0) or label == "patience"
            assert all(point.flops_speedup is not None for point in curve)
    for axis in ("layer", "flops"):
        path = plot_policy_comparison(curves, tmp_path / f"{axis}.png", full_accuracy=0.5, speedup=axis)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    histograms = {name: exit_histogram(lte_signals, get_exit_policy(name, threshold=0.5)) for name in ("entropy", "de3")}
    assert sum(histograms["de3"].values()) == len(lte_signals)
    assert plot_exit_histograms(histograms, tmp_path / "hist.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="unknown"):
        plot_policy_comparison(curves, tmp_path / "x.png", speedup="seconds")


def test_signals_without_scores_or_ratio_leave_those_policies_out(lte_signals):
    lte_signals.exit_scores, lte_signals.distance_ratio = None, None
    assert "learned" not in default_policies(lte_signals) and "de3" not in default_policies(lte_signals)
    first = simulate_first_exits(get_exit_policy("entropy", threshold=0.5), lte_signals.views())
    assert first.shape == (len(lte_signals),)
