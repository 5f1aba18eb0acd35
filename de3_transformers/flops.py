"""FLOPs accounting of early exit (docs/method.md section 6): what the backbone layers, the exit heads and the exit
decisions cost, per sample, so a speed-up can be given in FLOPs beside the layer count.

Counted (a multiply-add is 2 FLOPs; biases, LayerNorm, softmax, activations and the embedding lookup are left out,
as they are under 1% of a layer), per sample with `L` attended tokens, hidden size `H`, intermediate size `I`:

- encoder layer: Q, K, V and output projections `8 L H^2`, attention scores and weighted sum `4 L^2 H`,
  feed-forward `4 L H I`;
- exit head: mean pooling `L H` (`exit_pooling="mean"`), the pooler's dense `2 H^2`, the classifier `2 H K`;
- DE3 decision (policies that read the distance ratio, below the top exit): prototypical network `2 H P` and the
  distances to the `K` prototypes `2 K P`;
- BERxiT decision (policies that read learning-to-exit scores): `2 H`;
- MPEE token exit (`token_exit_ratio > 0`): each layer runs on the tokens the sample still has (the lengths follow
  from the attended length alone, `token_exit.token_lengths`), plus, up to the last token-exit layer, the class
  attention of the layer's input, `4 H^2 + 2 heads H L` (`token_exit.class_attention`); mean pooling reads the
  shorter sequence.

The full model is every layer on every token plus one head (the last exit's), which is what the plain
`BertForSequenceClassification` runs. The paper's Table V counts the projections alone (1812M of its 1813.5M per
BERT-base layer at 128 tokens); the attention products add 50M here.
"""

from dataclasses import dataclass

import torch

from .token_exit import token_lengths


@dataclass(frozen=True)
class FlopsCounter:
    """The sizes that set the cost of a multi-exit model (docs/method.md section 6.2); build it with
    [`FlopsCounter.from_config`]."""

    hidden_size: int
    intermediate_size: int
    num_labels: int
    proto_dim: int
    exit_layers: tuple[int, ...]
    mean_pooling: bool
    num_heads: int = 1
    token_exit_ratio: float = 0.0
    token_exit_layers: tuple[int, ...] = ()

    @classmethod
    def from_config(cls, config) -> "FlopsCounter":
        return cls(config.hidden_size, config.intermediate_size, config.num_labels, config.proto_dim,
                   tuple(config.exit_layers), config.exit_pooling == "mean", config.num_attention_heads,
                   config.token_exit_ratio, tuple(config.token_exit_layers))

    @property
    def token_exit(self) -> bool:
        return self.token_exit_ratio > 0 and bool(self.token_exit_layers)

    @property
    def num_layers(self) -> int:
        return self.exit_layers[-1]

    def layer(self, lengths: torch.Tensor) -> torch.Tensor:
        """FLOPs of one encoder layer for samples of `lengths` tokens (float64, same shape)."""
        tokens, hidden = lengths.double(), self.hidden_size
        return 8 * tokens * hidden**2 + 4 * tokens**2 * hidden + 4 * tokens * hidden * self.intermediate_size

    def head(self, lengths: torch.Tensor) -> torch.Tensor:
        """FLOPs of one exit's pooling, pooler and classifier."""
        hidden = self.hidden_size
        pooling = lengths.double() * hidden if self.mean_pooling else torch.zeros_like(lengths, dtype=torch.float64)
        return pooling + 2 * hidden**2 + 2 * hidden * self.num_labels

    def decision(self, prototypes: bool, scores: bool) -> float:
        """FLOPs of an exit decision beyond the head: the prototypical network and distances, the LTE head."""
        cost = 0.0
        if prototypes:
            cost += 2 * self.hidden_size * self.proto_dim + 2 * self.num_labels * self.proto_dim
        if scores:
            cost += 2 * self.hidden_size
        return cost

    def full(self, lengths: torch.Tensor) -> torch.Tensor:
        """FLOPs of the full model per sample: every layer and the last exit's head."""
        return self.num_layers * self.layer(lengths) + self.head(lengths)

    def layer_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        """`[num_layers, N]`: the tokens each sample runs through every layer (fewer under token exit)."""
        if not self.token_exit:
            return lengths.expand(self.num_layers, -1)
        return token_lengths(lengths, self.token_exit_ratio, self.token_exit_layers, self.num_layers)

    def early_exit(
        self, first_exit: torch.Tensor, lengths: torch.Tensor, prototypes: bool = False, scores: bool = False
    ) -> torch.Tensor:
        """FLOPs per sample leaving at exit `first_exit` (index into `exit_layers`; `[N]` or `[T, N]`): the layers up
        to it, the head of every exit it passed and of its own, and the decision at every exit below the top it
        reached."""
        first_exit, lengths = first_exit.cpu(), lengths.cpu()
        tokens = self.layer_lengths(lengths)  # [M, N]
        per_layer = self.layer(tokens)
        if self.token_exit:  # class attention, up to the last token-exit layer
            attention = 4 * self.hidden_size**2 + 2 * self.num_heads * self.hidden_size * tokens.double()
            before_last = torch.arange(1, self.num_layers + 1) <= self.token_exit_layers[-1]
            per_layer = per_layer + attention * before_last[:, None]
        exit_rows = torch.tensor(self.exit_layers) - 1
        up_to_exit = per_layer.cumsum(dim=0)[exit_rows] + self.head(tokens[exit_rows]).cumsum(dim=0)  # [E, N]
        spent = up_to_exit.gather(0, first_exit.view(-1, lengths.numel())).view(first_exit.shape)
        decisions = torch.clamp(first_exit.double() + 1, max=len(self.exit_layers) - 1)  # the top answers undecided
        return spent + decisions * self.decision(prototypes, scores)

    def speedup(self, first_exit: torch.Tensor, lengths: torch.Tensor, prototypes: bool = False,
                scores: bool = False) -> torch.Tensor:
        """FLOPs speed-up over the samples (last dimension): full-model FLOPs / early-exit FLOPs, both summed."""
        spent = self.early_exit(first_exit, lengths, prototypes, scores).sum(dim=-1)
        return self.full(lengths.cpu()).sum() / spent


__all__ = ["FlopsCounter"]
