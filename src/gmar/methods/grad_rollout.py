"""Gradient rollout (as in Chefer et al.'s and vit-explain's baselines): attention rollout of the
gradient-weighted attention.

Per layer ``Ā_l = mean_h ReLU(A_l ⊙ ∂y/∂A_l)`` (GAE's Eq. 5, :func:`gmar.methods.functional.gradient_weighted`),
then rollout's ``R = rownorm(Ā_L + I) ··· rownorm(Ā_1 + I)`` (:func:`gmar.methods.functional.rollout_map`).
"""

from __future__ import annotations

from torch import nn

from gmar.capture import Captured
from gmar.layout import TokenLayout
from gmar.methods import functional as Fn
from gmar.methods.base import GradientWeightedAttention
from gmar.methods.registry import register


@register
class GradientRollout(GradientWeightedAttention):
    """Rollout of ``mean_h ReLU(A_l ⊙ ∂y/∂A_l)``, each layer with its own gradient."""

    name = "grad_rollout"

    def __init__(
        self, model: nn.Module, discard_ratio: float = 0.0, residual: float = 1.0, start_layer: int = 0
    ) -> None:
        super().__init__(model, start_layer=start_layer)
        Fn.check_discard_ratio(discard_ratio)
        self.discard_ratio, self.residual = discard_ratio, residual

    def relevance(self, captured: Captured, reduced: list, layout: TokenLayout):
        return Fn.rollout_map(reduced[self.start_layer :], self.discard_ratio, self.residual, layout), None
