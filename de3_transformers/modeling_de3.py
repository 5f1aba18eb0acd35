"""DE3 early-exit sequence classifiers for BERT and RoBERTa (docs/method.md sections 1 and 2).

The backbone is reused as it is (`BertModel` / `RobertaModel`, by composition); this module wires what DE3 adds to
it: an exit after each layer of `config.exit_layers`, one prototypical network per exit below the top, the class
prototypes, the modules of the training objective and the learning-to-exit heads. `forward` runs every exit and
computes the loss; `predict_early` lets each sample leave on its own (the loop is `early_exit.run_early_exit`).
Saving and loading live in `checkpoints`, input checks in `input_checks`.
"""

import torch
from torch import nn
from transformers import BertModel, BertPreTrainedModel, RobertaModel, RobertaPreTrainedModel
from transformers import initialization as init

from .checkpoints import DE3CheckpointMixin
from .configuration_de3 import DE3BertConfig, DE3RobertaConfig
from .early_exit import (
    ExitOutputs,
    check_policy,
    encoder_steps,
    run_early_exit,
    run_exit,
    run_layer,
    start_batch,
)
from .exit_policies import ExitPolicy, build_exit_policy
from .input_checks import check_inputs, check_labels
from .losses import distance_aware_regularization, layer_weighted_loss, learning_to_exit_loss
from .modeling_outputs import DE3EarlyExitOutput, DE3SequenceClassifierOutput
from .modes import without_dropout
from .objectives import get_training_objective
from .prototypes import PrototypeMemory
from .signals import distance_ratio, normalized_entropy


