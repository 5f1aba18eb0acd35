"""The calibration command: `python -m de3_transformers.calibration --model_name_or_path DIR --validation_file dev.tsv
--target_speedup 2.0 --output_dir OUT` calibrates a saved DE3 model on a labelled file and saves it with the chosen
exit setting, `calibration.json` and `tradeoff.png`."""

import json
import numbers
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, HfArgumentParser
from transformers.utils import logging

from .calibration import CalibrationResult, calibrate
from .cli_errors import UsageError, parse_arguments, refusing_usage_errors
from .configuration_de3 import check_exit_parameters
from .data import load_local_files
from .metrics import classification_metrics
from .plots import plot_tradeoff
from .registry import EXIT_POLICIES


logger = logging.get_logger(__name__)


@dataclass
class CalibrationArguments:
    """Arguments of `python -m de3_transformers.calibration`.

    Raises:
        UsageError: (a `ValueError`) for a missing or unsupported validation file, a target below 1, both `lam` and
            `lam_grid`, a lambda out of range, a policy that is unknown or cannot be calibrated, `lam` or `lam_grid`
            with another policy than de3, or a non-positive `max_length` / `batch_size`.
    """

    model_name_or_path: str = field(metadata={"help": "A saved DE3 model (folder with its tokenizer)."})
    validation_file: str = field(metadata={"help": "Labelled csv, tsv or json(l) file to calibrate on."})
    output_dir: str = field(metadata={"help": "Where the calibrated model, calibration.json and tradeoff.png go."})
    text_column: str = field(default="sentence", metadata={"help": "Column of the (first) text."})
    text_pair_column: str | None = field(default=None, metadata={"help": "Column of the second text, for pairs."})
    label_column: str = field(default="label", metadata={"help": "Column of the labels (ids or label names)."})
    target_speedup: float = field(default=2.0, metadata={"help": "Layer speed-up to reach (>= 1)."})
    policy: str = field(default="de3", metadata={"help": "Exit policy: de3, entropy, max_prob, energy, patience, "
                                                         "patient_confident or learned."})
    lam: float | None = field(default=None, metadata={"help": "EDR lambda (default: the model config's)."})
    lam_grid: str | None = field(
        default=None, metadata={"help": "Comma-separated lambdas to search instead of --lam, e.g. 0,0.667,1,1.5,2,3."}
    )
    metrics: str = field(
        default="accuracy", metadata={"help": "Comma-separated metrics to report: accuracy, f1, matthews_correlation."}
    )
    max_length: int = field(default=128, metadata={"help": "Tokens per input after truncation."})
    batch_size: int = field(default=64, metadata={"help": "Samples per forward."})
    lambdas: list[float] | None = field(init=False, default=None)  # the parsed `lam_grid`
    metric_names: list[str] = field(init=False, default_factory=list)  # the parsed `metrics`

    def __post_init__(self):
        path = Path(self.validation_file)
        if not path.is_file():
            raise UsageError(f"--validation_file {path} does not exist: pass the path of a labelled csv, tsv or "
                             "json(l) file.")
        if path.suffix.lower() not in (".csv", ".tsv", ".json", ".jsonl"):
            raise UsageError(f"--validation_file {path} must be a csv, tsv, json or jsonl file (by its extension).")
        if not (isinstance(self.target_speedup, numbers.Real) and self.target_speedup >= 1):
            raise UsageError(f"--target_speedup {self.target_speedup} must be a number >= 1 (1 is the full model; 2.0 "
                             "halves the layers run on average).")
        if self.lam is not None and self.lam_grid is not None:
            raise UsageError("Give either --lam or --lam_grid, not both.")
        if self.lam_grid is not None:
            try:
                self.lambdas = [float(value) for value in self.lam_grid.split(",") if value.strip()]
            except ValueError as error:
                raise UsageError(f"--lam_grid {self.lam_grid!r} must be comma-separated numbers, e.g. 0,1,2."
                                 ) from error
            if not self.lambdas:
                raise UsageError("--lam_grid is empty; give comma-separated lambdas, e.g. 0,1,2.")
        for value in self.lambdas or ([self.lam] if self.lam is not None else []):
            try:
                check_exit_parameters(0.0, value)
            except ValueError as error:  # its only errors: a lambda out of range, named with the range
                raise UsageError(f"--lam / --lam_grid: {error}") from error
        if self.policy not in EXIT_POLICIES or self.policy == "oracle":
            raise UsageError(f"--policy {self.policy!r} is unknown or cannot be calibrated; choose one of "
                             f"{sorted(set(EXIT_POLICIES) - {'oracle'})}.")
        if self.policy != "de3" and (self.lam is not None or self.lam_grid is not None):
            raise UsageError("--lam and --lam_grid apply to --policy de3 only: drop them, or pass --policy de3.")
        self.metric_names = [name.strip() for name in self.metrics.split(",") if name.strip()] or ["accuracy"]
        if self.max_length < 1 or self.batch_size < 1:
            raise UsageError("--max_length and --batch_size must be positive integers.")


