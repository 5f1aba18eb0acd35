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


SENTENCES = ["a warm and funny film", "dull from start to finish", "the cast is superb", "a tedious mess",
             "i loved every minute", "poorly written and acted", "a delight", "boring", "moving and smart",
             "an utter failure", "great fun", "not worth your time"] * 2


def write_csv(path, labels):
    """SENTENCES with alternating labels `labels[0]` (positive sentences) and `labels[1]` (negative ones)."""
    rows = [f"{text},{labels[index % 2]}" for index, text in enumerate(SENTENCES)]
    path.write_text("\n".join(["text,label", *rows]) + "\n")
    return path


@pytest.fixture(scope="module")
def named_checkpoint(minilm_path, tmp_path_factory):
    """A DE3 MiniLM checkpoint whose classes are named as the main job's are, in the opposite of sorted order."""
    from transformers import AutoTokenizer

    from de3_transformers import DE3BertForSequenceClassification

    path = tmp_path_factory.mktemp("named") / "checkpoint"
    model = DE3BertForSequenceClassification.from_backbone(
        minilm_path, num_labels=2, id2label={0: "positive", 1: "negative"}, label2id={"positive": 0, "negative": 1})
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(minilm_path).save_pretrained(path)
    return path


def fine_tune(checkpoint, data, out, *extra):
    return run_glue(["--model_name_or_path", str(checkpoint), "--train_file", str(data), "--output_dir", str(out),
                     "--do_train", "--num_train_epochs", "1", "--per_device_train_batch_size", "8",
                     "--max_seq_length", "16", "--report_to", "none", "--save_strategy", "no", "--use_cpu", "true",
                     "--target_speedup", "1.5", "--report_speedups", "1.5", *extra])


def test_run_glue_from_a_checkpoint_maps_labels_by_name(named_checkpoint, tmp_path):
    from run_glue import ModelArguments, model_class_ids

    model = AutoModelForSequenceClassification.from_pretrained(named_checkpoint)
    args = ModelArguments(model_name_or_path=str(named_checkpoint))
    # Data labels sorted as `label_names` gives them; the checkpoint numbers its classes the other way round.
    assert model_class_ids(model, ["negative", "positive"], args) == {"negative": 1, "positive": 0}
    fine_tune(named_checkpoint, write_csv(tmp_path / "train.csv", ["positive", "negative"]), tmp_path / "out")
    saved = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out")
    assert saved.config.id2label == {0: "positive", 1: "negative"}


def test_run_glue_from_the_main_jobs_model_with_numeric_labels_says_what_to_pass(named_checkpoint, tmp_path):
    data = write_csv(tmp_path / "train.csv", [1, 0])
    with pytest.raises(ValueError, match="--label_map 0:positive,1:negative"):
        fine_tune(named_checkpoint, data, tmp_path / "out")
    fine_tune(named_checkpoint, data, tmp_path / "out", "--label_map", "1:positive,0:negative")
    saved = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out")
    assert saved.config.id2label == {0: "positive", 1: "negative"}
    from run_glue import ModelArguments, model_class_ids

    model = AutoModelForSequenceClassification.from_pretrained(named_checkpoint)
    with pytest.raises(ValueError, match="--ignore_mismatched_sizes true"):  # three labels for two classes
        model_class_ids(model, ["a", "b", "c"], ModelArguments(model_name_or_path=str(named_checkpoint)))


def test_run_glue_from_an_unnamed_checkpoint_takes_the_datas_label_names(minilm_path, tmp_path):
    from transformers import AutoTokenizer

    from de3_transformers import DE3BertForSequenceClassification

    # The README's recipe: a DE3 model started from the backbone and saved before any training (LABEL_0, LABEL_1).
    DE3BertForSequenceClassification.from_backbone(minilm_path, num_labels=2).save_pretrained(tmp_path / "start")
    AutoTokenizer.from_pretrained(minilm_path).save_pretrained(tmp_path / "start")
    fine_tune(tmp_path / "start", write_csv(tmp_path / "train.csv", [1, 0]), tmp_path / "out")
    saved = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out")
    assert saved.config.id2label == {0: "0", 1: "1"}


