"""Several methods from one pass.

Five methods read the same thing: each layer's attention probabilities and the gradient of the same
target at them (``raw_attention`` and ``rollout`` the probabilities alone, ``grad_rollout``, ``gae``
and ``gmar`` with the gradient at the probabilities or at the heads' outputs), and Grad-CAM's
gradient at a block's input lies on the same backward pass. :func:`explain_jointly` runs them
together: one captured forward pass, in which every forward-only method reduces each chunk of
probabilities as the stream forms it, and one backward pass, in which every gradient method reduces
each layer's chunk of probabilities and gradients (the stream forms both once and hands them to each
method in turn). Every method then makes its own map from its own reductions, exactly as when it
runs alone. A method whose pass differs runs on its own: LeGrad, whose graph is cut between blocks,
and any explainer with ``low_memory = False``.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch

from gmar.capture import Captured
from gmar.explanation import Explanation
from gmar.layout import TokenLayout
from gmar.methods.base import Explainer, forward_pass
from gmar.methods.relevance import RelevanceMethod
from gmar.targets import Target


def shares_the_pass(explainer: Explainer) -> bool:
    """Whether ``explainer`` can take part in the joint pass (else it runs on its own)."""
    if explainer.runs_alone:
        return False
    streams = explainer.low_memory or bool(explainer.stream_rules())
    return streams and (not explainer.uses_gradients or explainer.chained_gradients)


def explain_jointly(explainers: Sequence[Explainer], images: torch.Tensor, target: Target = None) -> list[Explanation]:
    """Each explainer's explanation of ``images`` for ``target``, in order: the ones that
    :func:`shares_the_pass` from one forward and at most one backward pass, the others alone.

    All explainers must explain the same model. The result equals calling each one alone (up to float
    rounding: the reductions are the same functions on the same chunks).
    """
    if not explainers:
        return []
    model = explainers[0].model
    if any(e.model is not model for e in explainers):
        raise ValueError("explain_jointly takes explainers of one model")
    joint = [e for e in explainers if shares_the_pass(e)]
    # One block input per pass: a second Grad-CAM on another block runs on its own.
    layers = [e.capture_options().get("norm_input_layer") for e in joint]
    blocks = {layer for layer in layers if layer is not None}
    if len(blocks) > 1:
        first = next(layer for layer in layers if layer is not None)
        joint = [e for e, layer in zip(joint, layers, strict=True) if layer in (None, first)]
    results = dict(zip(map(id, joint), _joint(joint, images, target), strict=True)) if len(joint) > 1 else {}
    return [results[id(e)] if id(e) in results else e(images, target) for e in explainers]


def _joint(explainers: list[Explainer], images: torch.Tensor, target: Target) -> list[Explanation]:
    first = explainers[0]
    images, layout = first.inputs(images, target)
    forward_only = [e for e in explainers if not e.uses_gradients]
    gradient = [e for e in explainers if e.uses_gradients]
    block_input = next((e for e in gradient if e.capture_options().get("norm_input_layer") is not None), None)
    relevance_methods = [e for e in gradient if isinstance(e, RelevanceMethod)]
    # the true pass: every gradient method's, and the true half of a relevance method that reads it
    true_methods = [e for e in gradient if e is not block_input and not isinstance(e, RelevanceMethod)]
    true_methods += [e for e in relevance_methods if e.true_pass]
    rules = tuple(dict.fromkeys(r for e in explainers for r in e.stream_rules()))
    uses_gradients = bool(gradient)

    def reduce_attention(layer: int, attention: torch.Tensor) -> tuple:
        return _once(forward_only, lambda e: e.reduce_attention(layer, attention))

    options = {} if block_input is None else {"norm_input_layer": block_input.capture_options()["norm_input_layer"]}
    with forward_pass(
        first.adapter,
        images,
        layout,
        target,
        gradients=uses_gradients,
        capture_options=options,
        reduce_attention=reduce_attention if forward_only else None,
        rules=rules,
    ) as run:
        captured, scores, classes = run.captured, run.scores, run.classes
        reduced: dict[int, Any] = {}
        if true_methods or block_input is not None:
            true = _backward(
                true_methods,
                block_input,
                captured,
                scores,
                layout,
                retain_graph=bool(relevance_methods),  # type: ignore[arg-type]
            )
            reduced.update(true)
        if relevance_methods:
            reduced.update(_relevance_passes(relevance_methods, captured, scores, reduced))  # type: ignore[arg-type]
        for position, explainer in enumerate(forward_only):
            reduced[id(explainer)] = [None if r is None else r[position] for r in captured.attentions]
        maps, heads, pixels = {}, {}, {}
        with torch.no_grad():
            for explainer in explainers:
                maps[id(explainer)] = explainer.relevance(captured, reduced[id(explainer)], layout)
                heads[id(explainer)] = explainer.head_scores(reduced[id(explainer)])
                pixels[id(explainer)] = explainer.pixel_map(captured, reduced[id(explainer)], layout)
    return [
        e.explanation(
            *maps[id(e)],  # type: ignore[misc]
            captured,
            scores,
            classes,
            layout,
            images,
            target,
            head_scores=heads[id(e)],
            pixels=pixels[id(e)],
        )
        for e in explainers
    ]


def _backward(
    methods: list[Explainer],
    block_input: Explainer | None,
    captured: Captured,
    scores: torch.Tensor,
    layout: TokenLayout,
    retain_graph: bool = False,
) -> dict[int, list[Any]]:
    """One backward pass of the summed scores: each attention method's per-layer reductions, and
    Grad-CAM's from the gradient at the block input it reads (``retain_graph``: modified passes follow)."""
    stream = captured.stream
    assert stream is not None
    layers = list(range(len(captured.attentions)))

    def reduce(index: int, gradients: tuple[torch.Tensor, torch.Tensor], attention: torch.Tensor) -> tuple:
        on_attention, on_output = gradients
        with torch.no_grad():
            return _once(
                methods,
                lambda e: e.reduce_gradient(
                    layers[index], on_output if e.gradient_of == "output" else on_attention, attention, captured, layout
                ),
            )

    extra = [] if block_input is None else [captured.norm_input]
    results = stream.backward(
        scores.sum(), layers, reduce, gradient_of="both", chained=True, extra=extra, retain_graph=retain_graph
    )
    per_layer, extra_gradients = results[: len(layers)], results[len(layers) :]
    reduced = {id(e): [r[position] for r in per_layer] for position, e in enumerate(methods)}
    if block_input is not None:
        with torch.no_grad():
            gradient = extra_gradients[0]
            reduced[id(block_input)] = [block_input.reduce_gradient(0, gradient, None, captured, layout)]
    return reduced


