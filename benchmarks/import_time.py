#!/usr/bin/env python
"""Benchmark (not a test): the time of `import de3_transformers` against `from transformers import
BertForSequenceClassification`, which every user of the plain model pays, each in a fresh Python process.

The two imports take turns (plain, DE3, plain, DE3, ...), so that whatever else the machine does weighs on both alike;
each time is measured inside the process around the import alone (the interpreter's start-up is the same for both and
left out). Goal: the DE3 import takes at most 1.1x the plain one (median over `--rounds`).

    python benchmarks/import_time.py [--rounds 15] [--out benchmarks/results/import_time_cpu.md]
"""

import argparse
import os
import statistics
import subprocess
import sys

from de3_transformers.benchmarking import cpu_name, write_report


IMPORTS = {
    "from transformers import BertForSequenceClassification": "from transformers import BertForSequenceClassification",
    "import de3_transformers": "import de3_transformers",
}
GOAL = 1.1


def time_import(statement: str) -> float:
    """Seconds `statement` takes in a fresh interpreter."""
    script = f"import time\nstart = time.perf_counter()\n{statement}\nprint(time.perf_counter() - start)"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return float(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--out", default="benchmarks/results/import_time_cpu.md")
    args = parser.parse_args()
    times = {name: [] for name in IMPORTS}
    time_import("import de3_transformers")  # the first import after an install compiles the bytecode: not timed
    for _ in range(args.rounds):
        for name, statement in IMPORTS.items():
            times[name].append(time_import(statement))
    plain, de3 = (statistics.median(times[name]) for name in IMPORTS)
    rows = [f"| `{name}` | {statistics.median(values):.3f} | {min(values):.3f} | {max(values):.3f} |"
            for name, values in times.items()]
    ratio = de3 / plain
    report = "\n".join([
        "# Import time of de3_transformers",
        "",
        f"Command: `python benchmarks/import_time.py --rounds {args.rounds}`. Hardware: CPU: {cpu_name()}, "
        f"{os.cpu_count()} cores (shared with other jobs). Each import in a fresh process, the two taking turns; "
        "seconds measured around the import.",
        "",
        "| import | median s | fastest s | slowest s |",
        "|---|---|---|---|",
        *rows,
        "",
        f"Ratio of the medians: **{ratio:.2f}x** (goal: at most {GOAL}x: {'met' if ratio <= GOAL else 'NOT met'}).",
    ])
    write_report(report, args.out)


if __name__ == "__main__":
    main()
