"""Reliability of the ONNX Runtime runner ("Reliability III"): it refuses the inputs and exit parameters
`predict_early` refuses, with the same kind of error; it refuses at load an export folder whose files do not belong
together (edited settings, an interrupted re-export, a graph of another export); and its text entry point refuses
what is not a batch of texts with errors that name the fix. Tiny models only (one with the MiniLM's vocabulary, so
the MiniLM tokenizer serves it)."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from de3_onnx import OnnxEarlyExitClassifier
from de3_transformers import export_onnx
from de3_transformers import onnx_export as onnx_export_module
from de3_transformers.configuration_de3 import MAX_LAMBDA

from conftest import mixed_length_batch, tiny_model, train_prototypes


@pytest.fixture(scope="module")
def trained():
    """A tiny BERT with the MiniLM's vocabulary (30522 ids, 2 token types) and its prototypes set."""
    return train_prototypes(tiny_model("bert", vocab_size=30522))


@pytest.fixture(scope="module")
def export(trained, minilm_path, tmp_path_factory):
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    return export_onnx(trained, tmp_path_factory.mktemp("onnx") / "export", tokenizer=tokenizer)


@pytest.fixture
def copy(export, tmp_path):
    """A copy of the export that a test may edit."""
    return shutil.copytree(export, tmp_path / "export")


def edit_settings(folder, **changes):
    path = folder / "de3_onnx.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


IDS, MASK = (tensor.numpy() for tensor in mixed_length_batch(batch_size=4, max_length=8))


def bad_inputs(case: str) -> dict:
    """One wrong input per case, the rest right (numpy)."""
    ids, mask, types = IDS.copy(), MASK.copy(), np.zeros_like(IDS)
    if case == "mask row of zeros":
        mask[1] = 0
    elif case == "token id -3":
        ids[0, 0] = -3
    elif case == "token id = vocab size":
        ids[0, 0] = 30522
    elif case == "token type -1":
        types[0, 0] = -1
    elif case == "token type = type vocab size":
        types[0, 0] = 2
    elif case == "mask value 2":
        mask[0, 0] = 2
    elif case == "float ids":
        ids = ids.astype(np.float64)
    elif case == "mask of another shape":
        mask = mask[:, :-1]
    elif case == "left padding":
        mask[1] = [0, 0, 1, 1, 1, 1, 1, 1]
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


INPUT_CASES = ["mask row of zeros", "token id -3", "token id = vocab size", "token type -1",
               "token type = type vocab size", "mask value 2", "float ids", "mask of another shape",
               "left padding"]
PARAMETER_CASES = {
    "threshold=-1": dict(policy="energy", threshold=-1.0),
    "threshold=True": dict(policy="max_prob", threshold=True),
    "lam=1e7": dict(policy="de3", threshold=0.5, lam=1e7),
    "patience=0 (patient_confident)": dict(policy="patient_confident", threshold=0.5, patience=0),
    "patience=2.5": dict(policy="patience", patience=2.5),
    "de3 threshold -0.5": dict(policy="de3", threshold=-0.5, lam=1.0),
    "entropy threshold -1": dict(policy="entropy", threshold=-1.0),
    "threshold NaN": dict(policy="learned", threshold=float("nan")),
}
# Values at the edges that both accept.
ACCEPTED_CASES = {
    "max_prob threshold -1": dict(policy="max_prob", threshold=-1.0),
    "patience=0 (patience)": dict(policy="patience", patience=0),
    "lam=MAX_LAMBDA": dict(policy="de3", threshold=0.5, lam=MAX_LAMBDA),
    "entropy threshold 0": dict(policy="entropy", threshold=0.0),
    "patience=3.0": dict(policy="patience", patience=3.0),
    "de3 patience ignored": dict(policy="de3", threshold=0.5, lam=1.0, patience=2.5),
}


def error_of(call):
    try:
        call()
    except (ValueError, TypeError) as error:
        return error
    return None


@pytest.mark.parametrize("case", INPUT_CASES)
def test_runner_refuses_the_inputs_predict_early_refuses_with_the_same_error(trained, export, case):
    inputs = bad_inputs(case)
    expected = error_of(lambda: trained.predict_early(**{name: torch.from_numpy(value)
                                                         for name, value in inputs.items()}, policy="entropy",
                                                      threshold=0.5))
    got = error_of(lambda: OnnxEarlyExitClassifier(export).predict(**inputs, policy="entropy", threshold=0.5))
    assert expected is not None and got is not None, (expected, got)
    assert type(got) is type(expected), (got, expected)


