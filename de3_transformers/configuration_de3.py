"""Configurations of the DE3 early-exit classifiers (docs/method.md sections 1-5).

The config only declares and validates: each concern has one `validate_*` method, which `@strict` runs after
`__init__` and again in `save_pretrained`, so an invalid config is never written. No torch here: a checkpoint's config
loads alone (`trust_remote_code`), and the choices it checks names against are plain tuples (`registry` for policies
and objectives).
"""

import math
import numbers
from dataclasses import dataclass

from huggingface_hub.dataclasses import strict
from transformers import BertConfig, RobertaConfig

from .registry import exit_policy_names, training_objective_names


DISTANCES = ("cosine", "euclidean")
DAR_TYPES = ("center", "alienation", "combined")
EXIT_POOLINGS = ("first", "mean")
# The exit signals COSEE can train with; `losses.COSEE_SIGNALS` maps each to its formula.
COSEE_SIGNAL_NAMES = ("energy", "entropy", "max_prob")
# The pipeline tasks this code serves from `transformers`' own registry (`pipeline_de3.register_pipeline` adds to it
# when the package is imported; it stays empty in a checkpoint's copy of this file, run as remote code).
PIPELINE_TASKS_SERVED: set[str] = set()


@dataclass(kw_only=True)
class DE3ConfigMixin:
    r"""
    The DE3 fields shared by [`DE3BertConfig`] and [`DE3RobertaConfig`]. Every field of the backbone config
    (`BertConfig`, `RobertaConfig`) is accepted as well.

    Args:
        exit_layers (`list[int]`, *optional*):
            The encoder layers (counted 1..`num_hidden_layers`) that carry an exit, strictly increasing and ending
            with the last layer, which always answers. Defaults to every layer.
        exit_pooling (`str`, *optional*, defaults to `"first"`):
            What the shared pooler (dense + tanh) of every exit reads: `"first"`, the first token as BERT's own
            pooler (docs/method.md section 1), or `"mean"`, the mean of the attended tokens. `"mean"` is for backbones
            trained with mean pooling, such as sentence-transformers checkpoints, whose first token carries little
            sentence information in early layers.
        proto_dim (`int`, *optional*):
            Output size of the prototypical networks `g_m`. Defaults to `hidden_size`.
        prototype_momentum (`float`, *optional*, defaults to 0.5):
            `gamma` of the sliding-average prototype update (docs/method.md eq. 1), in (0, 1].
        distance (`str`, *optional*, defaults to `"cosine"`):
            `"cosine"` (`1 - cos`) or `"euclidean"`; used by both the DAR loss and the exit signal.
        dar_type (`str`, *optional*, defaults to `"center"`):
            Distance-aware regularisation: `"center"` (eq. 2), `"alienation"` (eq. 3) or `"combined"` (eq. 4).
        dar_alpha (`float`, *optional*, defaults to 0.01):
            `alpha` of eq. 5, the weight of DAR beside cross-entropy (paper grid: 1e-4 .. 1e-1).
        dar_beta (`float`, *optional*, defaults to 1.0):
            `beta` of eq. 4, the weight of the alienation term in the combined DAR.
        early_exit_threshold (`float`, *optional*, defaults to 0.2):
            Default `threshold` of `predict_early`: a sample leaves at the first exit whose EDR is below it.
            0 never exits early; above 1 always exits at the first exit.
        early_exit_lambda (`float`, *optional*, defaults to 1.0):
            Default `lam` of `predict_early` (eq. 11); 0 exits on entropy alone.
        early_exit_policy (`str`, *optional*, defaults to `"de3"`):
            Default `policy` of `predict_early`: a name of `de3_transformers.exit_policies.EXIT_POLICIES`
            (docs/method.md section 3). Calibration stores the policy it calibrated here.
        early_exit_patience (`int`, *optional*, defaults to 2):
            Default `patience` of the `"patience"` (PABEE) and `"patient_confident"` (PCEE-BERT) policies.
        learning_to_exit (`bool`, *optional*, defaults to `False`):
            Adds a BERxiT learning-to-exit head (`Linear(hidden, 1)` + sigmoid) to every exit below the top, trained
            with MSE against whether that exit's prediction is right; the `"learned"` policy reads it.
        training_objective (`str`, *optional*, defaults to `"de3"`):
            The loss of `forward` with labels; `dar_alpha` times DAR is added to each (0 leaves DAR out).
            `"de3"`: depth-weighted cross-entropy at every exit (docs/method.md section 2). `"cosee"`: COSEE's sample
            weighting and online signal calibration (section 4). `"mpee"`: cross-entropy at every exit plus MPEE's
            weighted ensemble self-distillation (section 5); pair it with `token_exit_ratio` and `exit_memory`.
        cosee_signal (`str`, *optional*, defaults to `"energy"`):
            The exit signal COSEE simulates exits with and calibrates: `"energy"` (normalised energy, the paper's
            default), `"entropy"` or `"max_prob"`. Exit with the policy of the same name.
        cosee_num_thresholds (`int`, *optional*, defaults to 5):
            `K`, the thresholds drawn per step from the signal range of the previous epoch.
        cosee_beta (`float`, *optional*, defaults to 10.0):
            `beta_0` of the sample weights `softmax_m(-beta_t |m - m*|)`; `beta_t` grows linearly from 0 over
            training.
        cosee_alpha (`float`, *optional*, defaults to 0.1):
            Weight of the online signal calibration loss.
        cosee_margin (`float`, *optional*, defaults to 0.3):
            `epsilon`, the margin of the calibration hinge.
        token_exit_ratio (`float`, *optional*, defaults to 0.0):
            MPEE's `R_ee`, in [0, 1): after each layer of `token_exit_layers` every sample keeps its first token and
            the `floor(N (1 - R_ee))` of its `N` other tokens with the highest class-attention memory, and fuses the
            rest into one fusion token. 0 keeps every token (no token exit); MPEE uses 0.7.
        token_exit_layers (`list[int]`, *optional*):
            The layers after which tokens exit (1..`num_hidden_layers - 1`). Defaults to the layers at a third and two
            thirds of the depth (4 and 8 of 12, 2 and 4 of 6); the paper does not say which.
        class_attention_momentum (`float`, *optional*, defaults to 0.5):
            MPEE's `beta` of the class-attention memory `A_m = (1 - beta) A_m + beta A_class`, in (0, 1].
        exit_memory (`float`, *optional*, defaults to 1.0):
            MPEE's `lambda` of the exit classifier memory `C_zm = (1 - lambda) C_zm + lambda C_z`, in (0, 1]: each
            exit's logits (and so every exit signal) carry the exits below it. 1 keeps each exit's own logits;
            MPEE uses 0.9.
        distillation_temperature (`float`, *optional*, defaults to 1.0):
            `tau` of MPEE's self-distillation (the paper does not give its value).
    """

    exit_layers: list[int] | tuple[int, ...] | None = None
    exit_pooling: str = "first"
    proto_dim: int | None = None
    prototype_momentum: float | int = 0.5
    distance: str = "cosine"
    dar_type: str = "center"
    dar_alpha: float | int = 0.01
    dar_beta: float | int = 1.0
    early_exit_threshold: float | int = 0.2
    early_exit_lambda: float | int = 1.0
    early_exit_policy: str = "de3"
    early_exit_patience: int = 2
    learning_to_exit: bool = False
    training_objective: str = "de3"
    cosee_signal: str = "energy"
    cosee_num_thresholds: int = 5
    cosee_beta: float | int = 10.0
    cosee_alpha: float | int = 0.1
    cosee_margin: float | int = 0.3
    token_exit_ratio: float | int = 0.0
    token_exit_layers: list[int] | tuple[int, ...] | None = None
    class_attention_momentum: float | int = 0.5
    exit_memory: float | int = 1.0
    distillation_temperature: float | int = 1.0

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.exit_layers is None:
            self.exit_layers = list(range(1, self.num_hidden_layers + 1))
        else:
            self.exit_layers = [int(layer) for layer in self.exit_layers]
        if self.proto_dim is None:
            self.proto_dim = self.hidden_size
        if self.token_exit_layers is None:
            thirds = {round(self.num_hidden_layers / 3), round(2 * self.num_hidden_layers / 3)}
            self.token_exit_layers = sorted(layer for layer in thirds if 1 <= layer < self.num_hidden_layers)
        else:
            self.token_exit_layers = [int(layer) for layer in self.token_exit_layers]
        # `pipeline()` honours a checkpoint's `custom_pipelines` only with `trust_remote_code=True`, even where the code
        # is installed. Tasks the imported package serves itself are dropped on load (saving the model writes them).
        saved_pipelines = getattr(self, "custom_pipelines", None)
        if saved_pipelines and PIPELINE_TASKS_SERVED:
            self.custom_pipelines = {task: entry for task, entry in saved_pipelines.items()
                                     if task not in PIPELINE_TASKS_SERVED}
            if not self.custom_pipelines:
                del self.custom_pipelines
        # `@strict` runs the validators right after this, but reports a failure wrapped in
        # `StrictDataclassClassValidationError`; running the DE3 ones first raises their ValueError itself.
        for name, validator in vars(DE3ConfigMixin).items():
            if name.startswith("validate_"):
                validator(self)

    @property
    def num_exits(self) -> int:
        return len(self.exit_layers)

    @property
    def token_exit(self) -> bool:
        """Whether tokens exit (MPEE): `token_exit_ratio > 0` and some token-exit layer."""
        return self.token_exit_ratio > 0 and bool(self.token_exit_layers)

    # Validators: each raises ValueError naming the field, the value and what is accepted.

    def validate_classification(self) -> None:
        """DE3 models are single-label classifiers with at least two classes."""
        if self.num_labels is None or self.num_labels < 2:
            raise ValueError(
                f"num_labels={self.num_labels}: DE3 is a classification method (its exits compare class "
                "probabilities and class prototypes); use num_labels >= 2. For binary tasks use num_labels=2."
            )
        if self.problem_type not in (None, "single_label_classification"):
            raise ValueError(
                f"problem_type={self.problem_type!r} is not supported: DE3 models are single-label classifiers. "
                "Leave problem_type unset or use 'single_label_classification'."
            )

    def validate_exits(self) -> None:
        """Where the exits sit and what they read (docs/method.md section 1)."""
        layers, depth = self.exit_layers, self.num_hidden_layers
        if (
            not layers
            or any(b <= a for a, b in zip(layers, layers[1:]))
            or layers[0] < 1
            or layers[-1] != depth
        ):
            raise ValueError(
                f"exit_layers={layers} is invalid for num_hidden_layers={depth}: give strictly increasing layer "
                f"numbers in 1..{depth} ending with {depth} (the last layer always answers), or leave it unset "
                "for an exit after every layer."
            )
        if self.exit_pooling not in EXIT_POOLINGS:
            raise ValueError(f"exit_pooling={self.exit_pooling!r} is unknown; choose one of {EXIT_POOLINGS}.")

    def validate_prototypes(self) -> None:
        """The prototypical networks, the prototypes and their distance (docs/method.md section 2)."""
        if self.proto_dim < 1:
            raise ValueError(f"proto_dim={self.proto_dim} must be a positive integer (or unset for hidden_size).")
        if not 0.0 < self.prototype_momentum <= 1.0:
            raise ValueError(f"prototype_momentum={self.prototype_momentum} must lie in (0, 1] (the paper uses 0.5).")
        if self.distance not in DISTANCES:
            raise ValueError(f"distance={self.distance!r} is unknown; choose one of {DISTANCES}.")

    def validate_dar(self) -> None:
        """Distance-aware regularisation (docs/method.md section 2)."""
        if self.dar_type not in DAR_TYPES:
            raise ValueError(f"dar_type={self.dar_type!r} is unknown; choose one of {DAR_TYPES}.")
        for name in ("dar_alpha", "dar_beta"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name}={value} must be a finite number >= 0.")

    def validate_exit_policy(self) -> None:
        """The default exit policy of `predict_early` and its parameters (docs/method.md sections 2 and 3)."""
        check_exit_parameters(self.early_exit_threshold, self.early_exit_lambda)
        if isinstance(self.early_exit_patience, bool) or not isinstance(self.early_exit_patience, int) or (
            self.early_exit_patience < 0
        ):
            raise ValueError(f"early_exit_patience={self.early_exit_patience!r} must be an integer >= 0.")
        if self.early_exit_policy not in exit_policy_names():
            raise ValueError(
                f"early_exit_policy={self.early_exit_policy!r} is unknown; choose one of {exit_policy_names()} "
                "(or register your own with de3_transformers.exit_policies.register_exit_policy)."
            )

    def validate_training_objective(self) -> None:
        """The training objective and COSEE's fields (docs/method.md section 4)."""
        if self.training_objective not in training_objective_names():
            raise ValueError(
                f"training_objective={self.training_objective!r} is unknown; choose one of "
                f"{training_objective_names()}."
            )
        if self.cosee_signal not in COSEE_SIGNAL_NAMES:
            raise ValueError(
                f"cosee_signal={self.cosee_signal!r} is unknown; choose one of {list(COSEE_SIGNAL_NAMES)}."
            )
        check_number("cosee_num_thresholds", self.cosee_num_thresholds, low=1, integer=True)
        for name in ("cosee_beta", "cosee_alpha", "cosee_margin"):
            check_number(name, getattr(self, name), low=0.0)

    def validate_token_exit(self) -> None:
        """MPEE's token exit, exit classifier memory and self-distillation (docs/method.md section 5)."""
        check_number("distillation_temperature", self.distillation_temperature, low=0.0)
        if not self.distillation_temperature > 0:
            raise ValueError("distillation_temperature=0 is out of range: it must be > 0 (the paper's tau).")
        check_number("token_exit_ratio", self.token_exit_ratio, low=0.0)
        if self.token_exit_ratio >= 1:
            raise ValueError(
                f"token_exit_ratio={self.token_exit_ratio} must lie in [0, 1): it is the share of tokens that exit at "
                "each token-exit layer (MPEE uses 0.7; 0 keeps every token)."
            )
        layers, depth = self.token_exit_layers, self.num_hidden_layers
        if any(b <= a for a, b in zip(layers, layers[1:])) or any(not 1 <= layer < depth for layer in layers):
            raise ValueError(
                f"token_exit_layers={layers} is invalid: give strictly increasing layers in 1..{depth - 1} (tokens "
                "exit after them), or leave it unset."
            )
        for name in ("class_attention_momentum", "exit_memory"):
            value = getattr(self, name)
            check_number(name, value, low=0.0)
            if not 0 < value <= 1:
                raise ValueError(f"{name}={value} must lie in (0, 1] (MPEE uses 0.5 for beta, 0.9 for lambda).")


