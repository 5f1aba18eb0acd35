"""Exit policies (docs/method.md sections 2 and 3): the rule that decides, exit by exit, which samples leave.

A policy sees one exit at a time through an [`ExitView`] and answers with a bool per sample; stateful policies
(patience) carry a per-sample state from exit to exit. The same policy object drives both

- `predict_early`, which runs the layers and drops the samples that left (the state is compacted with them), and
- `simulation.simulate_policy`, which replays the rule on the stored outputs of one full forward; there every
  parameter may be a tensor `[T, 1]`, so `T` thresholds are replayed at once (results `[T, N]`).

Built-in policies, all in this module so that the rules read side by side: `de3` (EDR), `entropy` (DeeBERT), `max_prob`,
`energy` (COSEE), `patience` (PABEE), `patient_confident` (PCEE-BERT), `learned` (BERxiT) and `oracle` (needs labels).
To add one, subclass [`ExitPolicy`] (or [`ThresholdPolicy`] for a "signal below/above a threshold" rule) as a dataclass
and register it with [`register_exit_policy`]:

    @dataclass
    class MarginPolicy(ThresholdPolicy):
        name: ClassVar[str] = "margin"
        exits_below: ClassVar[bool] = False  # exit when the signal is above the threshold

        def signal(self, view):
            top2 = view.logits.float().softmax(-1).topk(2, dim=-1).values
            return top2[..., 0] - top2[..., 1]

    register_exit_policy(MarginPolicy)
    model.predict_early(**batch, policy="margin", threshold=0.6)
"""

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .configuration_de3 import check_exit_parameters, check_number
from .registry import EXIT_POLICIES
from .signals import hybrid_indicator, max_probability, normalized_energy, normalized_entropy


@dataclass
class ExitView:
    """What a policy sees at one exit: the outputs of that exit for the samples it decides on.

    Args:
        exit_index: position of the exit in `config.exit_layers` (0-based).
        layer: encoder layer of the exit (1..M).
        logits: `[N, K]`.
        entropy: `[N]` normalised entropy (docs/method.md eq. 8); computed from `logits` when not given.
        distance_ratio: `[N]` DE3 distance ratio (eq. 10), given to policies with `needs_distance_ratio`.
        exit_scores: `[N]` BERxiT learning-to-exit scores in [0, 1], given to policies with `needs_exit_scores`.
        labels: `[N]` gold class ids, given to policies with `needs_labels` (the oracle).
    """

    exit_index: int
    layer: int
    logits: torch.Tensor
    entropy: torch.Tensor | None = None
    distance_ratio: torch.Tensor | None = None
    exit_scores: torch.Tensor | None = None
    labels: torch.Tensor | None = None

    def __post_init__(self):
        if self.entropy is None:
            self.entropy = normalized_entropy(self.logits)

    @property
    def finite(self) -> torch.Tensor:
        """`[N]` bool: whether the exit's logits are finite for each sample (a row sum is finite exactly when the row
        is: one reduction instead of a test per element). The distance ratio and the learning-to-exit score need no
        test of their own: they read the same pooled features as the logits, and a NaN in their own weights makes
        them NaN, which no threshold rule passes."""
        return torch.isfinite(self.logits.sum(dim=-1))


def select_rows(state: Any, rows: torch.Tensor) -> Any:
    """Keeps the samples `rows` (last dimension) of every tensor in a policy state (a tensor, tuple or None)."""
    if state is None:
        return None
    if isinstance(state, torch.Tensor):
        return state[..., rows]
    return type(state)(select_rows(part, rows) for part in state)


def _check_parameter(name: str, value, **limits) -> None:
    """[`check_number`], except for a tensor: calibration builds those to replay many values at once."""
    if not isinstance(value, torch.Tensor):
        check_number(name, value, **limits)