def _relevance_passes(
    methods: list[RelevanceMethod], captured: Captured, scores: torch.Tensor, true: dict[int, list[Any]]
) -> dict[int, tuple]:
    """One modified backward pass per rule set, shared by the methods that use it: each method's
    ``(true, per layer, inputs)`` as :meth:`RelevanceMethod.relevance_pass` gives it alone."""
    stream = captured.stream
    assert stream is not None
    groups: dict[Any, list[RelevanceMethod]] = {}
    for method in methods:
        groups.setdefault(method.rules, []).append(method)
    own = {id(m): dict(enumerate(true[id(m)])) if m.true_pass else None for m in methods}
    results: dict[int, tuple] = {}
    for number, (rules, members) in enumerate(groups.items()):
        wanted = {id(m): set(m.relevance_layers()) for m in members}
        layers = sorted(set().union(*wanted.values()))
        to_input = any(m.needs_input_relevance for m in members)

        def reduce(index: int, chunk: Any, attention: torch.Tensor, members=members, wanted=wanted, layers=layers):
            layer = layers[index]
            with torch.no_grad():
                return tuple(
                    m.reduce_relevance(layer, chunk, None if own[id(m)] is None else own[id(m)].get(layer))  # type: ignore[union-attr]
                    if layer in wanted[id(m)]
                    else None
                    for m in members
                )

        extra = [captured.inputs] if to_input else []
        last = number == len(groups) - 1
        passed = stream.backward(
            scores.sum(),
            layers,
            reduce,
            chained=True,
            extra=extra,
            rules=rules,
            retain_graph=not last,  # type: ignore[arg-type]
        )
        per_layer = passed[: len(layers)]
        for position, member in enumerate(members):
            mine = {layer: per_layer[i][position] for i, layer in enumerate(layers) if layer in wanted[id(member)]}
            inputs = passed[len(layers)] if member.needs_input_relevance else None
            results[id(member)] = (own[id(member)], mine, inputs)
    return results


def _once(explainers: list[Explainer], reduce: Callable[[Explainer], Any]) -> tuple:
    """``reduce`` of each explainer, computed once per :meth:`Explainer.reduction_key` (GAE and gradient
    rollout, say, reduce each layer alike)."""
    done: dict[Hashable, Any] = {}
    results = []
    for explainer in explainers:
        key = explainer.reduction_key()
        if key not in done:
            done[key] = reduce(explainer)
        results.append(done[key])
    return tuple(results)
