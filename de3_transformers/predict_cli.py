"""The predict command: `python -m de3_transformers predict --model DIR --input_file texts.csv --text_column sentence
--output_file scored.csv` (or `de3-predict ...`) classifies every row of a csv, tsv, jsonl or parquet file with early
exit and writes the same rows, in the same order, with the columns `label`, `score` and `exit_layer` added.

An interrupted run resumes where it stopped. Rows are scored in chunks of `--chunk_size`; each chunk's predictions
go to a shard in a work folder beside the output (`<output_file>.partial/`), and after each shard a small progress
record (`progress.json`) is replaced atomically. Run the same command again and it skips the chunks that the record
counts as done: no row is scored twice, none is lost (a chunk cut off half way is scored again, and its half-written
shard replaced). The record holds a fingerprint of the input file, the model's files (less the command's own work
folder and output, where these are inside the model's folder) and the arguments that decide the answers; a run whose
fingerprint differs refuses to resume. A run holds the work folder's lock from start to end: a second run on the same
output is refused at once. At the end the output is written (atomically) and the run's files removed, and the work
folder too if a run made it (a --work_dir holding other files is refused: the command removes only what it wrote).

Several processes share the work when a launcher starts them: `torchrun --nproc_per_node N -m de3_transformers
predict ...` (or `accelerate launch`). Process `r` of `N` scores chunks `r, r + N, ...` with its own model (on
`cuda:LOCAL_RANK` where there are GPUs) and keeps its own progress record; process 0 then writes the same output, in
the same order, as one process would, and prints the summary of all. A resumed run skips every chunk an earlier run
finished, whichever process did it, also with another number of processes. The work folder must be one all processes
see (on several machines, a shared file system).

With `--target_speedup`, a speed-up budget adapts the exit threshold batch by batch so that the running layer speed-up
holds the target (`EarlyExitClassifier(target_speedup=)`); each process has its own. The budget's state is saved with
each chunk, so a resumed run continues it and writes what an uninterrupted run writes (with the same number of
processes: a run with another number refuses to resume).
"""

import csv
import math
import os
import tempfile
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from transformers import HfArgumentParser
from transformers.utils import logging

from .cli_errors import OutputExistsError, UsageError, parse_arguments, refusing_usage_errors
from .onnx_backend import BACKENDS
from .predict_work import (
    PROGRESS_NAME,
    check_work_folder,
    lock_work,
    new_record,
    read_records,
    read_shards,
    remove_work,
    sha256,
    staging_path,
    unlock_work,
    write_record,
    write_shard,
)
from .predictor import PREDICTION_COLUMNS, EarlyExitClassifier
from .process_group import Processes


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
logger = logging.get_logger(__name__)
# What makes two runs give the same answers for the same rows: a run resumes only the work of a run that agreed on all.
_FINGERPRINTED = ("text_column", "text_pair_column", "backend", "max_length", "policy", "threshold", "lam", "patience",
                  "target_speedup", "chunk_size")


