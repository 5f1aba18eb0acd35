"""One ONNX graph for the whole early-exit forward of one text, which leaves without a return to the host: after each
exit the policy's rule decides in the graph, and an ONNX `If` runs the rest of the network only when the text stays.

Why: at batch 1 the chain of per-exit graphs pays ONNX Runtime's cost of a `run` (binding inputs and outputs, waking
the thread pool) at every exit, about a fifth of a MiniLM layer on short texts (benchmarks/results/onnxruntime_cpu.md),
and that ate most of the layer speed-up. Batches of several texts keep the chain, which drops the rows that left; a
graph cannot drop rows without index operations that cost more than they save on small batches.

The graph is composed from the graphs `export_onnx` already wrote (embeddings, exit segments) and a traced rule, so
the layers, heads and signals are the very nodes the chain runs. The policy and its parameters are graph inputs: one
graph serves every policy that needs no labels, with the values of each call.
"""

import io
import warnings
from pathlib import Path

import onnx
import torch
from onnx import TensorProto, helper
from torch import nn


ONE_TEXT_GRAPH = "one_text.onnx"
# How the rule reads each policy: `(signal, sign, counter)`. A threshold policy compares `sign * signal < sign *
# threshold` (negation is exact in float32, so `-p < -t` is `p > t`); `counter` 1 counts the exits whose prediction
# stays the same (patience), 2 those whose entropy is below the threshold (patient_confident), and leaves on the count.
RULE_SIGNALS = ("edr", "entropy", "max_prob", "energy", "scores")
RULE_POLICIES = {"de3": (0, 1, 0), "entropy": (1, 1, 0), "max_prob": (2, -1, 0), "energy": (3, 1, 0),
                 "patience": (1, 1, 1), "patient_confident": (1, 1, 2), "learned": (4, -1, 0)}
_TINY = torch.finfo(torch.float32).tiny


class ExitRule(nn.Module):
    """Every policy's rule for one exit, as `de3_onnx.policies.Policy.leave` computes it on the host (the same float32
    operations in the same order, so both leave on the same texts), the policy read as `RULE_POLICIES` says: `signal`
    picks the signal (`RULE_SIGNALS`), `threshold` comes with its sign applied, and `counter` selects the count of
    the patience policies. `lam_plus_one` is `float32(lam + 1)`, which the host rounds once from float64. Written with
    few nodes: each costs a few microseconds at batch 1, a fair part of a layer on short texts."""

    def forward(self, logits, entropy, energy, max_prob, ratio, scores, previous, count, signal, counter, threshold,
                lam, lam_plus_one, patience):
        denominator = lam * entropy + ratio
        edr = torch.where(denominator == 0, torch.zeros_like(denominator),
                          lam_plus_one * entropy * ratio / denominator.clamp_min(_TINY))
        edr = torch.where(lam == 0, entropy, edr.clamp(0.0, 1.0))
        below = torch.cat([edr, entropy, -max_prob, energy, -scores])[signal] < threshold
        prediction = logits.argmax(dim=-1)
        counts_same = counter == 1  # boolean algebra, not Where: ONNX Runtime has no Where on booleans
        hit = (counts_same & (prediction == previous)) | (~counts_same & below)
        new_count = torch.where(hit, count + 1, torch.zeros_like(count))
        total = logits.sum(dim=-1)
        finite = (total - total) == 0  # NaN or inf give NaN here
        counts = counter > 0
        leave = ((counts & (new_count >= patience)) | (~counts & below)) & finite
        return leave, prediction, new_count


def _rule_graph(opset: int) -> onnx.GraphProto:
    one = torch.zeros(1)
    inputs = {"logits": torch.zeros(1, 2), "entropy": one, "energy": one, "max_prob": one, "ratio": one,
              "scores": one, "previous": torch.zeros(1, dtype=torch.long), "count": torch.zeros(1, dtype=torch.long),
              "signal": torch.tensor(0), "counter": torch.tensor(0), "threshold": torch.tensor(0.5),
              "lam": torch.tensor(1.0), "lam_plus_one": torch.tensor(2.0), "patience": torch.tensor(2)}
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=DeprecationWarning)
        torch.onnx.export(ExitRule(), tuple(inputs.values()), buffer, input_names=list(inputs),
                          output_names=["leave", "prediction", "count_out"], opset_version=opset, dynamo=False,
                          dynamic_axes={"logits": {1: "labels"}})
    return onnx.load_from_string(buffer.getvalue()).graph


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
                         opset: int) -> None:
    """Composes `one_text.onnx` from the embeddings and exit graphs in `folder`.

    Args:
        exit_layers: the layer of each exit.
        names: each exit graph's input and output names. An output `<name>_out` is the next graph's input `<name>`
            and the logits its `carried` ones, as in `de3_onnx.runner`.
    """
    initializers, rule = [], _rule_graph(opset)
    initializers += [helper.make_tensor("previous_0", TensorProto.INT64, [1], [-1]),
                     helper.make_tensor("count_0", TensorProto.INT64, [1], [0])]
    if len(exit_layers) > 1 and not {"distance_ratio", "scores"} <= set(names[0][1]):
        # What the rule reads of a signal this model lacks (no policy that reads it passes build_policy).
        initializers.append(helper.make_tensor("zero_signal", TensorProto.FLOAT, [1], [0.0]))
    nodes = _inline(onnx.load(folder / "embeddings.onnx").graph, "embeddings/",
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
        rule_wiring |= {name: name for name in ("signal", "counter", "threshold", "lam", "lam_plus_one", "patience")}
        steps += _inline(rule, f"rule_{index}/", rule_wiring, initializers)
        # Each branch holds the weights it runs: ONNX Runtime folds and fuses a subgraph's nodes only with its own
        # initializers, not with those of the graph around it (which left the graph 1.8x slower at full depth).
        stay_initializers = []
        stay_nodes, stay_outputs = level(index + 1, following, f"rule_{index}/prediction", f"rule_{index}/count_out",
                                         stay_initializers)
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
    inputs += [helper.make_tensor_value_info(name, TensorProto.INT64, []) for name in ("signal", "counter", "patience")]
    inputs += [helper.make_tensor_value_info(name, TensorProto.FLOAT, []) for name in ("threshold", "lam",
                                                                                     "lam_plus_one")]
    graph = helper.make_graph(nodes, "de3_one_text", inputs, results, initializer=initializers)
    embeddings_model = onnx.load(folder / "embeddings.onnx", load_external_data=False)
    model = helper.make_model(graph, opset_imports=list(embeddings_model.opset_import),
                              producer_name="de3_transformers")
    onnx.save(model, folder / ONE_TEXT_GRAPH)


__all__ = ["ONE_TEXT_GRAPH", "RULE_POLICIES", "RULE_SIGNALS", "ExitRule", "write_one_text_graph"]
