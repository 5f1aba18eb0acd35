"""Throughput mode: early-exit classification of a large set of tokenized texts (offline scoring).

`predict_early` on batches as they come pads every batch to its longest text. Sorting the texts by length first
makes each batch hold texts of about the same length, so little of the work is padding; padding lengths up to a
multiple of `pad_to_multiple_of` bounds the number of distinct tensor shapes, which keeps GPU kernels and the CPU
allocator in a steady state over millions of texts. Results come back in the input order.
"""

from collections.abc import Sequence

import torch

from .batching import pad_rows, progress
from .modeling_outputs import DE3EarlyExitOutput
from .budget import budget_for
from .exit_policies import build_exit_policy
from .onnx_backend import check_backend, onnx_config, onnx_runner
from .simulation import layer_speedup


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
    if batch_size < 1 or (pad_to_multiple_of is not None and pad_to_multiple_of < 1):
        raise ValueError(f"batch_size={batch_size} and pad_to_multiple_of={pad_to_multiple_of} must be >= 1.")
    if len(dataset) == 0:
        raise ValueError("The dataset is empty.")
    if "input_ids" not in dataset[0]:
        raise ValueError(f"Rows need input_ids (tokenized texts); the first row has {sorted(dataset[0])}.")
    run, pad, max_length, num_layers, config = _early_exit_backend(model, backend, device)
    budget = None
    if target_speedup is not None:
        budget = budget_for(build_exit_policy(config(), **predict_kwargs), target_speedup, config())
    rows = list(dataset)
    lengths = torch.tensor([torch.as_tensor(row["input_ids"]).numel() for row in rows])
    order = torch.argsort(lengths, descending=True, stable=True) if sort_by_length else torch.arange(len(rows))
    logits, exit_layers = None, torch.empty(len(rows), dtype=torch.long)
    chunks = [order[start : start + batch_size] for start in range(0, len(rows), batch_size)]
    if budget is not None and sort_by_length:
        chunks = [chunks[index] for index in torch.randperm(len(chunks), generator=torch.Generator().manual_seed(0))]
    for chunk in progress(chunks, "Early-exit inference"):
        length = int(lengths[chunk].max())
        if pad_to_multiple_of is not None:
            length = max(length, min(-(-length // pad_to_multiple_of) * pad_to_multiple_of, max_length))
        options = predict_kwargs if budget is None else {**predict_kwargs, "threshold": budget.threshold}
        batch_logits, batch_layers = run(pad_rows([rows[index] for index in chunk.tolist()], pad, length), options)
        if budget is not None:
            budget.update(batch_layers)
        if logits is None:
            logits = torch.empty(len(rows), batch_logits.shape[-1], dtype=batch_logits.dtype)
        logits[chunk], exit_layers[chunk] = batch_logits, batch_layers
    return DE3EarlyExitOutput(logits=logits, sample_exit_layers=exit_layers,
                              speedup=layer_speedup(exit_layers, num_layers),
                              threshold=None if budget is None else budget.threshold)


def _early_exit_backend(model, backend: str, device):
    """`(run, pad_token_id, max_sequence_length, num_hidden_layers, config)` of a backend: `run(batch, options)` maps a
    padded batch to CPU `(logits, exit layers)` with the exit options (`policy`, `threshold`, ...), `config()` gives
    the model config."""
    check_backend(backend)
    if backend == "onnxruntime":
        runner = onnx_runner(model)

        def run_onnx(batch, options):
            result = runner.predict(**{name: tensor.numpy() for name, tensor in batch.items()}, **options)
            return torch.from_numpy(result["logits"]), torch.from_numpy(result["exit_layers"])

        settings = runner.config
        # The model config saved with the export is read only for a budget: older exports did not save it.
        return (run_onnx, settings["pad_token_id"] or 0, settings["max_sequence_length"],
                settings["num_hidden_layers"], lambda: onnx_config(runner))
    device = torch.device(device) if device is not None else model.device

    def run(batch, options):
        result = model.predict_early(**{name: tensor.to(device) for name, tensor in batch.items()}, **options)
        return result.logits.cpu(), result.sample_exit_layers.cpu()

    config = model.config
    return run, config.pad_token_id or 0, model.max_sequence_length, config.num_hidden_layers, lambda: config


__all__ = ["predict_dataset"]
