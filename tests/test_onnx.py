"""Early exit on ONNX Runtime: `export_onnx` and the torch-free `de3_onnx` runner give the exits and logits of
`predict_early`, for every policy that needs no labels, on the real MiniLM and on tiny random models, with and without
MPEE token exit."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from de3_onnx import POLICY_NAMES, OnnxEarlyExitClassifier
from de3_transformers import calibrate, collect_exit_signals, export_onnx
from de3_transformers.data import load_glue_task
from de3_transformers.token_exit import prune_tokens

from conftest import blocking_imports, mixed_length_batch, tiny_model, train_prototypes


@pytest.fixture(scope="module")
def exported(minilm_checkpoint, tmp_path_factory):
    model = AutoModelForSequenceClassification.from_pretrained(minilm_checkpoint).eval()
    tokenizer = AutoTokenizer.from_pretrained(minilm_checkpoint)
    folder = export_onnx(model, tmp_path_factory.mktemp("onnx") / "export", tokenizer=tokenizer)
    return model, tokenizer, folder


def calibrated_settings(model, rows, policies=POLICY_NAMES) -> dict[str, dict]:
    """Each policy's parameters calibrated on `rows` (labelled, tokenized) for a 2x layer speed-up (1.5x for
    patience), so samples leave at different exits under every one."""
    signals = collect_exit_signals(model, rows)
    settings = {}
    for name in policies:
        result = calibrate(model, None, target_speedup=2.0 if name != "patience" else 1.5, policy=name,
                           signals=signals, save=False)
        settings[name] = {key: value for key, value in result.parameters.items() if key in ("threshold", "lam",
                                                                                            "patience")}
    return settings


@pytest.fixture(scope="module")
def policy_settings(exported, glue_dir):
    """Each policy calibrated on 64 SST-2 training sentences."""
    model, tokenizer, _ = exported
    rows = load_glue_task("sst2", glue_dir)["train"].select(range(400, 464))
    return calibrated_settings(model, [dict(tokenizer(row["sentence"]), label=row["label"]) for row in rows])


@pytest.fixture(scope="module")
def dev_sentences(glue_dir):
    return load_glue_task("sst2", glue_dir)["validation"]["sentence"][:200]


def assert_answers_of_predict_early(model, runner, batches, settings) -> dict[str, set[int]]:
    """Checks, batch by batch and under each policy of `settings`, that the runner's exits equal those of
    `predict_early` and its logits lie within 1e-4. Returns the exit layers each policy used."""
    layers_seen = {}
    for name, parameters in settings.items():
        for index, batch in enumerate(batches):
            expected = model.predict_early(**batch, policy=name, **parameters)
            got = runner.predict(**{key: value.numpy() for key, value in batch.items()}, policy=name, **parameters)
            assert np.array_equal(got["exit_layers"], expected.sample_exit_layers.numpy()), (name, index)
            np.testing.assert_allclose(got["logits"], expected.logits.numpy(), atol=1e-4, rtol=0)
            layers_seen.setdefault(name, set()).update(got["exit_layers"].tolist())
    return layers_seen


def sst2_batches(tokenizer, sentences, batch_size: int) -> list[dict]:
    return [tokenizer(sentences[start : start + batch_size], padding=True, return_tensors="pt")
            for start in range(0, len(sentences), batch_size)]


@pytest.mark.parametrize("batch_size", [1, 7, 64])
def test_exits_and_logits_equal_predict_early_for_every_policy(exported, policy_settings, dev_sentences, batch_size):
    model, tokenizer, folder = exported
    runner = OnnxEarlyExitClassifier(folder, threads=2)
    batches = sst2_batches(tokenizer, dev_sentences, batch_size)
    for name, layers in assert_answers_of_predict_early(model, runner, batches, policy_settings).items():
        assert len(layers) > 1, name  # the comparison covers samples leaving at different exits


def test_texts_give_the_labels_scores_and_layers_of_the_pipeline(exported, dev_sentences):
    from transformers import pipeline

    model, tokenizer, folder = exported
    runner = OnnxEarlyExitClassifier(folder)
    expected = pipeline("text-classification", model=model, tokenizer=tokenizer)(
        dev_sentences[:40], return_exit_layer=True)
    results = runner(dev_sentences[:40], batch_size=8)  # length-sorted batches, results in input order
    assert [(r["label"], r["exit_layer"]) for r in results] == [(r["label"], r["exit_layer"]) for r in expected]
    assert [r["score"] for r in results] == pytest.approx([r["score"] for r in expected], abs=1e-4)
    pairs = runner(dev_sentences[:3], text_pairs=dev_sentences[3:6])
    encoded = tokenizer(dev_sentences[:1], dev_sentences[3:4], return_tensors="pt")
    assert pairs[0]["exit_layer"] == int(model.predict_early(**encoded).sample_exit_layers[0])


def test_the_runner_needs_no_torch(exported, tmp_path):
    _, _, folder = exported
    script = blocking_imports("torch", "de3_transformers", "transformers") + textwrap.dedent(f"""
        import json
        from de3_onnx import OnnxEarlyExitClassifier
        runner = OnnxEarlyExitClassifier({str(folder)!r})
        print(json.dumps(runner(["a gripping, funny film", "a dull, lifeless mess"])))
        assert "torch" not in sys.modules
    """)
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    assert [set(result) for result in results] == [{"label", "score", "exit_layer"}] * 2


@pytest.mark.parametrize("backbone", ["bert", "roberta"])
def test_tiny_models_of_both_backbones_with_classifier_memory(backbone, tmp_path):
    model = train_prototypes(tiny_model(backbone, exit_memory=0.9, exit_layers=[2, 4])).eval()
    folder = export_onnx(model, tmp_path)
    runner = OnnxEarlyExitClassifier(folder)
    input_ids, attention_mask = mixed_length_batch(batch_size=12, pad_token_id=model.config.pad_token_id)
    for policy, parameters in (("de3", {"threshold": 0.5}), ("patience", {"patience": 0})):
        expected = model.predict_early(input_ids, attention_mask, policy=policy, **parameters)
        got = runner.predict(input_ids.numpy(), attention_mask.numpy(), policy=policy, **parameters)
        assert np.array_equal(got["exit_layers"], expected.sample_exit_layers.numpy())
        np.testing.assert_allclose(got["logits"], expected.logits.numpy(), atol=1e-5, rtol=0)
        assert got["speedup"] == pytest.approx(expected.speedup)


def test_what_the_export_does_not_cover_is_refused(tmp_path):
    with pytest.raises(ValueError, match="float32"):
        export_onnx(tiny_model().to(torch.bfloat16), tmp_path)
    folder = export_onnx(tiny_model(), tmp_path / "untrained")  # prototypes never set
    runner = OnnxEarlyExitClassifier(folder)
    ids = np.array([[1, 5, 6, 2]])
    with pytest.raises(ValueError, match="prototypes were never set"):
        runner.predict(ids, policy="de3", threshold=0.5, lam=1.0)
    with pytest.raises(ValueError, match="learning-to-exit"):
        runner.predict(ids, policy="learned", threshold=0.5)
    with pytest.raises(ValueError, match="does not run on ONNX Runtime"):
        runner.predict(ids, policy="oracle")
    with pytest.raises(ValueError, match="finite"):
        runner.predict(ids, policy="entropy", threshold=float("nan"))
    with pytest.raises(ValueError, match="neither empty"):
        runner.predict(np.zeros((0, 4), dtype=np.int64), policy="entropy", threshold=0.5)
    with pytest.raises(FileNotFoundError, match="export_onnx"):
        OnnxEarlyExitClassifier(tmp_path / "nothing")
    assert runner.predict(ids, policy="entropy", threshold=0.0)["exit_layers"].tolist() == [4]


def test_predict_dataset_scores_on_onnx_runtime_with_one_argument(exported, dev_sentences):
    from de3_transformers import predict_dataset

    model, tokenizer, folder = exported
    rows = [tokenizer(text) for text in dev_sentences[:64]]
    expected = predict_dataset(model, rows, batch_size=16)
    for source in (folder, OnnxEarlyExitClassifier(folder)):
        got = predict_dataset(source, rows, batch_size=16, backend="onnxruntime")
        assert torch.equal(got.sample_exit_layers, expected.sample_exit_layers)
        torch.testing.assert_close(got.logits, expected.logits, atol=1e-4, rtol=0)
        assert got.speedup == pytest.approx(expected.speedup) and got.speedup > 1
    with pytest.raises(ValueError, match="backend='tensorrt' is unknown"):
        predict_dataset(model, rows, backend="tensorrt")


@pytest.mark.parametrize("learning_to_exit", [False, True])
def test_one_text_graph_leaves_where_the_chain_and_predict_early_do(learning_to_exit, tmp_path):
    """Batches of one run `one_text.onnx`, written for the model's policy with its rule in the graph and its
    parameters given per call: it leaves each text where the chain of exit graphs and `predict_early` do. Another
    policy at batch 1 runs the chain."""
    model = train_prototypes(tiny_model(exit_memory=0.9, learning_to_exit=learning_to_exit)).eval()
    chain = OnnxEarlyExitClassifier(export_onnx(model, tmp_path / "chain", one_text_graph=False))
    assert chain.config["one_text_graph"] is None and not (tmp_path / "chain" / "one_text.onnx").exists()
    input_ids, attention_mask = mixed_length_batch(batch_size=12, pad_token_id=model.config.pad_token_id)
    settings = [("de3", {"threshold": 0.5}), ("de3", {"threshold": 0.5, "lam": 0.0}), ("de3", {"threshold": 0.4,
                "lam": 3.0}), ("entropy", {"threshold": 0.99}), ("max_prob", {"threshold": 0.4}),
                ("energy", {"threshold": 0.3}), ("patience", {"patience": 1}),
                ("patient_confident", {"threshold": 0.995, "patience": 1})]
    settings += [("learned", {"threshold": 0.5})] if learning_to_exit else []
    layers_seen = set()
    for policy, parameters in settings:
        model.config.early_exit_policy = policy
        runner = OnnxEarlyExitClassifier(export_onnx(model, tmp_path / policy))
        expected = model.predict_early(input_ids, attention_mask, policy=policy, **parameters)
        for row in range(len(input_ids)):
            text = input_ids[row : row + 1, : int(attention_mask[row].sum())].numpy()
            got, chained = runner.predict(text, policy=policy, **parameters), chain.predict(text, policy=policy,
                                                                                            **parameters)
            assert got["exit_layers"].tolist() == chained["exit_layers"].tolist() == [
                int(expected.sample_exit_layers[row])], (policy, parameters, row)
            np.testing.assert_allclose(got["logits"][0], expected.logits[row].numpy(), atol=1e-5, rtol=0)
            layers_seen.add(int(got["exit_layers"][0]))
        assert runner.config["one_text_policy"] == policy  # so the one-text graph served these
    assert layers_seen == set(model.config.exit_layers)  # texts leave at every exit under some policy
    other = runner.predict(input_ids[:1].numpy(), policy="de3", threshold=0.5)  # not the exported policy: the chain
    assert other["exit_layers"].tolist() == chain.predict(input_ids[:1].numpy(), policy="de3",
                                                          threshold=0.5)["exit_layers"].tolist()


def test_one_text_graph_never_leaves_on_nan_and_refuses_a_nan_answer(tmp_path):
    model = train_prototypes(tiny_model()).eval()
    with torch.no_grad():
        model.exit_classifiers[0].bias.fill_(float("nan"))
    runner = OnnxEarlyExitClassifier(export_onnx(model, tmp_path / "first"))
    text = np.array([[1, 5, 6, 7, 2]])
    for policy in ("de3", "entropy", "energy", "max_prob"):  # every text would leave at the first exit otherwise
        assert runner.predict(text, policy=policy, threshold=-1.0 if policy == "max_prob" else 2.0,
                              lam=0.0)["exit_layers"].tolist() == [model.config.exit_layers[1]]
    with torch.no_grad():
        model.classifier.bias.fill_(float("nan"))  # the last exit's head
    runner = OnnxEarlyExitClassifier(export_onnx(model, tmp_path / "top"))
    for batch in (text, np.repeat(text, 2, axis=0)):  # the one-text graph and the chain
        with pytest.raises(FloatingPointError, match="not finite"):
            runner.predict(batch, policy="entropy", threshold=0.0)


def test_calibration_on_onnx_runtime_reads_the_graphs_signals_and_saves_into_the_folder(exported, glue_dir,
                                                                                         tmp_path):
    import shutil

    model, tokenizer, folder = exported
    folder = shutil.copytree(folder, tmp_path / "export")  # calibration writes into it
    rows = load_glue_task("sst2", glue_dir)["train"].select(range(400, 528))
    rows = [dict(tokenizer(row["sentence"]), label=row["label"]) for row in rows]
    on_torch = collect_exit_signals(model, rows, batch_size=32)
    on_onnx = collect_exit_signals(folder, rows, batch_size=32, backend="onnxruntime")
    for name in ("exit_logits", "entropy", "distance_ratio"):
        torch.testing.assert_close(getattr(on_onnx, name), getattr(on_torch, name), atol=1e-4, rtol=0)
    assert torch.equal(on_onnx.labels, on_torch.labels) and on_onnx.exit_layers == on_torch.exit_layers
    expected = calibrate(model, None, target_speedup=2.0, signals=on_torch, save=False)
    runner = OnnxEarlyExitClassifier(folder)
    result = calibrate(runner, rows, target_speedup=2.0, backend="onnxruntime", batch_size=32)
    assert result.threshold == pytest.approx(expected.threshold, abs=1e-5) and result.speedup >= 2.0
    assert runner.config["early_exit_threshold"] == result.threshold
    reloaded = OnnxEarlyExitClassifier(folder)  # the folder's settings were updated
    assert reloaded.config["early_exit_threshold"] == result.threshold
    assert json.loads((folder / "config.json").read_text())["early_exit_threshold"] == result.threshold
    scored = [reloaded.predict(np.array([row["input_ids"]]))["exit_layers"][0] for row in rows]
    assert model.config.num_hidden_layers * len(rows) / sum(scored) == pytest.approx(result.speedup)
    with pytest.raises(ValueError, match="unknown"):
        calibrate(folder, rows, backend="tensorrt")


def test_the_pipeline_runs_on_onnx_runtime_with_one_argument(exported, dev_sentences):
    from transformers import pipeline

    model, tokenizer, folder = exported
    on_torch = pipeline("text-classification", model=model, tokenizer=tokenizer)
    expected = on_torch(dev_sentences[:24], return_exit_layer=True, batch_size=8)
    exported_here = pipeline("text-classification", model=model, tokenizer=tokenizer, backend="onnxruntime")
    given = pipeline("text-classification", model=model, tokenizer=tokenizer, onnx_model=folder)  # implies the backend
    assert given.runner is not None
    for onnx_pipeline in (exported_here, given):
        for batch_size in (1, 8):
            results = onnx_pipeline(dev_sentences[:24], return_exit_layer=True, batch_size=batch_size)
            assert [(r["label"], r["exit_layer"]) for r in results] == [(r["label"], r["exit_layer"])
                                                                        for r in expected]
            assert [r["score"] for r in results] == pytest.approx([r["score"] for r in expected], abs=1e-4)
    full = given(dev_sentences[:2], full_depth=True, return_exit_layer=True)
    assert [r["exit_layer"] for r in full] == [model.config.num_hidden_layers] * 2
    assert [r["score"] for r in full] == pytest.approx([r["score"] for r in on_torch(dev_sentences[:2],
                                                                                    full_depth=True)], abs=1e-4)
    with pytest.raises(ValueError, match="unknown"):
        pipeline("text-classification", model=model, tokenizer=tokenizer, backend="tensorrt")
    with pytest.raises(ValueError, match="onnx_model= is served on ONNX Runtime"):
        pipeline("text-classification", model=model, tokenizer=tokenizer, backend="pytorch", onnx_model=folder)
    from transformers import BertConfig, BertForSequenceClassification

    plain = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                     intermediate_size=37, vocab_size=tokenizer.vocab_size))
    with pytest.raises(ValueError, match="serve DE3 models"):
        pipeline("text-classification", model=plain, tokenizer=tokenizer, backend="onnxruntime")


# MPEE token exit: the exit graphs prune tokens as `predict_early` does and pass the shorter sequence on.


class _PruneTokens(nn.Module):
    def __init__(self, has_fusion: bool):
        super().__init__()
        self.has_fusion = has_fusion

    def forward(self, hidden, token_mask, importance, attention):
        pruned = prune_tokens(hidden, token_mask, importance, attention, ratio=0.5, has_fusion=self.has_fusion)
        return pruned.hidden, pruned.token_mask, pruned.importance


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the TorchScript exporter's, which export_onnx uses too
@pytest.mark.parametrize("has_fusion", [False, True])
def test_traced_token_pruning_fits_other_shapes_and_breaks_ties_as_predict_early(has_fusion, tmp_path):
    generator = torch.Generator().manual_seed(0)

    def sequence(*lengths: int):
        shape = (len(lengths), max(lengths))
        token_mask = (torch.arange(shape[1])[None, :] < torch.tensor(lengths)[:, None]).long()
        # Importance on a coarse grid, so that many candidates tie (both sorts must then keep the earlier slot).
        importance = torch.randint(1, 4, shape, generator=generator) / 4 * token_mask
        attention = torch.rand(shape, generator=generator) * token_mask
        return torch.randn(*shape, 4, generator=generator), token_mask, importance, attention

    names = ["hidden", "token_mask", "importance", "attention"]
    path = os.fspath(tmp_path / "prune.onnx")
    torch.onnx.export(_PruneTokens(has_fusion), sequence(6, 4), path, input_names=names,
                      output_names=["hidden_out", "mask_out", "importance_out"], opset_version=17, dynamo=False,
                      dynamic_axes={name: {0: "batch", 1: "sequence"} for name in names})
    session = ort.InferenceSession(path)
    # Longer and more rows than traced, a row whose one candidate is not kept, one keeping 5, and a batch keeping none.
    for lengths in ([12, 3, 7, 12, 2], [3], [2, 2]):
        inputs = sequence(*lengths)
        expected = _PruneTokens(has_fusion)(*inputs)
        got = session.run(None, {name: value.numpy() for name, value in zip(names, inputs)})
        np.testing.assert_allclose(got[0], expected[0].numpy(), atol=1e-6, rtol=0)
        assert np.array_equal(got[1], expected[1].numpy()) and np.array_equal(got[2], expected[2].numpy())


def token_exit_batch(pad_token_id: int, batch_size: int = 16, seed: int = 1):
    """Mixed lengths up to 16 (twice the traced length), with one text of 2 tokens, whose one candidate exits."""
    input_ids, attention_mask = mixed_length_batch(batch_size=batch_size, seed=seed, pad_token_id=pad_token_id)
    attention_mask[1, 2:] = 0
    return input_ids.masked_fill(attention_mask == 0, pad_token_id), attention_mask


def export_with_settings(model, folder, policies=POLICY_NAMES):
    """The model's runner (exported to `folder`) and `policies` calibrated on other texts than `token_exit_batch`."""
    input_ids, attention_mask = token_exit_batch(model.config.pad_token_id, batch_size=48, seed=7)
    rows = [{"input_ids": ids[mask == 1].tolist(), "label": index % model.config.num_labels}
            for index, (ids, mask) in enumerate(zip(input_ids, attention_mask))]
    return OnnxEarlyExitClassifier(export_onnx(model, folder), threads=1), calibrated_settings(model, rows, policies)


