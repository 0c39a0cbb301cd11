"""The streamed attention core and its hand-written backward pass.

:class:`AttentionStream` computes every layer's ``softmax(q kᵀ · scale + mask) v`` in chunks of
samples, so that no layer's full probabilities ``(B, H, N, N)`` outlive their use, and hands each
chunk's probabilities (with their gradient, inside the backward pass) to the method that asked.
Rules that rewrite the backward pass of the attention (LRP) plug in here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from gmar.capture.rules import RuleSet
from gmar.errors import CaptureError, TargetError

#: The most bytes one chunk of a layer's probabilities ``(samples, H, N, N)`` takes in an
#: :class:`AttentionStream` (a chunk holds at least one sample). Small enough that glibc serves
#: the chunk's temporaries from its heap (it maps blocks above 32 MB afresh on every allocation,
#: and faulting those pages in made ViT-B/16 at 448 px 15-20 % slower with 64 MB chunks).
CHUNK_BYTES = 16 * 2**20
#: The same on an accelerator (CUDA, MPS, ...), where memory is no cache question but every chunk
#: costs a kernel launch per operation: the probabilities of ViT-B/16 at 224 px (1.9 MB a sample)
#: then fit a batch of 128 in one chunk, ViT-L/16 at 448 px (39 MB a sample) 6 samples.
ACCELERATOR_CHUNK_BYTES = 256 * 2**20


def chunk_bytes_for(device: torch.device) -> int:
    """The default chunk size of an :class:`AttentionStream` for tensors on ``device``."""
    return CHUNK_BYTES if device.type == "cpu" else ACCELERATOR_CHUNK_BYTES


GradientOf = Literal["attention", "output", "both"]


class AttentionStream:
    """Every layer's attention core ``O = softmax(q kᵀ · scale + mask) v``, computed in chunks of
    samples so that no layer's full probabilities ``P`` ``(B, H, N, N)`` outlive their use.

    - Without gradients (forward-only methods) ``reduce_attention(layer, P)`` runs on each chunk as
      it is formed, and the chunks' results are joined along the batch.
    - With gradients the forward pass keeps only ``q, k, v``, as a fused kernel does. In
      :meth:`backward` each chunk's ``P`` is formed again from ``q`` and ``k``, and the method's
      ``reduce(index, gradient, P)`` gets it with the gradient it asked for: ``∂y/∂P = ∂y/∂O · vᵀ``
      (``"attention"``) or ``∂y/∂O`` itself (``"output"``, the heads' outputs). The gradient goes on
      to ``q, k, v`` (softmax's backward, written out) only where the pass must go on below.

    ``reduce_attention`` and ``reduce`` work per sample, so joining chunks gives what one call on
    the whole batch would (up to float rounding). ``reduce`` must not keep its gradient argument:
    the buffer is reused for softmax's backward once it returns.
    """

    def __init__(
        self,
        num_layers: int,
        reduce_attention: Callable[[int, torch.Tensor], Any] | None = None,
        chunk_bytes: int | None = None,
        rules: Sequence[RuleSet] = (),
    ) -> None:
        self.reduce_attention = reduce_attention
        self.chunk_bytes = chunk_bytes
        #: the rule sets the forward pass prepares for (:func:`gmar.capture.rules.instrument_rules`)
        self.rules: tuple[RuleSet, ...] = tuple(dict.fromkeys(rules))
        #: the rule set of the backward pass now running, None in a true-gradient pass
        self.active_rules: RuleSet | None = None
        #: per layer, its core's inputs while a gradient pass may still need them
        self._inputs: list[_Core | None] = [None] * num_layers
        self._anchors: list[torch.Tensor | None] = [None] * num_layers
        self._pass: _Pass | None = None
        self._reducing: Callable[[torch.Tensor], Any] | None = None
        self._reduced: Any = None

    def attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, Any]:
        """Layer ``layer``'s output ``(B, H, N, d)`` and, without gradients, its joined reduction."""
        return self._attend(layer, _Core(v, q=q, k=k, scale=scale, mask=mask), (q, k, v))

    def attend_probabilities(
        self, layer: int, probabilities: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, Any]:
        """As :meth:`attend`, for probabilities ``(B, H, N, N)`` the model formed itself."""
        return self._attend(layer, _Core(v, given=probabilities), (probabilities, v))

    def _attend(self, layer: int, core: _Core, tensors: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, Any]:
        reduce = None if self.reduce_attention is None else partial(self.reduce_attention, layer)
        if not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
            if reduce is None and core.given is None:
                # No gradient and nothing to reduce (a pass that only switches heads off): no one reads
                # the probabilities, so the output comes from PyTorch's fused kernel.
                output = F.scaled_dot_product_attention(core.q, core.k, core.v, attn_mask=core.mask, scale=core.scale)
                return output, None
            return self._forward(core, reduce)
        # The anchor is a scalar input of the layer's node, so a backward pass can be asked to
        # reach exactly this layer (``autograd.grad(objective, anchor)``) and go no further.
        anchor = core.v.new_zeros((), requires_grad=True)
        self._anchors[layer] = anchor
        self._inputs[layer] = core
        # The node's forward reduces each chunk as it forms it (a forward-only method sharing the pass).
        self._reducing = reduce
        try:
            output = _StreamedAttention.apply(anchor, self, layer, core, *tensors)
        finally:
            self._reducing = None
        reduced, self._reduced = self._reduced, None
        return output, reduced

    def backward(
        self,
        objective: torch.Tensor,
        layers: Sequence[int],
        reduce: Callable[[int, torch.Tensor, torch.Tensor], Any],
        *,
        gradient_of: GradientOf = "attention",
        chained: bool = True,
        retain_graph: bool = False,
        extra: Sequence[torch.Tensor] = (),
        rules: RuleSet | None = None,
    ) -> list[Any]:
        """``[reduce(i, ∂ objective / ∂ X_i, P_i)]`` for the ``i``-th of ``layers``, one backward pass.

        ``X`` is the layer's probabilities or its heads' outputs (``gradient_of``; ``"both"`` hands
        ``reduce`` the pair ``(∂/∂P, ∂/∂O)``). ``chained``: every later layer lies on the graph
        between the objective and the first of ``layers``, so the pass stops there; otherwise it
        stops at each of them (a graph cut between blocks). A layer the objective does not reach is
        reduced from a zero gradient. ``extra`` tensors are differentiated in the same pass; their
        gradients (zeros where not reached) follow the layers' reductions in the returned list, and
        the pass goes on below the first layer when one of them lies there.

        With ``rules`` (one of the stream's :attr:`rules`) the pass is a modified one: every rewritten
        module and each attention core applies the rule set, and ``reduce`` gets a
        :class:`RelevanceChunk` in place of the gradient, whatever ``gradient_of`` says.
        """
        if rules is not None and rules not in self.rules:
            raise CaptureError(f"the forward pass was not instrumented for {rules!r}")
        if not objective.requires_grad:
            raise TargetError("the target scores do not depend on the model's output, so they have no gradient")
        missing = [layer for layer in layers if self._inputs[layer] is None]
        if missing:
            raise CaptureError(f"layers {missing} were not streamed with gradients (or their pass is over)")
        sinks = list(layers[:1]) if chained else list(layers)
        if chained and layers and any(_below(t, self._anchors[layers[0]]) for t in extra):
            sinks = []  # an extra tensor lies under the first layer: the pass runs through it
        run = _Pass({layer: i for i, layer in enumerate(layers)}, reduce, gradient_of, set(sinks), len(layers))
        self._pass, self.active_rules = run, rules
        try:
            anchors = [self._anchors[layer] for layer in sinks]
            grads = torch.autograd.grad(objective, [*anchors, *extra], allow_unused=True, retain_graph=retain_graph)
            reached = zip(extra, grads[len(anchors) :], strict=True)
            extra_grads = [torch.zeros_like(t) if g is None else g for t, g in reached]
            for layer, index in run.position.items():
                if not run.done[index]:  # not reached: its gradient is zero
                    core = self._inputs[layer]
                    batch, heads, queries, keys = core.shape  # type: ignore[union-attr]
                    on_p = core.v.new_zeros(()).expand(batch, heads, queries, keys)  # type: ignore[union-attr]
                    on_o = core.v.new_zeros(()).expand(batch, heads, queries, core.v.shape[-1])  # type: ignore[union-attr]
                    for rows in self._chunks(core):  # type: ignore[arg-type]
                        p = core.probabilities(rows)  # type: ignore[union-attr]
                        if rules is not None:
                            gradient = RelevanceChunk(rows, None, on_o[rows], p, core.v[rows])  # type: ignore[union-attr]
                        else:
                            gradient = _gradient(gradient_of, on_p[rows], on_o[rows])
                        run.results[index].append(reduce(index, gradient, p))
        finally:
            self._pass, self.active_rules = None, None
            if not retain_graph:
                self.close()
        return [join_chunks(parts) for parts in run.results] + extra_grads

    def close(self) -> None:
        """Let go of every layer's ``q, k, v``. The graph's nodes refer to the stream, so until
        then a graph that no backward pass consumed would be kept alive by a reference cycle."""
        self._inputs = [None] * len(self._inputs)
        self._anchors = [None] * len(self._anchors)

    def _forward(self, core: _Core, reduce: Callable[[torch.Tensor], Any] | None = None):
        """The core's output, chunk by chunk, and ``reduce`` of each chunk's probabilities, joined."""
        outputs, parts = [], []
        for rows in self._chunks(core):
            p = core.probabilities(rows)
            parts.append(None if reduce is None else reduce(p))
            outputs.append(p @ core.v[rows])
        return join_chunks(outputs), join_chunks(parts)

    def _chunks(self, core: _Core) -> list[slice]:
        batch, heads, queries, keys = core.shape
        per_sample = heads * queries * keys * core.v.element_size()
        budget = chunk_bytes_for(core.v.device) if self.chunk_bytes is None else self.chunk_bytes
        step = max(1, budget // max(1, per_sample))
        return [slice(start, min(start + step, batch)) for start in range(0, batch, step)]

    def _backward(self, layer: int, core: _Core, grad_output: torch.Tensor, needs: tuple) -> tuple:
        """Gradients for the core's tensors (``q, k, v``, or the given probabilities and ``v``)."""
        run = self._pass
        index = None if run is None else run.position.get(layer)
        go_on = (run is None or layer not in run.sinks) and any(needs)
        if index is None and not go_on:
            return (None,) * len(needs)
        v = core.v
        grad_output = grad_output.to(v.dtype)
        if self.active_rules is not None:
            return self._backward_with_rules(self.active_rules, run, index, go_on, core, grad_output, needs)
        tensors = (core.given, v) if core.given is not None else (core.q, core.k, v)
        grads = [torch.empty_like(t) if go_on and need else None for t, need in zip(tensors, needs, strict=True)]
        grad_v = grads[-1]
        wants_p = run is not None and index is not None and run.gradient_of != "output"
        for rows in self._chunks(core):
            p = core.probabilities(rows)
            g_o = grad_output[rows]
            g_p = g_o @ v[rows].transpose(-2, -1) if go_on or wants_p else None
            if index is not None:
                run.results[index].append(run.reduce(index, _gradient(run.gradient_of, g_p, g_o), p))  # type: ignore[union-attr,arg-type]
            if not go_on:
                continue
            if grad_v is not None:
                grad_v[rows] = p.transpose(-2, -1) @ g_o
            if core.given is not None:
                if grads[0] is not None:
                    grads[0][rows] = g_p
                continue
            grad_q, grad_k, q, k, scale = grads[0], grads[1], core.q, core.k, core.scale
            # softmax's backward, G_S = P ⊙ (G_P - rowsum(G_P ⊙ P)), in G_P's buffer (one name
            # for it, so the buffer goes when the next chunk's G_P takes the name)
            g_p.sub_((g_p * p).sum(dim=-1, keepdim=True)).mul_(p)  # type: ignore[union-attr]
            if grad_q is not None:
                grad_q[rows] = (g_p @ k[rows]) * scale  # type: ignore[index]
            if grad_k is not None:
                grad_k[rows] = (g_p.transpose(-2, -1) @ q[rows]) * scale  # type: ignore[union-attr,index]
        if index is not None:
            run.done[index] = True  # type: ignore[union-attr]
        return tuple(grads)

    def _backward_with_rules(
        self, rules: RuleSet, run: _Pass | None, index: int | None, go_on: bool, core: _Core, g: torch.Tensor, needs
    ) -> tuple:
        """:meth:`_backward` in a modified pass: the rule set's attention rule, chunk by chunk."""
        tensors = (core.given, core.v) if core.given is not None else (core.q, core.k, core.v)
        wanted = tuple(go_on and need for need in needs)
        grads: list[torch.Tensor | None] = [None] * len(tensors)
        for rows in self._chunks(core):
            p = core.probabilities(rows)
            q = None if core.q is None else core.q[rows]
            k = None if core.k is None else core.k[rows]
            result = rules.attention(p, core.v[rows], g[rows], q, k, core.scale, wanted)
            if index is not None:
                chunk = RelevanceChunk(rows, result.at_probabilities, g[rows], p, core.v[rows])
                run.results[index].append(run.reduce(index, chunk, p))  # type: ignore[union-attr]
            parts = (result.q, result.v) if core.given is not None else (result.q, result.k, result.v)
            for i, part in enumerate(parts):
                if part is not None and wanted[i]:
                    if grads[i] is None:
                        grads[i] = torch.zeros_like(tensors[i])  # type: ignore[arg-type]
                    grads[i][rows] = part  # type: ignore[index]
        if index is not None:
            run.done[index] = True  # type: ignore[union-attr]
        return tuple(grads)


@dataclass(frozen=True)
class RelevanceChunk:
    """What a reduction gets in a modified backward pass, for the samples ``rows`` of one layer: what
    the rule set sends to the probabilities (None when it sends them nothing), what arrives at the
    heads' outputs ``(b, H, N, d)``, the probabilities ``(b, H, N, N)`` and the values ``(b, H, N, d)``."""

    rows: slice
    at_probabilities: torch.Tensor | None
    at_output: torch.Tensor
    probabilities: torch.Tensor
    values: torch.Tensor

    def head_relevance(self, convention: str) -> torch.Tensor:
        """Each head's relevance ``(b, H)``: ``Σ O ⊙ g`` (gradient convention) or ``Σ R_O`` (relevance)."""
        if convention == "gradient":
            return ((self.probabilities @ self.values) * self.at_output).sum(dim=(-2, -1))
        return self.at_output.sum(dim=(-2, -1))


@dataclass
class _Core:
    """One layer's attention core: ``softmax(q kᵀ · scale + mask)`` formed from ``q, k`` chunk by
    chunk, or the probabilities the model formed itself (``given``); ``v`` ``(B, H, N, d)``."""

    v: torch.Tensor
    q: torch.Tensor | None = None
    k: torch.Tensor | None = None
    scale: float = 1.0
    mask: torch.Tensor | None = None
    given: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(B, H, queries, keys)`` of the probabilities."""
        if self.given is not None:
            return tuple(self.given.shape)  # type: ignore[return-value]
        return (*self.q.shape[:3], self.k.shape[-2])  # type: ignore[union-attr,return-value]

    def probabilities(self, rows: slice) -> torch.Tensor:
        if self.given is not None:
            return self.given[rows]
        return _probabilities(self.q[rows], self.k[rows], self.scale, _rows(self.mask, rows))  # type: ignore[index]


@dataclass
class _Pass:
    """One :meth:`AttentionStream.backward` call: where each layer's reduction goes."""

    position: dict[int, int]
    reduce: Callable[[int, torch.Tensor, torch.Tensor], Any]
    gradient_of: GradientOf
    sinks: set[int]
    count: int
    results: list[list] = field(init=False)
    done: list[bool] = field(init=False)

    def __post_init__(self) -> None:
        self.results = [[] for _ in range(self.count)]
        self.done = [False] * self.count


class _StreamedAttention(torch.autograd.Function):
    """The attention core as one autograd node that saves its inputs (``q, k, v``, or the given
    probabilities and ``v``) and nothing ``N × N`` of its own."""

    @staticmethod
    def forward(ctx, anchor, stream: AttentionStream, layer: int, core: _Core, *tensors):  # type: ignore[override]
        ctx.save_for_backward(*tensors)
        ctx.stream, ctx.layer, ctx.scale, ctx.mask = stream, layer, core.scale, core.mask
        ctx.given = core.given is not None
        output, stream._reduced = stream._forward(core, stream._reducing)
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):  # type: ignore[override]
        saved = ctx.saved_tensors
        if ctx.given:
            core = _Core(saved[1], given=saved[0])
        else:
            core = _Core(saved[2], q=saved[0], k=saved[1], scale=ctx.scale, mask=ctx.mask)
        needs = tuple(ctx.needs_input_grad[4:])
        grads = ctx.stream._backward(ctx.layer, core, grad_output, needs)
        return (grad_output.new_zeros(()), None, None, None, *grads)


def _gradient(gradient_of: GradientOf, on_p: torch.Tensor | None, on_o: torch.Tensor) -> Any:
    """What a reduction gets: the gradient at the probabilities, at the heads' outputs, or both."""
    if gradient_of == "both":
        return on_p, on_o
    return on_p if gradient_of == "attention" else on_o


def _below(tensor: torch.Tensor, anchor: torch.Tensor | None) -> bool:
    """Whether ``tensor`` lies under the layer that ``anchor`` feeds: its graph does not reach the anchor."""
    if anchor is None:
        return False
    seen, todo = set(), [tensor.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        if getattr(node, "variable", None) is anchor:
            return False
        seen.add(node)
        todo.extend(next_node for next_node, _ in node.next_functions)
    return True


def _probabilities(q: torch.Tensor, k: torch.Tensor, scale: float, mask: torch.Tensor | None) -> torch.Tensor:
    scores = (q * scale) @ k.transpose(-2, -1)
    if mask is not None:
        scores = scores + mask
    # at least float32 inside the softmax, as the models' own half-precision paths do
    return scores.softmax(dim=-1, dtype=torch.promote_types(q.dtype, torch.float32)).to(q.dtype)


def _rows(mask: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
    if mask is None or mask.dim() < 4 or mask.shape[0] == 1:
        return mask
    return mask[rows]


def join_chunks(parts: list) -> Any:
    """Join per-chunk results along the batch: tensors are concatenated, tuples joined item by
    item, None stays None."""
    first = parts[0] if parts else None
    if first is None:
        return None
    if isinstance(first, torch.Tensor):
        return first if len(parts) == 1 else torch.cat(parts)
    if isinstance(first, tuple):
        return tuple(join_chunks([part[i] for part in parts]) for i in range(len(first)))
    raise TypeError(f"cannot join chunk results of type {type(first).__name__}")
