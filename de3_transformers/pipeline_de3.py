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

import tempfile
from typing import Any

import torch
from transformers import AutoModelForSequenceClassification
from transformers.pipelines import PIPELINE_REGISTRY, TextClassificationPipeline

from .configuration_de3 import PIPELINE_TASKS_SERVED


TASK = "text-classification"


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

    Raises (when called):
        ValueError: as `predict_early`, for an unknown policy or a parameter out of range; for inputs longer than
            the model's position embeddings (pass `truncation=True`).
        TypeError: when `full_depth` or `return_exit_layer` is not a bool.
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
        if self.runner is not None:
            arrays = {name: tensor.cpu().numpy() for name, tensor in model_inputs.items()}
            if full_depth:
                logits = self.runner.exit_outputs(**arrays)["exit_logits"][:, -1]
                layers = torch.full(logits.shape[:1], self.model.config.num_hidden_layers)
                return {"logits": torch.from_numpy(logits), "exit_layer": layers}
            result = self.runner.predict(**arrays, **exit_parameters)
            return {"logits": torch.from_numpy(result["logits"]), "exit_layer": torch.from_numpy(result["exit_layers"])}
        if full_depth:
            logits = self.model(**model_inputs).logits
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


__all__ = ["DE3TextClassificationPipeline", "custom_pipelines_entry", "is_early_exit_model", "register_pipeline"]
