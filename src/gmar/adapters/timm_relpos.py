"""timm ``VisionTransformerRelPos``: a ViT whose attention logits carry a relative position bias
(``RelPosAttention``, ``vit_relpos_*`` and ``vit_srelpos_*``). The bias goes to gmar's attention
core as its additive mask, so the maps are those of the model's own attention."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from gmar.adapters.timm_vit import TimmAdapter, streamed_core
from gmar.capture import Recorder


class TimmRelPosAdapter(TimmAdapter):
    """Everything but the attention is the plain timm ViT's: layout, pooling ('token' or 'avg'), readout,
    preprocessing. The model takes the input size its bias was built for (no ``dynamic_img_size``)."""

    captured_attention = "timm's RelPosAttention (vit_relpos_*, vit_srelpos_*)"

    @classmethod
    def model_classes(cls) -> tuple[type, ...]:
        from timm.models.vision_transformer_relpos import VisionTransformerRelPos

        return (VisionTransformerRelPos,)

    @classmethod
    def attention_classes(cls) -> tuple[type, ...]:
        from timm.models.vision_transformer_relpos import RelPosAttention

        return (RelPosAttention,)

    def streamed_forward(self, attn: nn.Module, layer: int, recorder: Recorder) -> Callable[..., torch.Tensor]:
        return partial(_streamed_attention, attn, layer, recorder)

    def post_norm_blocks(self) -> tuple[type, ...]:
        from timm.models.vision_transformer_relpos import ResPostRelPosBlock

        return (ResPostRelPosBlock,)


def _streamed_attention(
    attn: nn.Module, layer: int, recorder: Recorder, x: torch.Tensor, shared_rel_pos: torch.Tensor | None = None
) -> torch.Tensor:
    """``RelPosAttention.forward`` (eval mode) with the core computed by ``recorder.attend``; the
    relative position bias ``(1, H, N, N)`` (the block's own, else the shared one) is its additive mask."""
    batch, tokens, _ = x.shape
    q, k, v = attn.qkv(x).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    bias = attn.rel_pos.get_bias() if attn.rel_pos is not None else shared_rel_pos
    return streamed_core(attn, layer, recorder, q, k, v, bias)
