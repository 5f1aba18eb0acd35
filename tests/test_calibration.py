"""Calibration: the exit threshold for a target layer speed-up, chosen from one full-depth pass; its command refuses
a user mistake with one line naming it and exit status 2, no traceback."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from de3_transformers import DE3BertForSequenceClassification, get_exit_policy, simulate_policy
from de3_transformers.calibration import calibrate, sweep_candidates, tradeoff_curve
from de3_transformers.calibration_cli import main
from de3_transformers.evaluation import ExitSignals, collect_exit_signals, evaluate_early_exit
from de3_transformers.plots import plot_tradeoff
from de3_transformers.signals import hybrid_indicator

from conftest import mixed_length_batch, tiny_model, train_prototypes


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REPOSITORY = Path(__file__).resolve().parents[1]


def rows_of(input_ids, attention_mask, labels, key="label"):
    """Unpadded tokenized rows, as a tokenizer's `map` leaves them."""
    return [
        {"input_ids": ids[mask.bool()].tolist(), key: int(label)}
        for ids, mask, label in zip(input_ids, attention_mask, labels)
    ]


def labelled_data(model, batch_size=24, seed=5):
    input_ids, attention_mask = mixed_length_batch(batch_size=batch_size, seed=seed,
                                                   pad_token_id=model.config.pad_token_id)
    labels = torch.arange(batch_size) % model.config.num_labels
    return input_ids, attention_mask, labels, rows_of(input_ids, attention_mask, labels)


def one_hot_logits(predictions):
    """`[N, E, 2]` logits (batch-first, as the forward returns them) whose argmax is `predictions` `[E][N]`."""
    return torch.nn.functional.one_hot(torch.tensor(predictions), 2).float().transpose(0, 1)


def hand_signals(entropy, predictions, labels, ratio=None):
    """Signals of a 2-exit model on layers 2 and 4 of 4."""
    return ExitSignals(
        exit_logits=one_hot_logits(predictions),
        entropy=torch.tensor([entropy]).T,
        distance_ratio=None if ratio is None else torch.tensor([ratio]).T,
        labels=torch.tensor(labels),
        exit_layers=[2, 4],
        num_layers=4,
    )


# Four samples, entropies 1/8, 3/8, 3/8, 3/4 at the exit on layer 2. That exit is wrong on sample 2 only; the last
# exit (layer 4) is always right. Thresholds between the distinct values: 0, 1/4, 9/16, 7/8.
#   threshold 0    -> layers 4,4,4,4 -> speed-up 16/16 = 1,   accuracy 1
#   threshold 1/4  -> layers 2,4,4,4 -> speed-up 16/14 = 8/7, accuracy 1
#   threshold 9/16 -> layers 2,2,2,4 -> speed-up 16/10 = 1.6, accuracy 3/4
#   threshold 7/8  -> layers 2,2,2,2 -> speed-up 16/8  = 2,   accuracy 3/4
HAND = dict(entropy=[0.125, 0.375, 0.375, 0.75], predictions=[[0, 1, 1, 1], [0, 1, 0, 1]], labels=[0, 1, 0, 1])


@pytest.fixture
def two_exit_model():
    return tiny_model(num_labels=2, exit_layers=[2, 4])


def test_hand_computed_curve():
    curve = tradeoff_curve(hand_signals(**HAND), lam=0.0)
    assert [point.threshold for point in curve] == [0.0, 0.25, 0.5625, 0.875]
    assert [point.speedup for point in curve] == pytest.approx([1.0, 8 / 7, 1.6, 2.0])
    assert [point.accuracy for point in curve] == [1.0, 1.0, 0.75, 0.75]


def test_hand_computed_calibration_takes_the_smallest_threshold_that_reaches_the_target(two_exit_model):
    signals = hand_signals(**HAND)
    result = calibrate(two_exit_model, None, target_speedup=1.5, lam=0.0, signals=signals)
    assert (result.threshold, result.speedup, result.accuracy, result.full_accuracy) == (0.5625, 1.6, 0.75, 1.0)
    assert calibrate(two_exit_model, None, target_speedup=1.6, lam=0.0, signals=signals).threshold == 0.5625
    assert calibrate(two_exit_model, None, target_speedup=1.61, lam=0.0, signals=signals).threshold == 0.875
    assert calibrate(two_exit_model, None, target_speedup=1.0, lam=0.0, signals=signals).threshold == 0.0


