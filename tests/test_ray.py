"""Ray Data scores with the predictor class as one process does: the README's example, on a local Ray cluster
(2 CPUs, bound to 127.0.0.1, no dashboard) started and stopped by the test."""

import os
import sys
from pathlib import Path

import pandas as pd
import pytest

from de3_transformers import EarlyExitClassifier
from de3_transformers.data import load_glue_task


ray = pytest.importorskip("ray", reason="the ray extra (pip install 'de3-transformers[ray]') is not installed")
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture
def local_ray(monkeypatch):
    # Ray's workers are new processes: they find the repository's package (and the example) on PYTHONPATH.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(EXAMPLES.parent), str(EXAMPLES)]))
    ray.init(num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=False, object_store_memory=200 * 2**20,
             log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def test_ray_data_gives_the_predictions_of_one_process(minilm_checkpoint, glue_dir, tmp_path, local_ray):
    sys.path.insert(0, str(EXAMPLES))
    try:
        from ray_predict import main
    finally:
        sys.path.remove(str(EXAMPLES))
    sentences = load_glue_task("sst2", glue_dir)["validation"]["sentence"][:96]
    input_file = tmp_path / "texts.csv"
    pd.DataFrame({"id": range(len(sentences)), "sentence": sentences}).to_csv(input_file, index=False)
    expected = EarlyExitClassifier.from_pretrained(minilm_checkpoint, device="cpu")(sentences)

    dataset = ray.data.read_csv(str(input_file))
    from ray_predict import score

    # Half a CPU an actor: the 2-CPU cluster keeps one for reading the file.
    scored = score(dataset, str(minilm_checkpoint), "sentence", concurrency=2, batch_size=16, num_cpus=0.5).to_pandas()
    assert scored["id"].tolist() == list(range(len(sentences)))  # the input order, through two actors
    assert scored["label"].tolist() == [result["label"] for result in expected]
    assert scored["exit_layer"].tolist() == [result["exit_layer"] for result in expected]
    assert scored["score"].tolist() == pytest.approx([result["score"] for result in expected], abs=1e-5)
    assert len(set(scored["exit_layer"])) > 1

    ray.shutdown()  # the example starts its own local cluster
    main(["--model", str(minilm_checkpoint), "--input_file", str(input_file), "--text_column", "sentence",
          "--output_dir", str(tmp_path / "scored"), "--batch_size", "16"])
    written = pd.read_parquet(tmp_path / "scored").sort_values("id")
    assert written["exit_layer"].tolist() == scored["exit_layer"].tolist()
