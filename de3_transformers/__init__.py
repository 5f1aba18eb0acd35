"""de3-transformers: DE3-BERT early exiting for Hugging Face Transformers.

Importing the package registers the DE3 configs and models with `AutoConfig`, `AutoModel` and
`AutoModelForSequenceClassification`, and marks them for `register_for_auto_class`, so a saved checkpoint also
loads with `trust_remote_code=True` where this package is not installed. It also serves
`pipeline("text-classification")` for DE3 models with early exit (`pipeline_de3`; other models keep the stock
pipeline).

That registration is all the import does: training, calibration, scoring and export load when first used (as
`transformers` loads its own modules), so the import costs little beyond the models and needs none of the optional
dependencies (`onnx`, `onnxruntime`, `ray`, `matplotlib`, ...), nor `datasets` and `pandas`.
"""

import importlib
from typing import TYPE_CHECKING

from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

from .configuration_de3 import DE3BertConfig, DE3ConfigMixin, DE3RobertaConfig
from .modeling_de3 import DE3BertForSequenceClassification, DE3RobertaForSequenceClassification
from .pipeline_de3 import DE3TextClassificationPipeline, register_pipeline


__version__ = "0.1.0"

# Public names loaded on first use: name -> the module that defines it (PEP 562).
_LAZY = {
    "SpeedupBudget": "budget",
    "CalibrationResult": "calibration",
    "calibrate": "calibration",
    "ExitSignals": "evaluation",
    "collect_exit_signals": "evaluation",
    "evaluate_early_exit": "evaluation",
    "EXIT_POLICIES": "exit_policies",
    "ExitPolicy": "exit_policies",
    "ThresholdPolicy": "exit_policies",
    "build_exit_policy": "exit_policies",
    "get_exit_policy": "exit_policies",
    "register_exit_policy": "exit_policies",
    "predict_dataset": "inference",
    "DE3EarlyExitOutput": "modeling_outputs",
    "DE3SequenceClassifierOutput": "modeling_outputs",
    "TrainingObjective": "objectives",
    "register_training_objective": "objectives",
    "export_onnx": "onnx_export",
    "EarlyExitClassifier": "predictor",
    "SimulatedExits": "simulation",
    "layer_speedup": "simulation",
    "simulate_policy": "simulation",
    "DE3Trainer": "trainer",
    "DE3TrainingArguments": "trainer",
}

if TYPE_CHECKING:
    from .budget import SpeedupBudget
    from .calibration import CalibrationResult, calibrate
    from .evaluation import ExitSignals, collect_exit_signals, evaluate_early_exit
    from .exit_policies import (
        EXIT_POLICIES,
        ExitPolicy,
        ThresholdPolicy,
        build_exit_policy,
        get_exit_policy,
        register_exit_policy,
    )
    from .inference import predict_dataset
    from .modeling_outputs import DE3EarlyExitOutput, DE3SequenceClassifierOutput
    from .objectives import TrainingObjective, register_training_objective
    from .onnx_export import export_onnx
    from .predictor import EarlyExitClassifier
    from .simulation import SimulatedExits, layer_speedup, simulate_policy
    from .trainer import DE3Trainer, DE3TrainingArguments


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


for _config, _model in (
    (DE3BertConfig, DE3BertForSequenceClassification),
    (DE3RobertaConfig, DE3RobertaForSequenceClassification),
):
    AutoConfig.register(_config.model_type, _config, exist_ok=True)
    AutoModel.register(_config, _model, exist_ok=True)
    AutoModelForSequenceClassification.register(_config, _model, exist_ok=True)
    _config.register_for_auto_class()
    _model.register_for_auto_class("AutoModelForSequenceClassification")
register_pipeline()

__all__ = [
    "DE3BertConfig",
    "DE3BertForSequenceClassification",
    "DE3ConfigMixin",
    "DE3RobertaConfig",
    "DE3RobertaForSequenceClassification",
    "DE3TextClassificationPipeline",
    *sorted(_LAZY),
]
