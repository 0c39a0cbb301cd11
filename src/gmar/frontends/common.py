"""What every front end (``gmar explain``, ``gmar demo``, ``gmar app``) needs, written once.

How a class is labelled, which probabilities a model's outputs are shown with, the text target of a
CLIP-style model, and the head-weight figure of any method whose explanation has head weights
(``gmar``, ``gmar_gae``: :attr:`gmar.Explanation.head_weights`). Which methods explain a model is
the library's answer, :func:`gmar.methods.methods_for`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from gmar.errors import GmarError
from gmar.explanation import Explanation
from gmar.targets import TextTarget

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def class_label(class_names: Sequence[str] | None, index: int) -> str:
    """``"tabby, tabby cat [281]"`` from the model's class names; ``"class 281"`` without a name for it."""
    if class_names and 0 <= index < len(class_names):
        return f"{class_names[index]} [{index}]"
    return f"class {index}"


def probabilities(logits: torch.Tensor, multi_label: bool) -> torch.Tensor:
    """``(B, classes)`` float32 on the CPU: sigmoids for a multi-label model (the reference ViT), else the softmax."""
    logits = logits.detach().float().cpu()
    return logits.sigmoid() if multi_label else logits.softmax(dim=-1)


def text_target(model: nn.Module, tokenizer: Any, prompts: Sequence[str], spec: str) -> TextTarget:
    """``prompts`` as the target of the CLIP-style ``model``, embedded with the tokenizer it was loaded with
    (:attr:`gmar.LoadedModel.extras` ``["tokenizer"]``); ``spec`` names the model in the error without one."""
    if tokenizer is None:
        raise GmarError(f"{spec} came without a tokenizer, so its prompts cannot be embedded")
    return TextTarget(model, tokenizer, list(prompts))


def head_weighted(explanations: Mapping[str, Explanation]) -> list[str]:
    """The methods among ``explanations`` whose explanation has head weights, in their order."""
    return [name for name, explanation in explanations.items() if explanation.head_weights is not None]


def heads_file(method: str) -> str:
    """What follows an input's name (and ``_``) in the name of ``method``'s head-weights figure:
    ``cat.jpg_gmar_heads.png``, ``cat.jpg_gmar_gae_heads.png``; the demo's ``gmar_heads.png``."""
    return f"{method}_heads.png"


def head_weights_figure(explanations: Mapping[str, Explanation], method: str, row: int, title: str) -> Figure:
    """The layers x heads weights ``(L, H)`` of sample ``row`` of ``method``'s explanation, titled
    ``"METHOD head weights: TITLE"``."""
    from gmar import viz

    weights = explanations[method].head_weights
    if weights is None:
        raise ValueError(f"{method}'s explanation has no head weights")
    return viz.head_weights_figure(weights[row].cpu(), f"{method} head weights: {title}")