def _encode_dataset(raw, tokenizer, model, args: CalibrationArguments):
    """The validation rows tokenized, with their labels as the model's class ids.

    Raises:
        UsageError: for a column named by the arguments that the file lacks, or a label name the model does not know.
    """
    columns = [args.text_column, args.text_pair_column, args.label_column]
    missing = [name for name in columns if name is not None and name not in raw.column_names]
    if missing:
        raise UsageError(
            f"Columns {missing} are not in {args.validation_file} (it has {raw.column_names}); "
            "pass --text_column, --text_pair_column and --label_column."
        )
    label2id = model.config.label2id

    def encode(batch):
        encoded = tokenizer(batch[args.text_column], batch[args.text_pair_column] if args.text_pair_column else None,
                            truncation=True, max_length=args.max_length)
        labels = []
        for value in batch[args.label_column]:
            if isinstance(value, str):
                if value not in label2id:
                    raise UsageError(
                        f"Label {value!r} is not one of the model's labels {sorted(label2id)} (config.label2id); "
                        "use those names or class ids."
                    )
                value = label2id[value]
            labels.append(value)
        encoded["labels"] = labels
        return encoded

    return raw.map(encode, batched=True, remove_columns=raw.column_names, desc="Tokenizing")


def _print_table(result: CalibrationResult, metric_names: list[str]) -> None:
    extra = [name for name in metric_names if name != "accuracy"]
    header = ["setting", "parameters", "layer speed-up", "FLOPs speed-up", "accuracy", *extra]
    full = result.curve[0]  # the first setting of the curve lets no sample leave early
    parameters = ", ".join(f"{name}={value:.6g}" for name, value in result.parameters.items())
    rows = [
        ["full model", "-", "1.00x", "1.00x", f"{result.full_accuracy:.4f}", *(f"{full.metrics[n]:.4f}" for n in extra)],
        [f"{result.policy} @ {result.target_speedup:g}x", parameters, f"{result.speedup:.2f}x",
         f"{result.flops_speedup:.2f}x", f"{result.accuracy:.4f}", *(f"{result.metrics[n]:.4f}" for n in extra)],
    ]
    widths = [max(len(line[column]) for line in [header, *rows]) for column in range(len(header))]
    for index, line in enumerate([header, *rows]):
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths)))
        if index == 0:
            print("  ".join("-" * width for width in widths))


def main(argv: list[str] | None = None, prog: str | None = None) -> CalibrationResult:
    """Command-line entry point: calibrate a saved DE3 model and save it with the chosen threshold and lambda (`prog`:
    the command's name in its messages, by default `python -m de3_transformers.calibration`).

    Raises:
        SystemExit: with status 2 for a user mistake (a `UsageError`: an argument `CalibrationArguments` refuses, an
            unknown argument, a model that is not a DE3 model, a column or label the file lacks), after printing
            `<prog>: error: <message>` to stderr, as `argparse` does; for what `argparse` refuses itself; with status 0
            after `--help`. Any other error (also one `calibrate` raises) is raised as it is, with its traceback.
    """
    parser = HfArgumentParser(CalibrationArguments, prog=prog or "python -m de3_transformers.calibration")
    with refusing_usage_errors(parser):
        (args,) = parse_arguments(parser, argv)
        return _calibrate(args)


def _calibrate(args: CalibrationArguments) -> CalibrationResult:
    """Calibrates and saves the model of `args`, and prints the result.

    Raises:
        UsageError: for a model that is not a DE3 model, or as `_encode_dataset`.
    """
    model = AutoModelForSequenceClassification.from_pretrained(args.model_name_or_path)
    if not hasattr(model, "prototype_memory"):
        raise UsageError(
            f"{args.model_name_or_path} is a {type(model).__name__}, not a DE3 model; fine-tune one first "
            "(DE3BertForSequenceClassification.from_backbone(...) and DE3Trainer)."
        )
    if torch.cuda.is_available():
        model.to("cuda")
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    raw = load_local_files(validation_file=args.validation_file)["validation"]
    dataset = _encode_dataset(raw, tokenizer, model, args)

    metric_fn = None
    if args.metric_names != ["accuracy"]:
        metric_fn = classification_metrics(args.metric_names)
    result = calibrate(model, dataset, target_speedup=args.target_speedup, lam=args.lam, lam_grid=args.lambdas,
                       metric_fn=metric_fn, batch_size=args.batch_size, save=True, policy=args.policy)

    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir)  # its config now carries the calibrated threshold and lambda
    tokenizer.save_pretrained(output_dir)
    (output_dir / "calibration.json").write_text(json.dumps(result.to_dict(), indent=2))
    try:
        grid_name = "lam" if "lam" in result.parameters else "patience"
        labels = {key: result.policy if key is None else f"{result.policy}, {grid_name}={key:g}"
                  for key in result.curves}
        plot_tradeoff({labels[key]: curve for key, curve in result.curves.items()}, output_dir / "tradeoff.png",
                      full_accuracy=result.full_accuracy, title=f"{result.policy}: accuracy against layer speed-up")
    except ImportError as error:
        logger.warning(f"tradeoff.png not written: {error}")
    print(f"\nCalibrated on {len(dataset)} samples of {args.validation_file}; saved to {output_dir}:")
    _print_table(result, args.metric_names)
    return result


__all__ = ["CalibrationArguments", "main"]
