"""GMAR: gradient-driven multi-head attention rollout (Jo, Jang & Park, ICIP 2025).

Head importance ``S_{l,h} = ||∂y/∂O_{l,h}||_p`` (the paper's), normalised per layer to weights
``w_{l,h} = S_{l,h} / Σ_h S_{l,h}``; the heads mixed ``Ā_l = Σ_h w_{l,h} A_{l,h}`` and rolled out as
attention rollout does (:func:`gmar.methods.functional.rollout_map`). docs/methods/gmar.md has the
equations and the Taylor variants.
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
class GMAR(Explainer):
    """Gradient-driven multi-head attention rollout (Jo, Jang & Park, ICIP 2025).

    ``head_score="gradient"`` (the paper's): head ``h`` of layer ``l`` scores
    ``S = ||∂y/∂O_{l,h}||_p`` (``head_grad="output"``, the default) or ``||∂y/∂A_{l,h}||_p``
    (``head_grad="attention"``); per sample and layer the scores are normalised to weights, the
    heads mixed with them, and the mix rolled out.

    ``head_score="taylor"``: ``S = Σ O_{l,h} ⊙ ∂y/∂O_{l,h}`` (the first-order Taylor estimate of
    Michel, Levy & Neubig 2019), the first-order drop of ``y`` when the head is switched off (``O = A V``,
    the attention core's output; positive: switching the head off lowers ``y``); the heads are mixed
    with ``ReLU(S) / Σ_h ReLU(S)``. ``head_score="taylor_abs"`` is Michel et al.'s magnitude ``|S|``,
    weights ``|S| / Σ_h |S|``. The signed score is the default Taylor variant because it ranks heads
    closer to the measured knock-outs on the reference benchmark (docs/methods/gmar.md).

    ``head_weights`` holds the weights of every layer, ``head_scores`` the scores ``S`` before
    normalisation (comparable across layers); ``start_layer`` only limits the rollout.
    """

    name = "gmar"
    uses_gradients = True

    def __init__(
        self,
        model: nn.Module,
        norm: Fn.Norm = "l1",
        head_grad: str | None = None,
        residual: float = 1.0,
        start_layer: int = 0,
        discard_ratio: float = 0.0,
        head_score: str = "gradient",
    ) -> None:
        super().__init__(model, start_layer=start_layer)
        if head_score not in ("gradient", "taylor", "taylor_abs"):
            raise ValueError(f"head_score must be 'gradient', 'taylor' or 'taylor_abs', not {head_score!r}")
        if norm not in ("l1", "l2"):
            raise ValueError(f"norm must be 'l1' or 'l2', not {norm!r}")
        if head_score != "gradient" and (head_grad is not None or norm != "l1"):
            raise ValueError(
                f"norm and head_grad choose the paper's gradient score; head_score={head_score!r} takes neither "
                "(Σ O ⊙ ∂y/∂O is computed as Σ A ⊙ ∂y/∂A, which is equal)"
            )
        head_grad = "output" if head_grad is None and head_score == "gradient" else head_grad or "attention"
        if head_grad not in ("output", "attention"):
            raise ValueError(f"head_grad must be 'output' or 'attention', not {head_grad!r}")
        Fn.check_discard_ratio(discard_ratio)
        self.norm, self.head_grad, self.residual, self.discard_ratio = norm, head_grad, residual, discard_ratio
        self.head_score = head_score
        self.gradient_of = head_grad  # type: ignore[assignment]

    def reduce_gradient(self, layer, gradient, attention, captured, layout):
        attention = attention.float()  # type: ignore[union-attr]
        if self.head_score == "taylor":
            scores = Fn.taylor_head_scores(attention, gradient.float())
            weights = Fn.positive_head_weights(scores)
        elif self.head_score == "taylor_abs":
            scores = Fn.taylor_head_scores(attention, gradient.float()).abs_()
            weights = Fn.normalise_head_scores(scores)
        else:
            scores = Fn.head_scores(gradient.float(), self.norm)
            weights = Fn.normalise_head_scores(scores)
        mixed = Fn.mix_heads(attention, weights) if layer >= self.start_layer else None
        return scores, weights, mixed

    def relevance(self, captured: Captured, reduced: list, layout: TokenLayout):
        weights = torch.stack([w for _, w, _ in reduced], dim=1)
        mixed = [m for _, _, m in reduced[self.start_layer :]]
        return Fn.rollout_map(mixed, self.discard_ratio, self.residual, layout), weights

    def head_scores(self, reduced: list) -> torch.Tensor:
        return torch.stack([s for s, _, _ in reduced], dim=1)