class DE3ModelMixin(DE3CheckpointMixin):
    """Everything DE3 adds to a backbone `PreTrainedModel`; the concrete classes only build the backbone."""

    # The loss is a mean over the batch; the Trainer must scale it for gradient accumulation itself.
    accepts_loss_kwargs = False

    def _build_exits(self, config) -> None:
        config.validate()  # fields may have been changed after the config was built
        hidden, labels, depth = config.hidden_size, config.num_labels, config.num_exits - 1
        dropout = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(dropout)
        self.exit_classifiers = nn.ModuleList(nn.Linear(hidden, labels) for _ in range(depth))
        self.classifier = nn.Linear(hidden, labels)  # the last exit, named as in `BertForSequenceClassification`
        self.prototype_networks = nn.ModuleList(nn.Linear(hidden, config.proto_dim) for _ in range(depth))
        self.prototype_memory = PrototypeMemory(depth, labels, config.proto_dim, config.exit_layers[:-1])
        if config.learning_to_exit:
            self.exit_scorers = nn.ModuleList(nn.Linear(hidden, 1) for _ in range(depth))
        self.objective = get_training_objective(config.training_objective)
        self.objective.build(self, config)

    @property
    def backbone(self) -> nn.Module:
        return getattr(self, self.base_model_prefix)

    @property
    def max_sequence_length(self) -> int:
        """Longest input the position embeddings cover."""
        return self.config.max_position_embeddings

    @property
    def loss_part_names(self) -> tuple[str, ...]:
        """The parts of the loss that `forward(..., output_exit_signals=True)` reports with labels."""
        lte = ("lte_loss",) if self.config.learning_to_exit else ()
        return ("ce_loss", "dar_loss", *lte, *self.objective.loss_parts)

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, PrototypeMemory):
            init.zeros_(module.prototypes)
            init.zeros_(module.initialized)
            # A checkpoint saved before the exit layers were recorded: the config's are all there is to go by.
            init.copy_(module.exit_layers, torch.tensor(self.config.exit_layers[:-1], dtype=torch.long))

    def pool(self, hidden: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
        """`z^(m)`: the backbone's shared pooler on the first token (docs/method.md section 1), or on the mean of the
        attended tokens with `exit_pooling="mean"`."""
        pooler = self.backbone.pooler
        if self.config.exit_pooling == "first":
            return pooler(hidden)
        if token_mask is None:
            mean = hidden.mean(dim=1)
        else:
            weights = token_mask.to(hidden.dtype).unsqueeze(-1)
            mean = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1)
        return pooler.activation(pooler.dense(mean))

    def exit_head(self, exit_index: int, hidden: torch.Tensor, token_mask: torch.Tensor | None,
                  features: bool = True, scores: bool = True) -> ExitOutputs:
        """Logits, prototypical features and learning-to-exit scores of one exit on the hidden states after its
        layer (docs/method.md sections 1-3). Features and scores are `None` at the last exit, when not asked for, and
        scores without learning-to-exit heads."""
        pooled = self.pool(hidden, token_mask)
        if exit_index == self.config.num_exits - 1:
            return ExitOutputs(self.classifier(self.dropout(pooled)), None, None)
        logits = self.exit_classifiers[exit_index](self.dropout(pooled))
        feature = self.prototype_networks[exit_index](pooled) if features else None
        score = None
        if scores and self.config.learning_to_exit:
            # Detached: the head learns to judge the exit without changing what the exit and the backbone learn, so
            # a model trained with it is still the plain joint-CE (or DE3) model for every other policy.
            score = torch.sigmoid(self.exit_scorers[exit_index](pooled.detach())).squeeze(-1)
        return ExitOutputs(logits, feature, score)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_exit_signals: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> DE3SequenceClassifierOutput | tuple:
        r"""
        Runs every layer and every exit.

        With `labels`, returns the loss of `config.training_objective` plus `dar_alpha` times DAR (for DE3:
        cross-entropy at every exit plus DAR, weighted by depth), and in training mode then updates the prototypes
        with the batch's class means (after the loss is computed, so the loss sees the prototypes as they were before
        this batch).

        Args:
            labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
                Class indices in `[0, num_labels)`.
            output_exit_signals (`bool`, *optional*):
                Also return `entropy`, `distance_ratio` and the loss parts.

        Raises:
            ValueError: for inputs of the wrong shape or device, labels out of range, or `config.exit_layers` changed
                from the layers the exits were trained at.
            RuntimeError: in eval mode with `output_exit_signals`, when some prototype marked set is unusable (not
                finite, or zero).
        """
        check_inputs(self, input_ids, attention_mask, token_type_ids, inputs_embeds)
        config = self.config
        self.prototype_memory.require_exit_layers(config.exit_layers, config.num_hidden_layers)
        return_dict = return_dict if return_dict is not None else config.return_dict
        if output_hidden_states is None:
            output_hidden_states = config.output_hidden_states

        batch = start_batch(self, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds)
        all_hidden = [batch.hidden] if output_hidden_states else None
        exits = []
        for layer_number, layer, exit_index in encoder_steps(self):
            run_layer(config, layer_number, layer, batch)  # under token exit, later hidden states are shorter
            if output_hidden_states:
                all_hidden.append(batch.hidden)
            if exit_index is not None:
                exits.append(run_exit(self, exit_index, batch))
        exit_logits = torch.stack([outputs.logits for outputs in exits])
        below_top, batch_size = exits[:-1], exit_logits.shape[1]  # the top exit has no features or scores
        features, scores = exit_logits.new_zeros(0, batch_size, config.proto_dim), None
        if config.learning_to_exit:
            scores = exit_logits.new_zeros(0, batch_size)
        if below_top:
            features = torch.stack([outputs.features for outputs in below_top])
            scores = torch.stack([outputs.scores for outputs in below_top]) if config.learning_to_exit else None

        # The losses and signals work exit-first; every per-sample output is batch-first, as `Trainer.predict`,
        # `accelerate`'s gather and the pipelines split outputs along dim 0.
        output = DE3SequenceClassifierOutput(
            logits=exit_logits[-1], exit_logits=exit_logits.transpose(0, 1),
            hidden_states=tuple(all_hidden) if all_hidden else None,
        )
        if labels is not None:
            labels = check_labels(labels.to(exit_logits.device), exit_logits.shape[1], config.num_labels)
            self._add_loss(output, exit_logits, features, scores, labels, output_exit_signals)
        if output_exit_signals:
            with torch.no_grad():
                # Set in field order: `to_tuple` (and so the Trainer's predictions) follows the order of assignment.
                output.entropy = normalized_entropy(exit_logits[:-1]).transpose(0, 1)
                if self.prototype_memory.all_initialized:
                    if not self.training:  # in training they change every step, and an update checks them itself
                        self.prototype_memory.require_usable()
                    output.distance_ratio = distance_ratio(
                        exit_logits[:-1], features, self.prototype_memory.prototypes, config.distance
                    ).transpose(0, 1)
                if config.learning_to_exit:
                    output.exit_scores = scores.detach().float().transpose(0, 1)
        if labels is not None and self.training and features.shape[0] > 0:
            self.prototype_memory.observe(features, labels, config.prototype_momentum)
        return output if return_dict else output.to_tuple()

    def _add_loss(self, output, exit_logits, features, scores, labels, output_exit_signals) -> None:
        """Sets `output.loss`: the objective's loss plus `dar_alpha` times DAR (docs/method.md eq. 7) plus, with
        learning-to-exit heads, their MSE; with `output_exit_signals` also each part, detached. `exit_logits`,
        `features` and `scores` are exit-first, as the losses take them."""
        config, memory = self.config, self.prototype_memory
        # Cloned: prototypes and mask are updated in place after the loss, once autograd has saved them for backward.
        dar = distance_aware_regularization(
            features, labels, memory.prototypes.detach().clone(), memory.initialized.clone(),
            config.distance, config.dar_type, config.dar_beta,
        )
        weighted = layer_weighted_loss(exit_logits, labels, dar, config.exit_layers)
        objective = self.objective.loss(self, exit_logits, labels, weighted.ce_loss)
        parts = {"ce_loss": objective.ce_loss, "dar_loss": weighted.dar_loss, **objective.parts}
        output.loss = objective.ce_loss + config.dar_alpha * weighted.dar_loss + objective.extra_loss
        if config.learning_to_exit:
            parts["lte_loss"] = learning_to_exit_loss(scores, exit_logits.detach(), labels)
            output.loss = output.loss + parts["lte_loss"]
        if output_exit_signals:
            for name, value in parts.items():
                setattr(output, name, value.detach())

    @torch.inference_mode()
    def predict_early(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        threshold: float | None = None,
        lam: float | None = None,
        policy: str | ExitPolicy | None = None,
        patience: int | None = None,
        labels: torch.Tensor | None = None,
    ) -> DE3EarlyExitOutput:
        """Classifies with early exit: each sample leaves at the first exit where the exit policy says so (by default
        DE3: the first exit whose EDR is below `threshold`).

        Runs the encoder layer by layer and removes the samples that left from the batch before the next layer,
        so each sample costs only the layers it used, at any batch size. Dropout is off while it runs, in any mode:
        each module's train/eval mode is restored afterwards, and several threads may call it on one model. No sample
        leaves on an exit whose outputs are not finite.

        Args:
            input_ids: `[batch_size, sequence_length]`, on the model's device.
            attention_mask, token_type_ids: as for `forward`.
            threshold: the policy's threshold; defaults to `config.early_exit_threshold` for the configured policy.
                For DE3: exit when `EDR < threshold`, 0 runs the full model.
            lam: EDR's lambda (eq. 11); defaults to `config.early_exit_lambda`. 0 exits on entropy alone.
            policy: a name of `exit_policies.EXIT_POLICIES` (`"de3"`, `"entropy"`, `"max_prob"`, `"energy"`,
                `"patience"`, `"patient_confident"`, `"learned"`, `"oracle"`) or an `ExitPolicy` object; defaults to
                `config.early_exit_policy`.
            patience: of the `"patience"` and `"patient_confident"` policies; defaults to `config.early_exit_patience`.
            labels: `[batch_size]` gold class ids, only for the `"oracle"` policy.

        Returns:
            [`DE3EarlyExitOutput`] with `logits`, `sample_exit_layers` and `speedup`.

        Raises:
            ValueError: for an unknown policy, a parameter out of range (negative, infinite or NaN threshold or
                lambda); a policy without its threshold; inputs of the wrong shape or device; a row with no attended
                token; `"learned"` on a model without learning-to-exit heads; `"oracle"` without labels;
                `config.exit_layers` changed from the layers the exits were trained at (checked on every call).
            RuntimeError: when the policy reads the distance ratio and some prototype is unusable (never initialised,
                not finite, or zero; checked on every call, at no extra host synchronisation).
            FloatingPointError: when a sample's answer is not finite (NaN or inf weights; no sample ever leaves on a
                non-finite exit, so this is the top exit's answer).
        """
        policy = build_exit_policy(self.config, policy, threshold=threshold, lam=lam, patience=patience)
        check_inputs(self, input_ids, attention_mask, token_type_ids)
        self.prototype_memory.require_exit_layers(self.config.exit_layers, self.config.num_hidden_layers)
        labels = check_policy(self, policy, input_ids.shape[0], labels)
        with without_dropout(self):
            return run_early_exit(self, input_ids, attention_mask, token_type_ids, policy, labels)


