"""Model adapters: one per family, chosen from the model object."""

from __future__ import annotations

from torch import nn

from gmar.adapters.base import ModelAdapter
from gmar.adapters.hf_clip import HFCLIPAdapter
from gmar.adapters.hf_data2vec import Data2VecVisionAdapter
from gmar.adapters.hf_timm import HFTimmWrapperAdapter
from gmar.adapters.hf_vit import HFAdapter
from gmar.adapters.openclip_vit import OpenCLIPAdapter
from gmar.adapters.timm_vit import TimmAdapter
from gmar.adapters.torchvision_vit import TorchvisionAdapter
from gmar.errors import UnsupportedModelError

ADAPTERS: tuple[type[ModelAdapter], ...] = (
    TimmAdapter,
    HFCLIPAdapter,
    Data2VecVisionAdapter,
    HFTimmWrapperAdapter,
    HFAdapter,
    OpenCLIPAdapter,
    TorchvisionAdapter,
)

SUPPORTED = (
    "timm VisionTransformer (vit_*, deit_* incl. distilled, register tokens, global_pool='avg'); "
    "transformers ViTForImageClassification, DeiTForImageClassification(WithTeacher), "
    "Dinov2(WithRegisters)ForImageClassification, BeitForImageClassification, Data2VecVisionForImageClassification, "
    "CLIPModel, CLIPVisionModel(WithProjection), CLIPForImageClassification, MetaClip2 and SigLIP (2) equivalents, "
    "TimmWrapperForImageClassification; OpenCLIP CLIP with a VisionTransformer image tower; "
    "torchvision VisionTransformer (vit_b_16, ...)"
)


def get_adapter(model: nn.Module) -> ModelAdapter:
    """The adapter for ``model``; :class:`UnsupportedModelError` when no family matches."""
    if isinstance(model, ModelAdapter):
        return model
    # torch.compile wraps the module; hooks and flags belong on the original, which runs eagerly.
    model = getattr(model, "_orig_mod", model)
    for adapter in ADAPTERS:
        if adapter.matches(model):
            return adapter(model)
    raise UnsupportedModelError(f"{type(model).__name__} is not a supported model. gmar supports: {SUPPORTED}")


__all__ = [
    "ADAPTERS",
    "Data2VecVisionAdapter",
    "HFAdapter",
    "HFCLIPAdapter",
    "HFTimmWrapperAdapter",
    "ModelAdapter",
    "OpenCLIPAdapter",
    "TimmAdapter",
    "TorchvisionAdapter",
    "get_adapter",
]
