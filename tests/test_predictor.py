"""`EarlyExitClassifier`: built once, called on lists, pairs, DataFrames and mappings of columns; each text gets the
label, score and exit layer `predict_early` gives it alone, in the input order, on PyTorch and on ONNX Runtime."""

import numpy as np
import pandas as pd
import pytest
from datasets import Dataset
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig, BertForSequenceClassification

from de3_transformers import EarlyExitClassifier
from de3_transformers.data import load_glue_task


@pytest.fixture(scope="module")
def model_and_tokenizer(minilm_checkpoint):
    return (AutoModelForSequenceClassification.from_pretrained(minilm_checkpoint),
            AutoTokenizer.from_pretrained(minilm_checkpoint))


@pytest.fixture(scope="module")
def sentences(glue_dir):
    """24 SST-2 dev sentences, in file order (not sorted by length)."""
    return load_glue_task("sst2", glue_dir)["validation"]["sentence"][:24]


def answers_alone(model, tokenizer, texts, pairs=None):
    """`(label, score, exit layer)` of each text classified alone by `predict_early`."""
    answers = []
    for index, text in enumerate(texts):
        output = model.predict_early(**tokenizer(text, None if pairs is None else pairs[index], return_tensors="pt"))
        probabilities = output.logits[0].softmax(-1)
        answers.append((model.config.id2label[int(probabilities.argmax())], float(probabilities.max()),
                        int(output.sample_exit_layers[0])))
    return answers


def as_tuples(results):
    return [(result["label"], result["score"], result["exit_layer"]) for result in results]


def assert_same_answers(got, expected):
    assert [(label, layer) for label, _, layer in got] == [(label, layer) for label, _, layer in expected]
    np.testing.assert_allclose([score for _, score, _ in got], [score for _, score, _ in expected], atol=1e-5)


def test_each_text_gets_the_answer_of_predict_early_alone_in_input_order(model_and_tokenizer, sentences):
    model, tokenizer = model_and_tokenizer
    lengths = [len(tokenizer(text)["input_ids"]) for text in sentences]
    assert lengths != sorted(lengths) and lengths != sorted(lengths, reverse=True)  # sorting does reorder them
    results = EarlyExitClassifier(model, tokenizer, batch_size=5)(sentences)
    assert [sorted(result) for result in results] == [["exit_layer", "label", "score"]] * len(sentences)
    expected = answers_alone(model, tokenizer, sentences)
    assert_same_answers(as_tuples(results), expected)
    assert len({layer for _, _, layer in expected}) >= 2  # calibrated for 2x: texts leave at different layers


def test_from_pretrained_loads_the_checkpoint_and_its_tokenizer(minilm_checkpoint, model_and_tokenizer, sentences):
    classifier = EarlyExitClassifier.from_pretrained(minilm_checkpoint, device="cpu", batch_size=8)
    assert_same_answers(as_tuples(classifier(sentences[:8])), answers_alone(*model_and_tokenizer, sentences[:8]))
    assert classifier("a single text")[0]["label"] in ("negative", "positive")


def test_text_pairs_are_classified_as_pairs(model_and_tokenizer, sentences):
    model, tokenizer = model_and_tokenizer
    texts, pairs = sentences[:8], sentences[8:16]
    results = EarlyExitClassifier(model, tokenizer, batch_size=3)(texts, text_pairs=pairs)
    assert_same_answers(as_tuples(results), answers_alone(model, tokenizer, texts, pairs))


def test_a_dataframe_gets_the_columns_added_and_keeps_its_index_and_columns(model_and_tokenizer, sentences):
    model, tokenizer = model_and_tokenizer
    frame = pd.DataFrame({"sentence": sentences[:10], "label": list(range(10))}, index=list(range(110, 100, -1)))
    classifier = EarlyExitClassifier(model, tokenizer, batch_size=4, text_column="sentence",
                                     column_prefix="predicted_")
    scored = classifier(frame)
    assert list(scored.columns) == ["sentence", "label", "predicted_label", "predicted_score", "predicted_exit_layer"]
    assert list(scored.index) == list(frame.index) and "predicted_label" not in frame  # a new frame
    pd.testing.assert_frame_equal(scored[["sentence", "label"]], frame)
    got = list(zip(scored["predicted_label"], scored["predicted_score"], scored["predicted_exit_layer"]))
    assert_same_answers(got, answers_alone(model, tokenizer, sentences[:10]))


def test_a_dataframe_of_pairs_reads_the_pair_column(model_and_tokenizer, sentences):
    model, tokenizer = model_and_tokenizer
    frame = pd.DataFrame({"first": sentences[:6], "second": sentences[6:12]})
    scored = EarlyExitClassifier(model, tokenizer, text_column="first", text_pair_column="second")(frame)
    got = list(zip(scored["label"], scored["score"], scored["exit_layer"]))
    assert_same_answers(got, answers_alone(model, tokenizer, sentences[:6], sentences[6:12]))


def test_a_mapping_of_numpy_columns_gets_numpy_columns_as_ray_data_passes_them(model_and_tokenizer, sentences):
    model, tokenizer = model_and_tokenizer
    ids = np.arange(10)
    batch = {"text": np.array(sentences[:10], dtype=object), "id": ids}
    scored = EarlyExitClassifier(model, tokenizer, batch_size=4)(batch)
    assert list(scored) == ["text", "id", "label", "score", "exit_layer"] and scored["id"] is ids
    assert all(isinstance(scored[name], np.ndarray) for name in ("label", "score", "exit_layer"))
    assert_same_answers(list(zip(scored["label"], scored["score"], scored["exit_layer"])),
                        answers_alone(model, tokenizer, sentences[:10]))
    as_lists = EarlyExitClassifier(model, tokenizer)({"text": sentences[:3]})
    assert isinstance(as_lists["label"], list) and as_lists["exit_layer"] == list(scored["exit_layer"][:3])


