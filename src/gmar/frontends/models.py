"""``gmar models``: which model classes gmar explains, measured on the installed zoos, not written by hand.

Every case builds a small, randomly initialised instance of one ViT-like class (a real model name with
fewer blocks and a smaller input), runs every method on two images, and records for each method
whether it was **explained** (a finite map of the input's size, from a token grid that covers the
input), **refused** (gmar's one-line :class:`~gmar.errors.UnsupportedModelError`, whose reason is
kept) or **failed** (anything else: a defect of gmar). ``docs/models.md`` is this module's output.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date

import torch
import torch.nn.functional as F
from torch import nn

from gmar.adapters import get_adapter
from gmar.adapters.zoos import ZOOS
from gmar.errors import UnsupportedModelError
from gmar.methods import available_methods, explain, get_method

EXPLAINED, REFUSED, FAILED = "explained", "refused", "failed"


@dataclass(frozen=True)
class Case:
    """One class (or variant of a class) of one zoo, and how to build a small instance of it."""

    zoo: str
    #: a real model name users know (the builder shrinks it), or the class itself for zoos without names
    example: str
    build: Callable[[], nn.Module]
    #: input side in pixels
    size: int
    #: what is special about this variant, shown beside the class name
    variant: str = ""


@dataclass(frozen=True)
class Outcome:
    status: str
    detail: str = ""


@dataclass
class Result:
    case: Case
    class_name: str
    outcomes: dict[str, Outcome] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------ cases


def _timm(name: str, variant: str = "", size: int = 64, **kwargs) -> Case:
    def build() -> nn.Module:
        import timm

        options = {"depth": 2, "img_size": size, "num_classes": 10, **kwargs}
        return timm.create_model(name, pretrained=False, **{k: v for k, v in options.items() if v is not None})

    return Case("timm", name, build, size, variant)


def timm_cases() -> list[Case]:
    swin = {"depth": None, "depths": (1, 1, 1, 1), "embed_dim": 32, "num_heads": (1, 2, 4, 8), "window_size": 4}
    return [
        _timm("vit_tiny_patch16_224", "class token"),
        _timm("vit_medium_patch16_gap_256", "average pooling, no class token"),
        _timm("vit_small_patch14_reg4_dinov2", "register tokens", size=56),
        _timm("vit_base_patch16_siglip_224", "attention pooling (map)", embed_dim=64, num_heads=4),
        _timm("deit_tiny_distilled_patch16_224", "distillation token"),
        _timm("deit3_small_patch16_224", "DeiT-III"),
        _timm("flexivit_small", "FlexiViT"),
        _timm("aimv2_large_patch14_224", "AIMv2", size=56, embed_dim=64, num_heads=4),
        _timm("vit_tiny_r_s16_p8_224", "hybrid: ResNet stem"),
        _timm("vit_base_mci_224", "hybrid: MobileCLIP convolutional stem"),
        _timm("vit_small_patch16_224", "post-norm blocks (ResPostBlock)", block_fn=_res_post_block()),
        _timm("eva02_tiny_patch14_224", "EVA-02: RoPE, SwiGLU", size=56),
        _timm("vit_base_patch16_rope_224", "RoPE ViT", embed_dim=64, num_heads=4),
        _timm("vit_small_patch16_dinov3", "DINOv3"),
        _timm("vit_pe_core_tiny_patch16_384", "Perception Encoder"),
        _timm("beit_base_patch16_224", "relative position bias", embed_dim=64, num_heads=4),
        _timm("vit_relpos_small_patch16_224", "relative position bias"),
        _timm("cait_xxs24_224", "class-attention layers", depth_token_only=1),
        _timm("xcit_tiny_12_p16_224", "cross-covariance attention"),
        _timm("naflexvit_base_patch16_gap", "NaFlex", embed_dim=64, num_heads=4),
        _timm("swin_tiny_patch4_window7_224", "hierarchical, windowed", **swin),
        _timm("swinv2_tiny_window8_256", "hierarchical, windowed", **swin),
    ]


def _res_post_block():
    import timm.models.vision_transformer as vit

    return vit.ResPostBlock


def _hf(class_name: str, config_name: str, variant: str = "", size: int = 32, **config) -> Case:
    def build() -> nn.Module:
        import transformers

        options = {
            "image_size": size,
            "patch_size": 8,
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 64,
            "num_labels": 5,
            **config,
        }
        options = {k: v for k, v in options.items() if v is not None}
        return getattr(transformers, class_name)(getattr(transformers, config_name)(**options))

    return Case("hf", class_name, build, size, variant)


def _hf_pair(class_name: str, config_name: str, variant: str = "", size: int = 32, **extra) -> Case:
    """A two-tower model (CLIP, SigLIP): tiny text and vision configs."""

    def build() -> nn.Module:
        import transformers

        tower = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}
        vision = {**tower, "image_size": size, "patch_size": 8}
        text = {**tower, "vocab_size": 99, "max_position_embeddings": 16}
        config = getattr(transformers, config_name)(text_config=text, vision_config=vision, **extra)
        return getattr(transformers, class_name)(config)

    return Case("hf", class_name, build, size, variant)


def _hf_timm_wrapper() -> Case:
    """transformers' ``TimmWrapperForImageClassification`` around a small timm ViT."""

    def build() -> nn.Module:
        from transformers import TimmWrapperConfig, TimmWrapperForImageClassification

        args = {"img_size": 32, "patch_size": 8, "depth": 2}
        config = TimmWrapperConfig(architecture="test_vit", model_args=args, num_labels=5)
        return TimmWrapperForImageClassification(config)

    return Case("hf", "TimmWrapperForImageClassification", build, 32, "timm ViT inside")


