"""The predict command: the input rows, in order, with the predictions added; an interrupted run (killed with
SIGKILL) resumes without scoring finished chunks again and writes what an uninterrupted run writes, also with a
speed-up budget; a run with other input or arguments refuses to resume; a user mistake ends the command with one line
naming it and exit status 2, no traceback; processes started by torchrun share the chunks and write what one process
writes."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from de3_transformers import EarlyExitClassifier
from de3_transformers.__main__ import main as package_main
from de3_transformers.cli_errors import OutputExistsError, UsageError
from de3_transformers.data import load_glue_task
from de3_transformers.predict_cli import PROGRESS_NAME, PredictArguments, fingerprint, main, predict
from de3_transformers.process_group import Processes

from conftest import loopback_only


REPOSITORY = Path(__file__).resolve().parents[1]
ROWS, CHUNK = 240, 6  # 40 chunks: a kill lands in the middle even on a fast machine


@pytest.fixture(scope="module")
def sst2_csv(glue_dir, tmp_path_factory):
    """240 SST-2 dev sentences and their gold labels, as a csv file."""
    rows = load_glue_task("sst2", glue_dir)["validation"].select(range(ROWS))
    path = tmp_path_factory.mktemp("input") / "sst2.csv"
    pd.DataFrame({"sentence": rows["sentence"], "label": rows["label"]}).to_csv(path, index=False)
    return path


def arguments(checkpoint, input_file, output_file, *extra) -> list[str]:
    return ["--model", str(checkpoint), "--input_file", str(input_file), "--output_file", str(output_file),
            "--text_column", "sentence", "--column_prefix", "predicted_", "--chunk_size", str(CHUNK),
            "--batch_size", "8", *extra]


@pytest.fixture(scope="module")
def uninterrupted(minilm_checkpoint, sst2_csv, tmp_path_factory):
    """The output of one run from start to end."""
    output = tmp_path_factory.mktemp("uninterrupted") / "scored.csv"
    main(arguments(minilm_checkpoint, sst2_csv, output))
    return pd.read_csv(output)


def test_output_is_the_input_rows_in_order_with_the_predictions_added(minilm_checkpoint, sst2_csv, uninterrupted):
    source = pd.read_csv(sst2_csv)
    assert list(uninterrupted.columns) == ["sentence", "label", "predicted_label", "predicted_score",
                                           "predicted_exit_layer"]
    pd.testing.assert_frame_equal(uninterrupted[["sentence", "label"]], source)
    sample = uninterrupted.iloc[3::10]  # rows of every chunk, each at another place in its chunk
    expected = EarlyExitClassifier.from_pretrained(minilm_checkpoint, device="cpu", batch_size=8)(
        sample["sentence"].tolist())
    assert sample["predicted_label"].tolist() == [answer["label"] for answer in expected]
    assert sample["predicted_exit_layer"].tolist() == [answer["exit_layer"] for answer in expected]
    assert sample["predicted_score"].tolist() == pytest.approx([answer["score"] for answer in expected], abs=1e-5)
    assert uninterrupted["predicted_exit_layer"].nunique() >= 2


def kill_after_chunks(command: list[str], record: Path, log: Path, chunks: int = 3) -> int:
    """Runs `command` in a subprocess, kills it (SIGKILL) once its progress record counts `chunks` chunks done, and
    returns the chunks done then."""
    env = {**os.environ, "PYTHONPATH": str(REPOSITORY), "HF_HUB_OFFLINE": "1"}
    with open(log, "wb") as output:
        process = subprocess.Popen(command, cwd=REPOSITORY, env=env, stdout=output, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while process.poll() is None and time.monotonic() < deadline:
            if record.is_file() and json.loads(record.read_text())["chunks_done"] >= chunks:  # written atomically
                break
            time.sleep(0.005)
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL, log.read_text()[-3000:]
    return json.loads(record.read_text())["chunks_done"]


def test_a_killed_run_resumes_without_scoring_finished_chunks_again(minilm_checkpoint, sst2_csv, uninterrupted,
                                                                    tmp_path, capsys, monkeypatch):
    output = tmp_path / "scored.csv"
    record = tmp_path / "scored.csv.partial" / PROGRESS_NAME
    command = [sys.executable, "-m", "de3_transformers", "predict", *arguments(minilm_checkpoint, sst2_csv, output)]
    done = kill_after_chunks(command, record, tmp_path / "log.txt")
    assert 3 <= done < ROWS // CHUNK and not output.exists()

    original, scored = EarlyExitClassifier.predict, []
    monkeypatch.setattr(EarlyExitClassifier, "predict",
                        lambda self, texts, pairs=None: scored.extend(texts) or original(self, texts, pairs))
    capsys.readouterr()
    main(arguments(minilm_checkpoint, sst2_csv, output))
    printed = capsys.readouterr().out
    assert scored == pd.read_csv(sst2_csv)["sentence"].tolist()[done * CHUNK :]  # the rest, each once
    assert f"{done} of {ROWS // CHUNK} chunks ({done * CHUNK} texts) were scored by an earlier run" in printed
    assert f"This run scored {ROWS - done * CHUNK} in" in printed  # the finished chunks were not scored again
    resumed = pd.read_csv(output)
    pd.testing.assert_frame_equal(resumed, uninterrupted, check_exact=False, atol=1e-6, rtol=0)
    assert not record.parent.exists()


def carried_over_chunks(checkpoint, texts: list[str], chunks, **options) -> tuple[EarlyExitClassifier, pd.DataFrame]:
    """One classifier called on `chunks` (indices of chunks of `texts`) in turn, and its answers, by row."""
    classifier = EarlyExitClassifier.from_pretrained(checkpoint, device="cpu", batch_size=8, **options)
    answers = {}
    for index in chunks:
        rows = range(index * CHUNK, min((index + 1) * CHUNK, len(texts)))
        answers.update(zip(rows, classifier([texts[row] for row in rows])))
    return classifier, pd.DataFrame([answers[row] for row in sorted(answers)], index=sorted(answers))


def assert_predictions_equal(output: pd.DataFrame, expected: pd.DataFrame) -> None:
    assert output["predicted_label"].tolist() == expected["label"].tolist()
    assert output["predicted_exit_layer"].tolist() == expected["exit_layer"].tolist()
    assert output["predicted_score"].tolist() == pytest.approx(expected["score"].tolist(), abs=1e-5)


def test_a_killed_run_with_a_speedup_budget_resumes_the_budget_where_it_stopped(minilm_checkpoint, sst2_csv,
                                                                                 uninterrupted, tmp_path, capsys):
    output = tmp_path / "scored.csv"
    record = tmp_path / "scored.csv.partial" / PROGRESS_NAME
    budget = ["--target_speedup", "3.0"]  # the checkpoint is calibrated for 2x: the threshold must move
    command = [sys.executable, "-m", "de3_transformers", "predict",
               *arguments(minilm_checkpoint, sst2_csv, output, *budget)]
    done = kill_after_chunks(command, record, tmp_path / "log.txt")
    texts = pd.read_csv(sst2_csv)["sentence"].tolist()
    killed, _ = carried_over_chunks(minilm_checkpoint, texts, range(done), target_speedup=3.0)
    assert json.loads(record.read_text())["budget"] == killed.budget.state_dict()  # as it stood after those chunks

    capsys.readouterr()
    main(arguments(minilm_checkpoint, sst2_csv, output, *budget))
    printed = capsys.readouterr().out
    # What one classifier gives when carried over every chunk, uninterrupted.
    expected, answers = carried_over_chunks(minilm_checkpoint, texts, range(ROWS // CHUNK), target_speedup=3.0)
    resumed = pd.read_csv(output)
    assert_predictions_equal(resumed, answers)
    assert resumed["predicted_exit_layer"].tolist() != uninterrupted["predicted_exit_layer"].tolist()
    assert f"layer speed-up {expected.speedup:.2f}x (target 3.00x)" in printed
    start = expected.budget.thresholds[0]  # the calibrated threshold
    assert f"the threshold started at {start:.4g} and ended at {expected.threshold:.4g}." in printed


def test_the_number_of_processes_is_fingerprinted_only_with_a_budget(minilm_checkpoint, sst2_csv, tmp_path):
    calibrated = PredictArguments(model=str(minilm_checkpoint), input_file=str(sst2_csv), output_file="o.csv")
    budget = PredictArguments(model=str(minilm_checkpoint), input_file=str(sst2_csv), output_file="o.csv",
                              target_speedup=3.0)
    assert fingerprint(calibrated, world_size=2) == fingerprint(calibrated, world_size=1)  # a chunk is a chunk
    assert fingerprint(budget, world_size=2) != fingerprint(budget, world_size=1)  # a budget follows its process


def refused(argv: list[str], capsys) -> str:
    """The line `main(argv)` prints to stderr last, `<prog>: error: ...`, when it refuses `argv` with exit status 2
    (progress bars may come before it: the subprocess tests below turn them off)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    line = capsys.readouterr().err.splitlines()[-1]
    assert ": error: " in line, line
    return line


