"""Checks of what users pass to a DE3 model, with errors that name the fix."""

import torch


def check_inputs(model, input_ids, attention_mask=None, token_type_ids=None, inputs_embeds=None) -> None:
    """Checks the inputs of `forward` / `predict_early` before they reach the backbone, where a mistake fails late,
    with a message that does not say what to fix (or, on a GPU, as a device assert).

    Raises:
        TypeError: for inputs that are not tensors, or `input_ids` that are not `torch.long` / `int32` ids.
        ValueError: for a missing, empty or wrongly shaped input, one longer than the model's positions, one on
            another device than the model, an `attention_mask` of other values than 0 and 1, with a row that attends
            to no token or with a row that starts with padding (left padding), token ids outside the vocabulary, or
            `token_type_ids` outside `[0, type_vocab_size)`.
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
    if input_ids is not None and input_ids.dtype not in (torch.long, torch.int32):
        raise TypeError(
            f"input_ids must hold integer token ids as torch.long (or int32), got dtype {input_ids.dtype}: a smaller "
            "integer type cannot hold a vocabulary's ids. Tokenize with return_tensors='pt', or cast with .long()."
        )
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
    _check_values(model, input_ids, attention_mask, token_type_ids)


def _check_values(model, input_ids, attention_mask, token_type_ids) -> None:
    # Every value check reads one reduction, and all of them come to the host in one synchronisation.
    reductions = []
    for tensor in (input_ids, token_type_ids):
        if tensor is not None:
            reductions += tensor.aminmax()
    if attention_mask is not None:
        mask = attention_mask if attention_mask.dtype != torch.bool else attention_mask.long()
        reductions += [*mask.aminmax(), mask.sum(dim=-1).amin(), mask[:, 0].amin()]
    dtypes = {tensor.dtype for tensor in reductions}
    if len(dtypes) > 1:
        reductions = [tensor.double() for tensor in reductions]
    values = torch.stack(reductions).tolist()
    if attention_mask is not None:
        *values, mask_low, mask_high, fewest_attended, first_attended = values
        if mask_low < 0 or mask_high > 1:
            found = attention_mask[(attention_mask != 0) & (attention_mask != 1)].unique()[:4].tolist()
            raise ValueError(
                f"attention_mask must hold 1 for the tokens to attend and 0 for padding; it holds {found}. An "
                "additive mask (0 and -inf) or a signed one (-1 and 1) would attend to padding here: pass the "
                "tokenizer's attention_mask."
            )
        if fewest_attended <= 0:
            # A row that attends to nothing would come out of attention as NaN.
            empty = (attention_mask == 0).all(dim=-1).nonzero().flatten().tolist()
            raise ValueError(f"Rows {empty[:8]} of attention_mask attend to no token; drop them or fix the mask.")
        if first_attended <= 0:
            # BERT and RoBERTa number positions from the first slot (and `exit_pooling="first"` reads it), so a
            # left-padded text gets other positions than alone: its answer would change with the batch it is in.
            rows = (attention_mask[:, 0] == 0).nonzero().flatten().tolist()
            raise ValueError(
                f"Rows {rows[:8]} of attention_mask start with padding (left padding): the model numbers positions "
                "from the first slot, so their answers would depend on the batch. Pad on the right: set "
                "tokenizer.padding_side = 'right' (the pipeline and EarlyExitClassifier pad on the right themselves)."
            )
    # An id out of range would fail deep in the embedding (on a GPU, as a device assert).
    limits = (("input_ids", input_ids, "token ids", "the vocabulary has", model.config.vocab_size,
               "use the tokenizer that belongs to this model"),
              ("token_type_ids", token_type_ids, "segment ids", "type_vocab_size is", model.config.type_vocab_size,
               "pass the token_type_ids of this model's tokenizer (RoBERTa has one segment type: leave them out)"))
    for name, tensor, ids, what, size, fix in limits:
        if tensor is None:
            continue
        low, high, *values = values
        if low < 0 or high >= size:
            raise ValueError(f"{name} hold {ids} in [{int(low)}, {int(high)}] but {what} {size}; {fix}.")


def check_labels(labels: torch.Tensor, batch_size: int, num_labels: int) -> torch.Tensor:
    """`labels` as a flat `[batch_size]` `torch.long` tensor (any integer dtype is accepted), checked to be class ids.

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
    return labels.long()  # int32, int16 or uint8 ids are fine, as in `transformers`'s own heads


__all__ = ["check_inputs", "check_labels"]
