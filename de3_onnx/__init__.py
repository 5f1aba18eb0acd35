"""Serving DE3 early-exit models on ONNX Runtime, with numpy and a tokenizer only (no torch): load a folder written by
`de3_transformers.export_onnx` with [`OnnxEarlyExitClassifier`]."""

from .export_files import ExportMismatchError
from .policies import POLICY_NAMES, Policy
from .runner import OnnxEarlyExitClassifier


__all__ = ["POLICY_NAMES", "ExportMismatchError", "OnnxEarlyExitClassifier", "Policy"]
