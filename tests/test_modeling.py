"""Forward outputs and `predict_early`: true per-sample exit that agrees with single runs and with simulation."""

import pytest
import torch

from de3_transformers import get_exit_policy, simulate_policy

from conftest import mixed_length_batch, tiny_model, train_prototypes


def full_signals(model, input_ids, attention_mask):
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=attention_mask, output_exit_signals=True)


def spread_thresholds(output, lam):
    """Thresholds at quantiles of the observed EDR, so that samples leave at many different exits."""
    from de3_transformers.signals import hybrid_indicator

    edr = hybrid_indicator(output.entropy, output.distance_ratio, lam).flatten()
    return [float(q) for q in torch.quantile(edr, torch.tensor([0.15, 0.35, 0.6]))]


def test_forward_shapes(trained_model):
    input_ids, attention_mask = mixed_length_batch(batch_size=5)
    output = trained_model(input_ids=input_ids, attention_mask=attention_mask, labels=torch.tensor([0, 1, 2, 0, 1]),
                           output_exit_signals=True)
    assert output.exit_logits.shape == (5, 4, 3)  # batch-first: [batch, exit, class]
    assert torch.equal(output.logits, output.exit_logits[:, -1])
    assert output.entropy.shape == output.distance_ratio.shape == (5, 3)
    assert output.loss.shape == output.ce_loss.shape == output.dar_loss.shape == ()


def test_sparse_exit_layers_give_one_exit_per_listed_layer(backbone):
    model = train_prototypes(tiny_model(backbone, exit_layers=[2, 4]))
    input_ids, attention_mask = mixed_length_batch(batch_size=5)
    output = full_signals(model, input_ids, attention_mask)
    assert output.exit_logits.shape == (5, 2, 3) and output.distance_ratio.shape == (5, 1)
    assert model.prototype_memory.prototypes.shape == (1, 3, 32)
    result = model.predict_early(input_ids, attention_mask, threshold=2.0)
    assert result.sample_exit_layers.tolist() == [2] * 5 and result.speedup == pytest.approx(2.0)


@pytest.mark.parametrize("lam", [0.0, 1.0, 3.0])
def test_compact_batch_matches_simulation_from_a_full_forward(trained_model, lam):
    input_ids, attention_mask = mixed_length_batch(batch_size=16, seed=5)
    full = full_signals(trained_model, input_ids, attention_mask)
    seen_layers = set()
    for threshold in spread_thresholds(full, lam):
        result = trained_model.predict_early(input_ids, attention_mask, threshold=threshold, lam=lam)
        simulated = simulate_policy(get_exit_policy("de3", threshold=threshold, lam=lam), full.exit_logits,
                                    trained_model.config.exit_layers, full.entropy, full.distance_ratio)
        assert result.sample_exit_layers.tolist() == simulated.sample_exit_layers.tolist()
        torch.testing.assert_close(result.logits, simulated.logits, atol=1e-5, rtol=0)
        assert result.speedup == pytest.approx(simulated.speedup)
        seen_layers.update(result.sample_exit_layers.tolist())
    assert len(seen_layers) >= 3  # the comparison really exercised compaction


def assert_each_sample_alone_agrees(model, input_ids, attention_mask, threshold, batched):
    """Every row, run alone without padding, leaves at the same exit with the same logits as in the batch."""
    for row in range(input_ids.shape[0]):
        length = int(attention_mask[row].sum())
        alone = model.predict_early(input_ids[row : row + 1, :length], threshold=threshold, lam=1.0)
        assert alone.sample_exit_layers.item() == batched.sample_exit_layers[row].item()
        torch.testing.assert_close(alone.logits[0], batched.logits[row], atol=1e-5, rtol=0)
    assert len(set(batched.sample_exit_layers.tolist())) >= 2


def test_batch_matches_each_sample_run_alone(trained_model):
    input_ids, attention_mask = mixed_length_batch(batch_size=10, seed=7)
    threshold = spread_thresholds(full_signals(trained_model, input_ids, attention_mask), 1.0)[1]
    batched = trained_model.predict_early(input_ids, attention_mask, threshold=threshold, lam=1.0)
    assert_each_sample_alone_agrees(trained_model, input_ids, attention_mask, threshold, batched)


