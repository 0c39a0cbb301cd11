"""Attention capture: run a model once and keep what a method needs of every layer, graph-connected.

- :mod:`gmar.capture.recorder`: :func:`capture` (the model's adapter instruments it for one forward
  pass; every hook and flag is undone on exit), the :class:`Recorder` the adapters report to, and
  :func:`collect`, which checks that every layer reported.
- :mod:`gmar.capture.stream`: :class:`AttentionStream`, the attention core computed in chunks, with
  its own backward pass.
- :mod:`gmar.capture.rules`: LRP rule sets (AttnLRP's, Chefer et al.'s) and the pass-through nodes
  that apply them in a modified backward pass, for one forward pass.
- :mod:`gmar.capture.locks`: one lock per model, and the frozen eval state a call runs in.
"""

from gmar.capture.locks import frozen_eval, lock_for, model_lock
from gmar.capture.recorder import Captured, Recorder, capture, collect, split_heads_hook
from gmar.capture.rules import AttnLRPRules, CheferRules, Gate, Residual, RuleSet
from gmar.capture.stream import (
    ACCELERATOR_CHUNK_BYTES,
    CHUNK_BYTES,
    AttentionStream,
    GradientOf,
    RelevanceChunk,
    chunk_bytes_for,
    join_chunks,
)

__all__ = [
    "ACCELERATOR_CHUNK_BYTES",
    "CHUNK_BYTES",
    "AttentionStream",
    "AttnLRPRules",
    "Captured",
    "CheferRules",
    "Gate",
    "GradientOf",
    "Recorder",
    "RelevanceChunk",
    "Residual",
    "RuleSet",
    "capture",
    "chunk_bytes_for",
    "collect",
    "frozen_eval",
    "join_chunks",
    "lock_for",
    "model_lock",
    "split_heads_hook",
]
