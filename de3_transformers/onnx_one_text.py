"""One ONNX graph for the whole early-exit forward of one text, which leaves without a return to the host: after each
exit the policy's rule decides in the graph, and an ONNX `If` runs the rest of the network only when the text stays.

Why: at batch 1 the chain of per-exit graphs pays ONNX Runtime's cost of a `run` (binding inputs and outputs, waking
the thread pool) at every exit, about a fifth of a MiniLM layer on short texts (benchmarks/results/onnxruntime_cpu.md),
and that ate most of the layer speed-up. Batches of several texts keep the chain, which drops the rows that left; a
graph cannot drop rows without index operations that cost more than they save on small batches.

The graph is composed from the graphs `export_onnx` already wrote (embeddings, exit segments) and a traced rule, so
the layers, heads and signals are the very nodes the chain runs. It is written for one policy (the model's calibrated
one), with the policy's parameters (threshold, lambda, patience) as graph inputs, so each call may change them; the
signals that policy does not read are pruned. Each branch holds its own weights: ONNX Runtime optimises a subgraph
only with its own initializers.
"""

import io
import warnings
from pathlib import Path

import onnx
import torch
from onnx import TensorProto, helper
from torch import nn


ONE_TEXT_GRAPH = "one_text.onnx"
RULE_POLICIES = ("de3", "entropy", "max_prob", "energy", "patience", "patient_confident", "learned")
_TINY = torch.finfo(torch.float32).tiny


class ExitRule(nn.Module):
    """The rule of one policy (`RULE_POLICIES`) at one exit, as `de3_onnx.policies.Policy.leave` computes it on the
    host: the same float32 operations in the same order, so both leave on the same texts. `lam_plus_one` is
    `float32(lam + 1)`, which the host rounds once from float64. Traced for its policy alone: at batch 1 every node
    costs a few microseconds, a fair part of a layer on short texts, so the graph holds only what the policy reads
    (the signals it does not read are pruned from the exit graphs too)."""

    def __init__(self, policy: str):
        super().__init__()
        self.policy = policy

    def forward(self, logits, entropy, energy, max_prob, ratio, scores, previous, count, threshold, lam, lam_plus_one,
                patience):
        if self.policy == "de3":
            denominator = lam * entropy + ratio
            edr = torch.where(denominator == 0, torch.zeros_like(denominator),
                              lam_plus_one * entropy * ratio / denominator.clamp_min(_TINY))
            leave = torch.where(lam == 0, entropy, edr.clamp(0.0, 1.0)) < threshold
        elif self.policy in ("entropy", "energy"):
            leave = (entropy if self.policy == "entropy" else energy) < threshold
        elif self.policy in ("max_prob", "learned"):
            leave = (max_prob if self.policy == "max_prob" else scores) > threshold
        elif self.policy == "patience":
            prediction = logits.argmax(dim=-1)
            count = torch.where(prediction == previous, count + 1, torch.zeros_like(count))
            leave, previous = count >= patience, prediction
        else:  # patient_confident
            count = torch.where(entropy < threshold, count + 1, torch.zeros_like(count))
            leave = count >= patience
        total = logits.sum(dim=-1)
        return leave & ((total - total) == 0), previous, count  # NaN or inf logits give NaN there: never leave


def _rule_graph(policy: str, opset: int) -> onnx.GraphProto:
    one = torch.zeros(1)
    inputs = {"logits": torch.zeros(1, 2), "entropy": one, "energy": one, "max_prob": one, "ratio": one,
              "scores": one, "previous": torch.zeros(1, dtype=torch.long), "count": torch.zeros(1, dtype=torch.long),
              "threshold": torch.tensor(0.5), "lam": torch.tensor(1.0), "lam_plus_one": torch.tensor(2.0),
              "patience": torch.tensor(2)}
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=UserWarning)  # inputs the policy does not read
        torch.onnx.export(ExitRule(policy), tuple(inputs.values()), buffer, input_names=list(inputs),
                          output_names=["leave", "previous_out", "count_out"], opset_version=opset, dynamo=False,
                          dynamic_axes={"logits": {1: "labels"}})
    return onnx.load_from_string(buffer.getvalue()).graph