def test_metric_fn_values_are_reported_per_point(two_exit_model):
    def predicted_positive(predictions, labels):
        return {"predicted_positive": float(predictions.sum())}

    result = calibrate(two_exit_model, None, target_speedup=1.5, lam=0.0, metric_fn=predicted_positive,
                       signals=hand_signals(**HAND))
    assert result.metrics == {"predicted_positive": 3.0}  # predictions 0, 1, 1 (layer 2) and 1 (layer 4)
    assert [point.metrics["predicted_positive"] for point in result.curve] == [2.0, 2.0, 3.0, 3.0]


def test_lambda_grid_keeps_the_lambda_with_the_best_accuracy_at_the_target(two_exit_model):
    # The exit on layer 2 is wrong on sample 2 only. Entropy ranks it among the three most confident samples;
    # with lam=1 its large distance ratio pushes it last: EDR = 2 E DR / (E + DR) = 0.1, 0.133, 0.462, 0.0198.
    signals = hand_signals(entropy=[0.1, 0.2, 0.3, 0.9], ratio=[0.1, 0.1, 1.0, 0.01],
                           predictions=[[0, 0, 1, 0], [0, 0, 0, 0]], labels=[0, 0, 0, 0])
    for grid in ([0.0, 1.0], [1.0, 0.0]):
        result = calibrate(two_exit_model, None, target_speedup=1.6, lam_grid=grid, signals=signals)
        assert (result.lam, result.speedup, result.accuracy) == (1.0, 1.6, 1.0)
        assert sorted(result.curves) == [0.0, 1.0] and result.curve is result.curves[1.0]
    only_entropy = calibrate(two_exit_model, None, target_speedup=1.6, lam=0.0, signals=signals)
    assert (only_entropy.speedup, only_entropy.accuracy) == (1.6, 0.75)
    assert two_exit_model.config.early_exit_lambda == 0.0  # the last call saved its own choice


@pytest.fixture
def calibration_setup():
    model = train_prototypes(tiny_model())
    input_ids, attention_mask, labels, rows = labelled_data(model)
    return model, input_ids, attention_mask, labels, rows


