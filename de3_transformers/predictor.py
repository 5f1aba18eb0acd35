"""Scoring texts at scale: [`EarlyExitClassifier`] is built once (model, tokenizer, backend, exit setting) and then
called on batch after batch of texts, as `Dataset.map(batched=True)` and Ray Data's `map_batches` call a function or
a callable class. It has the three stages of a `transformers` pipeline: tokenize (truncated to the model's
positions), early exit in length-sorted batches (`inference.BatchScorer`, the engine of `predict_dataset`), and
label, score and exit layer per text, returned in the container the texts came in, in their order.
"""

import os
import sys
import threading
from collections.abc import Mapping, Sequence
from numbers import Real

import numpy as np
import torch

from .exit_policies import build_exit_policy
from .inference import BatchScorer
from .onnx_backend import check_backend
from .pipeline_de3 import is_early_exit_model


PREDICTION_COLUMNS = ("label", "score", "exit_layer")


class EarlyExitClassifier:
    """Early-exit text classification of many texts: built once, called on batch after batch.

    Called on:

    - a list of texts (or one text; also a tuple, numpy array or pandas Series), with `text_pairs=` for pairs:
      returns a list of
      `{"label", "score", "exit_layer"}`, one per text, as the `text-classification` pipeline (with
      `return_exit_layer=True`) and `de3_onnx.OnnxEarlyExitClassifier` return them;
    - a pandas DataFrame: returns a new DataFrame, same index, with the columns `label`, `score`, `exit_layer` added
      (Ray Data's `batch_format="pandas"`);
    - a mapping of columns (a dict of lists or numpy arrays, Ray Data's `batch_format="numpy"`, or the batch
      `Dataset.map(..., batched=True)` passes): returns a dict with every column of the input and the three new ones
      (numpy arrays when the text column is one, lists otherwise).

    The texts are read from `text_column` (and `text_pair_column`) of a DataFrame or mapping. `label` is the name of
    the predicted class (`config.id2label`), `score` its softmax probability, `exit_layer` the encoder layer (1..M)
    the text left at. `column_prefix` names the new columns otherwise (`"predicted_"` gives `predicted_label`, ...),
    for data that already holds a `label` column.

    Each call tokenizes the texts (truncated to `max_length` tokens, by default the model's positions), sorts them
    by length into batches of `batch_size` and runs early exit on each; the answers come back in the input order.
    The classifier counts the texts it scored and the encoder layers they ran, over all calls: `speedup` is the layer
    speed-up so far (`num_hidden_layers * texts_scored / layers_run`).

    With Ray Data, pass the class and its arguments: `ds.map_batches(EarlyExitClassifier,
    fn_constructor_kwargs={"model": path, "text_column": "sentence"}, batch_format="pandas",
    compute=ray.data.ActorPoolStrategy(size=2))` (examples/ray_predict.py).

    Args:
        model: a DE3 model, or the path of a saved checkpoint (loaded with `AutoModelForSequenceClassification`);
            with `backend="onnxruntime"`, the folder `export_onnx` wrote or a `de3_onnx.OnnxEarlyExitClassifier`.
        tokenizer: the model's tokenizer; by default loaded with `AutoTokenizer` from the checkpoint or export folder.
        device: where to run (PyTorch). A loaded checkpoint goes to this device, by default CUDA where available and
            the CPU otherwise; a model object is moved to it when given and otherwise stays where it is.
        backend: `"pytorch"` (`predict_early`) or `"onnxruntime"` (the exported graphs, on ONNX Runtime).
        batch_size: texts per early-exit call.
        text_column, text_pair_column: the columns holding the texts (and second texts) in DataFrames and mappings.
        max_length: tokens per text after truncation; defaults to the model's positions.
        column_prefix: put before the names of the new columns.
        pad_to_multiple_of: as for `predict_dataset`.
        policy, threshold, lam, patience: the exit policy and its parameters, as for `predict_early`; by default the
            checkpoint's calibrated ones (`config.early_exit_*`).
        target_speedup: hold this layer speed-up over every text the classifier scores, with a speed-up budget
            (`SpeedupBudget`, docs/method.md section 6.6) that starts at the threshold above and adapts batch by
            batch when the texts differ from the calibration data; `threshold` tells where it stands.

    Raises:
        ValueError: for an unknown backend, a `batch_size`, `max_length` or `pad_to_multiple_of` below 1, a
            `max_length` beyond the model's positions, a model that is not a DE3 model, `device` with
            `backend="onnxruntime"`, or exit options that `predict_early` (or the ONNX Runtime runner) refuses
            (unknown policy, parameter out of range, another policy without its threshold), a `target_speedup` out
            of range or for a policy without a threshold.
        TypeError: for a model object given without its tokenizer, an exit parameter given as a tensor, or a
            `target_speedup` that is not a number (a bool or a string).
        OSError: when the checkpoint or its tokenizer cannot be loaded.
        ImportError: for `backend="onnxruntime"` without `onnxruntime` (install `de3-transformers[onnx]`).
    """

    def __init__(
        self,
        model,
        tokenizer=None,
        device=None,
        backend: str = "pytorch",
        batch_size: int = 64,
        text_column: str = "text",
        text_pair_column: str | None = None,
        max_length: int | None = None,
        column_prefix: str = "",
        pad_to_multiple_of: int | None = 8,
        policy: str | None = None,
        threshold: float | None = None,
        lam: float | None = None,
        patience: int | None = None,
        target_speedup: float | None = None,
    ):
        check_backend(backend)
        if target_speedup is not None and (isinstance(target_speedup, bool) or not isinstance(target_speedup, Real)):
            raise TypeError(f"target_speedup={target_speedup!r} must be a number (the layer speed-up to hold, e.g. "
                            "2.0), or None for a fixed threshold.")
        for name, value in (("batch_size", batch_size), ("max_length", max_length),
                            ("pad_to_multiple_of", pad_to_multiple_of)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}={value!r} must be a positive integer.")
        model, tokenizer = _load(model, tokenizer, device, backend)
        self.tokenizer = tokenizer
        self.scorer = BatchScorer(model, backend=backend, device=None if backend == "onnxruntime" else model.device)
        self.exit_options = {name: value for name, value in
                             (("policy", policy), ("threshold", threshold), ("lam", lam), ("patience", patience))
                             if value is not None}
        if backend == "onnxruntime":  # refused here, not on the first batch
            self.scorer.runner.build_policy(**self.exit_options)
        else:
            build_exit_policy(model.config, **self.exit_options)
        self.budget = None if target_speedup is None else self.scorer.make_budget(target_speedup, **self.exit_options)
        if max_length is not None and max_length > self.scorer.max_sequence_length:
            raise ValueError(f"max_length={max_length} exceeds the {self.scorer.max_sequence_length} positions of the "
                             "model; pass at most that.")
        self.backend = backend
        self.batch_size = batch_size
        self.text_column, self.text_pair_column = text_column, text_pair_column
        self.max_length = max_length or self.scorer.max_sequence_length
        self.pad_to_multiple_of = pad_to_multiple_of
        self.output_columns = tuple(column_prefix + name for name in PREDICTION_COLUMNS)
        self._lock, self._budget_lock = threading.Lock(), threading.Lock()
        self._texts_scored = self._layers_run = 0

    @classmethod
    def from_pretrained(cls, path, device=None, backend: str = "pytorch", **kwargs) -> "EarlyExitClassifier":
        """The classifier of a saved checkpoint (model and tokenizer), or with `backend="onnxruntime"` of a folder
        `export_onnx` wrote; `kwargs` as for the constructor (`batch_size`, `text_column`, exit options, ...).

        Raises:
            As the constructor.
        """
        return cls(path, device=device, backend=backend, **kwargs)

    @property
    def num_hidden_layers(self) -> int:
        """The model's number of encoder layers."""
        return self.scorer.num_hidden_layers

    @property
    def threshold(self) -> float | None:
        """With `target_speedup`: the threshold the speed-up budget has reached (used for the next batch)."""
        return None if self.budget is None else self.budget.threshold

    @property
    def texts_scored(self) -> int:
        """Texts classified so far, over all calls."""
        return self._texts_scored

    @property
    def layers_run(self) -> int:
        """Encoder layers run so far, over all calls: the sum of the texts' exit layers."""
        return self._layers_run

    @property
    def speedup(self) -> float:
        """Layer speed-up so far: `num_hidden_layers * texts_scored / layers_run` (1.0 before the first text)."""
        with self._lock:
            texts, layers = self._texts_scored, self._layers_run
        return self.num_hidden_layers * texts / layers if layers else 1.0

    def __getstate__(self) -> dict:  # picklable (datasets hashes the functions given to map), the locks aside
        return {name: value for name, value in self.__dict__.items() if name not in ("_lock", "_budget_lock")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _lock=threading.Lock(), _budget_lock=threading.Lock())

    def reset_counts(self) -> None:
        """Starts `texts_scored`, `layers_run` and `speedup` afresh."""
        with self._lock:
            self._texts_scored = self._layers_run = 0

    def __call__(self, inputs, text_pairs=None):
        """Classifies `inputs` with early exit; see the class docstring for the containers taken and returned.

        Raises:
            TypeError: for another container, or a text that is not a string (a missing value: fill or drop it).
            ValueError: for `text_pairs` of another length than the texts, `text_pairs` beside a DataFrame or
                mapping (name `text_pair_column` instead), a text column missing or present twice, a new column
                that is already in the data (pass `column_prefix`), or what `predict_early` (or the ONNX Runtime
                runner) raises.
        """
        if isinstance(inputs, str):
            inputs = [inputs]
        if _is_dataframe(inputs) or isinstance(inputs, Mapping):
            if text_pairs is not None:
                raise ValueError("text_pairs= goes with a list of texts; for a DataFrame or a mapping of columns, "
                                 "build the classifier with text_pair_column= instead.")
            columns = list(inputs.columns) if _is_dataframe(inputs) else list(inputs.keys())
            self._check_columns(columns)
            texts = _texts(inputs[self.text_column], self.text_column)
            pairs = None if self.text_pair_column is None else _texts(inputs[self.text_pair_column],
                                                                      self.text_pair_column)
            predictions = self.predict(texts, pairs)
            if _is_dataframe(inputs):
                return inputs.assign(**dict(zip(self.output_columns, predictions)))
            as_arrays = isinstance(inputs[self.text_column], np.ndarray)
            added = [np.asarray(values) if as_arrays else values for values in predictions]
            return {**inputs, **dict(zip(self.output_columns, added))}
        if isinstance(inputs, (Sequence, np.ndarray)) or _is_series(inputs):
            texts = _texts(inputs, "texts")
            pairs = None if text_pairs is None else _texts([text_pairs] if isinstance(text_pairs, str) else text_pairs,
                                                           "text_pairs")
            labels, scores, layers = self.predict(texts, pairs)
            return [dict(zip(PREDICTION_COLUMNS, answer)) for answer in zip(labels, scores, layers)]
        hint = " (a datasets.Dataset: use dataset.map(classifier, batched=True))" if hasattr(inputs, "map") else ""
        raise TypeError(f"EarlyExitClassifier takes a list of texts, a pandas DataFrame or a mapping of columns, not "
                        f"{type(inputs).__name__}{hint}.")

    def predict(
        self, texts: list[str], text_pairs: list[str] | None = None
    ) -> tuple[list[str], list[float], list[int]]:
        """The three new columns for `texts` (and `text_pairs`), in their order: label names, scores, exit layers.

        Raises:
            ValueError: for `text_pairs` of another length than `texts`, or what `predict_early` (or the ONNX Runtime
                runner) raises.
        """
        if text_pairs is not None and len(text_pairs) != len(texts):
            raise ValueError(f"{len(texts)} texts but {len(text_pairs)} text_pairs: give one second text per text.")
        if not texts:
            return [], [], []
        encoded = self.tokenizer(texts, text_pairs, truncation=True, max_length=self.max_length)
        rows = [dict(zip(encoded.keys(), values)) for values in zip(*encoded.values())]
        if self.budget is None:
            output = self.scorer(rows, batch_size=self.batch_size, pad_to_multiple_of=self.pad_to_multiple_of,
                                 **self.exit_options)
        else:
            with self._budget_lock:  # one budget, updated batch by batch: calls from several threads take turns
                output = self.scorer(rows, batch_size=self.batch_size, pad_to_multiple_of=self.pad_to_multiple_of,
                                     budget=self.budget, **self.exit_options)
        scores, ids = torch.softmax(output.logits.float(), dim=-1).max(dim=-1)
        layers = output.sample_exit_layers.tolist()
        with self._lock:
            self._texts_scored += len(layers)
            self._layers_run += sum(layers)
        return [self.scorer.id2label[index] for index in ids.tolist()], scores.tolist(), layers

    def _check_columns(self, columns: list) -> None:
        for name in (self.text_column, self.text_pair_column):
            if name is not None and name not in columns:
                raise ValueError(f"The batch has no column {name!r} (it has {columns}): build the classifier with "
                                 "text_column= (and text_pair_column=) naming the text columns.")
            if name is not None and columns.count(name) > 1:
                raise ValueError(f"The batch has {columns.count(name)} columns named {name!r}, so which one holds the "
                                 "texts is ambiguous: rename or drop the duplicates (e.g. "
                                 "df.loc[:, ~df.columns.duplicated()]) before classifying.")
        taken = [name for name in self.output_columns if name in columns]
        if taken:
            raise ValueError(f"The batch already has the column(s) {taken} that the predictions would replace: build "
                             "the classifier with column_prefix= (e.g. 'predicted_') to add them beside.")


