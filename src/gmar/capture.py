"""Attention capture: run a model once and keep every layer's attention, graph-connected.

:func:`frozen_eval` puts the model in eval mode with frozen parameters and restores both on exit;
:func:`capture` lets the model's adapter instrument it (hooks, fused-attention flags) for the
duration of a forward pass and checks that every layer reported exactly once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
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

    Adapters call :meth:`attention` and :meth:`head_output` from their hooks.
    """

    num_layers: int
    keep_head_outputs: bool = False
    attentions: list[torch.Tensor | None] = field(init=False)
    head_outputs: list[torch.Tensor | None] = field(init=False)

    def __post_init__(self) -> None:
        self.attentions = [None] * self.num_layers
        self.head_outputs = [None] * self.num_layers

    def attention(self, layer: int, probabilities: torch.Tensor) -> None:
        """Record the post-softmax attention ``(B, heads, N, N)`` of ``layer``."""
        if self.attentions[layer] is not None:
            raise CaptureError(f"layer {layer} ran twice in one forward pass; gmar captures one pass at a time")
        self.attentions[layer] = probabilities

    def head_output(self, layer: int, heads: torch.Tensor) -> None:
        """Record the per-head context vectors ``(B, heads, N, head_dim)`` of ``layer``."""
        if self.keep_head_outputs:
            self.head_outputs[layer] = heads


@dataclass
class Captured:
    """What one captured forward pass produced."""

    output: torch.Tensor
    attentions: list[torch.Tensor]
    head_outputs: list[torch.Tensor] | None


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
def capture(adapter: ModelAdapter, *, head_outputs: bool = False) -> Iterator[Recorder]:
    """Instrument ``adapter.model`` for one forward pass; every hook and flag is undone on exit.

    Use :func:`collect` on the recorder after the forward pass to get the checked tensors.
    """
    recorder = Recorder(adapter.num_layers, keep_head_outputs=head_outputs)
    with adapter.instrument(recorder):
        yield recorder


def collect(recorder: Recorder, output: torch.Tensor, model: nn.Module) -> Captured:
    """Check that every layer reported and return the tensors; a missing layer is an error."""
    missing = [i for i, a in enumerate(recorder.attentions) if a is None]
    name = type(model).__name__
    if len(missing) == recorder.num_layers:
        raise CaptureError(
            f"no attention was captured from {name}: its attention modules never ran the instrumented path"
        )
    if missing:
        raise CaptureError(f"attention of layers {missing} of {name} was not captured")
    if recorder.keep_head_outputs and any(h is None for h in recorder.head_outputs):
        raise CaptureError(f"per-head outputs of {name} were not captured")
    return Captured(
        output=output,
        attentions=list(recorder.attentions),  # type: ignore[arg-type]
        head_outputs=list(recorder.head_outputs) if recorder.keep_head_outputs else None,  # type: ignore[arg-type]
    )
