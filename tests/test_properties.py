"""Properties of the exit signals (docs/method.md section 2, eqs. 8-11) and of compact early exit, on generated inputs.

The hand-computed cases live in `test_signals.py` and `test_modeling.py`; here `hypothesis` searches the corners
(extreme logits, half precision, zero vectors, identical prototypes, features lying on a prototype) for a
violation of what docs/method.md promises for every input.
"""

import functools
import math

import numpy as np
import pytest
import torch
from hypothesis import assume, example, given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from de3_transformers.exit_policies import get_exit_policy
from de3_transformers.simulation import exit_views, layer_speedup, simulate_first_exits, simulate_policy
from de3_transformers.signals import distance_ratio, hybrid_indicator, normalized_entropy, prototype_distances

from conftest import BACKBONES, mixed_length_batch, tiny_model, train_prototypes
from test_modeling import full_signals


# No example database: failing examples are not written into the repository (hypothesis still keeps a small cache
# in `.hypothesis/`, which ignores itself in git). The known corner cases are pinned with `@example` instead.
SIGNALS = settings(max_examples=200, deadline=None, database=None)
MODEL = settings(max_examples=150, deadline=None, database=None)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DISTANCES = ["cosine", "euclidean"]
LAMBDAS = [0.0, 0.5, 1.0, 3.0]
# Bounds of the generated values, per dtype. Logits: far beyond any real model's (beyond ~1.7e38 the logit
# differences themselves overflow float32). Vectors: squares must stay finite in float32 (|x| < ~1e19);
# float16 vectors stay below half its maximum because features are also drawn as doubled prototypes.
LOGIT_LIMITS = {torch.float32: 1e30, torch.float16: 65504.0, torch.bfloat16: 1e30}
VECTOR_LIMITS = {torch.float32: 1e15, torch.float16: 1e4, torch.bfloat16: 1e15}
# Features on a prototype's ray (scale 1 is the prototype itself, 0 the zero vector, -1 the opposite direction).
RAY_SCALES = [0.0, 0.5, 1.0, 2.0, -1.0]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The tensors here are tiny: one thread is the fastest, and it does not fight other processes for the cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def float_arrays(shape, limit):
    bound = float(np.float32(limit))
    return hnp.arrays(np.float32, shape, elements=st.floats(-bound, bound, width=32))


@st.composite
def logits_tensors(draw):
    """`[B, K]` finite logits in float32, float16 or bfloat16 (rounded to the dtype where needed)."""
    dtype = draw(st.sampled_from(DTYPES))
    shape = (draw(st.integers(1, 3)), draw(st.integers(2, 5)))
    return torch.from_numpy(draw(float_arrays(shape, LOGIT_LIMITS[dtype]))).to(dtype)


@st.composite
def exit_inputs(draw):
    """`(logits [B, K], features [B, P], prototypes [K, P])` of one dtype, with the boundary cases of eq. 10:
    zero prototypes, identical prototypes, and features that are zero or lie on a prototype's ray."""
    dtype = draw(st.sampled_from(DTYPES))
    batch, classes, width = draw(st.integers(1, 3)), draw(st.integers(2, 4)), draw(st.integers(1, 4))
    logits = draw(float_arrays((batch, classes), LOGIT_LIMITS[dtype]))
    prototypes = draw(float_arrays((classes, width), VECTOR_LIMITS[dtype])).copy()
    features = draw(float_arrays((batch, width), VECTOR_LIMITS[dtype])).copy()
    for k in range(classes):
        source = draw(st.sampled_from(["own", "zero", *range(k)]))
        if source == "zero":
            prototypes[k] = 0.0
        elif source != "own":
            prototypes[k] = prototypes[source]
    for n in range(batch):
        ray = draw(st.none() | st.tuples(st.integers(0, classes - 1), st.sampled_from(RAY_SCALES)))
        if ray is not None:
            features[n] = ray[1] * prototypes[ray[0]]
    return tuple(torch.from_numpy(array).to(dtype) for array in (logits, features, prototypes))


@st.composite
def entropy_and_ratio(draw):
    """Two float32 vectors of one length with values in [0, 1] (0 and 1 included): signals E and DR."""
    length = draw(st.integers(1, 8))
    unit = hnp.arrays(np.float32, length, elements=st.floats(0.0, 1.0, width=32))
    return torch.from_numpy(draw(unit)), torch.from_numpy(draw(unit))


def assert_float32_in_unit_interval(values):
    assert values.dtype == torch.float32
    assert torch.isfinite(values).all(), values
    assert ((values >= 0) & (values <= 1)).all(), values.tolist()


# docs/method.md eqs. 8-11: every signal is a finite float32 number in [0, 1], whatever the input.


@SIGNALS
@given(logits=logits_tensors())
@example(logits=torch.tensor([[1e4, -1e4, 0.0], [-1e4, -1e4, -1e4]], dtype=torch.float16))
def test_entropy_is_a_float32_number_in_the_unit_interval(logits):
    assert_float32_in_unit_interval(normalized_entropy(logits))


