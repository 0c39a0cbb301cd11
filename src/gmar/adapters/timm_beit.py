"""timm ``Beit`` (BEiT, BEiT v2): a relative position bias added to the attention logits.

The bias is each block's own (``use_rel_pos_bias``), one shared by every block
(``use_shared_rel_pos_bias``, handed to each block by the model), or both summed. gmar's streamed
core receives it as the additive mask, so its maps are of the model's own attention; the explicit
path reports the probabilities the model's unfused path forms. BEiT classifies from the mean of
the patch tokens (``global_pool='avg'``, the default) or from the class token (``'token'``).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from gmar.adapters.timm_vit import TimmAdapter, streamed_core
from gmar.capture import Recorder


class TimmBeitAdapter(TimmAdapter):
    captured_attention = "timm's BEiT `Attention` (beit_*, beitv2_*)"

    @classmethod
    def model_classes(cls) -> tuple[type, ...]:
        from timm.models.beit import Beit

        return (Beit,)

    @classmethod
    def attention_classes(cls) -> tuple[type, ...]:
        from timm.models.beit import Attention

        return (Attention,)

    def streamed_forward(self, attn: nn.Module, layer: int, recorder: Recorder) -> Callable[..., torch.Tensor]:
        return partial(_streamed_biased_attention, attn, layer, recorder)

    def post_norm_blocks(self) -> tuple[type, ...]:
        return ()


def _streamed_biased_attention(
    attn: nn.Module,
    layer: int,
    recorder: Recorder,
    x: torch.Tensor,
    shared_rel_pos_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """BEiT's ``Attention.forward`` (eval mode) with the core computed by ``recorder.attend``; the
    block's relative position bias ``(1, H, N, N)`` plus the shared one ``(H, N, N)`` is the mask."""
    batch, tokens, _ = x.shape
    bias = None if attn.q_bias is None else torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
    qkv = F.linear(x, attn.qkv.weight, bias).reshape(batch, tokens, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    mask = attn._get_rel_pos_bias() if attn.relative_position_bias_table is not None else None
    if shared_rel_pos_bias is not None:
        mask = shared_rel_pos_bias if mask is None else mask + shared_rel_pos_bias
    return streamed_core(attn, layer, recorder, q, k, v, mask)
