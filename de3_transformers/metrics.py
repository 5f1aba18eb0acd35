"""Task metrics computed locally with scikit-learn: `evaluate.load(...)` fetches its metric scripts from the Hub,
which offline machines cannot reach."""

from collections.abc import Callable, Sequence

import numpy as np
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef


METRICS = {
    "accuracy": accuracy_score,
    "f1": f1_score,  # binary F1 of the positive class, as GLUE reports for MRPC and QQP
    "matthews_correlation": matthews_corrcoef,
}


def classification_metrics(names: Sequence[str] = ("accuracy",)) -> Callable[[np.ndarray, np.ndarray], dict]:
    """A function `(predicted class ids, labels) -> {name: value}` for the given metric names.

    Raises:
        ValueError: for an unknown metric name.
    """
    unknown = set(names) - set(METRICS)
    if unknown:
        raise ValueError(f"Unknown metrics {sorted(unknown)}; choose from {sorted(METRICS)}.")

    def compute(predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        return {name: float(METRICS[name](labels, predictions)) for name in names}

    return compute


def trainer_metrics(names: Sequence[str] = ("accuracy",)) -> Callable:
    """The same metrics as a `Trainer` `compute_metrics` function (argmax over the logits)."""
    compute = classification_metrics(names)
    return lambda prediction: compute(np.asarray(prediction.predictions).argmax(-1), prediction.label_ids)


__all__ = ["METRICS", "classification_metrics", "trainer_metrics"]
