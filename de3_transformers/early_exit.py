"""The encoder loop of a DE3 model, shared by `forward` and `predict_early` (docs/method.md sections 1, 2 and 5).

A [`RunningBatch`] holds what the rows still running need between layers: hidden states, the attention mask in
both forms, MPEE's token-exit state and carried exit logits and, in early exit, which sample each row is. One layer
step ([`run_layer`]) and one exit step ([`run_exit`]) serve both loops, so `forward` and `predict_early` compute
exactly the same thing. [`run_early_exit`] is the compact loop: after every exit the samples that left are removed
from the batch with `RunningBatch.select`, so each sample costs only the layers it used, at any batch size.
"""

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn
from transformers.masking_utils import create_bidirectional_mask

from .exit_policies import ExitPolicy, ExitView
from .input_checks import check_labels
from .modeling_outputs import DE3EarlyExitOutput
from .signals import distance_ratio
from .token_exit import class_attention, prune_tokens, running_average


# Compaction keeps the running batch at a multiple of this many rows (exact below it), padding with rows whose sample
# already left. Fewer distinct tensor shapes keep the CPU allocator from piling up freed blocks of every size
# (benchmarks/results/predict_memory_cpu.md) and suit GPU kernels; it costs at most 7 spare rows per layer.
COMPACTION_MULTIPLE = 8


@dataclass
class TokenExitState:
    """MPEE's token exit (docs/method.md section 5) of the running rows: each token's importance (the paper's
    class-attention memory `A_m`, `None` before the first layer) and whether the last slot is a fusion token."""

    importance: torch.Tensor | None = None
    has_fusion: bool = False


@dataclass
class RunningBatch:
    """The rows running through the encoder, as they stand between two layers.

    `attention_mask` is in the form the attention implementation wants (built once; compaction selects its rows);
    `token_mask` is the 2D mask (1 = attended token; `None` when every token is), which mean pooling and token exit
    read. `carried_logits` are MPEE's exit classifier memory `C_zm`. `samples` (the original sample of each row) and
    `live` (False for a padding row whose sample already left) are set by early exit only.
    """

    hidden: torch.Tensor
    attention_mask: Any
    token_mask: torch.Tensor | None
    token_exit: TokenExitState | None = None
    carried_logits: torch.Tensor | None = None
    samples: torch.Tensor | None = None
    live: torch.Tensor | None = None

    @property
    def num_rows(self) -> int:
        return self.hidden.shape[0]

    def select(self, rows: torch.Tensor) -> "RunningBatch":
        """The batch of the rows `rows` (index tensor), every per-row tensor selected alike."""
        def pick(value):
            return None if value is None else value[rows]

        token_exit = self.token_exit
        if token_exit is not None:
            token_exit = TokenExitState(pick(token_exit.importance), token_exit.has_fusion)
        return dataclasses.replace(
            self, hidden=self.hidden[rows], attention_mask=pick(self.attention_mask), token_mask=pick(self.token_mask),
            token_exit=token_exit, carried_logits=pick(self.carried_logits), samples=pick(self.samples),
            live=pick(self.live),
        )


class ExitOutputs(NamedTuple):
    """What one exit gives: logits `[B, K]`, prototypical features `[B, P]` and learning-to-exit scores `[B]` (the
    last two `None` at the top exit, when not asked for, and scores without learning-to-exit heads)."""

    logits: torch.Tensor
    features: torch.Tensor | None
    scores: torch.Tensor | None


def start_batch(model, input_ids, attention_mask, token_type_ids, position_ids=None,
                inputs_embeds=None) -> RunningBatch:
    """The embeddings of the inputs, as the batch the first layer runs on."""
    config = model.config
    hidden = model.backbone.embeddings(
        input_ids=input_ids, token_type_ids=token_type_ids, position_ids=position_ids, inputs_embeds=inputs_embeds
    )
    mask = create_bidirectional_mask(config=config, inputs_embeds=hidden, attention_mask=attention_mask)
    if not config.token_exit:
        return RunningBatch(hidden, mask, attention_mask)
    token_mask = attention_mask if attention_mask is not None else hidden.new_ones(hidden.shape[:2], dtype=torch.long)
    return RunningBatch(hidden, mask, token_mask, TokenExitState())


def encoder_steps(model) -> Iterator[tuple[int, nn.Module, int | None]]:
    """`(layer number 1..M, layer, index of its exit or None)` for every encoder layer, in order."""
    exit_index = {layer: index for index, layer in enumerate(model.config.exit_layers)}
    for layer_number, layer in enumerate(model.backbone.encoder.layer, start=1):
        yield layer_number, layer, exit_index.get(layer_number)


