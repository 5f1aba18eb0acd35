"""The seam between the torch side of the package and the ONNX Runtime runner: which backends there are, and how a
folder or runner becomes a `de3_onnx.OnnxEarlyExitClassifier` with its model config, so that `predict_dataset`,
`collect_exit_signals` and `calibrate` run on the runtime that serves the model."""

from .extras import require

BACKENDS = ("pytorch", "onnxruntime")


def check_backend(backend: str) -> None:
    """Raises:
        ValueError: for a backend that is not one of `BACKENDS`."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is unknown; choose one of {', '.join(map(repr, BACKENDS))}.")


def onnx_runner(model):
    """`model` as a `de3_onnx.OnnxEarlyExitClassifier`: the runner itself, or one loaded from the folder
    `export_onnx` wrote.

    Raises:
        ImportError: without `onnxruntime` (`pip install "de3-transformers[onnx]"`).
        FileNotFoundError: for a folder that holds no export.
    """
    require("onnxruntime", extra="onnx", feature="backend='onnxruntime'")
    from de3_onnx import OnnxEarlyExitClassifier
    return model if isinstance(model, OnnxEarlyExitClassifier) else OnnxEarlyExitClassifier(model)


def onnx_config(runner):
    """The model config saved with the export (`config.json`), which the torch side reads (exit layers, sizes for
    FLOPs, the policy's defaults).

    Raises:
        FileNotFoundError: for an export written before `export_onnx` saved the config: export it again.
    """
    from transformers import AutoConfig

    if not (runner.folder / "config.json").is_file():
        raise FileNotFoundError(f"{runner.folder} has no config.json: export the model again with export_onnx.")
    return AutoConfig.from_pretrained(runner.folder)


__all__ = ["BACKENDS", "check_backend", "onnx_config", "onnx_runner"]
