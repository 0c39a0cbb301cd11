"""Hugging Face transformers ViTs: the classifiers of ViT, ViT-MSN, DeiT (with teacher), DINOv2 (with registers),
I-JEPA and BEiT, and the backbones (``ViTModel``, ``Dinov2Model``, ...), whose pooled output is explained.

BEiT's relative position bias reaches the attention as its additive mask, so gmar's streamed core adds it too."""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import partial
from typing import ClassVar

import torch
from torch import nn

from gmar.adapters.base import ModelAdapter, additive_mask, check_pooling, remove_all
from gmar.capture import Recorder, split_heads_hook
from gmar.errors import CaptureError, UnsupportedModelError
from gmar.layout import TokenLayout
from gmar.preprocess import PreprocessConfig


@dataclass(frozen=True)
class _Head:
    """How a class's head reads the tokens leaving the encoder's final norm."""

    #: prefix tokens before any registers (CLS; CLS and distillation for DeiT)
    prefix: int
    #: what the output is made of: "cls" (the first token), "teacher" (the mean of the CLS and
    #: distillation heads), "cls+mean" (CLS concatenated with the mean of the patch tokens), "mean"
    #: (the mean of all tokens, which are all patches), "pooler" (the backbone's pooler on the tokens,
    #: or the CLS token where it has none), "beit" (BEiT's pooler: the layer-normed mean of the patch
    #: tokens with ``use_mean_pooling``, else the CLS token, then the classifier)
    reads: str
    #: True for a backbone (``…Model``): its output is an embedding, explained through a callable target
    backbone: bool = False


_HEADS = {
    "ViTForImageClassification": _Head(1, "cls"),
    "ViTMSNForImageClassification": _Head(1, "cls"),
    "DeiTForImageClassification": _Head(2, "cls"),
    "DeiTForImageClassificationWithTeacher": _Head(2, "teacher"),
    "Dinov2ForImageClassification": _Head(1, "cls+mean"),
    "Dinov2WithRegistersForImageClassification": _Head(1, "cls+mean"),
    "IJepaForImageClassification": _Head(0, "mean"),
    "BeitForImageClassification": _Head(1, "beit"),
    "ViTModel": _Head(1, "pooler", backbone=True),
    "ViTMSNModel": _Head(1, "pooler", backbone=True),
    "DeiTModel": _Head(2, "pooler", backbone=True),
    "Dinov2Model": _Head(1, "pooler", backbone=True),
    "Dinov2WithRegistersModel": _Head(1, "pooler", backbone=True),
    "IJepaModel": _Head(0, "mean", backbone=True),
}


