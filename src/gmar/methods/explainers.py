"""The methods. Each one is a few lines over :mod:`gmar.methods.functional`."""

from __future__ import annotations

import torch
from torch import nn

from gmar.adapters.base import check_pooling
from gmar.capture import Captured
from gmar.errors import TargetError
from gmar.explanation import min_max
from gmar.layout import TokenLayout
from gmar.methods import functional as Fn
from gmar.methods.base import Explainer
from gmar.targets import Target, TextTarget, score_of


class RawAttention(Explainer):
    """The last layer's attention, mean over heads, readout rows, patch columns. Class-agnostic."""

    name = "raw_attention"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)

    def reduce_attention(self, layer: int, attention: torch.Tensor) -> torch.Tensor | None:
        return attention.float().mean(dim=1) if layer == self.adapter.num_layers - 1 else None

    def relevance(self, captured: Captured, reduced: list, layout: TokenLayout):
        return Fn.readout_map(reduced[-1], layout), None


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

    def reduce_attention(self, layer: int, attention: torch.Tensor) -> torch.Tensor | None:
        return Fn.fuse_heads(attention.float(), self.head_fusion) if layer >= self.start_layer else None

    def relevance(self, captured: Captured, reduced: list, layout: TokenLayout):
        return _rollout_map(reduced[self.start_layer :], self.discard_ratio, self.residual, layout), None


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

    def reduce_gradient(self, layer, gradient, attention, captured, layout):
        return _gradient_weighted_layer(layer, gradient, attention, self.start_layer)

    def reduction_key(self):
        return ("gradient_weighted", self.start_layer)  # GAE and gradient rollout reduce alike

    def relevance(self, captured: Captured, reduced: list, layout: TokenLayout):
        return _rollout_map(reduced[self.start_layer :], self.discard_ratio, self.residual, layout), None


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
        self.gradient_of = head_grad  # type: ignore[assignment]

    def reduce_gradient(self, layer, gradient, attention, captured, layout):
        weights = Fn.normalise_head_scores(Fn.head_scores(gradient.float(), self.norm))
        mixed = Fn.mix_heads(attention.float(), weights) if layer >= self.start_layer else None  # type: ignore[union-attr]
        return weights, mixed

    def relevance(self, captured: Captured, reduced: list, layout: TokenLayout):
        weights = torch.stack([w for w, _ in reduced], dim=1)
        mixed = [m for _, m in reduced[self.start_layer :]]
        return _rollout_map(mixed, self.discard_ratio, self.residual, layout), weights


class GAE(Explainer):
    """Generic attention explainability (Chefer et al. 2021): ``R ← R + mean_h ReLU(∂y/∂A_l ⊙ A_l) R``."""

    name = "gae"
    uses_gradients = True

    def __init__(self, model: nn.Module, start_layer: int = 0) -> None:
        super().__init__(model, start_layer=start_layer)

    def reduce_gradient(self, layer, gradient, attention, captured, layout):
        return _gradient_weighted_layer(layer, gradient, attention, self.start_layer)

    def reduction_key(self):
        return ("gradient_weighted", self.start_layer)  # GAE and gradient rollout reduce alike

    def relevance(self, captured: Captured, reduced: list, layout: TokenLayout):
        layers = reduced[self.start_layer :]
        weights = layout.readout_weights(dtype=layers[0].dtype, device=layers[0].device)
        return layout.patch_map(Fn.gae_readout(layers, weights)), None