@dataclass
class PredictArguments:
    """Arguments of `python -m de3_transformers predict` (`de3-predict`).

    Raises:
        UsageError: (a `ValueError`) for a missing input file, a format that is not csv, tsv, json(l) or parquet, an
            unknown backend, `--device` with `--backend onnxruntime`, or a `batch_size`, `chunk_size` or `max_length`
            below 1.
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
    target_speedup: float | None = field(default=None, metadata={"help": "Hold this layer speed-up over the whole "
                                                                        "file: the threshold adapts batch by batch."})
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
            raise UsageError(f"--input_file {path} does not exist: pass the path of the file of texts.")
        self.input_format = path.suffix.lower().lstrip(".")
        if self.input_format not in FORMATS:
            raise UsageError(f"--input_file {path} must be a {', '.join(FORMATS)} file (by its extension).")
        output_suffix = Path(self.output_file).suffix.lower().lstrip(".")
        self.resolved_output_format = self.output_format or (output_suffix if output_suffix in FORMATS else
                                                             self.input_format)
        if self.resolved_output_format not in FORMATS:
            raise UsageError(f"--output_format {self.output_format!r} is unknown; choose one of {', '.join(FORMATS)}.")
        if self.backend not in BACKENDS:
            raise UsageError(f"--backend {self.backend!r} is unknown; choose one of {', '.join(BACKENDS)}.")
        if self.device is not None and self.backend == "onnxruntime":
            raise UsageError("--device applies to --backend pytorch; ONNX Runtime runs on the CPU here: drop --device.")
        for name in ("batch_size", "chunk_size", "max_length"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UsageError(f"--{name} {value} must be a positive integer.")


@dataclass
class PredictionSummary:
    """What a run of the predict command did: `texts` rows in the output, of which `texts_scored` were scored by this
    run (in `seconds`, by the slowest of its `processes`; `texts_scored_per_process` by rank) and `texts_resumed` by
    an earlier, interrupted one; the layer speed-up and label counts are over all rows. With `target_speedup`, the
    budget's threshold started at `start_threshold` and ended at `thresholds`, each process's budget having reached
    `budget_speedups` over its texts (by rank)."""

    texts: int
    texts_scored: int
    texts_resumed: int
    seconds: float
    texts_per_second: float
    speedup: float
    label_counts: dict[str, int]
    output_file: str
    processes: int = 1
    texts_scored_per_process: list[int] = field(default_factory=list)
    target_speedup: float | None = None
    start_threshold: float | None = None
    thresholds: list[float] | None = None
    budget_speedups: list[float] | None = None


def read_table(path, file_format: str) -> datasets.Dataset:
    """The rows of a csv, tsv, json(l) or parquet file, in file order, as the file holds them now: read into memory
    through an empty cache (`datasets` would reuse a cached copy of a file rewritten with the same modification time).

    Raises:
        UsageError: (a `ValueError`) for a file that has no rows or cannot be read as `file_format` (empty, a bad
            json line, bytes that are not UTF-8, a column name twice).
    """
    builder, options = _READERS[file_format]
    if file_format == "parquet":
        try:
            names = pq.read_schema(path).names
        except (OSError, pa.ArrowException) as error:
            raise UsageError(f"{path} cannot be read as a parquet file ({_one_line(error)}): pass a parquet file, or "
                             "a file with the extension of its format.") from error
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise UsageError(f"{path} has the column(s) {twice} more than once: give each column its own name.")
    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # the error below says what went wrong, in one line
    try:
        with tempfile.TemporaryDirectory(prefix="de3-predict-read-") as cache:
            return datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=cache,
                                         keep_in_memory=True, **options)
    except MemoryError:
        raise
    except Exception as error:  # whatever the readers raise for a file they cannot read
        if isinstance(error, ValueError) and "corresponds to no data" in str(error):  # `datasets`: no rows at all
            raise UsageError(f"{path} has no rows: pass a file with at least one text.") from error
        cause = error.__cause__ or error
        if isinstance(cause, StopIteration) or "No columns to parse" in str(cause):  # an empty file
            raise UsageError(f"{path} is empty: pass a file with a header and at least one text.") from error
        raise UsageError(f"{path} cannot be read as a {file_format} file ({_one_line(cause)}): fix that, or pass "
                         "the file in another format (csv, tsv, jsonl, parquet, UTF-8 text).") from error
    finally:
        datasets.logging.set_verbosity(verbosity)


def _one_line(error: BaseException) -> str:
    """The error's type and the first line of its message."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


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


