"""Model adapters: one per family, chosen from the model object."""

from __future__ import annotations

from torch import nn

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

ADAPTERS: tuple[type[ModelAdapter], ...] = (
    TimmAdapter,
    TimmEvaAdapter,
    TimmBeitAdapter,
    CaitAdapter,
    TimmRelPosAdapter,
    SwinAdapter,
    HFCLIPAdapter,
    Data2VecVisionAdapter,
    HFTimmWrapperAdapter,
    HFAdapter,
    OpenCLIPAdapter,
    TorchvisionAdapter,
)

SUPPORTED = (
    "timm VisionTransformer (vit_*, deit_*, register tokens, class_token=False with global_pool='avg', "
    "SigLIP's global_pool='map', hybrid patch embeddings, post-norm blocks), VisionTransformerDistilled, "
    "Eva (eva02_*, *_dinov3, vit_pe_*, *_rope_*), Beit (beit_*, beitv2_*), Cait, VisionTransformerRelPos, "
    "SwinTransformer(V2) (gradcam only); "
    "transformers ViTForImageClassification, ViTMSNForImageClassification, DeiTForImageClassification, "
    "DeiTForImageClassificationWithTeacher, Dinov2ForImageClassification, Dinov2WithRegistersForImageClassification, "
    "IJepaForImageClassification, BeitForImageClassification, Data2VecVisionForImageClassification, "
    "CLIPForImageClassification, SiglipForImageClassification, TimmWrapperForImageClassification, "
    "Swin(v2)ForImageClassification (gradcam only), the image-text models CLIPModel and SiglipModel, and the "
    "backbones ViTModel, ViTMSNModel, DeiTModel, Dinov2Model, Dinov2WithRegistersModel, IJepaModel, "
    "CLIPVisionModel(WithProjection), SiglipVisionModel (MetaClip2 and Siglip2 likewise); "
    "OpenCLIP CLIP and CoCa with a VisionTransformer image tower or a TimmModel tower on a timm trunk of those "
    "(SigLIP, EVA02-*, PE-Core-*); torchvision VisionTransformer (vit_b_16, vit_l_16, ...). "
    "docs/models.md lists every class"
)

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
    for adapter in ADAPTERS:
        if adapter.matches(model):
            return adapter(model)
    raise UnsupportedModelError(f"{type(model).__name__} is not a supported model. gmar supports: {SUPPORTED}")


__all__ = [
    "ADAPTERS",
    "CaitAdapter",
    "Data2VecVisionAdapter",
    "HFAdapter",
    "HFCLIPAdapter",
    "HFTimmWrapperAdapter",
    "ModelAdapter",
    "OpenCLIPAdapter",
    "SwinAdapter",
    "TimmAdapter",
    "TimmBeitAdapter",
    "TimmEvaAdapter",
    "TimmRelPosAdapter",
    "TorchvisionAdapter",
    "get_adapter",
]
