"""Tiny, randomly initialised models of the real classes of each supported family.

Weights are re-drawn with a fixed seed and a wide spread so that attention is peaked and differs
between heads and layers; near-uniform attention would let wrong pairings of layers, heads and
gradients go unnoticed.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

IMAGE = 32
PATCH = 8


def spread(model: nn.Module, seed: int = 0, scale: float = 0.6) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 0:
                continue
            noise = torch.randn(param.shape, generator=generator) * scale
            if param.ndim == 1 and ("norm" in name or "ln" in name or "layernorm" in name):
                param.copy_(1.0 + 0.2 * noise if name.endswith("weight") else 0.2 * noise)
            else:
                param.copy_(noise / max(1.0, param.shape[-1] ** 0.5) * 2.0)
    return model.eval()


def make_timm(**kwargs) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    options = dict(img_size=IMAGE, patch_size=PATCH, embed_dim=32, depth=3, num_heads=4, num_classes=5)
    options.update(kwargs)
    return spread(VisionTransformer(**options))


def make_timm_distilled(**kwargs) -> nn.Module:
    from timm.models.deit import VisionTransformerDistilled

    options = dict(img_size=IMAGE, patch_size=PATCH, embed_dim=32, depth=3, num_heads=4, num_classes=5)
    options.update(kwargs)
    return spread(VisionTransformerDistilled(**options))


def make_cait(**kwargs) -> nn.Module:
    """timm ``Cait``: two talking-heads self-attention layers over the patches, two class-attention layers."""
    from timm.models.cait import Cait

    options = dict(img_size=IMAGE, patch_size=PATCH, embed_dim=32, depth=2, depth_token_only=2, num_heads=4)
    options.update(kwargs)
    return spread(Cait(num_classes=5, **options))


def make_timm_relpos(**kwargs) -> nn.Module:
    """timm ``VisionTransformerRelPos``: a relative position bias (an MLP on log coordinates) in every attention."""
    from timm.models.vision_transformer_relpos import VisionTransformerRelPos

    options = dict(img_size=IMAGE, patch_size=PATCH, embed_dim=32, depth=3, num_heads=4, class_token=True)
    options.update(kwargs)
    return spread(VisionTransformerRelPos(num_classes=5, global_pool="token", **options))


def make_swin(kind: str) -> nn.Module:
    """Swin / Swin-v2 (timm or transformers): two stages (1 and 2 blocks), 2x2 windows, 4x4 tokens at the end."""
    stages = dict(patch_size=4, window_size=2, embed_dim=16)
    if kind in ("timm_swin", "timm_swinv2"):
        from timm.models.swin_transformer import SwinTransformer
        from timm.models.swin_transformer_v2 import SwinTransformerV2

        cls = SwinTransformer if kind == "timm_swin" else SwinTransformerV2
        return spread(cls(img_size=IMAGE, depths=(1, 2), num_heads=(2, 4), num_classes=5, **stages))
    from transformers import SwinConfig, SwinForImageClassification, Swinv2Config, Swinv2ForImageClassification

    config, cls = (
        (SwinConfig, SwinForImageClassification) if kind == "hf_swin" else (Swinv2Config, Swinv2ForImageClassification)
    )
    return spread(cls(config(image_size=IMAGE, depths=[1, 2], num_heads=[2, 4], num_labels=5, **stages)))


SWIN = ("timm_swin", "timm_swinv2", "hf_swin", "hf_swinv2")


def _hf_config(config_class, **kwargs):
    options = dict(
        image_size=IMAGE,
        patch_size=PATCH,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=5,
    )
    options.update(kwargs)
    return config_class(**options)


def make_hf_vit(**kwargs) -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    return spread(ViTForImageClassification(_hf_config(ViTConfig, **kwargs)))


def make_hf_deit_teacher(**kwargs) -> nn.Module:
    from transformers import DeiTConfig, DeiTForImageClassificationWithTeacher

    return spread(DeiTForImageClassificationWithTeacher(_hf_config(DeiTConfig, **kwargs)))


def make_hf_dinov2(**kwargs) -> nn.Module:
    from transformers import Dinov2Config, Dinov2ForImageClassification

    return spread(Dinov2ForImageClassification(_hf_config(Dinov2Config, mlp_ratio=2, **kwargs)))


def make_hf_dinov2_registers(**kwargs) -> nn.Module:
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersForImageClassification

    config = _hf_config(Dinov2WithRegistersConfig, mlp_ratio=2, num_register_tokens=2, **kwargs)
    return spread(Dinov2WithRegistersForImageClassification(config))


def make_hf_vit_msn(**kwargs) -> nn.Module:
    from transformers import ViTMSNConfig, ViTMSNForImageClassification

    return spread(ViTMSNForImageClassification(_hf_config(ViTMSNConfig, **kwargs)))


def make_hf_ijepa(**kwargs) -> nn.Module:
    from transformers import IJepaConfig, IJepaForImageClassification

    return spread(IJepaForImageClassification(_hf_config(IJepaConfig, **kwargs)))


def make_hf_vit_backbone(**kwargs) -> nn.Module:
    """``ViTModel`` with its pooler (a dense layer and tanh on the CLS token): explained through its pooled output."""
    from transformers import ViTConfig, ViTModel

    config = _hf_config(ViTConfig, **kwargs)
    return spread(ViTModel(config, add_pooling_layer=True))


def make_hf_dinov2_backbone(**kwargs) -> nn.Module:
    """``Dinov2Model``: its pooled output is the final-normed CLS token."""
    from transformers import Dinov2Config, Dinov2Model

    return spread(Dinov2Model(_hf_config(Dinov2Config, mlp_ratio=2, **kwargs)))


# Hugging Face CLIP / MetaCLIP 2 / SigLIP / SigLIP 2 / BEiT / Data2Vec / timm wrapper. The text towers take
# the real CLIP BPE ids (vocabulary 49408), so `hf_clip_tokenizer` drives them.
_HF_VISION = dict(image_size=IMAGE, patch_size=PATCH, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                  intermediate_size=64, projection_dim=16)  # fmt: skip
_HF_TEXT = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, vocab_size=49408,
                max_position_embeddings=16, projection_dim=16)  # fmt: skip


def make_hf_clip(kind: str = "CLIPModel", **vision) -> nn.Module:
    """``kind``: a CLIP, MetaClip2, Siglip or Siglip2 class name (``CLIPModel``, ``SiglipVisionModel``, ...)."""
    import transformers

    family = next(f for f in ("MetaClip2", "Siglip2", "Siglip", "CLIP") if kind.startswith(f))
    vision = {**_HF_VISION, **vision}
    if family == "Siglip2":  # NaFlex: a position grid of `num_patches`, resized to each input's grid
        vision["num_patches"] = (vision.pop("image_size") // PATCH) ** 2
    text, top = dict(_HF_TEXT), {}
    if family.startswith("Siglip"):
        text["projection_size"] = vision["hidden_size"]  # SigLIP's text head maps to the image embedding's width
    else:
        top["projection_dim"] = 16
    config = getattr(transformers, f"{family}Config")(vision_config=vision, text_config=text, num_labels=5, **top)
    if "Vision" in kind:
        config = config.vision_config
    return spread(getattr(transformers, kind)(config))


def make_hf_beit(kind: str = "Beit", **kwargs) -> nn.Module:
    """BEiT (relative position bias in every layer) or Data2Vec-vision (and a shared bias too); mean pooling."""
    import transformers

    options = dict(use_relative_position_bias=True, use_shared_relative_position_bias=kind == "Data2VecVision")
    config = _hf_config(getattr(transformers, f"{kind}Config"), **{**options, **kwargs})
    return spread(getattr(transformers, f"{kind}ForImageClassification")(config))


def make_hf_timm_wrapper() -> nn.Module:
    """transformers' ``TimmWrapperForImageClassification`` around a tiny timm ViT."""
    from transformers import TimmWrapperConfig, TimmWrapperForImageClassification

    args = dict(img_size=IMAGE, patch_size=PATCH, embed_dim=32, depth=3, num_heads=4)
    config = TimmWrapperConfig(architecture="test_vit", model_args=args, num_labels=5)
    return spread(TimmWrapperForImageClassification(config))