@pytest.fixture(scope="module")
def tiny_token_exit(tmp_path_factory):
    """A tiny BERT with an exit per layer whose tokens exit after layers 1 and 3 of 4 (30% of them), with
    learning-to-exit heads and mean pooling (the heads read the token mask), exported."""
    model = train_prototypes(tiny_model(token_exit_ratio=0.3, learning_to_exit=True, exit_pooling="mean"))
    return model, *export_with_settings(model, tmp_path_factory.mktemp("onnx") / "token_exit")


@pytest.mark.parametrize("batch_size", [1, 7, 16])
def test_token_exit_graphs_answer_as_predict_early_for_every_policy(tiny_token_exit, batch_size):
    model, runner, settings = tiny_token_exit
    input_ids, attention_mask = token_exit_batch(model.config.pad_token_id)
    batches = [{"input_ids": input_ids[start : start + batch_size],
                "attention_mask": attention_mask[start : start + batch_size]} for start in range(0, 16, batch_size)]
    layers_seen = assert_answers_of_predict_early(model, runner, batches, settings)
    assert set().union(*layers_seen.values()) == {1, 2, 3, 4}


def test_token_exit_state_crosses_graphs_of_several_layers_with_classifier_memory(tmp_path):
    model = train_prototypes(tiny_model("roberta", token_exit_ratio=0.5, token_exit_layers=[1, 3], exit_layers=[2, 4],
                                        exit_memory=0.9, exit_pooling="mean"))
    runner, settings = export_with_settings(model, tmp_path, policies=("de3", "max_prob", "patience"))
    # Layers 1-2: prune after 1, give the importance for the token exit after layer 3, which the top graph runs.
    assert runner.input_names == [["hidden", "attention_mask"], ["hidden", "attention_mask", "importance", "carried"]]
    assert runner.output_names[0][:3] == ["hidden_out", "attention_mask_out", "importance_out"]
    input_ids, attention_mask = token_exit_batch(model.config.pad_token_id)
    for batch_size in (1, 16):
        batches = [{"input_ids": input_ids[start : start + batch_size],
                    "attention_mask": attention_mask[start : start + batch_size]} for start in range(0, 16, batch_size)]
        assert_answers_of_predict_early(model, runner, batches, settings)


