"""Replay of an exit policy on the stored outputs of one full forward (docs/method.md sections 3 and 6): which exit each
sample would leave at, and what early exit would return, without running the compact loop. Calibration replays
many settings at once this way; the tests hold `predict_early` to it."""

import warnings
from dataclasses import dataclass

import torch

from .exit_policies import ExitPolicy, ExitView


def simulate_first_exits(policy: ExitPolicy, views: list[ExitView]) -> torch.Tensor:
    """Index of the exit each sample leaves at, replaying `policy` on the `views` of the exits below the top (all
    samples of a full forward); `len(views)` (the top exit) for samples that never leave early.

    Returns `[N]`, or `[T, N]` when a parameter of `policy` is a `[T, 1]` tensor.
    """
    num_samples = views[0].logits.shape[0] if views else 0
    state = policy.start(num_samples, views[0].logits.device) if views else None
    first = torch.full((num_samples,), len(views), dtype=torch.long)
    left = torch.zeros(num_samples, dtype=torch.bool)
    for index, view in enumerate(views):
        leave, state = policy.leave(view, state)
        leave = leave.cpu()
        first = torch.where(leave & ~left, index, first)
        left = left | leave
    return first


@dataclass
class SimulatedExits:
    """What early exit would return, computed from a full forward."""

    logits: torch.Tensor  # [B, K], of the exit each sample left at
    sample_exit_layers: torch.Tensor  # [B], encoder layer (1..M) of that exit
    speedup: float  # docs/method.md eq. 12

    @property
    def exit_layers(self) -> torch.Tensor:
        """Deprecated alias of `sample_exit_layers` (removed in 0.3)."""
        warnings.warn("SimulatedExits.exit_layers is deprecated; use sample_exit_layers.", FutureWarning, stacklevel=2)
        return self.sample_exit_layers


def layer_speedup(exit_layers: torch.Tensor, num_layers: int) -> float:
    """Layer speed-up `M * N / sum_n exit_layer_n` (docs/method.md eq. 12)."""
    return num_layers * exit_layers.numel() / exit_layers.sum().item()


def exit_views(
    exit_logits: torch.Tensor,
    exit_layers: list[int],
    entropy: torch.Tensor | None = None,
    distance_ratio: torch.Tensor | None = None,
    exit_scores: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
) -> list[ExitView]:
    """One [`ExitView`] per exit below the top, from the batch-first outputs of a full forward (`[N, num_exits, K]`
    logits, `[N, num_exits - 1]` signals)."""
    return [
        ExitView(
            exit_index=index,
            layer=exit_layers[index],
            logits=exit_logits[:, index],
            entropy=None if entropy is None else entropy[:, index],
            distance_ratio=None if distance_ratio is None else distance_ratio[:, index],
            exit_scores=None if exit_scores is None else exit_scores[:, index],
            labels=labels,
        )
        for index in range(exit_logits.shape[1] - 1)
    ]


def simulate_policy(
    policy: ExitPolicy,
    exit_logits: torch.Tensor,
    exit_layers: list[int],
    entropy: torch.Tensor | None = None,
    distance_ratio: torch.Tensor | None = None,
    exit_scores: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
) -> SimulatedExits:
    """Replays `predict_early(policy=policy)` on the outputs of `model(..., output_exit_signals=True)`.

    Args:
        policy: an [`ExitPolicy`] (see [`get_exit_policy`]).
        exit_logits: `[N, num_exits, K]`, as the forward returns them.
        exit_layers: the encoder layer of each exit (`config.exit_layers`); the last is `M`.
        entropy, distance_ratio, exit_scores: `[N, num_exits - 1]`, as the forward returns them.
        labels: `[N]`, for the oracle.

    Raises:
        ValueError: when the policy needs a signal that was not given.
    """
    views = exit_views(exit_logits, exit_layers, entropy, distance_ratio, exit_scores, labels)
    first = simulate_first_exits(policy, views).to(exit_logits.device)
    batch = torch.arange(first.numel(), device=first.device)
    layers = torch.tensor(exit_layers, device=first.device)[first]
    return SimulatedExits(exit_logits[batch, first], layers, layer_speedup(layers, exit_layers[-1]))


__all__ = ["SimulatedExits", "exit_views", "layer_speedup", "simulate_first_exits", "simulate_policy"]