def test_compaction_keeps_multiples_of_eight_rows_and_padding_rows_change_nothing(trained_model):
    input_ids, attention_mask = mixed_length_batch(batch_size=30, seed=8)
    full = full_signals(trained_model, input_ids, attention_mask)
    sizes = []
    hooks = [layer.register_forward_pre_hook(lambda module, args: sizes.append(args[0].shape[0]))
             for layer in trained_model.backbone.encoder.layer]
    try:
        threshold = spread_thresholds(full, 1.0)[1]
        batched = trained_model.predict_early(input_ids, attention_mask, threshold=threshold, lam=1.0)
    finally:
        for hook in hooks:
            hook.remove()
    assert sizes[0] == 30 and all(size % 8 == 0 or size < 8 for size in sizes[1:])
    assert len(set(sizes)) >= 2  # it did shrink
    # The rows still running are never more than 7 above the samples still running.
    still_running = [(batched.sample_exit_layers >= layer).sum().item() for layer in range(1, len(sizes) + 1)]
    assert all(size - running <= 7 or size == 30 for size, running in zip(sizes, still_running))
    assert_each_sample_alone_agrees(trained_model, input_ids, attention_mask, threshold, batched)


def test_threshold_zero_reproduces_the_full_model_exactly(trained_model):
    input_ids, attention_mask = mixed_length_batch(batch_size=6)
    full = full_signals(trained_model, input_ids, attention_mask)
    result = trained_model.predict_early(input_ids, attention_mask, threshold=0.0)
    assert torch.equal(result.logits, full.logits)
    assert result.sample_exit_layers.tolist() == [4] * 6 and result.speedup == 1.0


def test_threshold_above_one_always_leaves_at_the_first_exit(trained_model):
    input_ids, attention_mask = mixed_length_batch(batch_size=6)
    full = full_signals(trained_model, input_ids, attention_mask)
    result = trained_model.predict_early(input_ids, attention_mask, threshold=1.5)
    assert result.sample_exit_layers.tolist() == [1] * 6 and result.speedup == pytest.approx(4.0)
    torch.testing.assert_close(result.logits, full.exit_logits[:, 0], atol=1e-5, rtol=0)


def test_defaults_come_from_the_config(trained_model):
    input_ids, attention_mask = mixed_length_batch(batch_size=16, seed=5)
    low, middle, high = spread_thresholds(full_signals(trained_model, input_ids, attention_mask), 2.0)
    trained_model.config.early_exit_threshold, trained_model.config.early_exit_lambda = high, 2.0
    by_default = trained_model.predict_early(input_ids, attention_mask)
    at_high = trained_model.predict_early(input_ids, attention_mask, threshold=high, lam=2.0)
    at_low = trained_model.predict_early(input_ids, attention_mask, threshold=low, lam=2.0)
    assert torch.equal(by_default.sample_exit_layers, at_high.sample_exit_layers)
    assert not torch.equal(by_default.sample_exit_layers, at_low.sample_exit_layers)


def test_predict_early_returns_long_exit_layers_and_restores_training_mode(trained_model):
    input_ids, attention_mask = mixed_length_batch(batch_size=4)
    trained_model.train()
    result = trained_model.predict_early(input_ids, attention_mask, threshold=0.5)
    assert result.sample_exit_layers.dtype == torch.long and trained_model.training


def test_untrained_prototypes_raise_an_error_that_names_the_fix(backbone):
    model = tiny_model(backbone)
    input_ids, attention_mask = mixed_length_batch(batch_size=2)
    with pytest.raises(RuntimeError, match="not initialised.*lam=0"):
        model.predict_early(input_ids, attention_mask, threshold=0.5, lam=1.0)
    assert model.predict_early(input_ids, attention_mask, threshold=0.5, lam=0.0).logits.shape == (2, 3)


