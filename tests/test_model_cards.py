"""Model cards: Hub metadata that parses back, every number from the arguments, no section without data."""

from dataclasses import dataclass, field

import pytest
from huggingface_hub import ModelCard
from transformers import BertConfig

from conftest import TINY, tiny_model
from de3_transformers.model_card import build_model_card, write_model_card


@dataclass
class Point:
    """Stand-in for a point of `calibration.curve`."""

    threshold: float
    lam: float
    speedup: float
    accuracy: float
    metrics: dict = field(default_factory=dict)


@dataclass
class Calibration:
    """Stand-in for the calibration result (`de3_transformers.calibration`): only the attributes cards read."""

    threshold: float
    lam: float
    target_speedup: float
    speedup: float
    accuracy: float
    full_accuracy: float
    metrics: dict
    curve: list


# Layer speed-ups chosen so each of 1x, 1.5x, 2x, 2.5x, 3x, 4x has one nearest point, with no ties.
CURVE_SPEEDUPS = [1.0, 1.2, 1.45, 1.7, 2.05, 2.3, 2.55, 3.1, 3.6, 4.3]
NEAREST = [1.0, 1.45, 2.05, 2.55, 3.1, 4.3]


def make_calibration(threshold=0.3125, lam=1.5, speedups=CURVE_SPEEDUPS):
    # Threshold grows with speed-up; accuracy and F1 fall: 0.90 - 0.05 * (speedup - 1).
    curve = [
        Point(round(0.1 * i, 1), lam, s, round(0.9 - 0.05 * (s - 1), 4), {"f1": round(0.8 - 0.05 * (s - 1), 4)})
        for i, s in enumerate(speedups)
    ]
    return Calibration(threshold, lam, 2.0, 2.05, 0.8725, 0.9, {"accuracy": 0.8725, "f1": 0.7725}, curve[::-1])


EVAL_METRICS = {
    "accuracy": 0.9125,
    "f1": 0.8875,
    "early_exit_accuracy": 0.8625,
    "early_exit_f1": 0.8375,
    "early_exit_speedup": 2.125,
}
SETUP = {"train_samples": 2490, "epochs": 3, "batch_size": 32, "learning_rate": 2e-5, "hardware": "1x H100",
         "training_time": "4.2 min"}


@pytest.fixture(scope="module")
def card_path(tmp_path_factory):
    model = tiny_model(id2label={0: "entailment", 1: "neutral", 2: "contradiction"}, dar_alpha=0.001)
    return write_model_card(
        tmp_path_factory.mktemp("card") / "de3-minilm-rte", model, task_name="rte", dataset_name="nyu-mll/glue",
        base_model="bert-base-uncased", training_setup=SETUP, eval_metrics=EVAL_METRICS,
        calibration=make_calibration(),
    )


@pytest.fixture(scope="module")
def card(card_path):
    return ModelCard.load(card_path)


def minimal_card(model=None, **kwargs):
    model = tiny_model() if model is None else model
    return build_model_card(model, **{"task_name": "rte", "dataset_name": "nyu-mll/glue", **kwargs})


def table_rows(text: str, heading: str, level: str = "##") -> list[list[str]]:
    """The cells of the first table under the heading, header and divider excluded."""
    section = text.split(f"\n{level} {heading}\n", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split(" | ")] for line in lines[2:]]


# Metadata


def test_card_is_written_as_readme_md(card_path):
    assert card_path.name == "README.md"
    assert card_path.parent.name == "de3-minilm-rte"


def test_yaml_header_has_library_tags_datasets_and_base_model(card):
    data = card.data
    assert data.library_name == "transformers"
    assert {"de3-transformers", "early-exit", "text-classification"} <= set(data.tags)
    assert data.datasets == ["nyu-mll/glue"]
    assert data.base_model == "bert-base-uncased"
    assert data.license == "apache-2.0"
    assert data.language == "en"
    assert data.metrics == ["accuracy", "f1"]  # the speed-up is a cost, not a metric


