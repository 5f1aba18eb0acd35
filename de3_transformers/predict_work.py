"""The work folder of the predict command (`<output_file>.partial/`): one parquet shard per finished chunk and one
progress record per process, each replaced atomically, so that a run killed at any point leaves what a resumed run
needs and nothing half written.

A process's record lists the chunks it finished, in order, the encoder layers they ran and, with a speed-up budget,
the budget's state after the last one. A chunk is finished once a record lists it, whichever process did it: a run
with another number of processes skips it too. One process writes `progress.json`; process `r` of `n` writes
`progress-rank{r}-of-{n}.json`.

The folder holds nothing else but the run's lock (`lock`) and, at the end, the output being written: a run refuses a
folder holding other files (a --work_dir may be any folder, and only what the command wrote may be overwritten or
removed), and removes the folder only if a run of the command made it.
"""

import hashlib
import json
import os
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .cli_errors import UsageError


PROGRESS_NAME = "progress.json"
_RECORD_PATTERN = "progress-rank*-of-*.json"
LOCK_NAME = "lock"
_OUTPUT_STEM = "predict-output"
# The names of the files a run writes in its work folder (each also as `<name>.tmp` while being written).
_OWN_NAMES = re.compile(r"(progress\.json|progress-rank\d+-of-\d+\.json|chunk-\d{6,}\.parquet|lock|"
                        rf"{_OUTPUT_STEM}\.\w+)(\.tmp)?")


def record_name(rank: int, world_size: int) -> str:
    """The file name of the progress record of process `rank` of `world_size`."""
    return PROGRESS_NAME if world_size == 1 else f"progress-rank{rank}-of-{world_size}.json"


def read_records(work: Path, settings: dict) -> list[dict]:
    """The progress records of interrupted runs in `work` (none when there is no such folder).

    Raises:
        UsageError: (a `ValueError`) when a record's run had other settings, or a file named as a record is not one
            (the command did not write it).
    """
    paths = [path for path in [work / PROGRESS_NAME, *sorted(work.glob(_RECORD_PATTERN))] if path.is_file()]
    records = [_read_record(path, work) for path in paths]
    for record in records:
        changed = sorted(key for key in set(settings) | set(record["settings"])
                         if settings.get(key) != record["settings"].get(key))
        if changed:
            was = {key: record["settings"].get(key) for key in changed}
            raise UsageError(f"{work} holds an interrupted run with another {', '.join(changed)} (it was {was}): "
                             "rerun with the arguments and files it was started with, or remove that folder to start "
                             "again (or pass another --work_dir).")
        # Records written before they listed their chunks counted a prefix of them.
        record.setdefault("chunks", list(range(record["chunks_done"])))
        record.setdefault("rank", 0)
        record.setdefault("world_size", 1)
        record.setdefault("budget", None)
    return records


def _read_record(path: Path, work: Path) -> dict:
    """The progress record in `path`.

    Raises:
        UsageError: when `path` holds something else than a record (a file of the user's in a --work_dir).
    """
    try:
        record = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError):
        record = None
    if not isinstance(record, dict) or not isinstance(record.get("settings"), dict):
        raise UsageError(f"{work} holds a {path.name} that is not a progress record of the predict command (it did "
                         "not write it): pass another --work_dir (a new or empty folder), or move that file away.")
    return record


def check_work_folder(work: Path) -> None:
    """Refuses a work folder that holds anything the command did not write, so that no file of the user's is
    overwritten or removed (a missing folder is fine).

    Raises:
        UsageError: when `work` is not a folder, or holds other files than a run's.
    """
    if not work.exists():
        return
    if not work.is_dir():
        raise UsageError(f"The work folder {work} is a file: pass as --work_dir a new or empty folder.")
    foreign = sorted(path.name for path in work.iterdir() if not _OWN_NAMES.fullmatch(path.name))
    if foreign:
        raise UsageError(f"The work folder {work} holds files the predict command did not write ({foreign[:5]}): "
                         "pass as --work_dir a new or empty folder (the command overwrites and removes what is in "
                         "its work folder).")


