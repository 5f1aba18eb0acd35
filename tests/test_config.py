"""DE3 config fields: defaults, validation with clear errors, round trip."""

import math

import pytest
from transformers import AutoConfig, BertConfig, RobertaConfig

from de3_transformers import DE3BertConfig, DE3RobertaConfig

from conftest import TINY


def test_defaults_follow_the_paper():
    config = DE3BertConfig(**TINY)
    assert isinstance(config, BertConfig)
    assert config.exit_layers == [1, 2, 3, 4]
    assert config.proto_dim == config.hidden_size
    assert (config.prototype_momentum, config.distance, config.dar_type) == (0.5, "cosine", "center")


def test_roberta_config_is_a_roberta_config():
    config = DE3RobertaConfig(**TINY)
    assert isinstance(config, RobertaConfig) and config.model_type == "de3_roberta"


@pytest.mark.parametrize("config_class", [DE3BertConfig, DE3RobertaConfig])
def test_round_trip_through_save_and_auto_config(tmp_path, config_class):
    config = config_class(**TINY, exit_layers=[2, 4], proto_dim=8, distance="euclidean", dar_type="combined",
                          dar_alpha=0.1, dar_beta=0.5, early_exit_threshold=0.3, early_exit_lambda=2.0, num_labels=4)
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert type(loaded) is config_class
    assert loaded.to_diff_dict() == config.to_diff_dict()


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("num_labels", 1, "classification"),
        ("exit_layers", [1, 3], "ending with 4"),
        ("exit_layers", [2, 2, 4], "strictly increasing"),
        ("exit_layers", [0, 4], "1..4"),
        ("exit_layers", [4, 5], "ending with 4"),
        ("distance", "manhattan", "manhattan"),
        ("exit_pooling", "max", "exit_pooling"),
        ("dar_type", "triplet", "triplet"),
        ("prototype_momentum", 0.0, "prototype_momentum"),
        ("dar_alpha", -1.0, "dar_alpha"),
        ("dar_beta", math.nan, "dar_beta"),
        ("early_exit_threshold", math.nan, "threshold"),
        ("early_exit_threshold", -0.1, "threshold"),
        ("early_exit_lambda", math.inf, "lam"),
        ("proto_dim", 0, "proto_dim"),
    ],
)
def test_invalid_fields_raise_a_clear_error(field, value, message):
    with pytest.raises(ValueError, match=message):
        DE3BertConfig(**{**TINY, field: value})


def test_regression_problem_type_is_rejected():
    with pytest.raises(ValueError, match="single-label"):
        DE3BertConfig(**TINY, problem_type="regression")