def fingerprint(args: PredictArguments, world_size: int = 1) -> dict:
    """The settings a run resumes only if they are unchanged: SHA-256 of the input file and of the model's files (a
    local folder; a Hub name as given), and the arguments that decide the answers or the chunks; with a speed-up
    budget also the number of processes, as each process's budget depends on the chunks it is given."""
    settings = {name: getattr(args, name) for name in _FINGERPRINTED}
    if args.target_speedup is not None:
        settings["world_size"] = world_size
    settings["input_sha256"] = sha256([Path(args.input_file)])
    model = Path(args.model)
    if model.is_dir():
        # Not the command's own files, where the output goes into the model's folder: they change as the run goes.
        own = [work_folder(args).resolve(), Path(args.output_file).resolve()]
        files = sorted(path for path in model.rglob("*") if path.is_file()
                       and not any(path.resolve() == mine or mine in path.resolve().parents for mine in own))
        settings["model_sha256"] = sha256(files, root=model)
    else:
        settings["model_sha256"] = args.model
    return settings


def work_folder(args: PredictArguments) -> Path:
    """The work folder of a run: `--work_dir`, else `<output_file>.partial` beside the output."""
    output = Path(args.output_file)
    return Path(args.work_dir) if args.work_dir else output.with_name(output.name + ".partial")


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    """Command-line entry point (`de3-predict`, `python -m de3_transformers predict`; `prog`: the command's name in
    its messages).

    Raises:
        SystemExit: with status 2 for a user mistake (a `UsageError` of `PredictArguments` or `predict`, or an unknown
            argument), after printing `<prog>: error: <message>` to stderr, as `argparse` does; for what `argparse`
            refuses itself; with status 0 after `--help`. Any other error is raised as it is, with its traceback.
    """
    parser = HfArgumentParser(PredictArguments, prog=prog, description=__doc__.split("\n\n")[0])
    with refusing_usage_errors(parser):
        (args,) = parse_arguments(parser, argv)
        predict(args)


def predict(args: PredictArguments) -> PredictionSummary | None:
    """Scores `args.input_file` into `args.output_file`, resuming an interrupted run of the same arguments, and prints
    a summary. Under a launcher (`WORLD_SIZE` above 1) each process scores its share of the chunks; process 0 writes
    the output, prints the summary and returns it, the others return `None` (when the output is written).

    Raises:
        UsageError: (a `ValueError`) for a text column missing or holding other values than texts (a missing value), a
            new column that is already in the input (pass --column_prefix), an empty input, exit options or a
            `max_length` the model refuses (also a `target_speedup` out of range or for a policy without a threshold),
            a work folder left by a run with another input, model or arguments (or, with `target_speedup`, another
            number of processes), a work folder holding files the command did not write, a work folder another run
            is writing (it holds the folder's lock), an input file that cannot be read (see `read_table`), or, for a
            tsv output, a text with a tab or line break.
        OutputExistsError: (a `UsageError` and a `FileExistsError`) when the output file exists and no run of these
            arguments is to be resumed (pass --overwrite_output_file).
        ValueError: for a model that is not a DE3 model, or a work folder whose shards do not match its records.
        RuntimeError: as `Processes.from_environment`.
    """
    processes = Processes.from_environment()
    try:
        return _predict(args, processes)
    finally:
        processes.close()


def _predict(args: PredictArguments, processes: Processes) -> PredictionSummary | None:
    if processes.rank > 0:  # process 0 reports for all; the others print only errors
        _quiet()
    data = read_table(args.input_file, args.input_format)  # each process reads the file itself (no cache is shared)
    _check_input(data, args)
    work = work_folder(args)
    check_work_folder(work)
    settings = fingerprint(args, processes.world_size)
    _check_output(read_records(work, settings), args)  # a first look, to refuse before loading the model
    classifier = _load_classifier(args, processes)  # refuses bad exit options before any work is saved
    # Process 0 holds the work folder's lock for the whole run (the launched processes are one run); the others wait
    # for it before they read the records.
    lock, made = lock_work(work) if processes.rank == 0 else (None, False)
    try:
        processes.barrier()
        records = read_records(work, settings)  # again under the lock: a run that held it may have ended meanwhile
        _check_output(records, args)
        own_folder = made or not args.work_dir or any(record.get("own_folder") for record in records)
        return _run(data, classifier, work, settings, records, own_folder, processes, args)
    finally:
        if lock is not None:
            unlock_work(lock)


