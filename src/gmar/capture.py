"""Attention capture: run a model once and keep every layer's attention, graph-connected.

:func:`frozen_eval` puts the model in eval mode with frozen parameters and restores both on exit;
:func:`capture` lets the model's adapter instrument it (hooks, fused-attention flags) for the
duration of a forward pass and checks that every layer reported exactly once. On request it also
keeps each block's output tokens, the tokens entering one block's first norm, and cuts the graph
between blocks (each block then reads a detached copy of its input that requires grad, so a
gradient taken at block ``l`` only sees block ``l``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from gmar.errors import CaptureError

if TYPE_CHECKING:
    from gmar.adapters.base import ModelAdapter


@contextmanager
def frozen_eval(model: nn.Module) -> Iterator[None]:
    """Eval mode and ``requires_grad=False`` on every parameter for the block; both restored on exit.

    With frozen parameters no gradient can reach any ``.grad``, and autograd never computes one.
    """
    modes = [(module, module.training) for module in model.modules()]
    flags = [(param, param.requires_grad) for param in model.parameters()]
    try:
        model.eval()
        for param, _ in flags:
            param.requires_grad_(False)
        yield
    finally:
        for module, training in modes:
            module.training = training
        for param, requires_grad in flags:
            param.requires_grad_(requires_grad)


@dataclass
class Recorder:
    """Collects one attention tensor (and optionally one head-output tensor) per layer.

    Adapters call :meth:`attention` and :meth:`head_output` from their hooks; block outputs and
    the norm input are recorded by :func:`capture` itself.

    Attributes:
        keep_head_outputs: record per-head outputs ``O_l`` (graph-connected).
        keep_block_outputs: record each block's output tokens, in the block's own layout.
        detach_from: blocks with this index and above read a detached copy of their input that
            requires grad (None: the graph is left whole).
        norm_input_layer: record the tokens entering this block's first norm (None: none).
        reduce_attention: if given, ``reduce_attention(layer, probabilities)`` is stored instead of
            the probabilities (None drops the layer), so a forward-only method never holds more
            than one layer's ``(B, H, N, N)`` at a time.
    """

    num_layers: int
    keep_head_outputs: bool = False
    keep_block_outputs: bool = False
    detach_from: int | None = None
    norm_input_layer: int | None = None
    reduce_attention: Callable[[int, torch.Tensor], torch.Tensor | None] | None = None
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
        if self.reported[layer]:
            raise CaptureError(f"layer {layer} ran twice in one forward pass; gmar captures one pass at a time")
        self.reported[layer] = True
        self.num_tokens = probabilities.shape[-1]
        reduce = self.reduce_attention
        self.attentions[layer] = probabilities if reduce is None else reduce(layer, probabilities)

    def head_output(self, layer: int, heads: torch.Tensor) -> None:
        """Record the per-head context vectors ``(B, heads, N, head_dim)`` of ``layer``."""
        if self.keep_head_outputs:
            self.head_outputs[layer] = heads


@dataclass
class Captured:
    """What one captured forward pass produced."""

    output: torch.Tensor
    #: each layer's attention ``(B, H, N, N)``, or what ``Recorder.reduce_attention`` made of it
    attentions: list[torch.Tensor | None]
    head_outputs: list[torch.Tensor] | None
    #: each block's output tokens in the block's own layout (see ``ModelAdapter.block_tokens``)
    block_outputs: list[torch.Tensor] | None = None
    #: the tokens entering the first norm of block ``Recorder.norm_input_layer``
    norm_input: torch.Tensor | None = None
    #: the number of tokens ``N`` the attention ran over
    num_tokens: int = 0


def split_heads_hook(layer: int, num_heads: int, recorder: Recorder) -> Callable:
    """A forward pre-hook for an attention block's output projection.

    The projection's input is the heads' context vectors concatenated, ``(B, N, heads * d)``. The
    hook records them as ``(B, heads, N, d)`` and feeds the projection a view of that tensor, so the
    recorded tensor lies on the graph and ``∂y/∂O`` can be asked of autograd directly.
    """

    def hook(module: nn.Module, args: tuple) -> tuple | None:
        if not recorder.keep_head_outputs:
            return None
        merged = args[0]
        *lead, width = merged.shape
        heads = merged.reshape(*lead, num_heads, width // num_heads).transpose(-3, -2)
        recorder.head_output(layer, heads)
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
    reduce_attention: Callable[[int, torch.Tensor], torch.Tensor | None] | None = None,
) -> Iterator[Recorder]:
    """Instrument ``adapter.model`` for one forward pass; every hook and flag is undone on exit.

    Use :func:`collect` on the recorder after the forward pass to get the checked tensors. The
    options are those of :class:`Recorder`.
    """
    recorder = Recorder(
        adapter.num_layers,
        keep_head_outputs=head_outputs,
        keep_block_outputs=block_outputs,
        detach_from=detach_from,
        norm_input_layer=norm_input_layer,
        reduce_attention=reduce_attention,
    )
    with adapter.instrument(recorder), _instrument_blocks(adapter, recorder):
        yield recorder


@contextmanager
def _instrument_blocks(adapter: ModelAdapter, recorder: Recorder) -> Iterator[None]:
    handles: list = []
    with ExitStack() as stack:
        stack.callback(lambda: [handle.remove() for handle in handles])
        for layer, block in enumerate(adapter.blocks):
            if recorder.detach_from is not None and layer >= recorder.detach_from:
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
    missing = [i for i, reported in enumerate(recorder.reported) if not reported]
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
    )
    recorder.attentions, recorder.head_outputs, recorder.block_outputs = [], [], []
    recorder.norm_input = None
    return captured
