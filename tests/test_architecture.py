"""The layout of the package: no import cycle, a config module without torch, registries that agree with the
config's names, invalid configs never saved, training objectives registered by name."""

import ast
import json
from pathlib import Path

import pytest
import torch
from huggingface_hub.errors import StrictDataclassClassValidationError

from de3_transformers import DE3BertConfig, register_training_objective
from de3_transformers.configuration_de3 import COSEE_SIGNAL_NAMES
from de3_transformers.losses import COSEE_SIGNALS, joint_cross_entropy
from de3_transformers.objectives import ObjectiveLoss, TrainingObjective
from de3_transformers.registry import (
    BUILTIN_EXIT_POLICIES,
    BUILTIN_TRAINING_OBJECTIVES,
    EXIT_POLICIES,
    TRAINING_OBJECTIVES,
)

from conftest import TINY, mixed_length_batch, tiny_model


PACKAGE = Path(__file__).resolve().parents[1] / "de3_transformers"


def is_script_block(node) -> bool:
    """`if __name__ == "__main__":`, which runs only when the module is run as a script, never on import."""
    return (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
            and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__")


def walk_imported_code(tree):
    """Every node of `tree` that can run when the module is imported or its functions are called."""
    for node in ast.iter_child_nodes(tree):
        if not is_script_block(node):
            yield node
            yield from walk_imported_code(node)


def imports_of(module: str) -> tuple[set[str], set[str]]:
    """`(package modules, outside packages)` that `module` imports anywhere in its file, function bodies included."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    inside, outside = set(), set()
    for node in walk_imported_code(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                inside.add(node.module.split(".")[0])
            else:  # from . import x
                inside.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            outside.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            outside.update(alias.name.split(".")[0] for alias in node.names)
    return inside, outside


MODULES = sorted(path.stem for path in PACKAGE.glob("*.py") if path.stem != "__init__")


def test_the_package_has_no_import_cycle():
    graph = {module: imports_of(module)[0] for module in MODULES}
    assert all(target in graph for targets in graph.values() for target in targets)
    state = {}  # module -> "visiting" / "done"

    def visit(module, path):
        if state.get(module) == "visiting":
            pytest.fail(f"import cycle: {' -> '.join(path[path.index(module):] + [module])}")
        if state.get(module) == "done":
            return
        state[module] = "visiting"
        for target in sorted(graph[module]):
            visit(target, path + [module])
        state[module] = "done"

    for module in MODULES:
        visit(module, [])


def test_the_config_module_and_everything_it_imports_is_free_of_torch():
    closure, todo = set(), ["configuration_de3"]
    while todo:
        module = todo.pop()
        if module not in closure:
            closure.add(module)
            todo.extend(imports_of(module)[0])
    assert closure == {"configuration_de3", "registry"}
    for module in closure:
        assert "torch" not in imports_of(module)[1], module


def test_the_import_walk_sees_torch_and_nested_imports():
    # The two tests above would pass vacuously if the walk missed imports: it must see these.
    inside, outside = imports_of("modeling_de3")
    assert "torch" in outside and {"early_exit", "checkpoints", "configuration_de3"} <= inside
    assert "evaluation" in imports_of("calibration")[0]
    assert "calibration_cli" not in imports_of("calibration")[0]  # only its `__main__` block runs the command


def test_the_config_knows_every_builtin_name_without_importing_its_implementation():
    assert set(BUILTIN_EXIT_POLICIES) <= set(EXIT_POLICIES)
    assert all(EXIT_POLICIES[name].name == name for name in BUILTIN_EXIT_POLICIES)
    assert set(BUILTIN_TRAINING_OBJECTIVES) == set(TRAINING_OBJECTIVES)
    assert set(COSEE_SIGNAL_NAMES) == set(COSEE_SIGNALS)


@pytest.mark.parametrize("field, value, message", [
    ("early_exit_threshold", -1.0, "threshold"),
    ("dar_type", "nonsense", "dar_type"),
    ("early_exit_policy", "nonsense", "early_exit_policy"),
    ("exit_layers", [1, 3], "exit_layers"),
])
def test_saving_an_invalid_config_raises_and_writes_nothing(tmp_path, field, value, message):
    config = DE3BertConfig(**TINY)
    setattr(config, field, value)  # a field changed after the config was built
    with pytest.raises(StrictDataclassClassValidationError, match=message):
        config.save_pretrained(tmp_path)
    assert not (tmp_path / "config.json").exists()


def test_saving_a_model_whose_config_became_invalid_keeps_the_previous_checkpoint(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    model.config.early_exit_threshold = -1.0
    with pytest.raises(StrictDataclassClassValidationError, match="threshold"):
        model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text()) == saved


def test_building_an_invalid_config_raises_the_value_error_itself():
    with pytest.raises(ValueError, match="dar_type='nonsense'"):
        DE3BertConfig(**TINY, dar_type="nonsense")


class PlainJointObjective(TrainingObjective):
    """Cross-entropy of every exit, summed (no other term): the smallest objective there is."""

    name = "test_plain_joint"
    card_description = "joint cross-entropy"

    def loss(self, model, exit_logits, labels, layer_weighted_ce):
        return ObjectiveLoss(joint_cross_entropy(exit_logits, labels))


def test_a_registered_training_objective_drives_the_loss():
    register_training_objective(PlainJointObjective)
    try:
        model = tiny_model(training_objective="test_plain_joint", dar_alpha=0.0).train()
        input_ids, attention_mask = mixed_length_batch(batch_size=6)
        labels = torch.arange(6) % 3
        output = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, output_exit_signals=True)
        torch.testing.assert_close(output.loss, joint_cross_entropy(output.exit_logits.transpose(0, 1), labels))
        assert model.loss_part_names == ("ce_loss", "dar_loss")
    finally:
        del TRAINING_OBJECTIVES["test_plain_joint"]
    with pytest.raises(TypeError, match="TrainingObjective"):
        register_training_objective(object)


def test_the_per_sample_exit_layers_keep_their_old_name_for_one_release(trained_model):
    input_ids, attention_mask = mixed_length_batch(batch_size=4)
    output = trained_model.predict_early(input_ids, attention_mask, threshold=0.5)
    with pytest.warns(FutureWarning, match="sample_exit_layers"):
        assert torch.equal(output.exit_layers, output.sample_exit_layers)
