"""Export of a DE3 model for ONNX Runtime: one graph for the embeddings and one per exit (the layers since the previous
exit, the exit head and its exit signals), which `de3_onnx.OnnxEarlyExitClassifier` chains from the host with early
exit and batch compaction between them (no torch there).

Why one graph per exit: ONNX Runtime runs a whole graph on every call (it neither stops early nor skips nodes the
requested outputs do not need, and asks for every graph input), so the only place to leave early without dynamic-shape
index operations inside the graph is between graphs. What the chain costs against the one-graph plain model is
measured in `benchmarks/results/onnxruntime_cpu.md`.
"""

import json
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from .early_exit import encoder_steps
from .onnx_one_text import ONE_TEXT_GRAPH, RULE_POLICIES, write_one_text_graph
from .signals import distance_ratio, max_probability, normalized_energy, normalized_entropy
from .token_exit import running_average


ONNX_CONFIG_NAME = "de3_onnx.json"  # the name `de3_onnx.runner` reads (that package cannot import this torch module)
OPSET = 17
# Additive attention bias of padding tokens: large enough to zero their softmax weight in fp32, small enough to keep
# sums finite (the value `transformers` uses is finfo.min, which overflows when added twice).
MASK_BIAS = -1e9


def _additive_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (1.0 - attention_mask[:, None, None, :].to(dtype)) * MASK_BIAS


class _Embeddings(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.embeddings = model.backbone.embeddings

    def forward(self, input_ids, token_type_ids):
        return self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)


class _ExitSegment(nn.Module):
    """The encoder layers after the previous exit up to exit `exit_index`, then its head. Outputs the hidden states
    for the next segment (not at the top), the exit's logits (averaged with the carried ones under MPEE's classifier
    memory) and, below the top, every exit signal a policy reads, computed here by `signals` itself (so the runner
    only compares them with thresholds): entropy, energy, largest probability, and the distance ratio (when the
    prototypes are set) and learning-to-exit score (with those heads)."""

    def __init__(self, model, exit_index: int, layers: list[nn.Module]):
        super().__init__()
        self.model, self.exit_index, self.layers = model, exit_index, nn.ModuleList(layers)
        self.top = exit_index == model.config.num_exits - 1
        self.carries = exit_index > 0 and model.config.exit_memory != 1
        self.with_ratio = model.prototype_memory.all_initialized

    def forward(self, hidden, attention_mask, carried=None):
        bias = _additive_mask(attention_mask, hidden.dtype)
        for layer in self.layers:
            output = layer(hidden, attention_mask=bias)
            hidden = output[0] if isinstance(output, tuple) else output
        head = self.model.exit_head(self.exit_index, hidden, attention_mask, features=True, scores=True)
        logits = running_average(carried, head.logits, self.model.config.exit_memory)
        if self.top:
            return logits
        outputs = [hidden, logits, normalized_entropy(logits), normalized_energy(logits), max_probability(logits)]
        if self.with_ratio:
            prototypes = self.model.prototype_memory.prototypes[self.exit_index]
            outputs.append(distance_ratio(logits, head.features, prototypes, self.model.config.distance))
        if head.scores is not None:
            outputs.append(head.scores.float())
        return tuple(outputs)

    @property
    def input_names(self) -> list[str]:
        return ["hidden", "attention_mask"] + (["carried"] if self.carries else [])

    @property
    def output_names(self) -> list[str]:
        """The names of what `forward` returns, in its order."""
        if self.top:
            return ["logits"]
        return (["hidden_out", "logits", "entropy", "energy", "max_prob"]
                + (["distance_ratio"] if self.with_ratio else [])
                + (["scores"] if self.model.config.learning_to_exit else []))


def _segments(model) -> list[_ExitSegment]:
    segments, pending = [], []
    for _, layer, exit_index in encoder_steps(model):
        pending.append(layer)
        if exit_index is not None:
            segments.append(_ExitSegment(model, exit_index, pending))
            pending = []
    return segments


