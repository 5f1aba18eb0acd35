"""MPEE (docs/method.md section 5): class attention, token selection and fusion, token importance and carried exit
logits, self-distillation and the FLOPs of shorter sequences on hand-made tensors; token exit in `forward` and
compact `predict_early`."""

import math

import pytest
import torch

from de3_transformers import modeling_de3
from de3_transformers.early_exit import run_layer, start_batch
from de3_transformers.exit_policies import get_exit_policy
from de3_transformers.simulation import exit_views, simulate_policy
from de3_transformers.flops import FlopsCounter
from de3_transformers.losses import ExitEnsembleTeacher, self_distillation_loss
from de3_transformers.token_exit import class_attention, prune_tokens, running_average, token_lengths

from conftest import mixed_length_batch, tiny_model, train_prototypes


MPEE = dict(training_objective="mpee", token_exit_ratio=0.5, token_exit_layers=[1, 2], exit_memory=0.9,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def test_class_attention_is_the_first_row_of_the_layers_attention_averaged_over_heads(backbone):
    model = tiny_model(backbone, attn_implementation="eager")
    input_ids, attention_mask = mixed_length_batch(batch_size=4, pad_token_id=model.config.pad_token_id)
    with torch.no_grad():
        out = model.backbone(input_ids=input_ids, attention_mask=attention_mask, output_attentions=True,
                             output_hidden_states=True)
        for index, layer in enumerate(model.backbone.encoder.layer):
            mine = class_attention(layer.attention.self, out.hidden_states[index], attention_mask)
            torch.testing.assert_close(mine, out.attentions[index][:, :, 0].mean(dim=1), atol=1e-6, rtol=1e-5)
    assert (mine[attention_mask == 0] == 0).all()


def test_running_average():
    assert running_average(None, torch.tensor([1.0, 3.0]), 0.5).tolist() == [1.0, 3.0]  # the first value starts it
    assert running_average(torch.tensor([1.0, 3.0]), torch.tensor([3.0, 1.0]), 0.25).tolist() == [1.5, 2.5]
    assert running_average(torch.tensor([1.0]), torch.tensor([4.0]), 1.0).tolist() == [4.0]


def hand_sequence():
    """Two samples of 6 slots, hidden size 2 (every slot's state is distinct, so it tells which slot was kept);
    sample 1 has 4 real tokens."""
    hidden = torch.arange(24, dtype=torch.float32).view(2, 6, 2)
    token_mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    importance = torch.tensor([[0.5, 0.1, 0.4, 0.2, 0.3, 0.05], [0.4, 0.3, 0.1, 0.2, 0.0, 0.0]])
    attention = torch.tensor([[0.3, 0.1, 0.2, 0.1, 0.2, 0.1], [0.4, 0.2, 0.3, 0.1, 0.0, 0.0]])
    return hidden, token_mask, importance, attention


def test_prune_keeps_the_first_token_and_the_most_important_tokens_in_order_and_fuses_the_rest():
    hidden, token_mask, importance, attention = hand_sequence()
    pruned = prune_tokens(hidden, token_mask, importance, attention, ratio=0.5, has_fusion=False)
    # Sample 0: 5 candidates, keep floor(2.5) = 2, the most important: slots 2 (0.4) and 4 (0.3), in slot order.
    # Sample 1: 3 candidates, keep 1: slot 1 (0.3); the second kept position is padding.
    torch.testing.assert_close(pruned.importance[1, :2], importance[1, [0, 1]])
    assert pruned.token_mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 1]]
    torch.testing.assert_close(pruned.hidden[0, :3], hidden[0, [0, 2, 4]])
    torch.testing.assert_close(pruned.hidden[1, :2], hidden[1, [0, 1]])
    # Fusion: the class-attention-weighted mean of the pruned tokens (sample 0: slots 1, 3, 5 with 0.1 each;
    # sample 1: slots 2 and 3 with 0.3 and 0.1).
    torch.testing.assert_close(pruned.hidden[0, 3], hidden[0, [1, 3, 5]].mean(dim=0))
    torch.testing.assert_close(pruned.hidden[1, 3], 0.75 * hidden[1, 2] + 0.25 * hidden[1, 3])
    torch.testing.assert_close(pruned.importance[0], torch.tensor([0.5, 0.4, 0.3, 0.1 + 0.2 + 0.05]))


