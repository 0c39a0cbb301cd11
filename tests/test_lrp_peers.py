"""The LRP methods against their authors' code: AttnLRP against lxt 2.1 on torchvision's ``vit_b_16``,
Transformer Attribution against Chefer et al.'s official code on timm's ``vit_base_patch16_224``.

lxt patches ``torch.nn`` classes for the whole process and needs transformers 4, so its maps are made
in a side environment by docs/scripts/lxt_reference.py (with docs/scripts/lxt_env.sh) and stored in
tests/data/lxt_vit_b_16.pt, on weights drawn by tests/seeded.py (the same in every environment).
``GMAR_LXT_ENV=DIR`` (a folder lxt_env.sh built) makes the last test produce them again in a
subprocess and compare with those; .ci/run builds it.

The bounds are the issue's: per map Pearson ≥ 0.999 and a largest difference ≤ 1e-3 of the map's
largest magnitude, on the token map (the pixel relevance summed per patch).
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gmar

sys.path.insert(0, str(Path(__file__).parent))
from seeded import fill_seeded_, seeded_images

torchvision = pytest.importorskip("torchvision")

DATA = Path(__file__).parent / "data" / "lxt_vit_b_16.pt"
ROOT = Path(__file__).resolve().parents[1]


@functools.cache
def reference() -> dict:
    return torch.load(DATA, weights_only=False)


@functools.cache
def model() -> torch.nn.Module:
    return fill_seeded_(torchvision.models.vit_b_16(weights=None).eval())


def options(setting: dict) -> dict:
    gammas = {"conv_gamma": setting["conv_gamma"], "linear_gamma": setting["lin_gamma"]}
    return {k: v for k, v in gammas.items() if v is not None}


def assert_like(got: torch.Tensor, want: torch.Tensor) -> None:
    """Per map: Pearson ≥ 0.999 and max |difference| ≤ 1e-3 · max |want|."""
    for g, w in zip(got.flatten(1).double(), want.flatten(1).double(), strict=True):
        pearson = torch.corrcoef(torch.stack([g, w]))[0, 1]
        assert pearson >= 0.999, float(pearson)
        assert (g - w).abs().max() <= 1e-3 * w.abs().max(), float((g - w).abs().max() / w.abs().max())


@pytest.mark.parametrize("index", [0, 1], ids=["cp", "gamma"])
def test_attnlrp_equals_lxt_on_vit_b_16(index):
    data = reference()
    setting = data["settings"][index]
    images = seeded_images(data["images"], 224, seed=data["image_seed"]).float()
    with torch.no_grad():
        torch.testing.assert_close(model()(images), data["plain_logits"], rtol=1e-4, atol=1e-4)
    explainer = gmar.AttnLRP(model(), **options(setting))
    for t in range(data["targets"].shape[1]):
        explanation = explainer(images, target=data["targets"][:, t])
        assert_like(explanation.token_map, data["token_map"][index, :, t])
        assert_like(explanation.pixels[:1], data["pixel_map_first"][index, t][None])
    # plain gradient x input is another map: the comparison can fail
    with pytest.raises(AssertionError):
        assert_like(data["gradient_x_input_token_map"][:, 0], data["token_map"][index, :, 0])


@pytest.mark.skipif(not os.environ.get("GMAR_LXT_ENV"), reason="GMAR_LXT_ENV names no lxt side environment")
def test_lxt_reference_maps_are_reproduced_in_the_side_environment(tmp_path):
    """lxt's maps made again, in a subprocess of the side environment, equal the stored ones."""
    out = tmp_path / "lxt.pt"
    env = {**os.environ, "PYTHONPATH": os.environ["GMAR_LXT_ENV"]}
    script = ROOT / "docs" / "scripts" / "lxt_reference.py"
    subprocess.run([sys.executable, str(script), "--out", str(out), "--images", "2"], check=True, env=env, timeout=900)
    fresh, stored = torch.load(out, weights_only=False), reference()
    assert_like(fresh["token_map"].flatten(0, 2), stored["token_map"][:, :2].flatten(0, 2))


# -- Transformer Attribution against Chefer et al.'s official code --------------------------------------

CHEFER = Path(__file__).parent / "data" / "chefer_transformer_attribution.pt"


@functools.cache
def chefer_reference() -> dict:
    return torch.load(CHEFER, weights_only=False)


def test_transformer_attribution_equals_chefers_code_in_float64():
    """Chefer et al.'s ``relprop`` on their own ViT with the weights of timm's ``vit_base_patch16_224``
    (tests/seeded.py), in float64, one image at a time (docs/scripts/chefer_reference.py), against
    gmar's batched map on the timm model: start layers 0 and 1, classes 3, 17 and the predicted one."""
    timm = pytest.importorskip("timm")
    data = chefer_reference()
    model = fill_seeded_(timm.create_model("vit_base_patch16_224", pretrained=False), seed=data["seed"]).double()
    images = seeded_images(data["maps"].shape[1], 224, seed=data["seed"])
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(images), data["logits"], rtol=1e-10, atol=1e-10)
    for s, start_layer in enumerate(data["start_layers"]):
        explainer = gmar.TransformerAttribution(model, start_layer=start_layer)
        for t in range(data["targets"].shape[1]):
            got = explainer(images, target=data["targets"][:, t]).token_map
            assert_like(got, data["maps"][s, :, t])
    # GAE, the same propagation without the relevance, is another map: the comparison can fail
    gae = gmar.explain(model, images, "gae", target=data["targets"][:, 0]).token_map
    with pytest.raises(AssertionError):
        assert_like(gae, data["maps"][0, :, 0])
