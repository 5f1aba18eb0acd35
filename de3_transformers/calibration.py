"""Calibration of an exit policy for a target layer speed-up (METHOD.md section 6), from one full-depth pass.

The signals of every exit (logits, entropy, distance ratio, learning-to-exit scores) are collected once; every
candidate threshold (or patience) is then replayed on them with the same policy object as `predict_early` uses
(`exit_policies.simulate_first_exits`), so the whole accuracy / speed-up trade-off of every policy costs a single
forward per sample, whatever the number of thresholds, lambdas or policies.

    python -m de3_transformers.calibration --model_name_or_path DIR --validation_file dev.tsv \
        --text_column sentence --label_column label --target_speedup 2.0 --lam_grid 0,1,2 --output_dir OUT
"""

import json
import numbers
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from transformers.utils import logging

from .configuration_de3 import check_exit_parameters
from .exit_policies import EXIT_POLICIES, ExitPolicy, exit_views, get_exit_policy, layer_speedup, simulate_first_exits
from .flops import FlopsCounter


logger = logging.get_logger(__name__)

MetricFn = Callable[[np.ndarray, np.ndarray], dict[str, float]]

# Thresholds are compared with [thresholds, exits, samples] bool tensors; chunks keep them below this many elements.
_CHUNK_ELEMENTS = 1 << 23


@dataclass
class ExitSignals:
    """Everything a policy needs, from one full-depth pass over a labelled data set (all on CPU).

    `exit_logits` `[E, N, K]` (float32), `entropy` `[E-1, N]`, `distance_ratio` `[E-1, N]` or `None` while some
    prototype is uninitialised, `labels` `[N]`, the encoder layer of each exit, the depth `M` of the model, and, when
    collected from a model: `exit_scores` `[E-1, N]` (models with learning-to-exit heads), the number of attended
    tokens of each sample `lengths` `[N]` and the model's [`FlopsCounter`] (for FLOPs speed-ups).
    """

    exit_logits: torch.Tensor
    entropy: torch.Tensor
    distance_ratio: torch.Tensor | None
    labels: torch.Tensor
    exit_layers: list[int]
    num_layers: int
    exit_scores: torch.Tensor | None = None
    lengths: torch.Tensor | None = None
    flops: FlopsCounter | None = None

    def __len__(self) -> int:
        return self.labels.numel()

    def views(self):
        """One `ExitView` per exit below the top, over all samples."""
        return exit_views(self.exit_logits, self.exit_layers, self.entropy, self.distance_ratio, self.exit_scores,
                          self.labels)


@dataclass
class TradeoffPoint:
    """Early exit with one setting of a policy: layer speed-up (METHOD.md eq. 12), accuracy and `metric_fn`'s
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


def _label_key(row) -> str:
    for key in ("labels", "label"):
        if key in row:
            return key
    raise ValueError(
        f"The dataset has no 'label' or 'labels' column (its first row has {sorted(row)}); calibration measures "
        "accuracy, so it needs labelled data: add the label column (class ids, see model.config.label2id)."
    )


def _pad_rows(rows: list[dict], pad_token_id: int, length: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pads a list of tokenized rows into a batch (attention mask 0 on the padding), to `length` tokens or to
    the longest row.

    Not `DataCollatorWithPadding`: that needs a tokenizer, and a saved model folder may have none. The padding is the
    model's own `pad_token_id`, as its tokenizer would write it (RoBERTa derives position ids from that id).
    """
    ids = [torch.as_tensor(row["input_ids"], dtype=torch.long).flatten() for row in rows]
    length = max(row.numel() for row in ids) if length is None else length
    batch = {"input_ids": torch.full((len(rows), length), pad_token_id, dtype=torch.long),
             "attention_mask": torch.zeros(len(rows), length, dtype=torch.long)}
    with_types = "token_type_ids" in rows[0]
    if with_types:
        batch["token_type_ids"] = torch.zeros(len(rows), length, dtype=torch.long)
    for index, (row, tokens) in enumerate(zip(rows, ids)):
        size = tokens.numel()
        batch["input_ids"][index, :size] = tokens
        mask = row.get("attention_mask")
        batch["attention_mask"][index, :size] = 1 if mask is None else torch.as_tensor(mask).flatten()
        if with_types:
            batch["token_type_ids"][index, :size] = torch.as_tensor(row["token_type_ids"]).flatten()
    return batch


