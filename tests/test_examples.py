"""The example script end to end on a small slice of real GLUE RTE with the real MiniLM backbone."""

import json
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoModelForSequenceClassification

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from run_glue import main as run_glue  # noqa: E402


def test_run_glue_trains_calibrates_and_saves_a_loadable_checkpoint_with_a_card(glue_dir, tmp_path):
    results = run_glue([
        "--task_name", "rte", "--glue_dir", str(glue_dir), "--output_dir", str(tmp_path), "--do_train",
        "--max_train_samples", "32", "--max_eval_samples", "40", "--max_seq_length", "64",
        "--num_train_epochs", "1", "--per_device_train_batch_size", "16", "--report_to", "none",
        "--save_strategy", "no", "--use_cpu", "true",
    ])
    assert [row["setting"] for row in results["rows"]] == ["full model", "DE3 @ 1.5x", "DE3 @ 2x", "DE3 @ 3x"]
    assert results["rows"][0]["speedup"] == 1.0 and results["train_samples"] == 32
    assert results["calibration"]["speedup"] >= 2.0

    model = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    assert model.config.early_exit_threshold == pytest.approx(results["calibration"]["threshold"])
    assert model.config.id2label == {0: "entailment", 1: "not_entailment"}
    assert model.prototype_memory.initialized.all()
    saved = json.loads((tmp_path / "de3_results.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(results["rows"]))
    assert (tmp_path / "tradeoff.png").read_bytes()[:4] == b"\x89PNG"

    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.library_name == "transformers" and card.data.datasets == ["nyu-mll/glue"]
    values = [metric["value"] for metric in card.data.to_dict()["model-index"][0]["results"][0]["metrics"]]
    assert results["rows"][0]["accuracy"] in values and results["rows"][2]["accuracy"] in values

    with torch.no_grad():
        batch = {"input_ids": torch.tensor([[101, 2023, 2003, 1037, 3231, 102]])}
        assert model.predict_early(**batch).logits.shape == (1, 2)


def test_run_glue_on_a_local_training_file_alone_with_numeric_labels(tmp_path):
    sentences = ["a warm and funny film", "dull from start to finish", "the cast is superb", "a tedious mess",
                 "i loved every minute", "poorly written and acted", "a delight", "boring", "moving and smart",
                 "an utter failure", "great fun", "not worth your time"] * 2
    lines = ["text,label"] + [f"{text},{2 if index % 2 == 0 else 1}" for index, text in enumerate(sentences)]
    (tmp_path / "train.csv").write_text("\n".join(lines) + "\n")
    results = run_glue([
        "--train_file", str(tmp_path / "train.csv"), "--output_dir", str(tmp_path / "out"), "--do_train",
        "--num_train_epochs", "1", "--per_device_train_batch_size", "8", "--max_seq_length", "16",
        "--exit_layers", "2", "4", "6", "--exit_pooling", "mean", "--report_to", "none", "--save_strategy", "no",
        "--use_cpu", "true",
    ])
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out")
    assert model.config.id2label == {0: "1", 1: "2"} and model.config.exit_layers == [2, 4, 6]
    assert model.config.exit_pooling == "mean"
    assert results["train_samples"] == 21  # 10% of the 24 rows held out for calibration and reporting