def test_collected_signals_equal_one_full_forward_and_leave_the_model_as_it_was(backbone):
    import datasets

    model = train_prototypes(tiny_model(backbone)).train()
    prototypes = model.prototype_memory.prototypes.clone()
    input_ids, attention_mask, labels, _ = labelled_data(model, batch_size=13)
    dataset = datasets.Dataset.from_list(rows_of(input_ids, attention_mask, labels, key="labels"))
    signals = collect_exit_signals(model, dataset, batch_size=5)  # batches of 5, 5 and 3, each padded on its own
    assert model.training and torch.equal(model.prototype_memory.prototypes, prototypes)
    model.eval()
    with torch.no_grad():
        full = model(input_ids=input_ids, attention_mask=attention_mask, output_exit_signals=True)
    torch.testing.assert_close(signals.exit_logits, full.exit_logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(signals.entropy, full.entropy, atol=1e-5, rtol=0)
    torch.testing.assert_close(signals.distance_ratio, full.distance_ratio, atol=1e-5, rtol=0)
    assert torch.equal(signals.labels, labels)
    assert (signals.exit_layers, signals.num_layers) == ([1, 2, 3, 4], 4)
    assert signals.exit_logits.device.type == "cpu" and len(signals) == 13


def test_token_type_ids_are_padded_and_used(calibration_setup):
    model, input_ids, attention_mask, labels, rows = calibration_setup
    token_type_ids = (torch.arange(input_ids.shape[1]) >= 3).long().expand_as(input_ids) * attention_mask
    for row, types, mask in zip(rows, token_type_ids, attention_mask):
        row["token_type_ids"] = types[mask.bool()].tolist()
    signals = collect_exit_signals(model, rows, batch_size=7)
    with torch.no_grad():
        full = model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
    torch.testing.assert_close(signals.exit_logits, full.exit_logits, atol=1e-5, rtol=0)


def test_untrained_prototypes_give_no_distance_ratio_but_entropy_calibrates():
    model = tiny_model()
    _, _, _, rows = labelled_data(model)
    signals = collect_exit_signals(model, rows)
    assert signals.distance_ratio is None
    assert calibrate(model, rows, target_speedup=2.0, lam=0.0, signals=signals).speedup >= 2.0


@pytest.mark.parametrize("lam", [0.0, 1.0, 3.0])
def test_curve_equals_the_simulated_de3_policy(calibration_setup, lam):
    model, _, _, labels, rows = calibration_setup
    signals = collect_exit_signals(model, rows)
    edr = hybrid_indicator(signals.entropy, signals.distance_ratio, lam).flatten()
    # Candidates, thresholds exactly on EDR values (the strict rule's boundary) and thresholds in between.
    thresholds = sweep_candidates(signals, "de3", lam=lam)[::5] + edr[::7].tolist()
    thresholds += torch.quantile(edr, torch.tensor([0.1, 0.5, 0.9])).tolist() + [1.5]
    for point in tradeoff_curve(signals, lam, thresholds=thresholds):
        simulated = simulate_policy(get_exit_policy("de3", threshold=point.threshold, lam=lam), signals.exit_logits,
                                    signals.exit_layers, signals.entropy, signals.distance_ratio)
        assert point.speedup == simulated.speedup
        assert point.accuracy == (simulated.logits.argmax(-1) == labels).double().mean().item()


def test_curve_speedup_rises_with_the_threshold_from_1x_to_the_first_exit(calibration_setup):
    model, *_, rows = calibration_setup
    curve = tradeoff_curve(collect_exit_signals(model, rows), lam=1.0)
    thresholds, speedups = [p.threshold for p in curve], [p.speedup for p in curve]
    assert thresholds == sorted(set(thresholds)) and thresholds[0] == 0.0
    assert all(a <= b for a, b in zip(speedups, speedups[1:]))
    assert speedups[0] == 1.0 and speedups[-1] == 4.0  # every sample leaves at the exit on layer 1 of 4
    assert len(set(speedups)) >= 10


def test_many_candidates_are_thinned_keeping_both_ends(calibration_setup):
    model, *_, rows = calibration_setup
    signals = collect_exit_signals(model, rows)
    every = sweep_candidates(signals, "de3", lam=1.0)
    thinned = sweep_candidates(signals, "de3", max_points=10, lam=1.0)
    assert len(every) > 10 and len(thinned) == 10 and set(thinned) <= set(every)
    assert (thinned[0], thinned[-1]) == (every[0], every[-1])


def test_calibration_reaches_the_target_within_one_threshold_step(calibration_setup):
    model, *_, rows = calibration_setup
    result = calibrate(model, rows, target_speedup=2.0, lam=1.0)
    thresholds = [point.threshold for point in result.curve]
    index = thresholds.index(result.threshold)
    assert result.speedup >= 2.0 and result.curve[index].speedup == result.speedup
    assert index > 0 and result.curve[index - 1].speedup < 2.0


def test_chosen_threshold_replayed_through_predict_early_gives_the_same_speedup_and_accuracy(calibration_setup):
    model, input_ids, attention_mask, labels, rows = calibration_setup
    result = calibrate(model, rows, target_speedup=2.0, lam=1.0)
    replay = model.predict_early(input_ids, attention_mask, threshold=result.threshold, lam=result.lam)
    assert replay.speedup == result.speedup
    assert (replay.logits.argmax(-1) == labels).double().mean().item() == result.accuracy
    assert len(set(replay.sample_exit_layers.tolist())) >= 2  # the compact path really dropped samples on the way


def test_evaluate_early_exit_measures_the_calibrated_setting(calibration_setup):
    model, *_, rows = calibration_setup
    result = calibrate(model, rows, target_speedup=1.5, lam=1.0)
    measured = evaluate_early_exit(model, rows, batch_size=5)  # defaults: the calibrated config values
    assert measured == pytest.approx(
        {"speedup": result.speedup, "flops_speedup": result.flops_speedup, "accuracy": result.accuracy}
    )


def test_calibrated_values_are_saved_in_the_config_and_used_by_default(calibration_setup):
    model, input_ids, attention_mask, *_, rows = calibration_setup
    result = calibrate(model, rows, target_speedup=2.0, lam=2.0)
    assert (model.config.early_exit_threshold, model.config.early_exit_lambda) == (result.threshold, 2.0)
    by_default = model.predict_early(input_ids, attention_mask)
    explicit = model.predict_early(input_ids, attention_mask, threshold=result.threshold, lam=2.0)
    assert torch.equal(by_default.sample_exit_layers, explicit.sample_exit_layers) and by_default.speedup == result.speedup


def test_save_false_leaves_the_config_alone_and_lam_defaults_to_the_config(calibration_setup):
    model, *_, rows = calibration_setup
    model.config.early_exit_threshold, model.config.early_exit_lambda = 0.3, 1.5
    result = calibrate(model, rows, target_speedup=2.0, save=False)
    assert result.lam == 1.5 and list(result.curves) == [1.5]
    assert (model.config.early_exit_threshold, model.config.early_exit_lambda) == (0.3, 1.5)


def test_result_to_dict_is_json_ready(calibration_setup):
    model, *_, rows = calibration_setup
    result = calibrate(model, rows, target_speedup=2.0, lam_grid=[0.0, 1.0])
    loaded = json.loads(json.dumps(result.to_dict()))
    assert loaded["threshold"] == result.threshold and loaded["target_speedup"] == 2.0
    assert sorted(loaded["curves"]) == ["0.0", "1.0"] and len(loaded["curve"]) == len(result.curve)
    first = loaded["curve"][0]
    assert first["flops_speedup"] < 1.0  # at 1x the exit heads and prototypical networks still cost FLOPs
    assert {key: value for key, value in first.items() if key != "flops_speedup"} == {
        "threshold": 0.0, "lam": result.lam, "speedup": 1.0, "accuracy": result.full_accuracy, "metrics": {},
        "policy": "de3", "parameters": {"threshold": 0.0, "lam": result.lam}}


@pytest.mark.parametrize("target, message", [(0.5, ">= 1"), (float("nan"), ">= 1"), ("2", ">= 1"),
                                             (2.5, "largest layer speed-up is 2x"), (float("inf"), "at most 2")])
def test_bad_or_unreachable_targets_are_rejected(two_exit_model, target, message):
    with pytest.raises(ValueError, match=message):
        calibrate(two_exit_model, None, target_speedup=target, lam=0.0, signals=hand_signals(**HAND))


def test_empty_dataset_is_rejected(calibration_setup):
    model, *_ = calibration_setup
    with pytest.raises(ValueError, match="empty"):
        calibrate(model, [], target_speedup=2.0)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda row: row.pop("label"), "no 'label' or 'labels' column"),
        (lambda row: row.update(label="positive"), "label2id"),
        (lambda row: row.update(label=-1), "not class ids"),
    ],
)
def test_unlabelled_or_unmapped_labels_are_rejected(calibration_setup, edit, message):
    model, *_, rows = calibration_setup
    for row in rows:
        edit(row)
    with pytest.raises(ValueError, match=message):
        calibrate(model, rows, target_speedup=2.0)


