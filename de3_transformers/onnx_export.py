"""Export of a DE3 model for ONNX Runtime: one graph for the embeddings and one per exit (the layers since the previous
exit, the exit head and its exit signals), which `de3_onnx.OnnxEarlyExitClassifier` chains from the host with early
exit and batch compaction between them (no torch there). Under MPEE's token exit each exit graph also passes on the
token mask and token importance of the pruned sequence (`early_exit.run_layer` runs inside the graphs).

Why one graph per exit: ONNX Runtime runs a whole graph on every call (it neither stops early nor skips nodes the
requested outputs do not need, and asks for every graph input), so the only place to leave early without dynamic-shape
index operations inside the graph is between graphs. A batch of one has nothing to compact, so for it the same graphs
are also joined into one (`onnx_one_text`), which leaves through ONNX `If`s. What both cost against the one-graph plain
model is measured in `benchmarks/results/onnxruntime_cpu.md`.
"""

import json
import os
import re
import secrets
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from .configuration_de3 import MAX_LAMBDA
from .early_exit import RunningBatch, TokenExitState, encoder_steps, run_layer
from .extras import require
from .signals import distance_ratio, max_probability, normalized_energy, normalized_entropy
from .token_exit import running_average


ONNX_CONFIG_NAME = "de3_onnx.json"  # the name `de3_onnx.runner` reads (that package cannot import this torch module)
EXPORT_ID_KEY = "de3_export_id"  # the graphs' metadata key `de3_onnx.export_files` reads
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
    prototypes are set) and learning-to-exit score (with those heads).

    Under MPEE's token exit the layers run as in `predict_early` (`early_exit.run_layer`): `attention_mask` is then the
    token mask of the sequence as the previous segment left it, and the segment also takes the token importance (when
    a layer before it computed one and a token exit is still ahead) and gives the pruned token mask (after a token-exit
    layer) and the importance (for a token exit ahead). Whether the last slot is a fusion token is known here from the
    layer numbers."""

    def __init__(self, model, exit_index: int, steps: list[tuple[int, nn.Module]]):
        super().__init__()
        self.model, self.exit_index = model, exit_index
        self.layer_numbers, self.layers = [number for number, _ in steps], nn.ModuleList(layer for _, layer in steps)
        config = model.config
        self.top = exit_index == config.num_exits - 1
        self.carries = exit_index > 0 and config.exit_memory != 1
        self.with_ratio = model.prototype_memory.all_initialized
        first, last = self.layer_numbers[0], self.layer_numbers[-1]
        token_exits = config.token_exit_layers if config.token_exit else []
        # `run_layer` updates the importance up to the last token-exit layer only, and it starts at layer 1.
        self.takes_importance = bool(token_exits) and 1 < first <= token_exits[-1]
        self.gives_importance = not self.top and bool(token_exits) and last < token_exits[-1]
        self.prunes = any(first <= layer <= last for layer in token_exits)
        self.starts_fused = any(layer < first for layer in token_exits)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor, *state: torch.Tensor):
        """`state`: the inputs named after the first two in `input_names` (importance, carried logits), in order."""
        config, state = self.model.config, dict(zip(self.input_names[2:], state))
        tokens = TokenExitState(state.get("importance"), self.starts_fused) if config.token_exit else None
        batch = RunningBatch(hidden, _additive_mask(attention_mask, hidden.dtype), attention_mask, tokens)
        for number, layer in zip(self.layer_numbers, self.layers):
            run_layer(config, number, layer, batch, build_mask=_additive_mask)
        head = self.model.exit_head(self.exit_index, batch.hidden, batch.token_mask, features=True, scores=True)
        logits = running_average(state.get("carried"), head.logits, config.exit_memory)
        if self.top:
            return logits
        outputs = [batch.hidden]
        if self.prunes:
            outputs.append(batch.token_mask)
        if self.gives_importance:
            outputs.append(tokens.importance)
        outputs += [logits, normalized_entropy(logits), normalized_energy(logits), max_probability(logits)]
        if self.with_ratio:
            prototypes = self.model.prototype_memory.prototypes[self.exit_index]
            outputs.append(distance_ratio(logits, head.features, prototypes, config.distance))
        if head.scores is not None:
            outputs.append(head.scores.float())
        return tuple(outputs)

    @property
    def input_names(self) -> list[str]:
        return (["hidden", "attention_mask"] + (["importance"] if self.takes_importance else [])
                + (["carried"] if self.carries else []))

    @property
    def output_names(self) -> list[str]:
        """The names of what `forward` returns, in its order; `<name>_out` is the next segment's input `<name>`."""
        if self.top:
            return ["logits"]
        return (["hidden_out"] + (["attention_mask_out"] if self.prunes else [])
                + (["importance_out"] if self.gives_importance else [])
                + ["logits", "entropy", "energy", "max_prob"]
                + (["distance_ratio"] if self.with_ratio else [])
                + (["scores"] if self.model.config.learning_to_exit else []))


