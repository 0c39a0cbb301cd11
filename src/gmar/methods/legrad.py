"""LeGrad (Bousselham, Boggust, Chaybouti, Strobelt & Kuehne, *LeGrad: An Explainability Method for Vision
Transformers via Feature Formation Sensitivity*, 2024).

Eq. 4-6: each layer ``l``'s tokens read out by the model's own head give a score ``s_l``;
``E_l = mean over heads and query rows of ReLU(∂s_l/∂A_l)``, patch columns; ``E = Σ_l E_l``.
"""

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
from gmar.methods.registry import register
from gmar.targets import Target, TextTarget, score_of


@register
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
