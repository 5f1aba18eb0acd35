"""The predict command's reliability: it overwrites and removes only what it wrote, refuses a work folder of another's
files and a run that another run is writing, reads a rewritten input as it is now, refuses an unreadable input and a
tsv output it could not write in one line (exit status 2), before any scoring, and resumes with its output in the
model's folder."""

import json
import os
import shutil
import subprocess
import sys
import time

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from de3_transformers import EarlyExitClassifier
from de3_transformers.predict_cli import PROGRESS_NAME, main

from test_predict_cli import (  # noqa: F401 (sst2_csv: a fixture of these tests too)
    REPOSITORY, arguments, assert_refused, interrupt_after, refused, run_command, sst2_csv)


@pytest.fixture
def small_csv(sst2_csv, tmp_path):
    """The first 30 SST-2 sentences (5 chunks)."""
    path = tmp_path / "small.csv"
    pd.read_csv(sst2_csv).head(30).to_csv(path, index=False)
    return path


def test_a_work_dir_holding_the_users_files_is_refused_and_left_as_it_was(minilm_checkpoint, small_csv, tmp_path,
                                                                          capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "output.csv").write_text("my own results")
    output = tmp_path / "scored.csv"
    printed = refused(arguments(minilm_checkpoint, small_csv, output, "--work_dir", str(folder)), capsys)
    assert "holds files the predict command did not write (['output.csv'])" in printed
    assert "pass as --work_dir a new or empty folder" in printed
    assert (folder / "output.csv").read_text() == "my own results" and not output.exists()


def test_an_existing_empty_work_dir_is_kept_and_a_new_one_removed(minilm_checkpoint, small_csv, tmp_path):
    existing, new = tmp_path / "existing", tmp_path / "new"
    existing.mkdir()
    main(arguments(minilm_checkpoint, small_csv, tmp_path / "a.csv", "--work_dir", str(existing)))
    main(arguments(minilm_checkpoint, small_csv, tmp_path / "b.csv", "--work_dir", str(new)))
    assert existing.is_dir() and list(existing.iterdir()) == []  # the user's folder: only the run's files went
    assert not new.exists()  # the run made it
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()


def test_a_work_dir_with_a_progress_json_the_command_did_not_write_is_refused(minilm_checkpoint, small_csv, tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / PROGRESS_NAME).write_text('{"epoch": 3}')
    run = run_command("predict", *arguments(minilm_checkpoint, small_csv, tmp_path / "scored.csv", "--work_dir",
                                            str(folder)))
    assert_refused(run, rf"{folder} holds a progress\.json that is not a progress record of the predict command .*"
                        r"pass another --work_dir")
    assert (folder / PROGRESS_NAME).read_text() == '{"epoch": 3}'


def test_texts_a_tsv_output_cannot_hold_are_refused_before_scoring(minilm_checkpoint, tmp_path, monkeypatch, capsys):
    source = tmp_path / "texts.csv"
    pd.DataFrame({"text": ["fine", "two\nlines", "a\ttab"]}).to_csv(source, index=False)
    scored = []
    monkeypatch.setattr(EarlyExitClassifier, "predict", lambda self, texts, pairs=None: scored.extend(texts))
    printed = refused(["--model", str(minilm_checkpoint), "--input_file", str(source), "--output_file",
                       str(tmp_path / "out.tsv")], capsys)
    assert "Row 1 (counted from 0; 2 rows in all) of column 'text'" in printed
    assert "holds a tab or line break" in printed and "pass --output_format csv, jsonl or parquet" in printed
    assert scored == [] and sorted(path.name for path in tmp_path.iterdir()) == ["texts.csv"]


def duplicate_parquet_columns(path):
    pq.write_table(pa.Table.from_arrays([pa.array(["a"]), pa.array(["b"])], names=["text", "text"]), path)


