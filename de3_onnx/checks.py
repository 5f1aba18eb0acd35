"""Checks of what users pass to the ONNX Runtime runner, in numpy (no torch): the same inputs and exit parameters that
`predict_early` refuses (`de3_transformers.input_checks.check_inputs`, `configuration_de3.check_exit_parameters` and
each policy's `__post_init__` in `exit_policies`) are refused here, with the same kind of error and a message that
names the fix. `tests/test_onnx_reliability.py` proves both sides refuse the same inputs."""

import math
import numbers

import numpy as np


# `de3_transformers.configuration_de3.MAX_LAMBDA`, for exports written before `de3_onnx.json` recorded it.
DEFAULT_MAX_LAMBDA = 1e6
# Each policy's parameters as its `ExitPolicy` dataclass checks them: `(smallest value or None, integer)`. The others
# are ignored for that policy, as `get_exit_policy` ignores them.
POLICY_PARAMETERS = {
    "de3": {"threshold": (0.0, False), "lam": (0.0, False)},
    "entropy": {"threshold": (0.0, False)},
    "max_prob": {"threshold": (None, False)},
    "energy": {"threshold": (0.0, False)},
    "patience": {"patience": (0, True)},
    "patient_confident": {"threshold": (0.0, False), "patience": (1, True)},
    "learned": {"threshold": (None, False)},
}
_HINT = (" (threshold 0 never exits early, a threshold above 1 always exits at the first exit; lam 0 exits on entropy "
         "alone, the paper searches lam in [0, 10])")


