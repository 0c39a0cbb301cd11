"""A model zoo older than gmar supports is refused on one line, before anything runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import gmar
from conftest import make_clip, make_hf_vit, make_timm, make_torchvision, target_for
from gmar.frontends.cli import main
from test_capture import assert_same, snapshot

#: family -> (a model of it, the distribution, a version older than gmar supports, pip's extra)
OLD = {
    "timm": (make_timm, "timm", "0.9.16", "timm"),
    "hf": (make_hf_vit, "transformers", "4.57.1", "hf"),
    "openclip": (make_clip, "open_clip_torch", "2.23.0", "clip"),
    "torchvision": (make_torchvision, "torchvision", "0.12.0", "torchvision"),
}


def pretend_installed(monkeypatch, distribution: str, version: str) -> None:
    from gmar import versions

    real = versions.installed_version
    monkeypatch.setattr(versions, "installed_version", lambda name: version if name == distribution else real(name))


@pytest.mark.parametrize("family", sorted(OLD))
def test_old_zoo_is_refused_and_the_model_untouched(family, monkeypatch, images):
    factory, distribution, version, extra = OLD[family]
    model = factory()
    before = snapshot(model)
    pretend_installed(monkeypatch, distribution, version)
    minimum = {"timm": "1.0.15", "hf": "5.0", "openclip": "3.0", "torchvision": "0.13"}[family]
    expected = (
        f"{distribution} {version} is installed; gmar needs {distribution}>={minimum}: pip install -U 'gmar[{extra}]'"
    )
    for method in ("gmar", "legrad", "gradcam"):
        with pytest.raises(gmar.UnsupportedModelError) as caught:
            gmar.explain(model, images, method=method, target=target_for(family))
        assert str(caught.value) == expected
    assert_same(before, snapshot(model))


@pytest.mark.parametrize(
    "version", ["1.0.15", "1.0.16.dev0", "1.1", "2.0.0rc1", "1.0.15+cu121", "v1.0.20", "1!0.1", "1.0.15.dev0"]
)  # fmt: skip
def test_supported_timm_versions_pass(version, monkeypatch, images):
    pretend_installed(monkeypatch, "timm", version)
    gmar.explain(make_timm(), images, method="rollout")


@pytest.mark.parametrize("version", ["1.0.14", "1.0.14.post1", "1.0", "0.99.99", "0!1.0.14"])
def test_older_timm_versions_are_refused(version, monkeypatch, images):
    pretend_installed(monkeypatch, "timm", version)
    with pytest.raises(gmar.UnsupportedModelError, match=re.escape(f"timm {version} is installed")):
        gmar.explain(make_timm(), images, method="rollout")


def test_version_order():
    from gmar.versions import at_least

    assert at_least("5.0.0.dev0", "5.0")  # a source build of the minimum release
    assert at_least("5.0", "5.0.0") and at_least("5.0.0", "5.0")
    assert at_least("3.10.1", "3.9") and not at_least("3.9", "3.10.1")
    assert not at_least("4.99.0", "5.0")
    assert at_least("unknown", "5.0")  # a version that names no release cannot be judged, and is let through


def test_cli_refuses_an_old_zoo_on_one_line(monkeypatch, capsys, tmp_path):
    pretend_installed(monkeypatch, "timm", "0.9.16")
    code = main(["explain", "--example", "--model", "timm:test_vit", "--random-init", "--out", str(tmp_path / "o")])
    assert code == 2
    err = capsys.readouterr().err
    assert err == "gmar: error: timm 0.9.16 is installed; gmar needs timm>=1.0.15: pip install -U 'gmar[timm]'\n"
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_minimums_are_pyproject_extras():
    from gmar.versions import SUPPORTED

    text = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    extras = text.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    declared = {}
    for extra, requirements in re.findall(r"^(\w+)\s*=\s*\[(.*)\]\s*$", extras, flags=re.M):
        for distribution, minimum in re.findall(r'"([\w.-]+)>=([\w.]+)"', requirements):
            declared[distribution] = (minimum, extra)
    assert {family: (d, m, e) for family, (d, m, e) in SUPPORTED.items()} == {
        "timm": ("timm", *declared["timm"]),
        "hf": ("transformers", *declared["transformers"]),
        "openclip": ("open_clip_torch", *declared["open_clip_torch"]),
        "torchvision": ("torchvision", *declared["torchvision"]),
    }
    from gmar.adapters import ADAPTERS

    assert {adapter.family for adapter in ADAPTERS} == set(SUPPORTED)  # a family may have several adapters
