"""Calibration of an exit policy for a target layer speed-up (docs/method.md section 6), from one full-depth pass.

The signals of every exit (logits, entropy, distance ratio, learning-to-exit scores) are collected once
(`evaluation.collect_exit_signals`); every candidate threshold (or patience) is then replayed on them with the same
policy object as `predict_early` uses (`exit_policies.simulate_first_exits`), so the whole accuracy / speed-up
trade-off of every policy costs a single forward per sample, whatever the number of thresholds, lambdas or policies.
The command line is `calibration_cli` (`python -m de3_transformers.calibration ...`).
"""

import numbers
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from transformers.utils import logging

from .configuration_de3 import check_exit_parameters
# `evaluate_early_exit` is re-exported: it measures for real what calibration chose.
from .evaluation import ExitSignals, MetricFn, collect_exit_signals, evaluate_early_exit
from .exit_policies import EXIT_POLICIES, ExitPolicy, get_exit_policy
from .onnx_backend import check_backend, onnx_config, onnx_runner
from .simulation import layer_speedup, simulate_first_exits


logger = logging.get_logger(__name__)

# Thresholds are compared with [thresholds, exits, samples] bool tensors; chunks keep them below this many elements.
_CHUNK_ELEMENTS = 1 << 23


@dataclass
class TradeoffPoint:
    """Early exit with one setting of a policy: layer speed-up (docs/method.md eq. 12), accuracy and `metric_fn`'s
    metrics, on the data the signals came from.

    `threshold` and `lam` are the policy's (None / 0 when it has none); `parameters` holds all of them (`patience`
    too); `flops_speedup` is the FLOPs speed-up, exit heads and decisions counted, when the signals carry lengths.
    """

    threshold: float | None
    lam: float
    speedup: float
    accuracy: float
    metrics: dict[str, float] = field(default_factory=dict)
    policy: str = "de3"
    parameters: dict[str, float] = field(default_factory=dict)
    flops_speedup: float | None = None


@dataclass
class CalibrationResult:
    """The calibrated exit setting, its measured speed-up and accuracy, and the trade-off curves it came from.

    `curve` is the curve of the chosen setting; `curves` holds one curve per value of the grid searched (lambda for
    DE3, patience for `patient_confident`; `None` as the key for other policies).
    """

    threshold: float | None
    lam: float
    target_speedup: float
    speedup: float
    accuracy: float
    metrics: dict[str, float]
    full_accuracy: float
    curve: list[TradeoffPoint]
    curves: dict[float | None, list[TradeoffPoint]]
    policy: str = "de3"
    parameters: dict[str, float] = field(default_factory=dict)
    flops_speedup: float | None = None

    def to_dict(self) -> dict:
        """A JSON-ready dict (grid values of `curves` as string keys)."""
        values = {name: getattr(self, name) for name in
                  ("threshold", "lam", "target_speedup", "speedup", "accuracy", "metrics", "full_accuracy", "policy",
                   "parameters", "flops_speedup")}
        values["curve"] = [asdict(point) for point in self.curve]
        values["curves"] = {repr(key): [asdict(point) for point in curve] for key, curve in self.curves.items()}
        return values


def _thin(values: list, max_points: int) -> list:
    """`max_points` of `values` at evenly spaced ranks, the first and the last always kept."""
    if len(values) <= max_points:
        return list(values)
    ranks = torch.linspace(0, len(values) - 1, max_points).round().long().unique()
    return [values[rank] for rank in ranks.tolist()]


def sweep_candidates(signals: ExitSignals, policy: "str | ExitPolicy" = "de3", max_points: int = 2000,
                     **parameters) -> list[float]:
    """The values of the policy's swept parameter (threshold, or patience) worth trying on these signals: one per
    distinct early-exit behaviour, from the fewest early exits (1x) to the most (every sample at the first exit).
    With more than `max_points`, `max_points` of them are kept at evenly spaced ranks (both ends always).

    Raises:
        ValueError: for an unknown policy or parameter out of range, signals the policy cannot read, or
            `max_points < 2`.
    """
    policy = get_exit_policy(policy, **parameters)
    signals.check_readable_by(policy)
    if max_points < 2:
        raise ValueError(f"max_points={max_points} must be at least 2 (the 1x point and the largest speed-up).")
    if policy.sweep is None:
        return []
    return _thin(policy.sweep_values(signals.views()), max_points)