@pytest.mark.parametrize("case", sorted(PARAMETER_CASES))
def test_runner_refuses_the_exit_parameters_predict_early_refuses_with_the_same_error(trained, export, case):
    parameters = PARAMETER_CASES[case]
    expected = error_of(lambda: trained.predict_early(torch.from_numpy(IDS), torch.from_numpy(MASK), **parameters))
    got = error_of(lambda: OnnxEarlyExitClassifier(export).predict(IDS, MASK, **parameters))
    assert expected is not None and got is not None, (expected, got)
    assert type(got) is type(expected) and "must be" in str(got), (got, expected)


@pytest.mark.parametrize("case", sorted(ACCEPTED_CASES))
def test_runner_accepts_the_edge_values_predict_early_accepts(trained, export, case):
    parameters = ACCEPTED_CASES[case]
    expected = trained.predict_early(torch.from_numpy(IDS), torch.from_numpy(MASK), **parameters)
    got = OnnxEarlyExitClassifier(export).predict(IDS, MASK, **parameters)
    assert got["exit_layers"].tolist() == expected.sample_exit_layers.tolist()


def test_the_runner_reads_max_lambda_and_sizes_from_the_export_and_old_exports_still_load(copy):
    settings = json.loads((copy / "de3_onnx.json").read_text())
    assert (settings["max_lambda"], settings["vocab_size"], settings["type_vocab_size"]) == (MAX_LAMBDA, 30522, 2)
    # An export written before these keys and the manifest: the sizes come from config.json, lambda's bound from
    # the runner's default.
    for key in ("max_lambda", "vocab_size", "type_vocab_size", "export_id", "files"):
        settings.pop(key)
    (copy / "de3_onnx.json").write_text(json.dumps(settings))
    runner = OnnxEarlyExitClassifier(copy)
    with pytest.raises(ValueError, match="tokenizer that belongs"):
        runner.predict(bad_inputs("token id = vocab size")["input_ids"])
    with pytest.raises(ValueError, match="at most 1e\\+06"):
        runner.predict(IDS, policy="de3", threshold=0.5, lam=1e7)


def test_predict_dataset_on_onnx_runtime_refuses_a_bad_threshold(copy):
    from de3_transformers import predict_dataset

    rows = [{"input_ids": [101, 2204, 102]}, {"input_ids": [101, 2919, 2143, 102]}]
    with pytest.raises(ValueError, match="threshold"):
        predict_dataset(copy, rows, backend="onnxruntime", policy="entropy", threshold=-1.0)


@pytest.mark.parametrize("exit_layers", [[2, 4], [2, 3, 4, 5], [0, 1, 2, 3], [1, 2, 3]])
def test_edited_exit_layers_are_refused_at_load(copy, exit_layers):
    edit_settings(copy, exit_layers=exit_layers)
    with pytest.raises(ValueError, match="de3_onnx.json.*export the model again"):
        OnnxEarlyExitClassifier(copy)


def test_exit_layers_disagreeing_with_config_json_are_refused_at_load(copy):
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "exit_layers": [2, 4], "num_hidden_layers": 4}))
    with pytest.raises(ValueError, match="config.json.*export the model again"):
        OnnxEarlyExitClassifier(copy)


@pytest.mark.parametrize("num_labels", [1, 4])
def test_num_labels_disagreeing_with_the_graphs_is_refused_at_load(copy, num_labels):
    edit_settings(copy, num_labels=num_labels, id2label={str(index): f"L{index}" for index in range(num_labels)})
    (copy / "config.json").unlink()  # so that the graphs, not config.json, are what disagrees
    with pytest.raises(ValueError, match="num_labels.*gives 3 logits"):
        OnnxEarlyExitClassifier(copy)