def test_lambda_above_zero_without_prototypes_says_to_train_or_use_entropy():
    model = tiny_model()
    _, _, _, rows = labelled_data(model)
    with pytest.raises(ValueError, match="Train the model first.*lam=0"):
        calibrate(model, rows, target_speedup=2.0, lam=1.0)


@pytest.mark.parametrize("kwargs, message", [(dict(lam=1.0, lam_grid=[0.0]), "not both"),
                                             (dict(lam_grid=[]), "empty"), (dict(lam=-1.0), "out of range")])
def test_bad_lambda_choices_are_rejected(two_exit_model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        calibrate(two_exit_model, None, target_speedup=1.5, signals=hand_signals(**HAND), **kwargs)


def test_signals_of_another_model_are_rejected(calibration_setup):
    model, *_ = calibration_setup
    with pytest.raises(ValueError, match="collect them from this model"):
        calibrate(model, None, target_speedup=1.5, lam=0.0, signals=hand_signals(**HAND))


def test_plot_is_a_png(two_exit_model, tmp_path):
    pytest.importorskip("matplotlib")
    result = calibrate(two_exit_model, None, target_speedup=1.5, lam=0.0, signals=hand_signals(**HAND))
    path = plot_tradeoff({"lam=0": result.curve}, tmp_path / "tradeoff.png", full_accuracy=result.full_accuracy)
    assert path.read_bytes().startswith(PNG_MAGIC)


def test_plot_without_matplotlib_says_how_to_install_it(monkeypatch, tmp_path):
    # A None entry makes an import fail; every cached submodule too, or `from matplotlib.x import y` still works.
    for name in ["matplotlib", *(name for name in sys.modules if name.startswith("matplotlib."))]:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match=r'pip install "de3-transformers\[plots\]"'):
        plot_tradeoff({"x": []}, tmp_path / "tradeoff.png")