def interrupt_after(monkeypatch, calls: int):
    """Makes the classifier fail on its `calls + 1`-th batch, as a run that stops there."""
    original, seen = EarlyExitClassifier.predict, []

    def predict(self, *args, **kwargs):
        seen.append(1)
        if len(seen) > calls:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(EarlyExitClassifier, "predict", predict)


def test_a_run_with_other_input_or_arguments_refuses_to_resume(minilm_checkpoint, sst2_csv, tmp_path, monkeypatch,
                                                                capsys):
    source = tmp_path / "small.csv"
    pd.read_csv(sst2_csv).head(60).to_csv(source, index=False)
    output = tmp_path / "scored.csv"
    with monkeypatch.context() as patch:
        interrupt_after(patch, 2)
        with pytest.raises(KeyboardInterrupt):
            main(arguments(minilm_checkpoint, source, output))
    assert re.search(r"another threshold \(it was \{'threshold': None\}\).*remove that folder",
                     refused(arguments(minilm_checkpoint, source, output, "--threshold", "0.5"), capsys))
    original = source.read_bytes()
    source.write_bytes(original.replace(b"charming", b"dull"))
    assert "another input_sha256" in refused(arguments(minilm_checkpoint, source, output), capsys)
    source.write_bytes(original)
    capsys.readouterr()
    main(arguments(minilm_checkpoint, source, output))
    assert f"2 of {60 // CHUNK} chunks ({2 * CHUNK} texts) were scored by an earlier run" in capsys.readouterr().out
    assert len(pd.read_csv(output)) == 60


