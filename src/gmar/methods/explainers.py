"""The methods. Each one is a few lines over :mod:`gmar.methods.functional`."""

from __future__ import annotations

import torch
from torch import nn

from gmar.capture import Captured
from gmar.layout import TokenLayout
from gmar.methods import functional as Fn
from gmar.methods.base import Explainer


class RawAttention(Explainer):
    """The last layer's attention, mean over heads, readout rows, patch columns. Class-agnostic."""

    name = "raw_attention"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)

    def relevance(self, captured: Captured, gradients: list[torch.Tensor] | None, layout: TokenLayout):
        return Fn.readout_map(captured.attentions[-1].float().mean(dim=1), layout), None


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
        _check_ratio(discard_ratio)
        self.head_fusion, self.discard_ratio, self.residual = head_fusion, discard_ratio, residual

    def relevance(self, captured: Captured, gradients: list[torch.Tensor] | None, layout: TokenLayout):
        fused = [Fn.fuse_heads(a.float(), self.head_fusion) for a in captured.attentions[self.start_layer :]]
        return _rollout_map(fused, self.discard_ratio, self.residual, layout), None


class GradientRollout(Explainer):
    """Rollout of ``mean_h ReLU(A_l ⊙ ∂y/∂A_l)``, each layer with its own gradient."""

    name = "grad_rollout"
    uses_gradients = True

    def __init__(
        self, model: nn.Module, discard_ratio: float = 0.0, residual: float = 1.0, start_layer: int = 0
    ) -> None:
        super().__init__(model, start_layer=start_layer)
        _check_ratio(discard_ratio)
        self.discard_ratio, self.residual = discard_ratio, residual

    def relevance(self, captured: Captured, gradients: list[torch.Tensor] | None, layout: TokenLayout):
        fused = _gradient_weighted_layers(captured, gradients, self.start_layer)
        return _rollout_map(fused, self.discard_ratio, self.residual, layout), None


class GMAR(Explainer):
    """Gradient-driven multi-head attention rollout (Jo, Jang & Park, ICIP 2025).

    Head ``h`` of layer ``l`` scores ``S = ||∂y/∂O_{l,h}||_p`` (``head_grad="output"``) or
    ``||∂y/∂A_{l,h}||_p`` (``head_grad="attention"``); per sample and layer the scores are
    normalised to weights, the heads mixed with them, and the mix rolled out.
    ``head_weights`` holds the weights of every layer, ``start_layer`` only limits the rollout.
    """

    name = "gmar"
    uses_gradients = True

    def __init__(
        self,
        model: nn.Module,
        norm: Fn.Norm = "l1",
        head_grad: str = "output",
        residual: float = 1.0,
        start_layer: int = 0,
        discard_ratio: float = 0.0,
    ) -> None:
        super().__init__(model, start_layer=start_layer)
        if norm not in ("l1", "l2"):
            raise ValueError(f"norm must be 'l1' or 'l2', not {norm!r}")
        if head_grad not in ("output", "attention"):
            raise ValueError(f"head_grad must be 'output' or 'attention', not {head_grad!r}")
        _check_ratio(discard_ratio)
        self.norm, self.head_grad, self.residual, self.discard_ratio = norm, head_grad, residual, discard_ratio

    def _needs_head_outputs(self) -> bool:
        return self.head_grad == "output"

    def gradient_inputs(self, captured: Captured) -> list[torch.Tensor]:
        return captured.head_outputs if self.head_grad == "output" else captured.attentions  # type: ignore[return-value]

    def relevance(self, captured: Captured, gradients: list[torch.Tensor] | None, layout: TokenLayout):
        weights = torch.stack(
            [Fn.normalise_head_scores(Fn.head_scores(g.float(), self.norm)) for g in gradients],  # type: ignore[union-attr]
            dim=1,
        )
        mixed = [Fn.mix_heads(a.float(), weights[:, i]) for i, a in enumerate(captured.attentions)]
        token_map = _rollout_map(mixed[self.start_layer :], self.discard_ratio, self.residual, layout)
        return token_map, weights


class GAE(Explainer):
    """Generic attention explainability (Chefer et al. 2021): ``R ← R + mean_h ReLU(∂y/∂A_l ⊙ A_l) R``."""

    name = "gae"
    uses_gradients = True

    def __init__(self, model: nn.Module, start_layer: int = 0) -> None:
        super().__init__(model, start_layer=start_layer)

    def relevance(self, captured: Captured, gradients: list[torch.Tensor] | None, layout: TokenLayout):
        return Fn.readout_map(Fn.gae(_gradient_weighted_layers(captured, gradients, self.start_layer)), layout), None


def _check_ratio(discard_ratio: float) -> None:
    if not 0.0 <= discard_ratio < 1.0:
        raise ValueError(f"discard_ratio must be in [0, 1), not {discard_ratio}")


def _gradient_weighted_layers(
    captured: Captured, gradients: list[torch.Tensor] | None, start_layer: int
) -> list[torch.Tensor]:
    """``mean_h ReLU(A_l ⊙ ∂y/∂A_l)`` for the layers from ``start_layer``, each with its own gradient."""
    pairs = zip(captured.attentions, gradients, strict=True)  # type: ignore[arg-type]
    return [Fn.gradient_weighted(a.float(), g.float()) for a, g in list(pairs)[start_layer:]]


def _rollout_map(fused: list[torch.Tensor], discard_ratio: float, residual: float, layout: TokenLayout) -> torch.Tensor:
    if discard_ratio:
        fused = [Fn.discard_lowest(m, discard_ratio, layout.num_prefix_tokens) for m in fused]
    return Fn.readout_map(Fn.rollout(fused, residual), layout)