def test_distance_ratio_is_none_until_every_prototype_exists():
    model = tiny_model()
    input_ids, attention_mask = mixed_length_batch(batch_size=2)
    output = full_signals(model, input_ids, attention_mask)
    assert output.distance_ratio is None and output.entropy.shape == (2, 3)
    with pytest.raises(ValueError, match="lam=0"):
        simulate_policy(get_exit_policy("de3", threshold=0.5, lam=1.0), output.exit_logits, [1, 2, 3, 4],
                        output.entropy, None)


@pytest.mark.parametrize("threshold, lam", [(float("nan"), 1.0), (-0.1, 1.0), (0.5, float("nan")), (0.5, -1.0),
                                            (float("inf"), 1.0), ("0.5", 1.0)])
def test_bad_threshold_or_lambda_is_rejected(trained_model, threshold, lam):
    input_ids, attention_mask = mixed_length_batch(batch_size=2)
    with pytest.raises(ValueError, match="out of range"):
        trained_model.predict_early(input_ids, attention_mask, threshold=threshold, lam=lam)


def test_inputs_on_another_device_are_rejected(trained_model):
    input_ids, attention_mask = mixed_length_batch(batch_size=2)
    with pytest.raises(ValueError, match=r"on meta but the model is on cpu.*\.to\(model\.device\)"):
        trained_model.predict_early(input_ids.to("meta"), threshold=0.5)
    with pytest.raises(ValueError, match="attention_mask is on meta"):
        trained_model(input_ids=input_ids, attention_mask=attention_mask.to("meta"))


@pytest.mark.parametrize(
    "make_inputs, message",
    [
        (lambda ids, mask: (ids[0], None), "batch_size, sequence_length"),
        (lambda ids, mask: (ids[:0], None), "non-empty"),
        (lambda ids, mask: (ids, mask[:, :3]), "attention_mask has shape"),
        (lambda ids, mask: (torch.full((1, 65), 5), None), "truncation=True"),
        (lambda ids, mask: (ids, torch.cat([mask[:1], torch.zeros_like(mask[:1])])), "attend to no token"),
    ],
)
def test_malformed_inputs_are_rejected(trained_model, make_inputs, message):
    input_ids, attention_mask = mixed_length_batch(batch_size=2)
    ids, mask = make_inputs(input_ids, attention_mask)
    with pytest.raises(ValueError, match=message):
        trained_model.predict_early(ids, mask, threshold=0.5)


@pytest.mark.parametrize("labels, message", [
    (torch.tensor([0, 3]), r"integer class indices in \[0, 3\)"),
    (torch.tensor([0.0, 1.0]), "integer class indices"),
    (torch.tensor([True, False]), "integer class indices"),
    (torch.tensor([0, 1, 2]), "3 labels for a batch of 2"),
])
def test_bad_labels_are_rejected(trained_model, labels, message):
    input_ids, attention_mask = mixed_length_batch(batch_size=2)
    with pytest.raises(ValueError, match=message):
        trained_model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


def test_longest_accepted_input_runs_and_one_more_token_is_a_clear_error(trained_model):
    longest = trained_model.max_sequence_length  # 64 for BERT; 64 - pad_token_id - 1 = 62 for RoBERTa
    assert longest == (64 if trained_model.config.model_type == "de3_bert" else 62)
    assert trained_model.predict_early(torch.full((1, longest), 5), threshold=0.5).logits.shape == (1, 3)
    with pytest.raises(ValueError, match=f"max_length={longest}"):
        trained_model.predict_early(torch.full((1, longest + 1), 5), threshold=0.5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_gives_finite_signals_and_predictions(trained_model, dtype):
    model = trained_model.to(dtype)
    input_ids, attention_mask = mixed_length_batch(batch_size=6)
    output = full_signals(model, input_ids, attention_mask)
    for value in (output.exit_logits, output.entropy, output.distance_ratio):
        assert torch.isfinite(value).all()
    result = model.predict_early(input_ids, attention_mask, threshold=0.5)
    assert torch.isfinite(result.logits).all() and result.logits.dtype == dtype
    model.train()
    loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=torch.tensor([0, 1, 2] * 2)).loss
    assert torch.isfinite(loss)


