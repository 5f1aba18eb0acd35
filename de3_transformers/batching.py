"""Batching of tokenized rows for the whole-dataset passes (calibration, evaluation, `predict_dataset`): padding and
collation, labelled batches in dataset order, and the progress bar."""

import numpy as np
import torch
from torch.utils.data import DataLoader
from transformers.utils import logging


def label_column(row) -> str:
    """The name of the label column of a dataset row, `labels` or `label`.

    Raises:
        ValueError: when the row has neither.
    """
    for key in ("labels", "label"):
        if key in row:
            return key
    raise ValueError(
        f"The dataset has no 'label' or 'labels' column (its first row has {sorted(row)}); calibration measures "
        "accuracy, so it needs labelled data: add the label column (class ids, see model.config.label2id)."
    )


def pad_rows(rows: list[dict], pad_token_id: int, length: int | None = None) -> dict[str, torch.Tensor]:
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


def collate_labelled(rows: list[dict], pad_token_id: int, label_key: str) -> dict[str, torch.Tensor]:
    """[`pad_rows`] plus the rows' labels (column `label_key`), checked to be integer class ids.

    Raises:
        ValueError: for labels that are not integer class ids.
    """
    batch = pad_rows(rows, pad_token_id)
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


def labelled_batches(config, dataset, batch_size: int) -> DataLoader:
    """Labelled batches of `dataset` for a model of `config`, in dataset order, right-padded with its `pad_token_id`
    and with labels checked to be its class ids.

    Raises:
        ValueError: for a `batch_size` below 1, an empty dataset or one without labels.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be a positive integer.")
    if len(dataset) == 0:
        raise ValueError("The dataset is empty; calibration needs labelled examples (a validation split).")
    label_key = label_column(dataset[0])
    pad = config.pad_token_id
    pad = 0 if pad is None else pad  # the attention mask hides padding anyway; only RoBERTa's positions need the id
    num_labels = config.num_labels

    def collate(rows):
        batch = collate_labelled(rows, pad, label_key)
        labels = batch["labels"]
        if ((labels < 0) | (labels >= num_labels)).any():  # checked before the forward, not after the whole pass
            bad = labels[(labels < 0) | (labels >= num_labels)].unique().tolist()
            raise ValueError(
                f"Labels {bad[:8]} are not class ids in [0, {num_labels}) (a test split without gold labels uses "
                "-1); calibrate on labelled data, with labels mapped through model.config.label2id."
            )
        return batch

    return DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)


def progress(batches, description: str):
    """`batches` (any sized iterable) wrapped in a progress bar named `description`."""
    # transformers' tqdm honours `transformers.utils.logging.disable_progress_bar()`; `disable=None` turns the bar
    # off where stderr is not a terminal (CI logs, redirected output).
    return logging.tqdm(batches, desc=description, total=len(batches), disable=None)


__all__ = ["collate_labelled", "label_column", "labelled_batches", "pad_rows", "progress"]
