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
from .simulation import layer_speedup


def predict_dataset(
    model,
    dataset: Sequence,
    batch_size: int = 64,
    sort_by_length: bool = True,
    pad_to_multiple_of: int | None = 8,
    device=None,
    **predict_kwargs,
) -> DE3EarlyExitOutput:
    """Runs `model.predict_early` over every row of `dataset`, in length-sorted batches, and returns the results in
    the dataset's order.

    Args:
        model: a DE3 model.
        dataset: a tokenized `datasets.Dataset` or a sequence of dicts with `input_ids` (and optionally
            `attention_mask`, `token_type_ids`; other columns are ignored).
        batch_size: samples per `predict_early` call.
        sort_by_length: batch texts of similar length together (the order of the results is the input order).
        pad_to_multiple_of: pad each batch's length up to a multiple of this (not beyond the model's positions);
            `None` pads to the longest text only.
        device: where to run; defaults to the model's device.
        **predict_kwargs: `policy`, `threshold`, `lam`, `patience` for `predict_early`.

    Returns:
        [`DE3EarlyExitOutput`] with `logits` `[N, K]` and `sample_exit_layers` `[N]` on the CPU, and the layer speed-up
        over all samples.

    Raises:
        ValueError: for an empty dataset, a `batch_size` or `pad_to_multiple_of` below 1, rows without
            `input_ids`, or what `predict_early` raises.
    """
    if batch_size < 1 or (pad_to_multiple_of is not None and pad_to_multiple_of < 1):
        raise ValueError(f"batch_size={batch_size} and pad_to_multiple_of={pad_to_multiple_of} must be >= 1.")
    if len(dataset) == 0:
        raise ValueError("The dataset is empty.")
    if "input_ids" not in dataset[0]:
        raise ValueError(f"Rows need input_ids (tokenized texts); the first row has {sorted(dataset[0])}.")
    device = torch.device(device) if device is not None else model.device
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    rows = list(dataset)
    lengths = torch.tensor([torch.as_tensor(row["input_ids"]).numel() for row in rows])
    order = torch.argsort(lengths, descending=True, stable=True) if sort_by_length else torch.arange(len(rows))
    logits, exit_layers = None, torch.empty(len(rows), dtype=torch.long)
    chunks = [order[start : start + batch_size] for start in range(0, len(rows), batch_size)]
    for chunk in progress(chunks, "Early-exit inference"):
        length = int(lengths[chunk].max())
        if pad_to_multiple_of is not None:
            length = max(length, min(-(-length // pad_to_multiple_of) * pad_to_multiple_of, model.max_sequence_length))
        batch = pad_rows([rows[index] for index in chunk.tolist()], pad, length)
        result = model.predict_early(**{name: tensor.to(device) for name, tensor in batch.items()}, **predict_kwargs)
        if logits is None:
            logits = torch.empty(len(rows), result.logits.shape[-1], dtype=result.logits.dtype)
        logits[chunk], exit_layers[chunk] = result.logits.cpu(), result.sample_exit_layers.cpu()
    return DE3EarlyExitOutput(logits=logits, sample_exit_layers=exit_layers,
                              speedup=layer_speedup(exit_layers, model.config.num_hidden_layers))


__all__ = ["predict_dataset"]