def hf_cases() -> list[Case]:
    swin = {"patch_size": 4, "embed_dim": 16, "depths": [1, 1], "num_heads": [1, 2], "window_size": 4}
    # Swin's config takes the ViT names as aliases of its own (num_attention_heads is num_heads)
    swin.update(hidden_size=None, num_hidden_layers=None, num_attention_heads=None, intermediate_size=None)
    return [
        _hf("ViTForImageClassification", "ViTConfig"),
        _hf("ViTMSNForImageClassification", "ViTMSNConfig"),
        _hf("DeiTForImageClassification", "DeiTConfig"),
        _hf("DeiTForImageClassificationWithTeacher", "DeiTConfig"),
        _hf("Dinov2ForImageClassification", "Dinov2Config", mlp_ratio=2),
        _hf("Dinov2WithRegistersForImageClassification", "Dinov2WithRegistersConfig", mlp_ratio=2),
        _hf("IJepaForImageClassification", "IJepaConfig"),
        _hf("ViTModel", "ViTConfig", "backbone"),
        _hf("DeiTModel", "DeiTConfig", "backbone"),
        _hf("Dinov2Model", "Dinov2Config", "backbone", mlp_ratio=2),
        _hf("BeitForImageClassification", "BeitConfig", use_mean_pooling=True),
        _hf("Data2VecVisionForImageClassification", "Data2VecVisionConfig", use_mean_pooling=True),
        _hf("CLIPVisionModel", "CLIPVisionConfig", "backbone"),
        _hf("CLIPVisionModelWithProjection", "CLIPVisionConfig", "backbone", projection_dim=16),
        _hf_pair("CLIPForImageClassification", "CLIPConfig", "classifier", num_labels=5),
        _hf_pair("CLIPModel", "CLIPConfig", "image and text", projection_dim=16),
        _hf("SiglipVisionModel", "SiglipVisionConfig", "backbone"),
        _hf_pair("SiglipForImageClassification", "SiglipConfig", "classifier", num_labels=5),
        _hf_pair("SiglipModel", "SiglipConfig", "image and text"),
        _hf_pair("MetaClip2Model", "MetaClip2Config", "image and text", projection_dim=16),
        _hf_pair("Siglip2ForImageClassification", "Siglip2Config", "classifier, NaFlex", num_labels=5),
        _hf_pair("Siglip2Model", "Siglip2Config", "image and text, NaFlex"),
        _hf_timm_wrapper(),
        _hf("SwinForImageClassification", "SwinConfig", "hierarchical, windowed", **swin),
        _hf("Swinv2ForImageClassification", "Swinv2Config", "hierarchical, windowed", **swin),
    ]


def _openclip(name: str, variant: str = "", **vision) -> Case:
    def build() -> nn.Module:
        import open_clip

        return _small_openclip(open_clip, name, vision)

    return Case("openclip", name, build, 0, variant)