def _check_output(records: list[dict], args: PredictArguments) -> None:
    output = Path(args.output_file)
    if not records and output.exists() and not args.overwrite_output_file:
        raise OutputExistsError(f"{output} exists: pass --overwrite_output_file to replace it (or another "
                                "--output_file).")


def _run(data: datasets.Dataset, classifier: EarlyExitClassifier, work: Path, settings: dict, records: list[dict],
         own_folder: bool, processes: Processes, args: PredictArguments) -> PredictionSummary | None:
    start_threshold = classifier.threshold
    num_chunks = -(-len(data) // args.chunk_size)
    if num_chunks < processes.world_size and processes.rank == 0:
        logger.warning(f"{num_chunks} chunk(s) of {args.chunk_size} rows for {processes.world_size} processes: some "
                       "have nothing to do; pass a smaller --chunk_size.")
    done = {index for record in records for index in record["chunks"]}
    if records and processes.rank == 0:
        print(f"Resuming from {work}: {len(done)} of {num_chunks} chunks "
              f"({sum(_chunk_rows(index, len(data), args) for index in done)} texts) were scored by an earlier run.")
    processes.barrier()  # every process has read the records before any writes its own
    place = (processes.rank, processes.world_size)
    record = next((record for record in records if (record["rank"], record["world_size"]) == place), None)
    if record is None:
        record = new_record(settings, num_chunks, *place, own_folder=own_folder and processes.rank == 0)
    if record["budget"] is not None:  # go on as the interrupted run would have
        classifier.budget.load_state_dict(record["budget"])
    write_record(work, record)
    share = [index for index in range(processes.rank, num_chunks, processes.world_size) if index not in done]
    texts_scored, seconds = _score_chunks(data, classifier, work, record, share, processes, args)
    budget = classifier.budget
    counts = processes.gather([texts_scored, seconds, math.nan if budget is None else budget.threshold,
                               math.nan if budget is None else budget.speedup])  # by rank, in process 0
    summary = None
    if processes.rank == 0:
        predictions = _assemble(data, work, num_chunks, own_folder, args)
        summary = _summarize(predictions, counts, classifier.num_hidden_layers, start_threshold, args)
        _print_summary(summary, args)
    processes.barrier()  # so that every process returns once the output is written
    return summary


def _load_classifier(args: PredictArguments, processes: Processes) -> EarlyExitClassifier:
    """The classifier of `args.model` with the options of `args`.

    Raises:
        UsageError: for exit options, a `target_speedup` or a `max_length` that the model refuses.
        ValueError: for a model that is not a DE3 model.
    """
    loaded = EarlyExitClassifier.from_pretrained(  # the model as saved: errors while loading keep their traceback
        args.model, device=processes.device(args.device) if args.backend == "pytorch" else None, backend=args.backend)
    scorer = loaded.scorer
    try:  # handed a loaded model, the constructor raises ValueError only to refuse the options it is given
        return EarlyExitClassifier(
            scorer.runner if args.backend == "onnxruntime" else scorer.model, loaded.tokenizer, backend=args.backend,
            batch_size=args.batch_size, max_length=args.max_length, policy=args.policy, threshold=args.threshold,
            lam=args.lam, patience=args.patience, target_speedup=args.target_speedup,
        )
    except ValueError as error:
        raise UsageError(f"{args.model} refuses these options: {error}") from error


def _summarize(predictions: dict, counts: list[list[float]], num_hidden_layers: int, start_threshold: float | None,
               args: PredictArguments) -> PredictionSummary:
    """The summary of all rows (`predictions`, the new columns) and of each process's work in this run (`counts`: texts
    scored, seconds, the budget's threshold and speed-up; by rank)."""
    labels = predictions[args.column_prefix + "label"]
    layers = predictions[args.column_prefix + "exit_layer"]
    per_process = [int(row[0]) for row in counts]
    seconds = max(row[1] for row in counts)  # the processes ran side by side
    return PredictionSummary(
        texts=len(layers), texts_scored=sum(per_process), texts_resumed=len(layers) - sum(per_process),
        seconds=seconds, texts_per_second=sum(per_process) / seconds if seconds else 0.0,
        speedup=num_hidden_layers * len(layers) / sum(layers),
        label_counts={name: count for name, count in sorted(Counter(labels).items())}, output_file=args.output_file,
        processes=len(counts), texts_scored_per_process=per_process, target_speedup=args.target_speedup,
        start_threshold=start_threshold,
        thresholds=None if args.target_speedup is None else [row[2] for row in counts],
        budget_speedups=None if args.target_speedup is None else [row[3] for row in counts],
    )


def _check_input(data: datasets.Dataset, args: PredictArguments) -> None:
    if len(data) == 0:
        raise UsageError(f"{args.input_file} has no rows: pass a file with at least one text.")
    for name, flag in ((args.text_column, "--text_column"), (args.text_pair_column, "--text_pair_column")):
        if name is None:
            continue
        if name not in data.column_names:
            raise UsageError(f"{args.input_file} has no column {name!r} (it has {data.column_names}): pass {flag}.")
        column = data.data.column(name)
        if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
            raise UsageError(f"Column {name!r} holds {column.type} values, not texts: pass {flag} naming the text.")
        if column.null_count:
            missing = [index for index, value in enumerate(data[name]) if value is None][:5]
            raise UsageError(f"Column {name!r} has {column.null_count} missing texts (rows {missing}, counted from 0, "
                             "first ones): fill or drop them.")
    taken = [args.column_prefix + name for name in PREDICTION_COLUMNS if args.column_prefix + name in data.column_names]
    if taken:
        raise UsageError(f"{args.input_file} already has the column(s) {taken}: pass --column_prefix (e.g. "
                         "predicted_) to add the predictions beside them.")
    if args.resolved_output_format == "tsv":
        _check_tsv_cells(data, args)


def _check_tsv_cells(data: datasets.Dataset, args: PredictArguments) -> None:
    """Refuses, before any scoring, a text that a tsv output cannot hold: tsv is written and read without quoting (as
    GLUE files are), so a tab or line break in a cell would split it."""
    for name in data.column_names:
        column = data.data.column(name)
        if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
            continue
        found = pc.fill_null(pc.match_substring_regex(column, "[\t\n\r]"), False)
        if pc.any(found).as_py():
            rows = pc.indices_nonzero(found).to_pylist()
            raise UsageError(f"Row {rows[0]} (counted from 0; {len(rows)} rows in all) of column {name!r} of "
                             f"{args.input_file} holds a tab or line break, which a tsv output (written without "
                             "quoting) cannot hold: pass --output_format csv, jsonl or parquet.")


def _score_chunks(data, classifier: EarlyExitClassifier, work: Path, record: dict, chunks: list[int],
                  processes: Processes, args: PredictArguments) -> tuple[int, float]:
    """Scores `chunks`, saving each one's shard and then the process's record (with the budget's state); returns the
    texts scored and the seconds it took."""
    columns = [name for name in (args.text_column, args.text_pair_column) if name is not None]
    texts = data.select_columns(columns)
    size = args.chunk_size
    share = sum(_chunk_rows(index, len(data), args) for index in range(processes.rank, record["num_chunks"],
                                                                         processes.world_size))
    description = f"Scoring (process 0 of {processes.world_size})" if processes.distributed else "Scoring"
    bar = logging.tqdm(total=share, initial=share - sum(_chunk_rows(index, len(data), args) for index in chunks),
                       unit="text", desc=description, disable=None if processes.rank == 0 else True)
    texts_done = sum(_chunk_rows(index, len(data), args) for index in record["chunks"])
    started, scored = time.perf_counter(), 0
    for index in chunks:
        rows = texts[index * size : (index + 1) * size]
        labels, scores, layers = classifier.predict(rows[args.text_column],
                                                    rows[args.text_pair_column] if args.text_pair_column else None)
        write_shard(work, index, pa.table({"label": pa.array(labels, pa.string()),
                                           "score": pa.array(scores, pa.float64()),
                                           "exit_layer": pa.array(layers, pa.int64())}))
        record["chunks"].append(index)
        record.update(chunks_done=len(record["chunks"]), layers_run=record["layers_run"] + sum(layers),
                      budget=None if classifier.budget is None else classifier.budget.state_dict())
        write_record(work, record)
        scored, texts_done = scored + len(layers), texts_done + len(layers)
        speedup = classifier.num_hidden_layers * texts_done / record["layers_run"]
        threshold = "" if classifier.threshold is None else f", threshold {classifier.threshold:.4g}"
        bar.set_postfix_str(f"layer speed-up {speedup:.2f}x{threshold}", refresh=False)  # shown by the update
        bar.update(len(layers))
    bar.close()
    return scored, time.perf_counter() - started


def _assemble(data: datasets.Dataset, work: Path, num_chunks: int, own_folder: bool, args: PredictArguments) -> dict:
    """Writes the input rows with the shards' columns added to the output file, removes the run's files from the work
    folder (and the folder, if `own_folder`: a run of the command made it), and returns the new label and exit layer
    columns."""
    table = read_shards(work, num_chunks)
    if table.num_rows != len(data):
        raise ValueError(f"The shards in {work} hold {table.num_rows} rows, the input {len(data)}: remove that folder "
                         "and run again.")
    table = table.rename_columns([args.column_prefix + name for name in table.column_names])
    scored = datasets.concatenate_datasets([data, datasets.Dataset(datasets.table.InMemoryTable(table))], axis=1)
    output = Path(args.output_file)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_path(work, args.resolved_output_format)
    write_table(scored, staging, args.resolved_output_format)
    os.replace(staging, output)
    remove_work(work, num_chunks, remove_folder=own_folder)
    return table.select([args.column_prefix + name for name in ("label", "exit_layer")]).to_pydict()


def _print_summary(summary: PredictionSummary, args: PredictArguments) -> None:
    labels = ", ".join(f"{name} {count}" for name, count in summary.label_counts.items())
    processes = f" with {summary.processes} processes" if summary.processes > 1 else ""
    target = "" if summary.target_speedup is None else f" (target {summary.target_speedup:.2f}x)"
    print(f"Scored {summary.texts} texts of {args.input_file}{processes}: layer speed-up {summary.speedup:.2f}x"
          f"{target}; labels: {labels}.")
    if summary.thresholds is not None:
        ended = (f"{summary.thresholds[0]:.4g}" if summary.processes == 1 else ", ".join(
            f"{threshold:.4g} in process {rank} ({speedup:.2f}x over its texts)"
            for rank, (threshold, speedup) in enumerate(zip(summary.thresholds, summary.budget_speedups))))
        print(f"Speed-up budget: the threshold started at {summary.start_threshold:.4g} and ended at {ended}.")
    shares = ("" if summary.processes == 1 else " (" + ", ".join(
        f"process {rank} {count}" for rank, count in enumerate(summary.texts_scored_per_process)) + ")")
    resumed = f"; {summary.texts_resumed} were scored by an earlier run" if summary.texts_resumed else ""
    print(f"This run scored {summary.texts_scored}{shares} in {summary.seconds:.2f} s, "
          f"{summary.texts_per_second:.1f} texts/s{resumed}.")
    print(f"Wrote {summary.output_file}")


def _chunk_rows(index: int, total: int, args: PredictArguments) -> int:
    return min(args.chunk_size, total - index * args.chunk_size)


def _quiet() -> None:
    """Silences the libraries' logs, progress bars and warnings: under a launcher, one process reports for all."""
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    warnings.simplefilter("ignore")


__all__ = ["FORMATS", "PROGRESS_NAME", "PredictArguments", "PredictionSummary", "fingerprint", "main", "predict",
           "read_table", "write_table"]