class DE3BertForSequenceClassification(DE3ModelMixin, BertPreTrainedModel):
    """BERT with an exit after every layer of `config.exit_layers` and DE3 prototypes ([`DE3BertConfig`])."""

    config_class = DE3BertConfig
    config: DE3BertConfig

    def __init__(self, config: DE3BertConfig):
        super().__init__(config)
        self.bert = BertModel(config, add_pooling_layer=True)
        self._build_exits(config)
        self.post_init()


class DE3RobertaForSequenceClassification(DE3ModelMixin, RobertaPreTrainedModel):
    """RoBERTa with an exit after every layer of `config.exit_layers` and DE3 prototypes ([`DE3RobertaConfig`]).

    The exits read RoBERTa's own pooler (dense + tanh on `<s>`), the same head shape as BERT's (docs/method.md section
    1).
    """

    config_class = DE3RobertaConfig
    config: DE3RobertaConfig

    def __init__(self, config: DE3RobertaConfig):
        super().__init__(config)
        self.roberta = RobertaModel(config, add_pooling_layer=True)
        self._build_exits(config)
        self.post_init()

    @property
    def max_sequence_length(self) -> int:
        # RoBERTa numbers positions from pad_token_id + 1, so that many positions are never used by tokens.
        return self.config.max_position_embeddings - self.config.pad_token_id - 1


__all__ = [
    "DE3BertForSequenceClassification",
    "DE3EarlyExitOutput",
    "DE3ModelMixin",
    "DE3RobertaForSequenceClassification",
    "DE3SequenceClassifierOutput",
]
