"""The core seam for token sequences: a 1-D token layout and the rollout family's maths on it, checked
against an independent computation; what needs pixels refuses such a layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from gmar.explanation import upsample
from gmar.layout import TokenLayout
from gmar.methods import functional as Fn

#: a [CLS] token and a sequence of 6 tokens
SEQUENCE = TokenLayout(num_prefix_tokens=1, grid_size=(6,), patch_size=(1,))


def attention(batch: int = 2, heads: int = 3, tokens: int = 7, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, heads, tokens, tokens, generator=generator, dtype=torch.float64).softmax(dim=-1)


def test_a_sequence_layout():
    assert SEQUENCE.num_patches == 6 and SEQUENCE.num_tokens == 7 and not SEQUENCE.is_2d
    assert SEQUENCE.patch_slice == slice(1, 7)
    scores = torch.arange(14.0).view(2, 7)
    assert SEQUENCE.patch_map(scores).tolist() == [[1, 2, 3, 4, 5, 6], [8, 9, 10, 11, 12, 13]]
    assert SEQUENCE.readout_weights().tolist() == [1, 0, 0, 0, 0, 0, 0]
    pooled = TokenLayout(num_prefix_tokens=0, grid_size=(4,), patch_size=(1,), readout_prefix=(), readout_patches=True)
    assert pooled.readout_weights().tolist() == [0.25] * 4
    assert TokenLayout(num_prefix_tokens=1, grid_size=(2, 3, 4), patch_size=(1, 1, 1)).num_patches == 24
    with pytest.raises(ValueError, match="one entry per axis"):
        TokenLayout(num_prefix_tokens=1, grid_size=(6,), patch_size=(8, 8))


def rollout_reference(layers: list[np.ndarray]) -> np.ndarray:
    """Abnar & Zuidema's rollout written out: each layer ``(Ā + I)`` row-normalised, multiplied, last on the left."""
    result = np.eye(layers[0].shape[-1])
    for matrix in layers:
        step = matrix + np.eye(matrix.shape[-1])
        result = (step / step.sum(axis=-1, keepdims=True)) @ result
    return result


def gae_reference(layers: list[np.ndarray]) -> np.ndarray:
    """Chefer et al.'s ``R ← R + Ā R`` from ``R = I``, written out."""
    relevance = np.eye(layers[0].shape[-1])
    for matrix in layers:
        relevance = relevance + matrix @ relevance
    return relevance


def test_rollout_on_a_token_sequence():
    layers = [attention(seed=s) for s in range(3)]
    fused = [Fn.fuse_heads(a) for a in layers]
    token_map = Fn.rollout_map(fused, 0.0, 1.0, SEQUENCE)
    assert token_map.shape == (2, 6)
    for b in range(2):
        expected = rollout_reference([a[b].numpy().mean(axis=0) for a in layers])[0, 1:]
        np.testing.assert_allclose(token_map[b].numpy(), expected, rtol=1e-12)
    assert_close(Fn.readout_map(fused[-1], SEQUENCE), fused[-1][:, 0, 1:])


def test_gae_on_a_token_sequence():
    torch.manual_seed(9)
    layers = [attention(seed=s) for s in range(3)]
    gradients = [torch.randn_like(a) * (i + 1) for i, a in enumerate(layers)]
    weighted = [Fn.gradient_weighted(a, g) for a, g in zip(layers, gradients, strict=True)]
    token_map = SEQUENCE.patch_map(Fn.gae_readout(weighted, SEQUENCE.readout_weights(dtype=torch.float64)))
    assert token_map.shape == (2, 6)
    for b in range(2):
        pairs = zip(layers, gradients, strict=True)
        matrices = [np.maximum(a[b].numpy() * g[b].numpy(), 0).mean(axis=0) for a, g in pairs]
        np.testing.assert_allclose(token_map[b].numpy(), gae_reference(matrices)[0, 1:], rtol=1e-12)


def test_what_needs_pixels_refuses_a_sequence():
    with pytest.raises(ValueError, match="needs a 2-D patch grid"):
        upsample(torch.zeros(1, 6), SEQUENCE, (6, 1))
    with pytest.raises(ValueError, match="needs a 2-D grid"):
        Fn.occlusion_windows(SEQUENCE.grid_size, 1)
