"""Exit decisions: the DE3 rule (METHOD.md section 2) and its simulation from the signals of one full forward."""

from dataclasses import dataclass

import torch

from .configuration_de3 import check_exit_parameters
from .signals import hybrid_indicator


def de3_should_exit(entropy: torch.Tensor, ratio: torch.Tensor | None, threshold: float, lam: float) -> torch.Tensor:
    """Bool mask of the samples that leave at this exit: `EDR < threshold` (METHOD.md eq. 11 and its rule)."""
    return hybrid_indicator(entropy, ratio, lam) < threshold


def first_exit(entropy: torch.Tensor, ratio: torch.Tensor | None, threshold, lam: float) -> torch.Tensor:
    """Index of the exit each sample leaves at, from the signals `[num_exits - 1, N]` of a full forward.

    `threshold` is a number, or a tensor `[T, 1, 1]` to replay `T` thresholds at once (result `[T, N]`).
    """
    leave = de3_should_exit(entropy, ratio, threshold, lam)
    always = leave.new_ones(*leave.shape[:-2], 1, leave.shape[-1])  # the last exit always answers
    return torch.cat([leave, always], dim=-2).to(torch.uint8).argmax(dim=-2)  # argmax: the first exit that fires


@dataclass
class SimulatedExits:
    """What early exit would return, computed from a full forward."""

    logits: torch.Tensor  # [B, K], of the exit each sample left at
    exit_layers: torch.Tensor  # [B], encoder layer (1..M) of that exit
    speedup: float  # METHOD.md eq. 12


def layer_speedup(exit_layers: torch.Tensor, num_layers: int) -> float:
    """Layer speed-up `M * N / sum_n exit_layer_n` (METHOD.md eq. 12)."""
    return num_layers * exit_layers.numel() / exit_layers.sum().item()


def simulate_early_exit(
    exit_logits: torch.Tensor,
    entropy: torch.Tensor,
    ratio: torch.Tensor | None,
    exit_layers: list[int],
    threshold: float,
    lam: float,
) -> SimulatedExits:
    """Replays `predict_early` on the outputs of `model(..., output_exit_signals=True)`, with no new forward.

    Args:
        exit_logits: `[num_exits, B, K]`.
        entropy: `[num_exits - 1, B]`.
        ratio: `[num_exits - 1, B]` distance ratios, or `None` when `lam == 0`.
        exit_layers: the encoder layer of each exit (`config.exit_layers`); the last is `M`.
        threshold, lam: as in `predict_early`.

    Raises:
        ValueError: if `threshold` or `lam` is out of range, or `ratio` is `None` while `lam > 0`.
    """
    check_exit_parameters(threshold, lam)
    if ratio is None and lam > 0 and entropy.shape[0] > 0:
        raise ValueError(
            "distance_ratio is None (some prototypes were never initialised), so only lam=0 can be simulated. "
            "Train the model with labels first."
        )
    first = first_exit(entropy, ratio, threshold, lam)
    batch = torch.arange(first.numel(), device=first.device)
    layers = torch.tensor(exit_layers, device=first.device)[first]
    return SimulatedExits(exit_logits[first, batch], layers, layer_speedup(layers, exit_layers[-1]))


__all__ = ["SimulatedExits", "de3_should_exit", "first_exit", "layer_speedup", "simulate_early_exit"]
