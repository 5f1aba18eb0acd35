"""Class prototypes of DE3-BERT and their sliding-average update (docs/method.md section 2, eq. 1)."""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class PrototypeMemory(nn.Module):
    """Holds `prototypes` `[num_exits - 1, K, proto_dim]` and `initialized` `[num_exits - 1, K]` (bool).

    Both are persistent buffers, so they are saved in `model.safetensors` beside the weights and restored bit for
    bit by `from_pretrained`. They change only through [`update`], never by gradient.
    """

    def __init__(self, num_exits: int, num_labels: int, proto_dim: int):
        super().__init__()
        self.register_buffer("prototypes", torch.zeros(num_exits, num_labels, proto_dim))
        self.register_buffer("initialized", torch.zeros(num_exits, num_labels, dtype=torch.bool))
        # With `defer_updates` (set by `DE3Trainer` for the length of training), batches only add their statistics
        # here and `apply_pending` updates once per optimizer step. Plain attributes, not buffers: never saved, and
        # never broadcast by DDP.
        self.defer_updates = False
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def all_initialized(self) -> bool:
        return bool(self.initialized.all())

    @staticmethod
    @torch.no_grad()
    def class_statistics(features: torch.Tensor, labels: torch.Tensor, num_labels: int):
        """Per-class sums of `features` `[E, B, P]` (float32, `[E, K, P]`) and class counts (`[K]`) of one batch."""
        one_hot = F.one_hot(labels, num_labels).float()
        return torch.einsum("ebp,bk->ekp", features.detach().float(), one_hot), one_hot.sum(dim=0)

    @torch.no_grad()
    def observe(self, features: torch.Tensor, labels: torch.Tensor, momentum: float) -> None:
        """Takes a labelled training batch's features `[E, B, P]`: updates now, or holds them with `defer_updates`."""
        sums, counts = self.class_statistics(features, labels, self.prototypes.shape[1])
        if not self.defer_updates:
            self.update(sums, counts, momentum)
        elif self._pending is None:
            self._pending = (sums, counts)
        else:
            self._pending = (self._pending[0] + sums, self._pending[1] + counts)

    @torch.no_grad()
    def apply_pending(self, momentum: float) -> None:
        """Updates from all statistics held since the last call (one optimizer step's micro-batches)."""
        if self._pending is not None:
            sums, counts = self._pending
            self._pending = None
            self.update(sums, counts, momentum)

    def discard_pending(self) -> None:
        """Drops the statistics held for an optimizer step that will not be taken (training stopped or failed)."""
        self._pending = None

    @torch.no_grad()
    def update(self, class_sums: torch.Tensor, class_counts: torch.Tensor, momentum: float) -> None:
        """`cp_k <- (1 - gamma) cp_k + gamma c_k` with `c_k` the class mean of the batch (docs/method.md eq. 1).

        A class absent from the batch keeps its prototype; the first observation of a class sets it to `c_k`.
        Under `torch.distributed` the sums and counts are all-reduced first, so every process forms the same
        centroids and holds identical prototypes.
        """
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            class_sums, class_counts = class_sums.clone(), class_counts.clone()
            dist.all_reduce(class_sums)
            dist.all_reduce(class_counts)
        present = class_counts > 0
        centroids = class_sums / class_counts.clamp_min(1.0)[None, :, None]
        previous = self.prototypes.float()
        blended = torch.where(
            self.initialized[..., None], (1.0 - momentum) * previous + momentum * centroids, centroids
        )
        self.prototypes.copy_(torch.where(present[None, :, None], blended, previous))
        self.initialized |= present[None, :]

    def uninitialized_pairs(self) -> list[tuple[int, int]]:
        """`(exit index, class)` pairs that no training batch has set yet."""
        return [tuple(pair) for pair in (~self.initialized).nonzero().tolist()]

    def require_initialized(self, exit_layers: list[int]) -> None:
        """Checks that every prototype was set by training, before anything reads the distance ratio.

        Args:
            exit_layers: the encoder layer of each exit (`config.exit_layers`), to name the missing pairs.

        Raises:
            RuntimeError: naming the (layer, class) pairs that were never set, and how to set them.
        """
        missing = self.uninitialized_pairs()
        if missing:
            described = ", ".join(f"(layer {exit_layers[m]}, class {k})" for m, k in missing[:6])
            raise RuntimeError(
                f"Prototypes are not initialised for {len(missing)} (exit, class) pairs: {described}"
                f"{', ...' if len(missing) > 6 else ''}. Fine-tune the model first (DE3 training sets them from "
                "labelled batches in train mode: Trainer, or model.train(); model(**batch, labels=labels)), "
                "or exit on entropy alone with lam=0."
            )


__all__ = ["PrototypeMemory"]
