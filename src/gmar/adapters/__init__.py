"""Model adapters: one file per family, chosen from the model object; :mod:`gmar.adapters.zoos` is the
table of zoos they belong to."""

from __future__ import annotations

from torch import nn

from gmar.adapters import zoos
from gmar.adapters.base import ModelAdapter
from gmar.adapters.hf_clip import HFCLIPAdapter
from gmar.adapters.hf_data2vec import Data2VecVisionAdapter
from gmar.adapters.hf_timm import HFTimmWrapperAdapter
from gmar.adapters.hf_vit import HFAdapter
from gmar.adapters.openclip_vit import OpenCLIPAdapter
from gmar.adapters.swin import SwinAdapter
from gmar.adapters.timm_beit import TimmBeitAdapter
from gmar.adapters.timm_cait import CaitAdapter
from gmar.adapters.timm_eva import TimmEvaAdapter
from gmar.adapters.timm_relpos import TimmRelPosAdapter
from gmar.adapters.timm_vit import TimmAdapter
from gmar.adapters.torchvision_vit import TorchvisionAdapter
from gmar.errors import UnsupportedModelError

#: every adapter, in the order :func:`get_adapter` tries them (the table of zoos' order)
ADAPTERS: tuple[type[ModelAdapter], ...] = zoos.adapters()

#: what gmar explains, as the refusal of an unknown model lists it
SUPPORTED = zoos.supported()

#: adapters registered from outside the package (:func:`register`), tried before the built-in ones
REGISTERED: list[type[ModelAdapter]] = []

#: Wrappers for data-parallel training: gmar explains the model they wrap.
PARALLEL_WRAPPERS = (nn.DataParallel, nn.parallel.DistributedDataParallel)


def get_adapter(model: nn.Module) -> ModelAdapter:
    """The adapter for ``model``; :class:`UnsupportedModelError` when no family matches."""
    if isinstance(model, ModelAdapter):
        return model
    # torch.compile wraps the module; hooks and flags belong on the original, which runs eagerly.
    model = getattr(model, "_orig_mod", model)
    if isinstance(model, PARALLEL_WRAPPERS):
        raise UnsupportedModelError(
            f"{type(model).__name__} is a wrapper for parallel training: pass `model.module` "
            "(the model it wraps) to gmar instead"
        )
    for adapter in (*REGISTERED, *ADAPTERS):
        if adapter.matches(model):
            return adapter(model)
    raise UnsupportedModelError(f"{type(model).__name__} is not a supported model. gmar supports: {SUPPORTED}")


def register(adapter: type[ModelAdapter]) -> type[ModelAdapter]:
    """Make :func:`get_adapter` (and so every method, metric and front end) recognise the models
    ``adapter.matches``; tried before the built-in adapters. Returns ``adapter``, so it works as a
    class decorator. A family of gmar's own is a file in this package and a row of :mod:`~gmar.adapters.zoos`."""
    if not isinstance(adapter, type) or not issubclass(adapter, ModelAdapter):
        raise TypeError(f"register takes a subclass of gmar.adapters.ModelAdapter, not {adapter!r}")
    if adapter not in REGISTERED:
        REGISTERED.insert(0, adapter)
    return adapter


def unregister(adapter: type[ModelAdapter]) -> None:
    """Undo :func:`register`."""
    try:
        REGISTERED.remove(adapter)
    except ValueError:
        raise ValueError(f"{adapter.__name__} is not registered") from None


__all__ = [
    "ADAPTERS",
    "CaitAdapter",
    "Data2VecVisionAdapter",
    "HFAdapter",
    "HFCLIPAdapter",
    "HFTimmWrapperAdapter",
    "ModelAdapter",
    "REGISTERED",
    "OpenCLIPAdapter",
    "SwinAdapter",
    "TimmAdapter",
    "TimmBeitAdapter",
    "TimmEvaAdapter",
    "TimmRelPosAdapter",
    "TorchvisionAdapter",
    "get_adapter",
    "register",
    "unregister",
]
