"""Hugging Face ``Data2VecVisionForImageClassification``: BEiT's architecture, but its attention modules do
not go through transformers' attention interface (transformers 5 still builds the eager or the SDPA class
when the model is made, and no switch swaps it later). gmar gives each self-attention module a forward of
its own for the duration of a capture: the model's ``q, k, v`` and relative position biases (the layer's
own and the shared one), the bias added to the attention logits as the additive mask."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from functools import partial
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from gmar.adapters.base import override_forward, remove_all
from gmar.adapters.hf_vit import HFAdapter, _Head
from gmar.capture import Recorder, split_heads_hook


class Data2VecVisionAdapter(HFAdapter):
    """Data2Vec-vision classifiers, which read the layer-normed mean of the patch tokens (or the CLS token)."""

    heads: ClassVar[dict[str, _Head]] = {"Data2VecVisionForImageClassification": _Head(1, "beit")}

    def _find_attention(self) -> list[nn.Module]:
        from transformers.models.data2vec.modeling_data2vec_vision import Data2VecVisionSelfAttention

        return [m for m in self.model.modules() if isinstance(m, Data2VecVisionSelfAttention)]

    def _projections(self) -> list[nn.Module]:
        """Each layer's output projection (``Data2VecVisionSelfOutput.dense``), whose input is the heads' outputs."""
        return [block.attention.output.dense for block in self._blocks]

    def _merged_heads(self) -> list[tuple[nn.Module, int]]:
        """Each layer's module whose input is its heads' outputs concatenated, and its number of heads:
        where the capture splits (and head ablation switches off) the heads."""
        pairs = zip(self._projections(), self._attention, strict=True)
        return [(dense, attn.num_attention_heads) for dense, attn in pairs]

    @contextmanager
    def instrument(self, recorder: Recorder) -> Iterator[None]:
        handles: list = []
        with ExitStack() as stack:
            stack.callback(remove_all(handles))
            for layer, ((dense, heads), attn) in enumerate(zip(self._merged_heads(), self._attention, strict=True)):
                override_forward(stack, attn, partial(_self_attention, attn, layer, recorder))
                handles.append(dense.register_forward_pre_hook(split_heads_hook(layer, heads, recorder)))
            yield


def _self_attention(
    attn: nn.Module,
    layer: int,
    recorder: Recorder,
    hidden_states: torch.Tensor,
    output_attentions: bool = False,
    relative_position_bias: torch.Tensor | None = None,
    interpolate_pos_encoding: bool = False,
    resolution: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, ...]:
    """``Data2VecVisionSelfAttention.forward`` (eval mode), reporting the probabilities ``(B, H, N, N)`` or
    streaming the core through ``recorder.attend``; the biases enter the logits before the softmax."""
    batch, tokens, _ = hidden_states.shape
    heads, size = attn.num_attention_heads, attn.attention_head_size

    def split(linear: nn.Module) -> torch.Tensor:
        return linear(hidden_states).view(batch, tokens, heads, size).transpose(1, 2)

    q, k, v = split(attn.query), split(attn.key), split(attn.value)
    bias = None
    if attn.has_relative_position_bias:
        patch = attn.config.patch_size
        window = (resolution[0] // patch, resolution[1] // patch)  # type: ignore[index]
        bias = attn.relative_position_bias(window, interpolate_pos_encoding, dim_size=tokens)
    if relative_position_bias is not None:
        bias = relative_position_bias if bias is None else bias + relative_position_bias
    scale = size**-0.5
    probabilities = None
    if recorder.stream is not None:
        context = recorder.attend(layer, q, k, v, scale=scale, mask=bias)
    else:
        scores = (q * scale) @ k.transpose(-2, -1)
        if bias is not None:
            scores = scores + bias
        probabilities = F.dropout(scores.softmax(dim=-1), attn.dropout.p, training=attn.training)
        recorder.attention(layer, probabilities)
        context = probabilities @ v
    context = context.transpose(1, 2).reshape(batch, tokens, heads * size)
    return (context, probabilities) if output_attentions else (context,)
