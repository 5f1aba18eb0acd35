"""`python -m de3_transformers <command> [arguments]`: the package's commands.

- `predict`: classify every row of a csv, tsv, jsonl or parquet file with early exit (`predict_cli`; also installed
  as `de3-predict`);
- `calibrate`: calibrate a saved model for a target speed-up (`calibration_cli`; also `python -m
  de3_transformers.calibration`).

`python -m de3_transformers <command> --help` lists a command's arguments. A command refuses a user mistake (an
argument, a file, a column, an existing output) with one line on stderr, `<prog>: error: <message>`, naming the
problem and the fix, and exit status 2, as `argparse` does (`cli_errors`); a traceback means a bug.
"""

import importlib
import sys


COMMANDS = {
    "predict": ("de3_transformers.predict_cli", "classify the texts of a file with early exit; resumable"),
    "calibrate": ("de3_transformers.calibration_cli", "calibrate a saved model for a target layer speed-up"),
}


def main(argv: list[str] | None = None) -> int:
    """Runs the command named by the first argument with the other arguments; returns the exit status (2 for a
    missing or unknown command, after printing the usage).

    Raises:
        SystemExit: as the command's `main`: with status 2 for a user mistake, after printing one line,
            `python -m de3_transformers <command>: error: <message>`, to stderr; with status 0 after `--help`.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    usage = "usage: python -m de3_transformers {" + ",".join(COMMANDS) + "} [arguments]\n\ncommands:\n" + "".join(
        f"  {name:<10} {description}\n" for name, (_, description) in COMMANDS.items())
    if not argv or argv[0] in ("-h", "--help"):
        print(usage, file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        print(f"{usage}\nerror: unknown command {argv[0]!r}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    module.main(argv[1:], prog=f"python -m de3_transformers {argv[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
