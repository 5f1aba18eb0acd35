"""Ray Data scores with the predictor class as one process does: `score` and the script of `examples/ray_predict.py`,
and the README's Ray block as written. Each runs in a subprocess with a time limit (a Ray Data job that waits forever
fails its test instead of hanging), on a local Ray cluster of its own, watched while it runs: every socket its processes
listen on must be on the loopback address, and the dashboard's web server must not run."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from de3_transformers import EarlyExitClassifier
from de3_transformers.data import load_glue_task


pytest.importorskip("ray", reason="the ray extra (pip install 'de3-transformers[ray]') is not installed")
psutil = pytest.importorskip("psutil")  # a dependency of ray
ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
TIME_LIMIT = 240  # seconds; a run takes about 20-30 s on 2 CPUs, most of it starting Ray
LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}

# Put before the code run: a thread that notes, every 0.2 s, the sockets listened on by this process and its children
# (the Ray cluster it starts); it imports nothing of Ray, so the code run still imports ray first.
WATCH = """\
import json as _json, os as _os, threading as _threading, psutil as _psutil

_seen = set()


def _look():
    me = _psutil.Process()
    for process in [me, *me.children(recursive=True)]:
        try:
            name = " ".join(process.cmdline())[:200]
            for connection in process.net_connections(kind="inet"):
                if connection.status == _psutil.CONN_LISTEN:
                    _seen.add((connection.laddr.ip, connection.laddr.port, name))
        except _psutil.Error:  # gone meanwhile
            pass


def _watch():
    while True:
        _look()
        _stop.wait(0.2)


_stop = _threading.Event()
_threading.Thread(target=_watch, daemon=True).start()
"""
# Put after it: the last look, written where the test reads it.
REPORT = """
_look()
_stop.set()
with open(_os.environ["LISTENING_FILE"], "w") as _file:
    _json.dump(sorted(_seen), _file)
"""


def run_watched(code: str, cwd: Path, time_limit: int = TIME_LIMIT) -> tuple[str, list]:
    """Runs `code` in a new Python process in `cwd`; returns its output and the sockets its processes listened on,
    as `[ip, port, command line]`. Fails the test when it runs past `time_limit` seconds (killing it and its Ray
    processes) or fails."""
    script = cwd / "watched_run.py"
    script.write_text(WATCH + "\n" + code + "\n" + REPORT)
    listening_file = cwd / "listening.json"
    env = {name: value for name, value in os.environ.items()
           if name not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}  # the code must bind by itself
    env.update(HF_HUB_OFFLINE="1", RAY_DEDUP_LOGS="0", LISTENING_FILE=str(listening_file),
               PYTHONPATH=os.pathsep.join([str(ROOT), str(EXAMPLES)]))  # Ray's workers are new processes too
    process = subprocess.Popen([sys.executable, str(script)], cwd=cwd, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = process.communicate(timeout=time_limit)
    except subprocess.TimeoutExpired:
        family = [process, *psutil.Process(process.pid).children(recursive=True)]  # the Ray cluster it started
        for member in family:
            try:
                member.kill()
            except (ProcessLookupError, psutil.Error):
                pass
        output, _ = process.communicate(timeout=60)
        pytest.fail(f"Still running after {time_limit} s (a Ray Data job waiting for a CPU?); the output ends:\n"
                    f"{output[-6000:]}")
    assert process.returncode == 0, output[-6000:]
    return output, json.loads(listening_file.read_text())


def assert_loopback_only(listening: list) -> None:
    assert listening, "no Ray process was seen listening: the watch did not watch"
    exposed = [socket for socket in listening if socket[0] not in LOOPBACK]
    assert not exposed, f"Ray listened beyond the loopback address: {exposed}"
    dashboard = [socket for socket in listening if "dashboard/dashboard.py" in socket[2]]
    assert not dashboard, f"the dashboard's web server ran: {dashboard}"


def readme_ray_block() -> str:
    """The first python block after the README's "**Ray Data.**" paragraph."""
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"```python\n(.*?)```", readme[readme.index("**Ray Data.**"):], re.DOTALL)
    assert match, "no python block after the README's Ray Data paragraph"
    return match.group(1)


def test_ray_data_gives_the_predictions_of_one_process(minilm_checkpoint, glue_dir, tmp_path):
    sentences = load_glue_task("sst2", glue_dir)["validation"]["sentence"][:96]
    pd.DataFrame({"id": range(len(sentences)), "sentence": sentences}).to_csv(tmp_path / "texts.csv", index=False)
    expected = EarlyExitClassifier.from_pretrained(minilm_checkpoint, device="cpu")(sentences)

    # Half a CPU an actor: two actors, and the 2-CPU cluster keeps one CPU for reading the file.
    _, listening = run_watched(f"""
import os

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
import ray
from ray_predict import score

ray.init(num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=False, object_store_memory=200 * 2**20)
scored = score(ray.data.read_csv("texts.csv"), {str(minilm_checkpoint)!r}, "sentence", concurrency=2, batch_size=16,
               num_cpus=0.5)
scored.to_pandas().to_parquet("scored.parquet")
""", tmp_path)
    scored = pd.read_parquet(tmp_path / "scored.parquet")
    assert scored["id"].tolist() == list(range(len(sentences)))  # the input order, through two actors
    assert scored["label"].tolist() == [result["label"] for result in expected]
    assert scored["exit_layer"].tolist() == [result["exit_layer"] for result in expected]
    assert scored["score"].tolist() == pytest.approx([result["score"] for result in expected], abs=1e-5)
    assert len(set(scored["exit_layer"])) > 1
    assert_loopback_only(listening)