def test_model_index_holds_the_given_values_for_full_model_and_early_exit(card):
    data = card.data
    assert data.model_name == "de3-minilm-rte"  # write_model_card names the model after its folder
    results = {result.metric_name: result for result in data.eval_results}
    early = "early exit, threshold 0.3125, lambda 1.5, 2.12x layer speed-up"
    assert {name: result.metric_value for name, result in results.items()} == {
        "Accuracy (full model)": 0.9125,
        "F1 (full model)": 0.8875,
        f"Accuracy ({early})": 0.8625,
        f"F1 ({early})": 0.8375,
    }
    result = results["Accuracy (full model)"]
    assert (result.task_type, result.task_name) == ("text-classification", "rte")
    assert (result.dataset_type, result.dataset_name) == ("nyu-mll/glue", "nyu-mll/glue")


def test_nested_eval_metrics_give_the_same_model_index_as_flat_ones():
    nested = {"full_model": {"accuracy": 0.9125, "f1": 0.8875},
              "early_exit": {"accuracy": 0.8625, "f1": 0.8375, "speedup": 2.125}}
    flat_card = minimal_card(eval_metrics=EVAL_METRICS)
    nested_card = minimal_card(eval_metrics=nested)
    assert nested_card.data.to_dict()["model-index"] == flat_card.data.to_dict()["model-index"]


def test_local_base_model_stays_out_of_the_yaml_and_shows_only_its_folder_name(tmp_path):
    local = tmp_path / "minilm-l6"
    local.mkdir()
    card = minimal_card(base_model=str(local))
    assert card.data.base_model is None
    assert "`minilm-l6` (a local checkpoint)" in card.text
    assert str(tmp_path) not in card.text


# Sections and their numbers


def test_description_shows_labels_layers_and_saved_defaults(card):
    rows = dict(table_rows(card.text, "de3-minilm-rte", level="#"))
    assert rows["Labels"] == "`0` entailment, `1` neutral, `2` contradiction"
    assert rows["Encoder layers"] == str(TINY["num_hidden_layers"])
    assert rows["Exits (4) after layers"] == "1, 2, 3, 4"
    assert rows["Default threshold, lambda"] == "0.2, 1"  # DE3BertConfig defaults


def test_usage_shows_predict_early_and_the_trust_remote_code_route(card):
    assert "import de3_transformers" in card.text
    assert 'AutoModelForSequenceClassification.from_pretrained("de3-minilm-rte")' in card.text
    assert "model.predict_early(**inputs)" in card.text
    assert 'from_pretrained("de3-minilm-rte", trust_remote_code=True)' in card.text


def test_training_setup_table_has_the_given_values_and_the_config_de3_settings(card):
    rows = dict(table_rows(card.text, "Training set-up"))
    assert rows == {
        "Base model": "[bert-base-uncased](https://huggingface.co/bert-base-uncased)",
        "Dataset": "nyu-mll/glue",
        "Training samples": "2490",
        "Epochs": "3",
        "Batch size": "32",
        "Learning rate": "2e-05",
        "DAR type": "center",
        "DAR alpha": "0.001",
        "Distance": "cosine",
        "Prototype momentum": "0.5",
        "Exit layers": "1, 2, 3, 4",
        "Training objective": "de3",
        "Hardware": "1x H100",
        "Training time": "4.2 min",
    }
    assert "trained with the DE3 objective" in card.text


def test_training_setup_names_the_cosee_and_mpee_objectives_and_token_exit():
    cosee = minimal_card(model=tiny_model(training_objective="cosee"), training_setup={"epochs": 1})
    assert dict(table_rows(cosee.text, "Training set-up"))["Training objective"] == "cosee"
    assert "trained with COSEE" in cosee.text
    mpee_model = tiny_model(training_objective="mpee", token_exit_ratio=0.7, exit_memory=0.9)
    mpee = minimal_card(model=mpee_model, training_setup={"epochs": 1})
    rows = dict(table_rows(mpee.text, "Training set-up"))
    assert rows["Token exit ratio R_ee (after layers)"] == "0.7 (1, 3)"
    assert rows["Exit classifier memory lambda"] == "0.9"
    assert "trained with MPEE" in mpee.text


