"""Exit-signal formulas of DE3-BERT (docs/method.md section 2, eqs. 8-11), shared by training, compact inference and
simulated inference.

Every function broadcasts over leading dimensions, so the same code scores one exit's active samples
(`[B, ...]`) and all exits of a full forward at once (`[num_exits, B, ...]`). Everything is computed in float32
whatever the model's dtype, so fp16/bf16 models give the same finite signals.
"""

import math

import torch
import torch.nn.functional as F


_TINY = torch.finfo(torch.float32).tiny


def normalized_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of `softmax(logits)` divided by `log K` (docs/method.md eq. 8), in [0, 1].

    Args:
        logits: `[..., K]` with `K >= 2`.

    Returns:
        `[...]` float32; a class with probability 0 contributes 0 (no NaN).
    """
    log_probs = F.log_softmax(logits.float(), dim=-1)
    entropy = -(log_probs.exp() * log_probs).sum(dim=-1)
    return (entropy / math.log(logits.shape[-1])).clamp(0.0, 1.0)


def normalized_energy(logits: torch.Tensor) -> torch.Tensor:
    """COSEE's normalised energy `sigmoid(-logsumexp(logits))` (docs/method.md section 3; COSEE eqs. 10-11), in (0, 1);
    lower is easier.

    Returns `[...]` float32 for `[..., K]` logits.
    """
    return torch.sigmoid(-torch.logsumexp(logits.float(), dim=-1))


def max_probability(logits: torch.Tensor) -> torch.Tensor:
    """The largest class probability `max_k softmax(logits)_k` (docs/method.md section 3), float32; higher is easier."""
    return logits.float().softmax(dim=-1).amax(dim=-1)


def _norm(vectors: torch.Tensor, min_square: float = _TINY) -> torch.Tensor:
    # sqrt of a clamped square: finite value and gradient at the zero vector, where `vector_norm`'s gradient is NaN.
    return vectors.square().sum(dim=-1).clamp_min(min_square).sqrt()


def prototype_distances(features: torch.Tensor, prototypes: torch.Tensor, distance: str) -> torch.Tensor:
    """Distance of every sample to every class prototype (docs/method.md section 2.3).

    Args:
        features: `[..., B, P]`, the prototypical network outputs `x`.
        prototypes: `[..., K, P]`, the class prototypes `cp_k` (same leading dimensions).
        distance: `"cosine"` (`1 - cos`, in [0, 2]; a zero vector is at distance 1) or `"euclidean"`.

    Returns:
        `[..., B, K]` float32.

    Raises:
        ValueError: for an unknown `distance`.
    """
    features, prototypes = features.float(), prototypes.float()
    if distance == "cosine":
        # Norms floored at 1e-8 as in `F.cosine_similarity`, which keeps the gradient at a zero vector bounded.
        unit_x = features / _norm(features, 1e-16).unsqueeze(-1)
        unit_c = prototypes / _norm(prototypes, 1e-16).unsqueeze(-1)
        # Clamped: float32 rounding puts a vector's distance to itself at about -1e-7, which would make DR and EDR
        # negative and let threshold 0 exit.
        return (1.0 - unit_x @ unit_c.transpose(-1, -2)).clamp(0.0, 2.0)
    if distance == "euclidean":
        return _norm(features.unsqueeze(-2) - prototypes.unsqueeze(-3))
    raise ValueError(f"distance={distance!r} is unknown; choose 'cosine' or 'euclidean'.")


def normalized_ratio(near: torch.Tensor, far: torch.Tensor) -> torch.Tensor:
    """`0.5 * (1 + (near - far) / max(near, far))` for non-negative distances, in [0, 1]; 0.5 when both are 0, NaN
    when either is NaN (never a plausible 0.5).

    The form of the distance ratio (docs/method.md eq. 10) and of the alienation loss (eq. 3).
    """
    largest = torch.maximum(near, far)
    ratio = torch.where(largest == 0, torch.zeros_like(largest), (near - far) / largest.clamp_min(_TINY))
    return (0.5 * (1.0 + ratio)).clamp(0.0, 1.0)  # rounding must not leave [0, 1]: thresholds 0 and 1 are exact


def distance_ratio(
    logits: torch.Tensor, features: torch.Tensor, prototypes: torch.Tensor, distance: str
) -> torch.Tensor:
    """Normalised distance ratio `DR` (docs/method.md eq. 10) between the two most probable classes, in [0, 1].

    Args:
        logits: `[..., B, K]` exit logits, which pick the top-2 classes `k1, k2`.
        features: `[..., B, P]`.
        prototypes: `[..., K, P]`.
        distance: see [`prototype_distances`].

    Returns:
        `[..., B]` float32.
    """
    distances = prototype_distances(features, prototypes, distance)
    top2 = logits.topk(2, dim=-1).indices
    nearest = distances.gather(-1, top2)
    return normalized_ratio(nearest[..., 0], nearest[..., 1])


def hybrid_indicator(entropy: torch.Tensor, ratio: torch.Tensor | None, lam: float) -> torch.Tensor:
    """EDR, the weighted harmonic mean of entropy and distance ratio (docs/method.md eq. 11), in [0, 1].

    `EDR = (lam + 1) / (lam / DR + 1 / E)`, written as `(lam + 1) E DR / (lam E + DR)` so that it is 0, its limit,
    when `E = 0` or `DR = 0`. `lam = 0` returns the entropy itself, and `ratio` may then be `None`. A NaN entropy or
    ratio gives NaN, never 0 ("certain"): no policy leaves on it.
    """
    if lam == 0:
        return entropy
    denominator = lam * entropy + ratio
    edr = torch.where(
        denominator == 0,
        torch.zeros_like(denominator),
        (lam + 1.0) * entropy * ratio / denominator.clamp_min(_TINY),
    )
    return edr.clamp(0.0, 1.0)  # float32 rounding can land one step above 1 when E = DR = 1


__all__ = [
    "distance_ratio",
    "hybrid_indicator",
    "max_probability",
    "normalized_energy",
    "normalized_entropy",
    "normalized_ratio",
    "prototype_distances",
]
