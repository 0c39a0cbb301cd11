"""Generic attention explainability (Chefer, Gur & Wolf, *Generic Attention-model Explainability for
Interpreting Bi-Modal and Encoder-Decoder Transformers*, ICCV 2021).

Eq. 5: ``Ā_l = E_h[(∇A_l ⊙ A_l)⁺]``, the attention weighted by its gradient, rectified, heads averaged;
Eq. 6: ``R ← R + Ā_l · R`` from ``R = I``. The map is the readout rows of ``R`` on the patch columns.
Eq. 5 is :func:`gmar.methods.functional.gradient_weighted`, shared with gradient rollout, which rolls the
same matrices out instead.
"""

from __future__ import annotations

from torch import nn

from gmar.capture import Captured
from gmar.layout import TokenLayout
from gmar.methods import functional as Fn
from gmar.methods.base import GradientWeightedAttention
from gmar.methods.registry import register


@register
class GAE(GradientWeightedAttention):
    """Generic attention explainability (Chefer et al. 2021): ``R ← R + mean_h ReLU(∂y/∂A_l ⊙ A_l) R``."""

    name = "gae"

    def __init__(self, model: nn.Module, start_layer: int = 0) -> None:
        super().__init__(model, start_layer=start_layer)

    def relevance(self, captured: Captured, reduced: list, layout: TokenLayout):
        layers = reduced[self.start_layer :]
        weights = layout.readout_weights(dtype=layers[0].dtype, device=layers[0].device)
        return layout.patch_map(Fn.gae_readout(layers, weights)), None
