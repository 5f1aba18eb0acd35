"""Throughput mode: length-sorted, padded batches give each sample the exit and logits it gets alone."""

import pytest
import torch

from de3_transformers.inference import predict_dataset

from conftest import mixed_length_batch, tiny_model, train_prototypes


@pytest.fixture
def rows_and_model(backbone):
    model = train_prototypes(tiny_model(backbone))
    input_ids, attention_mask = mixed_length_batch(batch_size=21, seed=12, pad_token_id=model.config.pad_token_id)
    rows = [{"input_ids": ids[mask.bool()].tolist(), "text": "ignored"} for ids, mask in zip(input_ids, attention_mask)]
    return model, rows


def test_results_come_back_in_input_order_and_match_single_runs(rows_and_model):
    model, rows = rows_and_model
    with torch.no_grad():
        entropy = torch.cat([model(input_ids=torch.tensor([row["input_ids"]]), output_exit_signals=True).entropy
                         for row in rows])
    threshold = float(entropy.median())  # lam=0: the DE3 rule on entropy alone
    result = predict_dataset(model, rows, batch_size=4, threshold=threshold, lam=0.0)
    assert result.logits.shape == (21, 3) and len(set(result.sample_exit_layers.tolist())) >= 2
    for index, row in enumerate(rows):
        alone = model.predict_early(torch.tensor([row["input_ids"]]), threshold=threshold, lam=0.0)
        assert alone.sample_exit_layers.item() == result.sample_exit_layers[index].item()
        torch.testing.assert_close(alone.logits[0], result.logits[index], atol=1e-5, rtol=0)
    unsorted = predict_dataset(model, rows, batch_size=4, sort_by_length=False, pad_to_multiple_of=None,
                               threshold=threshold, lam=0.0)
    assert unsorted.sample_exit_layers.tolist() == result.sample_exit_layers.tolist()
    assert result.speedup == pytest.approx(4 * 21 / result.sample_exit_layers.sum().item())


def test_padding_is_a_multiple_and_stays_within_the_positions(rows_and_model):
    model, rows = rows_and_model
    seen = []
    hook = model.backbone.embeddings.register_forward_hook(lambda module, args, output: seen.append(output.shape[1]))
    try:
        predict_dataset(model, rows, batch_size=8, pad_to_multiple_of=8, threshold=0.0)
        predict_dataset(model, [{"input_ids": list(range(3, 3 + model.max_sequence_length))}],
                        pad_to_multiple_of=48, threshold=0.0)  # 64 rounds up to 96: capped at the positions
    finally:
        hook.remove()
    assert all(length % 8 == 0 for length in seen[:-1]) and seen[-1] == model.max_sequence_length


@pytest.mark.parametrize("kwargs, message", [({"batch_size": 0}, ">= 1"), ({"pad_to_multiple_of": 0}, ">= 1")])
def test_bad_arguments_are_rejected(rows_and_model, kwargs, message):
    model, rows = rows_and_model
    with pytest.raises(ValueError, match=message):
        predict_dataset(model, rows, **kwargs)
    with pytest.raises(ValueError, match="empty"):
        predict_dataset(model, [])
    with pytest.raises(ValueError, match="input_ids"):
        predict_dataset(model, [{"text": "untokenized"}])