@pytest.mark.parametrize("name, content, message", [
    ("empty.csv", b"", r"empty\.csv is empty: pass a file with a header and at least one text"),
    ("header.csv", b"text,id\n", r"header\.csv has no rows: pass a file with at least one text"),
    ("bad.jsonl", b'{"text": "a"}\n{bad\n', r"bad\.jsonl cannot be read as a jsonl file \(ArrowInvalid: JSON parse "
                                            r"error.*\): fix that"),
    ("latin.csv", b"text\ncaf\xe9\n", r"latin\.csv cannot be read as a csv file \(UnicodeDecodeError: 'utf-8' codec"),
    ("twice.parquet", duplicate_parquet_columns, r"twice\.parquet has the column\(s\) \['text'\] more than once"),
], ids=["empty", "header_only", "bad_jsonl_line", "not_utf8", "duplicate_parquet_columns"])
def test_an_unreadable_input_is_refused_in_one_line(minilm_checkpoint, tmp_path, name, content, message):
    source = tmp_path / name
    content(source) if callable(content) else source.write_bytes(content)
    run = run_command("predict", "--model", str(minilm_checkpoint), "--input_file", str(source), "--output_file",
                      str(tmp_path / "out.csv"))
    assert_refused(run, message)


def test_a_killed_run_with_its_output_in_the_model_folder_resumes(minilm_checkpoint, small_csv, tmp_path, monkeypatch,
                                                                   capsys):
    model = tmp_path / "model"
    shutil.copytree(minilm_checkpoint, model)
    output = model / "scored.csv"
    with monkeypatch.context() as patch:  # leaves model/scored.csv.partial/ with 2 of 5 chunks done
        interrupt_after(patch, 2)
        with pytest.raises(KeyboardInterrupt):
            main(arguments(model, small_csv, output))
    capsys.readouterr()
    main(arguments(model, small_csv, output))
    assert "2 of 5 chunks (12 texts) were scored by an earlier run" in capsys.readouterr().out
    main(arguments(model, small_csv, output, "--overwrite_output_file"))  # the output in the folder: still the model
    assert len(pd.read_csv(output)) == 30


def test_a_rewritten_input_is_read_as_it_is_now_whatever_its_modification_time(minilm_checkpoint, sst2_csv, tmp_path):
    rows = pd.read_csv(sst2_csv)
    source = tmp_path / "s.csv"
    rows.head(12).to_csv(source, index=False)
    main(arguments(minilm_checkpoint, source, tmp_path / "first.csv"))
    stamp = os.stat(source)
    rows.iloc[100:112].to_csv(source, index=False)  # other rows, as a rewrite within the same clock tick leaves them
    os.utime(source, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    main(arguments(minilm_checkpoint, source, tmp_path / "second.csv"))
    assert pd.read_csv(tmp_path / "second.csv")["sentence"].tolist() == rows["sentence"].tolist()[100:112]


def test_a_second_run_on_the_same_output_is_refused_while_the_first_writes_it(minilm_checkpoint, small_csv, tmp_path,
                                                                              capsys):
    output = tmp_path / "scored.csv"
    slow = ("import sys, time\n"  # a run whose every batch takes half a second, so that it is still running below
            "from de3_transformers import EarlyExitClassifier\n"
            "original = EarlyExitClassifier.predict\n"
            "EarlyExitClassifier.predict = lambda self, *a, **k: time.sleep(0.5) or original(self, *a, **k)\n"
            "from de3_transformers.predict_cli import main\n"
            "main(sys.argv[1:])\n")
    env = {**os.environ, "PYTHONPATH": str(REPOSITORY), "HF_HUB_OFFLINE": "1"}
    first = subprocess.Popen([sys.executable, "-c", slow, *arguments(minilm_checkpoint, small_csv, output)],
                             cwd=REPOSITORY, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    record = tmp_path / "scored.csv.partial" / PROGRESS_NAME
    deadline = time.monotonic() + 300
    while first.poll() is None and time.monotonic() < deadline and not (
            record.is_file() and json.loads(record.read_text())["chunks_done"] >= 1):
        time.sleep(0.01)
    try:
        printed = refused(arguments(minilm_checkpoint, small_csv, output), capsys)
        still_running = first.poll() is None
    finally:
        log = first.communicate(timeout=300)[0].decode()
    assert still_running, log[-3000:]
    assert f"Another predict run is writing {tmp_path / 'scored.csv.partial'}" in printed
    assert first.returncode == 0, log[-3000:]
    scored = pd.read_csv(output)
    assert scored["sentence"].tolist() == pd.read_csv(small_csv)["sentence"].tolist()  # each row once, in order
    assert not (tmp_path / "scored.csv.partial").exists()