def _prune(graph: onnx.GraphProto) -> set[str]:
    """Drops the nodes and initializers of `graph` (and of its branches) that no output needs; returns the names it
    reads from the graphs around it."""
    needed = {output.name for output in graph.output}
    kept = []
    for node in reversed(graph.node):
        if not needed.intersection(node.output):
            continue
        kept.append(node)
        needed.update(name for name in node.input if name)
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                needed |= _prune(attribute.g)
    del graph.node[:]
    graph.node.extend(reversed(kept))
    initializers = [tensor for tensor in graph.initializer if tensor.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    produced = {name for node in graph.node for name in node.output}
    return needed - produced - {tensor.name for tensor in graph.initializer} - {value.name for value in graph.input}


def _inline(graph: onnx.GraphProto, prefix: str, wiring: dict[str, str], initializers: list) -> list:
    """The nodes of `graph` under new value names: `wiring` maps its inputs (and any value) to names outside, every
    other name gets `prefix`. Its initializers join `initializers`, renamed the same way."""
    def rename(name: str) -> str:
        return wiring.get(name, prefix + name) if name else name

    for tensor in graph.initializer:
        renamed = onnx.TensorProto()
        renamed.CopyFrom(tensor)
        renamed.name = rename(tensor.name)
        initializers.append(renamed)
    nodes = []
    for node in graph.node:
        if any(attribute.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
               for attribute in node.attribute):
            raise NotImplementedError(f"Node {node.name} holds a subgraph, which cannot be inlined.")
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.input[:] = [rename(name) for name in node.input]
        copy.output[:] = [rename(name) for name in node.output]
        copy.name = prefix + node.name
        nodes.append(copy)
    return nodes


def write_one_text_graph(folder: Path, exit_layers: list[int], names: list[tuple[list[str], list[str]]],
                         policy: str, opset: int) -> None:
    """Composes `one_text.onnx` for `policy` from the embeddings and exit graphs in `folder`.

    Args:
        exit_layers: the layer of each exit.
        names: each exit graph's input and output names. An output `<name>_out` is the next graph's input `<name>`
            and the logits its `carried` ones, as in `de3_onnx.runner`.
        policy: one of `RULE_POLICIES`, whose parameters are graph inputs.
    """
    initializers, rule = [], _rule_graph(policy, opset)
    initializers += [helper.make_tensor("previous_0", TensorProto.INT64, [1], [-1]),
                     helper.make_tensor("count_0", TensorProto.INT64, [1], [0])]
    if len(exit_layers) > 1 and not {"distance_ratio", "scores"} <= set(names[0][1]):
        # What the rule reads of a signal this model lacks (no policy that reads it passes build_policy).
        initializers.append(helper.make_tensor("zero_signal", TensorProto.FLOAT, [1], [0.0]))
    embeddings = onnx.load(folder / "embeddings.onnx")
    nodes = _inline(embeddings.graph, "embeddings/",
                    {"input_ids": "input_ids", "token_type_ids": "token_type_ids"}, initializers)
    results = [helper.make_tensor_value_info("logits_out", TensorProto.FLOAT, [1, None]),
               helper.make_tensor_value_info("exit_layer", TensorProto.INT64, [1])]

    def level(index: int, running: dict[str, str], previous: str, count: str,
              initializers: list) -> tuple[list, list[str]]:
        """The nodes from exit `index` on, reading the values `running` names, and the names of the logits and exit
        layer they give; the weights of exit `index` join `initializers`, those of later exits go into the branch
        that runs them."""
        prefix = f"exit_{index}/"
        inputs, outputs = names[index]
        steps = _inline(onnx.load(folder / f"exit_{index}.onnx").graph, prefix,
                        {name: running[name] for name in inputs}, initializers)
        layer = helper.make_node("Constant", [], [prefix + "layer"], value=helper.make_tensor(
            prefix + "layer_value", TensorProto.INT64, [1], [exit_layers[index]]))
        if index == len(exit_layers) - 1:
            return steps + [layer], [prefix + "logits", prefix + "layer"]
        produced = {name: prefix + name for name in outputs}
        following = running | {name.removesuffix("_out"): value for name, value in produced.items()
                               if name.endswith("_out")} | {"carried": produced["logits"]}
        rule_wiring = {name: produced.get(name, "zero_signal") for name in ("logits", "entropy", "energy", "max_prob")}
        rule_wiring |= {"ratio": produced.get("distance_ratio", "zero_signal"),
                        "scores": produced.get("scores", "zero_signal"), "previous": previous, "count": count}
        rule_wiring |= {name: name for name in ("threshold", "lam", "lam_plus_one", "patience")}
        steps += _inline(rule, f"rule_{index}/", rule_wiring, initializers)
        # Each branch holds the weights it runs: ONNX Runtime folds and fuses a subgraph's nodes only with its own
        # initializers, not with those of the graph around it (with the weights outside: a quarter slower at full
        # depth).
        stay_initializers = []
        stay_nodes, stay_outputs = level(index + 1, following, f"rule_{index}/previous_out",
                                         f"rule_{index}/count_out", stay_initializers)
        # A branch hands out values of its own: the exit's logits pass through an Identity.
        answer = helper.make_node("Identity", [produced["logits"]], [prefix + "leave_logits"])
        leave_branch = helper.make_graph([answer, layer], f"leave_{index}", [], [
            helper.make_tensor_value_info(prefix + "leave_logits", TensorProto.FLOAT, None),
            helper.make_tensor_value_info(prefix + "layer", TensorProto.INT64, [1])])
        stay_branch = helper.make_graph(stay_nodes, f"stay_{index}", [], [
            helper.make_tensor_value_info(stay_outputs[0], TensorProto.FLOAT, None),
            helper.make_tensor_value_info(stay_outputs[1], TensorProto.INT64, [1])], initializer=stay_initializers)
        outputs = [prefix + "answer_logits", prefix + "answer_layer"]
        steps.append(helper.make_node("If", [f"rule_{index}/leave"], outputs, name=f"exit_{index}/if",
                                      then_branch=leave_branch, else_branch=stay_branch))
        return steps, outputs

    steps, (logits, layer) = level(0, {"hidden": "embeddings/hidden", "attention_mask": "attention_mask"},
                                   "previous_0", "count_0", initializers)
    nodes += steps + [helper.make_node("Identity", [logits], ["logits_out"]),
                      helper.make_node("Identity", [layer], ["exit_layer"])]
    inputs = [helper.make_tensor_value_info(name, TensorProto.INT64, [1, "sequence"])
              for name in ("input_ids", "token_type_ids", "attention_mask")]
    inputs.append(helper.make_tensor_value_info("patience", TensorProto.INT64, []))
    inputs += [helper.make_tensor_value_info(name, TensorProto.FLOAT, []) for name in ("threshold", "lam",
                                                                                     "lam_plus_one")]
    graph = helper.make_graph(nodes, "de3_one_text", inputs, results, initializer=initializers)
    _prune(graph)  # the signals the policy does not read
    model = helper.make_model(graph, opset_imports=list(embeddings.opset_import),
                              producer_name="de3_transformers")
    onnx.save(model, folder / ONE_TEXT_GRAPH)


__all__ = ["ONE_TEXT_GRAPH", "RULE_POLICIES", "ExitRule", "write_one_text_graph"]
