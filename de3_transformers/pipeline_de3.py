"""`pipeline("text-classification")` with early exit: [`DE3TextClassificationPipeline`] classifies with the model's
`predict_early`, so each text leaves at the exit the checkpoint's calibrated policy chooses.

How `pipeline()` finds it (README, "Using the pipeline"):

- where `de3_transformers` is imported, [`register_pipeline`] puts this class under the task in `transformers`'
  pipeline registry. Its constructor hands every model that is not a DE3 model to the stock
  `TextClassificationPipeline`, so other models get exactly the pipeline they had;
- a saved DE3 checkpoint carries this file and names it in its config's `custom_pipelines`, which `pipeline()`
  honours with `trust_remote_code=True` where the package is not installed.

The file travels with checkpoints: it imports nothing from the package but the torch-free config module (and, for
`backend="onnxruntime"` only, the export and the runner, when the pipeline is built).
"""

import difflib
import inspect
import tempfile
from typing import Any

import torch
from transformers import AutoModelForSequenceClassification
from transformers.pipelines import PIPELINE_REGISTRY, TextClassificationPipeline

from .configuration_de3 import PIPELINE_TASKS_SERVED


TASK = "text-classification"
# The options of this pipeline's own (beside the tokenizer's arguments, which the stock pipeline passes through).
PIPELINE_OPTIONS = ("function_to_apply", "top_k", "policy", "threshold", "lam", "patience", "full_depth",
                    "return_exit_layer")


def is_early_exit_model(model) -> bool:
    """Whether `model` is a DE3 model (it has `predict_early`), from this package or a checkpoint's code."""
    return callable(getattr(model, "predict_early", None))


