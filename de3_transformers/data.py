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


__all__ = ["fetch_vader_movie_reviews", "load_vader_movie_reviews"]