def _is_dataframe(inputs) -> bool:
    # pandas is imported only to recognise its frames where it already is (Ray and datasets import it anyway).
    pandas = sys.modules.get("pandas")
    return pandas is not None and isinstance(inputs, pandas.DataFrame)


def _is_series(inputs) -> bool:
    pandas = sys.modules.get("pandas")
    return pandas is not None and isinstance(inputs, pandas.Series)


def _texts(values, name: str) -> list[str]:
    """`values` as a list of strings.

    Raises:
        TypeError: for a value that is not a string.
    """
    values = values.tolist() if hasattr(values, "tolist") else list(values)
    for index, value in enumerate(values):
        if not isinstance(value, str):
            raise TypeError(f"{name}[{index}] is {value!r} ({type(value).__name__}), not a text: fill or drop missing "
                            "texts first (e.g. DataFrame.dropna(subset=[...])).")
    return values


def _load(model, tokenizer, device, backend: str):
    """`(model or runner, tokenizer)`, loaded from a path where given one and put on `device`."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if backend == "onnxruntime":
        if device is not None:
            raise ValueError(f"device={device!r} applies to backend='pytorch'; ONNX Runtime runs on the providers of "
                             "the de3_onnx runner (pass a runner built with providers= instead).")
        from .onnx_backend import onnx_runner

        runner = onnx_runner(model)
        if tokenizer is None:
            if not (runner.folder / "tokenizer_config.json").is_file():
                raise ValueError(f"{runner.folder} holds no tokenizer: export with export_onnx(model, folder, "
                                 "tokenizer=tokenizer), or pass tokenizer=.")
            tokenizer = AutoTokenizer.from_pretrained(runner.folder)
        return runner, tokenizer
    if isinstance(model, (str, os.PathLike)):
        path = model
        model = AutoModelForSequenceClassification.from_pretrained(path)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(path)
    elif tokenizer is None:
        raise TypeError("Pass the model's tokenizer= with a model object, or give the checkpoint's path instead.")
    if not is_early_exit_model(model):
        raise ValueError(f"{type(model).__name__} is not a DE3 model (it has no predict_early); fine-tune one first "
                         "(DE3BertForSequenceClassification.from_backbone(...) and DE3Trainer).")
    if device is not None:
        model.to(device)
    return model, tokenizer  # predict_early turns dropout off itself, so the model's mode is left alone


__all__ = ["PREDICTION_COLUMNS", "EarlyExitClassifier"]