def test_a_second_token_exit_fuses_the_previous_fusion_token_again():
    hidden, token_mask, importance, attention = hand_sequence()
    first = prune_tokens(hidden, token_mask, importance, attention, ratio=0.5, has_fusion=False)
    new_attention = torch.tensor([[0.4, 0.3, 0.1, 0.2], [0.5, 0.25, 0.0, 0.25]])
    second = prune_tokens(first.hidden, first.token_mask, first.importance, new_attention, ratio=0.5, has_fusion=True)
    # Sample 0: 2 candidates (the fusion slot is not one), keep 1: slot 1 (importance 0.4); fuse slot 2 and the old
    # fusion.
    torch.testing.assert_close(second.hidden[0, :2], first.hidden[0, [0, 1]])
    assert second.token_mask.tolist() == [[1, 1, 1], [1, 0, 1]]
    torch.testing.assert_close(second.hidden[0, 2], (0.1 * first.hidden[0, 2] + 0.2 * first.hidden[0, 3]) / 0.3)
    # Sample 1: 1 candidate, keep 0: the kept token and the old fusion token are fused, equally weighted.
    torch.testing.assert_close(second.hidden[1, 2], 0.5 * first.hidden[1, 1] + 0.5 * first.hidden[1, 3])


def test_nothing_to_fuse_leaves_the_fusion_slot_masked():
    hidden, token_mask, memory, attention = hand_sequence()
    kept_all = prune_tokens(hidden, token_mask, memory, attention, ratio=0.0, has_fusion=False)
    assert kept_all.token_mask.tolist() == [[1] * 6 + [0], [1, 1, 1, 1, 0, 0, 0]]
    torch.testing.assert_close(kept_all.hidden[0, :6], hidden[0])


def layer_output(layer, hidden, mask):
    output = layer(hidden, attention_mask=mask)
    return output[0] if isinstance(output, tuple) else output


def test_model_keeps_the_tokens_with_the_highest_class_attention_memory():
    model = tiny_model(**{**MPEE, "token_exit_layers": [2], "class_attention_momentum": 0.25})
    input_ids, attention_mask = mixed_length_batch(batch_size=4)
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        batch = start_batch(model, input_ids, attention_mask, None)
        hidden, mask = batch.hidden, batch.attention_mask
        layers = model.bert.encoder.layer
        first = class_attention(layers[0].attention.self, hidden, attention_mask)
        hidden = layer_output(layers[0], hidden, mask)
        second = class_attention(layers[1].attention.self, hidden, attention_mask)
        hidden = layer_output(layers[1], hidden, mask)
    memory = 0.75 * first + 0.25 * second  # A_m^2 = (1 - beta) A_m^1 + beta A_class^2, with A_m^1 = A_class^1
    pruned = out.hidden_states[2]  # after layer 2, pruned: [first; kept; fusion]
    for row in range(4):
        candidates = int(attention_mask[row].sum()) - 1
        keep = candidates // 2
        best = (memory[row, 1:] * attention_mask[row, 1:]).topk(keep).indices + 1
        torch.testing.assert_close(pruned[row, 1:1 + keep], hidden[row, best.sort().values])
        torch.testing.assert_close(pruned[row, 0], hidden[row, 0])


def test_token_lengths_follow_from_the_length_alone():
    # 10 tokens, R_ee 0.7 after layers 2 and 4 of 6: 9 candidates keep 2 (+ first + fusion = 4), then 2 candidates
    # keep 0 (first + fusion = 2).
    assert token_lengths(torch.tensor([10]), 0.7, [2, 4], 6)[:, 0].tolist() == [10, 10, 4, 4, 2, 2]
    assert token_lengths(torch.tensor([2]), 0.7, [2, 4], 6)[:, 0].tolist() == [2, 2, 2, 2, 2, 2]  # 1 candidate, fused
    assert token_lengths(torch.tensor([10]), 0.0, [2, 4], 6)[:, 0].tolist() == [10] * 6