class HFAdapter(ModelAdapter):
    family = "hf"
    #: class name -> how its head reads the tokens (a subclass brings its own classes)
    heads: ClassVar[dict[str, _Head]] = _HEADS

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return type(model).__module__.startswith("transformers.") and any(
            klass.__name__ in cls.heads for klass in type(model).__mro__
        )

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self._kind = next(klass.__name__ for klass in type(model).__mro__ if klass.__name__ in self.heads)
        self._head = self.heads[self._kind]
        #: a backbone returns its pooled output, an embedding: targets are callables on it
        self.is_classifier = not self._head.backbone  # type: ignore[misc]
        self._attention = self._find_attention()
        expected = model.config.num_hidden_layers
        if len(self._attention) != expected:
            raise UnsupportedModelError(
                f"{type(model).__name__}: found {len(self._attention)} attention modules with an output projection "
                f"for {expected} layers; gmar supports the attention modules of transformers >= 5"
            )
        self._interpolate = "interpolate_pos_encoding" in inspect.signature(model.forward).parameters
        # The blocks: the module list whose i-th entry holds layer i's attention (its name varies by
        # model and version: `encoder.layer`, `layers`).
        self._blocks = next(
            (list(blocks) for blocks in model.base_model.modules() if self._holds_attention(blocks)), None
        )
        if self._blocks is None:
            raise UnsupportedModelError(f"{type(model).__name__}: cannot find the list of transformer blocks")

    def _find_attention(self) -> list[nn.Module]:
        """Each layer's attention module, in order: those of the attention interface (with ``o_proj``)."""
        attention_class = getattr(self.model, "_can_record_outputs", {}).get("attentions")
        return [
            module
            for module in self.model.modules()
            if isinstance(attention_class, type) and isinstance(module, attention_class) and hasattr(module, "o_proj")
        ]

    def _holds_attention(self, blocks: nn.Module) -> bool:
        if not isinstance(blocks, nn.ModuleList) or len(blocks) != len(self._attention):
            return False
        return all(any(m is attn for m in block.modules()) for block, attn in zip(blocks, self._attention, strict=True))

    @property
    def num_layers(self) -> int:
        return len(self._attention)

    def token_layout(self, image_size: tuple[int, int]) -> TokenLayout:
        config = self.model.config
        patch = config.patch_size if isinstance(config.patch_size, (tuple, list)) else (config.patch_size,) * 2
        head = self._head
        prefix = head.prefix + (getattr(config, "num_register_tokens", 0) or 0)
        reads = head.reads
        if reads == "beit":
            reads = "mean" if getattr(config, "use_mean_pooling", False) else "cls"
        if reads == "teacher":
            readout: tuple[int, ...] = (0, 1)
        elif reads == "mean":
            readout = ()
        else:
            readout = (0,)  # the class token (a pooler reads it too)
        return TokenLayout(
            num_prefix_tokens=prefix,
            grid_size=(image_size[0] // patch[0], image_size[1] // patch[1]),
            patch_size=tuple(patch),  # type: ignore[arg-type]
            readout_prefix=readout,
            readout_patches=reads in ("cls+mean", "mean"),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        kwargs = {}
        if self._interpolate:
            size = self.model.config.image_size
            size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
            kwargs["interpolate_pos_encoding"] = tuple(images.shape[-2:]) != size
        output = self.model(pixel_values=images, **kwargs)
        if not self._head.backbone:
            return output.logits
        return self._pool(output.last_hidden_state, output.pooler_output)

    def _pool(self, tokens: torch.Tensor, pooled: torch.Tensor | None = None) -> torch.Tensor:
        """A backbone's embedding from its final-normed tokens: its pooler's output, the CLS token
        where it has no pooler, the mean of the tokens for a model without a CLS token (I-JEPA)."""
        if self._head.reads == "mean":
            return tokens.mean(dim=1)
        if pooled is not None:
            return pooled
        pooler = getattr(self.model, "pooler", None)
        return pooler(tokens) if pooler is not None else tokens[:, 0]

    @contextmanager
    def instrument(self, recorder: Recorder) -> Iterator[None]:
        with instrument_attention(self.model, self._attention, self._merged_heads(), recorder):
            yield

    @property
    def blocks(self) -> Sequence[nn.Module]:
        return list(self._blocks)

    def first_norm(self, layer: int) -> nn.Module:
        block = self._blocks[layer]
        return block.layernorm_before if hasattr(block, "layernorm_before") else block.norm1

    def _merged_heads(self) -> list[tuple[nn.Module, int]]:
        """Each layer's module whose input is its heads' outputs concatenated, and its number of heads:
        where the capture splits (and head ablation switches off) the heads."""
        return [(attn.o_proj, attn.config.num_attention_heads) for attn in self._attention]

    def readout(self, tokens: torch.Tensor, pooling: str = "model") -> tuple[torch.Tensor, torch.Tensor | None]:
        check_pooling(self, pooling)
        model = self.model
        x = model.base_model.layernorm(tokens)
        reads = self._head.reads
        if self._head.backbone:
            return self._pool(x), None
        if reads == "teacher":
            return (model.cls_classifier(x[:, 0]) + model.distillation_classifier(x[:, 1])) / 2, None
        if reads == "cls+mean":
            patches = x[:, 1 + (getattr(model.config, "num_register_tokens", 0) or 0) :]
            return model.classifier(torch.cat([x[:, 0], patches.mean(dim=1)], dim=1)), None
        if reads == "mean":
            return model.classifier(x.mean(dim=1)), None
        if reads == "beit":
            return model.classifier(model.base_model.pooler(x)), None
        return model.classifier(x[:, 0]), None

    def preprocess_config(self) -> PreprocessConfig:
        config = self.model.config
        size = config.image_size
        size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        # The model carries no normalisation; these are its family's defaults. `gmar.load_model`
        # reads the saved image processor instead, where there is one.
        if self._kind in ("ViTForImageClassification", "ViTModel"):  # google/vit-*: mean and std 0.5
            return PreprocessConfig(
                input_size=size, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bilinear"
            )  # type: ignore[arg-type]
        return PreprocessConfig(input_size=size, interpolation="bicubic")  # type: ignore[arg-type]

    def class_names(self) -> list[str] | None:
        return class_names(self.model.config)


def class_names(config) -> list[str] | None:
    """The class names a transformers config carries (None for none, or only the default ``LABEL_i``)."""
    id2label = getattr(config, "id2label", None) or {}
    names = [id2label.get(i) for i in range(len(id2label))]
    if not names or any(n is None for n in names) or all(n == f"LABEL_{i}" for i, n in enumerate(names)):
        return None
    return names  # type: ignore[return-value]


STREAMED = "gmar_streamed"


@contextmanager
def instrument_attention(
    model: nn.Module, attention: Sequence[nn.Module], projections: Sequence[tuple[nn.Module, int]], recorder: Recorder
) -> Iterator[None]:
    """Make the attention modules of transformers' attention interface report to ``recorder``; undone on exit.

    ``model`` is the ``PreTrainedModel`` whose config the modules read (a CLIP model's vision tower);
    ``projections`` holds each layer's output projection and number of heads.
    """
    handles: list = []
    with ExitStack() as stack:
        previous = model.config._attn_implementation
        # sdpa and flash kernels return no probabilities: switch to eager for the call, or to
        # gmar's streamed core, which the attention modules call through the attention interface.
        wanted = _register_streamed_attention() if recorder.stream is not None else "eager"
        if previous != wanted:
            model.set_attn_implementation(wanted)
            stack.callback(model.set_attn_implementation, previous)
        stack.callback(remove_all(handles))
        for layer, (attn, (projection, heads)) in enumerate(zip(attention, projections, strict=True)):
            if recorder.stream is not None:
                attn._gmar_route = (recorder, layer)
                stack.callback(delattr, attn, "_gmar_route")
            else:
                handles.append(attn.register_forward_hook(partial(_record_probabilities, recorder, layer)))
            handles.append(projection.register_forward_pre_hook(split_heads_hook(layer, heads, recorder)))
        yield


def _register_streamed_attention() -> str:
    """Register gmar's attention function with transformers' attention interface; its name."""
    from transformers import AttentionInterface

    AttentionInterface.register(STREAMED, _streamed_attention)
    return STREAMED


def _streamed_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """An attention function of the interface (eval mode): ``(B, N, H, d)`` out, no probabilities."""
    route = getattr(module, "_gmar_route", None)
    if route is None:
        raise CaptureError(f"{type(module).__name__} ran gmar's attention outside a capture")
    recorder, layer = route
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    mask = additive_mask(attention_mask, query.dtype, keep_where_true=True)
    output = recorder.attend(layer, query, key, value, scale=scale, mask=mask)
    return output.transpose(1, 2).contiguous(), None


def _record_probabilities(recorder: Recorder, layer: int, module: nn.Module, args: tuple, output: tuple) -> None:
    probabilities = output[1] if isinstance(output, tuple) and len(output) > 1 else None
    if probabilities is not None:
        recorder.attention(layer, probabilities)
