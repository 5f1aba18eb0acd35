"""Training objectives (docs/method.md sections 2, 4 and 5), registered by name the way exit policies are.

An objective is everything `config.training_objective` changes: the modules and training state it adds to the model
(`build`), its loss (`loss`), the names of the loss parts it reports (`loss_parts`, fields of
`DE3SequenceClassifierOutput`), the `Trainer` callbacks that keep its state current (`callbacks`) and what a model
card says about it (`card_description`). What every objective shares stays in the model's forward: the exits, DAR
(`dar_alpha`) and the learning-to-exit loss.

Built-in: `de3` (depth-weighted cross-entropy), `cosee` (COSEE's sample weighting and online signal calibration) and
`mpee` (MPEE's joint cross-entropy and ensemble self-distillation). To add one, subclass [`TrainingObjective`] and
register it with [`register_training_objective`]; a config then accepts `training_objective=<its name>`.
"""

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from .losses import COSEEState, ExitEnsembleTeacher, cosee_loss, joint_cross_entropy, self_distillation_loss
from .registry import TRAINING_OBJECTIVES


@dataclass
class ObjectiveLoss:
    """An objective's loss: its classification part, its other terms weighted and summed, and those terms unweighted
    by the output field that reports each."""

    ce_loss: torch.Tensor
    extra_loss: torch.Tensor | float = 0.0
    parts: dict[str, torch.Tensor] = field(default_factory=dict)


class TrainingObjective:
    """What one training objective adds to a DE3 model (subclass it; instances hold no state)."""

    name: ClassVar[str] = "custom"
    loss_parts: ClassVar[tuple[str, ...]] = ()  # output fields reported beside `ce_loss` and `dar_loss`
    card_description: ClassVar[str] = ""

    def build(self, model, config) -> None:
        """Adds the objective's modules and training state to a model being built (nothing by default)."""

    def loss(self, model, exit_logits: torch.Tensor, labels: torch.Tensor,
             layer_weighted_ce: torch.Tensor) -> ObjectiveLoss:
        """The loss of a labelled batch from the logits of every exit `[num_exits, B, K]`; `layer_weighted_ce` is the
        DE3 depth-weighted cross-entropy (docs/method.md eq. 7), computed anyway for the DAR weights."""
        raise NotImplementedError

    def callbacks(self) -> list[TrainerCallback]:
        """`Trainer` callbacks that keep the objective's training state current (`DE3Trainer` adds them)."""
        return []


class DE3Objective(TrainingObjective):
    """DE3-BERT (docs/method.md section 2): cross-entropy at every exit, weighted by depth."""

    name = "de3"
    card_description = (
        "the DE3 objective: cross-entropy at every exit plus distance-aware regularisation (DAR) weighted by DAR "
        "alpha, averaged over exits with weights growing with depth"
    )

    def loss(self, model, exit_logits, labels, layer_weighted_ce):
        return ObjectiveLoss(layer_weighted_ce)


class COSEEObjective(TrainingObjective):
    """COSEE (docs/method.md section 4): each sample's cross-entropy weighted towards the exits it would leave at under
    randomly drawn thresholds, plus `cosee_alpha` times the online signal calibration loss."""

    name = "cosee"
    loss_parts = ("osc_loss",)
    card_description = (
        "COSEE (Consistency-Oriented Signal-based Early Exiting): each sample's cross-entropy weighted towards the "
        "exits it would leave at under randomly drawn thresholds, plus online signal calibration, and DAR weighted by "
        "DAR alpha"
    )

    def build(self, model, config):
        # Not a module: progress and signal range are training state, not weights (COSEECallback keeps them current).
        model.cosee_state = COSEEState()

    def loss(self, model, exit_logits, labels, layer_weighted_ce):
        config, state = model.config, model.cosee_state
        parts = cosee_loss(
            exit_logits, labels, state.thresholds(config.cosee_num_thresholds, exit_logits.device),
            config.exit_layers, state.progress * config.cosee_beta, config.cosee_margin, config.cosee_signal,
        )
        if model.training:  # the range the next epoch draws its thresholds from
            state.observe(parts.signals)
        return ObjectiveLoss(parts.ce_loss, config.cosee_alpha * parts.osc_loss, {"osc_loss": parts.osc_loss})

    def callbacks(self):
        return [COSEECallback()]