def _segments(model) -> list[_ExitSegment]:
    segments, pending = [], []
    for layer_number, layer, exit_index in encoder_steps(model):
        pending.append((layer_number, layer))
        if exit_index is not None:
            segments.append(_ExitSegment(model, exit_index, pending))
            pending = []
    return segments


def export_onnx(model, save_directory, tokenizer=None, opset: int = OPSET, one_text_graph: bool = True) -> Path:
    """Writes what serving `model` with early exit on ONNX Runtime needs, without torch: the graphs
    (`embeddings.onnx`, `exit_<i>.onnx`; the prototypes are constants of the exit graphs, which compute the distance
    ratio), `one_text.onnx` (the whole early-exit forward of one text, see `onnx_one_text`), `de3_onnx.json` (exit
    layers, exit policy and its calibrated parameters, label names), `config.json` (the model's config), and the
    tokenizer's files when `tokenizer` is given. Batch size and sequence length are dynamic. Under MPEE's token exit
    the exit graphs prune tokens as `predict_early` does and pass the shortened sequence on. Load it with
    `de3_onnx.OnnxEarlyExitClassifier(save_directory)`.

    The files are written into a temporary folder beside `save_directory` and moved in, `de3_onnx.json` last (a
    previous export's is removed first), holding a manifest: a random export id, also written into every graph's
    metadata, and each file's size. An export interrupted while writing leaves the previous export whole, one
    interrupted while moving files in leaves a folder that does not load (no `de3_onnx.json`): never one mixing two
    models' graphs. The runner checks the manifest at load (`de3_onnx.export_files`).

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
        ImportError: without `onnx` (`pip install "de3-transformers[onnx]"`).
        ValueError: for a model whose weights are not float32.
        RuntimeError: for prototypes marked set that are not usable (not finite, or zero), as `predict_early`.
    """
    require("onnx", extra="onnx", feature="export_onnx")
    if model.dtype != torch.float32:
        raise ValueError(f"export_onnx exports float32 weights; this model is {model.dtype}: call model.float() first.")
    if model.prototype_memory.all_initialized:
        model.prototype_memory.require_usable()  # baked into the graphs: a bad prototype must not get that far
    target = Path(save_directory)
    target.mkdir(parents=True, exist_ok=True)
    # Beside the target, so that moving the files in is a rename on the same file system.
    with tempfile.TemporaryDirectory(prefix=f".{target.name}.export-", dir=target.parent) as temporary:
        folder = Path(temporary)
        _write_export(model, folder, tokenizer, opset, one_text_graph)
        _move_in(folder, target)
    return target