# The command line, end to end, on the real MiniLM.

SENTENCES = [
    ("a warm , funny and beautifully acted film", "positive"),
    ("the plot is thin and the jokes fall flat", "negative"),
    ("one of the most moving stories of the year", "positive"),
    ("i was bored from the first scene to the last", "negative"),
    ("a clever script and a wonderful cast", "positive"),
    ("the dialogue is clumsy and the pacing is worse", "negative"),
    ("an inventive , joyful surprise", "positive"),
    ("a tedious mess that goes nowhere", "negative"),
    ("the performances are simply superb", "positive"),
    ("neither funny nor interesting", "negative"),
    ("it is smart , tender and often hilarious", "positive"),
    ("a dull film with nothing to say", "negative"),
    ("the direction is confident and the images are gorgeous", "positive"),
    ("the characters are flat and the ending is predictable", "negative"),
    ("a delightful film for the whole family", "positive"),
    ("too long , too loud and too silly", "negative"),
    ("a gripping thriller that never lets go", "positive"),
    ("the story makes little sense", "negative"),
    ("an honest and touching portrait of a family", "positive"),
    ("i wanted to leave after twenty minutes", "negative"),
    ("fresh , sharp and full of life", "positive"),
    ("a lazy sequel without a single new idea", "negative"),
    ("the best comedy i have seen in years", "positive"),
    ("an awkward , lifeless drama", "negative"),
]


@pytest.fixture
def saved_minilm(minilm_path, tmp_path):
    labels = {"negative": 0, "positive": 1}
    model = DE3BertForSequenceClassification.from_backbone(
        minilm_path, num_labels=2, exit_layers=[2, 4, 6], id2label={i: name for name, i in labels.items()},
        label2id=labels,
    )
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    model.train()
    with torch.no_grad():  # train-mode forwards with labels set the prototypes; no optimizer step is needed
        for start in (0, 8):
            texts, names = zip(*SENTENCES[start : start + 8])
            batch = tokenizer(list(texts), padding=True, return_tensors="pt")
            model(**batch, labels=torch.tensor([labels[name] for name in names]))
    assert model.prototype_memory.all_initialized
    model.eval().save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    data = tmp_path / "dev.tsv"
    data.write_text("sentence\tlabel\n" + "".join(f"{text}\t{label}\n" for text, label in SENTENCES))
    return tmp_path / "model", data, tokenizer


