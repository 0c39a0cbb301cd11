"""What the LRP family shares: a rule set, and a modified backward pass next to the true one.

A :class:`RelevanceMethod` names a :class:`~gmar.capture.RuleSet`. Its forward pass is the one every
method runs, with the rule set's pass-through nodes in place (:func:`gmar.capture.rules.instrument_rules`),
so the same forward pass serves the true backward pass (the other methods', and a relevance method's
own when it reads true gradients) and the modified one. In the modified pass each layer's attention
core hands the method a :class:`~gmar.capture.RelevanceChunk` per chunk of samples.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from gmar.capture import Captured, RelevanceChunk, RuleSet
from gmar.layout import TokenLayout
from gmar.methods.base import Explainer


class RelevanceMethod(Explainer):
    """Base class of the LRP methods. A subclass sets :attr:`rules` in its constructor and implements
    :meth:`reduce_relevance` and :meth:`relevance`; :meth:`reduce_gradient` too when it reads the
    true gradient (:attr:`true_pass`).

    ``reduced`` (what :meth:`relevance` gets) is ``(true, relevance, inputs)``: the true pass's
    reductions (None without one), the modified pass's per layer of :meth:`relevance_layers`, and the
    modified gradient at the model's input (None unless :attr:`needs_input_relevance`).
    """

    uses_gradients = True
    #: the method also reads the true gradient at the attention (one more backward pass)
    true_pass: ClassVar[bool] = False
    #: the method reads the modified gradient at the model's input (the pass runs to the pixels)
    needs_input_relevance: ClassVar[bool] = False
    rules: RuleSet

    def stream_rules(self) -> tuple[RuleSet, ...]:
        return (self.rules,)

    def relevance_layers(self) -> list[int]:
        """The layers whose attention the modified pass reduces (it runs down to the first of them,
        or to the input)."""
        return list(range(self.start_layer, self.adapter.num_layers))

    def true_layers(self) -> list[int]:
        """The layers whose true gradient :meth:`reduce_gradient` reduces."""
        return self.relevance_layers()

    def reduce_relevance(self, layer: int, chunk: RelevanceChunk, true: Any) -> Any:
        """What the method keeps of layer ``layer``'s chunk in the modified pass; ``true`` is the
        true pass's reduction of that layer (all samples; take ``chunk.rows``), or None."""
        return None

    def gradients(self, captured, scores, classes, target, layout):
        objective = scores.sum()
        true = None
        if self.true_pass:
            layers = self.true_layers()
            reduced = self.layer_gradients(objective, layers, captured, layout, retain_graph=True)
            true = dict(zip(layers, reduced, strict=True))
        return self.relevance_pass(captured, objective, layout, true)

    def relevance_pass(
        self,
        captured: Captured,
        objective: torch.Tensor,
        layout: TokenLayout,
        true: dict[int, Any] | None,
        retain_graph: bool = False,
    ) -> tuple:
        """The modified backward pass of ``objective`` with :attr:`rules`: ``(true, per layer, inputs)``."""
        layers = self.relevance_layers()
        extra = [captured.inputs] if self.needs_input_relevance else []

        def reduce(index: int, chunk: RelevanceChunk, attention: torch.Tensor) -> Any:
            layer = layers[index]
            with torch.no_grad():
                return self.reduce_relevance(layer, chunk, None if true is None else true.get(layer))

        results = captured.stream.backward(  # type: ignore[union-attr]
            objective, layers, reduce, chained=True, extra=extra, rules=self.rules, retain_graph=retain_graph
        )
        per_layer = dict(zip(layers, results[: len(layers)], strict=True))
        return true, per_layer, results[len(layers)] if extra else None


def input_relevance(inputs: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """``Σ_c x ⊙ g`` over the input's channels: ``(B, C, H, W)`` twice to ``(B, H, W)``."""
    return (inputs.detach() * gradient).sum(dim=1)


def per_patch(pixels: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """A pixel map ``(B, H, W)`` summed over each token's patch: ``(B, h, w)``. The patches tile the
    input exactly when ``H = h · ph``; otherwise each token takes its share of an even tiling."""
    grid = tuple(layout.grid_size)
    height, width = pixels.shape[-2:]
    if (height, width) == (grid[0] * layout.patch_size[0], grid[1] * layout.patch_size[1]):
        return pixels.reshape(pixels.shape[0], grid[0], layout.patch_size[0], grid[1], layout.patch_size[1]).sum(
            dim=(2, 4)
        )
    return F.adaptive_avg_pool2d(pixels[:, None], grid)[:, 0] * (height * width / (grid[0] * grid[1]))
