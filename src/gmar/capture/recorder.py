"""Attention capture: run a model once and keep every layer's attention, graph-connected.

:func:`frozen_eval` puts the model in eval mode with frozen parameters and restores both on exit;
:func:`capture` lets the model's adapter instrument it (hooks, fused-attention flags) for the
duration of a forward pass and checks that every layer reported exactly once. On request it also
keeps each block's output tokens, the tokens entering one block's first norm, and cuts the graph
between blocks (each block then reads a detached copy of its input that requires grad, so a
gradient taken at block ``l`` only sees block ``l``).

Two ways to capture the attention itself. By default the adapter runs the model's explicit
attention path and reports each layer's probabilities ``(B, H, N, N)``, which then lie on the
graph. With an :class:`AttentionStream` the adapter hands each layer's ``q, k, v`` to
:meth:`Recorder.attend` instead, and the stream computes the attention core in chunks of samples:
no layer's full probabilities are kept, and a method sees them, with their gradient, one chunk at
a time inside the backward pass.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from gmar.capture.locks import model_lock
from gmar.capture.rules import instrument_rules
from gmar.capture.stream import AttentionStream
from gmar.errors import CaptureError

if TYPE_CHECKING:
    from gmar.adapters.base import ModelAdapter


@dataclass
class Recorder:
    """Collects one attention tensor (and optionally one head-output tensor) per layer.

    Adapters call :meth:`attention` (or, with a stream, :meth:`attend`) and :meth:`head_output`
    from their hooks; block outputs and the norm input are recorded by :func:`capture` itself.

    Attributes:
        keep_head_outputs: record per-head outputs ``O_l`` (graph-connected).
        keep_block_outputs: record each block's output tokens, in the block's own layout.
        detach_from: blocks with this index and above read a detached copy of their input that
            requires grad (None: the graph is left whole).
        norm_input_layer: record the tokens entering this block's first norm (None: none).
        expects_attention: False when the attention is not instrumented (Grad-CAM alone): no layer reports.
        stream: if given, adapters route each layer's attention core through :meth:`attend`, and
            what the stream makes of it (a forward-only method's reduction, or nothing) is stored
            instead of the probabilities.
        head_mask: ``(B, L, H)`` factors on each head's output where it is recorded (0 switches a
            head off; a tensor that requires grad gives ``∂y/∂mask``), or None.
    """

    num_layers: int
    keep_head_outputs: bool = False
    keep_block_outputs: bool = False
    detach_from: int | None = None
    norm_input_layer: int | None = None
    stream: AttentionStream | None = None
    #: False: the attention is not captured (the layers are not expected to report)
    expects_attention: bool = True
    head_mask: torch.Tensor | None = None
    attentions: list[torch.Tensor | None] = field(init=False)
    reported: list[bool] = field(init=False)
    num_tokens: int | None = field(init=False, default=None)
    head_outputs: list[torch.Tensor | None] = field(init=False)
    block_outputs: list[torch.Tensor | None] = field(init=False)
    norm_input: torch.Tensor | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.attentions = [None] * self.num_layers
        self.reported = [False] * self.num_layers
        self.head_outputs = [None] * self.num_layers
        self.block_outputs = [None] * self.num_layers

    def attention(self, layer: int, probabilities: torch.Tensor) -> None:
        """Record the post-softmax attention ``(B, heads, N, N)`` of ``layer``."""
        self._report(layer, probabilities.shape[-1])
        self.attentions[layer] = probabilities

    def attend(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        scale: float,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``softmax(q kᵀ · scale + mask) v`` for ``layer`` through :attr:`stream`: ``(B, H, N, d)``.

        ``q, k, v`` are ``(B, H, N, d)``; ``mask`` is additive, broadcastable to ``(B, H, N, N)``.
        """
        if self.stream is None:
            raise CaptureError("Recorder.attend needs an AttentionStream")
        self._report(layer, k.shape[-2])
        output, self.attentions[layer] = self.stream.attend(layer, q, k, v, scale, mask)
        return output

    def attend_probabilities(self, layer: int, probabilities: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``probabilities @ v`` for ``layer``, when the model forms the probabilities itself (not as
        ``softmax(q kᵀ · scale + mask)``: CaiT's talking heads mix them across heads): ``(B, H, N, d)``.

        ``probabilities`` ``(B, H, N, N)`` lie on the graph, ``v`` is ``(B, H, N, d)``. Without a
        stream they are recorded as by :meth:`attention`; with one, the stream reduces them as it
        reduces the attention it computes (they are held whole, as the model holds them).
        """
        self._report(layer, probabilities.shape[-1])
        if self.stream is None:
            self.attentions[layer] = probabilities
            return probabilities @ v
        output, self.attentions[layer] = self.stream.attend_probabilities(layer, probabilities, v)
        return output

    def no_attention(self, layer: int, num_tokens: int) -> None:
        """``layer`` ran over ``num_tokens`` tokens with no global attention to record (windowed
        attention: see :attr:`ModelAdapter.no_global_attention`)."""
        self._report(layer, num_tokens)

    def _report(self, layer: int, num_tokens: int) -> None:
        if self.reported[layer]:
            raise CaptureError(f"layer {layer} ran twice in one forward pass; gmar captures one pass at a time")
        self.reported[layer] = True
        self.num_tokens = num_tokens

    def head_output(self, layer: int, heads: torch.Tensor) -> torch.Tensor:
        """Record the per-head context vectors ``(B, heads, N, head_dim)`` of ``layer``; return what
        the model goes on with: ``heads``, scaled by :attr:`head_mask` when one is set.

        Adapters call it at the one point where a layer's heads are separate, and continue with what
        it returns, so that the heads gmar reads and the heads it switches off are the same tensors.
        """
        if self.head_mask is not None:
            mask = self.head_mask[:, layer]
            if mask.shape != heads.shape[:2]:
                raise CaptureError(
                    f"a head mask of {tuple(mask.shape)} for layer {layer}'s heads {tuple(heads.shape[:2])} "
                    "(samples, heads)"
                )
            heads = heads * mask.to(heads)[:, :, None, None]
        if self.keep_head_outputs:
            self.head_outputs[layer] = heads
        return heads


@dataclass
class Captured:
    """What one captured forward pass produced."""

    output: torch.Tensor
    #: each layer's attention ``(B, H, N, N)``, or what the stream made of it (see ``Recorder``)
    attentions: list[torch.Tensor | None]
    head_outputs: list[torch.Tensor] | None
    #: each block's output tokens in the block's own layout (see ``ModelAdapter.block_tokens``)
    block_outputs: list[torch.Tensor] | None = None
    #: the tokens entering the first norm of block ``Recorder.norm_input_layer``
    norm_input: torch.Tensor | None = None
    #: the number of tokens ``N`` the attention ran over
    num_tokens: int = 0
    #: the stream the attention ran through, if any (its backward pass gives the reduced gradients)
    stream: AttentionStream | None = None
    #: the input the model ran on (on the graph when the pass takes gradients), when the caller kept it
    inputs: torch.Tensor | None = None


def split_heads_hook(layer: int, num_heads: int, recorder: Recorder) -> Callable:
    """A forward pre-hook for an attention block's output projection.

    The projection's input is the heads' context vectors concatenated, ``(B, N, heads * d)``. The
    hook records them as ``(B, heads, N, d)`` and feeds the projection a view of that tensor, so the
    recorded tensor lies on the graph and ``∂y/∂O`` can be asked of autograd directly.
    """

    def hook(module: nn.Module, args: tuple) -> tuple | None:
        if not recorder.keep_head_outputs and recorder.head_mask is None:
            return None
        merged = args[0]
        *lead, width = merged.shape
        heads = recorder.head_output(layer, merged.reshape(*lead, num_heads, width // num_heads).transpose(-3, -2))
        return (heads.transpose(-3, -2).reshape(*lead, width), *args[1:])

    return hook


@contextmanager
def capture(
    adapter: ModelAdapter,
    *,
    head_outputs: bool = False,
    block_outputs: bool = False,
    detach_from: int | None = None,
    norm_input_layer: int | None = None,
    stream: AttentionStream | None = None,
    attention: bool = True,
    leaf_at: int | None = None,
    head_mask: torch.Tensor | None = None,
) -> Iterator[Recorder]:
    """Instrument ``adapter.model`` for one forward pass; every hook and flag is undone on exit.

    Use :func:`collect` on the recorder after the forward pass to get the checked tensors. The
    options are those of :class:`Recorder`; ``attention=False`` leaves the attention modules alone
    (the model runs its own, fused, attention) and records only the blocks' tensors. ``leaf_at``
    gives block ``leaf_at`` a leaf copy of its input that requires grad: with an input image that
    does not, nothing before that block is recorded for the backward pass. Holds the model's lock
    (:func:`model_lock`) throughout.
    """
    recorder = Recorder(
        adapter.num_layers,
        keep_head_outputs=head_outputs,
        keep_block_outputs=block_outputs,
        detach_from=detach_from,
        norm_input_layer=norm_input_layer,
        stream=stream,
        expects_attention=attention,
        head_mask=head_mask,
    )
    instrumented = adapter.instrument(recorder) if attention else nullcontext()
    # LRP rules for the passes the stream will run (nothing when it runs none)
    rules = instrument_rules(adapter, stream) if stream is not None and stream.rules else nullcontext()
    with model_lock(adapter.model), instrumented, rules, _instrument_blocks(adapter, recorder, leaf_at):
        yield recorder


@contextmanager
def _instrument_blocks(adapter: ModelAdapter, recorder: Recorder, leaf_at: int | None = None) -> Iterator[None]:
    handles: list = []
    with ExitStack() as stack:
        stack.callback(lambda: [handle.remove() for handle in handles])
        for layer, block in enumerate(adapter.blocks):
            cut = recorder.detach_from is not None and layer >= recorder.detach_from
            if cut or layer == leaf_at:
                handles.append(block.register_forward_pre_hook(_detach_input, with_kwargs=True))
            if recorder.keep_block_outputs:
                handles.append(block.register_forward_hook(_block_output_hook(recorder, layer)))
        if recorder.norm_input_layer is not None:
            norm = adapter.first_norm(recorder.norm_input_layer)
            handles.append(norm.register_forward_pre_hook(_norm_input_hook(recorder)))
        yield


def _detach_input(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Give a block a leaf copy of its input tokens, so gradients stop at the block's input."""
    if args and isinstance(args[0], torch.Tensor):
        return (args[0].detach().requires_grad_(True), *args[1:]), kwargs
    for key in ("hidden_states", "x", "q_x"):
        if isinstance(kwargs.get(key), torch.Tensor):
            return args, {**kwargs, key: kwargs[key].detach().requires_grad_(True)}
    raise CaptureError(f"cannot find the input tokens of {type(module).__name__} to detach")


def _block_output_hook(recorder: Recorder, layer: int) -> Callable:
    def hook(module: nn.Module, args: tuple, output) -> None:
        tokens = output[0] if isinstance(output, tuple) else output
        if recorder.block_outputs[layer] is not None:
            raise CaptureError(f"block {layer} ran twice in one forward pass; gmar captures one pass at a time")
        recorder.block_outputs[layer] = tokens

    return hook


def _norm_input_hook(recorder: Recorder) -> Callable:
    def hook(module: nn.Module, args: tuple) -> None:
        if recorder.norm_input is not None:
            raise CaptureError("the chosen block ran twice in one forward pass; gmar captures one pass at a time")
        recorder.norm_input = args[0]

    return hook


def collect(recorder: Recorder, output: torch.Tensor, model: nn.Module) -> Captured:
    """Check that every layer reported and hand the tensors over; a missing layer is an error.

    The recorder lets go of them, so that whoever holds the :class:`Captured` decides how long
    each tensor lives.
    """
    missing = [i for i, reported in enumerate(recorder.reported) if not reported] if recorder.expects_attention else []
    name = type(model).__name__
    if len(missing) == recorder.num_layers:
        raise CaptureError(
            f"no attention was captured from {name}: its attention modules never ran the instrumented path"
        )
    if missing:
        raise CaptureError(f"attention of layers {missing} of {name} was not captured")
    if recorder.keep_head_outputs and any(h is None for h in recorder.head_outputs):
        raise CaptureError(f"per-head outputs of {name} were not captured")
    if recorder.keep_block_outputs and any(t is None for t in recorder.block_outputs):
        raise CaptureError(f"block outputs of {name} were not captured")
    if recorder.norm_input_layer is not None and recorder.norm_input is None:
        raise CaptureError(f"the input of block {recorder.norm_input_layer}'s first norm of {name} was not captured")
    captured = Captured(
        output=output,
        attentions=recorder.attentions,
        head_outputs=recorder.head_outputs if recorder.keep_head_outputs else None,  # type: ignore[arg-type]
        block_outputs=recorder.block_outputs if recorder.keep_block_outputs else None,  # type: ignore[arg-type]
        norm_input=recorder.norm_input,
        num_tokens=recorder.num_tokens or 0,
        stream=recorder.stream,
    )
    recorder.attentions, recorder.head_outputs, recorder.block_outputs = [], [], []
    recorder.norm_input = None
    return captured
