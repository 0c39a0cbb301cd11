"""Hierarchical transformers: Swin and Swin-v2, in timm (``SwinTransformer``, ``SwinTransformerV2``)
and in transformers (``SwinForImageClassification``, ``Swinv2ForImageClassification``).

Their blocks attend within (shifted) windows, so there is no global token-to-token attention to roll
out: only Grad-CAM explains them, on the tokens of the last stage (gmar's layers are that stage's
blocks) with the stage's own grid. timm's blocks carry the tokens as ``(B, H', W', C)``, transformers'
as ``(B, H'·W', C)``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager

import torch
from torch import nn

from gmar.adapters.base import ModelAdapter, check_pooling, remove_all
from gmar.capture import Recorder
from gmar.errors import InputSizeError
from gmar.layout import TokenLayout
from gmar.preprocess import PreprocessConfig

_TIMM = ("SwinTransformer", "SwinTransformerV2")
_HF = ("SwinForImageClassification", "Swinv2ForImageClassification")


class SwinAdapter(ModelAdapter):
    family = "timm"  # "hf" for a transformers Swin (set per instance)
    no_global_attention = "attends within shifted windows"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        module = type(model).__module__
        names = {klass.__name__ for klass in type(model).__mro__}
        return (module.startswith("timm.") and bool(names & set(_TIMM))) or (
            module.startswith("transformers.") and bool(names & set(_HF))
        )

    def __init__(self, model: nn.Module) -> None:
        self._hf = type(model).__module__.startswith("transformers.")
        self.family = "hf" if self._hf else "timm"  # type: ignore[misc]  # before the base checks its version
        super().__init__(model)
        last_stage = model.base_model.encoder.layers[-1] if self._hf else model.layers[-1]
        self._blocks = list(last_stage.blocks)

    @property
    def num_layers(self) -> int:
        return len(self._blocks)

    def token_layout(self, image_size: tuple[int, int]) -> TokenLayout:
        name = type(self.model).__name__
        if self._hf:
            config = self.model.config
            stride = config.patch_size * 2 ** (len(config.depths) - 1)
            if image_size[0] % stride or image_size[1] % stride:
                raise InputSizeError(
                    f"{name}'s last stage has one token per {stride}x{stride} pixels; give it inputs whose sides are "
                    f"multiples of {stride} (got {image_size[0]}x{image_size[1]}), so its tokens tile the image"
                )
            grid = (image_size[0] // stride, image_size[1] // stride)
        else:
            expected = tuple(self.model.patch_embed.img_size)
            if tuple(image_size) != expected:
                raise InputSizeError(
                    f"{name} takes {expected[0]}x{expected[1]} inputs, got {image_size[0]}x{image_size[1]}; "
                    "resize the images"
                )
            grid = tuple(self.model.layers[-1].output_resolution)
        if image_size[0] % grid[0] or image_size[1] % grid[1]:
            raise InputSizeError(f"{name}: its {grid[0]}x{grid[1]} last-stage tokens do not tile a {image_size} input")
        return TokenLayout(
            num_prefix_tokens=0,
            grid_size=grid,  # type: ignore[arg-type]
            patch_size=(image_size[0] // grid[0], image_size[1] // grid[1]),
            readout_prefix=(),
            readout_patches=True,
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=images).logits if self._hf else self.model(images)

    @contextmanager
    def instrument(self, recorder: Recorder) -> Iterator[None]:
        handles: list = []
        with ExitStack() as stack:
            stack.callback(remove_all(handles))
            for layer, block in enumerate(self._blocks):

                def report(module: nn.Module, args: tuple, layer: int = layer) -> None:
                    recorder.no_attention(layer, self.block_tokens(args[0]).shape[1])

                handles.append(block.register_forward_pre_hook(report))
            yield

    @property
    def blocks(self) -> Sequence[nn.Module]:
        return list(self._blocks)

    def first_norm(self, layer: int) -> nn.Module:
        # The block itself: its input is the stage's tokens (Swin-v2 normalises after its attention).
        return self._blocks[layer]

    def block_tokens(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.flatten(1, 2) if tensor.ndim == 4 else tensor

    def readout(self, tokens: torch.Tensor, pooling: str = "model") -> tuple[torch.Tensor, torch.Tensor | None]:
        """The last block's output tokens (the block's own layout) through the final norm and head."""
        check_pooling(self, pooling)
        if not self._hf:
            return self.model.forward_head(self.model.norm(tokens)), None
        base = self.model.base_model
        pooled = base.pooler(base.layernorm(tokens).transpose(1, 2)).flatten(1)
        return self.model.classifier(pooled), None

    def preprocess_config(self) -> PreprocessConfig:
        if self._hf:
            size = self.model.config.image_size
            size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
            return PreprocessConfig(input_size=size)  # type: ignore[arg-type]
        from gmar.adapters.timm_vit import timm_preprocess_config

        return timm_preprocess_config(self.model)

    def class_names(self) -> list[str] | None:
        if self._hf:
            labels = getattr(self.model.config, "id2label", None) or {}
            return [labels[i] for i in range(len(labels))] if len(labels) == self.model.config.num_labels else None
        from gmar.adapters.timm_vit import timm_class_names

        return timm_class_names(self.model)