def test_calibrated_settings_show_threshold_lambda_and_measured_values(card):
    assert dict(table_rows(card.text, "Calibrated early-exit settings")) == {
        "Threshold": "0.3125",
        "Lambda": "1.5",
        "Target layer speed-up": "2.00x",
        "Measured layer speed-up": "2.05x",
        "Accuracy, early exit": "0.8725",
        "Accuracy, full model": "0.9000",
        "F1, early exit": "0.7725",
    }


def test_calibrated_setting_other_than_the_saved_defaults_is_spelled_out(card):
    # The config keeps its defaults (0.2, 1.0), so the card says how to pass the calibrated pair.
    assert "predict_early(**inputs, threshold=0.3125, lam=1.5)" in card.text


def test_calibrated_setting_saved_in_the_config_is_called_the_default():
    model = tiny_model(early_exit_threshold=0.3125, early_exit_lambda=1.5)
    text = build_model_card(model, task_name="rte", dataset_name="nyu-mll/glue", calibration=make_calibration()).text
    assert "These are the defaults saved in the config" in text
    assert "threshold=0.3125, lam=1.5)" not in text


def test_tradeoff_table_is_the_curve_points_nearest_the_reference_speedups_sorted(card):
    rows = table_rows(card.text, "Speed-accuracy trade-off")
    assert [row[2] for row in rows] == [f"{s:.2f}x" for s in NEAREST]
    # 2.05x is the 5th curve point: threshold 0.4, accuracy 0.9 - 0.05 * 1.05, F1 0.8 - 0.05 * 1.05.
    assert rows[2] == ["0.4", "1.5", "2.05x", "0.8475", "0.7475"]


def test_tradeoff_table_does_not_repeat_a_point_nearest_to_several_speedups():
    card = minimal_card(calibration=make_calibration(speedups=[1.0, 1.3]))
    assert [row[2] for row in table_rows(card.text, "Speed-accuracy trade-off")] == ["1.00x", "1.30x"]


def test_given_tradeoff_rows_replace_the_curve_and_keep_their_order():
    rows = [
        {"setting": "DE3 @ 2x", "threshold": 0.25, "lam": 1.0, "speedup": 1.98, "accuracy": 0.875, "f1": 0.8},
        {"setting": "DE3 @ 1.5x", "threshold": 0.125, "lam": 1.0, "speedup": 1.49, "accuracy": 0.9, "f1": 0.85},
    ]
    card = minimal_card(calibration=make_calibration(), tradeoff_rows=rows)
    text = card.text
    assert "| Setting | Threshold | Lambda | Layer speed-up | Accuracy | F1 |" in text
    assert table_rows(text, "Speed-accuracy trade-off") == [
        ["DE3 @ 2x", "0.25", "1", "1.98x", "0.8750", "0.8000"],
        ["DE3 @ 1.5x", "0.125", "1", "1.49x", "0.9000", "0.8500"],
    ]


def test_evaluation_table_compares_full_model_and_early_exit(card):
    assert table_rows(card.text, "Evaluation results") == [
        ["Full model (all 4 layers)", "1.00x", "0.9125", "0.8875"],
        ["Early exit (threshold 0.3125, lambda 1.5)", "2.12x", "0.8625", "0.8375"],
    ]


def test_sections_without_data_are_left_out():
    card = minimal_card()
    text = card.text
    for heading in ("Training set-up", "Calibrated early-exit settings", "Speed-accuracy trade-off",
                    "Evaluation results"):
        assert f"## {heading}" not in text
    for heading in ("How to use", "Limitations", "Citation"):
        assert f"## {heading}" in text
    data = card.data.to_dict()
    assert "model-index" not in data and "base_model" not in data and "metrics" not in data
    assert "Base model" not in text


