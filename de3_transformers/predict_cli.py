"""The predict command: `python -m de3_transformers predict --model DIR --input_file texts.csv --text_column sentence
--output_file scored.csv` (or `de3-predict ...`) classifies every row of a csv, tsv, jsonl or parquet file with early
exit and writes the same rows, in the same order, with the columns `label`, `score` and `exit_layer` added.

An interrupted run resumes where it stopped. Rows are scored in chunks of `--chunk_size`; each chunk's predictions
go to a shard in a work folder beside the output (`<output_file>.partial/`), and after each shard a small progress
record (`progress.json`) is replaced atomically. Run the same command again and it skips the chunks that the record
counts as done: no row is scored twice, none is lost (a chunk cut off half way is scored again, and its half-written
shard replaced). The record holds a fingerprint of the input file, the model's files and the arguments that decide the
answers; a run whose fingerprint differs refuses to resume. At the end the output is written (atomically) and the
work folder removed.
"""

import csv
import hashlib
import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
from transformers import HfArgumentParser
from transformers.utils import logging

from .onnx_backend import check_backend
from .predictor import PREDICTION_COLUMNS, EarlyExitClassifier


PROGRESS_NAME = "progress.json"
# Reading options per file format (`datasets.load_dataset` builder and its options). Only empty cells are missing
# values: pandas' defaults would also read texts such as "NA", "null" or "nan" as missing. TSV files are read as GLUE
# writes them, without quoting (`data.load_local_files` does the same).
_READERS = {
    "csv": ("csv", {"keep_default_na": False, "na_values": [""]}),
    "tsv": ("csv", {"delimiter": "\t", "quoting": csv.QUOTE_NONE, "keep_default_na": False, "na_values": [""]}),
    "json": ("json", {}),
    "jsonl": ("json", {}),
    "parquet": ("parquet", {}),
}
FORMATS = tuple(_READERS)
# What makes two runs give the same answers for the same rows: a run resumes only the work of a run that agreed on all.
_FINGERPRINTED = ("text_column", "text_pair_column", "backend", "max_length", "policy", "threshold", "lam", "patience",
                  "chunk_size")


@dataclass
class PredictArguments:
    """Arguments of `python -m de3_transformers predict` (`de3-predict`).

    Raises:
        ValueError: for a missing input file, a format that is not csv, tsv, json(l) or parquet, an unknown backend,
            `--device` with `--backend onnxruntime`, or a `batch_size`, `chunk_size` or `max_length` below 1.
    """

    model: str = field(metadata={"help": "A saved DE3 checkpoint (folder with its tokenizer), or with --backend "
                                         "onnxruntime a folder written by export_onnx."})
    input_file: str = field(metadata={"help": "The texts: a csv, tsv, json(l) or parquet file."})
    output_file: str = field(metadata={"help": "Where the scored rows go (the format of --output_format, else of this "
                                               "file's extension, else of the input)."})
    text_column: str = field(default="text", metadata={"help": "Column of the (first) text."})
    text_pair_column: str | None = field(default=None, metadata={"help": "Column of the second text, for pairs."})
    backend: str = field(default="pytorch", metadata={"help": "pytorch or onnxruntime."})
    device: str | None = field(default=None, metadata={"help": "PyTorch device (default: cuda if available, else "
                                                                "cpu)."})
    batch_size: int = field(default=64, metadata={"help": "Texts per early-exit call."})
    max_length: int | None = field(default=None, metadata={"help": "Tokens per text after truncation (default: the "
                                                                    "model's positions)."})
    policy: str | None = field(default=None, metadata={"help": "Exit policy (default: the calibrated one)."})
    threshold: float | None = field(default=None, metadata={"help": "The policy's threshold (default: calibrated)."})
    lam: float | None = field(default=None, metadata={"help": "EDR lambda of the de3 policy (default: calibrated)."})
    patience: int | None = field(default=None, metadata={"help": "Patience of the patience policies."})
    column_prefix: str = field(default="", metadata={"help": "Put before the new columns' names, e.g. predicted_ "
                                                             "when the input already has a label column."})
    output_format: str | None = field(default=None, metadata={"help": "csv, tsv, jsonl or parquet."})
    chunk_size: int = field(default=4096, metadata={"help": "Rows per chunk: the unit of work saved, and redone at "
                                                            "most once after an interruption."})
    work_dir: str | None = field(default=None, metadata={"help": "Folder of the finished chunks (default: "
                                                                 "<output_file>.partial beside the output)."})
    overwrite_output_file: bool = field(default=False, metadata={"help": "Replace an existing output file."})
    input_format: str = field(init=False, default="")  # from the input's extension
    resolved_output_format: str = field(init=False, default="")

    def __post_init__(self):
        path = Path(self.input_file)
        if not path.is_file():
            raise ValueError(f"--input_file {path} does not exist.")
        self.input_format = path.suffix.lower().lstrip(".")
        if self.input_format not in FORMATS:
            raise ValueError(f"--input_file {path} must be a {', '.join(FORMATS)} file (by its extension).")
        output_suffix = Path(self.output_file).suffix.lower().lstrip(".")
        self.resolved_output_format = self.output_format or (output_suffix if output_suffix in FORMATS else
                                                             self.input_format)
        if self.resolved_output_format not in FORMATS:
            raise ValueError(f"--output_format {self.output_format!r} is unknown; choose one of {', '.join(FORMATS)}.")
        check_backend(self.backend)
        if self.device is not None and self.backend == "onnxruntime":
            raise ValueError("--device applies to --backend pytorch; ONNX Runtime runs on the CPU here.")
        for name in ("batch_size", "chunk_size", "max_length"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name} {value} must be a positive integer.")