def test_dataset_map_batched_adds_the_columns(model_and_tokenizer, sentences):
    model, tokenizer = model_and_tokenizer
    dataset = Dataset.from_dict({"sentence": sentences[:12]})
    classifier = EarlyExitClassifier(model, tokenizer, batch_size=4, text_column="sentence")
    scored = dataset.map(classifier, batched=True, batch_size=5)
    assert scored.column_names == ["sentence", "label", "score", "exit_layer"]
    assert_same_answers(list(zip(scored["label"], scored["score"], scored["exit_layer"])),
                        answers_alone(model, tokenizer, sentences[:12]))


def test_speedup_counts_every_text_scored_so_far(model_and_tokenizer, sentences):
    model, tokenizer = model_and_tokenizer
    classifier = EarlyExitClassifier(model, tokenizer, batch_size=4)
    assert classifier.speedup == 1.0 and classifier.texts_scored == 0
    layers = [result["exit_layer"] for result in classifier(sentences[:10]) + classifier(sentences[10:24])]
    assert classifier.texts_scored == 24 and classifier.layers_run == sum(layers)
    assert classifier.speedup == pytest.approx(6 * 24 / sum(layers)) and classifier.speedup > 1
    classifier.reset_counts()
    assert (classifier.texts_scored, classifier.layers_run, classifier.speedup) == (0, 0, 1.0)


def test_empty_inputs_give_empty_answers(model_and_tokenizer):
    classifier = EarlyExitClassifier(*model_and_tokenizer)
    assert classifier([]) == []
    scored = classifier(pd.DataFrame({"text": pd.Series([], dtype=object)}))
    assert list(scored.columns) == ["text", "label", "score", "exit_layer"] and len(scored) == 0


@pytest.mark.parametrize("inputs, kwargs, error, message", [
    (["fine", None], {}, TypeError, r"texts\[1\] is None .*fill or drop"),
    (42, {}, TypeError, "not int"),
    (Dataset.from_dict({"text": ["a"]}), {}, TypeError, r"dataset.map\(classifier, batched=True\)"),
    (["a", "b"], {"text_pairs": ["c"]}, ValueError, "2 texts but 1 text_pairs"),
    (pd.DataFrame({"sentence": ["a"]}), {}, ValueError, "no column 'text'.*text_column="),
    (pd.DataFrame({"text": ["a"], "label": [1]}), {}, ValueError, r"\['label'\].*column_prefix="),
    (pd.DataFrame({"text": ["a"]}), {"text_pairs": ["b"]}, ValueError, "text_pair_column="),
    ({"text": ["a"]}, {"text_pairs": ["b"]}, ValueError, "text_pair_column="),
])
def test_bad_inputs_are_refused_naming_the_fix(model_and_tokenizer, inputs, kwargs, error, message):
    with pytest.raises(error, match=message):
        EarlyExitClassifier(*model_and_tokenizer)(inputs, **kwargs)


@pytest.mark.parametrize("kwargs, error, message", [
    ({"batch_size": 0}, ValueError, "batch_size=0 must be a positive integer"),
    ({"max_length": 0}, ValueError, "max_length=0"),
    ({"backend": "tensorrt"}, ValueError, "backend='tensorrt' is unknown"),
    ({"policy": "nope"}, ValueError, "nope"),
    ({"policy": "entropy"}, ValueError, "needs a threshold"),
    ({"threshold": -1.0}, ValueError, "threshold"),
])
def test_bad_settings_are_refused_when_built(model_and_tokenizer, kwargs, error, message):
    with pytest.raises(error, match=message):
        EarlyExitClassifier(*model_and_tokenizer, **kwargs)


def test_a_model_object_needs_its_tokenizer_and_must_be_a_de3_model(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    with pytest.raises(TypeError, match="tokenizer="):
        EarlyExitClassifier(model)
    plain = BertForSequenceClassification(BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2,
                                                     num_attention_heads=2, intermediate_size=64))
    with pytest.raises(ValueError, match="not a DE3 model"):
        EarlyExitClassifier(plain, tokenizer)


@pytest.fixture(scope="module")
def onnx_folder(model_and_tokenizer, tmp_path_factory):
    from de3_transformers import export_onnx

    pytest.importorskip("onnxruntime")
    model, tokenizer = model_and_tokenizer
    return export_onnx(model, tmp_path_factory.mktemp("onnx") / "export", tokenizer=tokenizer, one_text_graph=False)


def test_onnx_runtime_gives_the_labels_and_exit_layers_of_pytorch(model_and_tokenizer, onnx_folder, sentences):
    model, tokenizer = model_and_tokenizer
    on_onnx = EarlyExitClassifier.from_pretrained(onnx_folder, backend="onnxruntime", batch_size=5)
    frame = pd.DataFrame({"text": sentences})
    got, expected = on_onnx(frame), EarlyExitClassifier(model, tokenizer, batch_size=5)(frame)
    assert got["label"].tolist() == expected["label"].tolist()
    assert got["exit_layer"].tolist() == expected["exit_layer"].tolist()
    np.testing.assert_allclose(got["score"], expected["score"], atol=1e-4)
    assert on_onnx.speedup == pytest.approx(6 * 24 / sum(expected["exit_layer"]))
    with pytest.raises(ValueError, match="device='cpu' applies to backend='pytorch'"):
        EarlyExitClassifier(onnx_folder, backend="onnxruntime", device="cpu")