def lock_work(work: Path) -> tuple[int, bool]:
    """Takes the exclusive lock of the work folder (making the folder if missing) for the rest of the run, so that two
    runs never write the same folder and output; returns the lock's file descriptor (for `unlock_work`) and whether
    this call made the folder.

    Raises:
        UsageError: when another run holds the lock.
    """
    import fcntl  # POSIX only: imported where used

    while True:
        made = not work.exists()
        work.mkdir(parents=True, exist_ok=True)
        path = work / LOCK_NAME
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            raise UsageError(f"Another predict run is writing {work} (it holds {path}): wait until it ends, or pass "
                             "another --output_file or --work_dir.") from None
        try:
            current = os.stat(path).st_ino == os.fstat(descriptor).st_ino
        except FileNotFoundError:
            current = False
        if current:
            return descriptor, made
        # A run that held the lock until now removed its file on finishing: lock the file that is there now.
        os.close(descriptor)


def unlock_work(descriptor: int) -> None:
    """Releases the lock `lock_work` took."""
    os.close(descriptor)


def new_record(settings: dict, num_chunks: int, rank: int, world_size: int, own_folder: bool = False) -> dict:
    """The progress record of a process that has finished no chunk yet (`own_folder`: whether a run of the command
    made the work folder, which is then removed at the end)."""
    return {"settings": settings, "num_chunks": num_chunks, "rank": rank, "world_size": world_size, "chunks": [],
            "chunks_done": 0, "layers_run": 0, "budget": None, "own_folder": own_folder}


def write_record(work: Path, record: dict) -> None:
    """Replaces the record's file in `work` (made if missing) atomically."""
    work.mkdir(parents=True, exist_ok=True)
    path = work / record_name(record["rank"], record["world_size"])
    write_atomically(path, json.dumps(record, indent=2).encode())


def write_shard(work: Path, index: int, table: pa.Table) -> None:
    """Saves the predictions of chunk `index` (atomically: a shard on disk is a whole one)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    write_atomically(shard_path(work, index), sink.getvalue().to_pybytes())


def read_shards(work: Path, num_chunks: int) -> pa.Table:
    """The predictions of every chunk, in chunk order.

    Raises:
        ValueError: when a shard is missing.
    """
    shards = [shard_path(work, index) for index in range(num_chunks)]
    missing = [path.name for path in shards if not path.is_file()]
    if missing:
        raise ValueError(f"{work} lacks the shards {missing[:5]} that its progress records count as done: remove "
                         "that folder and run again.")
    return pa.concat_tables([pq.read_table(path) for path in shards])


def remove_work(work: Path, num_chunks: int, remove_folder: bool = True) -> None:
    """Removes the files of the run from `work` (its lock last: call it holding the lock), and `work` itself when
    `remove_folder` (a run of the command made it) and nothing else is in it."""
    records = [work / PROGRESS_NAME, *work.glob(_RECORD_PATTERN)]
    for path in [*(shard_path(work, index) for index in range(num_chunks)), *records, work / LOCK_NAME]:
        path.unlink(missing_ok=True)
        path.with_name(path.name + ".tmp").unlink(missing_ok=True)  # left by a run killed while writing
    if remove_folder:
        try:
            work.rmdir()
        except OSError:
            pass


def staging_path(work: Path, file_format: str) -> Path:
    """Where the output is written before it is moved to `--output_file`."""
    return work / f"{_OUTPUT_STEM}.{file_format}"


def shard_path(work: Path, index: int) -> Path:
    return work / f"chunk-{index:06d}.parquet"


def write_atomically(path: Path, content: bytes) -> None:
    """Writes `content` to `path` so that a reader (or a run after a crash) sees the old file or the new one, never
    a part: written beside it, flushed to disk, then moved in with `os.replace`."""
    staging = path.with_name(path.name + ".tmp")
    with open(staging, "wb") as file:
        file.write(content)
        file.flush()
        os.fsync(file.fileno())
    os.replace(staging, path)


def sha256(paths: list[Path], root: Path | None = None) -> str:
    """SHA-256 of the files' contents (and of their paths relative to `root`, when given), in the order given."""
    digest = hashlib.sha256()
    for path in paths:
        if root is not None:
            digest.update(str(path.relative_to(root)).encode() + b"\0")
        with open(path, "rb") as file:
            for block in iter(lambda: file.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


__all__ = ["LOCK_NAME", "PROGRESS_NAME", "check_work_folder", "lock_work", "new_record", "read_records", "read_shards",
           "record_name", "remove_work", "sha256", "shard_path", "staging_path", "unlock_work", "write_atomically",
           "write_record", "write_shard"]