@dataclass
class PredictionSummary:
    """What a run of the predict command did: `texts` rows in the output, of which `texts_scored` were scored by this
    run (in `seconds`) and `texts_resumed` by an earlier, interrupted one; the layer speed-up and label counts are over
    all rows."""

    texts: int
    texts_scored: int
    texts_resumed: int
    seconds: float
    texts_per_second: float
    speedup: float
    label_counts: dict[str, int]
    output_file: str


def read_table(path, file_format: str) -> datasets.Dataset:
    """The rows of a csv, tsv, json(l) or parquet file, in file order."""
    builder, options = _READERS[file_format]
    return datasets.load_dataset(builder, data_files=str(path), split="train", **options)


def write_table(dataset: datasets.Dataset, path, file_format: str) -> None:
    """Writes `dataset` as csv, tsv, json lines or parquet (TSV without quoting, so that `read_table` reads the texts
    back as written)."""
    if file_format == "csv":
        dataset.to_csv(path, index=False)
    elif file_format == "tsv":
        dataset.to_csv(path, index=False, sep="\t", quoting=csv.QUOTE_NONE)
    elif file_format in ("json", "jsonl"):
        dataset.to_json(path, lines=True, force_ascii=False)
    else:
        dataset.to_parquet(path)


def fingerprint(args: PredictArguments) -> dict:
    """The settings a run resumes only if they are unchanged: SHA-256 of the input file and of the model's files (a
    local folder; a Hub name as given), and the arguments that decide the answers or the chunks."""
    settings = {name: getattr(args, name) for name in _FINGERPRINTED}
    settings["input_sha256"] = _sha256([Path(args.input_file)])
    model = Path(args.model)
    settings["model_sha256"] = (_sha256(sorted(path for path in model.rglob("*") if path.is_file()), root=model)
                                if model.is_dir() else args.model)
    return settings


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    """Command-line entry point (`de3-predict`, `python -m de3_transformers predict`)."""
    parser = HfArgumentParser(PredictArguments, prog=prog, description=__doc__.split("\n\n")[0])
    (args,) = parser.parse_args_into_dataclasses(argv)
    predict(args)


