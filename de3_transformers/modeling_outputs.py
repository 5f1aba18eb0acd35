"""Outputs of the DE3 models: the forward pass ([`DE3SequenceClassifierOutput`]) and early exit
([`DE3EarlyExitOutput`])."""

import warnings
from dataclasses import dataclass

import torch
from transformers.utils import ModelOutput


@dataclass
class DE3SequenceClassifierOutput(ModelOutput):
    r"""
    Output of a DE3 model's forward pass.

    Args:
        loss (`torch.FloatTensor` of shape `()`, returned when `labels` is given):
            Layer-weighted DE3 loss, `ce_loss + dar_alpha * dar_loss` (docs/method.md eq. 7).
        logits (`torch.FloatTensor` of shape `(batch_size, num_labels)`):
            Logits of the last exit (the ordinary classifier).
        exit_logits (`torch.FloatTensor` of shape `(batch_size, num_exits, num_labels)`):
            Logits of every exit, in `config.exit_layers` order.
        entropy (`torch.FloatTensor` of shape `(batch_size, num_exits - 1)`, with `output_exit_signals=True`):
            Normalised entropy of each exit below the top (eq. 8).
        distance_ratio (`torch.FloatTensor` of shape `(batch_size, num_exits - 1)`, with `output_exit_signals=True`):
            Normalised distance ratio of each exit below the top (eq. 10); `None` while some prototype is
            uninitialised.
        exit_scores (`torch.FloatTensor` of shape `(batch_size, num_exits - 1)`, with `config.learning_to_exit`):
            Learning-to-exit score (BERxiT) of each exit below the top, in [0, 1]: how likely its prediction is right.
        ce_loss (`torch.FloatTensor`, with `labels` and `output_exit_signals=True`):
            Cross-entropy part of `loss`: layer-weighted (`training_objective="de3"`), COSEE's sample-weighted
            (`"cosee"`) or summed over exits (`"mpee"`).
        dar_loss (`torch.FloatTensor`, with `labels` and `output_exit_signals=True`):
            Layer-weighted DAR part of `loss`, before multiplying by `dar_alpha`.
        lte_loss (`torch.FloatTensor`, with `labels`, `output_exit_signals=True` and `config.learning_to_exit`):
            Learning-to-exit MSE, added to `loss` with weight 1.
        osc_loss (`torch.FloatTensor`, with `labels`, `output_exit_signals=True` and `training_objective="cosee"`):
            COSEE's online signal calibration loss, added to `loss` times `cosee_alpha`.
        kd_loss (`torch.FloatTensor`, with `labels`, `output_exit_signals=True` and `training_objective="mpee"`):
            MPEE's self-distillation loss, added to `loss` with weight 1.
        hidden_states (`tuple(torch.FloatTensor)`, with `output_hidden_states=True`):
            Embedding output and the output of every encoder layer.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    exit_logits: torch.FloatTensor | None = None
    entropy: torch.FloatTensor | None = None
    distance_ratio: torch.FloatTensor | None = None
    exit_scores: torch.FloatTensor | None = None
    ce_loss: torch.FloatTensor | None = None
    dar_loss: torch.FloatTensor | None = None
    lte_loss: torch.FloatTensor | None = None
    osc_loss: torch.FloatTensor | None = None
    kd_loss: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class DE3EarlyExitOutput(ModelOutput):
    r"""
    Output of `predict_early`.

    Args:
        logits (`torch.FloatTensor` of shape `(batch_size, num_labels)`):
            Logits of the exit each sample left at.
        sample_exit_layers (`torch.LongTensor` of shape `(batch_size,)`):
            Encoder layer (1..`num_hidden_layers`) each sample left at. (`config.exit_layers` are the layers that
            carry an exit.)
        speedup (`float`):
            Layer speed-up over the batch, `M * N / sum(sample_exit_layers)` (docs/method.md eq. 12).
        threshold (`float`, *optional*):
            From `predict_dataset(..., target_speedup=...)`: the threshold the speed-up budget ended at.
    """

    logits: torch.FloatTensor | None = None
    sample_exit_layers: torch.LongTensor | None = None
    speedup: float | None = None
    threshold: float | None = None

    @property
    def exit_layers(self) -> torch.LongTensor | None:
        """Deprecated alias of `sample_exit_layers` (removed in 0.3)."""
        warnings.warn(
            "DE3EarlyExitOutput.exit_layers is deprecated; use sample_exit_layers (config.exit_layers are the layers "
            "that carry an exit).", FutureWarning, stacklevel=2,
        )
        return self.sample_exit_layers


__all__ = ["DE3EarlyExitOutput", "DE3SequenceClassifierOutput"]
