"""One table of zoos (gmar.adapters.zoos): versions, loading, the adapters' order and the supported-models
sweep all read it, so a zoo is one row there and its adapter file."""

from __future__ import annotations

import dataclasses

import pytest

import gmar
from conftest import make_timm
from gmar import loading, versions
from gmar.adapters import ADAPTERS, SUPPORTED, zoos
from gmar.adapters.zoos import ZOOS, Zoo


def test_every_reader_follows_the_table():
    assert list(ZOOS) == ["timm", "hf", "openclip", "torchvision"]
    assert ADAPTERS == tuple(dict.fromkeys(a for zoo in ZOOS.values() for a in zoo.adapters))
    assert {adapter.family for adapter in ADAPTERS} == set(ZOOS)
    for zoo in ZOOS.values():
        assert zoo.supports in SUPPORTED
        assert versions.SUPPORTED[zoo.family] == (zoo.distribution, zoo.minimum, zoo.extra)
        if zoo.loader is not None:
            assert loading._LOADERS[zoo.family].__name__ == zoo.loader
    assert loading.FAMILIES == ("timm", "hf", "openclip")  # torchvision models are built, not loaded by name
    with pytest.raises(gmar.ModelLoadError) as caught:
        loading.parse_spec("torchvision:vit_b_16")
    assert str(caught.value) == (
        "model spec 'torchvision:vit_b_16' must be one of timm:NAME, hf:NAME_OR_PATH, openclip:ARCH/TAG"
    )


def test_the_models_sweep_reads_the_table():
    from gmar.frontends import models

    assert set(models.installed_zoos()) <= set(ZOOS)
    assert set(models.versions()) - {"torch"} <= {zoo.distribution for zoo in ZOOS.values()}


def test_a_zoo_without_a_class_head_refuses_num_classes():
    with pytest.raises(gmar.ModelLoadError) as caught:
        gmar.load_model("openclip:ViT-B-32", pretrained=False, num_classes=3)
    assert str(caught.value) == ("--num-classes is for classifiers (timm:, hf:); an OpenCLIP model has no class head")


def test_a_new_row_is_checked_like_the_others(monkeypatch, images):
    """A zoo's minimum version is its row: raise timm's and timm models are refused, with the row's extra."""
    row = dataclasses.replace(ZOOS["timm"], minimum="999.0", extra="newzoo")
    monkeypatch.setitem(zoos.ZOOS, "timm", row)
    installed = versions.installed_version("timm")
    with pytest.raises(gmar.UnsupportedModelError) as caught:
        gmar.explain(make_timm(), images, "rollout")
    assert str(caught.value) == (
        f"timm {installed} is installed; gmar needs timm>=999.0: pip install -U 'gmar[newzoo]'"
    )
    assert isinstance(row, Zoo)