def _small_openclip(open_clip, name: str, vision: dict) -> nn.Module:
    """``name``'s architecture with one text layer and two image blocks (a timm trunk built with depth 2)."""
    config = open_clip.get_model_config(name)
    text = {**config["text_cfg"], "layers": 1, "width": 64, "heads": 2}
    vision_cfg = dict(config["vision_cfg"])
    if "timm_model_name" not in vision_cfg:
        vision_cfg.update(layers=2, width=64, head_width=16, **vision)
    with _shallow_timm_trunks():
        if "multimodal_cfg" in config:
            multimodal = {**config["multimodal_cfg"], "layers": 1, "width": 64, "heads": 2, "attn_pooler_heads": 2}
            vision_cfg["attn_pooler_heads"] = 2
            return open_clip.CoCa(
                embed_dim=config["embed_dim"], multimodal_cfg=multimodal, vision_cfg=vision_cfg, text_cfg=text
            )
        kind = open_clip.CustomTextCLIP if config.get("custom_text") else open_clip.CLIP
        return kind(embed_dim=config["embed_dim"], vision_cfg=vision_cfg, text_cfg=text)


@contextmanager
def _shallow_timm_trunks() -> Iterator[None]:
    """OpenCLIP builds a timm trunk by name with no say over its depth: give it two blocks (building a
    full-size random trunk first would take most of the sweep's time)."""
    import open_clip.timm_model as towers

    create = towers.timm.create_model

    def shallow(name: str, *args, **kwargs) -> nn.Module:
        return create(name, *args, depth=2, **kwargs)

    towers.timm.create_model = shallow
    try:
        yield
    finally:
        towers.timm.create_model = create


def openclip_cases() -> list[Case]:
    return [
        _openclip("ViT-B-32", "VisionTransformer tower"),
        _openclip("ViT-B-16-SigLIP", "TimmModel tower: timm ViT, attention pooling"),
        _openclip("EVA02-B-16", "TimmModel tower: timm EVA-02"),
        _openclip("PE-Core-T-16-384", "TimmModel tower: Perception Encoder"),
        _openclip("MobileCLIP-B", "TimmModel tower: hybrid stem"),
        _openclip("ViTamin-S", "TimmModel tower: ViTamin"),
        _openclip("coca_ViT-B-32", "attentional pooler (CoCa)"),
    ]


def torchvision_cases() -> list[Case]:
    def build() -> nn.Module:
        from torchvision.models.vision_transformer import VisionTransformer

        return VisionTransformer(32, 8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64, num_classes=5)

    return [Case("torchvision", "vit_b_16", build, 32)]


CASES = {"timm": timm_cases, "hf": hf_cases, "openclip": openclip_cases, "torchvision": torchvision_cases}


def installed_zoos() -> list[str]:
    """The zoos of the table of zoos (:mod:`gmar.adapters.zoos`) that have cases here and are installed."""
    return [name for name, zoo in ZOOS.items() if name in CASES and importlib.util.find_spec(zoo.module) is not None]


def cases(zoos: Sequence[str] | None = None) -> list[Case]:
    """Every case of ``zoos`` (default: the installed ones)."""
    return [case for zoo in (zoos or installed_zoos()) for case in CASES[zoo]()]


# ------------------------------------------------------------------------------------------------ check


def check(case: Case, methods: Sequence[str] | None = None) -> Result:
    """Build ``case`` and run every method on two random images of its input size."""
    methods = list(methods or available_methods())
    torch.manual_seed(0)
    try:
        model = case.build().eval()
    except Exception as error:
        return Result(case, "—", {m: Outcome(FAILED, f"cannot build it: {_line(error)}") for m in methods})
    result = Result(case, _class_name(model))
    try:
        adapter = get_adapter(model)
    except UnsupportedModelError as error:
        result.outcomes = {m: Outcome(REFUSED, _line(error)) for m in methods}
        return result
    except Exception as error:
        result.outcomes = {m: Outcome(FAILED, _line(error)) for m in methods}
        return result
    size = case.size or adapter.preprocess_config().input_size[0]
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    target = None if adapter.is_classifier else _direction
    for method in methods:
        try:
            explanation = explain(model, images, method, target=target, **get_method(method).smoke_options)
        except UnsupportedModelError as error:
            result.outcomes[method] = Outcome(REFUSED, _line(error))
        except Exception as error:
            result.outcomes[method] = Outcome(FAILED, f"{type(error).__name__}: {_line(error)}")
        else:
            result.outcomes[method] = _judge(explanation, size)
    return result


def _direction(embedding: torch.Tensor) -> torch.Tensor:
    """A fixed direction in the embedding space, as a text prompt or a reference image would give."""
    direction = torch.linspace(-1.0, 1.0, embedding.shape[-1], dtype=embedding.dtype, device=embedding.device)
    return F.cosine_similarity(embedding, direction.expand_as(embedding), dim=-1)