def test_formats_are_read_and_written_as_asked(minilm_checkpoint, tmp_path):
    texts = ['he said "no" , twice ', "a , comma", "null", "NA"]  # quotes, commas, and texts pandas reads as missing
    source = tmp_path / "texts.tsv"
    source.write_text("text\tid\n" + "".join(f"{text}\t{index}\n" for index, text in enumerate(texts)))
    main(["--model", str(minilm_checkpoint), "--input_file", str(source), "--output_file", str(tmp_path / "out.tsv")])
    main(["--model", str(minilm_checkpoint), "--input_file", str(source), "--output_file", str(tmp_path / "out.jsonl")])
    main(["--model", str(minilm_checkpoint), "--input_file", str(tmp_path / "out.jsonl"), "--output_file",
          str(tmp_path / "again"), "--output_format", "parquet", "--column_prefix", "second_"])
    tsv = (tmp_path / "out.tsv").read_text().splitlines()
    assert tsv[0] == "text\tid\tlabel\tscore\texit_layer"
    assert [line.split("\t")[:2] for line in tsv[1:]] == [[text, str(index)] for index, text in enumerate(texts)]
    jsonl = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [row["text"] for row in jsonl] == texts and [row["id"] for row in jsonl] == [0, 1, 2, 3]
    parquet = pd.read_parquet(tmp_path / "again")
    assert parquet["text"].tolist() == texts and parquet["second_label"].tolist() == parquet["label"].tolist()


