"""The explanation methods, one per module, by name.

========================  ===================  =========================================================
module                    class                method
========================  ===================  =========================================================
:mod:`.gmar`              :class:`GMAR`        ``gmar``: gradient-weighted heads, rolled out
:mod:`.rollout`           AttentionRollout     ``rollout``: attention rollout
:mod:`.grad_rollout`      GradientRollout      ``grad_rollout``: rollout of gradient-weighted attention
:mod:`.gae`               GAE                  ``gae``: Chefer et al.'s generic attention explainability
:mod:`.gmar_gae`          HeadWeightedGAE      ``gmar_gae``: GMAR's head weights inside GAE
:mod:`.legrad`            LeGrad               ``legrad``: every layer's own score
:mod:`.gradcam`           GradCAM              ``gradcam``: Grad-CAM on a block's tokens
:mod:`.raw_attention`     RawAttention         ``raw_attention``: the last layer's attention
:mod:`.occlusion`         Occlusion            ``occlusion``: the score's drop when patches are hidden
:mod:`.attnlrp`           AttnLRP              ``attnlrp``: AttnLRP, input × modified gradient
:mod:`.transformer_attr…  TransformerAttri…    ``transformer_attribution``: Chefer et al.'s LRP-based rollout
:mod:`.partial_lrp`       PartialLRP           ``partial_lrp``: the last layer's attention relevance
========================  ===================  =========================================================

What they share: :mod:`.base` (:class:`Explainer` and :func:`~gmar.methods.base.forward_pass`, the one
captured forward pass), :mod:`.functional` (the pure maths), :mod:`.joint` (several methods from one
pass), :mod:`.heads` (each head's attention), :mod:`.relevance` (what the LRP methods share) and
:mod:`.registry`, which every front end asks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from gmar.adapters import get_adapter
from gmar.explanation import Explanation
from gmar.methods.base import Explainer
from gmar.methods.registry import (
    METHODS,
    all_methods,
    available_methods,
    get_method,
    register,
    registered,
    unregister,
)

# Each module registers its method as it is imported: this order is available_methods()' order.
# isort: off
from gmar.methods.gmar import GMAR
from gmar.methods.rollout import AttentionRollout
from gmar.methods.grad_rollout import GradientRollout
from gmar.methods.gae import GAE
from gmar.methods.gmar_gae import HeadWeightedGAE
from gmar.methods.legrad import LeGrad
from gmar.methods.gradcam import GradCAM
from gmar.methods.raw_attention import RawAttention
from gmar.methods.occlusion import Occlusion
from gmar.methods.attnlrp import AttnLRP
from gmar.methods.transformer_attribution import TransformerAttribution
from gmar.methods.partial_lrp import PartialLRP

# isort: on
from gmar.methods.heads import head_attention
from gmar.methods.joint import explain_jointly
from gmar.targets import Target


def select_methods(spec: str) -> list[str]:
    """``"all"`` (:func:`all_methods`) or comma-separated method names to a checked list (command lines)."""
    from gmar.errors import GmarError

    names = all_methods() if spec.strip() == "all" else [m.strip() for m in spec.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        raise GmarError(f"unknown method(s) {', '.join(unknown) or spec!r}; choose from {', '.join(METHODS)}")
    repeated = sorted({m for m in names if names.count(m) > 1}, key=names.index)
    if repeated:
        import sys

        print(f"gmar: note: {', '.join(repeated)} named twice or more; each runs once", file=sys.stderr)
    return list(dict.fromkeys(names))


def methods_for(model: nn.Module, spec: str | Sequence[str] = "all") -> list[str]:
    """The methods to explain ``model`` with, the one answer every front end asks for.

    ``"all"`` is every method of :func:`all_methods` defined for the model (:func:`supported_methods`);
    names, as a list or comma-separated, are checked and deduplicated (:func:`select_methods`), and one
    the model cannot run is refused with its reason (:class:`~gmar.errors.UnsupportedModelError`, one
    line that names the methods that can).
    """
    text = spec if isinstance(spec, str) else ",".join(spec)
    names = select_methods(text)
    if text.strip() == "all":
        return supported_methods(model)
    adapter = get_adapter(model)
    for name in names:
        refusal = get_method(name).refusal(adapter)
        if refusal is not None:
            from gmar.errors import UnsupportedModelError

            raise UnsupportedModelError(refusal)
    return names


def explain(
    model: nn.Module,
    images: torch.Tensor,
    method: str | Sequence[str] = "gmar",
    target: Target = None,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    **method_options: Any,
) -> Explanation | dict[str, Explanation]:
    """Explain ``images`` ``(B, 3, H, W)`` with ``method``.

    ``method`` is one name (the result is its :class:`Explanation`; ``method_options`` go to the
    method's class), a list of names, or ``"all"`` (every method defined for this model). For several
    methods the result is a ``dict`` name -> :class:`Explanation` in the order asked, each equal to
    the single-method call, and ``options`` maps a method's name to its options, e.g.
    ``options={"gmar": {"norm": "l2"}, "rollout": {"head_fusion": "max"}}``. Methods that read the
    same attention and gradient share one forward and one backward pass
    (:func:`gmar.methods.joint.explain_jointly`).
    """
    if isinstance(method, str) and method != "all":
        if options:
            raise TypeError("options={...} is for several methods; give one method's options as keyword arguments")
        return build(method, model, method_options)(images, target)
    if method_options:
        raise TypeError(
            f"with several methods, give each one's options as options={{name: {{...}}}}, not {sorted(method_options)}"
        )
    options = dict(options or {})
    if method == "all":
        names = supported_methods(model, options)
    else:
        names = list(method)
        unknown = [m for m in [*names, *options] if m not in METHODS]
        if unknown or not names:
            raise ValueError(f"unknown method(s) {unknown or names!r}; available: {', '.join(METHODS)}")
        if len(set(names)) != len(names):
            raise ValueError(f"a method is named twice in {names}")
    stray = [m for m in options if m not in names]
    if stray:
        raise ValueError(f"options given for {stray}, which are not among the methods {names}")
    explainers = [build(name, model, options.get(name, {})) for name in names]
    return dict(zip(names, explain_jointly(explainers, images, target), strict=True))


def build(name: str, model: nn.Module, options: Mapping[str, Any]) -> Explainer:
    """The explainer ``name`` for ``model`` with ``options`` (checked by :func:`check_options`)."""
    check_options(name, options)
    return get_method(name)(model, **options)


def check_options(name: str, options: Mapping[str, Any]) -> None:
    """Refuse, in one line that lists the method's options, an option method ``name`` does not take."""
    import inspect

    parameters = inspect.signature(get_method(name).__init__).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    known = [p for p in parameters if p not in ("self", "model")]
    unknown = [key for key in options if key not in known]
    if unknown and not takes_any:
        raise ValueError(f"{name} takes no option {unknown[0]!r}; its options: {', '.join(known) or 'none'}")


def supported_methods(model: nn.Module, options: Mapping[str, Mapping[str, Any]] | None = None) -> list[str]:
    """The methods of :func:`all_methods` defined for ``model`` (an attention-pooled model has no
    readout token for the rollout family, for instance), in :func:`available_methods`' order."""
    from gmar.errors import UnsupportedModelError

    names = []
    for name, cls in METHODS.items():
        if not cls.in_all:
            continue
        try:
            cls(model, **(options or {}).get(name, {}))
        except UnsupportedModelError:
            continue
        names.append(name)
    if not names:
        get_adapter(model)  # the model itself is refused: say why
    return names


__all__ = [
    "GAE",
    "GMAR",
    "METHODS",
    "GradCAM",
    "LeGrad",
    "AttentionRollout",
    "AttnLRP",
    "Explainer",
    "GradientRollout",
    "HeadWeightedGAE",
    "Occlusion",
    "PartialLRP",
    "RawAttention",
    "TransformerAttribution",
    "all_methods",
    "available_methods",
    "check_options",
    "explain",
    "explain_jointly",
    "get_method",
    "head_attention",
    "methods_for",
    "register",
    "registered",
    "select_methods",
    "supported_methods",
    "unregister",
]