def _write_export(model, folder: Path, tokenizer, opset: int, one_text_graph: bool) -> None:
    """Writes the whole export into `folder` (a fresh temporary one), `de3_onnx.json` with its manifest included."""
    from .onnx_one_text import ONE_TEXT_GRAPH, RULE_POLICIES, write_one_text_graph  # it builds graphs with onnx

    config = model.config
    one_text_graph = one_text_graph and config.early_exit_policy in RULE_POLICIES
    device, training, attention = model.device, model.training, config._attn_implementation
    # Each graph builds an additive mask from `attention_mask`, which the eager attention reads as it is.
    model.set_attn_implementation("eager")
    model.to("cpu").eval()
    try:
        segments = _export_graphs(model, folder, opset)
        if one_text_graph:
            write_one_text_graph(folder, list(config.exit_layers),
                                 [(segment.input_names, segment.output_names) for segment in segments],
                                 config.early_exit_policy, opset)
    finally:
        model.set_attn_implementation(attention)
        model.to(device).train(training)
    export_id = secrets.token_hex(8)
    for path in folder.glob("*.onnx"):
        _stamp(path, export_id)
    config.save_pretrained(folder)  # for the torch side: calibration on the exported graphs reads it
    # Left out of the manifest: calibration saves the config (and its remote code) into the folder again.
    config_files = {path.name for path in folder.iterdir() if path.suffix != ".onnx"}
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
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
        "one_text_policy": config.early_exit_policy if one_text_graph else None,
        # What the runner's input and parameter checks read (`de3_onnx.checks`), as `predict_early` checks them.
        "vocab_size": config.vocab_size,
        "type_vocab_size": config.type_vocab_size,
        "max_lambda": MAX_LAMBDA,
        # The manifest (`de3_onnx.export_files`): the graphs and the tokenizer's files.
        "export_id": export_id,
        "files": {path.name: path.stat().st_size for path in sorted(folder.iterdir())
                  if path.is_file() and path.name not in config_files},
    }
    (folder / ONNX_CONFIG_NAME).write_text(json.dumps(settings, indent=2) + "\n")


def _stamp(path: Path, export_id: str) -> None:
    """Writes the export id into a graph's metadata, where the runner reads it at load."""
    import onnx

    graph = onnx.load(path)
    entry = graph.metadata_props.add()
    entry.key, entry.value = EXPORT_ID_KEY, export_id
    onnx.save(graph, path)


def _move_in(folder: Path, target: Path) -> None:
    """Moves the export written in `folder` into `target`: first removes the old settings (so that the folder does not
    load until the new export is complete) and the old exit graphs (an export with fewer exits must not leave graphs
    behind), then moves every file, `de3_onnx.json` last."""
    (target / ONNX_CONFIG_NAME).unlink(missing_ok=True)
    for path in target.glob("*.onnx"):
        if re.fullmatch(r"exit_\d+\.onnx|embeddings\.onnx|one_text\.onnx", path.name):
            path.unlink()
    for path in sorted(folder.iterdir(), key=lambda path: path.name == ONNX_CONFIG_NAME):
        destination = target / path.name
        if path.is_dir():  # none today; a tokenizer could save a folder
            shutil.rmtree(destination, ignore_errors=True)
        os.replace(path, destination)


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
    # What the next segment reads, carried from one to the next as `de3_onnx.runner` does.
    running = {"hidden": embeddings(input_ids, token_type_ids), "attention_mask": attention_mask}
    segments = _segments(model)
    for segment in segments:
        inputs = tuple(running[name] for name in segment.input_names)
        _export(segment, inputs, folder / f"exit_{segment.exit_index}.onnx", segment.input_names,
                segment.output_names, opset, pruned=segment.prunes)
        if not segment.top:
            outputs = dict(zip(segment.output_names, segment(*inputs)))
            running.update({name.removesuffix("_out"): value for name, value in outputs.items()
                            if name.endswith("_out")})
            running["carried"] = outputs["logits"]
    return segments


def _export(module, inputs, path: Path, input_names, output_names, opset: int, pruned: bool = False) -> None:
    # Token-level tensors have a dynamic batch and length; per-sample ones (logits, signals, carried) a dynamic batch.
    # After a token exit (`pruned`) the token-level outputs have a length of their own.
    token_level = {"input_ids", "token_type_ids", "attention_mask", "hidden", "importance"}

    def axes(name: str) -> dict[int, str]:
        stem = name.removesuffix("_out")
        if stem not in token_level:
            return {0: "batch"}
        return {0: "batch", 1: "pruned_sequence" if pruned and stem != name else "sequence"}

    dynamic = {name: axes(name) for name in [*input_names, *output_names]}
    # The TorchScript exporter: it keeps the batch and sequence sizes symbolic through these layers as they are. Its
    # deprecation notice and the tracer's note on `F.embedding`'s index check (a constant here) would only alarm.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(module, inputs, os.fspath(path), input_names=input_names, output_names=output_names,
                          dynamic_axes=dynamic, opset_version=opset, dynamo=False)


__all__ = ["ONNX_CONFIG_NAME", "export_onnx"]
