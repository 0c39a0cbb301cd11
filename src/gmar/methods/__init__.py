"""The explanation methods, by name."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from gmar.explanation import Explanation
from gmar.methods.base import Explainer
from gmar.methods.explainers import GAE, GMAR, AttentionRollout, GradCAM, GradientRollout, LeGrad, RawAttention
from gmar.targets import Target

METHODS: dict[str, type[Explainer]] = {
    cls.name: cls for cls in (GMAR, AttentionRollout, GradientRollout, GAE, LeGrad, GradCAM, RawAttention)
}


def available_methods() -> list[str]:
    """Names accepted by :func:`explain` and ``gmar explain --method``."""
    return list(METHODS)


def select_methods(spec: str) -> list[str]:
    """``"all"`` or comma-separated method names to a checked list (command lines)."""
    from gmar.errors import GmarError

    names = available_methods() if spec.strip() == "all" else [m.strip() for m in spec.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        raise GmarError(f"unknown method(s) {', '.join(unknown) or spec!r}; choose from {', '.join(METHODS)}")
    return names


def get_method(name: str) -> type[Explainer]:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(METHODS)}") from None


def explain(
    model: nn.Module, images: torch.Tensor, method: str = "gmar", target: Target = None, **options: Any
) -> Explanation:
    """Explain ``images`` ``(B, 3, H, W)`` with ``method``; ``options`` go to the method's class."""
    return get_method(method)(model, **options)(images, target)


__all__ = [
    "GAE",
    "GMAR",
    "METHODS",
    "GradCAM",
    "LeGrad",
    "AttentionRollout",
    "Explainer",
    "GradientRollout",
    "RawAttention",
    "available_methods",
    "explain",
    "get_method",
    "select_methods",
]
