"""The methods. Each one is a few lines over :mod:`gmar.methods.functional`."""

from __future__ import annotations

import sys
from typing import ClassVar

import torch
from torch import nn

from gmar.adapters.base import check_pooling
from gmar.capture import Captured
from gmar.errors import TargetError
from gmar.explanation import Explanation, min_max
from gmar.layout import TokenLayout
from gmar.methods import functional as Fn
from gmar.methods.base import Explainer, instrumented, score
from gmar.progress import Progress
from gmar.targets import Target, TextTarget, prepare_images, score_of


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
        _check_ratio(discard_ratio)
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
        return _rollout_map(mixed, self.discard_ratio, self.residual, layout), weights

    def head_scores(self, reduced: list) -> torch.Tensor:
        return torch.stack([s for s, _, _ in reduced], dim=1)


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


class Occlusion(Explainer):
    """Occlusion (Zeiler & Fergus 2014): each patch's relevance is how much the target's score drops
    when it is hidden.

    Every ``window × window`` square of patches (stride one patch) is replaced by ``baseline`` and
    the model run again; a patch's relevance is the mean drop ``y - y_occluded`` over the windows
    that cover it (with ``window=1``, the drop when that patch alone is hidden). The occluded copies
    run ``batch_size`` images per forward pass, with a progress bar. It is exact but slow: one
    forward pass per window and image, so ``method="all"`` leaves it out; name it to use it.

    Args:
        window: the side of the occluded square, in patches (default 1: each patch alone).
        baseline: ``"mean"`` (default): 0 in the model's input space, which is the preprocessing's
            mean colour; ``"blur"``: the image blurred (Gaussian, sigma one patch side); or a number
            in input space.
        batch_size: occluded images per forward pass.
        progress: draw a progress bar on stderr (None: when stderr is a terminal).
    """

    name = "occlusion"
    needs_readout_rows = False
    needs_attention = False
    runs_alone = True
    in_all = False
    smoke_options: ClassVar[dict] = {"window": 2**31}

    def __init__(
        self,
        model: nn.Module,
        window: int = 1,
        baseline: str | float = "mean",
        batch_size: int = 64,
        progress: bool | None = None,
    ) -> None:
        super().__init__(model)
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be a positive int (patches), not {window!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, not {batch_size!r}")
        if isinstance(baseline, str) and baseline not in ("mean", "blur"):
            raise ValueError(f"baseline must be 'mean', 'blur' or a number, not {baseline!r}")
        if not isinstance(baseline, (str, int, float)) or isinstance(baseline, bool):
            raise ValueError(f"baseline must be 'mean', 'blur' or a number, not {baseline!r}")
        self.window, self.baseline, self.batch_size = window, baseline, batch_size
        self.progress = sys.stderr.isatty() if progress is None else progress

    def __call__(self, images: torch.Tensor, target: Target = None) -> Explanation:
        images = prepare_images(target, self._prepare(images))
        layout = self.adapter.token_layout(tuple(images.shape[-2:]))
        windows = Fn.occlusion_windows(layout.grid_size, self.window)
        batch = images.shape[0]
        step = max(1, self.batch_size // batch)  # windows per forward pass
        with instrumented(self.model, False):
            output = self.adapter.forward(images)
            scores, classes = score(self.adapter, output, target, gradients=True)  # a target is needed
            replacement = self._replacement(images, layout)
            drops = []
            bar = Progress(len(windows), "occlusion", self.progress, unit="windows")
            try:
                for start in range(0, len(windows), step):
                    chunk = windows[start : start + step]
                    occluded = Fn.occlude(images, chunk, replacement, layout)
                    outputs = self.adapter.forward(occluded.flatten(0, 1))
                    for j in range(len(chunk)):
                        hidden = score_of(outputs[j * batch : (j + 1) * batch], target, classes)
                        drops.append(scores - hidden)  # type: ignore[operator]
                    bar.update(advance=len(chunk))
            finally:
                bar.close()
            token_map = Fn.occlusion_map(torch.stack(drops, dim=1).float(), windows)
        captured = Captured(output=output, attentions=[], head_outputs=None)
        return self.explanation(token_map, None, captured, scores, classes, layout, images, target)

    def _replacement(self, images: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        if self.baseline == "mean":
            return images.new_zeros(())
        if self.baseline == "blur":
            from gmar.imageops import gaussian_blur

            return gaussian_blur(images, float(max(layout.patch_size)))
        return images.new_full((), float(self.baseline))

    def relevance(self, captured: Captured, reduced: list, layout: TokenLayout):
        raise NotImplementedError("occlusion runs the model once per window; it has no per-layer reduction")


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
