"""DE3-BERT training objective: distance-aware regularisation and the layer-weighted total loss
(METHOD.md section 2, eqs. 2-7)."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .signals import normalized_ratio, prototype_distances


def distance_aware_regularization(
    features: torch.Tensor,
    labels: torch.Tensor,
    prototypes: torch.Tensor,
    initialized: torch.Tensor,
    distance: str,
    dar_type: str,
    beta: float,
) -> torch.Tensor:
    """DAR of every exit below the top, prototypes detached.

    Args:
        features: `[E, B, P]` prototypical network outputs of the `E = num_exits - 1` exits below the top.
        labels: `[B]` class indices.
        prototypes: `[E, K, P]`.
        initialized: `[E, K]` bool; a term that needs an uninitialised prototype contributes 0.
        distance: `"cosine"` or `"euclidean"`.
        dar_type: `"center"` (eq. 2), `"alienation"` (eq. 3) or `"combined"` (eq. 4: center + beta * alienation).
        beta: weight of the alienation term in `"combined"`.

    Returns:
        `[E]` float32, the mean over the batch of each exit's DAR.

    Raises:
        ValueError: for an unknown `dar_type` or `distance`.
    """
    if dar_type not in ("center", "alienation", "combined"):
        raise ValueError(f"dar_type={dar_type!r} is unknown; choose 'center', 'alienation' or 'combined'.")
    distances = prototype_distances(features, prototypes.detach(), distance)  # [E, B, K]
    num_labels = distances.shape[-1]
    index = labels.view(1, -1, 1).expand(distances.shape[0], -1, 1)
    to_own = distances.gather(-1, index).squeeze(-1)  # r_y, [E, B]
    own_known = initialized.gather(-1, index.squeeze(-1))
    zero = torch.zeros_like(to_own)

    center = torch.where(own_known, to_own, zero).mean(dim=-1)
    if dar_type == "center":
        return center

    others_known = initialized[:, None, :] & ~F.one_hot(labels, num_labels).bool()[None]  # [E, B, K]
    to_nearest_other = distances.masked_fill(~others_known, float("inf")).min(dim=-1).values  # r_z
    valid = own_known & others_known.any(dim=-1)
    # Feed finite stand-ins where a term is void, so neither the value nor the gradient can become NaN.
    ratio = normalized_ratio(to_own, torch.where(valid, to_nearest_other, to_own))
    alienation = torch.where(valid, ratio, zero).mean(dim=-1)
    if dar_type == "alienation":
        return alienation
    return center + beta * alienation


@dataclass
class DE3LossParts:
    """`loss = ce_loss + alpha * dar_loss`; each part is already weighted by exit depth (eq. 7)."""

    loss: torch.Tensor
    ce_loss: torch.Tensor
    dar_loss: torch.Tensor


def layer_weighted_loss(
    exit_logits: torch.Tensor, labels: torch.Tensor, dar: torch.Tensor, exit_layers: list[int], alpha: float
) -> DE3LossParts:
    """Total DE3 loss `sum_m m * L^(m) / sum_m m` with `L^(m) = CE^(m) + alpha * DAR^(m)` below the top and
    `L^(M) = CE^(M)` (METHOD.md eqs. 5-7). `m` is the encoder layer the exit sits on.

    Args:
        exit_logits: `[num_exits, B, K]`.
        labels: `[B]`.
        dar: `[num_exits - 1]`, from [`distance_aware_regularization`].
        exit_layers: the encoder layer of each exit.
        alpha: weight of DAR.
    """
    num_exits, batch, num_labels = exit_logits.shape
    cross_entropy = F.cross_entropy(
        exit_logits.float().reshape(-1, num_labels), labels.repeat(num_exits), reduction="none"
    ).view(num_exits, batch).mean(dim=-1)
    weights = torch.tensor(exit_layers, dtype=torch.float32, device=exit_logits.device)
    weights = weights / weights.sum()
    ce_loss = (weights * cross_entropy).sum()
    dar_loss = (weights[:-1] * dar).sum()
    return DE3LossParts(loss=ce_loss + alpha * dar_loss, ce_loss=ce_loss, dar_loss=dar_loss)


def learning_to_exit_loss(exit_scores: torch.Tensor, exit_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """BERxiT's learning-to-exit loss (METHOD.md section 3): mean over the exits below the top of the MSE between each
    exit's score and whether its prediction is right (1) or wrong (0).

    Args:
        exit_scores: `[num_exits - 1, B]` in [0, 1].
        exit_logits: `[num_exits, B, K]`; the top exit (last) has no score.
        labels: `[B]`.
    """
    correct = (exit_logits[:-1].argmax(dim=-1) == labels).to(torch.float32)
    if exit_scores.shape[0] == 0:
        return exit_scores.new_zeros((), dtype=torch.float32)
    return F.mse_loss(exit_scores.float(), correct)


__all__ = ["DE3LossParts", "distance_aware_regularization", "layer_weighted_loss", "learning_to_exit_loss"]