def hf_clip_tokenizer():
    """A transformers ``CLIPTokenizer`` built from OpenCLIP's bundled BPE merges (no network): the same ids."""
    import gzip
    from importlib.resources import files

    from open_clip.tokenizer import bytes_to_unicode
    from transformers import CLIPTokenizer

    lines = gzip.decompress((files("open_clip") / "bpe_simple_vocab_16e6.txt.gz").read_bytes()).decode().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    symbols = list(bytes_to_unicode().values())
    words = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab = {w: i for i, w in enumerate([*words, "<|startoftext|>", "<|endoftext|>"])}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=_HF_TEXT["max_position_embeddings"])


def make_clip(**vision) -> nn.Module:
    import open_clip

    vision_cfg = dict(image_size=IMAGE, patch_size=PATCH, width=32, layers=3, head_width=8)
    vision_cfg.update(vision)
    text_cfg = dict(context_length=8, vocab_size=64, width=16, heads=2, layers=1)
    return spread(open_clip.CLIP(embed_dim=16, vision_cfg=vision_cfg, text_cfg=text_cfg))


def make_siglip() -> nn.Module:
    """A SigLIP-style OpenCLIP model: a ``TimmModel`` tower whose timm ViT trunk has no class token
    and pools with an attention head (``global_pool="map"``), no extra projection."""
    import open_clip
    from timm.models.vision_transformer import VisionTransformer

    vision_cfg = dict(
        timm_model_name="test_vit", timm_model_pretrained=False, timm_pool="map", timm_proj="none", image_size=IMAGE
    )
    text_cfg = dict(context_length=8, vocab_size=64, width=16, heads=2, layers=1)
    model = open_clip.CLIP(embed_dim=32, vision_cfg=vision_cfg, text_cfg=text_cfg)
    # The registered timm trunk is too large for tests; put a tiny one of the same class in its place.
    model.visual.trunk = VisionTransformer(
        img_size=IMAGE,
        patch_size=PATCH,
        embed_dim=32,
        depth=3,
        num_heads=4,
        class_token=False,
        no_embed_class=True,
        global_pool="map",
        num_classes=0,
    )
    return spread(model)