@SIGNALS
@given(inputs=exit_inputs(), distance=st.sampled_from(DISTANCES))
# A feature equal to its prototype: 1 - cos rounds below 0 for some vectors, e.g. (3, 3).
@example(inputs=(torch.zeros(1, 2), torch.tensor([[3.0, 3.0]]), torch.tensor([[3.0, 3.0], [3.0, 3.0]])),
         distance="cosine")
def test_prototype_distances_are_finite_and_non_negative(inputs, distance):
    _, features, prototypes = inputs
    distances = prototype_distances(features, prototypes, distance)
    assert distances.dtype == torch.float32 and distances.shape == (features.shape[0], prototypes.shape[0])
    assert torch.isfinite(distances).all(), distances
    assert (distances >= 0).all(), distances.tolist()
    if distance == "cosine":
        assert (distances <= 2 + 1e-6).all(), distances.tolist()


@SIGNALS
@given(inputs=exit_inputs(), distance=st.sampled_from(DISTANCES))
# The most probable class's prototype equals the feature: r1 rounds below 0, which gives DR < 0.
@example(inputs=(torch.tensor([[1.0, 0.0]]), torch.tensor([[3.0, 3.0]]), torch.tensor([[3.0, 3.0], [1.0, 0.0]])),
         distance="cosine")
def test_distance_ratio_is_a_float32_number_in_the_unit_interval(inputs, distance):
    logits, features, prototypes = inputs
    assert_float32_in_unit_interval(distance_ratio(logits, features, prototypes, distance))


@SIGNALS
@given(inputs=exit_inputs(), distance=st.sampled_from(DISTANCES), lam=st.floats(0.0, 10.0))
# E = 1 (uniform logits) and DR = 1 (the second class's prototype is the feature): EDR must be 1, not above.
@example(inputs=(torch.zeros(1, 2), torch.tensor([[1.0, 1.0]]), torch.tensor([[1.0, 0.0], [1.0, 1.0]])),
         distance="euclidean", lam=0.32)
def test_edr_is_a_float32_number_in_the_unit_interval(inputs, distance, lam):
    logits, features, prototypes = inputs
    ratio = distance_ratio(logits, features, prototypes, distance)
    assert_float32_in_unit_interval(hybrid_indicator(normalized_entropy(logits), ratio, lam))


# docs/method.md eq. 11: EDR is the weighted harmonic mean of E and DR.


@SIGNALS
@given(signals=entropy_and_ratio())
def test_edr_with_lambda_zero_is_exactly_the_entropy(signals):
    entropy, ratio = signals
    assert torch.equal(hybrid_indicator(entropy, ratio, 0.0), entropy)
    assert torch.equal(hybrid_indicator(entropy, None, 0), entropy)


@SIGNALS
@given(signals=entropy_and_ratio(), lam=st.floats(0.0, 10.0))
def test_edr_lies_between_entropy_and_distance_ratio(signals, lam):
    entropy, ratio = signals
    edr = hybrid_indicator(entropy, ratio, lam)
    assert (edr >= torch.minimum(entropy, ratio) - 1e-6).all(), (edr, entropy, ratio)
    assert (edr <= torch.maximum(entropy, ratio) + 1e-6).all(), (edr, entropy, ratio)


# Compact early exit on a trained tiny model. The model, its full forwards and their EDR values are cached, so they
# are built once per module rather than once per hypothesis example.


@functools.lru_cache(maxsize=None)
def confident_model(backbone):
    """A tiny model whose weights are drawn wide (initializer_range 0.5), so its EDR values spread over [0, 1]
    (with the default 0.02 every entropy is within 1e-4 of 1)."""
    return train_prototypes(tiny_model(backbone, initializer_range=0.5))


@functools.lru_cache(maxsize=None)
def full_forward(backbone, seed):
    model = confident_model(backbone)
    input_ids, attention_mask = mixed_length_batch(batch_size=12, seed=seed, pad_token_id=model.config.pad_token_id)
    return input_ids, attention_mask, full_signals(model, input_ids, attention_mask)


@functools.lru_cache(maxsize=None)
def edr_values(backbone, seed, lam):
    output = full_forward(backbone, seed)[2]
    return hybrid_indicator(output.entropy, output.distance_ratio, lam).flatten().sort().values


@st.composite
def exit_problems(draw, num_thresholds):
    """`(backbone, batch seed, lam, thresholds)`. Each threshold is uniform in [0, 1.2] or halfway between two
    consecutive EDR values of the batch, so that the samples really leave at different exits."""
    backbone = draw(st.sampled_from(sorted(BACKBONES)))
    seed, lam = draw(st.integers(0, 2)), draw(st.sampled_from(LAMBDAS))
    edr = edr_values(backbone, seed, lam)
    halfway = ((edr[1:] + edr[:-1]) / 2).tolist()
    threshold = st.floats(0.0, 1.2) | st.sampled_from(halfway)
    return backbone, seed, lam, [draw(threshold) for _ in range(num_thresholds)]


