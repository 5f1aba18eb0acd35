"""Analysis of exit policies from one full-depth pass (stored [`ExitSignals`]): trade-off curves of several policies
with the oracle as upper bound, the per-layer exit histogram, the accuracy of correctness estimation (DE3 paper,
Fig. 8) and the rank correlation of entropy and distance ratio (Table VII)."""

import torch
from scipy.stats import spearmanr

from .calibration import TradeoffPoint, tradeoff_curve
from .evaluation import ExitSignals, MetricFn
from .exit_policies import ExitPolicy, get_exit_policy
from .plots import plot_exit_histograms, plot_policy_comparison  # re-exported: the plots of what this module computes
from .signals import hybrid_indicator
from .simulation import simulate_first_exits


def default_policies(signals: ExitSignals, lam: float = 1.0, patience: int = 2) -> dict[str, ExitPolicy]:
    """Every built-in policy these signals can drive (DE3 needs the distance ratio, `learned` the LTE scores), with
    the oracle last. The swept parameter of each is left at its default; curves replace it."""
    names = ["entropy", "max_prob", "energy", "patience", "patient_confident"]
    if signals.distance_ratio is not None:
        names.insert(0, "de3")
    if signals.exit_scores is not None:
        names.append("learned")
    policies = {name: get_exit_policy(name, lam=lam, patience=patience) for name in names}
    policies["oracle"] = get_exit_policy("oracle")
    return policies


def policy_curves(
    signals: ExitSignals,
    policies: dict[str, "str | ExitPolicy"] | None = None,
    metric_fn: MetricFn | None = None,
    max_points: int = 400,
) -> dict[str, list[TradeoffPoint]]:
    """The accuracy / speed-up curve of each policy (the oracle: one point), all from the same stored signals.

    Args:
        signals: from `collect_exit_signals`.
        policies: `{label: policy name or ExitPolicy}`; defaults to [`default_policies`].
        metric_fn, max_points: as for `tradeoff_curve`.

    Raises:
        ValueError: as `tradeoff_curve`, for a policy the signals cannot drive.
    """
    policies = default_policies(signals) if policies is None else policies
    return {label: tradeoff_curve(signals, metric_fn=metric_fn, max_points=max_points, policy=policy)
            for label, policy in policies.items()}


def exit_histogram(signals: ExitSignals, policy: ExitPolicy) -> dict[int, int]:
    """How many samples leave at each exit layer under `policy` (a policy with all its parameters set).

    Raises:
        ValueError: when the signals cannot drive the policy.
    """
    first = simulate_first_exits(policy, signals.views())
    counts = torch.bincount(first.flatten(), minlength=len(signals.exit_layers))
    return {layer: int(count) for layer, count in zip(signals.exit_layers, counts.tolist())}


def correctness_estimation_accuracy(signals: ExitSignals, threshold: float = 0.2, lam: float = 1.0) -> dict:
    """DE3 paper, Fig. 8: per exit below the top, how often "signal < threshold" agrees with the exit's prediction
    being right, for entropy and for EDR (paper: threshold 0.2).

    Returns:
        `{"layers": [...], "entropy": [...], "edr": [...]}`, accuracies in [0, 1] (no `"edr"` without the ratio).
    """
    correct = signals.exit_logits[:, :-1].argmax(dim=-1) == signals.labels.view(-1, 1)  # [N, E-1]
    result = {"layers": signals.exit_layers[:-1],
              "entropy": ((signals.entropy < threshold) == correct).double().mean(dim=0).tolist()}
    if signals.distance_ratio is not None:
        edr = hybrid_indicator(signals.entropy, signals.distance_ratio, lam)
        result["edr"] = ((edr < threshold) == correct).double().mean(dim=0).tolist()
    return result


def signal_rank_correlation(signals: ExitSignals) -> dict:
    """DE3 paper, Table VII: Spearman rank correlation of entropy and distance ratio at each exit below the top.

    Returns:
        `{"layers": [...], "spearman": [...]}`.

    Raises:
        ValueError: when the signals have no distance ratio (untrained prototypes).
    """
    if signals.distance_ratio is None:
        raise ValueError("The signals have no distance ratio (prototypes not initialised); train the model first.")
    values = []
    for entropy, ratio in zip(signals.entropy.T, signals.distance_ratio.T):  # one pair of columns per exit
        values.append(float(spearmanr(entropy.numpy(), ratio.numpy()).statistic))
    return {"layers": signals.exit_layers[:-1], "spearman": values}


__all__ = [
    "correctness_estimation_accuracy",
    "default_policies",
    "exit_histogram",
    "plot_exit_histograms",
    "plot_policy_comparison",
    "policy_curves",
    "signal_rank_correlation",
]