def _collate(rows: list[dict], pad_token_id: int, label_key: str) -> dict[str, torch.Tensor]:
    """[`_pad_rows`] plus the rows' labels, checked to be integer class ids."""
    batch = _pad_rows(rows, pad_token_id)
    values = [row[label_key] for row in rows]
    try:
        labels = torch.as_tensor([int(value) if isinstance(value, np.integer) else value for value in values])
    except (TypeError, ValueError, RuntimeError):
        labels = None
    if labels is None or labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.dim() != 1:
        raise ValueError(
            f"Labels must be integer class ids, got {values[:4]} (first values); map string labels with "
            "model.config.label2id first."
        )
    batch["labels"] = labels
    return batch


def _batches(model, dataset, batch_size: int) -> DataLoader:
    """Labelled batches of `dataset`, in order.

    Raises:
        ValueError: for a `batch_size` below 1, an empty dataset or one without labels.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be a positive integer.")
    if len(dataset) == 0:
        raise ValueError("The dataset is empty; calibration needs labelled examples (a validation split).")
    label_key = _label_key(dataset[0])
    pad = model.config.pad_token_id
    pad = 0 if pad is None else pad  # the attention mask hides padding anyway; only RoBERTa's positions need the id
    num_labels = model.config.num_labels

    def collate(rows):
        batch = _collate(rows, pad, label_key)
        labels = batch["labels"]
        if ((labels < 0) | (labels >= num_labels)).any():  # checked before the forward, not after the whole pass
            bad = labels[(labels < 0) | (labels >= num_labels)].unique().tolist()
            raise ValueError(
                f"Labels {bad[:8]} are not class ids in [0, {num_labels}) (a test split without gold labels uses "
                "-1); calibrate on labelled data, with labels mapped through model.config.label2id."
            )
        return batch

    return DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)


def _progress(loader: DataLoader, description: str):
    # transformers' tqdm honours `transformers.utils.logging.disable_progress_bar()`; `disable=None` turns the bar
    # off where stderr is not a terminal (CI logs, redirected output).
    return logging.tqdm(loader, desc=description, total=len(loader), disable=None)


class _EvalOn:
    """Puts a model in eval mode on `device` for a `with` block, and restores its mode and device afterwards."""

    def __init__(self, model, device):
        self.model, self.device = model, torch.device(device) if device is not None else model.device

    def __enter__(self):
        self.was_training, self.home = self.model.training, self.model.device
        self.model.eval()
        if self.device != self.home:
            self.model.to(self.device)
        return self.device

    def __exit__(self, *exc_info):
        self.model.train(self.was_training)
        if self.device != self.home:
            self.model.to(self.home)


def collect_exit_signals(model, dataset, batch_size: int = 64, device=None) -> ExitSignals:
    """Runs the full model once over a labelled dataset and keeps every exit's logits and exit signals.

    Args:
        model: a DE3 model (`DE3BertForSequenceClassification`, `DE3RobertaForSequenceClassification`).
        dataset: a tokenized `datasets.Dataset`, or any sequence of dicts, with `input_ids`, optionally
            `attention_mask` and `token_type_ids`, and a `label` or `labels` column of class ids. It is read in
            order, in batches right-padded with `model.config.pad_token_id`.
        batch_size: samples per forward.
        device: where to run; defaults to the model's device. The model is moved back afterwards.

    Returns:
        [`ExitSignals`] on CPU, samples in dataset order. The model's train/eval mode is restored; its prototypes
        are untouched (eval mode never updates them).

    Raises:
        ValueError: for an empty dataset, one without labels, labels that are not class ids in `[0, num_labels)`,
            or a `batch_size` below 1.
    """
    loader = _batches(model, dataset, batch_size)
    logits, entropy, ratio, scores, labels, lengths = [], [], [], [], [], []
    with _EvalOn(model, device) as run_device, torch.inference_mode():
        for batch in _progress(loader, "Collecting exit signals"):
            labels.append(batch.pop("labels"))
            lengths.append(batch["attention_mask"].sum(dim=-1))
            output = model(**{name: tensor.to(run_device) for name, tensor in batch.items()},
                           output_exit_signals=True)
            logits.append(output.exit_logits.float().cpu())
            entropy.append(output.entropy.cpu())
            ratio.append(None if output.distance_ratio is None else output.distance_ratio.cpu())
            scores.append(None if output.exit_scores is None else output.exit_scores.cpu())
    return ExitSignals(
        exit_logits=torch.cat(logits, dim=1),
        entropy=torch.cat(entropy, dim=1),
        # Prototypes do not change in eval mode, so the ratio is either there for every batch or for none.
        distance_ratio=None if any(part is None for part in ratio) else torch.cat(ratio, dim=1),
        labels=torch.cat(labels),
        exit_layers=list(model.config.exit_layers),
        num_layers=model.config.num_hidden_layers,
        exit_scores=None if any(part is None for part in scores) else torch.cat(scores, dim=1),
        lengths=torch.cat(lengths),
        flops=FlopsCounter.from_config(model.config),
    )


def _check_signals(signals: ExitSignals, policy: ExitPolicy) -> None:
    """Raises ValueError when the signals lack what `policy` reads."""
    if signals.entropy.shape[0] == 0:
        return  # a single exit: nothing is read
    if policy.needs_distance_ratio and signals.distance_ratio is None:
        raise ValueError(
            f"Policy {policy.name!r} ({policy.parameters()}) needs the distance ratio, but some prototypes of this "
            "model are not initialised. Train the model first (DE3Trainer, or labelled forwards in train mode), or "
            "calibrate with lam=0 (entropy alone)."
        )
    if policy.needs_exit_scores and signals.exit_scores is None:
        raise ValueError(
            f"Policy {policy.name!r} needs learning-to-exit scores: train the model with learning_to_exit=True."
        )


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
    _check_signals(signals, policy)
    if max_points < 2:
        raise ValueError(f"max_points={max_points} must be at least 2 (the 1x point and the largest speed-up).")
    if policy.sweep is None:
        return []
    return _thin(policy.sweep_values(signals.views()), max_points)


def candidate_thresholds(signals: ExitSignals, lam: float, max_points: int = 2000) -> list[float]:
    """[`sweep_candidates`] of the DE3 policy: 0 (no early exit, 1x), a point between each two consecutive
    distinct running-minimum EDR values, and one above the largest (every sample leaves at the first exit).

    Raises:
        ValueError: for a `lam` out of range, `lam > 0` without initialised prototypes, or `max_points < 2`.
    """
    check_exit_parameters(0.0, lam)
    return sweep_candidates(signals, "de3", max_points, lam=lam)


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
        lam: EDR's lambda for the `de3` policy (METHOD.md eq. 11; default 1); 0 exits on entropy alone.
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
    _check_signals(signals, base)
    views = signals.views()
    predictions = signals.exit_logits.argmax(dim=-1)  # [E, N]
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
) -> CalibrationResult:
    """Picks the exit threshold (and optionally lambda or patience) that reaches a target layer speed-up on labelled
    data, for any exit policy (default DE3).

    One full-depth pass collects the exit signals (skipped when `signals` is given); the swept value (threshold, or
    patience for `patience`) is the first of [`tradeoff_curve`], from the fewest early exits, whose layer speed-up
    (METHOD.md eq. 12) is at least `target_speedup`. With `lam_grid` (DE3) or `patience_grid` (`patient_confident`)
    this is done for each value and the one with the best accuracy at the target is kept (ties: the larger
    speed-up, then the earlier value of the grid).

    Calibrate on held-out data and report on data the calibration did not see (METHOD.md section 6).

    Args:
        model: a DE3 model.
        eval_dataset: labelled, tokenized data (see [`collect_exit_signals`]); may be `None` when `signals` is given.
        target_speedup: the layer speed-up to reach, >= 1.
        lam: EDR's lambda; defaults to `model.config.early_exit_lambda`. Exclusive with `lam_grid`.
        lam_grid: lambdas to search (the paper searches [0, 10]).
        metric_fn: extra metrics, see [`tradeoff_curve`].
        batch_size: samples per forward while collecting signals.
        save: write the chosen policy and its parameters into `model.config` (`early_exit_policy`,
            `early_exit_threshold`, `early_exit_lambda`, `early_exit_patience`), so that `predict_early()` and
            `save_pretrained` use them.
        signals: signals already collected from this model on `eval_dataset`, to reuse one pass for several targets.
        policy: a name of `EXIT_POLICIES` (not `"oracle"`) or an `ExitPolicy` object.
        patience, patience_grid: the patience of `patient_confident` (default `config.early_exit_patience`).

    Returns:
        [`CalibrationResult`].

    Raises:
        ValueError: for a target below 1, NaN, or above what the exits allow (`num_layers / first exit layer`); an
            empty dataset or one without labels; both `lam` and `lam_grid` (or both patience arguments), an empty
            grid, a value out of range or one the policy does not have; the oracle; a target the policy cannot reach
            (`patience` p never leaves before exit p); signals the policy cannot read
            (`lam > 0` on a model whose prototypes are not initialised); signals from a model with other exits.
    """
    config = model.config
    grid = _policy_grid(config, policy, lam, lam_grid, patience, patience_grid)
    if signals is None:
        if eval_dataset is None:
            raise ValueError("Give eval_dataset (labelled, tokenized) or signals from collect_exit_signals.")
        signals = collect_exit_signals(model, eval_dataset, batch_size=batch_size)
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
    full_accuracy = float((signals.exit_logits[-1].argmax(dim=-1) == signals.labels).double().mean())
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


def evaluate_early_exit(
    model,
    dataset,
    threshold: float | None = None,
    lam: float | None = None,
    metric_fn: MetricFn | None = None,
    batch_size: int = 64,
    device=None,
    policy: "str | ExitPolicy | None" = None,
    patience: int | None = None,
) -> dict[str, float]:
    """Measures early exit for real with `predict_early` (layers skipped, not simulated) on labelled data.

    Args:
        model, dataset, batch_size, device: as for [`collect_exit_signals`].
        threshold, lam, policy, patience: as for `predict_early`; default to the model's config (the calibrated
            values).
        metric_fn: extra metrics, see [`tradeoff_curve`].

    Returns:
        `{"speedup": layer speed-up over the whole dataset, "flops_speedup": ..., "accuracy": ...,
        **metric_fn's metrics}`.

    Raises:
        ValueError: as [`collect_exit_signals`] and `predict_early`.
        RuntimeError: when the policy reads the distance ratio and some prototype was never initialised.
    """
    loader = _batches(model, dataset, batch_size)
    exit_policy = model._exit_policy(policy, threshold, lam, patience)
    predictions, layers, labels, lengths = [], [], [], []
    with _EvalOn(model, device) as run_device:
        for batch in _progress(loader, "Early-exit evaluation"):
            labels.append(batch.pop("labels"))
            lengths.append(batch["attention_mask"].sum(dim=-1))
            inputs = {name: tensor.to(run_device) for name, tensor in batch.items()}
            result = model.predict_early(**inputs, policy=exit_policy,
                                         labels=labels[-1].to(run_device) if exit_policy.needs_labels else None)
            predictions.append(result.logits.argmax(dim=-1).cpu())
            layers.append(result.exit_layers.cpu())
    predictions, labels, layers = torch.cat(predictions), torch.cat(labels), torch.cat(layers)
    exit_index = torch.searchsorted(torch.tensor(model.config.exit_layers), layers)
    flops = FlopsCounter.from_config(model.config).speedup(
        exit_index, torch.cat(lengths), exit_policy.needs_distance_ratio, exit_policy.needs_exit_scores)
    measured = {"speedup": layer_speedup(layers, model.config.num_hidden_layers), "flops_speedup": float(flops),
                "accuracy": float((predictions == labels).double().mean())}
    if metric_fn is not None:
        measured.update({name: float(value) for name, value in metric_fn(predictions.numpy(), labels.numpy()).items()})
    return measured


def plot_tradeoff(curves: dict[str, list[TradeoffPoint]], path, full_accuracy: float | None = None,
                  speedup: str = "layer", title: str = "DE3 early exit: accuracy against layer speed-up") -> Path:
    """Draws accuracy against speed-up, one line per curve (a curve of one point, such as the oracle's, as a star),
    and saves it as a PNG.

    Args:
        curves: `{label: points}`, e.g. `{"lam=1": result.curve}`.
        path: the PNG file to write.
        full_accuracy: drawn as a dashed line for the full model when given.
        speedup: the x axis: `"layer"` (METHOD.md eq. 12) or `"flops"` (points need `flops_speedup`).
        title: of the figure.

    Returns:
        The path written.

    Raises:
        ImportError: if matplotlib is not installed (`pip install matplotlib`).
        ValueError: if `curves` is empty or `speedup` is unknown.
    """
    try:
        # The object-oriented API with an explicit Agg canvas: no pyplot, so the caller's backend and figures
        # (a notebook's, say) are left alone.
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError("plot_tradeoff needs matplotlib: pip install matplotlib") from error
    if not curves:
        raise ValueError("curves is empty; pass {label: tradeoff_curve(...)}.")
    if speedup not in ("layer", "flops"):
        raise ValueError(f"speedup={speedup!r} is unknown; choose 'layer' or 'flops'.")
    attribute = "speedup" if speedup == "layer" else "flops_speedup"
    figure = Figure(figsize=(6, 4), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for label, points in curves.items():
        points = sorted(points, key=lambda point: getattr(point, attribute))
        style = {"marker": "*", "markersize": 10, "linestyle": "none"} if len(points) == 1 else \
            {"marker": ".", "markersize": 3, "linewidth": 1.2}
        axes.plot([getattr(point, attribute) for point in points], [point.accuracy for point in points],
                  label=str(label), **style)
    if full_accuracy is not None:
        axes.axhline(full_accuracy, color="gray", linestyle="--", linewidth=1, label="full model")
    axes.set_xlabel(f"{'layer' if speedup == 'layer' else 'FLOPs'} speed-up (x)")
    axes.set_ylabel("accuracy")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, format="png")
    return path


# Command line


@dataclass
class CalibrationArguments:
    """Arguments of `python -m de3_transformers.calibration`.

    Raises:
        ValueError: for a missing or unsupported validation file, a target below 1, both `lam` and `lam_grid`, a
            lambda out of range, or a non-positive `max_length` / `batch_size`.
    """

    model_name_or_path: str = field(metadata={"help": "A saved DE3 model (folder with its tokenizer)."})
    validation_file: str = field(metadata={"help": "Labelled csv, tsv or json(l) file to calibrate on."})
    output_dir: str = field(metadata={"help": "Where the calibrated model, calibration.json and tradeoff.png go."})
    text_column: str = field(default="sentence", metadata={"help": "Column of the (first) text."})
    text_pair_column: str | None = field(default=None, metadata={"help": "Column of the second text, for pairs."})
    label_column: str = field(default="label", metadata={"help": "Column of the labels (ids or label names)."})
    target_speedup: float = field(default=2.0, metadata={"help": "Layer speed-up to reach (>= 1)."})
    policy: str = field(default="de3", metadata={"help": "Exit policy: de3, entropy, max_prob, energy, patience, "
                                                         "patient_confident or learned."})
    lam: float | None = field(default=None, metadata={"help": "EDR lambda (default: the model config's)."})
    lam_grid: str | None = field(
        default=None, metadata={"help": "Comma-separated lambdas to search instead of --lam, e.g. 0,0.667,1,1.5,2,3."}
    )
    metrics: str = field(
        default="accuracy", metadata={"help": "Comma-separated metrics to report: accuracy, f1, matthews_correlation."}
    )
    max_length: int = field(default=128, metadata={"help": "Tokens per input after truncation."})
    batch_size: int = field(default=64, metadata={"help": "Samples per forward."})
    lambdas: list[float] | None = field(init=False, default=None)  # the parsed `lam_grid`
    metric_names: list[str] = field(init=False, default_factory=list)  # the parsed `metrics`

    def __post_init__(self):
        path = Path(self.validation_file)
        if not path.is_file():
            raise ValueError(f"--validation_file {path} does not exist.")
        if path.suffix.lower() not in (".csv", ".tsv", ".json", ".jsonl"):
            raise ValueError(f"--validation_file {path} must be a csv, tsv, json or jsonl file.")
        if not (isinstance(self.target_speedup, numbers.Real) and self.target_speedup >= 1):
            raise ValueError(f"--target_speedup {self.target_speedup} must be a number >= 1.")
        if self.lam is not None and self.lam_grid is not None:
            raise ValueError("Give either --lam or --lam_grid, not both.")
        if self.lam_grid is not None:
            try:
                self.lambdas = [float(value) for value in self.lam_grid.split(",") if value.strip()]
            except ValueError as error:
                raise ValueError(f"--lam_grid {self.lam_grid!r} must be comma-separated numbers, e.g. 0,1,2.") from error
            if not self.lambdas:
                raise ValueError("--lam_grid is empty; give comma-separated lambdas, e.g. 0,1,2.")
        for value in self.lambdas or ([self.lam] if self.lam is not None else []):
            check_exit_parameters(0.0, value)
        if self.policy not in EXIT_POLICIES or self.policy == "oracle":
            raise ValueError(f"--policy {self.policy!r} is unknown or cannot be calibrated; choose one of "
                             f"{sorted(set(EXIT_POLICIES) - {'oracle'})}.")
        if self.policy != "de3" and (self.lam is not None or self.lam_grid is not None):
            raise ValueError("--lam and --lam_grid apply to --policy de3 only.")
        self.metric_names = [name.strip() for name in self.metrics.split(",") if name.strip()] or ["accuracy"]
        if self.max_length < 1 or self.batch_size < 1:
            raise ValueError("--max_length and --batch_size must be positive integers.")


def _encode_dataset(raw, tokenizer, model, args: CalibrationArguments):
    columns = [args.text_column, args.text_pair_column, args.label_column]
    missing = [name for name in columns if name is not None and name not in raw.column_names]
    if missing:
        raise ValueError(
            f"Columns {missing} are not in {args.validation_file} (it has {raw.column_names}); "
            "pass --text_column, --text_pair_column and --label_column."
        )
    label2id = model.config.label2id

    def encode(batch):
        encoded = tokenizer(batch[args.text_column], batch[args.text_pair_column] if args.text_pair_column else None,
                            truncation=True, max_length=args.max_length)
        labels = []
        for value in batch[args.label_column]:
            if isinstance(value, str):
                if value not in label2id:
                    raise ValueError(
                        f"Label {value!r} is not one of the model's labels {sorted(label2id)} (config.label2id); "
                        "use those names or class ids."
                    )
                value = label2id[value]
            labels.append(value)
        encoded["labels"] = labels
        return encoded

    return raw.map(encode, batched=True, remove_columns=raw.column_names, desc="Tokenizing")


def _print_table(result: CalibrationResult, metric_names: list[str]) -> None:
    extra = [name for name in metric_names if name != "accuracy"]
    header = ["setting", "parameters", "layer speed-up", "FLOPs speed-up", "accuracy", *extra]
    full = result.curve[0]  # the first setting of the curve lets no sample leave early
    parameters = ", ".join(f"{name}={value:.6g}" for name, value in result.parameters.items())
    rows = [
        ["full model", "-", "1.00x", "1.00x", f"{result.full_accuracy:.4f}", *(f"{full.metrics[n]:.4f}" for n in extra)],
        [f"{result.policy} @ {result.target_speedup:g}x", parameters, f"{result.speedup:.2f}x",
         f"{result.flops_speedup:.2f}x", f"{result.accuracy:.4f}", *(f"{result.metrics[n]:.4f}" for n in extra)],
    ]
    widths = [max(len(line[column]) for line in [header, *rows]) for column in range(len(header))]
    for index, line in enumerate([header, *rows]):
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths)))
        if index == 0:
            print("  ".join("-" * width for width in widths))


def main(argv: list[str] | None = None) -> CalibrationResult:
    """Command-line entry point: calibrate a saved DE3 model and save it with the chosen threshold and lambda."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, HfArgumentParser

    import de3_transformers  # noqa: F401  (registers the DE3 models with the Auto classes)

    from .data import load_local_files

    (args,) = HfArgumentParser(CalibrationArguments).parse_args_into_dataclasses(argv)
    model = AutoModelForSequenceClassification.from_pretrained(args.model_name_or_path)
    if not hasattr(model, "prototype_memory"):
        raise ValueError(
            f"{args.model_name_or_path} is a {type(model).__name__}, not a DE3 model; fine-tune one first "
            "(DE3BertForSequenceClassification.from_backbone(...) and DE3Trainer)."
        )
    if torch.cuda.is_available():
        model.to("cuda")
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    raw = load_local_files(validation_file=args.validation_file)["validation"]
    dataset = _encode_dataset(raw, tokenizer, model, args)

    metric_fn = None
    if args.metric_names != ["accuracy"]:
        from .metrics import classification_metrics

        metric_fn = classification_metrics(args.metric_names)
    result = calibrate(model, dataset, target_speedup=args.target_speedup, lam=args.lam, lam_grid=args.lambdas,
                       metric_fn=metric_fn, batch_size=args.batch_size, save=True, policy=args.policy)

    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir)  # its config now carries the calibrated threshold and lambda
    tokenizer.save_pretrained(output_dir)
    (output_dir / "calibration.json").write_text(json.dumps(result.to_dict(), indent=2))
    try:
        grid_name = "lam" if "lam" in result.parameters else "patience"
        labels = {key: result.policy if key is None else f"{result.policy}, {grid_name}={key:g}"
                  for key in result.curves}
        plot_tradeoff({labels[key]: curve for key, curve in result.curves.items()}, output_dir / "tradeoff.png",
                      full_accuracy=result.full_accuracy, title=f"{result.policy}: accuracy against layer speed-up")
    except ImportError as error:
        logger.warning(f"tradeoff.png not written: {error}")
    print(f"\nCalibrated on {len(dataset)} samples of {args.validation_file}; saved to {output_dir}:")
    _print_table(result, args.metric_names)
    return result


__all__ = [
    "CalibrationArguments",
    "CalibrationResult",
    "ExitSignals",
    "TradeoffPoint",
    "calibrate",
    "candidate_thresholds",
    "collect_exit_signals",
    "sweep_candidates",
    "evaluate_early_exit",
    "plot_tradeoff",
    "tradeoff_curve",
]


if __name__ == "__main__":
    main(sys.argv[1:])