def test_model_sequence_lengths_match_token_lengths(monkeypatch):
    model = tiny_model(**MPEE)
    input_ids, attention_mask = mixed_length_batch(batch_size=8)
    seen = []

    def recording(config, layer_number, layer, batch):
        run_layer(config, layer_number, layer, batch)
        seen.append(batch.token_mask.sum(dim=1))

    monkeypatch.setattr(modeling_de3, "run_layer", recording)
    with torch.no_grad():
        model(input_ids=input_ids, attention_mask=attention_mask)
    expected = token_lengths(attention_mask.sum(dim=1), 0.5, [1, 2], 4)
    assert torch.equal(torch.stack(seen[:-1]), expected[1:])  # after layer l, the sequence layer l + 1 runs on


def test_flops_count_the_shorter_sequences():
    model = tiny_model(**MPEE)
    config = model.config
    counter = FlopsCounter.from_config(config)
    hidden, inner, labels, heads = config.hidden_size, config.intermediate_size, config.num_labels, 2

    def layer(tokens):
        return 8 * tokens * hidden**2 + 4 * tokens**2 * hidden + 4 * tokens * hidden * inner

    head = 2 * hidden**2 + 2 * hidden * labels
    # 9 tokens: 8 candidates keep 4 after layer 1 (6 slots), 4 candidates keep 2 after layer 2 (4 slots).
    tokens = [9, 6, 4, 4]
    attention = [4 * hidden**2 + 2 * heads * hidden * count for count in tokens[:2]] + [0, 0]  # up to layer 2
    per_layer = [layer(count) + extra for count, extra in zip(tokens, attention)]
    length = torch.tensor([9])
    assert counter.early_exit(torch.tensor([1]), length).item() == sum(per_layer[:2]) + 2 * head
    assert counter.early_exit(torch.tensor([3]), length).item() == sum(per_layer) + 4 * head
    assert counter.full(length).item() == 4 * layer(9) + head  # the reference runs every token
    many = counter.early_exit(torch.tensor([[0, 3], [1, 1]]), torch.tensor([9, 9]))
    assert many.shape == (2, 2) and many[1, 0].item() == sum(per_layer[:2]) + 2 * head


def test_classifier_memory_recurrence():
    plain = tiny_model()
    remembering = tiny_model(exit_memory=0.9)  # same seed: same weights
    input_ids, attention_mask = mixed_length_batch(batch_size=4)
    with torch.no_grad():
        own = plain(input_ids=input_ids, attention_mask=attention_mask).exit_logits.transpose(0, 1)  # exit-first
        mixed = remembering(input_ids=input_ids, attention_mask=attention_mask).exit_logits.transpose(0, 1)
    expected = [own[0]]
    for logits in own[1:]:
        expected.append(0.1 * expected[-1] + 0.9 * logits)
    torch.testing.assert_close(mixed, torch.stack(expected))


def test_self_distillation_loss_on_hand_made_logits():
    students = torch.log(torch.tensor([[[0.5, 0.5]], [[0.9, 0.1]]]))
    teacher = torch.log(torch.tensor([[0.5, 0.5]]))
    kl = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)  # KL(student || teacher) of the second exit
    assert self_distillation_loss(students, teacher, 1.0).item() == pytest.approx(kl, rel=1e-5)
    assert self_distillation_loss(students[:1], teacher, 2.0).item() == pytest.approx(0.0, abs=1e-7)


def test_ensemble_teacher_is_an_attention_weighted_sum_of_the_exits():
    teacher = ExitEnsembleTeacher(num_labels=2, attention_size=4)
    exit_logits = torch.randn(3, 5, 2)
    with torch.no_grad():
        eta = teacher.context(torch.tanh(teacher.projection(exit_logits))).softmax(dim=0)
        torch.testing.assert_close(teacher(exit_logits), (eta * exit_logits).sum(dim=0))
        teacher.context.weight.zero_()  # equal attention: the mean of the exits
        torch.testing.assert_close(teacher(exit_logits), exit_logits.mean(dim=0))