def test_the_script_adds_predicted_columns_to_a_csv_with_labels(minilm_checkpoint, glue_dir, tmp_path):
    rows = load_glue_task("sst2", glue_dir)["validation"].select(range(40))
    labels = ["positive" if label == 1 else "negative" for label in rows["label"]]
    data = pd.DataFrame({"id": range(len(rows)), "sentence": rows["sentence"], "label": labels})
    data.to_csv(tmp_path / "texts.csv", index=False)
    expected = EarlyExitClassifier.from_pretrained(minilm_checkpoint, device="cpu")(rows["sentence"])

    # The script's defaults (one actor of one CPU) on a local cluster of this machine's CPUs.
    arguments = ["--model", str(minilm_checkpoint), "--input_file", "texts.csv", "--text_column", "sentence",
                 "--output_dir", "scored", "--batch_size", "16"]
    output, listening = run_watched(f"from ray_predict import main\n\nmain({arguments!r})", tmp_path)
    assert ("texts.csv already has the column(s) ['label']: the predictions go to predicted_label, predicted_score, "
            "predicted_exit_layer") in output
    written = pd.read_parquet(tmp_path / "scored")
    assert written.columns.tolist() == ["id", "sentence", "label", "predicted_label", "predicted_score",
                                        "predicted_exit_layer"]
    assert written["id"].tolist() == data["id"].tolist()
    assert written["label"].tolist() == labels
    assert written["predicted_label"].tolist() == [result["label"] for result in expected]
    assert written["predicted_exit_layer"].tolist() == [result["exit_layer"] for result in expected]
    assert_loopback_only(listening)


def test_the_script_refuses_a_column_prefix_whose_columns_are_taken(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    from ray_predict import choose_column_prefix

    assert choose_column_prefix(["sentence", "label"], "sentence", "model_", "texts.csv") == "model_"
    with pytest.raises(ValueError, match=r"already has the column\(s\) \['label'\]: pass another --column_prefix "
                                         r"\(e.g. predicted_\)"):
        choose_column_prefix(["sentence", "label"], "sentence", "", "texts.csv")
    with pytest.raises(ValueError, match="no column 'text'.*--text_column"):
        choose_column_prefix(["sentence", "label"], "text", None, "texts.csv")


def test_the_script_refuses_actors_that_leave_no_cpu_for_reading(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    from ray_predict import check_local_resources

    check_local_resources(1, 1, 2)
    check_local_resources(2, 0.5, 2)
    with pytest.raises(ValueError, match="2 actor\\(s\\) of 1 CPU leave none of this machine's 2 CPUs"):
        check_local_resources(2, 1, 2)


def test_the_readme_ray_block_runs_as_written(minilm_checkpoint, tmp_path):
    # The block runs from the repository root after the quickstart: here, in a folder holding what it reads.
    (tmp_path / "outputs").mkdir()
    (tmp_path / "outputs" / "quickstart").symlink_to(minilm_checkpoint, target_is_directory=True)
    (tmp_path / "examples").mkdir()
    (tmp_path / "examples" / "texts.csv").symlink_to(EXAMPLES / "texts.csv")
    block = readme_ray_block()

    _, listening = run_watched(block, tmp_path)
    texts = pd.read_csv(EXAMPLES / "texts.csv")
    written = pd.read_parquet(tmp_path / "outputs" / "texts_scored")
    assert written.columns.tolist() == ["sentence", "label", "predicted_label", "predicted_score",
                                        "predicted_exit_layer"]
    assert written["sentence"].tolist() == texts["sentence"].tolist()  # the same rows, in their order
    assert written["label"].tolist() == texts["label"].tolist()
    expected = EarlyExitClassifier.from_pretrained(minilm_checkpoint, device="cpu")(texts["sentence"].tolist())
    assert written["predicted_label"].tolist() == [result["label"] for result in expected]
    assert written["predicted_exit_layer"].tolist() == [result["exit_layer"] for result in expected]
    assert_loopback_only(listening)


def test_the_readme_ray_block_would_fail_its_test_without_the_loopback_setting(tmp_path):
    # What the watch sees of a cluster started as the README's block starts it, less the line that keeps Ray on the
    # loopback address: Ray listens beyond it, so the block's test cannot pass without that line.
    block = readme_ray_block()
    start = "\n".join(line for line in block.splitlines()
                      if line.startswith(("import ", "ray.init(")) and "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in line)
    assert "ray.init(" in start
    _, listening = run_watched(start, tmp_path, time_limit=120)
    if all(socket[0] in LOOPBACK for socket in listening):
        pytest.skip("Ray found no address but the loopback one on this machine")
    with pytest.raises(AssertionError, match="beyond the loopback address"):
        assert_loopback_only(listening)