def test_command_line_calibrates_and_saves_the_model_with_its_threshold(saved_minilm, tmp_path, capsys):
    model_dir, data, tokenizer = saved_minilm
    output_dir = tmp_path / "calibrated"
    result = main(["--model_name_or_path", str(model_dir), "--validation_file", str(data), "--text_column",
                   "sentence", "--label_column", "label", "--target_speedup", "1.5", "--lam_grid", "0,1",
                   "--output_dir", str(output_dir), "--max_length", "32", "--batch_size", "8"])
    assert result.speedup >= 1.5 and result.lam in (0.0, 1.0)
    saved = json.loads((output_dir / "calibration.json").read_text())
    assert (saved["threshold"], saved["lam"], saved["speedup"]) == (result.threshold, result.lam, result.speedup)
    assert sorted(saved["curves"]) == ["0.0", "1.0"]
    printed = capsys.readouterr().out
    assert "full model" in printed and f"{result.speedup:.2f}x" in printed

    reloaded = AutoModelForSequenceClassification.from_pretrained(output_dir)
    assert (reloaded.config.early_exit_threshold, reloaded.config.early_exit_lambda) == (result.threshold, result.lam)
    texts, names = zip(*SENTENCES)
    batch = AutoTokenizer.from_pretrained(output_dir)(list(texts), padding=True, truncation=True, max_length=32,
                                                     return_tensors="pt")
    replay = reloaded.predict_early(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    assert replay.speedup == result.speedup
    labels = torch.tensor([reloaded.config.label2id[name] for name in names])
    assert (replay.logits.argmax(-1) == labels).double().mean().item() == result.accuracy
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (output_dir / "tradeoff.png").read_bytes().startswith(PNG_MAGIC)


def test_command_line_calibrates_another_policy_and_saves_it_as_the_default(saved_minilm, tmp_path, capsys):
    model_dir, data, _ = saved_minilm
    result = main(["--model_name_or_path", str(model_dir), "--validation_file", str(data), "--policy", "patience",
                   "--target_speedup", "1.5", "--output_dir", str(tmp_path / "out"), "--max_length", "32"])
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out")
    assert result.policy == "patience" and result.speedup >= 1.5
    assert (reloaded.config.early_exit_policy, reloaded.config.early_exit_patience) == (
        "patience", int(result.parameters["patience"]))
    assert "patience @ 1.5x" in capsys.readouterr().out


def refused(argv: list[str], capsys) -> str:
    """The line `main(argv)` prints to stderr last, `<prog>: error: ...`, when it refuses `argv` with exit status 2."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    line = capsys.readouterr().err.splitlines()[-1]
    assert line.startswith("python -m de3_transformers.calibration: error: "), line
    return line


@pytest.mark.parametrize("extra, message", [(["--lam", "1", "--lam_grid", "0,1"], "not both"),
                                            (["--target_speedup", "0.5"], ">= 1"),
                                            (["--lam_grid", "0,x"], "comma-separated numbers"),
                                            (["--lam", "-1"], "--lam / --lam_grid: lam=-1.0"),
                                            (["--policy", "oracle"], "cannot be calibrated"),
                                            (["--policy", "entropy", "--lam", "1"], "de3 only"),
                                            (["--lam_grd", "0,1"], r"unrecognized arguments: --lam_grd 0,1")])
def test_command_line_arguments_are_validated(tmp_path, capsys, extra, message):
    data = tmp_path / "dev.tsv"
    data.write_text("sentence\tlabel\nfine\tpositive\n")
    line = refused(["--model_name_or_path", "unused", "--validation_file", str(data), "--output_dir", str(tmp_path),
                    *extra], capsys)
    assert re.search(message, line), line


def test_command_line_names_the_columns_the_file_lacks(saved_minilm, tmp_path, capsys):
    model_dir, data, _ = saved_minilm
    line = refused(["--model_name_or_path", str(model_dir), "--validation_file", str(data), "--text_column", "text",
                    "--output_dir", str(tmp_path / "out")], capsys)
    assert "Columns ['text'] are not in" in line and "pass --text_column, --text_pair_column and --label_column" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command, mistake, message", [
    (["-m", "de3_transformers", "calibrate"], ["--validation_file", "nowhere.tsv"],
     r"^python -m de3_transformers calibrate: error: --validation_file nowhere\.tsv does not exist: pass the path"),
    (["-m", "de3_transformers.calibration"], ["--target_speedup", "0.5"],
     r"^python -m de3_transformers\.calibration: error: --target_speedup 0\.5 must be a number >= 1"),
])
def test_the_command_refuses_a_user_mistake_in_one_line_with_exit_status_2(tmp_path, command, mistake, message):
    data = tmp_path / "dev.tsv"
    data.write_text("sentence\tlabel\nfine\tpositive\n")
    env = {**os.environ, "PYTHONPATH": str(REPOSITORY), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    run = subprocess.run([sys.executable, *command, "--model_name_or_path", "unused", "--validation_file", str(data),
                          "--output_dir", str(tmp_path / "out"), *mistake], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-3000:]
    (line,) = run.stderr.splitlines()
    assert re.search(message, line), line


def test_thinned_curves_still_give_the_smallest_threshold_reaching_the_target():
    generator = torch.Generator().manual_seed(0)
    entropy = torch.rand(3, 3000, generator=generator)
    predictions = torch.randint(0, 2, (4, 3000), generator=generator)
    signals = ExitSignals(exit_logits=one_hot_logits(predictions.tolist()), entropy=entropy.T, distance_ratio=None,
                          labels=torch.randint(0, 2, (3000,), generator=generator), exit_layers=[1, 2, 3, 4],
                          num_layers=4)
    full_curve = tradeoff_curve(signals, 0.0, max_points=10**6)
    assert len(sweep_candidates(signals, "de3", lam=0.0)) < len(full_curve)  # the default curve is thinned
    for target in (1.3, 1.7, 2.2, 3.1):
        expected = next(point for point in full_curve if point.speedup >= target)
        result = calibrate(tiny_model(num_labels=2), None, target_speedup=target, lam=0.0, signals=signals, save=False)
        assert result.threshold == expected.threshold and result.speedup == expected.speedup