class DE3TextClassificationPipeline(TextClassificationPipeline):
    """The `text-classification` pipeline of DE3 models: each text leaves at its own exit (`predict_early`).

    Same inputs, options and outputs as the stock `TextClassificationPipeline` (texts, `{"text", "text_pair"}` pairs,
    `top_k`, `function_to_apply`, any `batch_size`, tokenizer arguments); the labels and scores are those of
    `predict_early`. Per call, or for the whole pipeline when given to `pipeline(...)`:

    - `policy`, `threshold`, `lam`, `patience`: the exit policy and its parameters, as for `predict_early`; by default
      the checkpoint's calibrated ones (`config.early_exit_*`);
    - `full_depth=True`: run every layer (the model's last exit), as a plain classifier would;
    - `return_exit_layer=True`: each result also gets `"exit_layer"`, the encoder layer (1..M) the text left at.

    When built, `backend="onnxruntime"` runs the model on ONNX Runtime (the `de3_onnx` runner; needs the package with
    its `onnx` extra): on `onnx_model` (a folder `export_onnx` wrote, or a runner) when given, otherwise on an export of
    the pipeline's model into a temporary folder, written once when the pipeline is built. `onnx_model` alone implies
    `backend="onnxruntime"`.

    Raises (when built):
        ValueError: for an unknown backend, `onnx_model` with `backend="pytorch"`, or `backend="onnxruntime"` for a
            model that is not a DE3 model.
        ImportError: for `backend="onnxruntime"` without the package's onnx extra.

    Batches are padded on the right whatever the tokenizer's `padding_side`: BERT and RoBERTa number positions from
    the first slot, so left padding would change the answers with the batch size.

    Raises (when called):
        ValueError: as `predict_early`, for an unknown policy or a parameter out of range; for inputs longer than
            the model's position embeddings (pass `truncation=True`).
        TypeError: when `full_depth` or `return_exit_layer` is not a bool, or for an option that is neither this
            pipeline's nor a tokenizer argument (a misspelling, which the stock pipeline would silently ignore).
        FloatingPointError: when an answer is not finite (NaN or inf weights), with `full_depth=True` as without.
    """

    def __new__(cls, *args, model=None, backend: str | None = None, onnx_model=None, **kwargs):
        # Registered for the whole task: any other model gets the stock pipeline itself (not an instance of this
        # class, so Python does not run this class's __init__ on it).
        if model is not None and not is_early_exit_model(model):
            if backend not in (None, "pytorch") or onnx_model is not None:
                raise ValueError(f"backend={backend!r} and onnx_model serve DE3 models; {type(model).__name__} is not "
                                 "one (export a plain model with optimum instead).")
            return TextClassificationPipeline(*args, model=model, **kwargs)
        return super().__new__(cls)

    def __init__(self, *args, backend: str | None = None, onnx_model=None, **kwargs):
        super().__init__(*args, **kwargs)
        if backend not in (None, "pytorch", "onnxruntime"):
            raise ValueError(f"backend={backend!r} is unknown; choose 'pytorch' or 'onnxruntime'.")
        if backend == "pytorch" and onnx_model is not None:
            raise ValueError("onnx_model= is served on ONNX Runtime: pass backend='onnxruntime' (or leave backend "
                             "out), or drop onnx_model to run on PyTorch.")
        backend = backend or ("onnxruntime" if onnx_model is not None else "pytorch")
        self.runner, self._export_folder = None, None
        if backend == "onnxruntime":
            # Imported here, in a `try` (which `trust_remote_code`'s check of a checkpoint's imports skips): this file
            # travels with checkpoints, and only this backend needs the package.
            try:
                from de3_transformers import export_onnx
                from de3_transformers.onnx_backend import onnx_runner
            except ImportError as error:
                raise ImportError("backend='onnxruntime' needs the de3-transformers package with its onnx extra: pip "
                                  "install \"de3-transformers[onnx]\"") from error
            if onnx_model is None:
                self._export_folder = tempfile.TemporaryDirectory(prefix="de3_onnx_")  # removed with the pipeline
                onnx_model = export_onnx(self.model, self._export_folder.name, tokenizer=self.tokenizer)
            self.runner = onnx_runner(onnx_model)

    def check_model_type(self, supported_models) -> None:
        # The stock check lists the built-in models by name only, so it would log an error for every DE3 model.
        if not is_early_exit_model(self.model):
            super().check_model_type(supported_models)

    def _sanitize_parameters(
        self,
        function_to_apply=None,
        top_k="",
        policy: str | None = None,
        threshold: float | None = None,
        lam: float | None = None,
        patience: int | None = None,
        full_depth: bool | None = None,
        return_exit_layer: bool | None = None,
        **tokenizer_kwargs,
    ):
        _refuse_unknown_options(self.tokenizer, tokenizer_kwargs)
        preprocess, _, postprocess = super()._sanitize_parameters(function_to_apply, top_k, **tokenizer_kwargs)
        for name, flag in (("full_depth", full_depth), ("return_exit_layer", return_exit_layer)):
            if flag is not None and not isinstance(flag, bool):
                raise TypeError(f"{name}={flag!r} must be True or False.")
        forward = {name: value for name, value in
                   (("policy", policy), ("threshold", threshold), ("lam", lam), ("patience", patience),
                    ("full_depth", full_depth)) if value is not None}
        if return_exit_layer is not None:
            postprocess["return_exit_layer"] = return_exit_layer
        return preprocess, forward, postprocess

    def _forward(self, model_inputs, full_depth: bool = False, **exit_parameters) -> dict[str, torch.Tensor]:
        model_inputs = padded_on_the_right(model_inputs)
        if self.runner is not None:
            arrays = {name: tensor.cpu().numpy() for name, tensor in model_inputs.items()}
            if full_depth:
                logits = torch.from_numpy(self.runner.exit_outputs(**arrays)["exit_logits"][:, -1])
                _require_finite(logits)
                layers = torch.full(logits.shape[:1], self.model.config.num_hidden_layers)
                return {"logits": logits, "exit_layer": layers}
            result = self.runner.predict(**arrays, **exit_parameters)
            return {"logits": torch.from_numpy(result["logits"]), "exit_layer": torch.from_numpy(result["exit_layers"])}
        if full_depth:
            logits = self.model(**model_inputs).logits
            _require_finite(logits)
            layers = torch.full(logits.shape[:1], self.model.config.num_hidden_layers, device=logits.device)
            return {"logits": logits, "exit_layer": layers}
        result = self.model.predict_early(**model_inputs, **exit_parameters)
        return {"logits": result.logits, "exit_layer": result.sample_exit_layers}

    def postprocess(self, model_outputs, function_to_apply=None, top_k=1, _legacy=True, return_exit_layer=False):
        result = super().postprocess(model_outputs, function_to_apply=function_to_apply, top_k=top_k, _legacy=_legacy)
        if return_exit_layer:
            layer = int(model_outputs["exit_layer"][0])
            for entry in [result] if isinstance(result, dict) else result:
                entry["exit_layer"] = layer
        return result


