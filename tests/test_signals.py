"""docs/method.md eqs. 8-11 against hand-computed values, and their numerics in every dtype."""

import math

import pytest
import torch

from de3_transformers.signals import (
    distance_ratio,
    hybrid_indicator,
    normalized_entropy,
    normalized_ratio,
    prototype_distances,
)


def test_entropy_is_one_for_uniform_probabilities():
    assert normalized_entropy(torch.zeros(2, 3)).tolist() == pytest.approx([1.0, 1.0])


def test_entropy_matches_hand_computed_binary_case():
    # p = (0.75, 0.25): -(0.75 ln 0.75 + 0.25 ln 0.25) / ln 2 = 0.811278
    value = normalized_entropy(torch.tensor([math.log(3.0), 0.0]))
    assert value.item() == pytest.approx(0.8112781245, abs=1e-6)


def test_entropy_of_a_certain_prediction_is_zero_not_nan():
    value = normalized_entropy(torch.tensor([[1000.0, -1000.0, 0.0]]))
    assert torch.isfinite(value).all() and value.item() == pytest.approx(0.0, abs=1e-6)


def test_cosine_distance_hand_cases():
    prototypes = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    distances = prototype_distances(torch.tensor([[2.0, 0.0]]), prototypes, "cosine")
    assert distances[0].tolist() == pytest.approx([0.0, 1.0, 2.0], abs=1e-6)


def test_cosine_distance_of_zero_vectors_is_one_and_finite():
    distances = prototype_distances(torch.zeros(1, 2), torch.tensor([[0.0, 0.0], [1.0, 1.0]]), "cosine")
    assert distances[0].tolist() == pytest.approx([1.0, 1.0])


def test_euclidean_distance_hand_case():
    distances = prototype_distances(torch.tensor([[3.0, 4.0]]), torch.tensor([[0.0, 0.0], [3.0, 0.0]]), "euclidean")
    assert distances[0].tolist() == pytest.approx([5.0, 4.0])


def test_distances_broadcast_over_exits():
    features, prototypes = torch.randn(3, 5, 4), torch.randn(3, 2, 4)
    batched = prototype_distances(features, prototypes, "euclidean")
    assert torch.allclose(batched[1], prototype_distances(features[1], prototypes[1], "euclidean"))


def test_unknown_distance_is_rejected():
    with pytest.raises(ValueError, match="manhattan"):
        prototype_distances(torch.zeros(1, 2), torch.zeros(2, 2), "manhattan")


def test_distance_ratio_uses_the_two_most_probable_classes():
    # r(k0) = 1, r(k1) = 3, r(k2) = 0 (k2 is least probable and must be ignored)
    features = torch.zeros(2, 2)
    prototypes = torch.tensor([[1.0, 0.0], [0.0, 3.0], [0.0, 0.0]])
    logits = torch.tensor([[2.0, 1.0, 0.0], [1.0, 2.0, 0.0]])
    ratio = distance_ratio(logits, features, prototypes, "euclidean")
    # 0.5 * (1 + (1 - 3) / 3) = 1/6 when k1 = 0; 0.5 * (1 + (3 - 1) / 3) = 5/6 when k1 = 1
    assert ratio.tolist() == pytest.approx([1 / 6, 5 / 6])


def test_distance_ratio_is_one_half_when_both_distances_are_zero():
    assert normalized_ratio(torch.zeros(1), torch.zeros(1)).item() == 0.5


def test_edr_is_the_weighted_harmonic_mean():
    entropy, ratio = torch.tensor([0.5]), torch.tensor([0.25])
    assert hybrid_indicator(entropy, ratio, 1.0).item() == pytest.approx(2 / (4 + 2))  # (1+1)/(1/0.25 + 1/0.5)
    assert hybrid_indicator(entropy, ratio, 2.0).item() == pytest.approx(3 / (8 + 2))


def test_edr_is_zero_when_entropy_or_ratio_is_zero():
    values = hybrid_indicator(torch.tensor([0.0, 0.7, 0.0]), torch.tensor([0.6, 0.0, 0.0]), 1.5)
    assert values.tolist() == [0.0, 0.0, 0.0]


def test_edr_with_lambda_zero_is_plain_entropy():
    entropy = torch.tensor([0.3, 0.0])
    assert torch.equal(hybrid_indicator(entropy, None, 0.0), entropy)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
def test_signals_stay_finite_and_in_range_in_every_dtype(dtype, distance):
    logits = torch.tensor([[60000.0, -60000.0], [0.0, 0.0], [3.0, 3.0]]).to(dtype)
    features = torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]).to(dtype)
    prototypes = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]).to(dtype)
    entropy = normalized_entropy(logits)
    ratio = distance_ratio(logits, features, prototypes, distance)
    edr = hybrid_indicator(entropy, ratio, 1.0)
    for value in (entropy, ratio, edr):
        assert value.dtype == torch.float32
        assert torch.isfinite(value).all() and (value >= 0).all() and (value <= 1).all()


@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
def test_distance_gradient_is_finite_at_zero_vectors(distance):
    features = torch.zeros(2, 3, requires_grad=True)
    prototypes = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    prototype_distances(features, prototypes, distance).sum().backward()
    assert torch.isfinite(features.grad).all()
