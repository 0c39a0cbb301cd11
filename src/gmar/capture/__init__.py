"""Attention capture: run a model once and keep what a method needs of every layer, graph-connected.

- :mod:`gmar.capture.recorder`: :func:`capture` (the model's adapter instruments it for one forward
  pass; every hook and flag is undone on exit), the :class:`Recorder` the adapters report to, and
  :func:`collect`, which checks that every layer reported.
- :mod:`gmar.capture.stream`: :class:`AttentionStream`, the attention core computed in chunks, with
  its own backward pass.
- :mod:`gmar.capture.locks`: one lock per model, and the frozen eval state a call runs in.
"""

from gmar.capture.locks import frozen_eval, lock_for, model_lock
from gmar.capture.recorder import Captured, Recorder, capture, collect, split_heads_hook
from gmar.capture.stream import (
    ACCELERATOR_CHUNK_BYTES,
    CHUNK_BYTES,
    AttentionStream,
    GradientOf,
    chunk_bytes_for,
    join_chunks,
)

__all__ = [
    "ACCELERATOR_CHUNK_BYTES",
    "CHUNK_BYTES",
    "AttentionStream",
    "Captured",
    "GradientOf",
    "Recorder",
    "capture",
    "chunk_bytes_for",
    "collect",
    "frozen_eval",
    "join_chunks",
    "lock_for",
    "model_lock",
    "split_heads_hook",
]
