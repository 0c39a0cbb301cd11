"""timm ``Eva``: EVA-02, DINOv3, Perception Encoder (``vit_pe_*``) and the ``*_rope_*`` ViTs.

Their attention rotates ``q`` and ``k`` of the patch tokens by a rotary position embedding (RoPE)
that the model computes once per forward pass and hands every block; prefix tokens (class,
registers) are not rotated. gmar's streamed core receives the rotated ``q, k``, so its maps are of
the model's own attention; the explicit path reports the probabilities the model's unfused path
forms. Token layout, pooling (class token, mean of patches, attention pooler), readout and
preprocessing are those of :class:`~gmar.adapters.timm_vit.TimmAdapter`.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from gmar.adapters.timm_vit import TimmAdapter, sdpa_mask, streamed_core
from gmar.capture import Recorder


class TimmEvaAdapter(TimmAdapter):
    captured_attention = "timm's `EvaAttention` and `AttentionRope` (EVA-02, DINOv3, PE, *_rope_* ViTs)"

    @classmethod
    def model_classes(cls) -> tuple[type, ...]:
        from timm.models.eva import Eva

        return (Eva,)

    @classmethod
    def attention_classes(cls) -> tuple[type, ...]:
        from timm.layers import AttentionRope
        from timm.models.eva import EvaAttention

        return (EvaAttention, AttentionRope)

    def streamed_forward(self, attn: nn.Module, layer: int, recorder: Recorder) -> Callable[..., torch.Tensor]:
        return partial(_streamed_rope_attention, attn, layer, recorder)

    def post_norm_blocks(self) -> tuple[type, ...]:
        from timm.models.eva import EvaBlockPostNorm

        return (EvaBlockPostNorm,)


def _streamed_rope_attention(
    attn: nn.Module,
    layer: int,
    recorder: Recorder,
    x: torch.Tensor,
    rope: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
) -> torch.Tensor:
    """``EvaAttention.forward`` / ``AttentionRope.forward`` (eval mode) with the core computed by
    ``recorder.attend`` from the rotated ``q, k``. ``rope`` is the block's sin/cos table for the
    patch tokens, ``(N - prefix, 2 d)`` (or with leading head/batch axes)."""
    from timm.layers import apply_rot_embed_cat

    batch, tokens, _ = x.shape
    heads = attn.num_heads
    kv_heads = getattr(attn, "num_kv_heads", heads)
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    if attn.qkv is not None:
        # EvaAttention keeps the q/v biases apart (k has none); AttentionRope's fused layer has its own.
        bias = attn.qkv.bias
        if getattr(attn, "q_bias", None) is not None:
            bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
        qkv = F.linear(x, attn.qkv.weight, bias).reshape(batch, tokens, 3, heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
    else:
        q = attn.q_proj(x).reshape(batch, tokens, heads, -1).transpose(1, 2)
        k = attn.k_proj(x).reshape(batch, tokens, kv_heads, -1).transpose(1, 2)
        v = attn.v_proj(x).reshape(batch, tokens, kv_heads, -1).transpose(1, 2)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if rope is not None:
        prefix, half = attn.num_prefix_tokens, attn.rotate_half
        q = torch.cat([q[:, :, :prefix], apply_rot_embed_cat(q[:, :, prefix:], rope, half=half)], dim=2).type_as(v)
        k = torch.cat([k[:, :, :prefix], apply_rot_embed_cat(k[:, :, prefix:], rope, half=half)], dim=2).type_as(v)
    if kv_heads != heads:  # grouped-query attention: head h reads key/value head h // group
        k = k.repeat_interleave(heads // kv_heads, dim=1)
        v = v.repeat_interleave(heads // kv_heads, dim=1)
    return streamed_core(attn, layer, recorder, q, k, v, sdpa_mask(attn_mask, is_causal, q), gate)