def _layer_output(layer: nn.Module, hidden: torch.Tensor, mask) -> torch.Tensor:
    output = layer(hidden, attention_mask=mask)
    return output[0] if isinstance(output, tuple) else output


def run_layer(config, layer_number: int, layer: nn.Module, batch: RunningBatch,
              build_mask: Callable[[torch.Tensor, torch.dtype], Any] | None = None) -> None:
    """Runs one encoder layer on `batch` in place. Under MPEE's token exit also: the class attention of the layer's
    input, the token importance, and after a token-exit layer the pruning, which shortens the sequence and rebuilds the
    attention mask: with `build_mask(token_mask, dtype)` when given (the ONNX export's additive mask), else as
    `start_batch` builds it for the attention implementation."""
    tokens = batch.token_exit
    if tokens is None or layer_number > config.token_exit_layers[-1]:  # no token exit ahead: importance is not needed
        batch.hidden = _layer_output(layer, batch.hidden, batch.attention_mask)
        return
    attention = class_attention(layer.attention.self, batch.hidden, batch.token_mask)
    batch.hidden = _layer_output(layer, batch.hidden, batch.attention_mask)
    tokens.importance = running_average(tokens.importance, attention, config.class_attention_momentum)
    if layer_number in config.token_exit_layers:
        pruned = prune_tokens(batch.hidden, batch.token_mask, tokens.importance, attention, config.token_exit_ratio,
                              tokens.has_fusion)
        batch.hidden, batch.token_mask = pruned.hidden, pruned.token_mask
        tokens.importance, tokens.has_fusion = pruned.importance, True
        if build_mask is not None:
            batch.attention_mask = build_mask(batch.token_mask, batch.hidden.dtype)
        else:
            batch.attention_mask = create_bidirectional_mask(config=config, inputs_embeds=batch.hidden,
                                                             attention_mask=batch.token_mask)


def run_exit(model, exit_index: int, batch: RunningBatch, features: bool = True, scores: bool = True) -> ExitOutputs:
    """The outputs of exit `exit_index` on `batch`; its logits are carried into the next exit (MPEE's exit
    classifier memory, docs/method.md section 5; with `exit_memory=1` each exit keeps its own logits)."""
    outputs = model.exit_head(exit_index, batch.hidden, batch.token_mask, features, scores)
    logits = batch.carried_logits = running_average(batch.carried_logits, outputs.logits, model.config.exit_memory)
    return ExitOutputs(logits, outputs.features, outputs.scores)


def check_policy(model, policy: ExitPolicy, batch_size: int, labels: torch.Tensor | None) -> torch.Tensor | None:
    """Checks that the model and inputs give `policy` what it reads. Returns `labels` as class ids (or `None`).

    Raises:
        RuntimeError: when the policy reads the distance ratio and some prototype is unusable (never initialised,
            not finite, or zero).
        ValueError: for `"learned"` on a model without learning-to-exit heads, a policy that needs labels (the
            oracle) without them, or labels that are not one class id per sample.
    """
    if policy.needs_distance_ratio:
        model.prototype_memory.require_usable()
    if policy.needs_exit_scores and not model.config.learning_to_exit:
        raise ValueError(
            f"policy {policy.name!r} reads learning-to-exit scores, but this model has no learning-to-exit heads; "
            "train it with learning_to_exit=True in its config."
        )
    if policy.needs_labels and labels is None:
        raise ValueError(f"policy {policy.name!r} needs labels=, one class id per sample of the batch.")
    if labels is None:
        return None
    return check_labels(labels.to(model.device), batch_size, model.config.num_labels)


