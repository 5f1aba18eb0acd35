#!/usr/bin/env python
"""Benchmark (not a test): what one exit costs at batch 1, part by part, with the CPU caches warm and cold.

`predict_early` at batch 1 on short texts spends more per exit than its few small products suggest
(benchmarks/results/latency_cpu.md). This script times each part of an exit step on a MiniLM-size model (random
weights; 6 layers, hidden 384, 25 tokens) twice: back to back (hot caches), and after streaming 64 MB through
the cache, as an encoder layer's weights do between two exits (cold), and the whole DE3 decision (entropy, distance
ratio, EDR, comparison) eager and under `torch.compile` (one fused kernel). It then times `predict_early` at
threshold 0 with exits after every layer and with the top exit only, against the plain model, interleaved.

    python benchmarks/exit_step_cost.py [--out benchmarks/results/exit_step_cost_cpu.md]
"""

import argparse
import statistics
import sys
import time

import torch
import transformers
from transformers import BertConfig, BertForSequenceClassification

from de3_transformers import DE3BertConfig, DE3BertForSequenceClassification
from de3_transformers.benchmarking import hardware, write_report
from de3_transformers.exit_policies import get_exit_policy
from de3_transformers.signals import distance_ratio, hybrid_indicator, normalized_entropy


SHAPE = dict(num_labels=2, hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)


def model_with(exit_layers) -> DE3BertForSequenceClassification:
    torch.manual_seed(0)
    model = DE3BertForSequenceClassification(DE3BertConfig(exit_layers=exit_layers, **SHAPE)).train()
    with torch.no_grad():  # a labelled training-mode forward sets every prototype
        model(input_ids=torch.randint(1000, 2000, (8, 16)), labels=torch.arange(8) % 2)
    return model.eval()


def de3_decision(logits, features, prototypes):
    entropy = normalized_entropy(logits)
    ratio = distance_ratio(logits, features, prototypes, "cosine")
    return hybrid_indicator(entropy, ratio, 1.0) < 0.3


def part_costs(model, rounds: int) -> list[str]:
    flush = torch.randn(16_000_000)  # 64 MB, more than the last-level cache
    hidden = torch.randn(1, 25, SHAPE["hidden_size"])
    prototypes = model.prototype_memory.prototypes[0]

    def median_us(step, cold: bool) -> float:
        times = []
        for _ in range(rounds):
            if cold:
                flush.mul_(1.0)
            started = time.perf_counter()
            step()
            times.append(time.perf_counter() - started)
        return 1e6 * statistics.median(times)

    with torch.inference_mode():
        pooled = model.pool(hidden, None)
        logits, features, _ = model.exit_head(0, hidden, None)
        entropy = normalized_entropy(logits)
        ratio = distance_ratio(logits, features, prototypes, "cosine")
        parts = {
            "pooler (dense + tanh on the first token)": lambda: model.pool(hidden, None),
            "exit classifier": lambda: model.exit_classifiers[0](pooled),
            "prototypical network": lambda: model.prototype_networks[0](pooled),
            "distance ratio (cosine, top-2)": lambda: distance_ratio(logits, features, prototypes, "cosine"),
            "normalised entropy": lambda: normalized_entropy(logits),
            "EDR": lambda: hybrid_indicator(entropy, ratio, 1.0),
            "decision sync (`nonzero`)": lambda: (ratio < 0).nonzero(),
        }
        compiled = torch.compile(de3_decision, dynamic=True)
        compiled(logits, features, prototypes)  # compiles (tens of seconds), outside the timing
        parts["whole DE3 decision, eager"] = lambda: de3_decision(logits, features, prototypes)
        parts["whole DE3 decision, `torch.compile`"] = lambda: compiled(logits, features, prototypes)
        lines = ["| part of one exit | hot (us) | cold (us) |", "|---|---|---|"]
        for name, step in parts.items():
            lines.append(f"| {name} | {median_us(step, False):.1f} | {median_us(step, True):.1f} |")
    return lines


def in_context(rounds: int) -> list[str]:
    every, top = model_with([1, 2, 3, 4, 5, 6]), model_with([6])
    top.bert.load_state_dict(every.bert.state_dict())
    plain = BertForSequenceClassification(BertConfig(**SHAPE)).eval()
    plain.bert.load_state_dict(every.bert.state_dict())
    ids = torch.randint(1000, 2000, (1, 25))
    mask = torch.ones_like(ids)
    de3, entropy = get_exit_policy("de3", threshold=0.0, lam=1.0), get_exit_policy("entropy", threshold=0.0)
    runs = {
        "plain BertForSequenceClassification": lambda: plain(input_ids=ids, attention_mask=mask),
        "predict_early, top exit only": lambda: top.predict_early(ids, mask, policy=entropy),
        "predict_early, 6 exits, entropy policy": lambda: every.predict_early(ids, mask, policy=entropy),
        "predict_early, 6 exits, DE3 policy": lambda: every.predict_early(ids, mask, policy=de3),
    }
    times = {name: [] for name in runs}
    with torch.inference_mode():
        for round_index in range(rounds + 2):  # two warm-up rounds; the runs take turns within a round
            for name, run in runs.items():
                started = time.perf_counter()
                for _ in range(40):
                    run()
                if round_index >= 2:
                    times[name].append((time.perf_counter() - started) / 40)
    plain_ms = 1e3 * statistics.median(times["plain BertForSequenceClassification"])
    lines = ["| run (batch 1, 25 tokens, threshold 0) | ms per call | against plain | per intermediate exit (ms) |",
             "|---|---|---|---|"]
    for name, values in times.items():
        ms = 1e3 * statistics.median(values)
        per_exit = f"{(ms - plain_ms) / 5:.3f}" if "6 exits" in name else ""
        lines.append(f"| {name} | {ms:.3f} | {100 * (ms / plain_ms - 1):+.1f}% | {per_exit} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=200, help="timed calls per part (in-context: rounds / 10)")
    parser.add_argument("--out", default="benchmarks/results/exit_step_cost_cpu.md")
    args = parser.parse_args()
    report = "\n\n".join([
        "# Cost of one exit at batch 1 (cpu, float32)",
        f"Command: `python {' '.join(sys.argv)}`  \nHardware: {hardware('cpu')}; torch {torch.__version__}, "
        f"transformers {transformers.__version__}. MiniLM-size model with random weights, 25 tokens, medians.",
        "## Each part alone: hot caches, and cold (after streaming 64 MB, as a layer's weights do)",
        "\n".join(part_costs(model_with([1, 2, 3, 4, 5, 6]), args.rounds)),
        "## In `predict_early`, against the plain model (interleaved rounds)",
        "\n".join(in_context(max(5, args.rounds // 10))),
    ])
    write_report(report, args.out)


if __name__ == "__main__":
    main()
