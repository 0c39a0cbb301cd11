"""The building blocks of the methods, against hand computations."""

from __future__ import annotations

import pytest
import torch

import gmar
from conftest import make_timm
from gmar.explanation import min_max, upsample
from gmar.layout import TokenLayout
from gmar.methods import functional as Fn


def random_attention(batch=2, heads=3, tokens=5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, heads, tokens, tokens, generator=generator).mul(3).softmax(dim=-1)


def test_fuse_heads():
    attention = random_attention()
    torch.testing.assert_close(Fn.fuse_heads(attention, "mean"), attention.sum(1) / 3)
    torch.testing.assert_close(
        Fn.fuse_heads(attention, "max"), torch.maximum(torch.maximum(*attention[:, :2].unbind(1)), attention[:, 2])
    )
    torch.testing.assert_close(
        Fn.fuse_heads(attention, "min"), torch.minimum(torch.minimum(*attention[:, :2].unbind(1)), attention[:, 2])
    )
    with pytest.raises(ValueError):
        Fn.fuse_heads(attention, "median")


def test_discard_lowest_keeps_prefix_columns_and_zeroes_smallest_patches_per_row():
    matrix = torch.tensor([[[0.01, 0.5, 0.1, 0.3, 0.2], [0.02, 0.05, 0.4, 0.01, 0.3]]])
    result = Fn.discard_lowest(matrix, 0.5, num_prefix_tokens=1)  # 4 patch columns, 2 discarded per row
    expected = torch.tensor([[[0.01, 0.5, 0.0, 0.3, 0.0], [0.02, 0.0, 0.4, 0.0, 0.3]]])
    torch.testing.assert_close(result, expected)
    torch.testing.assert_close(Fn.discard_lowest(matrix, 0.0, 1), matrix)
    with pytest.raises(ValueError):
        Fn.discard_lowest(matrix, 1.0, 1)


def test_rollout_by_hand():
    a1, a2 = random_attention(heads=1, seed=1)[:, 0], random_attention(heads=1, seed=2)[:, 0]
    eye = torch.eye(5)
    h1 = (a1 + eye) / (a1 + eye).sum(-1, keepdim=True)
    h2 = (a2 + eye) / (a2 + eye).sum(-1, keepdim=True)
    torch.testing.assert_close(Fn.rollout([a1, a2]), h2 @ h1)
    assert not torch.allclose(Fn.rollout([a1, a2]), h1 @ h2)


@pytest.mark.parametrize("residual", [1.0, 0.5, 0.0])
def test_rollout_rows_stay_stochastic(residual):
    layers = [Fn.fuse_heads(random_attention(seed=s)) for s in range(6)]
    result = Fn.rollout(layers, residual)
    torch.testing.assert_close(result.sum(-1), torch.ones(2, 5))
    assert (result >= 0).all()


def test_rollout_rows_stay_stochastic_on_a_real_model():
    model = make_timm()
    images = torch.randn(3, 3, 32, 32)
    from gmar.adapters import get_adapter
    from gmar.capture import capture, collect, frozen_eval

    adapter = get_adapter(model)
    with frozen_eval(model), torch.no_grad(), capture(adapter) as recorder:
        output = adapter.forward(images)
    attentions = collect(recorder, output, model).attentions
    for fusion in ("mean", "max", "min"):
        fused = [Fn.discard_lowest(Fn.fuse_heads(a, fusion), 0.3, 1) for a in attentions]
        torch.testing.assert_close(Fn.rollout(fused).sum(-1), torch.ones(3, 17))


def test_head_scores_and_weights():
    gradient = torch.tensor([[[3.0, -4.0], [0.0, 0.0]], [[1.0, 1.0], [-1.0, 1.0]]])[None]  # (1, H=2, 2, 2)
    torch.testing.assert_close(Fn.head_scores(gradient, "l1"), torch.tensor([[7.0, 4.0]]))
    torch.testing.assert_close(Fn.head_scores(gradient, "l2"), torch.tensor([[5.0, 2.0]]))
    torch.testing.assert_close(
        Fn.normalise_head_scores(torch.tensor([[7.0, 3.0], [0.0, 0.0]])), torch.tensor([[0.7, 0.3], [0.5, 0.5]])
    )


