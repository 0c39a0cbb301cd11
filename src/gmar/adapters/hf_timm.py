"""Hugging Face ``TimmWrapperForImageClassification``: a timm model inside transformers. gmar explains the
wrapped ``timm_model`` with the timm adapter; only the call goes through the wrapper."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager

import torch
from torch import nn

from gmar.adapters.base import ModelAdapter
from gmar.adapters.hf_vit import class_names
from gmar.adapters.timm_vit import TimmAdapter
from gmar.capture import Recorder
from gmar.errors import UnsupportedModelError
from gmar.layout import TokenLayout
from gmar.preprocess import PreprocessConfig


class HFTimmWrapperAdapter(ModelAdapter):
    family = "hf"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return type(model).__module__.startswith("transformers.") and any(
            klass.__name__ == "TimmWrapperForImageClassification" for klass in type(model).__mro__
        )

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        inner = model.timm_model
        if not TimmAdapter.matches(inner):
            raise UnsupportedModelError(
                f"{type(model).__name__}: the wrapped timm model {type(inner).__name__} is not supported; gmar "
                "explains wrapped timm VisionTransformers"
            )
        self._timm = TimmAdapter(inner)
        self.attention_pooled = self._timm.attention_pooled

    @property
    def num_layers(self) -> int:
        return self._timm.num_layers

    def token_layout(self, image_size: tuple[int, int]) -> TokenLayout:
        return self._timm.token_layout(image_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=images).logits

    def instrument(self, recorder: Recorder) -> AbstractContextManager[None]:
        return self._timm.instrument(recorder)

    @property
    def blocks(self) -> Sequence[nn.Module]:
        return self._timm.blocks

    def first_norm(self, layer: int) -> nn.Module:
        return self._timm.first_norm(layer)

    def readout(self, tokens: torch.Tensor, pooling: str = "model") -> tuple[torch.Tensor, torch.Tensor | None]:
        return self._timm.readout(tokens, pooling)

    def preprocess_config(self) -> PreprocessConfig:
        return self._timm.preprocess_config()

    def class_names(self) -> list[str] | None:
        return class_names(self.model.config)
