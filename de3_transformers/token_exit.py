"""MPEE's token (horizontal) exit (docs/method.md section 5, paper 004 eqs. 5-8): class attention, the token importance
it accumulates across layers (the paper's class-attention memory `A_m`), and the pruning of the less important
tokens into one fusion token.

Layout of a pruned sequence: `[first token; kept tokens (padded per batch); fusion token]`. Each sample keeps its
own tokens, so the kept slots are padded to the batch's largest count and masked; the token mask (2D, 1 = attended)
says which slots are real. Position embeddings were added before the first layer, so reordering tokens is safe.
"""

from dataclasses import dataclass

import torch
from torch import nn


def class_attention(self_attention: nn.Module, hidden: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """`A_class` (docs/method.md section 5.1): the first token's attention row in `self_attention` (a
    `BertSelfAttention`-like module with `query`, `key`, `num_attention_heads`, `attention_head_size`), averaged over
    heads (paper 004 eq. 5).

    Computed from the layer's input without the keys of every token: the score of token `j` in head `h` is
    `q_h . (W_h x_j + b_h) = (W_h^T q_h) . x_j + q_h . b_h`, and the last term is the same for every `j`, so it drops
    out of the softmax. This costs `2 H^2 + 2 heads H T` instead of the `2 T H^2` of the keys (SDPA does not return
    attention weights, and the eager path would give up the fused kernel).

    Args:
        hidden: `[B, T, H]`, the input of the layer.
        token_mask: `[B, T]`, nonzero for attended tokens.

    Returns:
        `[B, T]` float32, rows summing to 1, 0 on masked tokens.
    """
    heads, size = self_attention.num_attention_heads, self_attention.attention_head_size
    query = self_attention.query(hidden[:, 0]).view(-1, heads, size)  # [B, heads, d]
    key_weight = self_attention.key.weight.view(heads, size, -1)  # [heads, d, H]
    folded = torch.einsum("bnd,ndh->bnh", query, key_weight)  # W_h^T q_h, [B, heads, H]
    scores = torch.einsum("bnh,bth->bnt", folded, hidden).float() * size**-0.5
    scores = scores.masked_fill(~token_mask.bool()[:, None, :], float("-inf"))
    return scores.softmax(dim=-1).mean(dim=1)


def running_average(previous: torch.Tensor | None, value: torch.Tensor, momentum: float) -> torch.Tensor:
    """`(1 - momentum) previous + momentum value` (docs/method.md sections 5.2 and 5.4; MPEE eqs. 6 and 10): the token
    importance across layers and the carried exit logits across exits. The first value starts the average."""
    if previous is None or momentum == 1:
        return value
    return (1 - momentum) * previous + momentum * value


def kept_counts(candidates: torch.Tensor, ratio: float) -> torch.Tensor:
    """`floor(N (1 - ratio))` for `N` candidate tokens (a tensor of counts), as integers (docs/method.md section
    5.3)."""
    return torch.floor(candidates.double() * (1 - ratio) + 1e-9).long()  # 1e-9: 10 * 0.3 must give 3, not 2


@dataclass
class PrunedTokens:
    """The sequence after a token exit."""

    hidden: torch.Tensor  # [B, T', H]
    token_mask: torch.Tensor  # [B, T'] long, 1 for real slots
    importance: torch.Tensor  # [B, T'] token importance (class-attention memory) of each slot


def prune_tokens(
    hidden: torch.Tensor,
    token_mask: torch.Tensor,
    importance: torch.Tensor,
    attention: torch.Tensor,
    ratio: float,
    has_fusion: bool,
) -> PrunedTokens:
    """MPEE's token exit (docs/method.md section 5.3). Keeps, per sample, the first token and the `floor(N (1 - ratio))`
    candidates of the highest importance, and fuses the others (and the previous fusion token, if any) into one fusion
    token: their class-attention- weighted mean, weights renormalised over the fused tokens so the fusion token has the
    scale of a token (the paper writes `sum_i alpha_i h_i` and leaves the normalisation open).

    Args:
        hidden: `[B, T, H]`, the layer's output.
        token_mask: `[B, T]`, nonzero for real slots.
        importance: `[B, T]`, the token importance (class-attention memory `A_m`) after this layer.
        attention: `[B, T]`, this layer's class attention `A_class` (the fusion weights).
        ratio: `R_ee` in [0, 1).
        has_fusion: whether the last slot is already a fusion token (it is then fused again, never kept).

    Returns:
        [`PrunedTokens`]; `N` counts the real slots except the first token and the fusion token.
    """
    batch, length, _ = hidden.shape
    real = token_mask.bool()
    positions = torch.arange(length, device=hidden.device)
    candidates = real & (positions > 0)
    if has_fusion:
        candidates = candidates & (positions < length - 1)
    keep = kept_counts(candidates.sum(dim=1), ratio)  # [B]
    # Rank the candidates by importance (others last); the `keep` best of each row stay, in their original order.
    # Traced for the ONNX export, which has no stable sort, the sort becomes ONNX TopK: it breaks ties by index too.
    tracing = torch.jit.is_tracing()
    scores = importance.float().masked_fill(~candidates, float("-inf"))
    order = scores.argsort(dim=1, descending=True) if tracing else scores.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, positions.expand(batch, -1))
    kept_mask = candidates & (rank < keep[:, None])
    slots = torch.where(kept_mask, positions, positions + length).argsort(dim=1)  # kept first, in order
    if tracing:  # a Python int would freeze the trace's width into the graph: select the columns with tensor ops
        slots = slots.index_select(1, (positions < keep.max()).nonzero().flatten())
    else:
        slots = slots[:, : int(keep.max())]  # the one host synchronisation of a token exit
    slot_real = torch.arange(slots.shape[1], device=hidden.device) < keep[:, None]

    fused = real & (positions > 0) & ~kept_mask  # pruned candidates and the previous fusion token
    weights = attention.float() * fused
    weights = weights / weights.sum(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    fusion = torch.einsum("bt,bth->bh", weights.to(hidden.dtype), hidden)
    fusion_real = fused.any(dim=1)

    gather = slots.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
    new_hidden = torch.cat([hidden[:, :1], hidden.gather(1, gather), fusion[:, None]], dim=1)
    new_mask = torch.cat([token_mask[:, :1].long(), slot_real.long(), fusion_real.long()[:, None]], dim=1)
    fused_importance = (importance * fused).sum(dim=1, keepdim=True)
    new_importance = torch.cat([importance[:, :1], importance.gather(1, slots), fused_importance], dim=1)
    return PrunedTokens(new_hidden, new_mask, new_importance)


def token_lengths(lengths: torch.Tensor, ratio: float, token_exit_layers, num_layers: int) -> torch.Tensor:
    """Tokens each sample runs through every layer under token exit (docs/method.md section 6.2): `[num_layers, N]` from
    its `N` attended tokens.

    The counts depend only on the length (which tokens are kept does not change how many), so FLOPs can be counted
    from lengths alone.
    """
    current = lengths.long().clone()
    fusion = torch.zeros_like(current)
    per_layer = []
    exits = set(token_exit_layers) if ratio > 0 else set()
    for layer in range(1, num_layers + 1):
        per_layer.append(current.clone())
        if layer in exits:
            candidates = current - 1 - fusion
            keep = kept_counts(candidates, ratio)
            fusion = ((candidates > keep) | (fusion > 0)).long()
            current = 1 + keep + fusion
    return torch.stack(per_layer)


__all__ = ["PrunedTokens", "class_attention", "kept_counts", "prune_tokens", "running_average", "token_lengths"]
