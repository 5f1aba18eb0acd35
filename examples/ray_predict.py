#!/usr/bin/env python
"""Bulk scoring with Ray Data: each of `--concurrency` Ray actors holds one `EarlyExitClassifier` (built once, from the
checkpoint path) and classifies the batches Ray Data hands it, each text leaving at its own exit. The same code runs
on one machine (a local Ray cluster, started here) or on a cluster (`--address`).

    pip install 'de3-transformers[ray]'
    python examples/ray_predict.py --model outputs/quickstart --input_file texts.csv --text_column sentence \\
        --output_dir scored [--concurrency 2] [--batch_size 256] [--target_speedup 2.0]

Writes parquet files to `--output_dir`: the input's rows, in their order, with `label`, `score` and `exit_layer`
added.
"""

import argparse

import ray

from de3_transformers import EarlyExitClassifier


def score(dataset: "ray.data.Dataset", model: str, text_column: str, concurrency: int = 2, batch_size: int = 256,
          num_cpus: float = 1, **classifier_kwargs) -> "ray.data.Dataset":
    """`dataset` with the classifier's columns added, computed by `concurrency` actors, one model each, each reserving
    `num_cpus` of the cluster (leave at least one CPU for reading and writing the data, or Ray Data waits forever).

    Ray Data keeps the input order here (`preserve_order`), so the rows come out as they went in; pass the
    classifier's other arguments (`text_pair_column`, `target_speedup`, exit options, ...) as keywords.
    """
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    return dataset.map_batches(
        EarlyExitClassifier,
        fn_constructor_kwargs={"model": model, "text_column": text_column, "device": "cpu", **classifier_kwargs},
        batch_size=batch_size,
        batch_format="pandas",
        concurrency=concurrency,
        num_cpus=num_cpus,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a saved DE3 checkpoint (with its tokenizer)")
    parser.add_argument("--input_file", required=True, help="a csv file (for parquet or json, change read_csv)")
    parser.add_argument("--text_column", default="text")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--concurrency", type=int, default=2, help="actors, one model each")
    parser.add_argument("--batch_size", type=int, default=256, help="texts handed to an actor at a time")
    parser.add_argument("--target_speedup", type=float, default=None, help="a speed-up budget per actor")
    parser.add_argument("--address", default=None, help="a running Ray cluster; default: start a local one")
    args = parser.parse_args(argv)
    if args.address:
        ray.init(address=args.address)
    else:  # a local cluster on this machine only, without the dashboard's web server; a CPU more for the reading
        ray.init(num_cpus=args.concurrency + 1, _node_ip_address="127.0.0.1", include_dashboard=False)
    try:
        options = {} if args.target_speedup is None else {"target_speedup": args.target_speedup}
        scored = score(ray.data.read_csv(args.input_file), args.model, args.text_column, args.concurrency,
                       args.batch_size, **options)
        scored.write_parquet(args.output_dir)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