def test_a_re_export_interrupted_half_way_leaves_the_previous_export_whole(trained, tmp_path, monkeypatch):
    folder = export_onnx(trained, tmp_path / "export")
    runner = OnnxEarlyExitClassifier(folder)
    before = runner.predict(IDS, MASK, policy="entropy", threshold=0.9)
    real_export, written = onnx_export_module._export, []

    def killed_after_three(*args, **kwargs):  # the process dies while writing the fourth graph
        if len(written) == 3:
            raise KeyboardInterrupt
        written.append(args[2])
        real_export(*args, **kwargs)

    monkeypatch.setattr(onnx_export_module, "_export", killed_after_three)
    with pytest.raises(KeyboardInterrupt):
        export_onnx(tiny_model("bert", seed=7, vocab_size=30522), folder)
    after = OnnxEarlyExitClassifier(folder).predict(IDS, MASK, policy="entropy", threshold=0.9)
    np.testing.assert_array_equal(after["logits"], before["logits"])
    assert sorted(os.listdir(tmp_path)) == ["export"]  # no temporary folder left behind


def test_a_re_export_interrupted_while_moving_files_in_does_not_load(trained, tmp_path, monkeypatch):
    folder = export_onnx(trained, tmp_path / "export")
    real_replace, moved = os.replace, []

    def killed_after_three(source, destination):
        if len(moved) == 3:
            raise KeyboardInterrupt
        moved.append(destination)
        real_replace(source, destination)

    monkeypatch.setattr(os, "replace", killed_after_three)
    with pytest.raises(KeyboardInterrupt):
        export_onnx(tiny_model("bert", seed=7, vocab_size=30522), folder)
    monkeypatch.undo()
    with pytest.raises(FileNotFoundError, match="export_onnx"):
        OnnxEarlyExitClassifier(folder)


def test_a_graph_of_another_export_or_a_changed_file_is_refused_at_load(trained, export, copy, tmp_path):
    other = export_onnx(train_prototypes(tiny_model("bert", seed=7, vocab_size=30522)), tmp_path / "other")
    shutil.copy(other / "exit_2.onnx", copy / "exit_2.onnx")  # same architecture: the same size
    with pytest.raises(ValueError, match="exit_2.onnx belongs to another export.*export the model again"):
        OnnxEarlyExitClassifier(copy)
    shutil.copy(export / "exit_2.onnx", copy / "exit_2.onnx")
    with open(copy / "exit_1.onnx", "ab") as graph:
        graph.write(b"\0")
    with pytest.raises(ValueError, match="exit_1.onnx has .* bytes.*export the model again"):
        OnnxEarlyExitClassifier(copy)
    (copy / "exit_1.onnx").unlink()
    with pytest.raises(ValueError, match="lacks exit_1.onnx.*export the model again"):
        OnnxEarlyExitClassifier(copy)


def test_a_re_export_with_fewer_exits_leaves_no_graph_behind(trained, tmp_path):
    folder = export_onnx(trained, tmp_path / "export")
    export_onnx(tiny_model("bert", num_hidden_layers=2, vocab_size=30522), folder)
    assert sorted(path.name for path in folder.glob("exit_*.onnx")) == ["exit_0.onnx", "exit_1.onnx"]
    answers = OnnxEarlyExitClassifier(folder).predict(IDS, MASK, policy="entropy", threshold=0.0)
    assert answers["exit_layers"].tolist() == [2] * 4


@pytest.mark.parametrize("call, error, message", [
    (lambda runner: runner(["a film"], batch_size=0), ValueError, "batch_size=0"),
    (lambda runner: runner(["a film"], batch_size=2.5), TypeError, "batch_size=2.5"),
    (lambda runner: runner(["a film", None]), TypeError, "texts\\[1\\] is None"),
    (lambda runner: runner(["a film", "a play"], text_pairs=["fine", None]), TypeError, "text_pairs\\[1\\] is None"),
    (lambda runner: runner(["a film", "a play"], text_pairs=["fine"]), ValueError, "one pair per text"),
    (lambda runner: runner.predict(IDS, MASK[:, :-1]), ValueError, "must match input_ids"),
], ids=["batch_size=0", "batch_size=2.5", "None text", "None pair", "fewer pairs", "mask of another shape"])
def test_the_runner_refuses_what_is_not_a_batch_of_texts_naming_the_fix(export, call, error, message):
    with pytest.raises(error, match=message):
        call(OnnxEarlyExitClassifier(export))
