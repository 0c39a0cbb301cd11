"""``torch.nn.MultiheadAttention`` written out step by step, so gmar can capture what its fused
functional call never exposes (OpenCLIP's and torchvision's ViT blocks use it)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gmar.adapters.base import additive_mask
from gmar.capture import Recorder
from gmar.errors import CaptureError, UnsupportedModelError


def multihead_attention_layers(blocks, attribute: str, model_name: str, what: str) -> list[nn.MultiheadAttention]:
    """Each block's ``nn.MultiheadAttention`` (at ``block.<attribute>``, self-attention with one
    packed input projection); a block without one is refused, naming ``what`` gmar captures."""
    layers = []
    for index, block in enumerate(blocks):
        attn = getattr(block, attribute, None)
        if not isinstance(attn, nn.MultiheadAttention) or not attn._qkv_same_embed_dim:
            raise UnsupportedModelError(
                f"{model_name}: block {index} has {type(attn).__name__} attention; gmar captures {what}"
            )
        layers.append(attn)
    return layers


class ExplicitAttention:
    """``nn.MultiheadAttention.forward`` computed step by step, reporting probabilities and head outputs."""

    def __init__(self, attn: nn.MultiheadAttention, layer: int, recorder: Recorder) -> None:
        self.attn, self.layer, self.recorder = attn, layer, recorder

    def __call__(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        attn = self.attn
        if key_padding_mask is not None or is_causal:
            raise CaptureError("gmar's explicit attention does not take key_padding_mask or is_causal")
        if not attn.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        batch, tokens, width = query.shape
        heads = attn.num_heads
        w_q, w_k, w_v = attn.in_proj_weight.chunk(3)
        b_q, b_k, b_v = attn.in_proj_bias.chunk(3) if attn.in_proj_bias is not None else (None,) * 3

        def split(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
            return F.linear(x, weight, bias).view(batch, x.shape[1], heads, -1).transpose(1, 2)

        q, k, v = split(query, w_q, b_q), split(key, w_k, b_k), split(value, w_v, b_v)
        recorder, scale = self.recorder, q.shape[-1] ** -0.5
        if recorder.stream is not None:
            probabilities = None
            mask = additive_mask(attn_mask, q.dtype, keep_where_true=False)
            context = recorder.attend(self.layer, q, k, v, scale=scale, mask=mask)
        else:
            scores = (q * scale) @ k.transpose(-2, -1)
            if attn_mask is not None:
                if attn_mask.dtype == torch.bool:
                    scores = scores.masked_fill(attn_mask, float("-inf"))
                else:
                    scores = scores + attn_mask
            probabilities = F.dropout(scores.softmax(dim=-1), attn.dropout, training=attn.training)
            recorder.attention(self.layer, probabilities)
            context = probabilities @ v
        context = recorder.head_output(self.layer, context)
        output = attn.out_proj(context.transpose(1, 2).reshape(batch, tokens, width))
        if not attn.batch_first:
            output = output.transpose(0, 1)
        weights = None
        if need_weights and probabilities is not None:
            weights = probabilities.mean(dim=1) if average_attn_weights else probabilities
        return output, weights
