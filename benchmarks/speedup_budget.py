#!/usr/bin/env python
"""Benchmark (not a test): does a speed-up budget hold the layer speed-up on data the threshold was not calibrated on?

The main job's model (`outputs/quickstart`: trained on VADER movie-review snippets, its threshold calibrated there for
2x layers) scores the other VADER sets (amazon reviews, tweets, NYT editorials; binary labels from the sign of the
rating, neutral rows dropped) and, for reference, its own movie test split: once with the saved threshold, once with
`predict_dataset(..., target_speedup=2.0)`. Printed per set: layer speed-up reached against the target, accuracy,
and the threshold the budget ended at.

    python benchmarks/speedup_budget.py [--model_dir outputs/quickstart] [--target_speedup 2.0]

Writes a markdown report (command, hardware, table) to benchmarks/results/speedup_budget_cpu.md.
"""

import argparse
import csv
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import datasets
import torch
import transformers
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import de3_transformers
from de3_transformers import predict_dataset
from de3_transformers.benchmarking import hardware, write_report
from de3_transformers.data import load_vader_movie_reviews


VADER_SETS = {"amazon": "amazonReviewSnippets_GroundTruth.txt", "tweets": "tweets_GroundTruth.txt",
              "nyt": "nytEditorialSnippets_GroundTruth.txt"}


def load_vader_set(folder: Path, file_name: str) -> datasets.Dataset:
    """One VADER ground-truth file as `sentence` / `label` (1 for a positive mean rating, 0 for a negative one)."""
    raw = datasets.load_dataset("csv", data_files={"rows": str(folder / file_name)}, delimiter="\t",
                                quoting=csv.QUOTE_NONE, column_names=["id", "sentiment", "sentence"],
                                features=datasets.Features({"id": datasets.Value("string"),
                                                            "sentiment": datasets.Value("float64"),
                                                            "sentence": datasets.Value("string")}))["rows"]
    raw = raw.filter(lambda row: row["sentiment"] != 0)
    return raw.map(lambda row: {"label": int(row["sentiment"] > 0)}, remove_columns=["id", "sentiment"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", default="outputs/quickstart")
    parser.add_argument("--vader_dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "vader"))
    parser.add_argument("--target_speedup", type=float, default=2.0)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/speedup_budget_cpu.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = AutoModelForSequenceClassification.from_pretrained(args.model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    positive = model.config.label2id["positive"]
    sets = {"movie (test split, calibration's distribution)": load_vader_movie_reviews()["test"]}
    sets |= {name: load_vader_set(Path(args.vader_dir), file_name) for name, file_name in VADER_SETS.items()}

    rows = ["| data (texts) | threshold | layer speed-up | vs target | accuracy | ended at threshold | seconds |",
            "|---|---|---|---|---|---|---|"]
    for name, data in sets.items():
        tokenized = [tokenizer(sentence, truncation=True, max_length=128) for sentence in data["sentence"]]
        labels = torch.tensor([positive if label == 1 else 1 - positive for label in data["label"]])
        for label, options in (("saved", {}), (f"budget {args.target_speedup:g}x",
                                                {"target_speedup": args.target_speedup})):
            started = time.perf_counter()
            out = predict_dataset(model, tokenized, batch_size=args.batch_size, **options)
            seconds = time.perf_counter() - started
            accuracy = float((out.logits.argmax(dim=-1) == labels).double().mean())
            ended = "" if out.threshold is None else f"{out.threshold:.4f}"
            rows.append(f"| {name} ({len(tokenized):,}) | {label} | {out.speedup:.2f}x | "
                        f"{out.speedup / args.target_speedup:.3f} | {accuracy:.4f} | {ended} | {seconds:.1f} |")
            print(rows[-1], flush=True)

    report = "\n\n".join([
        "# A speed-up budget on data the threshold was not calibrated on (CPU)",
        f"Command: `python {shlex.join(sys.argv)}`  \nHardware: {hardware('cpu')}; torch {torch.__version__}, "
        f"transformers {transformers.__version__}, de3-transformers {de3_transformers.__version__}, Python "
        f"{platform.python_version()}.  \nModel: `{args.model_dir}` (policy {model.config.early_exit_policy}, saved "
        f"threshold {model.config.early_exit_threshold:.4f}, lambda {model.config.early_exit_lambda:g}, calibrated on "
        f"the VADER movie validation split). Batches of {args.batch_size}; `budget` is `predict_dataset(..., "
        f"target_speedup={args.target_speedup:g})`, which starts at the saved threshold.",
        "\n".join(rows),
    ])
    write_report(report, args.out)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