def _point(signals, policy: ExitPolicy, first: torch.Tensor, predictions, metric_fn, layers) -> TradeoffPoint:
    chosen = predictions.gather(0, first.view(1, -1)).view(-1)
    metrics = {}
    if metric_fn is not None:
        metrics = {name: float(value) for name, value in metric_fn(chosen.numpy(), signals.labels.numpy()).items()}
    flops = None
    if signals.flops is not None and signals.lengths is not None:
        flops = float(signals.flops.speedup(first, signals.lengths, policy.needs_distance_ratio,
                                            policy.needs_exit_scores))
    parameters = {key: float(value) if isinstance(value, numbers.Real) else value
                  for key, value in policy.parameters().items()}
    return TradeoffPoint(
        threshold=parameters.get("threshold"),
        lam=parameters.get("lam", 0.0),
        speedup=layer_speedup(layers[first], signals.num_layers),
        accuracy=float((chosen == signals.labels).double().mean()),
        metrics=metrics,
        policy=policy.name,
        parameters=parameters,
        flops_speedup=flops,
    )


def tradeoff_curve(
    signals: ExitSignals,
    lam: float | None = None,
    thresholds: Sequence[float] | None = None,
    metric_fn: MetricFn | None = None,
    max_points: int = 2000,
    policy: "str | ExitPolicy" = "de3",
    patience: int | None = None,
) -> list[TradeoffPoint]:
    """Accuracy and speed-up of early exit at many settings of a policy, from stored signals (no forward pass).

    Each point is exactly what `simulate_policy` (and so `predict_early`) gives with that setting.

    Args:
        signals: from [`collect_exit_signals`].
        lam: EDR's lambda for the `de3` policy (docs/method.md eq. 11; default 1); 0 exits on entropy alone.
        thresholds: the values of the policy's swept parameter to try (thresholds; patiences for `patience`);
            defaults to [`sweep_candidates`] (1x up to the largest speed-up).
        metric_fn: `(predicted class ids, labels) -> {name: value}`, numpy arrays, for metrics beside accuracy
            (F1, Matthews correlation; see `de3_transformers.metrics.classification_metrics`).
        max_points: cap on the number of default values.
        policy: a name of `EXIT_POLICIES` or an `ExitPolicy` (its swept parameter is replaced by each value).
        patience: of the `patient_confident` policy (default 2).

    Returns:
        One [`TradeoffPoint`] per distinct value, from the fewest early exits to the most (non-decreasing speed-up
        for the built-in policies); a single point for the oracle.

    Raises:
        ValueError: for an unknown policy, a value out of range, or signals the policy cannot read (`lam > 0`
            without initialised prototypes, `learned` without learning-to-exit scores).
    """
    if lam is not None:
        check_exit_parameters(0.0, lam)
    base = get_exit_policy(policy, lam=lam, patience=patience)
    signals.check_readable_by(base)
    views = signals.views()
    predictions = signals.exit_logits.argmax(dim=-1).T  # [E, N]: one row per exit, as `_point` gathers them
    layers = torch.tensor(signals.exit_layers)
    if base.sweep is None:
        return [_point(signals, base, simulate_first_exits(base, views), predictions, metric_fn, layers)]
    if thresholds is None:
        values = sweep_candidates(signals, base, max_points)
    else:
        values = list(dict.fromkeys(float(value) for value in thresholds))
        for value in values:
            base.with_value(value)  # validates it
    num_exits, num_samples = predictions.shape
    chunk = max(1, _CHUNK_ELEMENTS // max(1, num_exits * num_samples))
    points = []
    for start in range(0, len(values), chunk):
        part = values[start : start + chunk]
        # float32, as the rule compares a Python threshold with float32 signals in `predict_early`.
        first = simulate_first_exits(base.with_value(torch.tensor(part).view(-1, 1)), views)
        first = first.expand(len(part), num_samples)
        for row, value in enumerate(part):
            point = _point(signals, base.with_value(value), first[row], predictions, metric_fn, layers)
            points.append(point)
    return points


def _check_target(target_speedup, signals: ExitSignals) -> None:
    if isinstance(target_speedup, bool) or not isinstance(target_speedup, numbers.Real) or not target_speedup >= 1:
        raise ValueError(
            f"target_speedup={target_speedup!r} must be a number >= 1 (1 is the full model; 2.0 halves the layers "
            "run on average)."
        )
    reachable = signals.num_layers / signals.exit_layers[0]
    if not target_speedup <= reachable:
        raise ValueError(
            f"target_speedup={target_speedup} cannot be reached: with exit_layers={signals.exit_layers} of "
            f"{signals.num_layers} layers the largest layer speed-up is {reachable:g}x (every sample leaving at the "
            f"first exit). Ask for at most {reachable:g}, or use a model with an exit on an earlier layer."
        )


def _policy_grid(config, policy, lam, lam_grid, patience, patience_grid) -> list[tuple[float | None, ExitPolicy]]:
    """`(grid value, policy)` for every setting calibration tries."""
    if isinstance(policy, ExitPolicy):
        if any(value is not None for value in (lam, lam_grid, patience, patience_grid)):
            raise ValueError("Set lam/patience on the policy object, not beside it.")
        return [(None, policy)]
    if lam is not None and lam_grid is not None:
        raise ValueError("Give either lam or lam_grid, not both.")
    if patience is not None and patience_grid is not None:
        raise ValueError("Give either patience or patience_grid, not both.")
    if policy == "oracle":
        raise ValueError("The oracle policy has nothing to calibrate: it is the upper bound (see tradeoff_curve).")
    probe = get_exit_policy(policy)
    names = probe.parameter_names()
    if (lam is not None or lam_grid is not None) and "lam" not in names:
        raise ValueError(f"lam and lam_grid apply to the de3 policy, not to {policy!r}.")
    if (patience is not None or patience_grid is not None) and ("patience" not in names or probe.sweep == "patience"):
        raise ValueError(f"patience and patience_grid apply to the patient_confident policy, not to {policy!r}.")
    if "lam" in names:
        grid = [config.early_exit_lambda if lam is None else lam] if lam_grid is None else list(lam_grid)
        key = "lam"
    elif "patience" in names and probe.sweep != "patience":
        grid = [config.early_exit_patience if patience is None else patience] if patience_grid is None \
            else list(patience_grid)
        key = "patience"
    else:
        return [(None, probe)]
    if not grid:
        raise ValueError(f"The {key} grid is empty; give at least one value.")
    return [(float(value), get_exit_policy(policy, **{key: value})) for value in grid]


def calibrate(
    model,
    eval_dataset,
    target_speedup: float = 2.0,
    lam: float | None = None,
    lam_grid: Sequence[float] | None = None,
    metric_fn: MetricFn | None = None,
    batch_size: int = 64,
    save: bool = True,
    signals: ExitSignals | None = None,
    policy: "str | ExitPolicy" = "de3",
    patience: int | None = None,
    patience_grid: Sequence[int] | None = None,
    backend: str = "pytorch",
) -> CalibrationResult:
    """Picks the exit threshold (and optionally lambda or patience) that reaches a target layer speed-up on labelled
    data, for any exit policy (default DE3).

    One full-depth pass collects the exit signals (skipped when `signals` is given); the swept value (threshold, or
    patience for `patience`) is the first of [`tradeoff_curve`], from the fewest early exits, whose layer speed-up
    (docs/method.md eq. 12) is at least `target_speedup`. With `lam_grid` (DE3) or `patience_grid` (`patient_confident`)
    this is done for each value and the one with the best accuracy at the target is kept (ties: the larger
    speed-up, then the earlier value of the grid).

    Calibrate on held-out data and report on data the calibration did not see (docs/method.md section 6).

    Args:
        model: a DE3 model; with `backend="onnxruntime"`, a `de3_onnx.OnnxEarlyExitClassifier` or the folder
            `export_onnx` wrote.
        eval_dataset: labelled, tokenized data (see [`collect_exit_signals`]); may be `None` when `signals` is given.
        target_speedup: the layer speed-up to reach, >= 1.
        lam: EDR's lambda; defaults to `model.config.early_exit_lambda`. Exclusive with `lam_grid`.
        lam_grid: lambdas to search (the paper searches [0, 10]).
        metric_fn: extra metrics, see [`tradeoff_curve`].
        batch_size: samples per forward while collecting signals.
        save: write the chosen policy and its parameters into `model.config` (`early_exit_policy`,
            `early_exit_threshold`, `early_exit_lambda`, `early_exit_patience`), so that `predict_early()` and
            `save_pretrained` use them; with `backend="onnxruntime"`, into the runner and its folder's settings.
        signals: signals already collected from this model on `eval_dataset`, to reuse one pass for several targets.
        policy: a name of `EXIT_POLICIES` (not `"oracle"`) or an `ExitPolicy` object.
        patience, patience_grid: the patience of `patient_confident` (default `config.early_exit_patience`).
        backend: `"pytorch"` or `"onnxruntime"`: collect the signals on the exported graphs, so the threshold is
            calibrated on the runtime that serves it.

    Returns:
        [`CalibrationResult`].

    Raises:
        ValueError: for a target below 1, NaN, or above what the exits allow (`num_layers / first exit layer`); an
            empty dataset or one without labels; both `lam` and `lam_grid` (or both patience arguments), an empty
            grid, a value out of range or one the policy does not have; the oracle; a target the policy cannot reach
            (`patience` p never leaves before exit p); signals the policy cannot read
            (`lam > 0` on a model whose prototypes are not initialised); signals from a model with other exits; an
            unknown backend.
        ImportError, FileNotFoundError: for `backend="onnxruntime"`, as `onnx_runner` and `onnx_config`.
        RuntimeError: when the policy reads the distance ratio and initialised prototypes are not finite or zero.
    """
    check_backend(backend)
    runner = onnx_runner(model) if backend == "onnxruntime" else None
    config = model.config if runner is None else onnx_config(runner)
    grid = _policy_grid(config, policy, lam, lam_grid, patience, patience_grid)
    if signals is None:
        if eval_dataset is None:
            raise ValueError("Give eval_dataset (labelled, tokenized) or signals from collect_exit_signals.")
        if runner is None and any(base.needs_distance_ratio for _, base in grid):
            memory = model.prototype_memory
            if memory.all_initialized:  # initialised, but NaN, inf or zero prototypes would calibrate on garbage
                memory.require_usable()  # (an export checked its prototypes when it was written)
        signals = collect_exit_signals(model if runner is None else runner, eval_dataset, batch_size=batch_size,
                                       backend=backend)
    elif list(signals.exit_layers) != list(config.exit_layers) or signals.num_layers != config.num_hidden_layers:
        raise ValueError(
            f"The signals come from a model with exit_layers={signals.exit_layers} of {signals.num_layers} layers, "
            f"but this model has {config.exit_layers} of {config.num_hidden_layers}; collect them from this model."
        )
    _check_target(target_speedup, signals)

    curves, chosen = {}, {}
    for key, base in grid:
        all_values = sweep_candidates(signals, base, max_points=sys.maxsize)
        thinned = _thin(all_values, 2000)
        curve = tradeoff_curve(signals, thresholds=thinned, metric_fn=metric_fn, policy=base)
        curves[key] = curve
        # The curve runs from the fewest early exits to the most and its speed-up does not decrease, so this is the
        # most conservative setting that reaches the target. A policy may not reach it at all (patience p cannot
        # leave before exit p): that grid value is then left out.
        index = next((index for index, point in enumerate(curve) if point.speedup >= target_speedup), None)
        if index is None:
            continue
        # The curve may be thinned: replay every candidate between its neighbouring points, so the choice is the
        # first of all candidates, as without thinning.
        low = all_values.index(thinned[index - 1]) + 1 if index > 0 else 0
        between = all_values[low : all_values.index(thinned[index]) + 1]
        refined = tradeoff_curve(signals, thresholds=between, metric_fn=metric_fn, policy=base)
        chosen[key] = next(point for point in refined if point.speedup >= target_speedup)
    if not chosen:
        largest = max(point.speedup for curve in curves.values() for point in curve)
        raise ValueError(
            f"Policy {grid[0][1].name!r} cannot reach a {target_speedup}x layer speed-up on these signals (at most "
            f"{largest:.3g}x{', with the grid given' if len(grid) > 1 else ''}); ask for less, or use a smaller patience."
        )
    best_key = max(chosen, key=lambda key: (chosen[key].accuracy, chosen[key].speedup))
    best = chosen[best_key]
    full_accuracy = float((signals.exit_logits[:, -1].argmax(dim=-1) == signals.labels).double().mean())
    if save:
        if best.policy in EXIT_POLICIES:
            config.early_exit_policy = best.policy
        else:
            logger.warning(f"Policy {best.policy!r} is not registered, so it is not saved in the config.")
        if best.threshold is not None:
            config.early_exit_threshold = best.threshold
        if "lam" in best.parameters:
            config.early_exit_lambda = best.lam
        if "patience" in best.parameters:
            config.early_exit_patience = int(best.parameters["patience"])
        if runner is not None:
            runner.save_policy(config.early_exit_policy, config.early_exit_threshold, config.early_exit_lambda,
                               config.early_exit_patience)
            config.save_pretrained(runner.folder)
    return CalibrationResult(
        threshold=best.threshold,
        lam=best.lam,
        target_speedup=float(target_speedup),
        speedup=best.speedup,
        accuracy=best.accuracy,
        metrics=dict(best.metrics),
        full_accuracy=full_accuracy,
        curve=curves[best_key],
        curves=curves,
        policy=best.policy,
        parameters=dict(best.parameters),
        flops_speedup=best.flops_speedup,
    )


__all__ = [
    "CalibrationResult",
    "ExitSignals",
    "TradeoffPoint",
    "calibrate",
    "collect_exit_signals",
    "evaluate_early_exit",
    "sweep_candidates",
    "tradeoff_curve",
]


if __name__ == "__main__":  # python -m de3_transformers.calibration
    from .calibration_cli import main

    main(sys.argv[1:])