def padded_on_the_right(model_inputs: dict) -> dict:
    """`model_inputs` with every row's attended tokens moved to the front (padding on the right), in their order.

    BERT and RoBERTa number positions from the first slot (and read the first token with `exit_pooling="first"`), so
    a left-padded row gets other positions than the same text alone: answers would change with the batch size.
    Unchanged (and no copy) when no row starts with padding."""
    mask = model_inputs.get("attention_mask")
    if mask is None or bool(mask[:, 0].all()):
        return model_inputs
    # A stable sort of "is padding" keeps the attended tokens in order and puts them first.
    order = torch.argsort((mask == 0).to(torch.uint8), dim=1, stable=True)
    return {name: value.gather(1, order) if isinstance(value, torch.Tensor) and value.shape == mask.shape else value
            for name, value in model_inputs.items()}


def _require_finite(logits: torch.Tensor) -> None:
    """Raises FloatingPointError when some logits are NaN or inf, as `predict_early` does for its answers."""
    not_finite = ~torch.isfinite(logits.float()).all(dim=-1)
    if bool(not_finite.any()):
        samples = not_finite.nonzero().flatten().tolist()
        raise FloatingPointError(
            f"The full-depth logits of samples {samples[:8]}{' ...' if len(samples) > 8 else ''} of the batch are not "
            "finite (NaN or inf). The model's weights hold NaN or inf, from a diverged training run or an fp16 "
            "overflow: check torch.isfinite on the weights of the last exit and of the backbone, and retrain with a "
            "smaller learning rate or bf16/fp32."
        )


def _tokenizer_arguments(tokenizer) -> set[str]:
    """The named arguments a call of `tokenizer` takes (the stock pipeline passes its unknown options there)."""
    names = set()
    for function in (type(tokenizer).__call__, getattr(type(tokenizer), "_encode_plus", None)):
        if function is not None:
            names |= {name for name, parameter in inspect.signature(function).parameters.items()
                      if name != "self" and parameter.kind not in (parameter.VAR_KEYWORD, parameter.VAR_POSITIONAL)}
    return names


def _refuse_unknown_options(tokenizer, options: dict) -> None:
    """Raises TypeError for an option that is neither the pipeline's nor a tokenizer argument.

    The stock pipeline hands every option it does not know to the tokenizer, which only warns and drops it, so a
    misspelled `thresold=0.3` would leave the calibrated threshold in place without a word.
    """
    if tokenizer is None or not options:
        return
    known = _tokenizer_arguments(tokenizer)
    unknown = [name for name in options if name not in known]
    if unknown:
        name = unknown[0]
        close = difflib.get_close_matches(name, [*PIPELINE_OPTIONS, *sorted(known)], n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise TypeError(
            f"{name}={options[name]!r} is not an option of the DE3 text-classification pipeline nor a tokenizer "
            f"argument.{hint} Its options: {', '.join(PIPELINE_OPTIONS)}, and the tokenizer's arguments (truncation, "
            "max_length, padding, ...)."
        )


def custom_pipelines_entry() -> dict[str, dict[str, Any]]:
    """What a saved checkpoint's config names under `custom_pipelines`, for `pipeline(..., trust_remote_code=True)`
    where the package is not installed (the class is this file, saved beside the weights)."""
    module = DE3TextClassificationPipeline.__module__.rsplit(".", 1)[-1]
    return {TASK: {"impl": f"{module}.{DE3TextClassificationPipeline.__name__}",
                   "pt": ["AutoModelForSequenceClassification"], "type": "text"}}


def register_pipeline() -> None:
    """Serves `pipeline("text-classification")` (and its alias `"sentiment-analysis"`) with
    [`DE3TextClassificationPipeline`], which keeps the stock pipeline for every other model. Run on import of
    `de3_transformers`; safe to run again."""
    entry = dict(PIPELINE_REGISTRY.supported_tasks[TASK])
    entry.update(impl=DE3TextClassificationPipeline, pt=(AutoModelForSequenceClassification,))
    PIPELINE_REGISTRY.supported_tasks[TASK] = entry
    PIPELINE_TASKS_SERVED.add(TASK)


__all__ = [
    "DE3TextClassificationPipeline",
    "custom_pipelines_entry",
    "is_early_exit_model",
    "padded_on_the_right",
    "register_pipeline",
]