@pytest.mark.parametrize("extra, message", [
    (["--text_column", "missing"], r"no column 'missing' .*pass --text_column"),
    (["--text_column", "label"], "holds int64 values, not texts"),
    (["--column_prefix", ""], r"already has the column\(s\) \['label'\].*--column_prefix"),
    (["--output_format", "xlsx"], "--output_format 'xlsx' is unknown"),
    (["--chunk_size", "0"], "--chunk_size 0 must be a positive integer"),
    (["--backend", "onnxruntime", "--device", "cpu"], "--device applies to --backend pytorch"),
    (["--backend", "tensorrt"], "--backend 'tensorrt' is unknown; choose one of pytorch, onnxruntime"),
    (["--threshold", "-1"], r"refuses these options: threshold=-1.0 .* must be"),
    (["--target_speedup", "50"], r"refuses these options: target_speedup=50.0 must be between 1 and"),
    (["--max_length", "100000"], r"refuses these options: max_length=100000 exceeds the \d+ positions"),
    (["--chunksize", "5"], r"unrecognized arguments: --chunksize 5 \(see --help"),
])
def test_bad_arguments_are_refused_naming_the_fix(minilm_checkpoint, sst2_csv, tmp_path, capsys, extra, message):
    printed = refused(arguments(minilm_checkpoint, sst2_csv, tmp_path / "out.csv", *extra), capsys)
    assert re.search(message, printed), printed
    assert list(tmp_path.iterdir()) == []  # refused before any work was saved


def test_missing_texts_are_listed(minilm_checkpoint, tmp_path, capsys):
    source = tmp_path / "gaps.csv"
    source.write_text('id,text\n0,fine\n1,\n2,also fine\n3,""\n')
    printed = refused(["--model", str(minilm_checkpoint), "--input_file", str(source), "--output_file",
                       str(tmp_path / "o.csv")], capsys)
    assert re.search(r"2 missing texts \(rows \[1, 3\].*fill or drop", printed), printed


def test_user_mistakes_reach_callers_of_predict_as_the_errors_they_caught_before(minilm_checkpoint, sst2_csv,
                                                                                  tmp_path):
    with pytest.raises(UsageError, match="--output_format 'xlsx' is unknown") as error:
        PredictArguments(model=str(minilm_checkpoint), input_file=str(sst2_csv), output_file="o.csv",
                         output_format="xlsx")
    assert isinstance(error.value, ValueError)
    output = tmp_path / "scored.csv"
    output.write_text("keep me")
    with pytest.raises(OutputExistsError, match="--overwrite_output_file") as error:
        predict(PredictArguments(model=str(minilm_checkpoint), input_file=str(sst2_csv), output_file=str(output),
                                 text_column="sentence", column_prefix="predicted_"))
    assert isinstance(error.value, FileExistsError) and isinstance(error.value, UsageError)


def test_an_existing_output_is_replaced_only_when_asked(minilm_checkpoint, sst2_csv, tmp_path, capsys):
    source = tmp_path / "small.csv"
    pd.read_csv(sst2_csv).head(5).to_csv(source, index=False)
    output = tmp_path / "scored.csv"
    output.write_text("keep me")
    assert "--overwrite_output_file" in refused(arguments(minilm_checkpoint, source, output), capsys)
    assert output.read_text() == "keep me"
    main(arguments(minilm_checkpoint, source, output, "--overwrite_output_file"))
    assert len(pd.read_csv(output)) == 5


def test_the_package_runs_its_commands_and_installs_de3_predict(capsys):
    tomllib = pytest.importorskip("tomllib")
    assert package_main([]) == 2 and "predict" in capsys.readouterr().err
    assert package_main(["train"]) == 2 and "unknown command 'train'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        package_main(["predict", "--help"])
    assert exit_info.value.code == 0
    usage = capsys.readouterr().out
    assert usage.startswith("usage: python -m de3_transformers predict") and "--chunk_size" in usage
    scripts = tomllib.loads((REPOSITORY / "pyproject.toml").read_text())["project"]["scripts"]
    module, name = scripts["de3-predict"].split(":")
    assert getattr(__import__(module, fromlist=[name]), name) is main


PROG = "python -m de3_transformers predict"