def check_number(name: str, value, low: float | None = None, integer: bool = False, hint: str = "") -> None:
    """Checks that an exit parameter is a finite real number (not a bool), at least `low`, and integral if asked
    (an integral float such as 3.0 counts).

    Raises:
        ValueError: naming the parameter, its value and the accepted range (plus `hint`).
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or (
        low is not None and value < low
    ) or (integer and value != int(value)):
        wanted = "an integer" if integer else "a finite number"
        bound = "" if low is None else f" >= {low:g}"
        raise ValueError(f"{name}={value!r} is out of range: it must be {wanted}{bound}{hint}.")


# Beyond this the EDR is the distance ratio to float32 precision; far beyond it, float32 overflows and nothing exits.
MAX_LAMBDA = 1e6


def check_exit_parameters(threshold: float, lam: float) -> None:
    """Checks an exit threshold and the EDR lambda.

    Raises:
        ValueError: if either is not a finite number >= 0 (NaN included), or `lam` exceeds `MAX_LAMBDA`.
    """
    for name, value in (("threshold", threshold), ("lam", lam)):
        check_number(name, value, low=0.0, hint=(
            " (threshold 0 never exits early, a threshold above 1 always exits at the first exit; "
            "lam 0 exits on entropy alone, the paper searches lam in [0, 10])"))
    if lam > MAX_LAMBDA:
        raise ValueError(
            f"lam={lam!r} is out of range: it must be at most {MAX_LAMBDA:g}. Beyond that the EDR is the distance "
            "ratio alone to float32 precision, and past 3e38 the score overflows and no sample ever exits; use "
            f"lam={MAX_LAMBDA:g} for the distance ratio alone (the paper searches lam in [0, 10])."
        )


@strict
class DE3BertConfig(DE3ConfigMixin, BertConfig):
    r"""
    Configuration of [`DE3BertForSequenceClassification`]: a [`BertConfig`] plus the DE3 fields of
    [`DE3ConfigMixin`].

    Example:

    ```python
    >>> from de3_transformers import DE3BertConfig
    >>> config = DE3BertConfig(num_hidden_layers=4, hidden_size=32, num_attention_heads=2, intermediate_size=64)
    >>> config.exit_layers
    [1, 2, 3, 4]
    ```
    """

    model_type = "de3_bert"


@strict
class DE3RobertaConfig(DE3ConfigMixin, RobertaConfig):
    r"""
    Configuration of [`DE3RobertaForSequenceClassification`]: a [`RobertaConfig`] plus the DE3 fields of
    [`DE3ConfigMixin`].
    """

    model_type = "de3_roberta"


__all__ = [
    "COSEE_SIGNAL_NAMES",
    "DAR_TYPES",
    "DISTANCES",
    "DE3BertConfig",
    "DE3ConfigMixin",
    "DE3RobertaConfig",
    "EXIT_POOLINGS",
    "MAX_LAMBDA",
    "PIPELINE_TASKS_SERVED",
    "check_exit_parameters",
    "check_number",
]
