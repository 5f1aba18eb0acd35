"""Throughput mode: early-exit classification of a large set of tokenized texts (offline scoring).

`predict_early` on batches as they come pads every batch to its longest text. Sorting the texts by length first
makes each batch hold texts of about the same length, so little of the work is padding; padding lengths up to a
multiple of `pad_to_multiple_of` bounds the number of distinct tensor shapes, which keeps GPU kernels and the CPU
allocator in a steady state over millions of texts. Results come back in the input order.

[`BatchScorer`] holds a model on its backend and does this for any set of tokenized rows; [`predict_dataset`] runs
it once over a dataset, `predictor.EarlyExitClassifier` once per batch of texts it is called on.
"""

from collections.abc import Sequence

import torch

from .batching import pad_rows, progress
from .budget import SpeedupBudget, budget_for
from .exit_policies import build_exit_policy
from .modeling_outputs import DE3EarlyExitOutput
from .onnx_backend import check_backend, onnx_config, onnx_runner
from .simulation import layer_speedup


class BatchScorer:
    """A DE3 model on a backend, ready to score tokenized rows in length-sorted, padded batches; built once, called
    for each set of rows.

    Args:
        model: a DE3 model; with `backend="onnxruntime"`, a `de3_onnx.OnnxEarlyExitClassifier` or the folder that
            `export_onnx` wrote.
        backend: `"pytorch"` (`model.predict_early`) or `"onnxruntime"` (the exported graphs, run by `de3_onnx`).
        device: where to run (PyTorch); defaults to the model's device. The model is not moved. Unused on ONNX
            Runtime, which runs on the runner's providers.

    Attributes:
        pad_token_id, max_sequence_length, num_hidden_layers: of the model (the padding id, its positions, its depth).
        id2label: class id to label name.

    Raises:
        ValueError: for an unknown backend.
        ImportError: for `backend="onnxruntime"` without `onnxruntime` (install `de3-transformers[onnx]`).
        FileNotFoundError: for `backend="onnxruntime"` on a folder that holds no export.
    """

    def __init__(self, model, backend: str = "pytorch", device=None):
        check_backend(backend)
        self.backend = backend
        if backend == "onnxruntime":
            self.runner = onnx_runner(model)
            settings = self.runner.config
            self.pad_token_id = settings["pad_token_id"] or 0
            self.max_sequence_length = settings["max_sequence_length"]
            self.num_hidden_layers = settings["num_hidden_layers"]
            self.id2label = dict(self.runner.id2label)
            return
        self.model = model
        self.device = torch.device(device) if device is not None else model.device
        config = model.config
        self.pad_token_id = config.pad_token_id or 0
        self.max_sequence_length = model.max_sequence_length
        self.num_hidden_layers = config.num_hidden_layers
        self.id2label = {int(index): name for index, name in config.id2label.items()}

    @property
    def config(self):
        """The model config (on ONNX Runtime, the one saved with the export).

        Raises:
            FileNotFoundError: on ONNX Runtime, for an export written before `export_onnx` saved the config.
        """
        # Read only where needed (a budget): older exports did not save it.
        return onnx_config(self.runner) if self.backend == "onnxruntime" else self.model.config

    def make_budget(self, target_speedup: float, **predict_kwargs) -> SpeedupBudget:
        """A [`SpeedupBudget`] for this model at `target_speedup`, starting at the threshold of the exit options
        (`policy`, `threshold`, ...; by default the calibrated one).

        Raises:
            ValueError: for a policy without a threshold or a target out of range; as `build_exit_policy`.
            FileNotFoundError: as [`config`].
        """
        config = self.config
        return budget_for(build_exit_policy(config, **predict_kwargs), target_speedup, config)

    def run_batch(self, batch: dict[str, torch.Tensor], **predict_kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """Early exit on one padded batch (`batching.pad_rows`): `(logits [B, K], exit layers [B])` on the CPU.

        Raises:
            ValueError: what `predict_early` (or the ONNX Runtime runner) raises.
        """
        if self.backend == "onnxruntime":
            result = self.runner.predict(**{name: tensor.numpy() for name, tensor in batch.items()}, **predict_kwargs)
            return torch.from_numpy(result["logits"]), torch.from_numpy(result["exit_layers"])
        result = self.model.predict_early(**{name: tensor.to(self.device) for name, tensor in batch.items()},
                                          **predict_kwargs)
        return result.logits.cpu(), result.sample_exit_layers.cpu()

    def __call__(
        self,
        rows: Sequence,
        batch_size: int = 64,
        sort_by_length: bool = True,
        pad_to_multiple_of: int | None = 8,
        target_speedup: float | None = None,
        progress_description: str | None = None,
        budget: SpeedupBudget | None = None,
        **predict_kwargs,
    ) -> DE3EarlyExitOutput:
        """Scores every row, in batches of rows of similar length, and returns the results in the rows' order.

        Args:
            rows: a tokenized `datasets.Dataset` or a sequence of dicts with `input_ids` (and optionally
                `attention_mask`, `token_type_ids`; other columns are ignored).
            batch_size, sort_by_length, pad_to_multiple_of, target_speedup: as for [`predict_dataset`].
            progress_description: shows a progress bar over the batches with this name; `None` shows none.
            budget: a [`SpeedupBudget`] carried over calls (from [`make_budget`]), instead of `target_speedup`: its
                threshold is used and updated, so the running speed-up holds over every call.
            **predict_kwargs: `policy`, `threshold`, `lam`, `patience`, as for `predict_early`.

        Returns:
            [`DE3EarlyExitOutput`] with `logits` `[N, K]` and `sample_exit_layers` `[N]` on the CPU, the layer
            speed-up over the rows and, with `target_speedup`, the `threshold` the budget ended at.

        Raises:
            ValueError: for no rows, a `batch_size` or `pad_to_multiple_of` below 1, rows without `input_ids`, a
                budget for a policy without a threshold or a target out of range, both `target_speedup` and
                `budget`, or what `predict_early` (or the ONNX Runtime runner) raises.
        """
        if batch_size < 1 or (pad_to_multiple_of is not None and pad_to_multiple_of < 1):
            raise ValueError(f"batch_size={batch_size} and pad_to_multiple_of={pad_to_multiple_of} must be >= 1.")
        if len(rows) == 0:
            raise ValueError("The dataset is empty.")
        if "input_ids" not in rows[0]:
            raise ValueError(f"Rows need input_ids (tokenized texts); the first row has {sorted(rows[0])}.")
        if target_speedup is not None:
            if budget is not None:
                raise ValueError("Give target_speedup or a budget carried over calls, not both.")
            budget = self.make_budget(target_speedup, **predict_kwargs)
        rows = list(rows)
        lengths = torch.tensor([torch.as_tensor(row["input_ids"]).numel() for row in rows])
        order = torch.argsort(lengths, descending=True, stable=True) if sort_by_length else torch.arange(len(rows))
        logits, exit_layers = None, torch.empty(len(rows), dtype=torch.long)
        chunks = [order[start : start + batch_size] for start in range(0, len(rows), batch_size)]
        if budget is not None and sort_by_length:
            shuffled = torch.randperm(len(chunks), generator=torch.Generator().manual_seed(0))
            chunks = [chunks[index] for index in shuffled]
        for chunk in chunks if progress_description is None else progress(chunks, progress_description):
            length = int(lengths[chunk].max())
            if pad_to_multiple_of is not None:
                length = max(length, min(-(-length // pad_to_multiple_of) * pad_to_multiple_of,
                                         self.max_sequence_length))
            options = predict_kwargs if budget is None else {**predict_kwargs, "threshold": budget.threshold}
            batch = pad_rows([rows[index] for index in chunk.tolist()], self.pad_token_id, length)
            batch_logits, batch_layers = self.run_batch(batch, **options)
            if budget is not None:
                budget.update(batch_layers)
            if logits is None:
                logits = torch.empty(len(rows), batch_logits.shape[-1], dtype=batch_logits.dtype)
            logits[chunk], exit_layers[chunk] = batch_logits, batch_layers
        return DE3EarlyExitOutput(logits=logits, sample_exit_layers=exit_layers,
                                  speedup=layer_speedup(exit_layers, self.num_hidden_layers),
                                  threshold=None if budget is None else budget.threshold)


def predict_dataset(
    model,
    dataset: Sequence,
    batch_size: int = 64,
    sort_by_length: bool = True,
    pad_to_multiple_of: int | None = 8,
    device=None,
    backend: str = "pytorch",
    target_speedup: float | None = None,
    **predict_kwargs,
) -> DE3EarlyExitOutput:
    """Runs early exit over every row of `dataset`, in length-sorted batches, and returns the results in the dataset's
    order.

    Args:
        model: a DE3 model; with `backend="onnxruntime"`, a `de3_onnx.OnnxEarlyExitClassifier` or the folder that
            `export_onnx` wrote.
        dataset: a tokenized `datasets.Dataset` or a sequence of dicts with `input_ids` (and optionally
            `attention_mask`, `token_type_ids`; other columns are ignored).
        batch_size: samples per early-exit call.
        sort_by_length: batch texts of similar length together (the order of the results is the input order).
        pad_to_multiple_of: pad each batch's length up to a multiple of this (not beyond the model's positions);
            `None` pads to the longest text only.
        device: where to run (PyTorch); defaults to the model's device.
        backend: `"pytorch"` (`model.predict_early`) or `"onnxruntime"` (the exported graphs, run by `de3_onnx`), so
            data is scored on the runtime it is served with.
        target_speedup: hold this layer speed-up over the whole dataset with a [`SpeedupBudget`]: the threshold
            starts at the given (or calibrated) one and adapts batch by batch (docs/method.md section 6.6), for data
            that differs from the calibration data. The length-sorted batches then run in a shuffled (seeded) order,
            so that the budget sees a steady mix rather than the longest texts first.
        **predict_kwargs: `policy`, `threshold`, `lam`, `patience`, as for `predict_early`.

    Returns:
        [`DE3EarlyExitOutput`] with `logits` `[N, K]` and `sample_exit_layers` `[N]` on the CPU, the layer speed-up
        over all samples and, with `target_speedup`, the `threshold` the budget ended at.

    Raises:
        ValueError: for an empty dataset, a `batch_size` or `pad_to_multiple_of` below 1, rows without
            `input_ids`, an unknown backend, a budget for a policy without a threshold or a target out of range, or
            what `predict_early` (or the ONNX Runtime runner) raises.
        ImportError: for `backend="onnxruntime"` without `onnxruntime` (install `de3-transformers[onnx]`).
    """
    scorer = BatchScorer(model, backend=backend, device=device)
    return scorer(dataset, batch_size=batch_size, sort_by_length=sort_by_length, pad_to_multiple_of=pad_to_multiple_of,
                  target_speedup=target_speedup, progress_description="Early-exit inference", **predict_kwargs)


__all__ = ["BatchScorer", "predict_dataset"]