def test_distillation_gradient_reaches_the_backbone_through_the_students():
    model = tiny_model(**MPEE).train()
    input_ids, attention_mask = mixed_length_batch(batch_size=6)
    out = model(input_ids=input_ids, attention_mask=attention_mask, labels=torch.arange(6) % 3,
                output_exit_signals=True)
    torch.testing.assert_close(out.loss, out.ce_loss + out.kd_loss + 0.01 * out.dar_loss)
    model.zero_grad()
    exit_first = out.exit_logits.transpose(0, 1)  # the losses take exit-first logits
    teacher = model.exit_teacher(exit_first.detach())
    self_distillation_loss(exit_first, teacher, 1.0).backward()
    assert model.bert.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0
    assert model.exit_classifiers[0].weight.grad.abs().sum() > 0
    assert model.exit_teacher.projection.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("policy_name", ["de3", "entropy", "patience"])
def test_compact_predict_early_with_token_exit_matches_the_replay(backbone, policy_name):
    model = train_prototypes(tiny_model(backbone, **MPEE))
    pad = model.config.pad_token_id
    input_ids, attention_mask = mixed_length_batch(batch_size=12, pad_token_id=pad)
    with torch.no_grad():
        full = model(input_ids=input_ids, attention_mask=attention_mask, output_exit_signals=True)
    base = get_exit_policy(policy_name, threshold=0.5, lam=1.0, patience=1)
    views = exit_views(full.exit_logits, model.config.exit_layers, full.entropy, full.distance_ratio)
    values = base.sweep_values(views)
    for value in (values[len(values) // 3], values[2 * len(values) // 3]):
        policy = base.with_value(value)
        replay = simulate_policy(policy, full.exit_logits, model.config.exit_layers, full.entropy,
                                 full.distance_ratio)
        compact = model.predict_early(input_ids, attention_mask, policy=policy)
        assert torch.equal(compact.sample_exit_layers, replay.sample_exit_layers)
        torch.testing.assert_close(compact.logits, replay.logits, atol=1e-5, rtol=1e-5)
    assert len(set(compact.sample_exit_layers.tolist())) > 1  # samples left at different layers
    # Each sample keeps its own tokens: alone and unpadded it gets the same answer.
    for row in range(12):
        length = int(attention_mask[row].sum())
        alone = model.predict_early(input_ids[row:row + 1, :length], attention_mask[row:row + 1, :length],
                                    policy=policy)
        assert alone.sample_exit_layers.item() == compact.sample_exit_layers[row].item()
        torch.testing.assert_close(alone.logits[0], compact.logits[row], atol=1e-5, rtol=1e-5)


def test_mpee_model_saves_and_loads(tmp_path):
    from transformers import AutoModelForSequenceClassification

    model = train_prototypes(tiny_model(**MPEE))
    model.save_pretrained(tmp_path)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert loaded.config.token_exit_layers == [1, 2] and loaded.config.training_objective == "mpee"
    input_ids, attention_mask = mixed_length_batch(batch_size=4)
    torch.testing.assert_close(loaded.predict_early(input_ids, attention_mask, threshold=0.5).logits,
                               model.predict_early(input_ids, attention_mask, threshold=0.5).logits)
    torch.testing.assert_close(loaded.exit_teacher.projection.weight, model.exit_teacher.projection.weight)


def test_config_checks_the_mpee_fields():
    for bad, message in ((dict(token_exit_ratio=1.0), "token_exit_ratio"),
                         (dict(token_exit_ratio=-0.1), "token_exit_ratio"),
                         (dict(token_exit_layers=[2, 1]), "token_exit_layers"),
                         (dict(token_exit_layers=[4]), "token_exit_layers"),
                         (dict(exit_memory=0.0), "exit_memory"), (dict(class_attention_momentum=1.5), "momentum"),
                         (dict(distillation_temperature=0.0), "distillation_temperature")):
        with pytest.raises(ValueError, match=message):
            tiny_model(**bad)
    assert tiny_model(num_hidden_layers=6).config.token_exit_layers == [2, 4]
    assert tiny_model(num_hidden_layers=12).config.token_exit_layers == [4, 8]