class ExitPolicy:
    """Decides, exit by exit, which samples leave (subclass it as a dataclass whose fields are the parameters).

    Class attributes: `name` (for `predict_early(policy=name)`), `sweep` (the parameter calibration varies, `None`
    when there is none), and whether `decide` reads `view.distance_ratio` (`needs_distance_ratio`),
    `view.exit_scores` (`needs_exit_scores`) or `view.labels` (`needs_labels`).
    """

    name: ClassVar[str] = "custom"
    sweep: ClassVar[str | None] = "threshold"
    needs_distance_ratio: ClassVar[bool] = False
    needs_exit_scores: ClassVar[bool] = False
    needs_labels: ClassVar[bool] = False

    def start(self, batch_size: int, device: torch.device) -> Any:
        """The state before the first exit (`None` for stateless policies)."""
        return None

    def decide(self, view: ExitView, state: Any) -> tuple[torch.Tensor, Any]:
        """`(leave, new_state)`: a bool tensor, True for the samples that leave at this exit, and the state after it.

        Must treat each sample on its own (no batch statistics), so that compaction cannot change an answer.
        """
        raise NotImplementedError

    def leave(self, view: ExitView, state: Any) -> tuple[torch.Tensor, Any]:
        """[`decide`], except that a sample whose exit outputs are not all finite never leaves: NaN or inf must not
        look confident under any rule (docs/method.md section 2.9). `predict_early` and the replay call this."""
        leave, state = self.decide(view, state)
        return leave & view.finite, state

    def select(self, state: Any, rows: torch.Tensor) -> Any:
        """The state of the samples `rows` that keep running (called when others leave)."""
        return select_rows(state, rows)

    def sweep_values(self, views: list["ExitView"]) -> list[float]:
        """Values of the `sweep` parameter worth trying on these exits (all samples of a full forward), from the
        fewest early exits (1x) to the most."""
        raise NotImplementedError

    def with_value(self, value) -> "ExitPolicy":
        """A copy with the `sweep` parameter set to `value` (a number, or a `[T, 1]` tensor in simulation)."""
        return dataclasses.replace(self, **{self.sweep: value})

    @classmethod
    def parameter_names(cls) -> set[str]:
        """The names of the policy's parameters (its dataclass fields)."""
        return {field.name for field in dataclasses.fields(cls)}

    def parameters(self) -> dict[str, Any]:
        """The policy's parameters, as numbers."""
        return {name: getattr(self, name) for name in self.parameter_names()}


def _between(values: torch.Tensor, lower: float | None, upper: float | None) -> torch.Tensor:
    """Thresholds for the rule `signal < t`, one per distinct outcome on `values`: one at or below every value (no
    sample leaves), one between each two consecutive distinct values, and one above every value (all leave)."""
    values = torch.unique(values.float())
    if values.numel() == 0:
        return torch.zeros(1) if lower is None else torch.tensor([float(lower)])
    # Between two values rather than on one: a threshold equal to a sample's signal sits on the boundary of the
    # strict rule, where the float noise of another batch shape (the compact `predict_early`) could flip it.
    # Where the float32 midpoint rounds onto the lower value, take the upper.
    middle = (values[:-1] + values[1:]) / 2
    middle = torch.where(middle > values[:-1], middle, values[1:])
    smallest, largest = values[0], values[-1]
    bottom = torch.tensor(float(lower)) if lower is not None and lower <= smallest else smallest
    if upper is not None and largest < upper:
        top = (largest + upper) / 2
    else:
        top = largest + max(0.5, abs(float(largest)))
    if not top > largest:  # the largest value is the float32 just below `upper`
        top = torch.nextafter(largest, torch.tensor(math.inf))
    return torch.cat([bottom.view(1), middle, top.view(1)])


@dataclass
class ThresholdPolicy(ExitPolicy):
    """A sample leaves at the first exit whose `signal` is below `threshold` (above, with `exits_below = False`).

    Subclasses define `signal(view)`; `signal_range` (the signal's bounds, when it has them) gives calibration tidy
    end points (threshold 0 for "never" on a [0, 1] signal).
    """

    threshold: float | torch.Tensor = 0.0
    exits_below: ClassVar[bool] = True
    signal_range: ClassVar[tuple[float | None, float | None]] = (0.0, 1.0)
    threshold_minimum: ClassVar[float | None] = None  # the smallest threshold that makes sense, if any

    def __post_init__(self):
        _check_parameter("threshold", self.threshold, low=self.threshold_minimum)

    def signal(self, view: ExitView) -> torch.Tensor:
        raise NotImplementedError

    def decide(self, view, state):
        signal = self.signal(view)
        return (signal < self.threshold) if self.exits_below else (signal > self.threshold), state

    def sweep_values(self, views):
        if not views:
            return [0.0]
        signals = torch.stack([self.signal(view).float() for view in views])
        lower, upper = self.signal_range
        if not self.exits_below:  # `signal > t` is `-signal < -t`
            signals, lower, upper = -signals, (None if upper is None else -upper), (None if lower is None else -lower)
        # Only a new running minimum along the exits can move a sample's first exit; other values repeat points.
        values = _between(signals.cummin(dim=0).values, lower, upper)
        return values.tolist() if self.exits_below else (-values).tolist()


