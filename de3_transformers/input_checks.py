"""Checks of what users pass to a DE3 model, with errors that name the fix."""

import torch


def check_inputs(model, input_ids, attention_mask=None, token_type_ids=None, inputs_embeds=None) -> None:
    """Checks the inputs of `forward` / `predict_early` before they reach the backbone, where a mistake fails late,
    with a message that does not say what to fix (or, on a GPU, as a device assert).

    Raises:
        TypeError: for inputs that are not tensors, or `input_ids` that are not integer ids.
        ValueError: for a missing, empty or wrongly shaped input, one longer than the model's positions, one on
            another device than the model, a row of `attention_mask` with no attended token, or token ids outside the
            vocabulary.
    """
    named = (("input_ids", input_ids), ("attention_mask", attention_mask), ("token_type_ids", token_type_ids),
             ("inputs_embeds", inputs_embeds))
    for name, tensor in named:
        if tensor is not None and not isinstance(tensor, torch.Tensor):
            raise TypeError(
                f"{name} must be a torch.Tensor, got {type(tensor).__name__}; tokenize with return_tensors='pt'."
            )
    main = input_ids if input_ids is not None else inputs_embeds
    if main is None:
        raise ValueError("Pass input_ids (or inputs_embeds to forward).")
    if input_ids is not None and (input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool):
        raise TypeError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}.")
    if main.dim() != (2 if input_ids is not None else 3) or main.shape[0] == 0 or main.shape[1] == 0:
        raise ValueError(
            f"input_ids must be a non-empty [batch_size, sequence_length] tensor, got shape {tuple(main.shape)}."
        )
    if main.shape[1] > model.max_sequence_length:
        raise ValueError(
            f"Sequence length {main.shape[1]} exceeds the {model.max_sequence_length} positions this model has; "
            f"tokenize with truncation=True, max_length={model.max_sequence_length}."
        )
    for name, tensor in named:
        if tensor is None:
            continue
        if name in ("attention_mask", "token_type_ids") and tensor.shape != main.shape[:2]:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}; it must match input_ids {tuple(main.shape[:2])}.")
        if tensor.device != model.device:
            raise ValueError(
                f"{name} is on {tensor.device} but the model is on {model.device}; move the inputs with "
                f"`.to(model.device)` (or the model with `model.to({str(tensor.device)!r})`)."
            )
    if attention_mask is not None and attention_mask.dim() == 2 and not attention_mask.any(dim=-1).all():
        # A row that attends to nothing would come out of attention as NaN.
        empty = (~attention_mask.any(dim=-1)).nonzero().flatten().tolist()
        raise ValueError(f"Rows {empty[:8]} of attention_mask attend to no token; drop them or fix the mask.")
    if input_ids is not None:
        # An out-of-range id would fail deep in the embedding (on a GPU, as a device assert).
        low, high = (int(value) for value in input_ids.aminmax())
        if low < 0 or high >= model.config.vocab_size:
            raise ValueError(
                f"input_ids hold token ids in [{low}, {high}] but the vocabulary has {model.config.vocab_size}; "
                "use the tokenizer that belongs to this model."
            )


def check_labels(labels: torch.Tensor, batch_size: int, num_labels: int) -> torch.Tensor:
    """`labels` as a flat `[batch_size]` tensor, checked to be class ids.

    Raises:
        ValueError: for a count other than one per sample, or values that are not integer ids in `[0, num_labels)`.
    """
    labels = labels.view(-1)
    if labels.numel() != batch_size:
        raise ValueError(f"Got {labels.numel()} labels for a batch of {batch_size}; give one per sample.")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or ((labels < 0) | (labels >= num_labels)).any():
        raise ValueError(
            f"labels must be integer class indices in [0, {num_labels}); got {labels.tolist()[:8]}"
            " (first values). Map your labels with config.label2id."
        )
    return labels


__all__ = ["check_inputs", "check_labels"]
