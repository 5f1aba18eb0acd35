#!/usr/bin/env python
"""Bulk scoring with Ray Data: each of `--concurrency` Ray actors holds one `EarlyExitClassifier` (built once, from the
checkpoint path) and classifies the batches Ray Data hands it, each text leaving at its own exit. The same code runs
on one machine (a local Ray cluster, started here, listening on 127.0.0.1 only, without the dashboard) or on a cluster
(`--address`).

    pip install 'de3-transformers[ray]'
    python examples/ray_predict.py --model outputs/quickstart --input_file examples/texts.csv --text_column sentence \\
        --output_dir outputs/texts_scored [--column_prefix predicted_] [--concurrency 1] [--num_cpus 1] \\
        [--batch_size 256] [--target_speedup 2.0]

Writes parquet files to `--output_dir`: the input's rows, in their order, with `label`, `score` and `exit_layer`
added, or `predicted_label`, `predicted_score` and `predicted_exit_layer` when the input already has one of those
columns (`--column_prefix` names them otherwise). Each actor reserves `--num_cpus` CPUs (and runs as many torch
threads); Ray Data needs one more CPU for reading and writing the data, or it waits forever: the default, one actor
of one CPU, runs on a 2-CPU machine; raise `--concurrency` on a bigger one.
"""

import argparse
import os

from de3_transformers.cli_errors import UsageError, refusing_usage_errors
from de3_transformers.extras import require
from de3_transformers.predictor import PREDICTION_COLUMNS


AUTOMATIC_PREFIX = "predicted_"


def score(dataset: "ray.data.Dataset", model: str, text_column: str, concurrency: int = 1, batch_size: int = 256,
          num_cpus: float = 1, **classifier_kwargs) -> "ray.data.Dataset":
    """`dataset` with the classifier's columns added, computed by `concurrency` actors, one model each, each reserving
    `num_cpus` of the cluster (leave at least one CPU for reading and writing the data, or Ray Data waits forever).

    Ray Data keeps the input order here (`preserve_order`, set on the dataset's context), so the rows come out as
    they went in; pass the classifier's other arguments (`column_prefix`, `text_pair_column`, `target_speedup`, exit
    options, ...) as keywords.
    """
    from de3_transformers import EarlyExitClassifier

    ray = require("ray", extra="ray", feature="examples/ray_predict.py")

    # A dataset keeps a copy of the context current at its creation (recent Ray): setting the current one now is late.
    context = getattr(dataset, "context", None) or ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    return dataset.map_batches(
        EarlyExitClassifier,
        fn_constructor_kwargs={"model": model, "text_column": text_column, "device": "cpu", **classifier_kwargs},
        batch_size=batch_size,
        batch_format="pandas",
        compute=ray.data.ActorPoolStrategy(size=concurrency),
        num_cpus=num_cpus,
    )


def choose_column_prefix(columns: list[str], text_column: str, column_prefix: str | None, source: str) -> str:
    """The prefix of the new columns: `column_prefix` when given, else `""`, or `"predicted_"` (said in one line) when
    the input already has a `label`, `score` or `exit_layer` column.

    Raises:
        UsageError: (a `ValueError`) for a text column missing, or a `column_prefix` whose columns are already in the
            input.
    """
    if text_column not in columns:
        raise UsageError(f"{source} has no column {text_column!r} (its columns: {columns}): name the texts' column "
                         "with --text_column.")
    if column_prefix is None:
        column_prefix = "" if not set(PREDICTION_COLUMNS) & set(columns) else AUTOMATIC_PREFIX
        if column_prefix:
            print(f"{source} already has the column(s) {[name for name in PREDICTION_COLUMNS if name in columns]}: "
                  f"the predictions go to {', '.join(column_prefix + name for name in PREDICTION_COLUMNS)} "
                  "(--column_prefix names them).")
    taken = [column_prefix + name for name in PREDICTION_COLUMNS if column_prefix + name in columns]
    if taken:
        raise UsageError(f"{source} already has the column(s) {taken}: pass another --column_prefix (e.g. "
                         f"{AUTOMATIC_PREFIX if column_prefix != AUTOMATIC_PREFIX else 'model_'}) to add the "
                         "predictions beside them.")
    return column_prefix


def check_local_resources(concurrency: int, num_cpus: float, cluster_cpus: float) -> None:
    """Refuses actors that would leave a local cluster no CPU to read the data with (Ray Data would wait forever).

    Raises:
        UsageError: (a `ValueError`) for `concurrency` below 1, `num_cpus` not positive, or `concurrency * num_cpus`
            above `cluster_cpus - 1`.
    """
    if concurrency < 1 or num_cpus <= 0:
        raise UsageError(f"--concurrency {concurrency} and --num_cpus {num_cpus:g} must be positive.")
    if concurrency * num_cpus > cluster_cpus - 1:
        raise UsageError(f"{concurrency} actor(s) of {num_cpus:g} CPU leave none of this machine's {cluster_cpus:g} "
                         "CPUs for reading the data, and Ray Data would wait forever: lower --concurrency or "
                         "--num_cpus (e.g. --num_cpus 0.5).")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a saved DE3 checkpoint (with its tokenizer)")
    parser.add_argument("--input_file", required=True, help="a csv file (for parquet or json, change read_csv)")
    parser.add_argument("--text_column", default="text")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--column_prefix", default=None, help="put before the new columns' names; default: none, or "
                        f"{AUTOMATIC_PREFIX} when the input already has a label, score or exit_layer column")
    parser.add_argument("--concurrency", type=int, default=1, help="actors, one model each")
    parser.add_argument("--num_cpus", type=float, default=1,
                        help="CPUs reserved by each actor (and its torch threads, at least 1)")
    parser.add_argument("--batch_size", type=int, default=256, help="texts handed to an actor at a time")
    parser.add_argument("--target_speedup", type=float, default=None, help="a speed-up budget per actor")
    parser.add_argument("--address", default=None, help="a running Ray cluster; default: start a local one")
    args = parser.parse_args(argv)
    if not args.address:
        # Read when ray is imported: without it Ray turns 127.0.0.1 into this machine's network address and its
        # servers listen on every interface. Not for --address: a driver on a cluster node needs its real address.
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray = require("ray", extra="ray", feature="examples/ray_predict.py")
    if args.address:
        ray.init(address=args.address)
    else:  # a local cluster on this machine only, without the dashboard's web server
        ray.init(_node_ip_address="127.0.0.1", include_dashboard=False)
    with refusing_usage_errors(parser):  # a mistake: one line and exit status 2, after Ray is shut down
        try:
            if not args.address:
                check_local_resources(args.concurrency, args.num_cpus, ray.cluster_resources().get("CPU", 0))
            dataset = ray.data.read_csv(args.input_file)
            column_prefix = choose_column_prefix(dataset.columns(), args.text_column, args.column_prefix,
                                                 args.input_file)
            options = {} if args.target_speedup is None else {"target_speedup": args.target_speedup}
            scored = score(dataset, args.model, args.text_column, args.concurrency, args.batch_size, args.num_cpus,
                           column_prefix=column_prefix, **options)
            scored.write_parquet(args.output_dir)
        finally:
            ray.shutdown()


if __name__ == "__main__":
    main()
