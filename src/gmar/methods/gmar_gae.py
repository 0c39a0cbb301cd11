"""GMAR's head weights inside GAE's propagation (``method="gmar_gae"``).

With ``P_{l,h} = A_{l,h} ⊙ ∂y/∂A_{l,h}``: ``S_{l,h} = ‖ReLU(P_{l,h})‖₁``, ``w_{l,h} = S_{l,h} / Σ_h S_{l,h}``,
``Ā_l = ReLU(Σ_h w_{l,h} P_{l,h})``, then GAE's ``R ← R + Ā_l R`` from ``R = I``
(:func:`gmar.methods.functional.head_weighted_layer`, :func:`~gmar.methods.functional.gae_readout`).
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
class HeadWeightedGAE(Explainer):
    """GAE with per-head weights inside its propagation (``method="gmar_gae"``).

    Per layer, with ``P_h = A_h ⊙ ∂y/∂A_h``: head scores ``S_h = ‖ReLU(P_h)‖₁``, weights
    ``w_h = S_h / Σ_h S_h``, ``Ā_l = ReLU(Σ_h w_h P_h)``; then GAE's ``R ← R + Ā_l R`` from ``R = I``,
    readout rows, patch columns.

    Args:
        head_weights: weight the heads by ``w`` (default); False: ``w_h = 1/H``.
        signed: mix the heads' signed products, then rectify (default); False: rectify each head
            first, as GAE does (then with ``head_weights=False`` this is GAE).
        start_layer: first layer propagated; ``head_weights`` and ``head_scores`` cover every layer.
    """

    name = "gmar_gae"
    uses_gradients = True

    def __init__(self, model: nn.Module, head_weights: bool = True, signed: bool = True, start_layer: int = 0) -> None:
        super().__init__(model, start_layer=start_layer)
        self.weighted, self.signed = bool(head_weights), bool(signed)

    def reduce_gradient(self, layer, gradient, attention, captured, layout):
        return Fn.head_weighted_layer(attention.float(), gradient.float(), self.weighted, self.signed)  # type: ignore[union-attr]

    def reduction_key(self):
        return ("head_weighted", self.weighted, self.signed)

    def relevance(self, captured: Captured, reduced: list, layout: TokenLayout):
        layers = [m for _, m in reduced[self.start_layer :]]
        weights = layout.readout_weights(dtype=layers[0].dtype, device=layers[0].device)
        return layout.patch_map(Fn.gae_readout(layers, weights)), self._weights(self.head_scores(reduced))

    def head_scores(self, reduced: list) -> torch.Tensor:
        return torch.stack([s for s, _ in reduced], dim=1)

    def _weights(self, scores: torch.Tensor) -> torch.Tensor:
        if self.weighted:
            return Fn.normalise_head_scores(scores)
        return torch.full_like(scores, 1.0 / scores.shape[-1])
