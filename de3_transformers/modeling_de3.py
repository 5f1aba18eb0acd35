"""DE3 early-exit sequence classifiers for BERT and RoBERTa (METHOD.md sections 1, 2 and 6).

The backbone is reused as it is (`BertModel` / `RobertaModel`, by composition); this module adds an exit after the
chosen encoder layers, one prototypical network per exit below the top, the class prototypes, the DE3 loss and
`predict_early`, which runs layer by layer and drops samples from the batch as they leave.
"""

import dataclasses
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn
from transformers import BertModel, BertPreTrainedModel, RobertaModel, RobertaPreTrainedModel
from transformers import initialization as init
from transformers.masking_utils import create_bidirectional_mask
from transformers.utils import ModelOutput, logging

from .configuration_de3 import DE3BertConfig, DE3RobertaConfig
from .exit_policies import EXIT_POLICIES, ExitPolicy, ExitView, get_exit_policy, layer_speedup
from .losses import (
    COSEEState,
    ExitEnsembleTeacher,
    cosee_loss,
    distance_aware_regularization,
    joint_cross_entropy,
    layer_weighted_loss,
    learning_to_exit_loss,
    self_distillation_loss,
)
from .prototypes import PrototypeMemory
from .signals import distance_ratio, normalized_entropy
from .token_exit import class_attention, prune_tokens, update_memory


logger = logging.get_logger(__name__)


@dataclass
class DE3SequenceClassifierOutput(ModelOutput):
    r"""
    Output of a DE3 model's forward pass.

    Args:
        loss (`torch.FloatTensor` of shape `()`, returned when `labels` is given):
            Layer-weighted DE3 loss, `ce_loss + dar_alpha * dar_loss` (METHOD.md eq. 7).
        logits (`torch.FloatTensor` of shape `(batch_size, num_labels)`):
            Logits of the last exit (the ordinary classifier).
        exit_logits (`torch.FloatTensor` of shape `(num_exits, batch_size, num_labels)`):
            Logits of every exit, in `config.exit_layers` order.
        entropy (`torch.FloatTensor` of shape `(num_exits - 1, batch_size)`, with `output_exit_signals=True`):
            Normalised entropy of each exit below the top (eq. 8).
        distance_ratio (`torch.FloatTensor` of shape `(num_exits - 1, batch_size)`, with `output_exit_signals=True`):
            Normalised distance ratio of each exit below the top (eq. 10); `None` while some prototype is
            uninitialised.
        exit_scores (`torch.FloatTensor` of shape `(num_exits - 1, batch_size)`, with `config.learning_to_exit`):
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
        exit_layers (`torch.LongTensor` of shape `(batch_size,)`):
            Encoder layer (1..`num_hidden_layers`) each sample left at.
        speedup (`float`):
            Layer speed-up over the batch, `M * N / sum(exit_layers)` (METHOD.md eq. 12).
    """

    logits: torch.FloatTensor | None = None
    exit_layers: torch.LongTensor | None = None
    speedup: float | None = None