def check_number(name: str, value, low: float | None = None, integer: bool = False, hint: str = "") -> None:
    """Checks that an exit parameter is a finite real number (not a bool), at least `low`, and integral if asked (an
    integral float such as 3.0 counts), as `de3_transformers.configuration_de3.check_number`.

    Raises:
        ValueError: naming the parameter, its value and the accepted range (plus `hint`).
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real) or not math.isfinite(value) or (
        low is not None and value < low
    ) or (integer and value != int(value)):
        wanted = "an integer" if integer else "a finite number"
        bound = "" if low is None else f" >= {low:g}"
        raise ValueError(f"{name}={value!r} is out of range: it must be {wanted}{bound}{hint}.")


def check_policy_parameters(name: str, parameters: dict, max_lambda: float = DEFAULT_MAX_LAMBDA) -> None:
    """Checks the parameters policy `name` reads (`parameters`: `threshold`, `lam`, `patience`) as its `ExitPolicy`
    does in `predict_early`.

    Raises:
        ValueError: for a parameter that is not a finite number (a bool included), below its policy's smallest value,
            not integral where it counts exits, or a `lam` above `max_lambda`.
    """
    for parameter, (low, integer) in POLICY_PARAMETERS[name].items():
        check_number(parameter, parameters[parameter], low=low, integer=integer,
                     hint=_HINT if name == "de3" else "")
    if name == "de3" and parameters["lam"] > max_lambda:
        raise ValueError(
            f"lam={parameters['lam']!r} is out of range: it must be at most {max_lambda:g}. Beyond that the EDR is the "
            "distance ratio alone to float32 precision, and past 3e38 the score overflows and no sample ever exits; "
            f"use lam={max_lambda:g} for the distance ratio alone (the paper searches lam in [0, 10])."
        )


def check_inputs(input_ids, attention_mask, token_type_ids, max_sequence_length: int,
                 vocab_size: int | None = None, type_vocab_size: int | None = None):
    """The inputs of `predict` as `[B, L]` int64 arrays (`(input_ids, attention_mask, token_type_ids)`; a missing mask
    is all ones, missing token types all zeros), checked as `predict_early` checks its tensors. A size given as `None`
    (an export that did not record it) is not checked.

    Raises:
        TypeError: for `input_ids` (or `token_type_ids`) that are not int64 / int32 ids (float ids, for instance).
        ValueError: for an input that is empty or not `[batch, length]`, longer than `max_sequence_length`, a mask or
            token types of another shape than `input_ids`, a mask of other values than 0 and 1, with a row that
            attends to no token or that starts with padding (left padding), token ids outside `[0, vocab_size)`, or
            token types outside `[0, type_vocab_size)`.
    """
    input_ids = np.asarray(input_ids)
    if input_ids.ndim != 2 or 0 in input_ids.shape or input_ids.shape[1] > max_sequence_length:
        raise ValueError(f"input_ids of shape {input_ids.shape}: give [batch, length], neither empty, with length at "
                         f"most {max_sequence_length} (truncate longer texts).")
    if input_ids.dtype not in (np.int64, np.int32):
        raise TypeError(f"input_ids must hold integer token ids as int64 (or int32), got dtype {input_ids.dtype}: a "
                        "float or smaller type is no vocabulary's ids. Tokenize with return_tensors='np', or cast with "
                        ".astype(np.int64).")
    arrays = {"attention_mask": attention_mask, "token_type_ids": token_type_ids}
    for name, value in arrays.items():
        if value is None:
            continue
        value = arrays[name] = np.asarray(value)
        if value.shape != input_ids.shape:
            raise ValueError(f"{name} has shape {value.shape}; it must match input_ids {input_ids.shape}: pass the "
                             "tokenizer's outputs of the same batch.")
    mask, types = arrays["attention_mask"], arrays["token_type_ids"]
    if types is not None and not (np.issubdtype(types.dtype, np.integer) or types.dtype == np.bool_):
        raise TypeError(f"token_type_ids must hold integer segment ids, got dtype {types.dtype}: cast with "
                        ".astype(np.int64).")
    if mask is not None:
        wrong = (mask != 0) & (mask != 1)
        if wrong.any():
            raise ValueError(
                f"attention_mask must hold 1 for the tokens to attend and 0 for padding; it holds "
                f"{np.unique(mask[wrong])[:4].tolist()}. An additive mask (0 and -inf) or a signed one (-1 and 1) "
                "would attend to padding here: pass the tokenizer's attention_mask.")
        empty = np.flatnonzero((mask == 0).all(axis=-1))
        if empty.size:
            # A row that attends to nothing would come out of attention as NaN (in torch) or as noise.
            raise ValueError(f"Rows {empty[:8].tolist()} of attention_mask attend to no token; drop them or fix the "
                             "mask.")
        left = np.flatnonzero(mask[:, 0] == 0)
        if left.size:
            # BERT and RoBERTa number positions from the first slot, so a left-padded text would get other positions
            # than alone: its answer would change with the batch it is in.
            raise ValueError(
                f"Rows {left[:8].tolist()} of attention_mask start with padding (left padding): the model numbers "
                "positions from the first slot, so their answers would depend on the batch. Pad on the right: set "
                "tokenizer.padding_side = 'right' (the runner's own tokenizer pads on the right).")
    limits = (("input_ids", input_ids, "token ids", "the vocabulary has", vocab_size,
               "use the tokenizer that belongs to this model"),
              ("token_type_ids", types, "segment ids", "type_vocab_size is", type_vocab_size,
               "pass the token_type_ids of this model's tokenizer (RoBERTa has one segment type: leave them out)"))
    for name, values, ids, what, size, fix in limits:
        if values is None:
            continue
        low, high = int(values.min()), int(values.max())
        # A negative id would index the embedding table from its end, one past it read other memory or fail in ORT.
        if low < 0 or (size is not None and high >= size):
            raise ValueError(f"{name} hold {ids} in [{low}, {high}] but {what} {size}; {fix}.")
    input_ids = input_ids.astype(np.int64, copy=False)
    mask = np.ones_like(input_ids) if mask is None else mask.astype(np.int64)
    types = np.zeros_like(input_ids) if types is None else types.astype(np.int64)
    return input_ids, mask, types


__all__ = ["DEFAULT_MAX_LAMBDA", "POLICY_PARAMETERS", "check_inputs", "check_number", "check_policy_parameters"]
