"""AttnLRP (Achtibat et al., *AttnLRP: Attention-Aware Layer-Wise Relevance Propagation for
Transformers*, ICML 2024).

Relevance is input × modified gradient: one forward pass and one backward pass in which the rules of
:class:`~gmar.capture.AttnLRPRules` replace the true gradient at the element-wise activations (the
identity rule), the norms (the identity rule on the division), the attention core (CP-LRP or the
uniform and softmax rules) and, with ε or γ, the linear layers. The map is ``R = Σ_c x ⊙ g`` at the
input pixels; the token map sums it per patch. Each head's relevance ``Σ O_h ⊙ g_{O_h}`` at its output
is the head score.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from gmar.adapters import ModelAdapter
from gmar.capture import AttnLRPRules
from gmar.methods.registry import register
from gmar.methods.relevance import RelevanceMethod, input_relevance, per_patch


@register
class AttnLRP(RelevanceMethod):
    """AttnLRP as input × modified gradient, in one backward pass for the batch.

    Args:
        attention: ``"cp"`` (the attention held constant, relevance through the values: the
            default, as the authors ship it for ViTs) or ``"full"`` (the uniform rule on both
            attention products and the softmax rule).
        epsilon: the ε of LRP-ε on the linear layers (0: their true gradient, LRP-0).
        linear_gamma, conv_gamma: the γ of the generalised γ-rule on the ``nn.Linear`` modules and on
            the ``nn.Conv2d`` patch embedding (0: off). The authors' ViT example tries values such as
            0.05 and 0.25.
    """

    name = "attnlrp"
    needs_input_relevance = True
    # the map comes from the input gradient: no readout rows needed, any pooling the rules reach
    needs_readout_rows = False

    def __init__(
        self,
        model: nn.Module,
        attention: Literal["cp", "full"] = "cp",
        epsilon: float = 0.0,
        linear_gamma: float = 0.0,
        conv_gamma: float = 0.0,
    ) -> None:
        self.rules = AttnLRPRules(attention, epsilon, linear_gamma, conv_gamma)
        super().__init__(model)

    @classmethod
    def refusal(cls, adapter: ModelAdapter) -> str | None:
        if adapter.own_probabilities is not None:
            return (
                f"{type(adapter.model).__name__} {adapter.own_probabilities}, where gmar has not checked "
                "attnlrp's relevance to be conserved; explain it with gae, legrad or gradcam"
            )
        if adapter.attention_pooled:
            return (
                f"{type(adapter.model).__name__} pools its tokens with an attention head that runs outside "
                "gmar's attention core, where attnlrp's attention rule cannot reach; explain it with legrad, "
                "gradcam or occlusion"
            )
        return super().refusal(adapter)

    def relevance_layers(self) -> list[int]:
        return list(range(self.adapter.num_layers))

    def reduce_relevance(self, layer, chunk, true):
        return chunk.head_relevance("gradient").float()

    def relevance(self, captured, reduced, layout):
        _, _, gradient = reduced
        return per_patch(input_relevance(captured.inputs, gradient).float(), layout), None

    def pixel_map(self, captured, reduced, layout) -> torch.Tensor:
        _, _, gradient = reduced
        return input_relevance(captured.inputs, gradient).float()

    def head_scores(self, reduced):
        _, per_layer, _ = reduced
        return torch.stack([per_layer[layer] for layer in sorted(per_layer)], dim=1)