@dataclass
class DE3Policy(ThresholdPolicy):
    """DE3-BERT (docs/method.md eq. 11): exit when `EDR < threshold`; `lam = 0` is plain entropy."""

    name: ClassVar[str] = "de3"
    lam: float | torch.Tensor = 1.0

    def __post_init__(self):
        if not isinstance(self.threshold, torch.Tensor):
            check_exit_parameters(self.threshold, self.lam)

    @property
    def needs_distance_ratio(self) -> bool:
        return self.lam > 0

    def signal(self, view):
        if self.lam > 0 and view.distance_ratio is None:
            raise ValueError(
                f"lam={self.lam} needs the distance ratio, which is missing (some prototypes were never initialised): "
                "train the model with labels first, or use lam=0 (entropy alone)."
            )
        return hybrid_indicator(view.entropy, view.distance_ratio, self.lam)


@dataclass
class EntropyPolicy(ThresholdPolicy):
    """DeeBERT: exit when the normalised entropy `E < threshold` (docs/method.md eq. 8)."""

    name: ClassVar[str] = "entropy"
    threshold_minimum: ClassVar[float] = 0.0

    def signal(self, view):
        return view.entropy


@dataclass
class MaxProbPolicy(ThresholdPolicy):
    """Exit when the largest class probability `max_k p_k > threshold` (docs/method.md section 3)."""

    name: ClassVar[str] = "max_prob"
    threshold: float | torch.Tensor = 1.0
    exits_below: ClassVar[bool] = False

    def signal(self, view):
        return max_probability(view.logits)


@dataclass
class EnergyPolicy(ThresholdPolicy):
    """COSEE / E-LANG: exit when the normalised energy `sigmoid(-logsumexp(logits)) < threshold` (docs/method.md
    section 3)."""

    name: ClassVar[str] = "energy"
    threshold_minimum: ClassVar[float] = 0.0

    def signal(self, view):
        return normalized_energy(view.logits)


@dataclass
class LearnedPolicy(ThresholdPolicy):
    """BERxiT (docs/method.md section 3.1): exit when the learning-to-exit head's score `> threshold` (needs
    `config.learning_to_exit`)."""

    name: ClassVar[str] = "learned"
    threshold: float | torch.Tensor = 1.0
    exits_below: ClassVar[bool] = False
    needs_exit_scores: ClassVar[bool] = True

    def signal(self, view):
        if view.exit_scores is None:
            raise ValueError("The learned policy needs exit scores: train the model with learning_to_exit=True.")
        return view.exit_scores.float()


@dataclass
class PatiencePolicy(ExitPolicy):
    """PABEE (docs/method.md section 3): exit once the predicted class has stayed the same for `patience` consecutive
    exits (0: at once)."""

    name: ClassVar[str] = "patience"
    sweep: ClassVar[str] = "patience"
    patience: int | torch.Tensor = 2

    def __post_init__(self):
        _check_parameter("patience", self.patience, low=0, integer=True)

    def start(self, batch_size, device):
        return (torch.full((batch_size,), -1, dtype=torch.long, device=device),
                torch.zeros(batch_size, dtype=torch.long, device=device))

    def decide(self, view, state):
        previous, count = state
        prediction = view.logits.argmax(dim=-1)
        count = torch.where(prediction == previous, count + 1, torch.zeros_like(count))  # a change resets it
        return count >= self.patience, (prediction, count)

    def sweep_values(self, views):
        # At the i-th exit (0-based) the count is at most i, so patience len(views) never exits early.
        return [float(value) for value in range(len(views), -1, -1)]


@dataclass
class PatientConfidentPolicy(ExitPolicy):
    """PCEE-BERT (docs/method.md section 3): exit once `patience` consecutive exits each had entropy `E < threshold`."""

    name: ClassVar[str] = "patient_confident"
    threshold: float | torch.Tensor = 0.0
    patience: int | torch.Tensor = 2

    def __post_init__(self):
        _check_parameter("threshold", self.threshold, low=0.0)
        _check_parameter("patience", self.patience, low=1, integer=True)

    def start(self, batch_size, device):
        return torch.zeros(batch_size, dtype=torch.long, device=device)

    def decide(self, view, count):
        confident = view.entropy < self.threshold
        count = torch.where(confident, count + 1, torch.zeros_like(count))
        return count >= self.patience, count

    def sweep_values(self, views):
        if not views:
            return [0.0]
        # The count depends on every exit's entropy, not only on running minima: keep all distinct values.
        return _between(torch.stack([view.entropy for view in views]), 0.0, 1.0).tolist()


