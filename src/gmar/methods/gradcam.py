"""Grad-CAM (Selvaraju et al., *Grad-CAM: Visual Explanations from Deep Networks via Gradient-based
Localization*, ICCV 2017) on a ViT's tokens.

Eq. 1: channel weights ``α_c = mean over patches of ∂y/∂X_c``; Eq. 2: ``L = ReLU(Σ_c α_c X_c)``, with
``X`` the patch tokens entering a block (:func:`gmar.methods.functional.token_gradcam`). The mean over
patches is over the token sequence, whatever the grid's rank.
"""

from __future__ import annotations

from torch import nn

from gmar.capture import Captured
from gmar.layout import TokenLayout
from gmar.methods import functional as Fn
from gmar.methods.base import Explainer
from gmar.methods.registry import register


@register
class GradCAM(Explainer):
    """Grad-CAM on ViT tokens: the tokens ``X`` entering block ``layer``, prefix tokens dropped, channel
    weights ``w_c = mean over patches of ∂y/∂X_c``, map ``ReLU(Σ_c w_c X_c)``.

    Alone, it lets the model run its own (fused) attention, records the forward pass for the
    backward only from block ``layer`` on, and the backward pass stops at that block's input."""

    name = "gradcam"
    uses_gradients = True
    needs_readout_rows = False
    needs_attention = False

    def __init__(self, model: nn.Module, layer: int = -1) -> None:
        super().__init__(model)
        self.layer = self._layer_index(layer, "layer")

    def capture_options(self) -> dict:
        # Only block ``layer``'s input is differentiated: the blocks before it need no graph.
        return {"norm_input_layer": self.layer, "leaf_at": self.layer}

    def gradients(self, captured, scores, classes, target, layout):
        return self.reduced_gradients(scores.sum(), [captured.norm_input], [None], captured, layout)  # type: ignore[list-item]

    def reduce_gradient(self, layer, gradient, attention, captured, layout):
        tokens = self.adapter.block_tokens
        return Fn.token_gradcam(tokens(captured.norm_input).float(), tokens(gradient).float(), layout)  # type: ignore

    def relevance(self, captured: Captured, reduced: list, layout: TokenLayout):
        return reduced[0], None
