"""Partial LRP (Voita et al., ACL 2019; a baseline of Chefer et al., CVPR 2021): the relevance at the
last layer's attention probabilities under Chefer et al.'s rules, ``mean_h ReLU(R_A)``, read at the
readout rows. It rides on Transformer Attribution's relevance pass and stops at the last layer."""

from __future__ import annotations

from torch import nn

from gmar.adapters import ModelAdapter
from gmar.capture import CheferRules
from gmar.methods.registry import register
from gmar.methods.relevance import RelevanceMethod
from gmar.methods.transformer_attribution import chefer_refusal


@register
class PartialLRP(RelevanceMethod):
    """The last layer's attention relevance (Chefer et al.'s LRP rules), heads averaged after ReLU."""

    name = "partial_lrp"

    def __init__(self, model: nn.Module) -> None:
        self.rules = CheferRules()
        super().__init__(model)

    @classmethod
    def refusal(cls, adapter: ModelAdapter) -> str | None:
        return super().refusal(adapter) or chefer_refusal(cls.name, adapter)

    def relevance_layers(self) -> list[int]:
        return [self.adapter.num_layers - 1]

    def reduce_relevance(self, layer, chunk, true):
        return chunk.at_probabilities.clamp(min=0).mean(dim=1)

    def relevance(self, captured, reduced, layout):
        _, per_layer, _ = reduced
        last = per_layer[self.adapter.num_layers - 1]
        weights = layout.readout_weights(dtype=last.dtype, device=last.device)
        return layout.patch_map(weights @ last), None
