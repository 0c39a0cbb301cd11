"""Token layouts come from the model: prefix tokens, readout rows and the grid of the actual input."""

from __future__ import annotations

import pytest
import torch

import gmar
from conftest import FACTORIES, make_hf_vit, make_timm, target_for
from gmar.layout import TokenLayout

# family -> (prefix tokens, readout prefix rows, head averages patches)
EXPECTED = {
    "timm": (1, (0,), False),
    "timm_distilled": (2, (0, 1), False),
    "timm_registers": (3, (0,), False),
    "timm_avg": (0, (), True),
    "hf_vit": (1, (0,), False),
    "hf_deit_teacher": (2, (0, 1), False),
    "hf_dinov2": (1, (0,), True),
    "hf_dinov2_registers": (3, (0,), True),
    "hf_vit_msn": (1, (0,), False),
    "hf_ijepa": (0, (), True),
    "hf_vit_backbone": (1, (0,), False),
    "hf_dinov2_backbone": (1, (0,), False),
    "openclip": (1, (0,), False),
    "eva": (1, (0,), False),
    "eva_avg": (1, (), True),
    "eva_dinov3": (3, (), True),
    "eva_rope_mixed": (1, (0,), False),
    "beit": (1, (), True),
    "beit_shared": (1, (0,), False),
    "cait": (1, (0,), False),
    "timm_relpos": (1, (0,), False),
    "hf_clip": (1, (0,), False),
    "hf_clip_classifier": (1, (), True),
    "hf_metaclip2_projection": (1, (0,), False),
    "hf_siglip_classifier": (0, (), True),
    "hf_siglip2_classifier": (0, (), True),
    "hf_beit": (1, (), True),
    "hf_data2vec": (1, (), True),
    "hf_timm_wrapper": (1, (0,), False),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_layout_matches_the_model(name, images):
    explanation = gmar.explain(FACTORIES[name](), images, method="rollout", target=target_for(name))
    layout = explanation.layout
    assert (layout.num_prefix_tokens, layout.readout_prefix, layout.readout_patches) == EXPECTED[name]
    assert layout.grid_size == (4, 4)
    assert explanation.token_map.shape == (4, 4, 4)
    assert explanation.heatmap.shape == (4, 32, 32)


def test_timm_prefix_tokens_agree_with_the_token_count():
    for name in ("timm", "timm_distilled", "timm_registers", "timm_avg"):
        model = FACTORIES[name]()
        tokens = model.forward_features(torch.zeros(1, 3, 32, 32)).shape[1]
        assert gmar.get_adapter(model).token_layout((32, 32)).num_tokens == tokens


@pytest.mark.parametrize("method", gmar.available_methods())
def test_timm_dynamic_non_square_input(method):
    model = make_timm(dynamic_img_size=True)
    images = torch.randn(2, 3, 32, 48)
    explanation = gmar.explain(model, images, method=method)
    assert explanation.layout.grid_size == (4, 6)
    assert explanation.token_map.shape == (2, 4, 6)
    assert explanation.heatmap.shape == (2, 32, 48)


def test_hf_non_square_input_interpolates_position_embeddings():
    explanation = gmar.explain(make_hf_vit(), torch.randn(2, 3, 48, 32), method="gae")
    assert explanation.layout.grid_size == (6, 4)
    assert explanation.heatmap.shape == (2, 48, 32)


def test_fixed_size_timm_model_rejects_another_size_clearly():
    with pytest.raises(gmar.InputSizeError, match="dynamic_img_size=True"):
        gmar.explain(make_timm(), torch.randn(1, 3, 32, 48), method="rollout")


def test_readout_weights():
    cls = TokenLayout(num_prefix_tokens=2, grid_size=(2, 2), patch_size=(8, 8), readout_prefix=(0, 1))
    torch.testing.assert_close(cls.readout_weights(), torch.tensor([0.5, 0.5, 0, 0, 0, 0]))
    dino = TokenLayout(num_prefix_tokens=3, grid_size=(1, 2), patch_size=(8, 8), readout_patches=True)
    torch.testing.assert_close(dino.readout_weights(), torch.tensor([0.5, 0, 0, 0.25, 0.25]))
    avg = TokenLayout(num_prefix_tokens=1, grid_size=(2, 2), patch_size=(8, 8), readout_prefix=(), readout_patches=True)
    torch.testing.assert_close(avg.readout_weights(), torch.tensor([0, 0.25, 0.25, 0.25, 0.25]))
    with pytest.raises(ValueError):
        TokenLayout(num_prefix_tokens=0, grid_size=(2, 2), patch_size=(8, 8), readout_prefix=())


def test_patch_map_is_row_major():
    layout = TokenLayout(num_prefix_tokens=1, grid_size=(2, 3), patch_size=(8, 8))
    scores = torch.arange(7.0)[None]
    torch.testing.assert_close(layout.patch_map(scores), torch.tensor([[[1.0, 2, 3], [4, 5, 6]]]))