def _judge(explanation, size: int) -> Outcome:
    """Explained, or failed where the map cannot be right: wrong shape, not finite, or from a token grid
    that leaves more than one token's width of the input uncovered."""
    heatmap, layout = explanation.heatmap, explanation.layout
    if tuple(heatmap.shape[-2:]) != (size, size):
        return Outcome(FAILED, f"the map is {tuple(heatmap.shape[-2:])} for a {size}x{size} input")
    if not (torch.isfinite(heatmap).all() and torch.isfinite(explanation.token_map).all()):
        return Outcome(FAILED, "the map is not finite")
    covered = [g * p for g, p in zip(layout.grid_size, layout.patch_size, strict=True)]
    if any(size - c >= p for c, p in zip(covered, layout.patch_size, strict=True)):
        return Outcome(FAILED, f"the token grid covers {covered[0]}x{covered[1]} px of a {size}x{size} input")
    return Outcome(EXPLAINED)


def _class_name(model: nn.Module) -> str:
    visual = getattr(model, "visual", None)
    if type(model).__module__.startswith("open_clip.") and visual is not None:
        inner = getattr(visual, "trunk", None)
        tower = type(visual).__name__ + (f"({type(inner).__name__})" if inner is not None else "")
        return f"{type(model).__name__} / {tower}"
    return type(model).__name__


def _line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    line = text[0] if text else type(error).__name__
    # the generic refusal lists every supported family: the table says that better
    return line.split(". gmar supports:")[0]


# ----------------------------------------------------------------------------------------------- report


SYMBOLS = {EXPLAINED: "✓", REFUSED: "–", FAILED: "✗"}
#: how every table ``markdown`` writes begins (so ``gmar models --out`` recognises its own file)
HEADER = "# Supported models\n\n"


def versions() -> dict[str, str]:
    found = {"torch": torch.__version__}
    for zoo in ZOOS.values():
        try:
            found[zoo.distribution] = importlib.metadata.version(zoo.distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def markdown(results: Sequence[Result], methods: Sequence[str] | None = None) -> str:
    """The coverage table: a row per case, a column per method, then each refusal's and failure's reason."""
    methods = list(methods or available_methods())
    lines = [
        *HEADER.splitlines(),
        f"Generated by `gmar models --out docs/models.md` on {date.today().isoformat()} with "
        + ", ".join(f"{name} {version}" for name, version in versions().items())
        + ". Each row is a small, randomly initialised instance of a real model's class (fewer blocks, a",
        "smaller input); each method ran on two images. ✓ explained (a finite map of the input's size from",
        "a token grid that covers it), – refused with a one-line reason (below), ✗ failed (a defect).",
        "",
    ]
    notes: dict[str, int] = {}
    for zoo in dict.fromkeys(r.case.zoo for r in results):
        lines += [
            f"## {zoo}",
            "",
            "| class | example | " + " | ".join(methods) + " |",
            "|---|---|" + "---|" * len(methods),
        ]
        for result in (r for r in results if r.case.zoo == zoo):
            cells = []
            for method in methods:
                outcome = result.outcomes.get(method, Outcome(FAILED, "not run"))
                mark = SYMBOLS[outcome.status]
                if outcome.status != EXPLAINED:
                    reason = outcome.detail.replace(f" for {method};", " for this method;")
                    number = notes.setdefault(reason, len(notes) + 1)
                    mark += f" [{number}]"
                cells.append(mark)
            name = result.class_name + (f" ({result.case.variant})" if result.case.variant else "")
            lines.append(f"| {name} | `{result.case.example}` | " + " | ".join(cells) + " |")
        lines.append("")
    if notes:
        lines += ["## Reasons", ""]
        lines += [f"{number}. {detail}" for detail, number in notes.items()]
        lines.append("")
    return "\n".join(lines)


def summary(results: Sequence[Result]) -> dict[str, int]:
    """How many cases are explained by every method, partly, or by none (refused or failed)."""
    counts = {"every method": 0, "some methods": 0, "none": 0, "failures": 0}
    for result in results:
        statuses = [o.status for o in result.outcomes.values()]
        explained = statuses.count(EXPLAINED)
        counts["every method" if explained == len(statuses) else "some methods" if explained else "none"] += 1
        counts["failures"] += statuses.count(FAILED)
    return counts
