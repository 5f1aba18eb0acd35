"""Every code block of the README runs as written, and prints or writes what the README says.

The blocks that use the main job's model run, each in a fresh process, in a folder laid out as the repository root
after the main job: `outputs/quickstart` is a real MiniLM DE3 checkpoint (trained briefly and calibrated for 2x, as the
main job's model is), beside the repository's `examples/`. The README's two set-up commands run in `.ci/run`, each in a
fresh virtual environment, and its Ray Data block in `tests/test_ray.py`.
"""

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from conftest import loopback_only


REPOSITORY = Path(__file__).resolve().parents[1]
README = (REPOSITORY / "README.md").read_text()
BLOCKS = re.findall(r"```(python|bash)\n(.*?)```", README, re.S)

# Each code block holds one of these markers; the value is the test that runs it.
RUN_BY = {
    'pip install torch==2.13.0 -e ".[examples]"': ".ci/run",
    "from_backbone(path, num_labels=2, dar_alpha=0.01)": "test_readme_usage_example_runs",
    'transformers.pipeline("text-classification", model="outputs/quickstart")': "test_the_pipeline_block",
    "export_onnx(model, ": "test_the_onnx_block",
    'policy="patience"': "test_the_exit_policies_block",
    'training_objective="cosee"': "test_the_cosee_and_mpee_block",
    "EarlyExitClassifier.from_pretrained": "test_the_classifier_block",
    "python -m de3_transformers predict --model": "test_the_predict_command_block",
    "torchrun --nproc_per_node 2": "test_the_torchrun_block_writes_what_one_process_writes",
    "ray.data.read_csv": "tests/test_ray.py::test_the_readme_ray_block_runs_as_written",
    "trainer = DE3Trainer(": "test_the_training_block_and_the_calibration_command",
    "python -m de3_transformers calibrate": "test_the_training_block_and_the_calibration_command",
}


def block(marker: str) -> str:
    (code,) = [code for _, code in BLOCKS if marker in code]
    return code


def run_block(marker: str, cwd: Path, **env) -> str:
    """Runs the README block holding `marker` in a fresh process in `cwd`, as a user would paste it; returns stdout."""
    language = next(language for language, code in BLOCKS if marker in code)
    command = [sys.executable, "-c", block(marker)] if language == "python" else ["bash", "-c", block(marker)]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
                   "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", **env}
    if "torchrun" in marker:
        command = loopback_only(command)
    result = subprocess.run(command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=420)
    assert result.returncode == 0, f"README block {marker!r} failed:\n{result.stderr[-4000:]}"
    return result.stdout


@pytest.fixture(scope="module")
def root(minilm_checkpoint, tmp_path_factory):
    """A folder laid out as the repository root after the main job."""
    folder = tmp_path_factory.mktemp("readme")
    (folder / "examples").symlink_to(REPOSITORY / "examples")
    shutil.copytree(minilm_checkpoint, folder / "outputs" / "quickstart")
    return folder


def printed_answers(stdout: str) -> list[dict]:
    """The pipeline-style answers a block printed on its last line."""
    answers = ast.literal_eval(stdout.strip().splitlines()[-1])
    assert all(set(answer) == {"label", "score", "exit_layer"} for answer in answers)
    assert all(answer["label"] in ("negative", "positive") and 1 <= answer["exit_layer"] <= 6 for answer in answers)
    return answers


def test_every_code_block_is_run_by_a_test():
    assert BLOCKS[0][1].count("pip install") == 2  # the first screen: the main job's set-up and the tests'
    for language, code in BLOCKS:
        assert len([marker for marker in RUN_BY if marker in code]) >= 1, f"no test runs this {language} block:\n{code}"
    for marker, test in RUN_BY.items():
        assert len([code for _, code in BLOCKS if marker in code]) == 1, marker
        if test == ".ci/run":
            assert "README.md" in (REPOSITORY / ".ci" / "run").read_text()
        else:
            path, name = test.split("::") if "::" in test else ("tests/test_readme.py", test)
            assert f"def {name}(" in (REPOSITORY / path).read_text(), test
    assert "/outputs/" in (REPOSITORY / ".gitignore").read_text().splitlines()  # where the blocks write


def test_readme_usage_example_runs(capsys):
    namespace = {}
    exec(compile(block("from_backbone(path, num_labels=2, dar_alpha=0.01)"), "README.md", "exec"), namespace)
    model, out = namespace["model"], namespace["out"]
    assert model.prototype_memory.initialized.all()  # the one training step set every prototype
    layers = out.sample_exit_layers
    assert layers.dtype == torch.long and layers.shape == (2,) and ((layers >= 1) & (layers <= 6)).all()
    assert out.speedup == 6 * 2 / layers.sum().item()  # docs/method.md eq. 12 over the two sentences
    assert capsys.readouterr().out == f"{layers} {out.speedup}\n"


def test_the_pipeline_block(root):
    marker = 'transformers.pipeline("text-classification", model="outputs/quickstart")'
    assert len(printed_answers(run_block(marker, root))) == 3


def test_the_onnx_block(root):
    assert len(printed_answers(run_block("export_onnx(model, ", root))) == 2
    assert (root / "outputs" / "served" / "de3_onnx.json").is_file()


def test_the_exit_policies_block(root):
    run_block('policy="patience"', root)
    assert (root / "outputs" / "policies.png").read_bytes()[:4] == b"\x89PNG"


def test_the_cosee_and_mpee_block(root):
    run_block('training_objective="cosee"', root)


def test_the_classifier_block(root):
    assert len(printed_answers(run_block("EarlyExitClassifier.from_pretrained", root))) == 3


def test_the_predict_command_block(root):
    printed = run_block("python -m de3_transformers predict --model", root)
    assert "Scored 20 texts of examples/texts.csv: layer speed-up" in printed
    assert "Wrote outputs/texts_scored.csv" in printed
    scored = pd.read_csv(root / "outputs" / "texts_scored.csv")
    pd.testing.assert_frame_equal(scored[["sentence", "label"]], pd.read_csv(REPOSITORY / "examples" / "texts.csv"))
    assert list(scored.columns[2:]) == ["predicted_label", "predicted_score", "predicted_exit_layer"]


def test_the_torchrun_block_writes_what_one_process_writes(root):
    printed = run_block("torchrun --nproc_per_node 2", root)
    assert "Scored 20 texts of examples/texts.csv with 2 processes" in printed
    one_process = block("torchrun --nproc_per_node 2").split(" -m ", 1)[1].replace("texts_scored_2", "texts_one")
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    subprocess.run(f"{sys.executable} -m {one_process}", shell=True, cwd=root, env=environment, check=True,
                   capture_output=True, timeout=300)
    two = (root / "outputs" / "texts_scored_2.csv").read_bytes()
    assert two == (root / "outputs" / "texts_one.csv").read_bytes()  # the README's claim: byte-identical


def test_the_training_block_and_the_calibration_command(root):
    run_block("trainer = DE3Trainer(", root)
    assert (root / "outputs" / "trained" / "model.safetensors").is_file()
    printed = run_block("python -m de3_transformers calibrate", root)
    assert "Calibrated on 20 samples of examples/texts.csv" in printed
    assert (root / "outputs" / "trained-2x" / "calibration.json").is_file()