def test_limitations_and_citation_are_always_present(card):
    assert "Speed-up is counted in layers" in card.text
    assert "Wall-clock speed-up depends on the hardware" in card.text
    assert "DE3-BERT}: Distance-Enhanced Early Exiting for {BERT} based on Prototypical Networks" in card.text
    assert "He, Jianing and Zhang, Qi and Ding, Weiping" in card.text


# Errors


@pytest.mark.parametrize("missing", ["task_name", "dataset_name"])
@pytest.mark.parametrize("value", [None, "", "  "])
def test_missing_task_or_dataset_name_raises(missing, value):
    with pytest.raises(ValueError, match=f"{missing} is required"):
        minimal_card(**{missing: value})


def test_model_without_a_de3_config_raises():
    with pytest.raises(ValueError, match="no DE3 config"):
        build_model_card(BertConfig(**TINY), task_name="rte", dataset_name="nyu-mll/glue")


def test_non_numeric_metric_raises():
    with pytest.raises(ValueError, match="must be a finite number"):
        minimal_card(eval_metrics={"accuracy": "high"})


def test_unknown_nested_eval_setting_raises():
    with pytest.raises(ValueError, match="unknown settings"):
        minimal_card(eval_metrics={"halfway": {"accuracy": 0.5}})


def test_calibration_without_the_expected_attributes_raises():
    with pytest.raises(TypeError, match="curve"):
        minimal_card(calibration=Point(0.2, 1.0, 2.0, 0.9))


def test_trainer_evaluate_output_goes_into_the_card_as_it_is(tmp_path):
    from de3_transformers import DE3Trainer, DE3TrainingArguments

    from conftest import mixed_length_batch, train_prototypes
    from datasets import Dataset

    model = train_prototypes(tiny_model())
    input_ids, attention_mask = mixed_length_batch(batch_size=9)
    data = Dataset.from_dict({"input_ids": input_ids.tolist(), "attention_mask": attention_mask.tolist(),
                              "labels": [i % 3 for i in range(9)]})
    args = DE3TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], eval_threshold=0.5)
    metrics = DE3Trainer(model=model, args=args, eval_dataset=data).evaluate()
    card = build_model_card(model, task_name="toy", dataset_name="toy-data", eval_metrics=metrics)
    results = card.data.to_dict()["model-index"][0]["results"][0]["metrics"]
    assert {metric["type"] for metric in results} == {"accuracy"}
    values = {metric["name"]: metric["value"] for metric in results}
    assert values["Accuracy (full model)"] == metrics["eval_accuracy"]
    early = next(name for name in values if name.startswith("Accuracy (early exit"))
    assert values[early] == metrics["eval_early_exit_accuracy"]
    assert f"{metrics['eval_early_exit_speedup']:.2f}x" in early


def test_calibration_of_another_policy_names_it_and_its_parameters():
    from de3_transformers.calibration import calibrate

    from conftest import mixed_length_batch, train_prototypes

    model = train_prototypes(tiny_model())
    input_ids, attention_mask = mixed_length_batch(batch_size=12, seed=11)
    rows = [{"input_ids": ids[mask.bool()].tolist(), "label": index % 2}
            for index, (ids, mask) in enumerate(zip(input_ids, attention_mask))]
    result = calibrate(model, rows, target_speedup=1.5, policy="patience")
    text = build_model_card(model, task_name="rte", dataset_name="nyu-mll/glue", calibration=result).text
    assert "`patience`" in text and "'patience'" in text


def test_a_config_alone_gives_the_same_card_as_its_model():
    model = tiny_model(early_exit_policy="entropy", early_exit_threshold=0.25)
    from_model = build_model_card(model, task_name="rte", dataset_name="nyu-mll/glue", eval_metrics=EVAL_METRICS)
    from_config = build_model_card(model.config, task_name="rte", dataset_name="nyu-mll/glue",
                                   eval_metrics=EVAL_METRICS)
    assert from_config.content == from_model.content
    assert "Early exit (policy entropy, threshold 0.25)" in from_config.text  # the saved default, named