class LeGrad(Explainer):
    """LeGrad (Bousselham et al. 2024): every layer explains itself with its own score.

    Layer ``l``'s output tokens go through the model's own final norm, pooling and head, giving
    the layer's score ``s_l`` for the target (a class logit, or a :class:`gmar.TextTarget`'s cosine
    similarity). Its map is ``E_l = mean over heads and query rows of ReLU(∂s_l/∂A_l)`` on the patch
    columns; the explanation is ``Σ_{l ≥ start_layer} E_l``. For an attention-pooled model (SigLIP)
    ``A_l`` is the pooler's attention when it pools layer ``l``'s tokens.

    All layers come from one backward pass: each block reads a detached copy of its input, so the
    gradient of ``Σ_l s_l`` at ``A_l`` is ``∂s_l/∂A_l``.

    Args:
        start_layer: first layer summed (negative counts from the end, like the official
            ``layer_index=-2``); default all layers.
        pooling: ``"model"`` pools each layer's tokens as the model does (default; for the last
            layer ``s_L`` is the model's own score). ``"all_tokens"`` (OpenCLIP ViT towers only) is
            the official code's readout, ``ln_post(mean of all tokens) @ proj``; ``"no_final_norm"``
            (attention-pooled models only) is its readout for SigLIP: the pooler without the final norm.
        correction: the official SigLIP "empty prompt" correction: patches where the min-max
            normalised map of ``correction_prompt`` exceeds ``correction_threshold`` are set to 0.
            Needs a :class:`gmar.TextTarget`; costs a second backward through the readouts.
        correction_prompt: the "empty" prompt (the official code uses "a photo of a").
        correction_threshold: in [0, 1]; 0.8 as in the official code.
    """

    name = "legrad"
    uses_gradients = True
    needs_readout_rows = False
    chained_gradients = False  # the graph is cut between blocks: each attention is a dead end

    def __init__(
        self,
        model: nn.Module,
        start_layer: int = 0,
        pooling: str = "model",
        correction: bool = False,
        correction_prompt: str = "a photo of a",
        correction_threshold: float = 0.8,
    ) -> None:
        super().__init__(model, start_layer=start_layer)
        check_pooling(self.adapter, pooling)
        if not 0.0 <= correction_threshold <= 1.0:
            raise ValueError(f"correction_threshold must be in [0, 1], not {correction_threshold}")
        self.pooling, self.correction = pooling, correction
        self.correction_prompt, self.correction_threshold = correction_prompt, correction_threshold
        self._empty: tuple[TextTarget, TextTarget] | None = None

    def capture_options(self) -> dict:
        # An attention pooler's gradient never enters the blocks, so they need no cut.
        return {"block_outputs": True, "detach_from": None if self.adapter.attention_pooled else self.start_layer}

    def gradients(
        self,
        captured: Captured,
        scores: torch.Tensor,
        classes: torch.Tensor | None,
        target: Target,
        layout: TokenLayout,
    ) -> list[torch.Tensor]:
        empty = self._empty_target(target) if self.correction else None
        layers = list(range(self.start_layer, self.adapter.num_layers))
        outputs, poolers = [], []
        for layer in layers:
            tokens = self.adapter.block_tokens(captured.block_outputs[layer])  # type: ignore[index]
            output, pooler_attention = self.adapter.readout(tokens, self.pooling)
            outputs.append(output)
            poolers.append(pooler_attention)

        def gradients(objective: torch.Tensor, retain_graph: bool) -> list:
            if self.adapter.attention_pooled:  # each layer's map comes from the pooler's attention
                return self.reduced_gradients(objective, poolers, poolers, captured, layout, retain_graph, layers)
            return self.layer_gradients(objective, layers, captured, layout, retain_graph)

        maps = gradients(torch.stack([score_of(o, target, classes).sum() for o in outputs]).sum(), empty is not None)
        if empty is not None:
            maps += gradients(torch.stack([empty(o).sum() for o in outputs]).sum(), False)
        return maps

    def reduce_gradient(self, layer, gradient, attention, captured, layout):
        return Fn.legrad_layer(gradient.float(), layout)

    def relevance(self, captured: Captured, reduced: list, layout: TokenLayout):
        count = self.adapter.num_layers - self.start_layer
        maps = reduced
        token_map = torch.stack(maps[:count]).sum(dim=0)
        if self.correction:
            empty = torch.stack(maps[count:]).sum(dim=0)
            token_map = token_map.masked_fill(min_max(empty) > self.correction_threshold, 0.0)
        return token_map, None

    def _empty_target(self, target: Target) -> TextTarget:
        if not isinstance(target, TextTarget):
            raise TargetError(
                "LeGrad's empty-prompt correction needs a gmar.TextTarget: it embeds the correction prompt "
                "with the target's model and tokenizer"
            )
        if self._empty is None or self._empty[0] is not target:
            self._empty = (target, target.with_prompts(self.correction_prompt))
        return self._empty[1]


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


def _check_ratio(discard_ratio: float) -> None:
    if not 0.0 <= discard_ratio < 1.0:
        raise ValueError(f"discard_ratio must be in [0, 1), not {discard_ratio}")


def _gradient_weighted_layer(
    layer: int, gradient: torch.Tensor, attention: torch.Tensor | None, start_layer: int
) -> torch.Tensor | None:
    """``mean_h ReLU(A_l ⊙ ∂y/∂A_l)`` of ``layer`` (None below ``start_layer``)."""
    if layer < start_layer:
        return None
    return Fn.gradient_weighted(attention.float(), gradient.float())  # type: ignore[union-attr]


def _rollout_map(fused: list[torch.Tensor], discard_ratio: float, residual: float, layout: TokenLayout) -> torch.Tensor:
    if discard_ratio:
        fused = [Fn.discard_lowest(m, discard_ratio, layout.num_prefix_tokens) for m in fused]
    weights = layout.readout_weights(dtype=fused[0].dtype, device=fused[0].device)
    return layout.patch_map(Fn.rollout_readout(fused, weights, residual))