def predict(args: PredictArguments) -> PredictionSummary:
    """Scores `args.input_file` into `args.output_file`, resuming an interrupted run of the same arguments, and prints
    a summary.

    Raises:
        ValueError: for a text column missing or holding other values than texts (a missing value), a new column that
            is already in the input (pass --column_prefix), an empty input, exit options the model refuses, or a work
            folder left by a run with another input, model or arguments.
        FileExistsError: when the output file exists and no run of these arguments is to be resumed (pass
            --overwrite_output_file).
    """
    data = read_table(args.input_file, args.input_format)
    _check_input(data, args)
    output = Path(args.output_file)
    work = Path(args.work_dir) if args.work_dir else output.with_name(output.name + ".partial")
    settings = fingerprint(args)
    record = _resumable_record(work, settings, len(data), args)
    if record is None and output.exists() and not args.overwrite_output_file:
        raise FileExistsError(f"{output} exists: pass --overwrite_output_file to replace it.")
    classifier = EarlyExitClassifier.from_pretrained(  # refuses bad exit options before any work is saved
        args.model, device=args.device, backend=args.backend, batch_size=args.batch_size, max_length=args.max_length,
        policy=args.policy, threshold=args.threshold, lam=args.lam, patience=args.patience,
    )
    if record is None:
        record = {"settings": settings, "total_rows": len(data), "num_chunks": -(-len(data) // args.chunk_size),
                  "chunks_done": 0, "layers_run": 0}
        work.mkdir(parents=True, exist_ok=True)
        _write_atomically(work / PROGRESS_NAME, json.dumps(record, indent=2).encode())
    texts_scored, seconds = _score_chunks(data, classifier, work, record, args)
    predictions = _assemble(data, work, record, args)
    labels = predictions[args.column_prefix + "label"]
    layers = sum(predictions[args.column_prefix + "exit_layer"])
    summary = PredictionSummary(
        texts=len(data), texts_scored=texts_scored, texts_resumed=len(data) - texts_scored, seconds=seconds,
        texts_per_second=texts_scored / seconds if seconds else 0.0,
        speedup=classifier.num_hidden_layers * len(data) / layers,
        label_counts={name: count for name, count in sorted(Counter(labels).items())}, output_file=str(output),
    )
    _print_summary(summary, args)
    return summary


def _check_input(data: datasets.Dataset, args: PredictArguments) -> None:
    if len(data) == 0:
        raise ValueError(f"{args.input_file} has no rows.")
    for name, flag in ((args.text_column, "--text_column"), (args.text_pair_column, "--text_pair_column")):
        if name is None:
            continue
        if name not in data.column_names:
            raise ValueError(f"{args.input_file} has no column {name!r} (it has {data.column_names}): pass {flag}.")
        column = data.data.column(name)
        if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
            raise ValueError(f"Column {name!r} holds {column.type} values, not texts: pass {flag} naming the text.")
        if column.null_count:
            missing = [index for index, value in enumerate(data[name]) if value is None][:5]
            raise ValueError(f"Column {name!r} has {column.null_count} missing texts (rows {missing}, counted from 0, "
                             "first ones): fill or drop them.")
    taken = [args.column_prefix + name for name in PREDICTION_COLUMNS if args.column_prefix + name in data.column_names]
    if taken:
        raise ValueError(f"{args.input_file} already has the column(s) {taken}: pass --column_prefix (e.g. "
                         "predicted_) to add the predictions beside them.")


def _resumable_record(work: Path, settings: dict, total_rows: int, args: PredictArguments) -> dict | None:
    """The progress record of an interrupted run in `work`, or `None` when there is none.

    Raises:
        ValueError: when that run had other settings.
    """
    record_path = work / PROGRESS_NAME
    if not record_path.is_file():
        return None
    record = json.loads(record_path.read_text())
    changed = sorted(key for key in set(settings) | set(record["settings"])
                     if settings.get(key) != record["settings"].get(key))
    if changed:
        was = {key: record["settings"].get(key) for key in changed}
        raise ValueError(f"{work} holds an interrupted run with another {', '.join(changed)} (it was {was}): rerun "
                         "with the arguments and files it was started with, or remove that folder to start again "
                         "(or pass another --work_dir).")
    done = record["chunks_done"]
    print(f"Resuming from {work}: {done} of {record['num_chunks']} chunks "
          f"({min(done * args.chunk_size, total_rows)} texts) were scored by an earlier run.")
    return record


def _score_chunks(data, classifier: EarlyExitClassifier, work: Path, record: dict, args: PredictArguments):
    """Scores the chunks the record does not count as done, saving each one's shard and then the record; returns the
    texts scored and the seconds it took."""
    columns = [name for name in (args.text_column, args.text_pair_column) if name is not None]
    texts = data.select_columns(columns)
    total, size = len(data), args.chunk_size
    start_row = min(record["chunks_done"] * size, total)
    bar = logging.tqdm(total=total, initial=start_row, unit="text", desc="Scoring", disable=None)
    started, scored = time.perf_counter(), 0
    for index in range(record["chunks_done"], record["num_chunks"]):
        rows = texts[index * size : (index + 1) * size]
        labels, scores, layers = classifier.predict(rows[args.text_column],
                                                    rows[args.text_pair_column] if args.text_pair_column else None)
        table = pa.table({"label": pa.array(labels, pa.string()), "score": pa.array(scores, pa.float64()),
                          "exit_layer": pa.array(layers, pa.int64())})
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        _write_atomically(_shard_path(work, index), sink.getvalue().to_pybytes())
        record.update(chunks_done=index + 1, layers_run=record["layers_run"] + sum(layers))
        _write_atomically(work / PROGRESS_NAME, json.dumps(record, indent=2).encode())
        scored += len(layers)
        done_rows = min((index + 1) * size, total)
        speedup = classifier.num_hidden_layers * done_rows / record["layers_run"]
        bar.set_postfix_str(f"layer speed-up {speedup:.2f}x", refresh=False)  # shown by the update
        bar.update(len(layers))
    bar.close()
    return scored, time.perf_counter() - started


def _assemble(data: datasets.Dataset, work: Path, record: dict, args: PredictArguments) -> dict:
    """Writes the input rows with the shards' columns added to the output file, removes the run's files from the work
    folder, and returns the new label and exit layer columns."""
    shards = [_shard_path(work, index) for index in range(record["num_chunks"])]
    missing = [path.name for path in shards if not path.is_file()]
    if missing:
        raise ValueError(f"{work} lacks the shards {missing[:5]} that its progress record counts as done: remove "
                         "that folder and run again.")
    table = pa.concat_tables([pq.read_table(path) for path in shards])
    if table.num_rows != len(data):
        raise ValueError(f"The shards in {work} hold {table.num_rows} rows, the input {len(data)}: remove that folder "
                         "and run again.")
    table = table.rename_columns([args.column_prefix + name for name in table.column_names])
    scored = datasets.concatenate_datasets([data, datasets.Dataset(datasets.table.InMemoryTable(table))], axis=1)
    output = Path(args.output_file)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = work / ("output." + args.resolved_output_format)
    write_table(scored, staging, args.resolved_output_format)
    os.replace(staging, output)
    _remove_work(work, shards)
    return table.select([args.column_prefix + name for name in ("label", "exit_layer")]).to_pydict()


def _print_summary(summary: PredictionSummary, args: PredictArguments) -> None:
    labels = ", ".join(f"{name} {count}" for name, count in summary.label_counts.items())
    print(f"Scored {summary.texts} texts of {args.input_file}: layer speed-up {summary.speedup:.2f}x; "
          f"labels: {labels}.")
    resumed = f"; {summary.texts_resumed} were scored by an earlier run" if summary.texts_resumed else ""
    print(f"This run scored {summary.texts_scored} in {summary.seconds:.2f} s, {summary.texts_per_second:.1f} "
          f"texts/s{resumed}.")
    print(f"Wrote {summary.output_file}")


def _remove_work(work: Path, shards: list[Path]) -> None:
    """Removes the files of the run from `work`, and `work` itself when nothing else is in it (a --work_dir may hold
    other files)."""
    for path in [*shards, work / PROGRESS_NAME]:
        path.unlink(missing_ok=True)
        path.with_name(path.name + ".tmp").unlink(missing_ok=True)  # left by a run killed while writing
    try:
        work.rmdir()
    except OSError:
        pass


def _shard_path(work: Path, index: int) -> Path:
    return work / f"chunk-{index:06d}.parquet"


def _write_atomically(path: Path, content: bytes) -> None:
    """Writes `content` to `path` so that a reader (or a run after a crash) sees the old file or the new one, never
    a part: written beside it, flushed to disk, then moved in with `os.replace`."""
    staging = path.with_name(path.name + ".tmp")
    with open(staging, "wb") as file:
        file.write(content)
        file.flush()
        os.fsync(file.fileno())
    os.replace(staging, path)


def _sha256(paths: list[Path], root: Path | None = None) -> str:
    digest = hashlib.sha256()
    for path in paths:
        if root is not None:
            digest.update(str(path.relative_to(root)).encode() + b"\0")
        with open(path, "rb") as file:
            for block in iter(lambda: file.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


__all__ = ["FORMATS", "PredictArguments", "PredictionSummary", "fingerprint", "main", "predict", "read_table",
           "write_table"]
