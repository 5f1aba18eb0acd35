"""One full-depth pass over labelled data, kept as [`ExitSignals`] for calibration and analysis, and the measurement
of early exit for real with `predict_early` (docs/method.md section 6)."""

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .batching import labelled_batches, progress
from .exit_policies import ExitPolicy, build_exit_policy
from .flops import FlopsCounter
from .modes import eval_mode
from .onnx_backend import check_backend, onnx_config, onnx_runner
from .simulation import exit_views, layer_speedup


MetricFn = Callable[[np.ndarray, np.ndarray], dict[str, float]]


@dataclass
class ExitSignals:
    """Everything a policy needs, from one full-depth pass over a labelled data set (all on CPU).

    Batch-first, as the forward returns them: `exit_logits` `[N, E, K]` (float32), `entropy` `[N, E-1]`,
    `distance_ratio` `[N, E-1]` or `None` while some prototype is uninitialised, `labels` `[N]`, the encoder layer of
    each exit, the depth `M` of the model, and, when collected from a model: `exit_scores` `[N, E-1]` (models with
    learning-to-exit heads), the number of attended
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

    def check_readable_by(self, policy: ExitPolicy) -> None:
        """Checks that these signals hold what `policy` reads.

        Raises:
            ValueError: for the distance ratio of a model whose prototypes are not initialised, or learning-to-exit
                scores of a model without learning-to-exit heads.
        """
        if self.entropy.shape[1] == 0:
            return  # a single exit: nothing is read
        if policy.needs_distance_ratio and self.distance_ratio is None:
            raise ValueError(
                f"Policy {policy.name!r} ({policy.parameters()}) needs the distance ratio, but some prototypes of this "
                "model are not initialised. Train the model first (DE3Trainer, or labelled forwards in train mode), or "
                "calibrate with lam=0 (entropy alone)."
            )
        if policy.needs_exit_scores and self.exit_scores is None:
            raise ValueError(
                f"Policy {policy.name!r} needs learning-to-exit scores: train the model with learning_to_exit=True."
            )


def collect_exit_signals(model, dataset, batch_size: int = 64, device=None, backend: str = "pytorch") -> ExitSignals:
    """Runs the full model once over a labelled dataset and keeps every exit's logits and exit signals.

    Args:
        model: a DE3 model (`DE3BertForSequenceClassification`, `DE3RobertaForSequenceClassification`); with
            `backend="onnxruntime"`, a `de3_onnx.OnnxEarlyExitClassifier` or the folder `export_onnx` wrote.
        dataset: a tokenized `datasets.Dataset`, or any sequence of dicts, with `input_ids`, optionally
            `attention_mask` and `token_type_ids`, and a `label` or `labels` column of class ids. It is read in
            order, in batches right-padded with `model.config.pad_token_id`.
        batch_size: samples per forward.
        device: where to run (PyTorch); defaults to the model's device. The model is moved back afterwards.
        backend: `"pytorch"` or `"onnxruntime"` (the exported graphs), so calibration reads the signals of the
            runtime that serves the model.

    Returns:
        [`ExitSignals`] on CPU, samples in dataset order. The model's train/eval mode is restored; its prototypes
        are untouched (eval mode never updates them).

    Raises:
        ValueError: for an empty dataset, one without labels, labels that are not class ids in `[0, num_labels)`,
            a `batch_size` below 1, or an unknown backend.
        ImportError, FileNotFoundError: for `backend="onnxruntime"`, as [`onnx_runner`] and [`onnx_config`].
    """
    check_backend(backend)
    if backend == "onnxruntime":
        runner = onnx_runner(model)
        config, context = onnx_config(runner), contextlib.nullcontext()

        def forward(batch) -> dict:
            outputs = runner.exit_outputs(**{name: tensor.numpy() for name, tensor in batch.items()})
            return {name: None if value is None else torch.from_numpy(value) for name, value in outputs.items()}
    else:
        run_device = torch.device(device) if device is not None else model.device
        config, context = model.config, eval_mode(model, device)

        def forward(batch) -> dict:
            output = model(**{name: tensor.to(run_device) for name, tensor in batch.items()}, output_exit_signals=True)
            return {"exit_logits": output.exit_logits.float().cpu(), "entropy": output.entropy.cpu(),
                    "distance_ratio": None if output.distance_ratio is None else output.distance_ratio.cpu(),
                    "exit_scores": None if output.exit_scores is None else output.exit_scores.cpu()}

    labels, lengths, outputs = [], [], []
    with context, torch.inference_mode():
        for batch in progress(labelled_batches(config, dataset, batch_size), "Collecting exit signals"):
            labels.append(batch.pop("labels"))
            lengths.append(batch["attention_mask"].sum(dim=-1))
            outputs.append(forward(batch))

    def joined(name: str) -> torch.Tensor | None:
        # Prototypes do not change in eval mode, so the ratio is either there for every batch or for none.
        parts = [output[name] for output in outputs]
        return None if any(part is None for part in parts) else torch.cat(parts)

    return ExitSignals(
        exit_logits=joined("exit_logits"),
        entropy=joined("entropy"),
        distance_ratio=joined("distance_ratio"),
        labels=torch.cat(labels),
        exit_layers=list(config.exit_layers),
        num_layers=config.num_hidden_layers,
        exit_scores=joined("exit_scores"),
        lengths=torch.cat(lengths),
        flops=FlopsCounter.from_config(config),
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
        metric_fn: extra metrics, `(predicted class ids, labels) -> {name: value}` on numpy arrays (see
            `de3_transformers.metrics.classification_metrics`).

    Returns:
        `{"speedup": layer speed-up over the whole dataset, "flops_speedup": ..., "accuracy": ...,
        **metric_fn's metrics}`.

    Raises:
        ValueError: as [`collect_exit_signals`] and `predict_early`.
        RuntimeError: when the policy reads the distance ratio and some prototype was never initialised.
    """
    loader = labelled_batches(model.config, dataset, batch_size)
    exit_policy = build_exit_policy(model.config, policy, threshold=threshold, lam=lam, patience=patience)
    predictions, layers, labels, lengths = [], [], [], []
    run_device = torch.device(device) if device is not None else model.device
    with eval_mode(model, device):
        for batch in progress(loader, "Early-exit evaluation"):
            labels.append(batch.pop("labels"))
            lengths.append(batch["attention_mask"].sum(dim=-1))
            inputs = {name: tensor.to(run_device) for name, tensor in batch.items()}
            result = model.predict_early(**inputs, policy=exit_policy,
                                         labels=labels[-1].to(run_device) if exit_policy.needs_labels else None)
            predictions.append(result.logits.argmax(dim=-1).cpu())
            layers.append(result.sample_exit_layers.cpu())
    predictions, labels, layers = torch.cat(predictions), torch.cat(labels), torch.cat(layers)
    exit_index = torch.searchsorted(torch.tensor(model.config.exit_layers), layers)
    flops = FlopsCounter.from_config(model.config).speedup(
        exit_index, torch.cat(lengths), exit_policy.needs_distance_ratio, exit_policy.needs_exit_scores)
    measured = {"speedup": layer_speedup(layers, model.config.num_hidden_layers), "flops_speedup": float(flops),
                "accuracy": float((predictions == labels).double().mean())}
    if metric_fn is not None:
        measured.update({name: float(value) for name, value in metric_fn(predictions.numpy(), labels.numpy()).items()})
    return measured


__all__ = ["ExitSignals", "MetricFn", "collect_exit_signals", "evaluate_early_exit"]
