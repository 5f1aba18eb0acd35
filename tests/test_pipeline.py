"""`pipeline("text-classification")` exits early: with the package imported and, without it, through the code a
checkpoint carries (`trust_remote_code=True`); other models keep the stock pipeline."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoTokenizer, BertForSequenceClassification, TextClassificationPipeline, pipeline

from de3_transformers import DE3TextClassificationPipeline
from de3_transformers.data import load_glue_task
from de3_transformers.model_card import build_model_card

from conftest import blocking_imports


@pytest.fixture(scope="module")
def sst2_texts(glue_dir):
    validation = load_glue_task("sst2", glue_dir)["validation"]
    return validation["sentence"][:48], validation["label"][:48]


def single_text_results(model, tokenizer, texts):
    """`predict_early` on each text alone: (label id, softmax score, exit layer) per text."""
    results = []
    for text in texts:
        out = model.predict_early(**tokenizer(text, return_tensors="pt"))
        probabilities = out.logits.float().softmax(-1)[0]
        results.append((int(probabilities.argmax()), float(probabilities.max()), int(out.sample_exit_layers[0])))
    return results


def count_rows_per_layer(model):
    """Adds forward hooks that count the rows (texts) each encoder layer runs on; returns the counter."""
    counter = [0]
    for layer in model.bert.encoder.layer:
        layer.register_forward_hook(lambda module, args, output: counter.__setitem__(0, counter[0] + args[0].shape[0]))
    return counter


def test_pipeline_exits_early_at_every_batch_size_with_the_answers_of_predict_early(minilm_checkpoint, sst2_texts):
    checkpoint = minilm_checkpoint
    texts, _ = sst2_texts
    classifier = pipeline("text-classification", model=str(checkpoint))
    assert type(classifier) is DE3TextClassificationPipeline
    model, tokenizer = classifier.model, classifier.tokenizer
    expected = single_text_results(model, tokenizer, texts)
    expected_layers = [layer for _, _, layer in expected]
    assert len(set(expected_layers)) > 1  # texts really leave at different layers
    rows = count_rows_per_layer(model)
    for batch_size in range(1, 17):
        rows[0] = 0
        for start in range(0, len(texts), batch_size):
            model.predict_early(**tokenizer(texts[start : start + batch_size], padding=True, return_tensors="pt"))
        compact_rows, rows[0] = rows[0], 0
        results = classifier(texts, batch_size=batch_size, return_exit_layer=True)
        # The layers ran on the rows `predict_early` runs them on (the texts still in, rounded up to a multiple of 8
        # rows: `early_exit.COMPACTION_MULTIPLE`), fewer than the full model's 6 per text.
        assert rows[0] == compact_rows < model.config.num_hidden_layers * len(texts), batch_size
        if batch_size == 1:
            assert rows[0] == sum(expected_layers)
        for result, (label, score, layer) in zip(results, expected):
            assert result["label"] == model.config.id2label[label] and result["exit_layer"] == layer
            assert result["score"] == pytest.approx(score, abs=1e-4)


def test_pipeline_options_per_call(minilm_checkpoint, sst2_texts):
    checkpoint = minilm_checkpoint
    texts, _ = sst2_texts
    classifier = pipeline("text-classification", model=str(checkpoint))
    model, tokenizer = classifier.model, classifier.tokenizer
    inputs = tokenizer(texts[0], return_tensors="pt")
    early = model.predict_early(**inputs)

    ranked = classifier(texts[0], top_k=None, return_exit_layer=True)
    probabilities = early.logits.softmax(-1)[0]
    ranking = probabilities.argsort(descending=True).tolist()
    assert [entry["label"] for entry in ranked] == [model.config.id2label[index] for index in ranking]
    assert {entry["exit_layer"] for entry in ranked} == {int(early.sample_exit_layers[0])}
    (raw,) = classifier(texts[0], function_to_apply="none")
    assert raw["score"] == pytest.approx(float(early.logits.max()), abs=1e-4)

    (full,) = classifier(texts[0], full_depth=True, return_exit_layer=True)
    with torch.no_grad():
        full_logits = model(**inputs).logits
    assert full["exit_layer"] == 6 and full["score"] == pytest.approx(float(full_logits.softmax(-1).max()), abs=1e-4)
    (entropy,) = classifier(texts[0], policy="entropy", threshold=1.0, return_exit_layer=True)
    assert entropy["exit_layer"] == 1  # every normalised entropy is below 1
    (de3_full,) = classifier(texts[0], threshold=0.0, return_exit_layer=True)
    assert de3_full["exit_layer"] == 6  # DE3 at threshold 0 never leaves early

    pair = {"text": texts[0], "text_pair": texts[1]}
    pair_early = model.predict_early(**tokenizer(texts[0], texts[1], return_tensors="pt"))
    result = classifier(pair, return_exit_layer=True)
    assert result["exit_layer"] == int(pair_early.sample_exit_layers[0])
    assert result["score"] == pytest.approx(float(pair_early.logits.softmax(-1).max()), abs=1e-4)

    with pytest.raises(TypeError, match="full_depth"):
        classifier(texts[0], full_depth="yes")
    with pytest.raises(ValueError, match="threshold"):
        classifier(texts[0], threshold=-1.0)


def test_other_models_keep_the_stock_pipeline(minilm_path, tmp_path):
    plain = BertForSequenceClassification.from_pretrained(minilm_path, num_labels=2)
    plain.save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(minilm_path).save_pretrained(tmp_path)
    classifier = pipeline("text-classification", model=str(tmp_path))
    assert type(classifier) is TextClassificationPipeline
    assert classifier("fine")[0]["label"] in {"LABEL_0", "LABEL_1"}


def test_checkpoint_names_its_code_for_every_auto_class_and_the_pipeline(minilm_checkpoint):
    checkpoint = minilm_checkpoint
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "configuration_de3.DE3BertConfig",
                                  "AutoModel": "modeling_de3.DE3BertForSequenceClassification",
                                  "AutoModelForSequenceClassification": "modeling_de3.DE3BertForSequenceClassification"}
    assert config["custom_pipelines"]["text-classification"]["impl"] == "pipeline_de3.DE3TextClassificationPipeline"
    assert (checkpoint / "pipeline_de3.py").is_file()


def test_without_the_package_auto_classes_and_pipeline_load_with_trust_remote_code(minilm_checkpoint, sst2_texts,
                                                                                    tmp_path):
    checkpoint = minilm_checkpoint
    texts, _ = sst2_texts
    classifier = pipeline("text-classification", model=str(checkpoint))
    expected = classifier(texts[:12], batch_size=5, return_exit_layer=True)
    # The model card's own lines for this setting, run as they are.
    card = build_model_card(classifier.model, task_name="sst2", dataset_name="glue", model_name=str(checkpoint))
    card_lines = card.text.split("Without the package", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    script = blocking_imports("de3_transformers") + card_lines + textwrap.dedent(f"""
        import json
        from transformers import AutoModel
        base = AutoModel.from_pretrained({str(checkpoint)!r}, trust_remote_code=True)
        assert "de3_transformers" not in sys.modules
        calls = [0]
        for layer in classifier.model.bert.encoder.layer:
            layer.register_forward_hook(lambda module, args, output: calls.__setitem__(0, calls[0] + args[0].shape[0]))
        results = classifier({texts[:12]!r}, batch_size=5, return_exit_layer=True)
        print(json.dumps({{"model": type(base).__name__, "module": type(base).__module__,
                          "classifier_model": type(model).__name__,
                          "tokenizer": type(tokenizer).__name__, "pipeline": type(classifier).__name__,
                          "rows": calls[0], "results": results}}))
    """)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    # stdin closed: an interactive "run the custom code? [y/N]" prompt would fail the run rather than wait.
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path,
                         stdin=subprocess.DEVNULL, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    remote = json.loads(run.stdout.strip().splitlines()[-1])
    assert remote["model"] == remote["classifier_model"] == "DE3BertForSequenceClassification"
    assert remote["module"].startswith("transformers_modules") and remote["pipeline"] == "DE3TextClassificationPipeline"
    assert remote["rows"] == sum(result["exit_layer"] for result in expected) < 6 * 12
    def labels_and_layers(results):
        return [(result["label"], result["exit_layer"]) for result in results]

    assert labels_and_layers(remote["results"]) == labels_and_layers(expected)
    assert [r["score"] for r in remote["results"]] == pytest.approx([r["score"] for r in expected], abs=1e-5)