class MPEEObjective(TrainingObjective):
    """MPEE (docs/method.md section 5): cross-entropy at every exit, summed, plus weighted ensemble self-distillation.
    Token exit and the exit classifier memory are config options of the model (`token_exit_ratio`, `exit_memory`)."""

    name = "mpee"
    loss_parts = ("kd_loss",)
    card_description = (
        "MPEE (Multi-Perspective Early Exiting): cross-entropy at every exit on the exit classifier memory, plus "
        "weighted ensemble self-distillation, and DAR weighted by DAR alpha; tokens exit as well as layers"
    )

    def build(self, model, config):
        model.exit_teacher = ExitEnsembleTeacher(config.num_labels)

    def loss(self, model, exit_logits, labels, layer_weighted_ce):
        # The teacher reads detached exits: the gradient reaches the backbone through the students only.
        teacher = model.exit_teacher(exit_logits.detach().float())
        kd_loss = self_distillation_loss(exit_logits, teacher, model.config.distillation_temperature)
        return ObjectiveLoss(joint_cross_entropy(exit_logits, labels), kd_loss, {"kd_loss": kd_loss})


class COSEECallback(TrainerCallback, ExportableState):
    """Keeps a COSEE model's training state current (docs/method.md section 4): the progress `t / T` that warms up
    `beta_t`, and at the end of each epoch the exit-signal range the next epoch draws its thresholds from, merged over
    every process under DDP so that all of them draw from the same range.

    The range and this epoch's observations go into every checkpoint (the trainer state's `stateful_callbacks`) and
    come back when training resumes from it, so a resumed run draws the same thresholds as an uninterrupted one.
    """

    def __init__(self):
        self._cosee_state = None  # the model's, from the start of training

    def state(self) -> dict:
        attributes = {} if self._cosee_state is None else {"cosee_state": self._cosee_state.state_dict()}
        return {"args": {}, "attributes": attributes}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._cosee_state = model.cosee_state
        # Restored here rather than by the Trainer, which restores callbacks only with
        # `restore_callback_states_from_checkpoint`: a run resumed without it would silently draw other thresholds.
        saved = (state.stateful_callbacks or {}).get(type(self).__name__, {})
        saved = saved.get("attributes", {}).get("cosee_state") if isinstance(saved, dict) else None
        if saved is not None:
            model.cosee_state.load_state_dict(saved)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        model.cosee_state.progress = state.global_step / max(state.max_steps, 1)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if control.should_save and args.world_size > 1:  # the checkpoint is written from one process
            model.cosee_state.merge_seen(_all_reduce_max, next(model.parameters()).device)

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        model.cosee_state.end_epoch(reduce_max=_all_reduce_max)


def _all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    # As `PrototypeMemory.update` does: the tensor lives on the model's device, the one the process group uses.
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        tensor = tensor.clone()
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def register_training_objective(objective_class: type[TrainingObjective]) -> type[TrainingObjective]:
    """Makes `objective_class` available by its `name` (as `training_objective` of a config).

    Raises:
        TypeError: if it is not a `TrainingObjective` subclass.
    """
    if not (isinstance(objective_class, type) and issubclass(objective_class, TrainingObjective)):
        raise TypeError(f"{objective_class!r} must subclass de3_transformers.objectives.TrainingObjective.")
    TRAINING_OBJECTIVES[objective_class.name] = objective_class
    return objective_class


for _objective in (DE3Objective, COSEEObjective, MPEEObjective):
    register_training_objective(_objective)


def get_training_objective(name: str) -> TrainingObjective:
    """The registered objective called `name`.

    Raises:
        ValueError: for an unknown name.
    """
    if name not in TRAINING_OBJECTIVES:
        raise ValueError(
            f"training_objective={name!r} is unknown; choose one of {sorted(TRAINING_OBJECTIVES)}, or register your "
            "own with de3_transformers.objectives.register_training_objective."
        )
    return TRAINING_OBJECTIVES[name]()


__all__ = [
    "COSEECallback",
    "COSEEObjective",
    "DE3Objective",
    "MPEEObjective",
    "ObjectiveLoss",
    "TrainingObjective",
    "get_training_objective",
    "register_training_objective",
]