def export_onnx(model, save_directory, tokenizer=None, opset: int = OPSET, one_text_graph: bool = True) -> Path:
    """Writes what serving `model` with early exit on ONNX Runtime needs, without torch: the graphs
    (`embeddings.onnx`, `exit_<i>.onnx`; the prototypes are constants of the exit graphs, which compute the distance
    ratio), `one_text.onnx` (the whole early-exit forward of one text, see `onnx_one_text`), `de3_onnx.json` (exit
    layers, exit policy and its calibrated parameters, label names), `config.json` (the model's config), and the
    tokenizer's files when `tokenizer` is given. Batch size and sequence length are dynamic. Load it with
    `de3_onnx.OnnxEarlyExitClassifier(save_directory)`.

    Args:
        model: a DE3 model (fp32; any training objective); exported on CPU in eval mode, then restored.
        save_directory: the folder to write (created).
        tokenizer: the model's tokenizer, saved beside the graphs for classifying texts.
        opset: the ONNX opset.
        one_text_graph: also write `one_text.onnx`, which serves batches of one text in one `run` (faster there, but
            it holds a second copy of the weights on disk and, once a batch of one is served, in memory).

    Returns:
        The folder.

    Raises:
        NotImplementedError: for a model with MPEE token exit (`token_exit_ratio > 0`), whose pruning is not exported.
        ValueError: for a model whose weights are not float32.
        RuntimeError: for prototypes marked set that are not usable (not finite, or zero), as `predict_early`.
    """
    config = model.config
    if config.token_exit:
        raise NotImplementedError(
            "The ONNX export does not cover MPEE token exit (token_exit_ratio > 0) yet: serve this model with "
            "predict_early, or export a copy with config.token_exit_ratio = 0 (its exits then see every token)."
        )
    if model.dtype != torch.float32:
        raise ValueError(f"export_onnx exports float32 weights; this model is {model.dtype}: call model.float() first.")
    if model.prototype_memory.all_initialized:
        model.prototype_memory.require_usable()  # baked into the graphs: a bad prototype must not get that far
    folder = Path(save_directory)
    folder.mkdir(parents=True, exist_ok=True)
    device, training, attention = model.device, model.training, config._attn_implementation
    # Each graph builds an additive mask from `attention_mask`, which the eager attention reads as it is.
    model.set_attn_implementation("eager")
    model.to("cpu").eval()
    try:
        segments = _export_graphs(model, folder, opset)
        if one_text_graph:
            write_one_text_graph(folder, list(config.exit_layers), [segment.carries for segment in segments],
                                 [segment.output_names for segment in segments[:-1]], opset)
    finally:
        model.set_attn_implementation(attention)
        model.to(device).train(training)
    settings = {
        "model_type": config.model_type,
        "num_hidden_layers": config.num_hidden_layers,
        "exit_layers": list(config.exit_layers),
        "num_labels": config.num_labels,
        "id2label": {str(index): name for index, name in config.id2label.items()},
        "exit_memory": config.exit_memory,
        "learning_to_exit": bool(config.learning_to_exit),
        "prototypes_initialized": bool(model.prototype_memory.all_initialized),
        "early_exit_policy": config.early_exit_policy,
        "early_exit_threshold": config.early_exit_threshold,
        "early_exit_lambda": config.early_exit_lambda,
        "early_exit_patience": config.early_exit_patience,
        "pad_token_id": config.pad_token_id,
        "max_sequence_length": model.max_sequence_length,
        "one_text_graph": ONE_TEXT_GRAPH if one_text_graph else None,
        "rule_policies": {name: list(reading) for name, reading in RULE_POLICIES.items()},
    }
    (folder / ONNX_CONFIG_NAME).write_text(json.dumps(settings, indent=2) + "\n")
    config.save_pretrained(folder)  # for the torch side: calibration on the exported graphs reads it
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


@torch.no_grad()
def _export_graphs(model, folder: Path, opset: int) -> list[_ExitSegment]:
    # Two rows of different lengths, so that the traced graph keeps batch and length symbolic.
    input_ids = torch.full((2, 8), model.config.pad_token_id or 0, dtype=torch.long)
    input_ids[:, 0], input_ids[0, 1:7], input_ids[1, 1:4] = 1, 5, 6
    attention_mask = (input_ids != (model.config.pad_token_id or 0)).long()
    token_type_ids = torch.zeros_like(input_ids)
    embeddings = _Embeddings(model)
    _export(embeddings, (input_ids, token_type_ids), folder / "embeddings.onnx", ["input_ids", "token_type_ids"],
            ["hidden"], opset)
    hidden, carried, segments = embeddings(input_ids, token_type_ids), None, _segments(model)
    for segment in segments:
        inputs = (hidden, attention_mask) + ((carried,) if segment.carries else ())
        _export(segment, inputs, folder / f"exit_{segment.exit_index}.onnx", segment.input_names,
                segment.output_names, opset)
        if not segment.top:
            hidden, carried = segment(*inputs)[:2]
    return segments


def _export(module, inputs, path: Path, input_names, output_names, opset: int) -> None:
    # Token-level tensors have a dynamic batch and length; per-sample ones (logits, signals, carried) a dynamic batch.
    token_level = {"input_ids", "token_type_ids", "attention_mask", "hidden", "hidden_out"}
    dynamic = {name: {0: "batch", 1: "sequence"} if name in token_level else {0: "batch"}
               for name in [*input_names, *output_names]}
    # The TorchScript exporter: it keeps the batch and sequence sizes symbolic through these layers as they are. Its
    # deprecation notice and the tracer's note on `F.embedding`'s index check (a constant here) would only alarm.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(module, inputs, os.fspath(path), input_names=input_names, output_names=output_names,
                          dynamic_axes=dynamic, opset_version=opset, dynamo=False)


__all__ = ["ONNX_CONFIG_NAME", "export_onnx"]