def run_command(*command_arguments: str) -> subprocess.CompletedProcess:
    """`python -m de3_transformers ...` in a subprocess, offline, with the libraries' warnings and progress bars off:
    what a user sees on stderr, less the noise."""
    env = {**os.environ, "PYTHONPATH": str(REPOSITORY), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
           "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
    return subprocess.run([sys.executable, "-m", "de3_transformers", *command_arguments], cwd=REPOSITORY, env=env,
                          capture_output=True, text=True, timeout=300)


def assert_refused(run: subprocess.CompletedProcess, message: str) -> None:
    """The command ended with exit status 2 and printed one line, `<prog>: error: ...` matching `message`, and no
    traceback."""
    assert run.returncode == 2, run.stderr[-3000:]
    assert "Traceback" not in run.stderr
    (line,) = run.stderr.splitlines()
    assert line.startswith(f"{PROG}: error: ") and re.search(message, line), line


def existing_output(checkpoint, source: Path, folder: Path) -> tuple[list[str], str]:
    (folder / "scored.csv").write_text("keep me")
    return (arguments(checkpoint, source, folder / "scored.csv"),
            r"scored\.csv exists: pass --overwrite_output_file to replace it")


def label_column_already_there(checkpoint, source: Path, folder: Path) -> tuple[list[str], str]:
    return ([*arguments(checkpoint, source, folder / "scored.csv"), "--column_prefix", ""],
            r"already has the column\(s\) \['label'\]: pass --column_prefix \(e\.g\. predicted_\)")


def missing_input_file(checkpoint, source: Path, folder: Path) -> tuple[list[str], str]:
    return arguments(checkpoint, folder / "nowhere.csv", folder / "scored.csv"), r"nowhere\.csv does not exist: pass"


def unknown_output_format(checkpoint, source: Path, folder: Path) -> tuple[list[str], str]:
    return ([*arguments(checkpoint, source, folder / "scored.csv"), "--output_format", "xlsx"],
            r"--output_format 'xlsx' is unknown; choose one of csv, tsv")


def unknown_input_format(checkpoint, source: Path, folder: Path) -> tuple[list[str], str]:
    (folder / "texts.xlsx").write_bytes(source.read_bytes())
    return (arguments(checkpoint, folder / "texts.xlsx", folder / "scored.csv"),
            r"texts\.xlsx must be a csv, tsv, json, jsonl, parquet file \(by its extension\)")


@pytest.mark.parametrize("mistake", [existing_output, label_column_already_there, missing_input_file,
                                     unknown_output_format, unknown_input_format], ids=lambda mistake: mistake.__name__)
def test_the_command_refuses_a_user_mistake_in_one_line_with_exit_status_2(minilm_checkpoint, sst2_csv, tmp_path,
                                                                           mistake):
    command_arguments, message = mistake(minilm_checkpoint, sst2_csv, tmp_path)
    assert_refused(run_command("predict", *command_arguments), message)
    assert not (tmp_path / "scored.csv.partial").exists()


def test_the_command_refuses_to_resume_with_changed_arguments_in_one_line(minilm_checkpoint, sst2_csv, tmp_path,
                                                                          monkeypatch):
    source = tmp_path / "small.csv"
    pd.read_csv(sst2_csv).head(30).to_csv(source, index=False)
    output = tmp_path / "scored.csv"
    with monkeypatch.context() as patch:  # leaves scored.csv.partial/ with 2 of 5 chunks done
        interrupt_after(patch, 2)
        with pytest.raises(KeyboardInterrupt):
            main(arguments(minilm_checkpoint, source, output))
    run = run_command("predict", *arguments(minilm_checkpoint, source, output, "--threshold", "0.5"))
    assert_refused(run, r"scored\.csv\.partial holds an interrupted run with another threshold \(it was "
                        r"\{'threshold': None\}\): rerun with the arguments .* or remove that folder")
    assert json.loads((tmp_path / "scored.csv.partial" / PROGRESS_NAME).read_text())["chunks_done"] == 2  # kept


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(command_arguments: list[str], log_dir: Path) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node 2 -m de3_transformers predict ...` on the CPU; each process's output goes to
    `log_dir/<run>/attempt_0/<rank>/std{out,err}.log`.

    Nothing may listen beyond the loopback: gloo is told to use it, and the run gets a network namespace of its own
    where the system allows it (`loopback_only`)."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
              f"--master_port={free_port()}", "--log-dir", str(log_dir), "--redirects", "3",
              "-m", "de3_transformers", "predict", *command_arguments]
    env = {**os.environ, "PYTHONPATH": str(REPOSITORY), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "CUDA_VISIBLE_DEVICES": "", "GLOO_SOCKET_IFNAME": "lo",
           "TORCH_CPP_LOG_LEVEL": "ERROR"}  # c10d warns that the namespace cannot resolve names
    return subprocess.run(loopback_only(launch), cwd=REPOSITORY, env=env, capture_output=True, text=True, timeout=300)


def process_output(log_dir: Path, rank: int) -> tuple[str, str]:
    """What process `rank` of a `torchrun` run printed: stdout and stderr."""
    (folder,) = log_dir.glob(f"*/attempt_0/{rank}")
    return (folder / "stdout.log").read_text(), (folder / "stderr.log").read_text()


def test_torchrun_processes_share_the_chunks_and_write_what_one_process_writes(minilm_checkpoint, sst2_csv,
                                                                               uninterrupted, tmp_path, monkeypatch):
    output = tmp_path / "scored.csv"
    with monkeypatch.context() as patch:  # one process scores the first 4 chunks, then two take over
        interrupt_after(patch, 4)
        with pytest.raises(KeyboardInterrupt):
            main(arguments(minilm_checkpoint, sst2_csv, output))
    run = torchrun(arguments(minilm_checkpoint, sst2_csv, output), tmp_path / "logs")
    assert run.returncode == 0, run.stderr[-3000:]
    pd.testing.assert_frame_equal(pd.read_csv(output), uninterrupted, check_exact=False, atol=1e-5, rtol=0)
    printed, _ = process_output(tmp_path / "logs", 0)
    assert f"4 of {ROWS // CHUNK} chunks ({4 * CHUNK} texts) were scored by an earlier run" in printed
    assert f"Scored {ROWS} texts of {sst2_csv} with 2 processes: layer speed-up" in printed
    share = (ROWS - 4 * CHUNK) // 2  # chunks 4, 6, ... to process 0; 5, 7, ... to process 1
    assert f"This run scored {ROWS - 4 * CHUNK} (process 0 {share}, process 1 {share}) in" in printed
    assert process_output(tmp_path / "logs", 1) == ("", "")  # process 0 reports for all
    assert not (tmp_path / "scored.csv.partial").exists()


def test_torchrun_processes_each_hold_the_target_with_their_own_budget(minilm_checkpoint, sst2_csv, tmp_path):
    output = tmp_path / "scored.csv"
    run = torchrun(arguments(minilm_checkpoint, sst2_csv, output, "--target_speedup", "3.0"), tmp_path / "logs")
    assert run.returncode == 0, run.stderr[-3000:]
    texts = pd.read_csv(sst2_csv)["sentence"].tolist()
    first, first_answers = carried_over_chunks(minilm_checkpoint, texts, range(0, ROWS // CHUNK, 2), target_speedup=3.0)
    second, second_answers = carried_over_chunks(minilm_checkpoint, texts, range(1, ROWS // CHUNK, 2),
                                                 target_speedup=3.0)
    scored = pd.read_csv(output)
    assert_predictions_equal(scored, pd.concat([first_answers, second_answers]).sort_index())
    printed, _ = process_output(tmp_path / "logs", 0)
    speedup = first.num_hidden_layers * ROWS / scored["predicted_exit_layer"].sum()  # over all texts
    assert f"with 2 processes: layer speed-up {speedup:.2f}x (target 3.00x)" in printed
    assert (f"ended at {first.threshold:.4g} in process 0 ({first.speedup:.2f}x over its texts), "
            f"{second.threshold:.4g} in process 1 ({second.speedup:.2f}x over its texts).") in printed


def test_each_process_takes_the_gpu_of_its_local_rank(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    processes = [Processes(rank=rank, world_size=3, local_rank=rank) for rank in range(3)]
    assert [process.device(None) for process in processes] == ["cuda:0", "cuda:1", "cuda:0"]  # 3 on 2 GPUs share
    assert processes[1].device("cuda") == "cuda:1" and processes[1].device("cpu") == "cpu"
    assert Processes().device(None) is None  # one process: the classifier's own default
