"""GPU checks (skipped where there is no CUDA device): compact early exit on the GPU agrees with the replay of a full
forward for every policy, in float16 and bfloat16, and with the CPU in float32; so does MPEE's token exit."""

import pytest
import torch

from de3_transformers.exit_policies import get_exit_policy
from de3_transformers.inference import predict_dataset
from de3_transformers.simulation import simulate_policy

from conftest import mixed_length_batch, tiny_model, train_prototypes


pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


# `exit_layers`: layers where at least four of the 40 samples leave, on the CPU in float32, float16 and bfloat16 alike.
# The untrained tiny model is never confident enough for entropy 0.5, so every sample runs to the top there.
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name, parameters, exit_layers", [
    ("de3", {"threshold": 0.65, "lam": 1.0}, {1, 2, 3, 4}), ("entropy", {"threshold": 0.5}, {4}),
    ("patience", {"patience": 1}, {2, 4}), ("learned", {"threshold": 0.5}, {1}),
])
def test_gpu_early_exit_matches_the_replay_in_half_precision(dtype, name, parameters, exit_layers):
    model = train_prototypes(tiny_model("bert", learning_to_exit=True)).to("cuda", dtype)
    input_ids, attention_mask = (tensor.cuda() for tensor in mixed_length_batch(batch_size=40, seed=3))
    policy = get_exit_policy(name, **parameters)
    result = model.predict_early(input_ids, attention_mask, policy=policy)
    with torch.no_grad():
        full = model(input_ids=input_ids, attention_mask=attention_mask, output_exit_signals=True)
    simulated = simulate_policy(policy, full.exit_logits, model.config.exit_layers, full.entropy, full.distance_ratio,
                                full.exit_scores)
    assert result.logits.device.type == "cuda" and torch.isfinite(result.logits).all()
    # Half precision: a sample on the very boundary of the rule may flip between batch shapes; nearly all agree.
    agree = (result.sample_exit_layers == simulated.sample_exit_layers).double().mean().item()
    assert agree >= 0.95
    assert exit_layers <= set(result.sample_exit_layers.tolist())  # samples really left at different layers


def test_gpu_float32_matches_the_cpu():
    model = train_prototypes(tiny_model("bert"))
    input_ids, attention_mask = mixed_length_batch(batch_size=24, seed=4)
    on_cpu = model.predict_early(input_ids, attention_mask, threshold=0.5)
    model.cuda()
    on_gpu = model.predict_early(input_ids.cuda(), attention_mask.cuda(), threshold=0.5)
    assert on_gpu.sample_exit_layers.cpu().tolist() == on_cpu.sample_exit_layers.tolist()
    assert set(on_cpu.sample_exit_layers.tolist()) == {1, 2, 4}  # so compaction ran on the GPU
    torch.testing.assert_close(on_gpu.logits.cpu(), on_cpu.logits, atol=1e-4, rtol=0)
    rows = [{"input_ids": ids[mask.bool()].tolist()} for ids, mask in zip(input_ids, attention_mask)]
    scored = predict_dataset(model, rows, batch_size=8, threshold=0.5)
    assert scored.sample_exit_layers.tolist() == on_cpu.sample_exit_layers.tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gpu_token_exit_matches_the_replay(dtype):
    model = train_prototypes(tiny_model("bert", training_objective="mpee", token_exit_ratio=0.5, exit_memory=0.9))
    model.to("cuda", dtype)
    input_ids, attention_mask = (tensor.cuda() for tensor in mixed_length_batch(batch_size=40, seed=3))
    with torch.no_grad():
        full = model(input_ids=input_ids, attention_mask=attention_mask, output_exit_signals=True)
    policy = get_exit_policy("entropy", threshold=float(full.entropy.float().quantile(0.5)))
    result = model.predict_early(input_ids, attention_mask, policy=policy)
    simulated = simulate_policy(policy, full.exit_logits, model.config.exit_layers, full.entropy)
    assert torch.isfinite(result.logits).all()
    assert (result.sample_exit_layers == simulated.sample_exit_layers).double().mean().item() >= 0.95
    assert len(set(result.sample_exit_layers.tolist())) >= 3  # token exit under compaction, not one batch shape
