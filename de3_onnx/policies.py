"""The exit policies of `de3_transformers.exit_policies` for the ONNX Runtime runner, in numpy (no torch).

The exit graphs compute every signal with `de3_transformers.signals` itself (entropy, energy, largest probability,
distance ratio, learning-to-exit score); what is left for the host is each policy's rule: a threshold on a signal,
EDR (docs/method.md eq. 11, whose lambda may change per call), and the counts of the patience policies.
"""

from dataclasses import dataclass

import numpy as np


_TINY = np.finfo(np.float32).tiny
POLICY_NAMES = ("de3", "entropy", "max_prob", "energy", "patience", "patient_confident", "learned")


def hybrid_indicator(entropy: np.ndarray, ratio: np.ndarray | None, lam: float) -> np.ndarray:
    """EDR, as `de3_transformers.signals.hybrid_indicator`: `(lam + 1) E DR / (lam E + DR)`, 0 where the denominator
    is, in float32; `lam = 0` is the entropy itself."""
    if lam == 0:
        return entropy
    denominator = lam * entropy + ratio
    with np.errstate(divide="ignore", invalid="ignore"):
        edr = np.where(denominator == 0, np.float32(0.0),
                       (lam + 1.0) * entropy * ratio / np.maximum(denominator, _TINY))
    return np.clip(edr, 0.0, 1.0).astype(np.float32)


@dataclass
class Policy:
    """An exit policy by name, with its parameters (as `de3_transformers.build_exit_policy` builds it)."""

    name: str
    threshold: float = 0.0
    lam: float = 1.0
    patience: int = 2

    @property
    def needs_distance_ratio(self) -> bool:
        return self.name == "de3" and self.lam > 0

    @property
    def needs_scores(self) -> bool:
        return self.name == "learned"

    def start(self, batch_size: int):
        """The state before the first exit: the previous prediction and the count of the patience policies."""
        return np.full(batch_size, -1, dtype=np.int64), np.zeros(batch_size, dtype=np.int64)

    def leave(self, signals: dict[str, np.ndarray], state):
        """`(leave [B] bool, new state)` from one exit's outputs for the running rows (`logits`, `entropy`,
        `energy`, `max_prob`, `distance_ratio`, `scores`); a row whose logits are not finite never leaves.

        Raises:
            ValueError: for an unknown policy name.
        """
        previous, count = state
        threshold = np.float32(self.threshold)  # compared in float32, as torch compares a float with float32 signals
        if self.name == "de3":
            leave = hybrid_indicator(signals["entropy"], signals.get("distance_ratio"), self.lam) < threshold
        elif self.name in ("entropy", "energy"):
            leave = signals[self.name] < threshold
        elif self.name in ("max_prob", "learned"):
            leave = signals["max_prob" if self.name == "max_prob" else "scores"] > threshold
        elif self.name == "patience":
            prediction = signals["logits"].argmax(axis=-1)
            count = np.where(prediction == previous, count + 1, 0)
            leave, previous = count >= self.patience, prediction
        elif self.name == "patient_confident":
            count = np.where(signals["entropy"] < threshold, count + 1, 0)
            leave = count >= self.patience
        else:
            raise ValueError(f"Unknown exit policy {self.name!r} for ONNX Runtime: use {', '.join(POLICY_NAMES)}.")
        return leave & np.isfinite(signals["logits"].sum(axis=-1)), (previous, count)


__all__ = ["POLICY_NAMES", "Policy", "hybrid_indicator"]
