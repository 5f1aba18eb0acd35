"""Saving, loading and the Auto classes: prototypes in `model.safetensors`, remote code, plain backbones."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, AutoTokenizer, BertModel
from transformers.testing_utils import CaptureLogger

import de3_transformers
from de3_transformers import DE3BertConfig, DE3BertForSequenceClassification, DE3RobertaForSequenceClassification
from de3_transformers.checkpoints import logger as modeling_logger

from conftest import BACKBONES, blocking_imports, mixed_length_batch, tiny_model, train_prototypes


def test_safetensors_holds_prototypes_and_mask_and_they_reload_bit_for_bit(trained_model, tmp_path):
    trained_model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as weights:
        assert torch.equal(weights.get_tensor("prototype_memory.prototypes"), trained_model.prototype_memory.prototypes)
        assert weights.get_tensor("prototype_memory.initialized").dtype == torch.bool
    loaded = type(trained_model).from_pretrained(tmp_path)
    for name, tensor in trained_model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    def fields(config):
        return {key: value for key, value in config.to_diff_dict().items() if key != "_name_or_path"}

    assert fields(loaded.config) == fields(trained_model.config)


def test_reloaded_model_predicts_the_same(trained_model, tmp_path):
    input_ids, attention_mask = mixed_length_batch(batch_size=8)
    before = trained_model.predict_early(input_ids, attention_mask, threshold=0.5)
    trained_model.save_pretrained(tmp_path)
    after = AutoModelForSequenceClassification.from_pretrained(tmp_path).predict_early(
        input_ids, attention_mask, threshold=0.5
    )
    assert torch.equal(before.sample_exit_layers, after.sample_exit_layers) and torch.equal(before.logits, after.logits)


@pytest.mark.parametrize("auto_class", [AutoModel, AutoModelForSequenceClassification])
def test_auto_classes_resolve_to_the_de3_models(auto_class, backbone, tmp_path):
    model = tiny_model(backbone)
    model.save_pretrained(tmp_path)
    assert type(AutoConfig.from_pretrained(tmp_path)) is BACKBONES[backbone][0]
    assert type(auto_class.from_pretrained(tmp_path)) is BACKBONES[backbone][1]
    assert type(auto_class.from_config(model.config)) is BACKBONES[backbone][1]


def test_reimporting_the_package_is_harmless():
    import importlib

    importlib.reload(de3_transformers)
    assert AutoConfig.for_model("de3_bert").__class__.__name__ == "DE3BertConfig"


def test_checkpoint_loads_with_trust_remote_code_without_the_package(trained_model, tmp_path):
    input_ids, attention_mask = mixed_length_batch(batch_size=6)
    expected = trained_model.predict_early(input_ids, attention_mask, threshold=0.5)
    trained_model.save_pretrained(tmp_path / "model")
    auto_map = json.loads((tmp_path / "model" / "config.json").read_text())["auto_map"]
    assert set(auto_map) == {"AutoConfig", "AutoModel", "AutoModelForSequenceClassification"}
    torch.save({"input_ids": input_ids, "attention_mask": attention_mask}, tmp_path / "inputs.pt")
    script = blocking_imports("de3_transformers") + textwrap.dedent(f"""
        import torch
        from transformers import AutoModelForSequenceClassification
        model = AutoModelForSequenceClassification.from_pretrained({str(tmp_path / "model")!r}, trust_remote_code=True)
        assert "de3_transformers" not in sys.modules
        inputs = torch.load({str(tmp_path / "inputs.pt")!r})
        result = model.predict_early(inputs["input_ids"], inputs["attention_mask"], threshold=0.5)
        torch.save({{"logits": result.logits, "exit_layers": result.sample_exit_layers}}, {str(tmp_path / "out.pt")!r})
        print(type(model).__module__)
    """)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "transformers_modules" in run.stdout
    remote = torch.load(tmp_path / "out.pt")
    assert torch.equal(remote["exit_layers"], expected.sample_exit_layers)
    assert torch.equal(remote["logits"], expected.logits)


def test_from_backbone_loads_the_real_minilm_and_names_the_fresh_parts(minilm_path):
    with CaptureLogger(modeling_logger) as captured:
        model = DE3BertForSequenceClassification.from_backbone(minilm_path, num_labels=2, dar_alpha=0.1,
                                                               exit_layers=[2, 4, 6])
    plain = BertModel.from_pretrained(minilm_path)
    for name, tensor in plain.state_dict().items():
        assert torch.equal(model.bert.state_dict()[name], tensor), name
    assert model.config.dar_alpha == 0.1 and model.config.exit_layers == [2, 4, 6]
    assert model.config.num_hidden_layers == 6 and model.config.hidden_size == 384
    assert "before use: classifier, exit_classifiers, prototype_memory, prototype_networks (" in captured.out
    assert not model.prototype_memory.initialized.any()


def test_from_backbone_suggests_mean_pooling_for_a_mean_pooled_sentence_transformer(minilm_path):
    with CaptureLogger(modeling_logger) as captured:
        DE3BertForSequenceClassification.from_backbone(minilm_path, num_labels=2)
    assert "exit_pooling='mean'" in captured.out
    with CaptureLogger(modeling_logger) as captured:
        DE3BertForSequenceClassification.from_backbone(minilm_path, num_labels=2, exit_pooling="mean")
    assert "exit_pooling" not in captured.out


def test_from_backbone_rejects_another_architecture(minilm_path):
    with pytest.raises(ValueError, match="'bert' checkpoint but DE3RobertaForSequenceClassification needs a 'roberta'"):
        DE3RobertaForSequenceClassification.from_backbone(minilm_path)


def test_auto_from_pretrained_on_a_plain_bert_checkpoint_with_a_de3_config(minilm_path):
    config = DE3BertConfig.from_pretrained(minilm_path, num_labels=3, distance="euclidean")
    model = AutoModelForSequenceClassification.from_pretrained(minilm_path, config=config)
    assert isinstance(model, DE3BertForSequenceClassification) and model.config.distance == "euclidean"
    plain = BertModel.from_pretrained(minilm_path)
    assert torch.equal(model.bert.embeddings.word_embeddings.weight, plain.embeddings.word_embeddings.weight)


def test_real_minilm_runs_early_exit_on_tokenized_text(minilm_path):
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    model = DE3BertForSequenceClassification.from_backbone(minilm_path, num_labels=2)
    texts = ["a gorgeous, witty film", "dull and far too long", "it is what it is", "the best of the year"]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    train_batch = {**batch, "labels": torch.tensor([1, 0, 0, 1])}
    model.train()
    model(**train_batch).loss.backward()
    result = model.predict_early(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], threshold=0.0)
    with torch.no_grad():
        full = model.eval()(**batch)
    assert torch.equal(result.logits, full.logits) and result.sample_exit_layers.tolist() == [6] * 4


def test_stock_trainer_trains_the_model_and_sets_prototypes(tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    model = tiny_model()
    input_ids, attention_mask = mixed_length_batch(batch_size=12)
    data = Dataset.from_dict({"input_ids": input_ids.tolist(), "attention_mask": attention_mask.tolist(),
                              "labels": [i % 3 for i in range(12)]})
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=6, num_train_epochs=1,
                             learning_rate=1e-3, report_to=[], use_cpu=True, save_strategy="no", logging_steps=1)
    result = Trainer(model=model, args=args, train_dataset=data).train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert model.prototype_memory.initialized.all()


def test_a_crash_while_saving_leaves_the_previous_checkpoint_loadable(trained_model, tmp_path, monkeypatch):
    from transformers import PreTrainedModel

    trained_model.save_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")  # other files in the folder must survive a save
    before = {name: tensor.clone() for name, tensor in trained_model.state_dict().items()}
    real_save = PreTrainedModel.save_pretrained

    def crash_half_way(self, save_directory, *args, **kwargs):
        real_save(self, save_directory, *args, **kwargs)
        weights = Path(save_directory) / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])  # a half-written file
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", crash_half_way)
    with torch.no_grad():
        trained_model.classifier.weight.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        trained_model.save_pretrained(tmp_path)
    monkeypatch.undo()
    loaded = type(trained_model).from_pretrained(tmp_path)
    for name, tensor in before.items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert (tmp_path / "tokenizer.json").exists()
    assert not [path for path in tmp_path.parent.iterdir() if ".saving-" in path.name]


def test_saving_again_replaces_the_weights_and_keeps_other_files(trained_model, tmp_path):
    trained_model.save_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    with torch.no_grad():
        trained_model.classifier.weight.add_(1.0)
    trained_model.save_pretrained(tmp_path)
    loaded = type(trained_model).from_pretrained(tmp_path)
    assert torch.equal(loaded.classifier.weight, trained_model.classifier.weight)
    assert (tmp_path / "tokenizer.json").exists()


@pytest.mark.parametrize("damage", [lambda data: data[: len(data) // 2], lambda data: b"not a safetensors file"])
def test_a_corrupted_weights_file_is_a_clear_error(trained_model, tmp_path, damage):
    trained_model.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(damage(weights.read_bytes()))
    with pytest.raises(OSError, match="corrupted or truncated"):
        AutoModelForSequenceClassification.from_pretrained(tmp_path)


@pytest.mark.parametrize("override", [{"num_labels": 5}, {"exit_layers": [2, 4]}])
def test_a_config_that_does_not_fit_the_weights_is_a_clear_error(trained_model, tmp_path, override):
    trained_model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"num_labels=3 and exit_layers=\[1, 2, 3, 4\].*ignore_mismatched_sizes"):
        AutoModelForSequenceClassification.from_pretrained(tmp_path, **override)


def test_a_de3_checkpoint_in_a_plain_bert_class_warns_about_the_unused_exits(trained_model, tmp_path):
    from transformers import BertForSequenceClassification
    from transformers.utils import logging

    trained_model.save_pretrained(tmp_path)
    verbosity = logging.get_verbosity()
    logging.set_verbosity_warning()  # the test session runs at "error"; a user sees warnings by default
    try:
        with CaptureLogger(logging.get_logger("transformers.modeling_utils")) as captured:
            plain = BertForSequenceClassification.from_pretrained(tmp_path)
    finally:
        logging.set_verbosity(verbosity)
    assert "exit_classifiers" in captured.out and "prototype_memory" in captured.out
    assert torch.equal(plain.classifier.weight, trained_model.classifier.weight)  # the last exit is its head


def test_a_plain_bert_checkpoint_in_the_de3_class_warns_and_names_the_new_parts(minilm_path):
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_warning()
    try:
        with CaptureLogger(logging.get_logger("transformers.modeling_utils")) as captured:
            model = DE3BertForSequenceClassification.from_pretrained(minilm_path, num_labels=2)
    finally:
        logging.set_verbosity(verbosity)
    assert "exit_classifiers" in captured.out and "prototype_memory" in captured.out and "MISSING" in captured.out
    assert not model.prototype_memory.initialized.any()
