"""gmar.head_attention: each head's readout-row attention per layer, against the hand-written reference."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import gmar
import reference as R
from conftest import ATTENTION_POOLED, FACTORIES, IMAGE, make_swin, make_timm
from test_capture import assert_same, snapshot, unusual_state
from tolerance import FLOAT32

TOL = FLOAT32
#: class token, registers, DINOv2's class token and mean of patches, OpenCLIP, torchvision, CaiT, EVA
NAMES = ["timm", "timm_registers", "timm_avg", "hf_vit", "hf_dinov2", "openclip", "torchvision", "cait", "eva"]


def expected_maps(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """``(B, L, H, h, w)`` from the reference forward's attentions, each head on its own."""
    trace = R.trace(model, images)
    layers = []
    for index, attention in enumerate(trace.attentions):
        attention = trace.embedded(index, attention.detach(), 1.0)  # (B, H, N, N)
        rows = torch.einsum("n,bhnm->bhm", trace.readout, attention)
        layers.append(rows[..., trace.num_prefix :].reshape(*rows.shape[:2], *trace.grid))
    return torch.stack(layers, dim=1)


@pytest.mark.parametrize("name", NAMES)
def test_head_attention_matches_reference(name, images):
    model = FACTORIES[name]()
    maps = gmar.head_attention(model, images)
    expected = expected_maps(model, images)
    assert maps.shape == expected.shape
    assert maps.shape[:3] == (4, len(gmar.get_adapter(model).blocks), expected.shape[2])
    assert_close(maps, expected, **TOL)
    # heads differ (the test models' attention is peaked), so no head stands for another
    assert not torch.allclose(maps[:, -1, 0], maps[:, -1, 1], atol=1e-4)


@pytest.mark.parametrize("name", ["timm", "hf_dinov2", "openclip"])
def test_mean_over_heads_of_last_layer_is_raw_attention(name, images):
    model = FACTORIES[name]()
    raw = gmar.explain(model, images, "raw_attention", target=None if name != "openclip" else lambda e: e.sum(-1))
    assert_close(gmar.head_attention(model, images)[:, -1].mean(dim=1), raw.token_map, **TOL)


def test_batch_equals_single_images(images):
    model = make_timm()
    whole = gmar.head_attention(model, images)
    for i in range(images.shape[0]):
        assert_close(gmar.head_attention(model, images[i]), whole[i : i + 1], **TOL)


def test_non_square_input_gives_its_own_grid():
    model = make_timm(dynamic_img_size=True)
    images = torch.randn(2, 3, IMAGE, 48, generator=torch.Generator().manual_seed(3))
    maps = gmar.head_attention(model, images)
    assert maps.shape == (2, 3, 4, 4, 6)
    assert_close(maps, expected_maps(model, images), **TOL)


def test_model_left_as_found(images):
    model = unusual_state(make_timm())
    before = snapshot(model)
    gmar.head_attention(model, images)
    assert_same(before, snapshot(model))


def test_models_without_readout_rows_or_global_attention_are_refused(images):
    with pytest.raises(gmar.UnsupportedModelError, match="readout token"):
        gmar.head_attention(ATTENTION_POOLED["hf_siglip2_vision"](), images)
    with pytest.raises(gmar.UnsupportedModelError, match="global token-to-token attention"):
        gmar.head_attention(make_swin("timm_swin"), images)


def test_bad_images_are_refused():
    model = make_timm()
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        gmar.head_attention(model, torch.zeros(2, 1, IMAGE, IMAGE))