def test_mean_pooling_averages_the_attended_tokens_only():
    model = tiny_model(exit_pooling="mean")
    hidden = torch.tensor([[[1.0] * 32, [3.0] * 32, [100.0] * 32]])
    pooled = model.pool(hidden, torch.tensor([[1, 1, 0]]))
    pooler = model.bert.pooler
    torch.testing.assert_close(pooled, pooler.activation(pooler.dense(torch.full((1, 32), 2.0))))


def test_mean_pooling_keeps_compact_batch_equal_to_simulation_and_single_runs(backbone):
    model = train_prototypes(tiny_model(backbone, exit_pooling="mean"))
    input_ids, attention_mask = mixed_length_batch(batch_size=12, seed=9)
    full = full_signals(model, input_ids, attention_mask)
    threshold = spread_thresholds(full, 1.0)[1]
    batched = model.predict_early(input_ids, attention_mask, threshold=threshold, lam=1.0)
    simulated = simulate_policy(get_exit_policy("de3", threshold=threshold, lam=1.0), full.exit_logits,
                                model.config.exit_layers, full.entropy, full.distance_ratio)
    assert batched.sample_exit_layers.tolist() == simulated.sample_exit_layers.tolist()
    torch.testing.assert_close(batched.logits, simulated.logits, atol=1e-5, rtol=0)
    assert_each_sample_alone_agrees(model, input_ids, attention_mask, threshold, batched)


@pytest.mark.parametrize("make_input_ids, error, message", [
    (lambda ids: ids.tolist(), TypeError, "must be a torch.Tensor, got list.*return_tensors='pt'"),
    (lambda ids: ids.float(), TypeError, "integer token ids"),
    (lambda ids: ids.clone().fill_(99), ValueError, "vocabulary has 99"),
    (lambda ids: ids.clone().fill_(-1), ValueError, r"token ids in \[-1, -1\]"),
])
def test_inputs_of_the_wrong_type_or_vocabulary_are_rejected(trained_model, make_input_ids, error, message):
    input_ids, _ = mixed_length_batch(batch_size=2)
    with pytest.raises(error, match=message):
        trained_model.predict_early(make_input_ids(input_ids), threshold=0.5)
    with pytest.raises(error, match=message):
        trained_model(input_ids=make_input_ids(input_ids))


def test_forward_rejects_a_row_without_attended_tokens(trained_model):
    input_ids, attention_mask = mixed_length_batch(batch_size=2)
    attention_mask[1] = 0
    with pytest.raises(ValueError, match=r"Rows \[1\] of attention_mask attend to no token"):
        trained_model(input_ids=input_ids, attention_mask=attention_mask, labels=torch.tensor([0, 1]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_class_absent_for_many_steps_keeps_training_finite(dtype):
    model = tiny_model().to(dtype).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(8):  # class 2 never appears
        input_ids, attention_mask = mixed_length_batch(batch_size=4, seed=20 + step)
        output = model(input_ids=input_ids, attention_mask=attention_mask, labels=torch.tensor([0, 1, 0, 1]),
                       output_exit_signals=True)
        assert torch.isfinite(output.loss) and torch.isfinite(output.dar_loss)
        output.loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        optimizer.step(), optimizer.zero_grad()
    memory = model.prototype_memory
    assert memory.initialized[:, :2].all() and not memory.initialized[:, 2].any()
    assert torch.count_nonzero(memory.prototypes[:, 2]) == 0 and torch.isfinite(memory.prototypes).all()


def test_identical_prototypes_give_a_neutral_distance_ratio(trained_model):
    memory = trained_model.prototype_memory
    memory.prototypes.copy_(memory.prototypes[:, :1].expand_as(memory.prototypes))
    input_ids, attention_mask = mixed_length_batch(batch_size=5)
    output = full_signals(trained_model, input_ids, attention_mask)
    torch.testing.assert_close(output.distance_ratio, torch.full_like(output.distance_ratio, 0.5))
    assert torch.isfinite(trained_model.predict_early(input_ids, attention_mask, threshold=0.5).logits).all()