def make_coca() -> nn.Module:
    """OpenCLIP ``CoCa`` (as ``coca_ViT-B-32``): a ViT tower whose attentional pooler (3 queries here, 256
    there) reads every token; the image embedding is the first query's output."""
    import open_clip

    vision_cfg = dict(
        image_size=IMAGE,
        patch_size=PATCH,
        width=32,
        layers=3,
        head_width=8,
        attentional_pool=True,
        attn_pooler_heads=4,
        attn_pooler_queries=3,
        output_tokens=True,
    )
    text_cfg = dict(context_length=8, vocab_size=64, width=16, heads=2, layers=1, embed_cls=True, output_tokens=True)
    multimodal_cfg = dict(context_length=8, vocab_size=64, width=16, heads=2, layers=1)
    return spread(open_clip.CoCa(embed_dim=16, multimodal_cfg=multimodal_cfg, text_cfg=text_cfg, vision_cfg=vision_cfg))


def make_clip_with_text(**vision) -> nn.Module:
    """A tiny OpenCLIP ``CLIP`` whose text tower takes the real tokenizer (vocabulary 49408, 77 tokens)."""
    import open_clip

    vision_cfg = dict(image_size=IMAGE, patch_size=PATCH, width=32, layers=3, head_width=8)
    vision_cfg.update(vision)
    text_cfg = dict(context_length=77, vocab_size=49408, width=16, heads=2, layers=1)
    return spread(open_clip.CLIP(embed_dim=16, vision_cfg=vision_cfg, text_cfg=text_cfg))


def clip_tokenizer():
    """OpenCLIP's own BPE tokenizer (its vocabulary ships with the package: no network)."""
    import open_clip

    return open_clip.get_tokenizer("ViT-B-32")


def clip_target(embedding: torch.Tensor) -> torch.Tensor:
    """A fixed direction in the embedding space, as a text prompt would give."""
    direction = torch.linspace(-1.0, 1.0, embedding.shape[-1], dtype=embedding.dtype, device=embedding.device)
    return torch.nn.functional.cosine_similarity(embedding, direction.expand_as(embedding), dim=-1)


def make_torchvision(**kwargs) -> nn.Module:
    from torchvision.models.vision_transformer import VisionTransformer

    options = dict(image_size=IMAGE, patch_size=PATCH, num_layers=3, num_heads=4, hidden_dim=32, mlp_dim=64)
    options.update(kwargs)
    return spread(VisionTransformer(num_classes=5, **options))


# ------------------------------------------------------------- timm Eva (RoPE) and Beit (relative position bias)


def make_eva(**kwargs) -> nn.Module:
    """EVA-02-like ``Eva``: the head reads the class token; absolute and rotary ('cat') positions;
    fused qkv with separate q/v biases; packed SwiGLU MLP."""
    from timm.models.eva import Eva

    options = dict(img_size=IMAGE, patch_size=PATCH, embed_dim=32, depth=3, num_heads=4, num_classes=5)
    options.update(mlp_ratio=4 * 2 / 3, swiglu_mlp=True, use_rot_pos_emb=True, ref_feat_shape=(4, 4))
    options.update(global_pool="token")
    options.update(kwargs)
    return spread(Eva(**options))


def make_eva_pe(**kwargs) -> nn.Module:
    """Perception-Encoder-like ``Eva`` (``vit_pe_core_*``): ``AttentionRope``, a norm before the blocks,
    'xy' rope grid with offset, attention pooling (``global_pool='map'``)."""
    options = dict(attn_type="rope", global_pool="map", use_pre_transformer_norm=True, rope_grid_offset=1.0)
    options.update(rope_grid_indexing="xy", attn_pool_num_heads=2, attn_pool_mlp_ratio=2.0, swiglu_mlp=False)
    options.update(kwargs)
    return make_eva(**options)


