"""The exit signals and policies of `de3_transformers` in numpy, for the ONNX Runtime runner (no torch).

Each formula is the one of `de3_transformers.signals` and `de3_transformers.exit_policies` (docs/method.md sections
2-3), computed in float32 as there, so a sample leaves at the same exit under both runtimes; the tests hold them to
each other. Written again here because the runner must not import torch.
"""

import math
from dataclasses import dataclass

import numpy as np


_TINY = np.finfo(np.float32).tiny


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def normalized_entropy(logits: np.ndarray) -> np.ndarray:
    """docs/method.md eq. 8, in [0, 1]."""
    log_probs = log_softmax(logits.astype(np.float32))
    entropy = -(np.exp(log_probs) * log_probs).sum(axis=-1)
    return np.clip(entropy / np.float32(math.log(logits.shape[-1])), 0.0, 1.0).astype(np.float32)


def normalized_energy(logits: np.ndarray) -> np.ndarray:
    """`sigmoid(-logsumexp(logits))` (docs/method.md section 3)."""
    logits = logits.astype(np.float32)
    largest = logits.max(axis=-1)
    logsumexp = largest + np.log(np.exp(logits - largest[:, None]).sum(axis=-1))
    return (1.0 / (1.0 + np.exp(logsumexp))).astype(np.float32)


def max_probability(logits: np.ndarray) -> np.ndarray:
    return np.exp(log_softmax(logits.astype(np.float32))).max(axis=-1)


def _norm(vectors: np.ndarray, min_square: float) -> np.ndarray:
    return np.sqrt(np.maximum(np.square(vectors).sum(axis=-1), np.float32(min_square)))


def distance_ratio(logits: np.ndarray, features: np.ndarray, prototypes: np.ndarray, distance: str) -> np.ndarray:
    """docs/method.md eq. 10: the normalised ratio of the distances to the prototypes of the two most probable
    classes, in [0, 1]."""
    features, prototypes = features.astype(np.float32), prototypes.astype(np.float32)
    if distance == "cosine":
        unit_x = features / _norm(features, 1e-16)[:, None]
        unit_c = prototypes / _norm(prototypes, 1e-16)[:, None]
        distances = np.clip(1.0 - unit_x @ unit_c.T, 0.0, 2.0)
    else:
        distances = _norm(features[:, None, :] - prototypes[None, :, :], _TINY)
    top2 = np.argsort(-logits, axis=-1, kind="stable")[:, :2]
    near, far = np.take_along_axis(distances, top2, axis=-1).T
    largest = np.maximum(near, far)
    ratio = np.where(largest == 0, np.float32(0.0), (near - far) / np.maximum(largest, _TINY))
    return np.clip(0.5 * (1.0 + ratio), 0.0, 1.0).astype(np.float32)


def hybrid_indicator(entropy: np.ndarray, ratio: np.ndarray | None, lam: float) -> np.ndarray:
    """EDR (docs/method.md eq. 11); `lam = 0` is the entropy itself."""
    if lam == 0:
        return entropy
    denominator = lam * entropy + ratio
    with np.errstate(divide="ignore", invalid="ignore"):
        edr = np.where(denominator == 0, np.float32(0.0),
                       (lam + 1.0) * entropy * ratio / np.maximum(denominator, _TINY))
    return np.clip(edr, 0.0, 1.0).astype(np.float32)


@dataclass
class Exit:
    """What a policy sees at one exit, for the rows still running: logits `[B, K]`, and when the policy reads them
    the distance ratio and learning-to-exit scores `[B]`."""

    logits: np.ndarray
    distance_ratio: np.ndarray | None = None
    scores: np.ndarray | None = None


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

    def leave(self, exit: Exit, state):
        """`(leave [B] bool, new state)`; a row whose logits are not finite never leaves."""
        previous, count = state
        logits = exit.logits
        if self.name in ("de3", "entropy"):
            entropy = normalized_entropy(logits)
            signal = hybrid_indicator(entropy, exit.distance_ratio, self.lam if self.name == "de3" else 0.0)
            leave = signal < np.float32(self.threshold)
        elif self.name == "energy":
            leave = normalized_energy(logits) < np.float32(self.threshold)
        elif self.name == "max_prob":
            leave = max_probability(logits) > np.float32(self.threshold)
        elif self.name == "learned":
            leave = exit.scores.astype(np.float32) > np.float32(self.threshold)
        elif self.name == "patience":
            prediction = logits.argmax(axis=-1)
            count = np.where(prediction == previous, count + 1, 0)
            leave, previous = count >= self.patience, prediction
        elif self.name == "patient_confident":
            count = np.where(normalized_entropy(logits) < np.float32(self.threshold), count + 1, 0)
            leave = count >= self.patience
        else:
            raise ValueError(f"Unknown exit policy {self.name!r} for ONNX Runtime: use {', '.join(POLICY_NAMES)}.")
        return leave & np.isfinite(logits.sum(axis=-1)), (previous, count)


POLICY_NAMES = ("de3", "entropy", "max_prob", "energy", "patience", "patient_confident", "learned")


__all__ = ["Exit", "POLICY_NAMES", "Policy", "distance_ratio", "hybrid_indicator", "max_probability",
           "normalized_energy", "normalized_entropy"]
