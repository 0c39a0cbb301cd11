"""OpenCLIP models: the ``VisionTransformer`` image tower (``nn.MultiheadAttention`` blocks), and the
``TimmModel`` tower with a timm ViT trunk (SigLIP-style, attention pooling)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager

import torch
from torch import nn

from gmar.adapters.base import ModelAdapter, check_pooling, override_forward
from gmar.adapters.mha import ExplicitAttention
from gmar.capture import Recorder
from gmar.errors import InputSizeError, UnsupportedModelError
from gmar.layout import TokenLayout
from gmar.preprocess import PreprocessConfig


class OpenCLIPAdapter(ModelAdapter):
    """The image tower of an OpenCLIP model; ``forward`` returns ``encode_image`` (not normalised).

    The output is an embedding, not logits, so targets must be callables on it (see
    :class:`gmar.TextTarget`). A ``TimmModel`` tower is handled through its timm trunk.
    """

    family = "openclip"
    is_classifier = False
    #: ``"all_tokens"``: the official LeGrad code's readout for CLIP towers, ``ln_post(mean of all tokens) @ proj``.
    extra_poolings = ("all_tokens",)

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return type(model).__module__.startswith("open_clip.")

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        from open_clip.timm_model import TimmModel
        from open_clip.transformer import VisionTransformer

        from gmar.adapters.timm_vit import TimmAdapter

        name = type(model).__name__
        visual = model if isinstance(model, (VisionTransformer, TimmModel)) else getattr(model, "visual", None)
        self._visual = visual
        self._trunk: TimmAdapter | None = None
        if isinstance(visual, TimmModel):
            if not TimmAdapter.matches(visual.trunk):
                raise UnsupportedModelError(
                    f"{name}: timm trunk {type(visual.trunk).__name__} is not supported; gmar explains "
                    "OpenCLIP timm towers whose trunk is a timm VisionTransformer"
                )
            self._trunk = TimmAdapter(visual.trunk)
            self.attention_pooled = self._trunk.attention_pooled
            self.extra_poolings = self._trunk.extra_poolings
            return
        if not isinstance(visual, VisionTransformer):
            tower = type(visual).__name__ if visual is not None else "no image tower"
            raise UnsupportedModelError(
                f"{name}: image tower {tower} is not supported; gmar explains OpenCLIP models whose "
                "`visual` is open_clip's VisionTransformer or a TimmModel with a timm ViT trunk"
            )
        if visual.attn_pool is not None or visual.pool_type not in ("tok", "avg"):
            raise UnsupportedModelError(f"{name}: attentional pooling (CoCa-style towers) is not supported")
        self._attention: list[nn.MultiheadAttention] = []
        for index, block in enumerate(visual.transformer.resblocks):
            attn = getattr(block, "attn", None)
            if not isinstance(attn, nn.MultiheadAttention) or not attn._qkv_same_embed_dim:
                raise UnsupportedModelError(
                    f"{name}: block {index} has {type(attn).__name__} attention; gmar captures "
                    "nn.MultiheadAttention blocks"
                )
            self._attention.append(attn)

    @property
    def num_layers(self) -> int:
        return self._trunk.num_layers if self._trunk else len(self._attention)

    def token_layout(self, image_size: tuple[int, int]) -> TokenLayout:
        if self._trunk:
            return self._trunk.token_layout(image_size)
        visual = self._visual
        patch = tuple(visual.conv1.kernel_size)
        grid = tuple(visual.grid_size)
        expected = (grid[0] * patch[0], grid[1] * patch[1])
        if tuple(image_size) != expected:
            raise InputSizeError(
                f"this OpenCLIP image tower takes {expected[0]}x{expected[1]} inputs, got "
                f"{image_size[0]}x{image_size[1]}"
            )
        average = visual.pool_type == "avg"
        return TokenLayout(
            num_prefix_tokens=1,
            grid_size=grid,  # type: ignore[arg-type]
            patch_size=patch,  # type: ignore[arg-type]
            readout_prefix=() if average else (0,),
            readout_patches=average,
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if hasattr(self.model, "encode_image"):
            output = self.model.encode_image(images)
        else:
            output = self.model(images)
        return output[0] if isinstance(output, tuple) else output

    @contextmanager
    def instrument(self, recorder: Recorder) -> Iterator[None]:
        if self._trunk:
            with self._trunk.instrument(recorder):
                yield
            return
        with ExitStack() as stack:
            for layer, attn in enumerate(self._attention):
                # nn.MultiheadAttention computes its probabilities inside one functional call with
                # nothing to hook: give this instance an explicit forward for the duration.
                override_forward(stack, attn, ExplicitAttention(attn, layer, recorder))
            yield

    @property
    def blocks(self) -> Sequence[nn.Module]:
        return self._trunk.blocks if self._trunk else list(self._visual.transformer.resblocks)

    def first_norm(self, layer: int) -> nn.Module:
        return self._trunk.first_norm(layer) if self._trunk else self._visual.transformer.resblocks[layer].ln_1

    def block_tokens(self, tensor: torch.Tensor) -> torch.Tensor:
        if self._trunk or getattr(self._visual.transformer, "batch_first", True):
            return tensor
        return tensor.transpose(0, 1)

    def readout(self, tokens: torch.Tensor, pooling: str = "model") -> tuple[torch.Tensor, torch.Tensor | None]:
        check_pooling(self, pooling)
        visual = self._visual
        if self._trunk:
            output, attention = self._trunk.readout(tokens, pooling)
            return visual.head(output), attention
        if pooling == "all_tokens":
            pooled = visual.ln_post(tokens.mean(dim=1))
        elif visual.final_ln_after_pool:
            pooled = visual.ln_post(_global_pool(visual, tokens))
        else:
            pooled = _global_pool(visual, visual.ln_post(tokens))
        return (pooled @ visual.proj if visual.proj is not None else pooled), None

    def preprocess_config(self) -> PreprocessConfig:
        from open_clip.model import get_model_preprocess_cfg

        cfg = get_model_preprocess_cfg(self.model)
        size = cfg.get("size", self._visual.image_size)
        size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        return PreprocessConfig(
            input_size=size,  # type: ignore[arg-type]
            mean=tuple(cfg.get("mean", (0.48145466, 0.4578275, 0.40821073))),  # type: ignore[arg-type]
            std=tuple(cfg.get("std", (0.26862954, 0.26130258, 0.27577711))),  # type: ignore[arg-type]
            interpolation=cfg.get("interpolation", "bicubic"),
        )


def _global_pool(visual: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """OpenCLIP's token pooling: the class token ('tok') or the mean of the patch tokens ('avg')."""
    return x[:, 0] if visual.pool_type == "tok" else x[:, 1:].mean(dim=1)