class DE3ModelMixin:
    """Everything DE3 adds to a backbone `PreTrainedModel`; the concrete classes only build the backbone."""

    # The loss is a mean over the batch; the Trainer must scale it for gradient accumulation itself.
    accepts_loss_kwargs = False

    def _build_exits(self, config) -> None:
        config.validate_de3()  # fields may have been changed after the config was built
        hidden, labels, depth = config.hidden_size, config.num_labels, config.num_exits - 1
        dropout = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(dropout)
        self.exit_classifiers = nn.ModuleList(nn.Linear(hidden, labels) for _ in range(depth))
        self.classifier = nn.Linear(hidden, labels)  # the last exit, named as in `BertForSequenceClassification`
        self.prototype_networks = nn.ModuleList(nn.Linear(hidden, config.proto_dim) for _ in range(depth))
        self.prototype_memory = PrototypeMemory(depth, labels, config.proto_dim)
        if config.learning_to_exit:
            self.exit_scorers = nn.ModuleList(nn.Linear(hidden, 1) for _ in range(depth))
        if config.training_objective == "mpee":
            self.exit_teacher = ExitEnsembleTeacher(labels)
        # Not a module: progress and signal range are training state, not weights (DE3Trainer keeps them current).
        self.cosee_state = COSEEState() if config.training_objective == "cosee" else None

    @property
    def backbone(self) -> nn.Module:
        return getattr(self, self.base_model_prefix)

    @property
    def max_sequence_length(self) -> int:
        """Longest input the position embeddings cover."""
        return self.config.max_position_embeddings

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, PrototypeMemory):
            init.zeros_(module.prototypes)
            init.zeros_(module.initialized)

    # The steps below are shared by `forward` and `predict_early`, so both compute exactly the same thing.

    def _embed(self, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds):
        hidden = self.backbone.embeddings(
            input_ids=input_ids, token_type_ids=token_type_ids, position_ids=position_ids, inputs_embeds=inputs_embeds
        )
        # Built once in the form the attention implementation wants; compaction then only selects its rows.
        mask = create_bidirectional_mask(config=self.config, inputs_embeds=hidden, attention_mask=attention_mask)
        return hidden, mask

    @staticmethod
    def _run_layer(layer: nn.Module, hidden: torch.Tensor, mask) -> torch.Tensor:
        output = layer(hidden, attention_mask=mask)
        return output[0] if isinstance(output, tuple) else output

    def _token_exit_step(self, layer_number: int, layer: nn.Module, hidden, mask, tokens):
        """Runs one layer under MPEE's token exit: the class attention of the layer's input, the layer, the memory
        update and, after a token-exit layer, the pruning. `tokens` is `(token_mask, memory, has_fusion)`.

        Returns `(hidden, mask, tokens)`; the attention mask is rebuilt when the sequence changed.
        """
        config = self.config
        token_mask, memory, has_fusion = tokens
        if layer_number > config.token_exit_layers[-1]:  # no token exit ahead: the memory is not needed any more
            return self._run_layer(layer, hidden, mask), mask, tokens
        attention = class_attention(layer.attention.self, hidden, token_mask)
        hidden = self._run_layer(layer, hidden, mask)
        memory = update_memory(memory, attention, config.class_attention_momentum)
        if layer_number in config.token_exit_layers:
            pruned = prune_tokens(hidden, token_mask, memory, attention, config.token_exit_ratio, has_fusion)
            hidden, token_mask, memory, has_fusion = pruned.hidden, pruned.token_mask, pruned.memory, True
            mask = create_bidirectional_mask(config=config, inputs_embeds=hidden, attention_mask=token_mask)
        return hidden, mask, (token_mask, memory, has_fusion)

    def _start_tokens(self, input_ids, attention_mask, inputs_embeds=None):
        """The token-exit state before the first layer (`None` without token exit)."""
        if not self.config.token_exit:
            return None
        main = input_ids if input_ids is not None else inputs_embeds
        token_mask = attention_mask if attention_mask is not None else main.new_ones(main.shape[:2], dtype=torch.long)
        return token_mask, None, False

    def _pool(self, hidden: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
        """`z^(m)`: the backbone's shared pooler on the first token (METHOD.md section 1), or on the mean of the
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

    def _exit(self, exit_index: int, hidden: torch.Tensor, token_mask, features: bool = True, scores: bool = True):
        """Logits, prototypical features and learning-to-exit scores of one exit (METHOD.md sections 1-3).

        Features and scores are `None` at the last exit, when not asked for, and scores without learning-to-exit
        heads.
        """
        pooled = self._pool(hidden, token_mask)
        if exit_index == self.config.num_exits - 1:
            return self.classifier(self.dropout(pooled)), None, None
        logits = self.exit_classifiers[exit_index](self.dropout(pooled))
        feature = self.prototype_networks[exit_index](pooled) if features else None
        score = None
        if scores and self.config.learning_to_exit:
            # Detached: the head learns to judge the exit without changing what the exit and the backbone learn, so
            # a model trained with it is still the plain joint-CE (or DE3) model for every other policy.
            score = torch.sigmoid(self.exit_scorers[exit_index](pooled.detach())).squeeze(-1)
        return logits, feature, score

    def _check_inputs(self, input_ids, attention_mask, token_type_ids, inputs_embeds=None) -> None:
        named = (("input_ids", input_ids), ("attention_mask", attention_mask), ("token_type_ids", token_type_ids),
                 ("inputs_embeds", inputs_embeds))
        for name, tensor in named:
            if tensor is not None and not isinstance(tensor, torch.Tensor):
                raise TypeError(
                    f"{name} must be a torch.Tensor, got {type(tensor).__name__}; tokenize with return_tensors='pt'."
                )
        main = input_ids if input_ids is not None else inputs_embeds
        if main is None:
            raise ValueError("Pass input_ids (or inputs_embeds to forward).")
        if input_ids is not None and (input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool):
            raise TypeError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}.")
        if main.dim() != (2 if input_ids is not None else 3) or main.shape[0] == 0 or main.shape[1] == 0:
            raise ValueError(
                f"input_ids must be a non-empty [batch_size, sequence_length] tensor, got shape {tuple(main.shape)}."
            )
        if main.shape[1] > self.max_sequence_length:
            raise ValueError(
                f"Sequence length {main.shape[1]} exceeds the {self.max_sequence_length} positions this model has; "
                f"tokenize with truncation=True, max_length={self.max_sequence_length}."
            )
        for name, tensor in named:
            if tensor is None:
                continue
            if name in ("attention_mask", "token_type_ids") and tensor.shape != main.shape[:2]:
                raise ValueError(f"{name} has shape {tuple(tensor.shape)}; it must match input_ids {tuple(main.shape[:2])}.")
            if tensor.device != self.device:
                raise ValueError(
                    f"{name} is on {tensor.device} but the model is on {self.device}; move the inputs with "
                    f"`.to(model.device)` (or the model with `model.to({str(tensor.device)!r})`)."
                )
        if attention_mask is not None and attention_mask.dim() == 2 and not attention_mask.any(dim=-1).all():
            # A row that attends to nothing would come out of attention as NaN.
            empty = (~attention_mask.any(dim=-1)).nonzero().flatten().tolist()
            raise ValueError(f"Rows {empty[:8]} of attention_mask attend to no token; drop them or fix the mask.")
        if input_ids is not None:
            # Checked here because an out-of-range id fails deep in the embedding (on a GPU, as a device assert).
            low, high = (int(value) for value in input_ids.aminmax())
            if low < 0 or high >= self.config.vocab_size:
                raise ValueError(
                    f"input_ids hold token ids in [{low}, {high}] but the vocabulary has {self.config.vocab_size}; "
                    "use the tokenizer that belongs to this model."
                )

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

        With `labels`, returns the DE3 loss (cross-entropy at every exit plus `dar_alpha` times DAR, weighted by
        depth), and in training mode then updates the prototypes with the batch's class means (after the loss is
        computed, so the loss sees the prototypes as they were before this batch).

        Args:
            labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
                Class indices in `[0, num_labels)`.
            output_exit_signals (`bool`, *optional*):
                Also return `entropy`, `distance_ratio` and the loss parts.

        Raises:
            ValueError: for inputs of the wrong shape or device, or labels out of range.
        """
        self._check_inputs(input_ids, attention_mask, token_type_ids, inputs_embeds)
        config = self.config
        return_dict = return_dict if return_dict is not None else config.return_dict
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else config.output_hidden_states
        )
        exit_set = {layer: index for index, layer in enumerate(config.exit_layers)}

        hidden, mask = self._embed(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds)
        tokens = self._start_tokens(input_ids, attention_mask, inputs_embeds)
        token_mask = attention_mask
        all_hidden = [hidden] if output_hidden_states else None
        exit_logits, features, scores = [], [], []
        logit_memory = None
        for layer_number, layer in enumerate(self.backbone.encoder.layer, start=1):
            if tokens is None:
                hidden = self._run_layer(layer, hidden, mask)
            else:  # tokens exit: the sequence gets shorter, so hidden states of later layers are shorter too
                hidden, mask, tokens = self._token_exit_step(layer_number, layer, hidden, mask, tokens)
                token_mask = tokens[0]
            if output_hidden_states:
                all_hidden.append(hidden)
            if layer_number in exit_set:
                logits, feature, score = self._exit(exit_set[layer_number], hidden, token_mask)
                logits = logit_memory = update_memory(logit_memory, logits, config.exit_memory)
                exit_logits.append(logits)
                if feature is not None:
                    features.append(feature)
                if score is not None:
                    scores.append(score)
        exit_logits = torch.stack(exit_logits)
        features = torch.stack(features) if features else exit_logits.new_zeros(0, exit_logits.shape[1], config.proto_dim)
        if config.learning_to_exit:
            scores = torch.stack(scores) if scores else exit_logits.new_zeros(0, exit_logits.shape[1])
        memory = self.prototype_memory

        output = DE3SequenceClassifierOutput(
            logits=exit_logits[-1],
            exit_logits=exit_logits,
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
        )
        if labels is not None:
            labels = labels.view(-1).to(exit_logits.device)
            if labels.numel() != exit_logits.shape[1]:
                raise ValueError(f"Got {labels.numel()} labels for a batch of {exit_logits.shape[1]}; give one per sample.")
            if (
                labels.dtype.is_floating_point
                or labels.dtype == torch.bool
                or ((labels < 0) | (labels >= config.num_labels)).any()
            ):
                raise ValueError(
                    f"labels must be integer class indices in [0, {config.num_labels}); got {labels.tolist()[:8]}"
                    " (first values). Map your labels with config.label2id."
                )
            # Cloned: prototypes and mask are updated in place below, after autograd has saved them for backward.
            prototypes = memory.prototypes.detach().clone()
            dar = distance_aware_regularization(
                features, labels, prototypes, memory.initialized.clone(),
                config.distance, config.dar_type, config.dar_beta,
            )
            parts = layer_weighted_loss(exit_logits, labels, dar, config.exit_layers, config.dar_alpha)
            ce_loss, extra_loss, extra_parts = self._objective_loss(exit_logits, labels, parts.ce_loss)
            output.loss = ce_loss + config.dar_alpha * parts.dar_loss + extra_loss
            if output_exit_signals:
                output.ce_loss, output.dar_loss = ce_loss.detach(), parts.dar_loss.detach()
                for name, value in extra_parts.items():
                    setattr(output, name, value.detach())
            if config.learning_to_exit:
                lte_loss = learning_to_exit_loss(scores, exit_logits.detach(), labels)
                output.loss = output.loss + lte_loss
                if output_exit_signals:
                    output.lte_loss = lte_loss.detach()
        if output_exit_signals:
            with torch.no_grad():
                # Set in field order: `to_tuple` (and so the Trainer's predictions) follows the order of assignment.
                output.entropy = normalized_entropy(exit_logits[:-1])
                if memory.all_initialized:
                    output.distance_ratio = distance_ratio(
                        exit_logits[:-1], features, memory.prototypes, config.distance
                    )
                if config.learning_to_exit:
                    output.exit_scores = scores.detach().float()
        if labels is not None and self.training and features.shape[0] > 0:
            memory.observe(features, labels, config.prototype_momentum)
        return output if return_dict else output.to_tuple()

    def _objective_loss(self, exit_logits, labels, layer_weighted_ce):
        """`(ce_loss, extra_loss, extra_parts)` of `config.training_objective`: its classification loss, the weighted
        sum of its other terms, and those terms unweighted by name (for logging)."""
        config = self.config
        if config.training_objective == "cosee":
            state = self.cosee_state
            parts = cosee_loss(
                exit_logits, labels, state.thresholds(config.cosee_num_thresholds, exit_logits.device),
                config.exit_layers, state.progress * config.cosee_beta, config.cosee_margin, config.cosee_signal,
            )
            if self.training:  # the range the next epoch draws its thresholds from
                state.observe(parts.signals)
            return parts.ce_loss, config.cosee_alpha * parts.osc_loss, {"osc_loss": parts.osc_loss}
        if config.training_objective == "mpee":
            # The teacher reads detached exits: the gradient reaches the backbone through the students only.
            teacher = self.exit_teacher(exit_logits.detach().float())
            kd_loss = self_distillation_loss(exit_logits, teacher, config.distillation_temperature)
            return joint_cross_entropy(exit_logits, labels), kd_loss, {"kd_loss": kd_loss}
        return layer_weighted_ce, 0.0, {}

    def _require_prototypes(self) -> None:
        missing = self.prototype_memory.uninitialized_pairs()
        if missing:
            layers = self.config.exit_layers
            described = ", ".join(f"(layer {layers[m]}, class {k})" for m, k in missing[:6])
            raise RuntimeError(
                f"Prototypes are not initialised for {len(missing)} (exit, class) pairs: {described}"
                f"{', ...' if len(missing) > 6 else ''}. Fine-tune the model first (DE3 training sets them from "
                "labelled batches in train mode: Trainer, or model.train(); model(**batch, labels=labels)), "
                "or exit on entropy alone with lam=0."
            )

    def _exit_policy(self, policy, threshold, lam, patience) -> ExitPolicy:
        """The policy `predict_early` runs: an `ExitPolicy` as given, or one built by name with the config's
        defaults (its calibrated threshold only for the policy it was calibrated for)."""
        config = self.config
        if isinstance(policy, ExitPolicy):
            if any(value is not None for value in (threshold, lam, patience)):
                raise ValueError("Pass threshold/lam/patience either to predict_early or on the policy object, not both.")
            return policy
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
        so each sample costs only the layers it used, at any batch size. Dropout is off while it runs (the model's
        train/eval mode is restored afterwards).

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
            [`DE3EarlyExitOutput`] with `logits`, `exit_layers` and `speedup`.

        Raises:
            ValueError: for an unknown policy, a parameter out of range (negative, infinite or NaN threshold or
                lambda); a policy without its threshold; inputs of the wrong shape or device; a row with no attended
                token; `"learned"` on a model without learning-to-exit heads; `"oracle"` without labels.
            RuntimeError: when the policy reads the distance ratio and some prototype was never initialised.
        """
        policy = self._exit_policy(policy, threshold, lam, patience)
        self._check_inputs(input_ids, attention_mask, token_type_ids)
        if policy.needs_distance_ratio:
            self._require_prototypes()
        if policy.needs_exit_scores and not self.config.learning_to_exit:
            raise ValueError(
                f"policy {policy.name!r} reads learning-to-exit scores, but this model has no learning-to-exit heads; "
                "train it with learning_to_exit=True in its config."
            )
        if policy.needs_labels:
            if labels is None or labels.shape != input_ids.shape[:1]:
                raise ValueError(f"policy {policy.name!r} needs labels=, one class id per sample of the batch.")
            labels = labels.to(input_ids.device)

        if not self.training:  # the usual case; switching modes walks every submodule, twice per call
            return self._predict_early(input_ids, attention_mask, token_type_ids, policy, labels)
        self.eval()
        try:
            return self._predict_early(input_ids, attention_mask, token_type_ids, policy, labels)
        finally:
            self.train()

    # Compaction keeps the running batch at a multiple of this many rows (exact below it), padding with rows whose
    # sample already left. Fewer distinct tensor shapes keep the CPU allocator from piling up freed blocks of every
    # size (benchmarks/results/predict_memory_cpu.md) and suit GPU kernels; it costs at most 7 spare rows per layer.
    _compaction_multiple = 8

    def _compacted_size(self, num_live: int, current: int) -> int:
        multiple = self._compaction_multiple
        return num_live if num_live < multiple else min(current, -(-num_live // multiple) * multiple)

    def _predict_early(self, input_ids, attention_mask, token_type_ids, policy, labels) -> DE3EarlyExitOutput:
        config, memory = self.config, self.prototype_memory
        exit_set = {layer: index for index, layer in enumerate(config.exit_layers)}
        last_exit = config.num_exits - 1
        with_ratio, with_scores = policy.needs_distance_ratio, policy.needs_exit_scores

        hidden, mask = self._embed(input_ids, attention_mask, token_type_ids, None, None)
        batch = input_ids.shape[0]
        out_logits = hidden.new_empty(batch, config.num_labels)
        out_layers = torch.full((batch,), config.num_hidden_layers, dtype=torch.long, device=hidden.device)
        active = torch.arange(batch, device=hidden.device)  # original sample of each running row
        live = torch.ones(batch, dtype=torch.bool, device=hidden.device)  # False: padding row, its sample has left
        num_live = batch
        token_mask = attention_mask  # 2D, for mean pooling; `mask` is the attention implementation's form
        tokens = self._start_tokens(input_ids, attention_mask)
        state = policy.start(batch, hidden.device)
        logit_memory = None

        for layer_number, layer in enumerate(self.backbone.encoder.layer, start=1):
            if tokens is None:
                hidden = self._run_layer(layer, hidden, mask)
            else:
                hidden, mask, tokens = self._token_exit_step(layer_number, layer, hidden, mask, tokens)
                token_mask = tokens[0]
            if layer_number not in exit_set:
                continue
            exit_index = exit_set[layer_number]
            logits, features, scores = self._exit(exit_index, hidden, token_mask, with_ratio, with_scores)
            logits = logit_memory = update_memory(logit_memory, logits, config.exit_memory)
            if exit_index == last_exit:
                rows = live.nonzero().flatten() if num_live < active.numel() else slice(None)
                out_logits[active[rows]] = logits[rows].to(out_logits.dtype)
                out_layers[active[rows]] = layer_number
                break
            ratio = None
            if with_ratio:
                ratio = distance_ratio(logits, features, memory.prototypes[exit_index], config.distance)
            view = ExitView(exit_index, layer_number, logits, distance_ratio=ratio, exit_scores=scores,
                            labels=None if labels is None else labels[active])
            leave, state = policy.decide(view, state)
            leave = leave & live
            leaving = leave.nonzero().flatten()  # the one host synchronisation per exit
            if leaving.numel() == 0:
                continue
            out_logits[active[leaving]] = logits[leaving].to(out_logits.dtype)
            out_layers[active[leaving]] = layer_number
            num_live -= leaving.numel()
            if num_live == 0:
                break
            live = live & ~leave
            size = self._compacted_size(num_live, active.numel())
            if size == active.numel():
                continue
            # The live rows first (a stable sort keeps their order), then padding rows up to `size`; index ops on
            # the device, no second synchronisation.
            rows = torch.argsort((~live).to(torch.uint8), stable=True)[:size]
            active, hidden, live, logit_memory = active[rows], hidden[rows], live[rows], logit_memory[rows]
            state = policy.select(state, rows)
            if mask is not None:
                mask = mask[rows]
            if token_mask is not None:
                token_mask = token_mask[rows]
            if tokens is not None:
                attention_memory = None if tokens[1] is None else tokens[1][rows]
                tokens = (token_mask, attention_memory, tokens[2])

        return DE3EarlyExitOutput(
            logits=out_logits, exit_layers=out_layers, speedup=layer_speedup(out_layers, config.num_hidden_layers)
        )

    def save_pretrained(self, save_directory, *args, push_to_hub: bool = False, **kwargs):
        """`PreTrainedModel.save_pretrained`, made atomic: everything is written to a temporary folder beside
        `save_directory` and then moved in file by file with `os.replace`, weights first, so a crash while saving
        leaves the previous checkpoint in `save_directory` loadable. Other files in the folder (a tokenizer, Trainer
        checkpoints) are kept; stale weight shards of an earlier save are removed.

        Raises:
            OSError: if the folder cannot be written.
        """
        if push_to_hub:  # uploading works on the folder itself: keep the library's own path
            return super().save_pretrained(save_directory, *args, push_to_hub=True, **kwargs)
        target = Path(save_directory)
        target.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.saving-") as staging:
            super().save_pretrained(staging, *args, **kwargs)
            written = sorted(Path(staging).iterdir(), key=lambda path: ".safetensors" not in path.name)
            for stale in target.glob("model*.safetensors*"):
                if not (Path(staging) / stale.name).exists():
                    stale.unlink()
            for path in written:
                os.replace(path, target / path.name)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`, with errors that say what is wrong for a corrupted weights file and for
        a config whose `num_labels` or `exit_layers` do not fit the saved heads and prototypes.

        Raises:
            OSError: if the weights file is corrupted or truncated.
            ValueError: if the config does not fit the saved weights (and `ignore_mismatched_sizes` is not set).
        """
        try:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except SafetensorError as error:
            raise OSError(
                f"The weights of {pretrained_model_name_or_path} are corrupted or truncated ({error}). Save the model "
                "again, or download it again; saving with save_pretrained never leaves a half-written file."
            ) from error
        except RuntimeError as error:
            if "ignore_mismatched_sizes" not in str(error):
                raise
            saved = cls.config_class.from_pretrained(pretrained_model_name_or_path)
            raise ValueError(
                f"The config does not fit the weights saved in {pretrained_model_name_or_path}, which have "
                f"num_labels={saved.num_labels} and exit_layers={saved.exit_layers}. Load the checkpoint with its own "
                "config, or pass ignore_mismatched_sizes=True to start the heads and prototypes that differ afresh."
            ) from error

    @classmethod
    def from_backbone(cls, pretrained_model_name_or_path, num_labels: int = 2, **kwargs):
        """Starts a DE3 model from a plain pretrained backbone checkpoint (e.g. `bert-base-uncased`, MiniLM).

        The backbone weights are loaded; the exit heads, prototypical networks and prototypes are freshly
        initialised, and a warning lists them. Keyword arguments that are config fields (the DE3 options such
        as `dar_alpha`, `exit_layers`, `distance`, or backbone fields such as `hidden_dropout_prob`) go to the
        config; the rest (`dtype`, `attn_implementation`, `local_files_only`, ...) go to `from_pretrained`.

        Raises:
            ValueError: if the checkpoint is not of this class's backbone architecture, or a DE3 option is invalid.
        """
        from transformers import AutoConfig

        config_class = cls.config_class
        config_fields = {field.name for field in dataclasses.fields(config_class)} | {"id2label", "label2id"}
        config_kwargs = {key: kwargs.pop(key) for key in list(kwargs) if key in config_fields}
        loading_keys = ("revision", "cache_dir", "token", "local_files_only", "trust_remote_code", "subfolder")
        backbone_config = AutoConfig.from_pretrained(
            pretrained_model_name_or_path, **{key: kwargs[key] for key in loading_keys if key in kwargs}
        )
        backbone_type = cls.base_model_prefix  # "bert" / "roberta", also the backbone's model_type
        if backbone_config.model_type != backbone_type:
            raise ValueError(
                f"{pretrained_model_name_or_path} is a {backbone_config.model_type!r} checkpoint but {cls.__name__} "
                f"needs a {backbone_type!r} one. To reload a saved DE3 model use from_pretrained."
            )
        values = {
            key: value
            for key, value in backbone_config.to_dict().items()
            if key not in ("model_type", "architectures", "transformers_version", "id2label", "label2id")
        }
        if "id2label" not in config_kwargs:
            values["num_labels"] = num_labels
        config = config_class(**{**values, **config_kwargs})
        model, info = cls.from_pretrained(
            pretrained_model_name_or_path, config=config, output_loading_info=True, **kwargs
        )
        mean_pooled = Path(str(pretrained_model_name_or_path), "1_Pooling", "config.json")
        if config.exit_pooling == "first" and mean_pooled.is_file():
            if json.loads(mean_pooled.read_text()).get("pooling_mode_mean_tokens"):
                logger.warning(
                    f"{pretrained_model_name_or_path} is a sentence-transformers checkpoint trained with mean pooling: "
                    "its first token carries little sentence information in early layers, so shallow exits learn "
                    "slowly. Consider exit_pooling='mean'."
                )
        fresh = sorted({key.split(".")[0] for key in info["missing_keys"]})
        logger.warning(
            f"{cls.__name__}: backbone weights loaded from {pretrained_model_name_or_path}. Freshly initialised, to "
            f"be trained before use: {', '.join(fresh) or 'nothing'} "
            f"({len(info['missing_keys'])} tensors). Prototypes start uninitialised and are set by training batches."
        )
        return model


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

    The exits read RoBERTa's own pooler (dense + tanh on `<s>`), the same head shape as BERT's (METHOD.md section 1).
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
