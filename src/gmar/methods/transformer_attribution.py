"""Transformer Attribution (Chefer, Gur & Wolf, *Transformer Interpretability Beyond Attention
Visualization*, CVPR 2021), with its own LRP rules (:class:`~gmar.capture.CheferRules`).

Relevance starts as a one-hot of value 1 at the target logit and is propagated by Chefer et al.'s
rules down to every layer's attention probabilities, ``R_A``. With ``∇A`` the true gradient of the
target logit there, each layer gives ``Ā = mean_h ReLU(∇A ⊙ R_A)`` and the map is the readout rows of
``Π (I + Ā)`` (from ``start_layer`` on, without row normalisation) on the patch columns. Two backward
passes after one forward pass: the true one and the relevance one.
"""

from __future__ import annotations

from torch import nn

from gmar.adapters import ModelAdapter
from gmar.capture import CheferRules
from gmar.methods import functional as Fn
from gmar.methods.registry import register
from gmar.methods.relevance import RelevanceMethod


def chefer_refusal(name: str, adapter: ModelAdapter) -> str | None:
    """Why Chefer et al.'s rules cannot run on ``adapter``'s model, or None."""
    model = type(adapter.model).__name__
    if not adapter.is_classifier:
        return f"{model} returns an embedding, and {name} starts its relevance from a class logit; use attnlrp"
    if adapter.own_probabilities is not None:
        return f"{model} {adapter.own_probabilities}, which {name}'s rules do not follow; use attnlrp"
    if adapter.gates():
        return f"{model} gates its MLP (a product of two branches), which {name}'s rules do not split; use attnlrp"
    if adapter.residuals() is None:
        return (
            f"{name}'s rules need each residual sum of {model}'s blocks, and gmar does not know them for this "
            "model's blocks; use attnlrp"
        )
    return None


@register
class TransformerAttribution(RelevanceMethod):
    """Chefer et al.'s Transformer Attribution: ``Π_l (I + mean_h ReLU(∇A_l ⊙ R_{A_l}))``, readout rows.

    Args:
        start_layer: the first layer rolled out (0, as the reference code's ``generate_LRP``; its
            evaluation scripts pass 1).
    """

    name = "transformer_attribution"
    true_pass = True

    def __init__(self, model: nn.Module, start_layer: int = 0) -> None:
        self.rules = CheferRules()
        super().__init__(model, start_layer=start_layer)

    @classmethod
    def refusal(cls, adapter: ModelAdapter) -> str | None:
        return super().refusal(adapter) or chefer_refusal(cls.name, adapter)

    def reduce_gradient(self, layer, gradient, attention, captured, layout):
        return gradient.clone()

    def reduce_relevance(self, layer, chunk, true):
        return Fn.gradient_weighted(true[chunk.rows], chunk.at_probabilities)

    def relevance(self, captured, reduced, layout):
        _, per_layer, _ = reduced
        layers = [per_layer[layer] for layer in self.relevance_layers()]
        weights = layout.readout_weights(dtype=layers[0].dtype, device=layers[0].device)
        return layout.patch_map(Fn.gae_readout(layers, weights)), None