#: EVA-02 B/L: separate q/k/v, SwiGLU with its own norm, a norm inside attention, mean of patches
#: with fc_norm, any input size.
EVA02_LARGE = dict(qkv_fused=False, scale_mlp=True, scale_attn_inner=True, global_pool="avg", dynamic_img_size=True)
#: DINOv3: register tokens, its own rotate-half RoPE, no absolute positions, layer scale, mean of patches.
DINOV3 = dict(global_pool="avg", dynamic_img_size=True, qkv_bias=False, init_values=0.1, rope_type="dinov3")
DINOV3.update(rope_temperature=100, rope_rotate_half=True, use_abs_pos_emb=False, num_reg_tokens=2, use_fc_norm=False)
#: RoPE-Mixed ViT: AttentionRope, per-block, per-head learned frequencies, layer scale, the class token.
ROPE_MIXED = dict(attn_type="rope", rope_type="mixed", rope_temperature=10.0, rope_grid_indexing="xy")
ROPE_MIXED.update(use_abs_pos_emb=False, init_values=0.1)
#: Plain MLPs where the model family has them.
GELU_MLP = dict(swiglu_mlp=False, mlp_ratio=2)
#: BEiT with one bias shared by every block, absolute positions and the class token.
BEIT_SHARED = dict(use_rel_pos_bias=False, use_shared_rel_pos_bias=True, use_abs_pos_emb=True, global_pool="token")

EVA_BEIT = {
    "eva": make_eva,
    "eva_avg": lambda: make_eva(**EVA02_LARGE),
    "eva_dinov3": lambda: make_eva(**DINOV3, **GELU_MLP),
    "eva_rope_mixed": lambda: make_eva(**ROPE_MIXED, **GELU_MLP),
    "beit": lambda: make_beit(),  # its own relative position bias in every block, mean of patches
    "beit_shared": lambda: make_beit(**BEIT_SHARED),
}


def make_beit(**kwargs) -> nn.Module:
    from timm.models.beit import Beit

    options = dict(img_size=IMAGE, patch_size=PATCH, embed_dim=32, depth=3, num_heads=4, num_classes=5, mlp_ratio=2)
    options.update(use_abs_pos_emb=False, use_rel_pos_bias=True, init_values=0.1)
    options.update(kwargs)
    return spread(Beit(**options))


FACTORIES = {
    "timm": make_timm,
    "timm_distilled": make_timm_distilled,
    "timm_registers": lambda: make_timm(reg_tokens=2),
    "timm_avg": lambda: make_timm(class_token=False, global_pool="avg"),
    "hf_vit": make_hf_vit,
    "hf_deit_teacher": make_hf_deit_teacher,
    "hf_dinov2": make_hf_dinov2,
    "hf_dinov2_registers": make_hf_dinov2_registers,
    "hf_vit_msn": make_hf_vit_msn,
    "hf_ijepa": make_hf_ijepa,
    "hf_vit_backbone": make_hf_vit_backbone,
    "hf_dinov2_backbone": make_hf_dinov2_backbone,
    "openclip": make_clip,
    "torchvision": make_torchvision,
    **EVA_BEIT,
    "cait": make_cait,
    "timm_relpos": make_timm_relpos,
    # Hugging Face CLIP, MetaCLIP 2, SigLIP (2) classifiers, BEiT, Data2Vec, timm wrapper (issue 13)
    "hf_clip": make_hf_clip,
    "hf_clip_classifier": lambda: make_hf_clip("CLIPForImageClassification"),
    "hf_metaclip2_projection": lambda: make_hf_clip("MetaClip2VisionModelWithProjection"),
    "hf_siglip_classifier": lambda: make_hf_clip("SiglipForImageClassification"),
    "hf_siglip2_classifier": lambda: make_hf_clip("Siglip2ForImageClassification"),
    "hf_beit": make_hf_beit,
    "hf_data2vec": lambda: make_hf_beit("Data2VecVision"),
    "hf_timm_wrapper": make_hf_timm_wrapper,
}

#: attention-pooled models (SigLIP's head): only legrad and gradcam explain them, so they are not in FACTORIES
ATTENTION_POOLED = {
    "hf_siglip": lambda: make_hf_clip("SiglipModel"),
    "hf_siglip2_vision": lambda: make_hf_clip("Siglip2VisionModel"),
}

#: models whose output is an embedding, not class logits
EMBEDDING_MODELS = {"openclip", "hf_vit_backbone", "hf_dinov2_backbone", "hf_clip", "hf_metaclip2_projection"}


def target_for(name: str):
    """The target to explain with: a class for classifiers, a callable for CLIP and backbones."""
    return clip_target if name in EMBEDDING_MODELS else None


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(4, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1))


def one_error_line(capsys) -> str:
    """The single ``gmar: error: ...`` line a command printed on stderr (no traceback)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("gmar: error: ")
    return lines[0]