def assume_clear_of_every_edr(edr, thresholds):
    """Rejects a threshold within 1e-5 of an EDR value: float noise between batch shapes could flip that exit."""
    for threshold in thresholds:
        assume(bool((edr - threshold).abs().min() > 1e-5))


@MODEL
@given(problem=exit_problems(num_thresholds=2))
def test_a_higher_threshold_never_makes_a_sample_leave_later(problem):
    backbone, seed, lam, thresholds = problem
    assume_clear_of_every_edr(edr_values(backbone, seed, lam), thresholds)
    low, high = sorted(thresholds)
    model, (input_ids, attention_mask, _) = confident_model(backbone), full_forward(backbone, seed)
    at_low = model.predict_early(input_ids, attention_mask, threshold=low, lam=lam)
    at_high = model.predict_early(input_ids, attention_mask, threshold=high, lam=lam)
    assert (at_high.sample_exit_layers <= at_low.sample_exit_layers).all(), (at_low.sample_exit_layers,
                                                                             at_high.sample_exit_layers)
    assert at_high.speedup >= at_low.speedup


@MODEL
@given(problem=exit_problems(num_thresholds=1), order=st.permutations(range(12)))
def test_permuting_the_batch_permutes_the_exits_and_logits(problem, order):
    backbone, seed, lam, (threshold,) = problem
    assume_clear_of_every_edr(edr_values(backbone, seed, lam), [threshold])
    model, (input_ids, attention_mask, _) = confident_model(backbone), full_forward(backbone, seed)
    order = torch.tensor(order)
    result = model.predict_early(input_ids, attention_mask, threshold=threshold, lam=lam)
    permuted = model.predict_early(input_ids[order], attention_mask[order], threshold=threshold, lam=lam)
    assert torch.equal(permuted.sample_exit_layers, result.sample_exit_layers[order])
    torch.testing.assert_close(permuted.logits, result.logits[order], atol=1e-5, rtol=0)


@MODEL
@given(problem=exit_problems(num_thresholds=1))
def test_compact_early_exit_equals_simulation_from_a_full_forward(problem):
    backbone, seed, lam, (threshold,) = problem
    assume_clear_of_every_edr(edr_values(backbone, seed, lam), [threshold])
    model, (input_ids, attention_mask, full) = confident_model(backbone), full_forward(backbone, seed)
    result = model.predict_early(input_ids, attention_mask, threshold=threshold, lam=lam)
    simulated = simulate_policy(get_exit_policy("de3", threshold=threshold, lam=lam), full.exit_logits,
                                model.config.exit_layers, full.entropy, full.distance_ratio)
    assert torch.equal(result.sample_exit_layers, simulated.sample_exit_layers)
    torch.testing.assert_close(result.logits, simulated.logits, atol=1e-5, rtol=0)
    assert result.speedup == pytest.approx(simulated.speedup)
    assert result.speedup == pytest.approx(layer_speedup(result.sample_exit_layers, model.config.num_hidden_layers))


# Every policy's sweep, on random signals: from "nobody leaves early" to the most early exits, one step at a time.


@st.composite
def random_views(draw):
    """Views of 3 early exits over 6 samples: random logits (3 classes), distance ratios and LTE scores."""
    def values(*shape, low=-6.0, high=6.0):
        flat = draw(st.lists(st.floats(low, high, width=32), min_size=math.prod(shape), max_size=math.prod(shape)))
        return torch.tensor(flat, dtype=torch.float32).view(*shape)

    logits, ratio, scores = values(4, 6, 3), values(3, 6, low=0.0, high=1.0), values(3, 6, low=0.0, high=1.0)
    # Drawn exit-first; `exit_views` takes the forward's batch-first layout.
    return exit_views(logits.transpose(0, 1), [1, 2, 3, 4], normalized_entropy(logits[:-1]).T, ratio.T, scores.T)


@settings(max_examples=60, deadline=None)
@given(views=random_views(), name=st.sampled_from(["de3", "entropy", "max_prob", "energy", "patience",
                                                    "patient_confident", "learned"]))
def test_every_policy_sweep_moves_exits_earlier_step_by_step(views, name):
    policy = get_exit_policy(name, lam=1.0, patience=2)
    values = policy.sweep_values(views)
    first = simulate_first_exits(policy.with_value(torch.tensor(values).view(-1, 1)), views).expand(len(values), 6)
    assert (first[0] == len(views)).all()  # the first value lets no sample leave early
    assert (first[1:] <= first[:-1]).all()  # each further value makes no sample leave later
    earliest = 1 if name == "patient_confident" else 0  # two consecutive confident exits are needed
    assert (first[-1] == earliest).all()  # the last value sends every sample out as early as the rule allows
    for row, value in enumerate(values):  # the [T, 1] replay equals one policy per value
        assert torch.equal(simulate_first_exits(policy.with_value(value), views), first[row])
