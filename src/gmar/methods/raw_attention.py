"""Raw attention: the last layer's attention from the readout token(s), the baseline every rollout improves on.

``E = mean_h A_L[readout rows, patch columns]``: no residual, no earlier layer, no gradient.
"""

from __future__ import annotations

import torch
from torch import nn

from gmar.capture import Captured
from gmar.layout import TokenLayout
from gmar.methods import functional as Fn
from gmar.methods.base import Explainer
from gmar.methods.registry import register


@register
class RawAttention(Explainer):
    """The last layer's attention, mean over heads, readout rows, patch columns. Class-agnostic."""

    name = "raw_attention"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)

    def reduce_attention(self, layer: int, attention: torch.Tensor) -> torch.Tensor | None:
        return attention.float().mean(dim=1) if layer == self.adapter.num_layers - 1 else None

    def relevance(self, captured: Captured, reduced: list, layout: TokenLayout):
        return Fn.readout_map(reduced[-1], layout), None
