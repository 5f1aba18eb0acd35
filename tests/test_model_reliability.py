"""Reliability III: no silent wrong answers from the pipeline's full depth, a config changed after loading, left
padding, or a misspelled option (each test failed on the code before)."""

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

from de3_transformers import EarlyExitClassifier
from de3_transformers.data import load_glue_task

from conftest import mixed_length_batch, tiny_model, train_prototypes


@pytest.fixture(scope="module")
def sst2_sentences(glue_dir):
    return load_glue_task("sst2", glue_dir)["validation"]["sentence"][:32]


@pytest.fixture
def model_and_tokenizer(minilm_checkpoint):
    model = AutoModelForSequenceClassification.from_pretrained(minilm_checkpoint)
    return model, AutoTokenizer.from_pretrained(minilm_checkpoint)


# 6. Full depth in the pipeline.


def test_the_pipelines_full_depth_raises_on_nan_weights_as_predict_early_does(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    with torch.no_grad():
        model.bert.encoder.layer[0].output.dense.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError):
        model.predict_early(**tokenizer(["a fine film"], return_tensors="pt"))
    classifier = pipeline("text-classification", model=model, tokenizer=tokenizer)
    with pytest.raises(FloatingPointError, match="not finite"):
        classifier(["a fine film", "a dull one"], full_depth=True)


# 7. Left padding.


def labels_and_layers(results: list[dict]) -> list[tuple[str, int]]:
    return [(result["label"], result["exit_layer"]) for result in results]


def test_a_left_padding_tokenizer_gives_the_answers_of_batch_1_at_batch_8(minilm_checkpoint, sst2_sentences):
    model = AutoModelForSequenceClassification.from_pretrained(minilm_checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(minilm_checkpoint, padding_side="left")
    classifier = pipeline("text-classification", model=model, tokenizer=tokenizer)
    alone = labels_and_layers(classifier(sst2_sentences, batch_size=1, return_exit_layer=True))
    assert len({layer for _, layer in alone}) > 1  # texts really leave at several layers
    assert labels_and_layers(classifier(sst2_sentences, batch_size=8, return_exit_layer=True)) == alone
    scorer = EarlyExitClassifier(model, tokenizer=tokenizer, batch_size=1)
    batched = EarlyExitClassifier(model, tokenizer=tokenizer, batch_size=8)
    assert labels_and_layers(batched(sst2_sentences)) == labels_and_layers(scorer(sst2_sentences)) == alone


def test_left_padded_inputs_are_refused_naming_the_padding_side():
    model = train_prototypes(tiny_model())
    input_ids, attention_mask = mixed_length_batch(batch_size=4)
    with pytest.raises(ValueError, match=r"start with padding .*padding_side = 'right'"):
        model.predict_early(input_ids.flip(1), attention_mask.flip(1))
    with pytest.raises(ValueError, match=r"start with padding"):
        model(input_ids=input_ids.flip(1), attention_mask=attention_mask.flip(1))


# 8. Checked on every call.


def test_exit_layers_changed_after_loading_are_refused_on_every_call(tmp_path):
    train_prototypes(tiny_model(exit_layers=[2, 4])).save_pretrained(tmp_path)
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    input_ids, attention_mask = mixed_length_batch(batch_size=4)
    model.predict_early(input_ids, attention_mask)
    model.config.exit_layers = [1, 4]  # the head trained at layer 2 would read layer 1
    with pytest.raises(ValueError, match=r"exit_layers is \[1, 4\].*trained after layers \[2, 4\].*= \[2, 4\]"):
        model.predict_early(input_ids, attention_mask)
    with pytest.raises(ValueError, match=r"trained after layers \[2, 4\]"):
        model(input_ids=input_ids, attention_mask=attention_mask)
    model.config.exit_layers = [2, 4]
    model.predict_early(input_ids, attention_mask)


ZEROINGS = {"in place": lambda memory: memory.prototypes.zero_(),
            "through .data": lambda memory: memory.prototypes.data.zero_()}


@pytest.mark.parametrize("how", sorted(ZEROINGS))
def test_prototypes_zeroed_after_the_first_call_are_refused(how):
    model = train_prototypes(tiny_model())
    input_ids, attention_mask = mixed_length_batch(batch_size=4)
    model.predict_early(input_ids, attention_mask, threshold=0.3, lam=1.0)
    model(input_ids=input_ids, attention_mask=attention_mask, output_exit_signals=True)
    with torch.no_grad():
        ZEROINGS[how](model.prototype_memory)
    with pytest.raises(RuntimeError, match=r"unusable: zero at \(layer 1, class 0\)"):
        model.predict_early(input_ids, attention_mask, threshold=0.3, lam=1.0)
    model.predict_early(input_ids, attention_mask, threshold=0.3, lam=0.0)  # entropy alone does not read them
    if how == "in place":  # forward's check is remembered until the version counter moves, which .data does not
        with pytest.raises(RuntimeError, match="unusable"):
            model(input_ids=input_ids, attention_mask=attention_mask, output_exit_signals=True)


# 16. Options and columns.


def test_a_dataframe_with_two_text_columns_is_refused_naming_the_column(model_and_tokenizer):
    pandas = pytest.importorskip("pandas")
    model, tokenizer = model_and_tokenizer
    frame = pandas.DataFrame([["a fine film", "a dull one"]], columns=["text", "text"])
    with pytest.raises(ValueError, match=r"2 columns named 'text'"):
        EarlyExitClassifier(model, tokenizer=tokenizer)(frame)


@pytest.mark.parametrize("target", [True, "2"])
def test_a_target_speedup_that_is_not_a_number_is_refused(model_and_tokenizer, target):
    model, tokenizer = model_and_tokenizer
    with pytest.raises(TypeError, match="target_speedup=.* must be a number"):
        EarlyExitClassifier(model, tokenizer=tokenizer, target_speedup=target)


def test_a_misspelled_pipeline_option_is_refused_naming_the_option(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    classifier = pipeline("text-classification", model=model, tokenizer=tokenizer)
    with pytest.raises(TypeError, match=r"thresold=0.3 .*Did you mean 'threshold'\?"):
        classifier("a fine film", thresold=0.3)
    with pytest.raises(TypeError, match=r"Did you mean 'return_exit_layer'\?"):
        pipeline("text-classification", model=model, tokenizer=tokenizer, return_exit_layers=True)
    # The stock options and the tokenizer's arguments still pass.
    results = classifier(["a fine film", "a dull one"], top_k=None, function_to_apply="softmax", truncation=True,
                         max_length=16, padding="max_length", batch_size=2)
    assert [len(result) for result in results] == [2, 2]
