"""Offline-friendly labelled text data for the examples: local GLUE-style files and the VADER movie reviews.

`datasets` does the loading; what is written here is only what no library provides: fetching the VADER
ground truth, which ships inside the source distribution of the PyPI package `vaderSentiment==3.3.2` (MIT), through
pip, so it works wherever the package registry is reachable and no dataset hub is.
"""

import csv
import io
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import datasets


VADER_REQUIREMENT = "vaderSentiment==3.3.2"
VADER_MOVIE_MEMBER = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"


def default_cache_dir() -> Path:
    return Path(os.environ.get("DE3_CACHE", Path.home() / ".cache" / "de3_transformers"))


def fetch_vader_movie_reviews(cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of the VADER movie-review ground truth (10,605 rated snippets), fetched once through pip and cached.

    Raises:
        RuntimeError: if pip cannot download the source distribution (no package registry reachable).
    """
    target = Path(cache_dir or default_cache_dir()) / "vader" / Path(VADER_MOVIE_MEMBER).name
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as download_dir:
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                   VADER_REQUIREMENT, "-d", download_dir]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(
                f"Could not fetch {VADER_REQUIREMENT} with pip (needed for the VADER movie reviews): "
                f"{result.stderr.strip()[-500:]}. Pass your own data files instead."
            )
        (sdist,) = Path(download_dir).glob("vaderSentiment-*.tar.gz")
        with tarfile.open(sdist) as outer:
            inner_name = next(name for name in outer.getnames() if name.endswith("hutto_ICWSM_2014.tar.gz"))
            with tarfile.open(fileobj=io.BytesIO(outer.extractfile(inner_name).read())) as inner:
                text = inner.extractfile(VADER_MOVIE_MEMBER).read()
    partial = target.with_suffix(".part")
    partial.write_bytes(text)
    partial.replace(target)  # atomic: a crash never leaves a half-written cache
    return target


def load_vader_movie_reviews(cache_dir=None, seed: int = 42) -> datasets.DatasetDict:
    """VADER movie snippets as a binary sentiment task (`label` = sign of the mean rating; the 37 neutral rows
    are dropped), split 80/10/10 into `train`, `validation` and `test` with a fixed seed.

    Columns: `sentence` (str), `label` (0 negative, 1 positive).
    """
    path = fetch_vader_movie_reviews(cache_dir)
    raw = datasets.load_dataset(
        "csv", data_files={"reviews": str(path)}, delimiter="\t", quoting=csv.QUOTE_NONE,
        column_names=["id", "sentiment", "sentence"],
    )["reviews"]
    raw = raw.filter(lambda row: row["sentiment"] != 0)
    labelled = raw.map(lambda row: {"label": int(row["sentiment"] > 0)}, remove_columns=["id", "sentiment"])
    labelled = labelled.cast_column("label", datasets.ClassLabel(names=["negative", "positive"]))
    first = labelled.train_test_split(test_size=0.2, seed=seed, stratify_by_column="label")
    held_out = first["test"].train_test_split(test_size=0.5, seed=seed, stratify_by_column="label")
    return datasets.DatasetDict(train=first["train"], validation=held_out["train"], test=held_out["test"])




# GLUE tasks: text columns (Hub names), label names, and the metrics GLUE reports.
GLUE_TASKS = {
    "cola": (("sentence", None), ["unacceptable", "acceptable"], ("matthews_correlation",)),
    "sst2": (("sentence", None), ["negative", "positive"], ("accuracy",)),
    "mrpc": (("sentence1", "sentence2"), ["not_equivalent", "equivalent"], ("accuracy", "f1")),
    "qqp": (("question1", "question2"), ["not_duplicate", "duplicate"], ("accuracy", "f1")),
    "mnli": (("premise", "hypothesis"), ["entailment", "neutral", "contradiction"], ("accuracy",)),
    "qnli": (("question", "sentence"), ["entailment", "not_entailment"], ("accuracy",)),
    "rte": (("sentence1", "sentence2"), ["entailment", "not_entailment"], ("accuracy",)),
}

# The local GLUE TSV files (as GLUE's own download script writes them): folder, and how to read each task.
_GLUE_TSV = {
    "cola": ("CoLA", {"column_names": ["source", "label", "original_label", "sentence"]}, {}),
    "sst2": ("SST-2", {}, {}),
    "mrpc": ("MRPC", {}, {"Quality": "label", "#1 String": "sentence1", "#2 String": "sentence2"}),
    "rte": ("RTE", {}, {}),
    "qnli": ("QNLI", {}, {}),
    "qqp": ("QQP", {}, {"is_duplicate": "label"}),
    "mnli": ("MNLI", {}, {"sentence1": "premise", "sentence2": "hypothesis", "gold_label": "label"}),
}


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub answers: a quick check, so offline machines fall back at once instead of
    waiting for `datasets`' retries."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    endpoint = urlparse(constants.ENDPOINT)  # honours HF_ENDPOINT (a mirror)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def load_glue_task(task: str, glue_dir: str | os.PathLike | None = None) -> datasets.DatasetDict:
    """A GLUE task with `train` and `validation` splits and an integer `label` column (Hub column names).

    Reads the GLUE TSV files under `glue_dir/<Task>/` when given (`quoting=3`: GLUE text has bare quotes),
    else loads `nyu-mll/glue` from the Hub.

    Raises:
        ValueError: for an unknown task.
        FileNotFoundError: if `glue_dir` lacks the task's files.
        ConnectionError: if no `glue_dir` is given and the Hub cannot be reached.
    """
    if task not in GLUE_TASKS:
        raise ValueError(f"Unknown GLUE task {task!r}; choose one of {sorted(GLUE_TASKS)}.")
    if glue_dir is None:
        if not hub_reachable():
            raise ConnectionError(
                f"The Hub is unreachable, so GLUE {task} cannot be downloaded; pass the folder of the GLUE TSV files "
                "(glue_dir / --glue_dir) or your own files (--train_file/--validation_file)."
            )
        loaded = datasets.load_dataset("nyu-mll/glue", task)
        validation = "validation_matched" if task == "mnli" else "validation"
        return datasets.DatasetDict(train=loaded["train"], validation=loaded[validation])
    folder, read_options, renames = _GLUE_TSV[task]
    paths = {"train": Path(glue_dir) / folder / "train.tsv", "validation": Path(glue_dir) / folder / "dev.tsv"}
    if task == "mnli":
        paths["validation"] = paths["validation"].with_name("dev_matched.tsv")
    for path in paths.values():
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: glue_dir must hold GLUE's {folder}/ folder.")
    loaded = datasets.load_dataset("csv", data_files={k: str(v) for k, v in paths.items()}, delimiter="\t",
                                   quoting=csv.QUOTE_NONE, **read_options)
    loaded = loaded.rename_columns({old: new for old, new in renames.items() if old in loaded["train"].column_names})
    # GLUE TSVs store some labels as names (RTE, QNLI, MNLI) and others as integers: ClassLabel takes both.
    return loaded.cast_column("label", datasets.ClassLabel(names=GLUE_TASKS[task][1]))


def load_local_files(train_file=None, validation_file=None, test_file=None) -> datasets.DatasetDict:
    """Local csv/tsv/json(l) files as a `DatasetDict` (`train`, `validation`, `test` as given).

    Raises:
        ValueError: if no file is given, or the files have different formats.
    """
    files = {split: str(path) for split, path in
             (("train", train_file), ("validation", validation_file), ("test", test_file)) if path}
    if not files:
        raise ValueError("Give at least one of train_file, validation_file, test_file.")
    extensions = {Path(path).suffix.lower().lstrip(".") for path in files.values()}
    if len(extensions) != 1 or not extensions <= {"csv", "tsv", "json", "jsonl"}:
        raise ValueError(f"Data files must all be csv, tsv or json(l); got {sorted(extensions)}.")
    extension = extensions.pop()
    if extension == "tsv":
        return datasets.load_dataset("csv", data_files=files, delimiter="\t", quoting=csv.QUOTE_NONE)
    return datasets.load_dataset("json" if extension.startswith("json") else "csv", data_files=files)


__all__ = [
    "GLUE_TASKS",
    "fetch_vader_movie_reviews",
    "hub_reachable",
    "load_glue_task",
    "load_local_files",
    "load_vader_movie_reviews",
]
