"""Class prototypes of DE3-BERT and their sliding-average update (docs/method.md section 2, eq. 1)."""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class PrototypeMemory(nn.Module):
    """Holds `prototypes` `[E, K, proto_dim]` and `initialized` `[E, K]` (bool) for the `E = num_exits - 1` exits below
    the top, and `exit_layers` `[E]`, the encoder layers of those exits.

    All three are persistent buffers, so they are saved in `model.safetensors` beside the weights and restored bit for
    bit by `from_pretrained`; `exit_layers` lets loading check that the heads run after the layers they were trained
    at. The prototypes change only through [`update`], never by gradient, and an uninitialised one stays zero.
    """

    def __init__(self, num_exits: int, num_labels: int, proto_dim: int, exit_layers: list[int] | None = None):
        super().__init__()
        self.register_buffer("prototypes", torch.zeros(num_exits, num_labels, proto_dim))
        self.register_buffer("initialized", torch.zeros(num_exits, num_labels, dtype=torch.bool))
        layers = list(range(1, num_exits + 1)) if exit_layers is None else list(exit_layers)
        self.register_buffer("exit_layers", torch.tensor(layers, dtype=torch.long).view(num_exits))
        # With `defer_updates` (set by `DE3Trainer` for the length of training), batches only add their statistics
        # here and `apply_pending` updates once per optimizer step. Plain attributes, not buffers: never saved, and
        # never broadcast by DDP.
        self.defer_updates = False
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self._usable_state = None  # the tensors and versions `require_usable` last passed
        self._recorded_layers = None  # `exit_layers` read to the host, with the tensor and version it was read from

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

        Raises:
            FloatingPointError: if the class sums are not finite (nothing is changed then).
        """
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            class_sums, class_counts = class_sums.clone(), class_counts.clone()
            dist.all_reduce(class_sums)
            dist.all_reduce(class_counts)
        if not torch.isfinite(class_sums.sum()):  # all-reduced: every process raises alike
            raise FloatingPointError(
                "A prototype update is not finite: the prototypical features of this batch hold NaN or inf, so the "
                "weights have diverged (learning rate too high, or an fp16 overflow; try a smaller learning rate or "
                "bf16). The prototypes were left as they were."
            )
        present = class_counts > 0
        centroids = class_sums / class_counts.clamp_min(1.0)[None, :, None]
        previous = self.prototypes.float()
        blended = torch.where(
            self.initialized[..., None], (1.0 - momentum) * previous + momentum * centroids, centroids
        )
        self.prototypes.copy_(torch.where(present[None, :, None], blended, previous))
        self.initialized |= present[None, :]

    def invalid_pairs(self) -> dict[str, list[tuple[int, int]]]:
        """The `(layer, class)` pairs whose prototype cannot be used, by reason: `"uninitialised"` (never set by
        training), `"not finite"` (NaN or inf) and `"zero"` (a zero vector marked initialised, which no class mean
        gives: its cosine distance says nothing). Empty when every prototype is usable; one host synchronisation then.
        """
        reasons = self._unusable()
        if not _union(reasons).any():
            return {}
        layers = self.exit_layers.tolist()
        pairs = {reason: [(layers[m], k) for m, k in mask.nonzero().tolist()] for reason, mask in reasons.items()}
        return {reason: found for reason, found in pairs.items() if found}

    def unusable_count(self) -> torch.Tensor:
        """How many prototypes `require_usable` would refuse (uninitialised, not finite, or zero), as a 0-d tensor on
        their device: no host synchronisation, so a caller can read it with the one it already has."""
        return _union(self._unusable()).sum()

    def _unusable(self) -> dict[str, torch.Tensor]:
        """`[exits, classes]` masks of the prototypes that cannot be used, by reason (see `invalid_pairs`)."""
        prototypes = self.prototypes.float()
        return {
            "uninitialised": ~self.initialized,
            "not finite": ~torch.isfinite(prototypes.sum(dim=-1)),  # a sum is finite exactly when every term is
            "zero": (prototypes == 0).all(dim=-1) & self.initialized,
        }

    def require_exit_layers(self, config_exit_layers: list[int], num_hidden_layers: int) -> None:
        """Checks that the config still puts the exits after the layers they were trained at (`exit_layers`, saved
        with the weights), on every call of `forward` and `predict_early`: `config.exit_layers` may be changed after
        loading, and each head would then read another layer than it learned. The buffer is read to the host once
        and again only when it changes, so a call costs a comparison of two short lists.

        Raises:
            ValueError: naming both lists and the fix.
        """
        key = (id(self.exit_layers), self.exit_layers._version)
        cached = self._recorded_layers
        if cached is None or cached[0] != key:
            cached = self._recorded_layers = (key, [*self.exit_layers.tolist(), num_hidden_layers])
        trained_at = cached[1]
        if list(config_exit_layers) != trained_at:
            raise ValueError(
                f"config.exit_layers is {list(config_exit_layers)}, but the exits were trained after layers "
                f"{trained_at} (prototype_memory.exit_layers): each head would read another layer than it learned. "
                f"Set model.config.exit_layers = {trained_at} again, or start from the backbone (from_backbone) and "
                "train exits at the layers you want."
            )

    def require_usable(self, recheck: bool = False) -> None:
        """Checks that every prototype was set by training and holds finite, non-zero values, before anything reads
        the distance ratio (`predict_early`, calibration). A passed check is remembered until the prototypes or the
        mask change (in place, by a load, or by moving the model), so serving pays for it once; `recheck=True`
        checks anew (a change through `.data` leaves the version counter as it was).

        Raises:
            RuntimeError: naming the (layer, class) pairs that are unusable, why, and what to do.
        """
        # Tensor version counters go up with every in-place change; moving or loading makes new tensors.
        state = (id(self.prototypes), self.prototypes._version, id(self.initialized), self.initialized._version)
        if state == self._usable_state and not recheck:
            return
        self._usable_state = None
        invalid = self.invalid_pairs()
        if not invalid:
            self._usable_state = state
            return
        if "uninitialised" in invalid:
            missing = invalid["uninitialised"]
            raise RuntimeError(
                f"Prototypes are not initialised for {len(missing)} (exit, class) pairs: {_describe(missing)}. "
                "Fine-tune the model first (DE3 training sets them from labelled batches in train mode: Trainer, or "
                "model.train(); model(**batch, labels=labels)), or exit on entropy alone with lam=0."
            )
        raise RuntimeError(
            f"Prototypes marked initialised are unusable: {describe_problems(invalid)}. The checkpoint is corrupted "
            "or training diverged (NaN weights); load a good checkpoint or train again. Entropy alone (lam=0) does "
            "not read them."
        )

    def inconsistent_pairs(self) -> dict[str, list[tuple[int, int]]]:
        """What training can never leave behind, by reason: a prototype marked initialised but not finite or zero,
        and one set while marked uninitialised. Empty when consistent."""
        invalid = self.invalid_pairs()
        found = {reason: pairs for reason, pairs in invalid.items() if reason != "uninitialised"}
        set_but_unmarked = (self.prototypes != 0).any(dim=-1) & ~self.initialized
        if set_but_unmarked.any():
            layers = self.exit_layers.tolist()
            found["set while marked uninitialised"] = [(layers[m], k) for m, k in set_but_unmarked.nonzero().tolist()]
        return found

    def require_finite(self) -> None:
        """Checks that no prototype holds NaN or inf (before saving, and after an update).

        Raises:
            FloatingPointError: naming the (layer, class) pairs, and the likely cause.
        """
        not_finite = self.invalid_pairs().get("not finite")
        if not_finite:
            raise FloatingPointError(
                f"Prototypes are not finite (NaN or inf) at {_describe(not_finite)}: training diverged (learning rate "
                "too high, or an fp16 overflow; try a smaller learning rate or bf16). Not saving or using them."
            )


def _describe(pairs: list[tuple[int, int]]) -> str:
    shown = ", ".join(f"(layer {layer}, class {label})" for layer, label in pairs[:6])
    return shown + (", ..." if len(pairs) > 6 else "")


def _union(masks: dict[str, torch.Tensor]) -> torch.Tensor:
    """Where any of the boolean `masks` holds."""
    return torch.stack(list(masks.values())).any(dim=0)


def describe_problems(problems: dict[str, list[tuple[int, int]]]) -> str:
    """`{reason: (layer, class) pairs}` (from `invalid_pairs` or `inconsistent_pairs`) as one line for an error."""
    return "; ".join(f"{reason} at {_describe(pairs)}" for reason, pairs in problems.items())


__all__ = ["PrototypeMemory", "describe_problems"]