@dataclass
class OraclePolicy(ExitPolicy):
    """Exit at the first exit whose prediction is right (else at the top): the upper bound, for analysis only
    (docs/method.md section 3.2)."""

    name: ClassVar[str] = "oracle"
    sweep: ClassVar[None] = None
    needs_labels: ClassVar[bool] = True

    def decide(self, view, state):
        if view.labels is None:
            raise ValueError("The oracle policy needs the gold labels: pass labels=.")
        return view.logits.argmax(dim=-1) == view.labels, state

    def sweep_values(self, views):
        return []


def register_exit_policy(policy_class: type[ExitPolicy]) -> type[ExitPolicy]:
    """Makes `policy_class` available by its `name` (in `predict_early`, calibration and the config).

    Raises:
        TypeError: if it is not an `ExitPolicy` dataclass.
    """
    if not (isinstance(policy_class, type) and issubclass(policy_class, ExitPolicy)
            and dataclasses.is_dataclass(policy_class)):
        raise TypeError(f"{policy_class!r} must be a dataclass subclassing de3_transformers.exit_policies.ExitPolicy.")
    EXIT_POLICIES[policy_class.name] = policy_class
    return policy_class


for _policy in (DE3Policy, EntropyPolicy, MaxProbPolicy, EnergyPolicy, PatiencePolicy, PatientConfidentPolicy,
                LearnedPolicy, OraclePolicy):
    register_exit_policy(_policy)


def get_exit_policy(policy: "str | ExitPolicy", **parameters) -> ExitPolicy:
    """An [`ExitPolicy`] from a registered name and its parameters (those the policy does not have are ignored, so
    one call can pass `threshold`, `lam` and `patience` to any policy); a policy object is returned as it is.

    Raises:
        ValueError: for an unknown name or a parameter out of range.
    """
    if isinstance(policy, ExitPolicy):
        return policy
    if policy not in EXIT_POLICIES:
        raise ValueError(
            f"policy={policy!r} is unknown; choose one of {sorted(EXIT_POLICIES)}, pass an ExitPolicy object, or "
            "register your own with de3_transformers.exit_policies.register_exit_policy."
        )
    policy_class = EXIT_POLICIES[policy]
    names = policy_class.parameter_names()
    return policy_class(**{key: value for key, value in parameters.items() if key in names and value is not None})


def build_exit_policy(
    config,
    policy: "str | ExitPolicy | None" = None,
    threshold: float | None = None,
    lam: float | None = None,
    patience: int | None = None,
) -> ExitPolicy:
    """The policy `predict_early` runs for a model with this config: an `ExitPolicy` as given, or one built by name
    (default `config.early_exit_policy`) with the config's defaults for every parameter not given. The config's
    calibrated threshold applies only to the policy it was calibrated for.

    Raises:
        ValueError: for an unknown name, a parameter out of range, parameters beside a policy object, or a policy
            other than the configured one without its threshold.
        TypeError: for a parameter given as a tensor.
    """
    if isinstance(policy, ExitPolicy):
        if any(value is not None for value in (threshold, lam, patience)):
            raise ValueError("Pass threshold/lam/patience either to predict_early or on the policy object, not both.")
        return policy
    for parameter, value in (("threshold", threshold), ("lam", lam), ("patience", patience)):
        if isinstance(value, torch.Tensor):  # a tensor here would skip the checks (only replays sweep tensors)
            raise TypeError(f"{parameter} must be a Python number, got a tensor; pass {parameter}=float(value).")
    name = config.early_exit_policy if policy is None else policy
    if threshold is None:
        if name == config.early_exit_policy:
            threshold = config.early_exit_threshold
        elif name in EXIT_POLICIES and "threshold" in EXIT_POLICIES[name].parameter_names():
            raise ValueError(
                f"policy={name!r} needs a threshold: this config was calibrated for policy "
                f"{config.early_exit_policy!r}. Pass threshold=, or calibrate with policy={name!r}."
            )
    return get_exit_policy(
        name,
        threshold=threshold,
        lam=config.early_exit_lambda if lam is None else lam,
        patience=config.early_exit_patience if patience is None else patience,
    )


__all__ = [
    "DE3Policy",
    "EXIT_POLICIES",
    "EnergyPolicy",
    "EntropyPolicy",
    "ExitPolicy",
    "ExitView",
    "LearnedPolicy",
    "MaxProbPolicy",
    "OraclePolicy",
    "PatiencePolicy",
    "PatientConfidentPolicy",
    "ThresholdPolicy",
    "build_exit_policy",
    "get_exit_policy",
    "register_exit_policy",
    "select_rows",
]
