"""The model zoos gmar explains: one row per zoo, read by everything that needs a zoo fact.

:mod:`gmar.versions` checks a zoo's minimum version from here, :mod:`gmar.loading` parses model specs
and picks the loader, :func:`gmar.adapters.get_adapter` tries the adapters in the table's order, and
``gmar models`` (:mod:`gmar.frontends.models`) sweeps the installed zoos. Adding a zoo is a row here and
its adapter file (and a loader in :mod:`gmar.loading` if ``gmar --model`` should load it by name).
"""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class Zoo:
    """One model zoo."""

    #: the adapters' ``family`` and the prefix of a model spec (``timm`` in ``timm:vit_base_patch16_224``)
    family: str
    #: how users call it in messages
    label: str
    #: the distribution pip installs, and the oldest version gmar supports (``pyproject.toml``'s extra says the same)
    distribution: str
    minimum: str
    #: gmar's extra that installs it (``pip install 'gmar[EXTRA]'``)
    extra: str
    #: the module it is imported as
    module: str
    #: the adapters of its models, tried in this order (a more specific class before the general one)
    adapters: tuple[type[ModelAdapter], ...]
    #: what the refusal of an unknown model lists for this zoo
    supports: str
    #: how a model spec names one of its models (``timm:NAME``); None: ``load_model`` does not load it by name
    spec: str | None = None
    #: the name of its loader in :mod:`gmar.loading` (with ``spec``)
    loader: str | None = None
    #: its loader builds a class head of ``num_classes`` outputs (``--num-classes``)
    class_heads: bool = True


ZOOS: dict[str, Zoo] = {
    zoo.family: zoo
    for zoo in (
        Zoo(
            family="timm",
            label="timm",
            distribution="timm",
            minimum="1.0.15",
            extra="timm",
            module="timm",
            adapters=(TimmAdapter, TimmEvaAdapter, TimmBeitAdapter, CaitAdapter, TimmRelPosAdapter, SwinAdapter),
            supports=(
                "timm VisionTransformer (vit_*, deit_*, register tokens, class_token=False with global_pool='avg', "
                "SigLIP's global_pool='map', hybrid patch embeddings, post-norm blocks), VisionTransformerDistilled, "
                "Eva (eva02_*, *_dinov3, vit_pe_*, *_rope_*), Beit (beit_*, beitv2_*), Cait, VisionTransformerRelPos, "
                "SwinTransformer(V2) (gradcam only)"
            ),
            spec="timm:NAME",
            loader="_load_timm",
        ),
        Zoo(
            family="hf",
            label="Hugging Face",
            distribution="transformers",
            minimum="5.0",
            extra="hf",
            module="transformers",
            adapters=(SwinAdapter, HFCLIPAdapter, Data2VecVisionAdapter, HFTimmWrapperAdapter, HFAdapter),
            supports=(
                "transformers ViTForImageClassification, ViTMSNForImageClassification, DeiTForImageClassification, "
                "DeiTForImageClassificationWithTeacher, Dinov2ForImageClassification, "
                "Dinov2WithRegistersForImageClassification, "
                "IJepaForImageClassification, BeitForImageClassification, Data2VecVisionForImageClassification, "
                "CLIPForImageClassification, SiglipForImageClassification, TimmWrapperForImageClassification, "
                "Swin(v2)ForImageClassification (gradcam only), the image-text models CLIPModel and SiglipModel, and "
                "the backbones ViTModel, ViTMSNModel, DeiTModel, Dinov2Model, Dinov2WithRegistersModel, IJepaModel, "
                "CLIPVisionModel(WithProjection), SiglipVisionModel (MetaClip2 and Siglip2 likewise)"
            ),
            spec="hf:NAME_OR_PATH",
            loader="_load_hf",
        ),
        Zoo(
            family="openclip",
            label="OpenCLIP",
            distribution="open_clip_torch",
            minimum="3.0",
            extra="clip",
            module="open_clip",
            adapters=(OpenCLIPAdapter,),
            supports=(
                "OpenCLIP CLIP and CoCa with a VisionTransformer image tower or a TimmModel tower on a timm trunk "
                "of those (SigLIP, EVA02-*, PE-Core-*)"
            ),
            spec="openclip:ARCH/TAG",
            loader="_load_openclip",
            class_heads=False,
        ),
        Zoo(
            family="torchvision",
            label="torchvision",
            distribution="torchvision",
            minimum="0.13",
            extra="torchvision",
            module="torchvision",
            adapters=(TorchvisionAdapter,),
            supports="torchvision VisionTransformer (vit_b_16, vit_l_16, ...)",
        ),
    )
}


def adapters() -> tuple[type[ModelAdapter], ...]:
    """Every zoo's adapters in the table's order, each once (Swin's serves timm and Hugging Face)."""
    return tuple(dict.fromkeys(adapter for zoo in ZOOS.values() for adapter in zoo.adapters))


def supported() -> str:
    """What gmar explains, zoo by zoo, for the refusal of a model it does not."""
    return "; ".join(zoo.supports for zoo in ZOOS.values()) + ". docs/models.md lists every class"


def loadable() -> list[Zoo]:
    """The zoos :func:`gmar.load_model` loads by name, in the table's order."""
    return [zoo for zoo in ZOOS.values() if zoo.spec is not None]
