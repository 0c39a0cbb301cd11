"""Attention rollout (Abnar & Zuidema, *Quantifying Attention Flow in Transformers*, ACL 2020).

Eq. (rollout): ``Â_l = rownorm(Ā_l + I)`` with ``Ā_l`` the heads fused (mean, max or min), and
``R = Â_L ··· Â_1``; the map is the readout rows of ``R`` on the patch columns
(:func:`gmar.methods.functional.rollout_readout` multiplies the readout row in without forming ``R``).
:func:`gmar.methods.functional.rollout_map` is that last step, shared by every method that rolls layers
out (gradient rollout, GMAR).
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
class AttentionRollout(Explainer):
    """Attention rollout (Abnar & Zuidema 2020): heads fused, residual added, rows normalised,
    layers multiplied. Class-agnostic."""

    name = "rollout"

    def __init__(
        self,
        model: nn.Module,
        head_fusion: Fn.HeadFusion = "mean",
        discard_ratio: float = 0.0,
        residual: float = 1.0,
        start_layer: int = 0,
    ) -> None:
        super().__init__(model, start_layer=start_layer)
        Fn.fuse_heads(torch.zeros(1, 1, 1, 1), head_fusion)  # validate early
        Fn.check_discard_ratio(discard_ratio)
        self.head_fusion, self.discard_ratio, self.residual = head_fusion, discard_ratio, residual

    def reduce_attention(self, layer: int, attention: torch.Tensor) -> torch.Tensor | None:
        return Fn.fuse_heads(attention.float(), self.head_fusion) if layer >= self.start_layer else None

    def relevance(self, captured: Captured, reduced: list, layout: TokenLayout):
        return Fn.rollout_map(reduced[self.start_layer :], self.discard_ratio, self.residual, layout), None
