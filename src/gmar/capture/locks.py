"""One lock per model, and the frozen eval state a call runs in: what keeps calls on one model from
several threads apart, and leaves the model as it was found."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

#: One re-entrant lock per model object, created on first use; an entry goes when its model does.
_LOCKS: weakref.WeakKeyDictionary[nn.Module, threading.RLock] = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def lock_for(model: nn.Module) -> threading.RLock:
    """The lock that serialises gmar's use of ``model`` (the module itself under ``torch.compile``).

    Every piece of gmar that instruments a model or changes its state (hooks, instance
    ``forward``, fused-attention flags, attention implementation, modes, ``requires_grad``) or
    runs it while another call may have instrumented it holds this lock for the whole region.
    """
    module = getattr(model, "_orig_mod", model)
    with _LOCKS_GUARD:
        lock = _LOCKS.get(module)
        if lock is None:
            lock = _LOCKS[module] = threading.RLock()
        return lock


@contextmanager
def model_lock(model: nn.Module) -> Iterator[None]:
    """Hold ``model``'s lock (:func:`lock_for`) for the block.

    Calls on one model from several threads run one at a time; calls on different models do not
    wait for each other. The lock is re-entrant, so a thread that holds it may explain the model.
    """
    with lock_for(model):
        yield


@contextmanager
def frozen_eval(model: nn.Module) -> Iterator[None]:
    """Eval mode and ``requires_grad=False`` on every parameter for the block; both restored on exit.

    With frozen parameters no gradient can reach any ``.grad``, and autograd never computes one.
    Holds the model's lock (:func:`model_lock`) for the block.
    """
    with model_lock(model), _frozen_eval(model):
        yield


@contextmanager
def _frozen_eval(model: nn.Module) -> Iterator[None]:
    modes = [(module, module.training) for module in model.modules()]
    flags = [(param, param.requires_grad) for param in model.parameters()]
    try:
        model.eval()
        for param, _ in flags:
            param.requires_grad_(False)
        yield
    finally:
        for module, training in modes:
            module.training = training
        for param, requires_grad in flags:
            param.requires_grad_(requires_grad)
