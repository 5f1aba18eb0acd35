"""de3-transformers: DE3-BERT early exiting for Hugging Face Transformers.

Importing the package registers the DE3 configs and models with `AutoConfig`, `AutoModel` and
`AutoModelForSequenceClassification`, and marks them for `register_for_auto_class`, so a saved checkpoint also
loads with `trust_remote_code=True` where this package is not installed. It also serves
`pipeline("text-classification")` for DE3 models with early exit (`pipeline_de3`; other models keep the stock
pipeline).
"""

from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

from .budget import SpeedupBudget
from .calibration import CalibrationResult, calibrate
from .configuration_de3 import DE3BertConfig, DE3ConfigMixin, DE3RobertaConfig
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
from .modeling_de3 import DE3BertForSequenceClassification, DE3RobertaForSequenceClassification
from .modeling_outputs import DE3EarlyExitOutput, DE3SequenceClassifierOutput
from .objectives import TrainingObjective, register_training_objective
from .onnx_export import export_onnx
from .pipeline_de3 import DE3TextClassificationPipeline, register_pipeline
from .predictor import EarlyExitClassifier
from .simulation import SimulatedExits, layer_speedup, simulate_policy
from .trainer import DE3Trainer, DE3TrainingArguments


__version__ = "0.1.0"

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
    "EXIT_POLICIES",
    "CalibrationResult",
    "DE3BertConfig",
    "DE3BertForSequenceClassification",
    "DE3ConfigMixin",
    "DE3EarlyExitOutput",
    "DE3RobertaConfig",
    "DE3RobertaForSequenceClassification",
    "DE3SequenceClassifierOutput",
    "DE3TextClassificationPipeline",
    "DE3Trainer",
    "DE3TrainingArguments",
    "EarlyExitClassifier",
    "ExitPolicy",
    "ExitSignals",
    "SimulatedExits",
    "SpeedupBudget",
    "ThresholdPolicy",
    "TrainingObjective",
    "build_exit_policy",
    "calibrate",
    "collect_exit_signals",
    "evaluate_early_exit",
    "export_onnx",
    "get_exit_policy",
    "layer_speedup",
    "predict_dataset",
    "register_exit_policy",
    "register_training_objective",
    "simulate_policy",
]
