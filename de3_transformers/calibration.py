"""Calibration of the exit threshold for a target layer speed-up (METHOD.md section 6), from one full-depth pass.

The signals of every exit (logits, entropy, distance ratio) are collected once; every candidate threshold is then
replayed on them with the same exit rule as `predict_early` (`exit_policies.de3_should_exit`), so the whole
accuracy / speed-up trade-off costs a single forward per sample, whatever the number of thresholds or lambdas.

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
from .exit_policies import first_exit, layer_speedup
from .signals import hybrid_indicator


logger = logging.get_logger(__name__)

MetricFn = Callable[[np.ndarray, np.ndarray], dict[str, float]]

# Thresholds are compared with [thresholds, exits, samples] bool tensors; chunks keep them below this many elements.
_CHUNK_ELEMENTS = 1 << 23


@dataclass
class ExitSignals:
    """Everything a threshold needs, from one full-depth pass over a labelled data set (all on CPU).

    `exit_logits` `[E, N, K]` (float32), `entropy` `[E-1, N]`, `distance_ratio` `[E-1, N]` or `None` while some
    prototype is uninitialised, `labels` `[N]`, the encoder layer of each exit, and the depth `M` of the model.
    """

    exit_logits: torch.Tensor
    entropy: torch.Tensor
    distance_ratio: torch.Tensor | None
    labels: torch.Tensor
    exit_layers: list[int]
    num_layers: int

    def __len__(self) -> int:
        return self.labels.numel()


@dataclass
class TradeoffPoint:
    """Early exit at one `threshold` and `lam`: layer speed-up (METHOD.md eq. 12), accuracy and `metric_fn`'s
    metrics, on the data the signals came from."""

    threshold: float
    lam: float
    speedup: float
    accuracy: float
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class CalibrationResult:
    """The calibrated exit setting, its measured speed-up and accuracy, and the trade-off curves it came from.

    `curve` is the curve of the chosen `lam`; `curves` holds one curve per lambda searched.
    """

    threshold: float
    lam: float
    target_speedup: float
    speedup: float
    accuracy: float
    metrics: dict[str, float]
    full_accuracy: float
    curve: list[TradeoffPoint]
    curves: dict[float, list[TradeoffPoint]]

    def to_dict(self) -> dict:
        """A JSON-ready dict (lambdas of `curves` as string keys)."""
        values = {name: getattr(self, name) for name in
                  ("threshold", "lam", "target_speedup", "speedup", "accuracy", "metrics", "full_accuracy")}
        values["curve"] = [asdict(point) for point in self.curve]
        values["curves"] = {repr(lam): [asdict(point) for point in curve] for lam, curve in self.curves.items()}
        return values


def _label_key(row) -> str:
    for key in ("labels", "label"):
        if key in row:
            return key
    raise ValueError(
        f"The dataset has no 'label' or 'labels' column (its first row has {sorted(row)}); calibration measures "
        "accuracy, so it needs labelled data: add the label column (class ids, see model.config.label2id)."
    )


def _collate(rows: list[dict], pad_token_id: int, label_key: str) -> dict[str, torch.Tensor]:
    """Right-pads a list of tokenized rows into a batch (attention mask 0 on the padding).

    Not `DataCollatorWithPadding`: that needs a tokenizer, and a saved model folder may have none. The padding is the
    model's own `pad_token_id`, as its tokenizer would write it (RoBERTa derives position ids from that id).
    """
    ids = [torch.as_tensor(row["input_ids"], dtype=torch.long).flatten() for row in rows]
    length = max(row.numel() for row in ids)
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
    logits, entropy, ratio, labels = [], [], [], []
    with _EvalOn(model, device) as run_device, torch.inference_mode():
        for batch in _progress(loader, "Collecting exit signals"):
            labels.append(batch.pop("labels"))
            output = model(**{name: tensor.to(run_device) for name, tensor in batch.items()},
                           output_exit_signals=True)
            logits.append(output.exit_logits.float().cpu())
            entropy.append(output.entropy.cpu())
            ratio.append(None if output.distance_ratio is None else output.distance_ratio.cpu())
    return ExitSignals(
        exit_logits=torch.cat(logits, dim=1),
        entropy=torch.cat(entropy, dim=1),
        # Prototypes do not change in eval mode, so the ratio is either there for every batch or for none.
        distance_ratio=None if any(part is None for part in ratio) else torch.cat(ratio, dim=1),
        labels=torch.cat(labels),
        exit_layers=list(model.config.exit_layers),
        num_layers=model.config.num_hidden_layers,
    )


def _require_ratio(signals: ExitSignals, lam: float) -> None:
    if lam > 0 and signals.distance_ratio is None and signals.entropy.shape[0] > 0:
        raise ValueError(
            f"lam={lam} needs the distance ratio, but some prototypes of this model are not initialised. Train the "
            "model first (DE3Trainer, or labelled forwards in train mode), or calibrate with lam=0 (entropy alone)."
        )


def candidate_thresholds(signals: ExitSignals, lam: float, max_points: int = 2000) -> list[float]:
    """The thresholds worth trying: one per distinct early-exit behaviour on these signals, from 0 (no early exit,
    1x) to one above every EDR (every sample leaves at the first exit, the largest speed-up).

    A sample's exit changes only when the threshold crosses one of its EDR values, so the candidates are 0, a point
    between each two consecutive distinct EDR values, and one above the largest. With more than `max_points`
    candidates, `max_points` of them are kept at evenly spaced quantiles (0 and the top one always).

    Raises:
        ValueError: for a `lam` out of range, `lam > 0` without initialised prototypes, or `max_points < 2`.
    """
    check_exit_parameters(0.0, lam)
    _require_ratio(signals, lam)
    if max_points < 2:
        raise ValueError(f"max_points={max_points} must be at least 2 (the 1x point and the largest speed-up).")
    edr = hybrid_indicator(signals.entropy, signals.distance_ratio, lam)
    if edr.shape[0] == 0 or edr.numel() == 0:
        return [0.0]
    # Only a new running minimum along the exits can move a sample's first exit (METHOD.md: exit at the first layer
    # where EDR < threshold), so the other values would only repeat points of the curve.
    values = torch.unique(edr.cummin(dim=0).values).float()
    # Between two values rather than on one: a threshold equal to a sample's EDR sits on the very boundary of the
    # strict rule, where the float noise of another batch shape (the compact `predict_early`) can flip that sample.
    # Computed in float32, where the rule compares; where the midpoint rounds onto the lower value, take the upper.
    middle = (values[:-1] + values[1:]) / 2
    middle = torch.where(middle > values[:-1], middle, values[1:])
    largest = values[-1]
    # EDR never exceeds 1: halfway from the largest value to 1 is above every value, with a margin where possible.
    top = (largest + 1) / 2 if largest < 1 else largest + 0.5
    if not top > largest:  # the largest value is the float32 just below 1
        top = torch.ones_like(largest)
    # Every midpoint lies above the smallest value, which is >= 0, so 0 is never repeated.
    candidates = torch.cat([torch.zeros(1), middle, top.view(1)])
    if candidates.numel() > max_points:
        ranks = torch.linspace(0, candidates.numel() - 1, max_points).round().long().unique()
        candidates = candidates[ranks]
    return candidates.tolist()


def tradeoff_curve(
    signals: ExitSignals,
    lam: float,
    thresholds: Sequence[float] | None = None,
    metric_fn: MetricFn | None = None,
    max_points: int = 2000,
) -> list[TradeoffPoint]:
    """Accuracy and layer speed-up of early exit at many thresholds, from stored signals (no forward pass).

    Each point is exactly what `simulate_early_exit` (and so `predict_early`) gives at that threshold and `lam`.

    Args:
        signals: from [`collect_exit_signals`].
        lam: EDR's lambda (METHOD.md eq. 11); 0 exits on entropy alone.
        thresholds: the thresholds to try; defaults to [`candidate_thresholds`] (1x up to the largest speed-up).
        metric_fn: `(predicted class ids, labels) -> {name: value}`, numpy arrays, for metrics beside accuracy
            (F1, Matthews correlation; see `de3_transformers.metrics.classification_metrics`).
        max_points: cap on the number of default thresholds.

    Returns:
        One [`TradeoffPoint`] per distinct threshold, in increasing threshold (so non-decreasing speed-up) order.

    Raises:
        ValueError: for a threshold or `lam` out of range, or `lam > 0` without initialised prototypes.
    """
    check_exit_parameters(0.0, lam)
    _require_ratio(signals, lam)
    if thresholds is None:
        thresholds = candidate_thresholds(signals, lam, max_points)
    for threshold in thresholds:
        check_exit_parameters(threshold, lam)
    thresholds = sorted(set(float(threshold) for threshold in thresholds))
    predictions = signals.exit_logits.argmax(dim=-1)  # [E, N]
    layers = torch.tensor(signals.exit_layers)
    labels_np = signals.labels.numpy()
    num_exits, num_samples = predictions.shape
    chunk = max(1, _CHUNK_ELEMENTS // max(1, num_exits * num_samples))
    points = []
    for start in range(0, len(thresholds), chunk):
        part = thresholds[start : start + chunk]
        # float32, as the rule compares a Python threshold with float32 signals in `predict_early`.
        first = first_exit(signals.entropy, signals.distance_ratio, torch.tensor(part).view(-1, 1, 1), lam)
        chosen = predictions.gather(0, first)  # [T, N]: the prediction of the exit each sample left at
        accuracy = (chosen == signals.labels).double().mean(dim=1)
        for row, threshold in enumerate(part):
            metrics = {}
            if metric_fn is not None:
                metrics = {name: float(value) for name, value in metric_fn(chosen[row].numpy(), labels_np).items()}
            speedup = layer_speedup(layers[first[row]], signals.num_layers)
            points.append(TradeoffPoint(threshold, float(lam), speedup, float(accuracy[row]), metrics))
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
) -> CalibrationResult:
    """Picks the exit threshold (and optionally lambda) that reaches a target layer speed-up on labelled data.

    One full-depth pass collects the exit signals (skipped when `signals` is given); the threshold is the smallest
    candidate of [`tradeoff_curve`] whose layer speed-up (METHOD.md eq. 12) is at least `target_speedup`. With
    `lam_grid`, this is done for each lambda and the lambda with the best accuracy at the target is kept (ties: the
    larger speed-up, then the earlier lambda of the grid).

    Calibrate on held-out data and report on data the calibration did not see (METHOD.md section 6).

    Args:
        model: a DE3 model.
        eval_dataset: labelled, tokenized data (see [`collect_exit_signals`]); may be `None` when `signals` is given.
        target_speedup: the layer speed-up to reach, >= 1.
        lam: EDR's lambda; defaults to `model.config.early_exit_lambda`. Exclusive with `lam_grid`.
        lam_grid: lambdas to search (the paper searches [0, 10]).
        metric_fn: extra metrics, see [`tradeoff_curve`].
        batch_size: samples per forward while collecting signals.
        save: write the chosen `early_exit_threshold` and `early_exit_lambda` into `model.config`, so that
            `predict_early()` and `save_pretrained` use them.
        signals: signals already collected from this model on `eval_dataset`, to reuse one pass for several targets.

    Returns:
        [`CalibrationResult`].

    Raises:
        ValueError: for a target below 1, NaN, or above what the exits allow (`num_layers / first exit layer`); an
            empty dataset or one without labels; both `lam` and `lam_grid`, an empty grid or a lambda out of range;
            `lam > 0` on a model whose prototypes are not initialised; signals from a model with other exits.
    """
    config = model.config
    if lam is not None and lam_grid is not None:
        raise ValueError("Give either lam or lam_grid, not both.")
    lambdas = [config.early_exit_lambda if lam is None else lam] if lam_grid is None else list(lam_grid)
    if not lambdas:
        raise ValueError("lam_grid is empty; give at least one lambda (e.g. [0, 1, 2]) or use lam.")
    for value in lambdas:
        check_exit_parameters(0.0, value)
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
    for value in lambdas:
        curve = tradeoff_curve(signals, value, metric_fn=metric_fn)
        curves[float(value)] = curve
        # The curve is in increasing threshold order and its speed-up is non-decreasing, so this is the smallest
        # threshold that reaches the target; the top candidate always does (checked by _check_target).
        index = next(index for index, point in enumerate(curve) if point.speedup >= target_speedup)
        # The curve may be thinned (max_points): replay every candidate between its neighbouring points, so the
        # choice is the smallest of all candidates, as without thinning.
        below = curve[index - 1].threshold if index > 0 else -1.0
        between = [threshold for threshold in candidate_thresholds(signals, value, max_points=sys.maxsize)
                   if below < threshold <= curve[index].threshold]
        refined = tradeoff_curve(signals, value, thresholds=between, metric_fn=metric_fn)
        chosen[float(value)] = next(point for point in refined if point.speedup >= target_speedup)
    best = max(chosen.values(), key=lambda point: (point.accuracy, point.speedup))
    full_accuracy = float((signals.exit_logits[-1].argmax(dim=-1) == signals.labels).double().mean())
    if save:
        config.early_exit_threshold, config.early_exit_lambda = best.threshold, best.lam
    return CalibrationResult(
        threshold=best.threshold,
        lam=best.lam,
        target_speedup=float(target_speedup),
        speedup=best.speedup,
        accuracy=best.accuracy,
        metrics=dict(best.metrics),
        full_accuracy=full_accuracy,
        curve=curves[best.lam],
        curves=curves,
    )


def evaluate_early_exit(
    model,
    dataset,
    threshold: float | None = None,
    lam: float | None = None,
    metric_fn: MetricFn | None = None,
    batch_size: int = 64,
    device=None,
) -> dict[str, float]:
    """Measures early exit for real with `predict_early` (layers skipped, not simulated) on labelled data.

    Args:
        model, dataset, batch_size, device: as for [`collect_exit_signals`].
        threshold, lam: as for `predict_early`; default to the model's config (the calibrated values).
        metric_fn: extra metrics, see [`tradeoff_curve`].

    Returns:
        `{"speedup": layer speed-up over the whole dataset, "accuracy": ..., **metric_fn's metrics}`.

    Raises:
        ValueError: as [`collect_exit_signals`], and for a threshold or lambda out of range.
        RuntimeError: when `lam > 0` and some prototype was never initialised.
    """
    loader = _batches(model, dataset, batch_size)
    predictions, layers, labels = [], [], []
    with _EvalOn(model, device) as run_device:
        for batch in _progress(loader, "Early-exit evaluation"):
            labels.append(batch.pop("labels"))
            result = model.predict_early(**{name: tensor.to(run_device) for name, tensor in batch.items()},
                                         threshold=threshold, lam=lam)
            predictions.append(result.logits.argmax(dim=-1).cpu())
            layers.append(result.exit_layers.cpu())
    predictions, labels = torch.cat(predictions), torch.cat(labels)
    measured = {"speedup": layer_speedup(torch.cat(layers), model.config.num_hidden_layers),
                "accuracy": float((predictions == labels).double().mean())}
    if metric_fn is not None:
        measured.update({name: float(value) for name, value in metric_fn(predictions.numpy(), labels.numpy()).items()})
    return measured


def plot_tradeoff(curves: dict[str, list[TradeoffPoint]], path, full_accuracy: float | None = None) -> Path:
    """Draws accuracy against layer speed-up, one line per curve, and saves it as a PNG.

    Args:
        curves: `{label: points}`, e.g. `{"lam=1": result.curve}`.
        path: the PNG file to write.
        full_accuracy: drawn as a dashed line for the full model when given.

    Returns:
        The path written.

    Raises:
        ImportError: if matplotlib is not installed (`pip install matplotlib`).
        ValueError: if `curves` is empty.
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
    figure = Figure(figsize=(6, 4), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for label, points in curves.items():
        points = sorted(points, key=lambda point: (point.speedup, point.threshold))
        axes.plot([point.speedup for point in points], [point.accuracy for point in points],
                  marker=".", markersize=3, linewidth=1.2, label=str(label))
    if full_accuracy is not None:
        axes.axhline(full_accuracy, color="gray", linestyle="--", linewidth=1, label="full model")
    axes.set_xlabel("layer speed-up (x)")
    axes.set_ylabel("accuracy")
    axes.set_title("DE3 early exit: accuracy against layer speed-up")
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
    header = ["setting", "threshold", "lambda", "layer speed-up", "accuracy", *extra]
    full = result.curve[0]  # threshold 0: no sample leaves early
    rows = [
        ["full model", "-", "-", "1.00x", f"{result.full_accuracy:.4f}", *(f"{full.metrics[n]:.4f}" for n in extra)],
        [f"DE3 @ {result.target_speedup:g}x", f"{result.threshold:.6g}", f"{result.lam:g}", f"{result.speedup:.2f}x",
         f"{result.accuracy:.4f}", *(f"{result.metrics[n]:.4f}" for n in extra)],
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
                       metric_fn=metric_fn, batch_size=args.batch_size, save=True)

    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir)  # its config now carries the calibrated threshold and lambda
    tokenizer.save_pretrained(output_dir)
    (output_dir / "calibration.json").write_text(json.dumps(result.to_dict(), indent=2))
    try:
        plot_tradeoff({f"lam={lam:g}": curve for lam, curve in result.curves.items()}, output_dir / "tradeoff.png",
                      full_accuracy=result.full_accuracy)
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
    "evaluate_early_exit",
    "plot_tradeoff",
    "tradeoff_curve",
]


if __name__ == "__main__":
    main(sys.argv[1:])
