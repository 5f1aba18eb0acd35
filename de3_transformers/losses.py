"""DE3-BERT training objective: distance-aware regularisation and the layer-weighted total loss
(docs/method.md section 2, eqs. 2-7)."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .signals import max_probability, normalized_energy, normalized_entropy, normalized_ratio, prototype_distances


def distance_aware_regularization(
    features: torch.Tensor,
    labels: torch.Tensor,
    prototypes: torch.Tensor,
    initialized: torch.Tensor,
    distance: str,
    dar_type: str,
    beta: float,
) -> torch.Tensor:
    """DAR of every exit below the top, prototypes detached (docs/method.md section 2.4, eqs. 2-4).

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
    """The two parts of the DE3 loss `ce_loss + dar_alpha * dar_loss`, each already weighted by exit depth (eq. 7)."""

    ce_loss: torch.Tensor
    dar_loss: torch.Tensor


def per_exit_cross_entropy(exit_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The cross-entropy of every exit for every sample: `[num_exits, B]` float32 from `[num_exits, B, K]` logits."""
    num_exits, batch, num_labels = exit_logits.shape
    return F.cross_entropy(
        exit_logits.float().reshape(-1, num_labels), labels.repeat(num_exits), reduction="none"
    ).view(num_exits, batch)


def layer_weighted_loss(
    exit_logits: torch.Tensor, labels: torch.Tensor, dar: torch.Tensor, exit_layers: list[int]
) -> DE3LossParts:
    """The parts of the DE3 loss `sum_m m * L^(m) / sum_m m` with `L^(m) = CE^(m) + alpha * DAR^(m)` below the top and
    `L^(M) = CE^(M)` (docs/method.md eqs. 5-7), each weighted by depth: the total is `ce_loss + alpha * dar_loss`. `m`
    is the encoder layer the exit sits on.

    Args:
        exit_logits: `[num_exits, B, K]`.
        labels: `[B]`.
        dar: `[num_exits - 1]`, from [`distance_aware_regularization`].
        exit_layers: the encoder layer of each exit.
    """
    cross_entropy = per_exit_cross_entropy(exit_logits, labels).mean(dim=-1)
    weights = torch.tensor(exit_layers, dtype=torch.float32, device=exit_logits.device)
    weights = weights / weights.sum()
    ce_loss = (weights * cross_entropy).sum()
    dar_loss = (weights[:-1] * dar).sum()
    return DE3LossParts(ce_loss=ce_loss, dar_loss=dar_loss)


def learning_to_exit_loss(exit_scores: torch.Tensor, exit_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """BERxiT's learning-to-exit loss (docs/method.md section 3): mean over the exits below the top of the MSE between
    each exit's score and whether its prediction is right (1) or wrong (0).

    Args:
        exit_scores: `[num_exits - 1, B]` in [0, 1].
        exit_logits: `[num_exits, B, K]`; the top exit (last) has no score.
        labels: `[B]`.
    """
    correct = (exit_logits[:-1].argmax(dim=-1) == labels).to(torch.float32)
    if exit_scores.shape[0] == 0:
        return exit_scores.new_zeros((), dtype=torch.float32)
    return F.mse_loss(exit_scores.float(), correct)


# COSEE (docs/method.md section 4, paper 002)

# Signal name (`configuration_de3.COSEE_SIGNAL_NAMES`) -> (function of the logits, whether a sample exits when the
# signal is *below* the threshold).
COSEE_SIGNALS = {
    "energy": (normalized_energy, True),
    "entropy": (normalized_entropy, True),
    "max_prob": (max_probability, False),
}


class COSEEState:
    """What COSEE carries from step to step (docs/method.md section 4.2): the training progress `t / T` (it scales
    `beta_t`) and the exit-signal range of the previous epoch (the thresholds are drawn from it; [0, 1] in the first
    epoch).

    `DE3Trainer` keeps it up to date. In a hand-written loop set `progress` each step and call `end_epoch()` after each
    epoch (outside training `progress` stays 1: the full `beta_0`).
    """

    def __init__(self):
        self.progress = 1.0
        self.low, self.high = 0.0, 1.0
        self._seen = None  # (-min, max) of the signals of this epoch so far

    def observe(self, signals: torch.Tensor) -> None:
        """Widens this epoch's range with `signals` (any shape, detached here)."""
        if signals.numel() == 0:
            return
        seen = torch.stack([-signals.detach().amin(), signals.detach().amax()]).float()
        self._seen = seen if self._seen is None else torch.maximum(self._seen, seen)

    def end_epoch(self, reduce_max=None) -> None:
        """Makes this epoch's range the range thresholds are drawn from. `reduce_max` (e.g. an all-reduce with MAX)
        merges the ranges seen by every process, so all processes draw from the same range."""
        if self._seen is None:
            return
        seen = self._seen if reduce_max is None else reduce_max(self._seen)
        self.low, self.high = -float(seen[0]), float(seen[1])
        self._seen = None

    def merge_seen(self, reduce_max, device) -> None:
        """Merges this epoch's observations so far over every process (`reduce_max`, e.g. an all-reduce with MAX; every
        process must call it), so that any one process holds them all: before a checkpoint is saved from one of them.
        The merged range is the one `end_epoch` would have formed anyway (a max of maxes)."""
        seen = self._seen if self._seen is not None else torch.full((2,), -torch.inf, device=device)
        seen = reduce_max(seen.to(device))
        self._seen = seen if torch.isfinite(seen).all() else None

    def state_dict(self) -> dict:
        """The state a resumed run needs (plain numbers, for the trainer's JSON state); progress follows the step."""
        return {"low": self.low, "high": self.high, "seen": None if self._seen is None else self._seen.tolist()}

    def load_state_dict(self, state: dict) -> None:
        """Restores what [`state_dict`] gave."""
        self.low, self.high = float(state["low"]), float(state["high"])
        self._seen = None if state["seen"] is None else torch.tensor(state["seen"], dtype=torch.float32)

    def thresholds(self, count: int, device) -> torch.Tensor:
        """`count` thresholds drawn uniformly from the current range (torch's global generator)."""
        return self.low + (self.high - self.low) * torch.rand(count, device=device)


def cosee_sample_weights(
    signals: torch.Tensor, thresholds: torch.Tensor, exit_layers: list[int], beta: float, exits_below: bool = True
) -> torch.Tensor:
    """COSEE's loss weights (docs/method.md section 4.1; COSEE eq. 3): `w_n^(m) = softmax_m(-beta |m - m*_n|)` for each
    threshold, where `m*_n` is the exit sample `n` would leave at (the first exit below the top whose signal passes the
    threshold, else the top) and `m` counts encoder layers (`exit_layers`).

    Args:
        signals: `[E - 1, N]` exit signals of the exits below the top.
        thresholds: `[T]`.
        exit_layers: the `E` exit layers.
        beta: `beta_t`.
        exits_below: exit when the signal is below the threshold (energy, entropy) or above it (max prob).

    Returns:
        `[T, E, N]`, summing to 1 over the exits; no gradient.
    """
    with torch.no_grad():
        signals = signals.float()[None]
        limits = thresholds.float().view(-1, 1, 1)
        leave = (signals < limits) if exits_below else (signals > limits)  # [T, E - 1, N]
        num_exits = len(exit_layers)
        first = torch.where(leave.any(dim=1), leave.int().argmax(dim=1), num_exits - 1)  # [T, N]
        layers = torch.tensor(exit_layers, dtype=torch.float32, device=signals.device)
        distance = (layers.view(1, -1, 1) - layers[first][:, None, :]).abs()  # [T, E, N]
        return torch.softmax(-beta * distance, dim=1)


def online_signal_calibration(
    signals: torch.Tensor, correct: torch.Tensor, margin: float, exits_below: bool = True
) -> torch.Tensor:
    """COSEE's OSC loss (docs/method.md section 4.3; COSEE eqs. 6-8): the mean over the exits below the top of
    `max(0, mean S_easy - mean S_hard + margin)` (hard minus easy for signals that grow with confidence), where the
    exit's easy samples are those it classifies right. An exit with no easy or no hard sample in the batch adds 0.

    Args:
        signals: `[E - 1, N]`, with gradient.
        correct: `[E - 1, N]` bool.
    """
    if signals.shape[0] == 0:
        return signals.new_zeros((), dtype=torch.float32)
    signals, easy = signals.float(), correct.float()
    hard = 1.0 - easy
    easy_mean = (signals * easy).sum(dim=1) / easy.sum(dim=1).clamp_min(1)
    hard_mean = (signals * hard).sum(dim=1) / hard.sum(dim=1).clamp_min(1)
    gap = (easy_mean - hard_mean) if exits_below else (hard_mean - easy_mean)
    both = (easy.sum(dim=1) > 0) & (hard.sum(dim=1) > 0)
    return torch.where(both, F.relu(gap + margin), torch.zeros_like(gap)).mean()


@dataclass
class COSEELossParts:
    """`ce_loss + alpha * osc_loss` of COSEE (docs/method.md section 4.4; COSEE eq. 9), and the exit signals they were
    computed from."""

    ce_loss: torch.Tensor
    osc_loss: torch.Tensor
    signals: torch.Tensor  # [E - 1, N], with gradient


def cosee_loss(
    exit_logits: torch.Tensor,
    labels: torch.Tensor,
    thresholds: torch.Tensor,
    exit_layers: list[int],
    beta: float,
    margin: float,
    signal: str = "energy",
) -> COSEELossParts:
    """COSEE's classification loss (docs/method.md section 4.1; COSEE eqs. 2 and 5: the sample-weighted cross-entropy,
    averaged over the thresholds) and its OSC loss.

    Args:
        exit_logits: `[E, N, K]`.
        labels: `[N]`.
        thresholds: `[T]`, drawn by [`COSEEState.thresholds`].
        beta: `beta_t = (t / T) beta_0`.
        signal: a key of `COSEE_SIGNALS`.

    Raises:
        ValueError: for an unknown signal.
    """
    if signal not in COSEE_SIGNALS:
        raise ValueError(f"signal={signal!r} is unknown; choose one of {sorted(COSEE_SIGNALS)}.")
    signal_of, exits_below = COSEE_SIGNALS[signal]
    cross_entropy = per_exit_cross_entropy(exit_logits, labels)
    signals = signal_of(exit_logits[:-1])
    weights = cosee_sample_weights(signals, thresholds, exit_layers, beta, exits_below)
    ce_loss = (weights * cross_entropy[None]).sum(dim=1).mean()  # sum over exits, mean over samples and thresholds
    correct = exit_logits[:-1].argmax(dim=-1) == labels
    return COSEELossParts(ce_loss, online_signal_calibration(signals, correct, margin, exits_below), signals)


# MPEE (docs/method.md section 5, paper 004)


class ExitEnsembleTeacher(nn.Module):
    """MPEE's attention over exits (docs/method.md section 5.5; MPEE eq. 12): `eta_l = softmax_l(V^T tanh(W C_zm^l +
    b))`, teacher `t = sum_l eta_l C_zm^l`."""

    def __init__(self, num_labels: int, attention_size: int = 64):  # the paper does not give the size
        super().__init__()
        self.projection = nn.Linear(num_labels, attention_size)
        self.context = nn.Linear(attention_size, 1, bias=False)

    def forward(self, exit_logits: torch.Tensor) -> torch.Tensor:
        """`[E, N, K]` exit logits -> `[N, K]` teacher logits."""
        eta = self.context(torch.tanh(self.projection(exit_logits))).softmax(dim=0)  # [E, N, 1]
        return (eta * exit_logits).sum(dim=0)


def self_distillation_loss(exit_logits: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """MPEE's weighted ensemble self-distillation (docs/method.md section 5.5; MPEE eq. 13):
    `sum_l tau^2 KL(softmax(C_zm^l / tau) || softmax(t / tau))`, averaged over the batch.

    Args:
        exit_logits: `[E, N, K]`, the students; the gradient reaches the backbone through them.
        teacher: `[N, K]`; built from detached exit logits, its gradient trains only the ensemble attention.
    """
    student = F.log_softmax(exit_logits.float() / temperature, dim=-1)
    target = F.log_softmax(teacher.float() / temperature, dim=-1)[None]
    divergence = (student.exp() * (student - target)).sum(dim=-1)  # KL(student || teacher), [E, N]
    return temperature**2 * divergence.sum(dim=0).mean()


def joint_cross_entropy(exit_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """MPEE's classification loss (docs/method.md section 5.5; MPEE eq. 11): the cross-entropy of every exit, summed
    over exits and averaged over the batch."""
    return per_exit_cross_entropy(exit_logits, labels).mean(dim=1).sum()


__all__ = [
    "COSEELossParts",
    "COSEEState",
    "COSEE_SIGNALS",
    "DE3LossParts",
    "ExitEnsembleTeacher",
    "cosee_loss",
    "cosee_sample_weights",
    "distance_aware_regularization",
    "joint_cross_entropy",
    "layer_weighted_loss",
    "learning_to_exit_loss",
    "online_signal_calibration",
    "per_exit_cross_entropy",
    "self_distillation_loss",
]