def test_run_glue_from_a_checkpoint_with_another_number_of_classes_starts_its_heads_afresh(named_checkpoint,
                                                                                          tmp_path):
    rows = [f"{text},{('good', 'bad', 'mixed')[index % 3]}" for index, text in enumerate(SENTENCES)]
    (tmp_path / "three.csv").write_text("\n".join(["text,label", *rows]) + "\n")
    fine_tune(named_checkpoint, tmp_path / "three.csv", tmp_path / "out", "--ignore_mismatched_sizes", "true")
    saved = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out")
    assert saved.config.id2label == {0: "bad", 1: "good", 2: "mixed"} and saved.classifier.out_features == 3
    assert saved.prototype_memory.initialized.all()  # the new prototypes were set by the training run


def test_the_quickstart_says_first_which_data_it_uses_and_why(monkeypatch, capsys):
    import quickstart

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    received = []
    monkeypatch.setattr(quickstart, "run_glue", received.append)
    monkeypatch.setattr(sys, "argv", ["quickstart.py", "--max_train_samples", "64"])
    quickstart.main()
    data, model = capsys.readouterr().out.splitlines()
    assert data.startswith("Data: the VADER movie-review snippets") and "Hub" in data and "not reachable" in data
    assert "a seeded subset of 64 training samples" in model and "outputs/quickstart" in model
    assert received[0][:2] == ["--dataset", "vader"]


def test_from_backbone_names_the_fresh_heads_in_one_line_without_the_load_report_table(minilm_path, tmp_path):
    import os
    import subprocess

    script = ("from de3_transformers import DE3BertForSequenceClassification\n"
              f"DE3BertForSequenceClassification.from_backbone({minilm_path!r}, num_labels=2, exit_pooling='mean')\n")
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "warning",
                   "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    stderr = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=environment,
                            cwd=tmp_path, check=True, timeout=120).stderr
    lines = [line for line in stderr.splitlines() if line.strip() and "Loading weights" not in line]
    assert "LOAD REPORT" not in stderr and "MISSING" not in stderr
    assert len(lines) == 1 and "Freshly initialised, to be trained before use: classifier, exit_classifiers" in lines[0]


def test_run_glue_with_push_to_hub_writes_a_card_that_loads_the_model_by_its_hub_id(tmp_path, monkeypatch):
    import run_glue as script

    pushed = []

    def init_hf_repo(trainer, token=None, private=None):  # what the Hub would answer: the repo under the user's name
        trainer.hub_model_id = "someone/" + Path(trainer.args.output_dir).name

    monkeypatch.setattr(script.DE3Trainer, "init_hf_repo", init_hf_repo)
    monkeypatch.setattr(script.DE3Trainer, "push_to_hub", lambda trainer, **kwargs: pushed.append(trainer.hub_model_id))
    run_glue(["--train_file", str(write_csv(tmp_path / "train.csv", ["positive", "negative"])),
              "--output_dir", str(tmp_path / "de3-mine"), "--do_train", "--max_steps", "1",
              "--per_device_train_batch_size", "8", "--max_seq_length", "16", "--report_to", "none",
              "--save_strategy", "no", "--use_cpu", "true", "--push_to_hub", "true"])
    card = (tmp_path / "de3-mine" / "README.md").read_text()
    assert 'from_pretrained("someone/de3-mine")' in card and 'model="someone/de3-mine"' in card
    assert set(pushed) == {"someone/de3-mine"}  # the Trainer pushes at the end of training too


@pytest.mark.parametrize("script, arguments, message", [
    ("run_glue.py", ["--dataset", "imdb", "--output_dir", "out"], "--dataset 'imdb' is unknown"),
    ("quickstart.py", ["--no_such_option", "1"], "unrecognized arguments: --no_such_option 1"),
])
def test_the_example_scripts_refuse_a_mistake_in_one_line_with_exit_status_2(script, arguments, message, tmp_path):
    import os
    import subprocess

    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    examples = Path(__file__).resolve().parents[1] / "examples"
    result = subprocess.run([sys.executable, str(examples / script), *arguments], capture_output=True, text=True,
                            env=environment, cwd=tmp_path, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [f"{script}: error: {result.stderr.split(': error: ', 1)[1].strip()}"]
    assert message in result.stderr