@pytest.fixture(scope="module")
def exported_token_exit(minilm_checkpoint, tmp_path_factory):
    """The MiniLM fixture's weights with MPEE token exit switched on for inference (half of the tokens exit after
    layers 2 and 4), exported."""
    model = AutoModelForSequenceClassification.from_pretrained(
        minilm_checkpoint, token_exit_ratio=0.5, token_exit_layers=[2, 4]).eval()
    return model, export_onnx(model, tmp_path_factory.mktemp("onnx") / "token_exit")


def test_token_exit_on_the_real_minilm_answers_as_predict_early(exported, exported_token_exit, policy_settings,
                                                                dev_sentences):
    _, tokenizer, _ = exported
    model, folder = exported_token_exit
    runner = OnnxEarlyExitClassifier(folder, threads=2)
    for batch_size in (1, 7, 64):
        batches = sst2_batches(tokenizer, dev_sentences, batch_size)
        layers_seen = assert_answers_of_predict_early(model, runner, batches, {"de3": policy_settings["de3"]})
        assert len(layers_seen["de3"]) > 1, batch_size


@pytest.mark.parametrize("objective", ["cosee", "mpee"])
def test_models_trained_with_the_other_objectives_export_as_they_are(objective, tmp_path):
    """A COSEE- or MPEE-trained model differs in its training loss, not in its inference graph: the export serves it
    with the exits of `predict_early`, under COSEE's energy policy and the default one."""
    model = tiny_model(training_objective=objective, exit_memory=0.9 if objective == "mpee" else 1.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    input_ids, attention_mask = mixed_length_batch(batch_size=12, pad_token_id=model.config.pad_token_id)
    labels = torch.arange(12) % model.config.num_labels
    model.train()
    for _ in range(3):  # a few steps of the objective's own loss
        model(input_ids, attention_mask, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    runner = OnnxEarlyExitClassifier(export_onnx(model, tmp_path))
    layers_seen = set()
    for policy, parameters in (("energy", {"threshold": 0.2}), ("de3", {"threshold": 0.5})):
        expected = model.predict_early(input_ids, attention_mask, policy=policy, **parameters)
        layers_seen.update(expected.sample_exit_layers.tolist())
        for size in (1, 7):
            got = [runner.predict(input_ids[start : start + size].numpy(), attention_mask[start : start + size].numpy(),
                                  policy=policy, **parameters) for start in range(0, 12, size)]
            assert np.concatenate([part["exit_layers"] for part in got]).tolist() == \
                expected.sample_exit_layers.tolist(), (policy, size)
            np.testing.assert_allclose(np.concatenate([part["logits"] for part in got]), expected.logits.numpy(),
                                       atol=1e-5, rtol=0)
    assert len(layers_seen) > 1  # texts leave at different exits
