"""torchvision's ``VisionTransformer`` (``vit_b_16``, ``vit_l_32``, ``vit_h_14`` and friends): a class
token, learned position embeddings, pre-norm ``EncoderBlock``s over ``nn.MultiheadAttention``."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager

import torch
from torch import nn

from gmar.adapters.base import ModelAdapter, check_pooling, override_forward
from gmar.adapters.mha import ExplicitAttention, multihead_attention_layers
from gmar.capture import Recorder, Residual
from gmar.errors import InputSizeError, UnsupportedModelError
from gmar.layout import TokenLayout
from gmar.preprocess import PreprocessConfig


class TorchvisionAdapter(ModelAdapter):
    family = "torchvision"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        if not type(model).__module__.startswith("torchvision."):
            return False
        from torchvision.models.vision_transformer import VisionTransformer

        return isinstance(model, VisionTransformer)

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        name = type(model).__name__
        if not isinstance(model.conv_proj, nn.Conv2d):
            # conv_stem_configs: a stack of convolutions (ViTC) whose last layer is a 1x1 projection
            raise UnsupportedModelError(f"{name}: a convolutional stem (conv_stem_configs) is not supported")
        self._attention = multihead_attention_layers(
            model.encoder.layers, "self_attention", name, "torchvision's EncoderBlock with nn.MultiheadAttention"
        )

    @property
    def num_layers(self) -> int:
        return len(self._attention)

    def token_layout(self, image_size: tuple[int, int]) -> TokenLayout:
        side, patch = self.model.image_size, self.model.patch_size
        if tuple(image_size) != (side, side):
            raise InputSizeError(
                f"{type(self.model).__name__} takes {side}x{side} inputs, got {image_size[0]}x{image_size[1]}"
            )
        return TokenLayout(
            num_prefix_tokens=1,
            grid_size=(side // patch, side // patch),
            patch_size=(patch, patch),
            readout_prefix=(0,),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    @contextmanager
    def instrument(self, recorder: Recorder) -> Iterator[None]:
        with ExitStack() as stack:
            for layer, attn in enumerate(self._attention):
                # the fused functional call forms no probabilities: an explicit forward for the call
                override_forward(stack, attn, ExplicitAttention(attn, layer, recorder))
            yield

    @property
    def blocks(self) -> Sequence[nn.Module]:
        return list(self.model.encoder.layers)

    def first_norm(self, layer: int) -> nn.Module:
        return self.model.encoder.layers[layer].ln_1

    def relevance_modules(self) -> list[tuple[str, nn.Module]]:
        # The model's own forward applies nn.MultiheadAttention's out_proj functionally (its module never
        # runs), so a rule on the linear layers that run as modules (AttnLRP's γ) leaves it alone;
        # gmar's explicit attention calls it as a module, hence its kind of its own. Chefer et al.'s
        # z⁺ applies to it as to every linear layer.
        projections = {id(attn.out_proj) for attn in self._attention}
        return [("functional_linear" if id(m) in projections else kind, m) for kind, m in super().relevance_modules()]

    def residuals(self) -> list[Residual] | None:
        # Chefer et al.'s rules need a rule at every linear map, and nn.MultiheadAttention's in-projection
        # is a raw parameter applied functionally (no module to put the z⁺ rule on): not declared, so
        # transformer_attribution and partial_lrp refuse the model.
        return None

    def readout(self, tokens: torch.Tensor, pooling: str = "model") -> tuple[torch.Tensor, torch.Tensor | None]:
        check_pooling(self, pooling)
        return self.model.heads(self.model.encoder.ln(tokens)[:, 0]), None

    def preprocess_config(self) -> PreprocessConfig:
        # torchvision's ImageNet weights: resize to 256 (bilinear), centre-crop 224, ImageNet statistics
        side = self.model.image_size
        return PreprocessConfig(input_size=(side, side), interpolation="bilinear", crop_pct=224 / 256)