def test_uniform_head_weights_mix_to_the_mean():
    attention = random_attention(heads=4)
    torch.testing.assert_close(Fn.mix_heads(attention, torch.full((2, 4), 0.25)), Fn.fuse_heads(attention, "mean"))


def test_gmar_with_equal_head_weights_equals_mean_rollout(monkeypatch, images):
    model = make_timm()
    monkeypatch.setattr(Fn, "normalise_head_scores", lambda scores: torch.full_like(scores, 1.0 / scores.shape[-1]))
    gmar_map = gmar.explain(model, images, method="gmar").token_map
    rollout_map = gmar.explain(model, images, method="rollout").token_map
    torch.testing.assert_close(gmar_map, rollout_map)


def test_gmar_with_its_own_weights_differs_from_mean_rollout(images):
    model = make_timm()
    gmar_map = gmar.explain(model, images, method="gmar").token_map
    rollout_map = gmar.explain(model, images, method="rollout").token_map
    assert (gmar_map - rollout_map).abs().max() > 1e-3


def test_gae_by_hand():
    b1, b2 = torch.rand(1, 3, 3), torch.rand(1, 3, 3)
    eye = torch.eye(3)[None]
    step1 = eye + b1 @ eye
    torch.testing.assert_close(Fn.gae([b1, b2]), step1 + b2 @ step1)


@pytest.mark.parametrize("residual", [1.0, 0.5])
def test_readout_rows_from_the_left_equal_the_full_products(residual):
    """rollout_readout and gae_readout are wᵀ R without forming R; readout weights over several
    rows (a distilled model's two tokens, or all patches) included."""
    generator = torch.Generator().manual_seed(11)
    layers = [torch.rand(2, 9, 9, dtype=torch.float64, generator=generator) for _ in range(4)]
    for weights in (torch.eye(9, dtype=torch.float64)[0], torch.rand(9, dtype=torch.float64, generator=generator)):
        full = torch.einsum("n,bnm->bm", weights, Fn.rollout(layers, residual))
        torch.testing.assert_close(Fn.rollout_readout(layers, weights, residual), full, rtol=1e-12, atol=0)
        full = torch.einsum("n,bnm->bm", weights, Fn.gae(layers))
        torch.testing.assert_close(Fn.gae_readout(layers, weights), full, rtol=1e-12, atol=0)
    # the order matters: reversing the layers gives another answer
    reverse = Fn.rollout_readout(layers[::-1], weights, residual)
    assert not torch.allclose(reverse, Fn.rollout_readout(layers, weights, residual))


def test_upsample_covers_each_patch_and_pads_uncovered_pixels():
    layout = TokenLayout(num_prefix_tokens=1, grid_size=(2, 2), patch_size=(2, 2))
    token_map = torch.tensor([[[1.0, 1.0], [1.0, 1.0]]])
    torch.testing.assert_close(upsample(token_map, layout, (4, 4)), torch.ones(1, 4, 4))
    padded = upsample(token_map, layout, (5, 6))
    assert padded.shape == (1, 5, 6)
    assert padded[:, :4, :4].eq(1).all() and padded[:, 4:].eq(0).all() and padded[:, :, 4:].eq(0).all()
    cropped = upsample(token_map, layout, (3, 3))
    assert cropped.shape == (1, 3, 3)


def test_min_max_per_image():
    maps = torch.stack([torch.tensor([[1.0, 3.0], [2.0, 5.0]]), torch.full((2, 2), 7.0)])
    result = min_max(maps)
    torch.testing.assert_close(result[0], torch.tensor([[0.0, 0.5], [0.25, 1.0]]))
    torch.testing.assert_close(result[1], torch.zeros(2, 2))
