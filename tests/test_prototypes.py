"""Prototype update (docs/method.md eq. 1) on hand-made batches, and when the model updates them."""

import pytest
import torch

from de3_transformers.prototypes import PrototypeMemory

from conftest import mixed_length_batch, tiny_model


def observe(memory, features, labels, momentum=0.5):
    features = torch.tensor(features).unsqueeze(0)  # one exit below the top
    sums, counts = memory.class_statistics(features, torch.tensor(labels), memory.prototypes.shape[1])
    memory.update(sums, counts, momentum)


def test_first_observation_sets_the_class_mean_and_absent_classes_stay_uninitialised():
    memory = PrototypeMemory(1, 3, 2)
    observe(memory, [[1.0, 0.0], [3.0, 0.0], [0.0, 2.0]], [0, 0, 1])
    assert memory.prototypes[0].tolist() == [[2.0, 0.0], [0.0, 2.0], [0.0, 0.0]]
    assert memory.initialized[0].tolist() == [True, True, False]


def test_later_observations_blend_with_momentum_and_absent_classes_are_untouched():
    memory = PrototypeMemory(1, 3, 2)
    observe(memory, [[1.0, 0.0], [3.0, 0.0], [0.0, 2.0]], [0, 0, 1])
    observe(memory, [[0.0, 0.0], [4.0, 4.0]], [0, 2])
    # class 0: 0.5 * [2, 0] + 0.5 * [0, 0]; class 1 absent: kept; class 2 first seen: set
    assert memory.prototypes[0].tolist() == [[1.0, 0.0], [0.0, 2.0], [4.0, 4.0]]
    assert memory.initialized.all()


def test_momentum_weights_the_new_centroid():
    memory = PrototypeMemory(1, 2, 1)
    observe(memory, [[4.0], [1.0]], [0, 1], momentum=0.25)
    observe(memory, [[8.0], [1.0]], [0, 1], momentum=0.25)
    assert memory.prototypes[0, 0].item() == pytest.approx(0.75 * 4.0 + 0.25 * 8.0)


def test_every_exit_keeps_its_own_prototypes():
    memory = PrototypeMemory(2, 2, 1)
    features = torch.tensor([[[1.0], [3.0]], [[10.0], [30.0]]])
    sums, counts = memory.class_statistics(features, torch.tensor([0, 1]), 2)
    memory.update(sums, counts, 0.5)
    assert memory.prototypes.squeeze(-1).tolist() == [[1.0, 3.0], [10.0, 30.0]]


def test_training_forward_sets_prototypes_to_the_class_means_of_the_prototypical_features():
    model = tiny_model(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    input_ids, attention_mask = mixed_length_batch(batch_size=3)
    labels = torch.tensor([0, 1, 1])
    with torch.no_grad():
        hidden = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True).hidden_states
        features = [net(model.bert.pooler(hidden[layer])) for net, layer in zip(model.prototype_networks, [1, 2, 3])]
    model.train()(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    memory = model.prototype_memory
    assert memory.initialized.tolist() == [[True, True, False]] * 3
    for exit_index, exit_features in enumerate(features):
        assert torch.allclose(memory.prototypes[exit_index, 0], exit_features[0], atol=1e-6)
        assert torch.allclose(memory.prototypes[exit_index, 1], exit_features[1:].mean(0), atol=1e-6)
        assert torch.count_nonzero(memory.prototypes[exit_index, 2]) == 0


def test_eval_mode_and_unlabelled_forwards_never_update_prototypes():
    model = tiny_model()
    input_ids, attention_mask = mixed_length_batch(batch_size=3)
    model(input_ids=input_ids, attention_mask=attention_mask, labels=torch.tensor([0, 1, 2]))  # eval mode
    model.train()
    model(input_ids=input_ids, attention_mask=attention_mask)  # no labels
    assert not model.prototype_memory.initialized.any()
    assert torch.count_nonzero(model.prototype_memory.prototypes) == 0
