"""What each head looks at: every head's own attention from the readout token(s), layer by layer.

GMAR weighs the heads of each layer; this is the attention those weights are applied to, one head at
a time, so that a head's weight can be read next to what the head attends to.
"""

from __future__ import annotations

import torch
from torch import nn

from gmar.methods import functional as Fn
from gmar.methods.base import Explainer, forward_pass


class _HeadAttention(Explainer):
    """The refusals and input checks of a forward-only method that reads the readout rows."""

    name = "head_attention"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)


def head_attention(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Each head's attention from the readout to the patches, in every layer: ``(B, L, H, h, w)``.

    Entry ``[b, l, h]`` is the readout row of head ``h``'s attention probabilities in layer ``l``
    (the rows the classifier reads, weighted as :meth:`TokenLayout.readout_weights` weighs them) on
    the patch grid ``(h, w)``; prefix columns are dropped. Class-agnostic: one forward pass, no
    gradient. The mean over heads of the last layer is :class:`gmar.RawAttention`'s token map.

    ``images`` is ``(B, 3, H, W)`` as the model takes it. Models without readout rows (attention
    pooling) or without global attention (Swin) are refused with :class:`gmar.UnsupportedModelError`.
    The model is left as it was found; calls on one model from several threads run one at a time.
    """
    explainer = _HeadAttention(model)
    images, layout = explainer.inputs(images)
    weights = layout.readout_weights(dtype=torch.float32, device=images.device)

    def reduce(layer: int, attention: torch.Tensor) -> torch.Tensor:
        return Fn.head_readout(attention.float(), weights)

    with forward_pass(
        explainer.adapter, images, layout, capture_options={}, reduce_attention=reduce, scored=False
    ) as run:
        rows = torch.stack(run.captured.attentions, dim=1)  # type: ignore[arg-type]
    return layout.patch_map(rows).detach()