def _compacted_size(num_live: int, current: int) -> int:
    multiple = COMPACTION_MULTIPLE
    return num_live if num_live < multiple else min(current, -(-num_live // multiple) * multiple)


def run_early_exit(model, input_ids, attention_mask, token_type_ids, policy: ExitPolicy,
                   labels: torch.Tensor | None = None) -> DE3EarlyExitOutput:
    """The compact early-exit loop of `predict_early` (inputs and policy already checked, model in eval mode).

    Raises:
        FloatingPointError: when a sample's answer is not finite (its logits at the exit it answered from hold NaN or
            inf); samples never leave on non-finite outputs, so this means the top exit itself is not finite.
        RuntimeError: when the policy reads the distance ratio and some prototype is unusable by the end of the run
            (changed since `check_policy` last checked them, e.g. through `.data`).
    """
    config = model.config
    with_ratio, with_scores = policy.needs_distance_ratio, policy.needs_exit_scores
    batch = start_batch(model, input_ids, attention_mask, token_type_ids)
    size, device = input_ids.shape[0], batch.hidden.device
    batch.samples = torch.arange(size, device=device)
    batch.live = torch.ones(size, dtype=torch.bool, device=device)
    out_logits = batch.hidden.new_empty(size, config.num_labels)
    out_layers = torch.full((size,), config.num_hidden_layers, dtype=torch.long, device=device)
    num_live, state, top_exit = size, policy.start(size, device), config.num_exits - 1

    for layer_number, layer, exit_index in encoder_steps(model):
        run_layer(config, layer_number, layer, batch)
        if exit_index is None:
            continue
        logits, features, scores = run_exit(model, exit_index, batch, with_ratio, with_scores)
        if exit_index == top_exit:
            rows = batch.live.nonzero().flatten() if num_live < batch.num_rows else slice(None)
            out_logits[batch.samples[rows]] = logits[rows].to(out_logits.dtype)
            out_layers[batch.samples[rows]] = layer_number
            break
        ratio = None
        if with_ratio:
            prototypes = model.prototype_memory.prototypes[exit_index]
            ratio = distance_ratio(logits, features, prototypes, config.distance)
        view = ExitView(exit_index, layer_number, logits, distance_ratio=ratio, exit_scores=scores,
                        labels=None if labels is None else labels[batch.samples])
        leave, state = policy.leave(view, state)
        leave = leave & batch.live
        leaving = leave.nonzero().flatten()  # the one host synchronisation per exit
        if leaving.numel() == 0:
            continue
        out_logits[batch.samples[leaving]] = logits[leaving].to(out_logits.dtype)
        out_layers[batch.samples[leaving]] = layer_number
        num_live -= leaving.numel()
        if num_live == 0:
            break
        batch.live = batch.live & ~leave
        compacted = _compacted_size(num_live, batch.num_rows)
        if compacted < batch.num_rows:
            # The live rows first (a stable sort keeps their order), then padding rows up to `compacted`; index ops
            # on the device, no second synchronisation.
            rows = torch.argsort((~batch.live).to(torch.uint8), stable=True)[:compacted]
            batch, state = batch.select(rows), policy.select(state, rows)

    # The one host synchronisation after the loop serves the speed-up, the check of the answers and, for policies
    # that read the distance ratio, a fresh check of the prototypes: `check_policy`'s is remembered across calls and
    # cannot see a change made through `.data`, which would otherwise change the answers silently.
    not_finite = ~torch.isfinite(out_logits.sum(dim=-1))
    checks = [out_layers.sum(), not_finite.sum()]
    if with_ratio:
        checks.append(model.prototype_memory.unusable_count().to(out_layers.device))
    layer_total, num_not_finite, *num_unusable = torch.stack(checks).tolist()
    if num_unusable and num_unusable[0]:
        model.prototype_memory.require_usable(recheck=True)
    if num_not_finite:
        _raise_not_finite(not_finite, out_layers)
    speedup = config.num_hidden_layers * size / layer_total  # docs/method.md eq. 12, as `simulation.layer_speedup`
    return DE3EarlyExitOutput(logits=out_logits, sample_exit_layers=out_layers, speedup=speedup)


def _raise_not_finite(not_finite: torch.Tensor, exit_layers: torch.Tensor):
    samples = not_finite.nonzero().flatten().tolist()
    layers = sorted(set(exit_layers[not_finite].tolist()))
    raise FloatingPointError(
        f"The logits of samples {samples[:8]}{' ...' if len(samples) > 8 else ''} are not finite (NaN or inf) at "
        f"exit layer(s) {layers}, where they had to answer (no earlier exit was finite and confident). The model's "
        "weights hold NaN or inf, from a diverged training run or an fp16 overflow: check torch.isfinite on the "
        "weights of that exit and of the backbone, and retrain with a smaller learning rate or bf16/fp32."
    )


__all__ = [
    "COMPACTION_MULTIPLE",
    "ExitOutputs",
    "RunningBatch",
    "TokenExitState",
    "check_policy",
    "encoder_steps",
    "run_early_exit",
    "run_exit",
    "run_layer",
    "start_batch",
]
