"""timm ``VisionTransformerRelPos``: a ViT whose attention logits carry a relative position bias
(``RelPosAttention``, ``vit_relpos_*`` and ``vit_srelpos_*``). The bias goes to gmar's attention
core as its additive mask, so the maps are those of the model's own attention."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from functools import partial

import torch
from torch import nn

from gmar.adapters.base import ModelAdapter, check_pooling, override_forward, remove_all
from gmar.adapters.timm_vit import pixels_per_token, timm_class_names, timm_preprocess_config
from gmar.capture import Recorder, split_heads_hook
from gmar.errors import InputSizeError, UnsupportedModelError
from gmar.layout import TokenLayout
from gmar.preprocess import PreprocessConfig


class TimmRelPosAdapter(ModelAdapter):
    family = "timm"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        if not type(model).__module__.startswith("timm."):
            return False
        from timm.models.vision_transformer_relpos import VisionTransformerRelPos

        return isinstance(model, VisionTransformerRelPos)

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        from timm.models.vision_transformer_relpos import RelPosAttention

        name = type(model).__name__
        if model.global_pool not in ("token", "avg"):
            raise UnsupportedModelError(
                f"{name}: global_pool={model.global_pool!r} is not supported; gmar explains relative-position "
                "ViTs that read the class token ('token') or average the patch tokens ('avg')"
            )
        self._attention: list[nn.Module] = []
        for index, block in enumerate(model.blocks):
            attn = getattr(block, "attn", None)
            if not isinstance(attn, RelPosAttention):
                raise UnsupportedModelError(
                    f"{name}: block {index} has {type(attn).__name__} attention; gmar captures timm's RelPosAttention"
                )
            self._attention.append(attn)

    @property
    def num_layers(self) -> int:
        return len(self._attention)

    def token_layout(self, image_size: tuple[int, int]) -> TokenLayout:
        embed = self.model.patch_embed
        expected = tuple(embed.img_size)
        if tuple(image_size) != expected:
            raise InputSizeError(
                f"{type(self.model).__name__} takes {expected[0]}x{expected[1]} inputs, got "
                f"{image_size[0]}x{image_size[1]}; resize the images (its relative position bias is built "
                "for that grid)"
            )
        token = self.model.global_pool == "token"
        return TokenLayout(
            num_prefix_tokens=self.model.num_prefix_tokens,
            grid_size=tuple(embed.grid_size),  # type: ignore[arg-type]
            patch_size=pixels_per_token(embed),
            readout_prefix=(0,) if token else (),
            readout_patches=not token,
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    @contextmanager
    def instrument(self, recorder: Recorder) -> Iterator[None]:
        handles: list = []
        with ExitStack() as stack:
            stack.callback(remove_all(handles))
            for layer, attn in enumerate(self._attention):
                if recorder.stream is not None:
                    override_forward(stack, attn, partial(_streamed_attention, attn, layer, recorder))
                else:
                    stack.callback(setattr, attn, "fused_attn", attn.fused_attn)
                    attn.fused_attn = False
                    handles.append(attn.attn_drop.register_forward_hook(partial(_record_output, recorder, layer)))
                handles.append(attn.proj.register_forward_pre_hook(split_heads_hook(layer, attn.num_heads, recorder)))
            yield

    @property
    def blocks(self) -> Sequence[nn.Module]:
        return list(self.model.blocks)

    def first_norm(self, layer: int) -> nn.Module:
        from timm.models.vision_transformer_relpos import ResPostRelPosBlock

        block = self.model.blocks[layer]
        # a post-norm block normalises the attention's output: the attention comes first
        return block.attn if isinstance(block, ResPostRelPosBlock) else block.norm1

    def head_projections(self) -> list[tuple[nn.Module, int]]:
        return [(attn.proj, attn.num_heads) for attn in self._attention]

    def readout(self, tokens: torch.Tensor, pooling: str = "model") -> tuple[torch.Tensor, torch.Tensor | None]:
        check_pooling(self, pooling)
        return self.model.forward_head(self.model.norm(tokens)), None

    def preprocess_config(self) -> PreprocessConfig:
        return timm_preprocess_config(self.model)

    def class_names(self) -> list[str] | None:
        return timm_class_names(self.model)


def _streamed_attention(
    attn: nn.Module, layer: int, recorder: Recorder, x: torch.Tensor, shared_rel_pos: torch.Tensor | None = None
) -> torch.Tensor:
    """``RelPosAttention.forward`` (eval mode) with the core computed by ``recorder.attend``; the
    relative position bias ``(1, H, N, N)`` is its additive mask."""
    batch, tokens, _ = x.shape
    q, k, v = attn.qkv(x).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    bias = attn.rel_pos.get_bias() if attn.rel_pos is not None else shared_rel_pos
    x = recorder.attend(layer, q, k, v, scale=attn.scale, mask=bias)
    return attn.proj_drop(attn.proj(x.transpose(1, 2).reshape(batch, tokens, -1)))


def _record_output(recorder: Recorder, layer: int, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
    recorder.attention(layer, output)
