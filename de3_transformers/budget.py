"""A layer speed-up budget for bulk scoring (docs/method.md section 6.6): the exit threshold adapts batch by batch so
that the running layer speed-up holds a target when the data is not the data the threshold was calibrated on.

Why: a threshold calibrated for 2x on one distribution gives another speed-up on another (the main job's model,
calibrated for 2x on movie-review snippets, gives 1.64x to 1.71x on the other VADER sets:
benchmarks/results/speedup_budget_cpu.md), so a user who sized a job's compute on the calibration gets another bill
without warning. Calibrating again needs labels; holding the speed-up needs only the exit layers, which every batch
reports.
"""

import math
from dataclasses import dataclass, field

import torch

from .exit_policies import ExitPolicy, PatientConfidentPolicy, ThresholdPolicy


def threshold_direction(policy: ExitPolicy) -> int:
    """+1 when a larger threshold lets more samples leave early (de3, entropy, energy, patient_confident), -1 when it
    lets fewer (max_prob, learned).

    Raises:
        ValueError: for a policy without a threshold (patience, the oracle), which a budget cannot steer.
    """
    if isinstance(policy, ThresholdPolicy):
        return 1 if policy.exits_below else -1
    if isinstance(policy, PatientConfidentPolicy):
        return 1
    raise ValueError(f"Policy {policy.name!r} has no threshold to adapt: a speed-up budget steers threshold policies "
                     "(de3, entropy, max_prob, energy, learned, patient_confident).")


@dataclass
class SpeedupBudget:
    """Adapts an exit threshold so that the running layer speed-up `M * N / sum(exit layers)` over all texts scored so
    far stays at `target_speedup`.

    After each batch: the layers the budget still allows are those of the target over the texts scored so far; what was
    overspent (or saved) is paid back over the next `horizon` texts, which sets the mean layers a text may use next,
    `l* = M / target - overspent / horizon` (kept within the exits). The threshold then moves by
    `gain * log(mean layers of the batch / l*)` in the direction that lets more texts leave when too many layers ran,
    at most `max_step` a batch, and stays within the policy signal's range. This is integral control of a static,
    monotone response (more threshold, more early exits), so with `gain` times the response's slope below 1 it
    converges without overshoot; `max_step` bounds a noisy batch's effect. The defaults suit signals in [0, 1] and
    batches of about 64 texts.

    Args:
        target_speedup: the layer speed-up to hold, at least 1 and at most `num_layers / first exit layer`.
        threshold: the threshold to start from, normally the calibrated one.
        num_layers: the model's depth `M`.
        direction: from [`threshold_direction`].
        min_layer: the first exit's layer (the fewest layers a text can use).
        gain: threshold change per unit of log error of a batch's mean layers.
        max_step: the largest threshold change after one batch.
        horizon: texts over which an overspent or saved budget is paid back.
        bounds: the smallest and largest threshold worth setting (the policy signal's range; `None` for unbounded).

    Raises:
        ValueError: for a target out of range, or a gain, step or horizon that is not positive.
    """

    target_speedup: float
    threshold: float
    num_layers: int
    direction: int
    min_layer: int = 1
    gain: float = 0.05
    max_step: float = 0.02
    horizon: int = 2048
    bounds: tuple[float | None, float | None] = (None, None)
    texts: int = field(default=0, init=False)
    layers: int = field(default=0, init=False)
    thresholds: list[float] = field(default_factory=list, init=False)

    def __post_init__(self):
        largest = self.num_layers / self.min_layer
        if not 1 <= self.target_speedup <= largest:
            raise ValueError(f"target_speedup={self.target_speedup} must be between 1 and {largest:g} (every text "
                             "leaving at the first exit) for this model.")
        if not (self.gain > 0 and self.max_step > 0 and self.horizon > 0):
            raise ValueError(f"gain={self.gain}, max_step={self.max_step} and horizon={self.horizon} must be > 0.")
        self.threshold = float(self.threshold)
        self.thresholds.append(self.threshold)

    @property
    def speedup(self) -> float:
        """The running layer speed-up over every text scored so far (1.0 before the first)."""
        return self.num_layers * self.texts / self.layers if self.layers else 1.0

    def state_dict(self) -> dict:
        """The state a budget carried on elsewhere needs (plain numbers, for a JSON progress record): the threshold for
        the next batch and the texts and layers counted so far."""
        return {"threshold": self.threshold, "texts": self.texts, "layers": self.layers}

    def load_state_dict(self, state: dict) -> None:
        """Continues from what [`state_dict`] gave, so that the next batches get the thresholds they would have got in
        the run that saved it (`thresholds` then starts over from this threshold).

        Raises:
            KeyError: for a state without `threshold`, `texts` or `layers`.
        """
        self.threshold, self.texts, self.layers = float(state["threshold"]), int(state["texts"]), int(state["layers"])
        self.thresholds = [self.threshold]

    def update(self, exit_layers: torch.Tensor) -> float:
        """Takes the exit layers of a batch scored at the current threshold; returns the threshold for the next."""
        count, spent = exit_layers.numel(), int(exit_layers.sum())
        if count == 0:
            return self.threshold
        self.texts, self.layers = self.texts + count, self.layers + spent
        per_text = self.num_layers / self.target_speedup
        overspent = self.layers - per_text * self.texts
        allowed = min(max(per_text - overspent / self.horizon, self.min_layer), self.num_layers)
        error = math.log((spent / count) / allowed)
        step = max(-self.max_step, min(self.max_step, self.gain * error)) * self.direction
        low, high = self.bounds
        threshold = self.threshold + step
        threshold = threshold if low is None else max(low, threshold)
        self.threshold = threshold if high is None else min(high, threshold)
        self.thresholds.append(self.threshold)
        return self.threshold


def budget_for(policy: ExitPolicy, target_speedup: float, config, **options) -> SpeedupBudget:
    """A [`SpeedupBudget`] for `policy` (built with its starting threshold) on a model of `config`.

    Raises:
        ValueError: as [`threshold_direction`] and [`SpeedupBudget`].
    """
    direction = threshold_direction(policy)
    bounds = getattr(policy, "signal_range", (0.0, 1.0))
    return SpeedupBudget(float(target_speedup), float(policy.threshold), config.num_hidden_layers, direction,
                         min_layer=config.exit_layers[0], bounds=bounds, **options)


__all__ = ["SpeedupBudget", "budget_for", "threshold_direction"]
