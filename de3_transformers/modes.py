"""Train / eval modes around inference: `predict_early` runs without dropout whatever mode the model is in, without
changing what another thread using the same model sees, and leaves every module in the mode it had (a frozen
`model.bert.eval()` inside a model in train mode stays frozen)."""

import threading
import weakref
from contextlib import contextmanager

import torch
from torch import nn


def _switch_to_eval(model: nn.Module) -> list[tuple[nn.Module, bool]]:
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    return modes


def _restore(modes: list[tuple[nn.Module, bool]]) -> None:
    for module, training in modes:
        module.training = training  # each module its own mode: `train()` would set the whole subtree alike


class _ModeGuard:
    """Calls on a model in eval mode run side by side; a call on a model in train mode waits for them, switches every
    module to eval, runs alone, and restores each module's own mode before anyone else starts. (Hand-written
    `model.train()` calls from other threads while inference runs are not guarded.)"""

    def __init__(self):
        self._condition = threading.Condition()
        self._running = 0  # calls running on the model in eval mode

    @contextmanager
    def evaluating(self, model: nn.Module):
        self._condition.acquire()
        try:
            while model.training and self._running:
                self._condition.wait()
            alone = model.training
        except BaseException:
            self._condition.release()
            raise
        if alone:  # keep the lock: nobody starts until every mode is back
            modes = _switch_to_eval(model)
            try:
                yield
            finally:
                _restore(modes)
                self._condition.release()
            return
        self._running += 1
        self._condition.release()
        try:
            yield
        finally:
            with self._condition:
                self._running -= 1
                if not self._running:
                    self._condition.notify_all()


_GUARDS: "weakref.WeakKeyDictionary[nn.Module, _ModeGuard]" = weakref.WeakKeyDictionary()
_GUARDS_LOCK = threading.Lock()


def without_dropout(model: nn.Module):
    """A context manager under which `model` runs with every module in eval mode, safely from several threads (see
    `_ModeGuard`); the fast path, a model already in eval mode, only counts the call."""
    # Kept beside the model, not on it: a lock on the model would break `copy.deepcopy` and pickling.
    guard = _GUARDS.get(model)
    if guard is None:
        with _GUARDS_LOCK:
            guard = _GUARDS.setdefault(model, _ModeGuard())
    return guard.evaluating(model)


@contextmanager
def eval_mode(model: nn.Module, device=None):
    """Runs a `with` block with every module of `model` in eval mode, moved to `device` if one is given, and puts
    each module's mode and the device back afterwards (for whole-dataset passes, not for concurrent use)."""
    # A model already in eval mode, with no device to move to, is touched not at all: switching modes and looking up
    # the device each walk the modules.
    home = model.device if device is not None else None
    moved = home is not None and torch.device(device) != home
    modes = _switch_to_eval(model) if model.training else None
    if moved:
        model.to(device)
    try:
        yield
    finally:
        if modes is not None:
            _restore(modes)
        if moved:
            model.to(home)


__all__ = ["eval_mode", "without_dropout"]
