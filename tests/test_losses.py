"""DAR (docs/method.md eqs. 2-4) and the layer-weighted loss (eqs. 5-7) against hand-computed values."""

import math

import pytest
import torch
import torch.nn.functional as F

from de3_transformers.losses import distance_aware_regularization, layer_weighted_loss

from conftest import mixed_length_batch, tiny_model

# Euclidean hand case: prototypes c0 = (0, 0), c1 = (3, 4).
# sample a = (3, 4), label 0: r_y = 5, r_z = 0; sample b = (3, 0), label 1: r_y = 4, r_z = 3.
FEATURES = torch.tensor([[[3.0, 4.0], [3.0, 0.0]]])
LABELS = torch.tensor([0, 1])
PROTOTYPES = torch.tensor([[[0.0, 0.0], [3.0, 4.0]]])
ALL_KNOWN = torch.tensor([[True, True]])


def dar(dar_type, initialized=ALL_KNOWN, beta=2.0, features=FEATURES):
    return distance_aware_regularization(features, LABELS, PROTOTYPES, initialized, "euclidean", dar_type, beta)


def test_center_loss_is_the_mean_distance_to_the_own_prototype():
    assert dar("center").tolist() == pytest.approx([(5.0 + 4.0) / 2])


def test_alienation_loss_compares_own_and_nearest_other_prototype():
    # a: 0.5 * (1 + (5 - 0) / 5) = 1; b: 0.5 * (1 + (4 - 3) / 4) = 0.625
    assert dar("alienation").tolist() == pytest.approx([(1.0 + 0.625) / 2])


def test_combined_loss_adds_beta_times_alienation():
    assert dar("combined", beta=2.0).tolist() == pytest.approx([4.5 + 2.0 * 0.8125])


def test_terms_needing_an_uninitialised_prototype_contribute_zero():
    only_class_0 = torch.tensor([[True, False]])
    assert dar("center", only_class_0).tolist() == pytest.approx([5.0 / 2])  # b's own prototype is unknown
    assert dar("alienation", only_class_0).tolist() == [0.0]  # a has no other known class, b no own one
    nothing = torch.tensor([[False, False]])
    assert dar("combined", nothing).tolist() == [0.0]


@pytest.mark.parametrize("dar_type", ["center", "alienation", "combined"])
@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
def test_dar_gradient_is_finite_when_features_sit_on_prototypes(dar_type, distance):
    features = torch.tensor([[[0.0, 0.0], [3.0, 4.0]]], requires_grad=True)  # exactly on c0 and c1
    value = distance_aware_regularization(features, LABELS, PROTOTYPES, ALL_KNOWN, distance, dar_type, 1.0)
    value.sum().backward()
    assert torch.isfinite(value).all() and torch.isfinite(features.grad).all()


def test_unknown_dar_type_is_rejected():
    with pytest.raises(ValueError, match="triplet"):
        dar("triplet")


def test_layer_weighted_loss_hand_case():
    # exits on layers 1, 2 and 4 of a 4-layer model; weights 1/7, 2/7, 4/7
    exit_logits = torch.tensor([[[0.0, 0.0]], [[math.log(3.0), 0.0]], [[0.0, math.log(3.0)]]])
    labels = torch.tensor([0])
    ce = [math.log(2.0), -math.log(0.75), -math.log(0.25)]
    dar_values = torch.tensor([0.5, 0.25])
    parts = layer_weighted_loss(exit_logits, labels, dar_values, [1, 2, 4])
    # eqs. 5-7 with alpha 0.1: the total the model forms from the two parts
    expected = (1 * (ce[0] + 0.1 * 0.5) + 2 * (ce[1] + 0.1 * 0.25) + 4 * ce[2]) / 7
    assert (parts.ce_loss + 0.1 * parts.dar_loss).item() == pytest.approx(expected)
    assert parts.ce_loss.item() == pytest.approx((ce[0] + 2 * ce[1] + 4 * ce[2]) / 7)
    assert parts.dar_loss.item() == pytest.approx((0.5 + 2 * 0.25) / 7)


def test_model_loss_equals_the_formula_on_its_own_outputs(backbone):
    model = tiny_model(backbone, dar_type="combined", dar_alpha=0.5, distance="euclidean")
    input_ids, attention_mask = mixed_length_batch(batch_size=6)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    model.train()(input_ids=input_ids, attention_mask=attention_mask, labels=labels)  # initialise prototypes
    model.eval()
    output = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, output_exit_signals=True)
    assert output.loss.item() == pytest.approx(output.ce_loss.item() + 0.5 * output.dar_loss.item(), rel=1e-6)
    assert output.dar_loss.item() > 0
    weights = torch.arange(1.0, 5.0) / 10
    ce = torch.stack([F.cross_entropy(logits, labels) for logits in output.exit_logits.transpose(0, 1)])
    assert output.ce_loss.item() == pytest.approx((weights * ce).sum().item(), rel=1e-6)


def test_loss_is_finite_and_dar_is_zero_before_any_prototype_exists(backbone):
    model = tiny_model(backbone)
    input_ids, attention_mask = mixed_length_batch(batch_size=3)
    output = model(input_ids=input_ids, attention_mask=attention_mask, labels=torch.tensor([0, 1, 2]),
                   output_exit_signals=True)
    assert torch.isfinite(output.loss) and output.dar_loss.item() == 0.0
