"""One registry of methods: a class registers itself, and explain, "all", methods_for and the CLI's
method lists ask it; a method from outside the package joins the same way."""

from __future__ import annotations

import importlib

import pytest
from torch.testing import assert_close

import gmar
from conftest import make_siglip, make_timm
from gmar.methods import Explainer, methods_for, register, registered, select_methods, unregister
from gmar.methods import functional as Fn
from tolerance import FLOAT32


class FirstLayerAttention(Explainer):
    """A toy method from outside the package: the first layer's attention from the readout, heads averaged."""

    name = "toy"

    def __init__(self, model) -> None:
        super().__init__(model)

    def reduce_attention(self, layer, attention):
        return attention.float().mean(dim=1) if layer == 0 else None

    def relevance(self, captured, reduced, layout):
        return Fn.readout_map(reduced[0], layout), None


class SlowToy(FirstLayerAttention):
    name = "slow_toy"
    in_all = False


def test_builtin_methods_live_one_per_module():
    assert gmar.available_methods() == [
        "gmar", "rollout", "grad_rollout", "gae", "gmar_gae", "legrad", "gradcam", "raw_attention", "occlusion",
        "attnlrp", "transformer_attribution", "partial_lrp",
    ]  # fmt: skip
    for name, cls in gmar.methods.METHODS.items():
        assert cls.__module__ == f"gmar.methods.{name}"
        assert getattr(importlib.import_module(cls.__module__), cls.__name__) is cls
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("gmar.methods.explainers")


def test_a_registered_method_is_explained_listed_and_in_all(images):
    model = make_timm()
    with registered(FirstLayerAttention):
        assert "toy" in gmar.available_methods() and "toy" in gmar.all_methods()
        alone = gmar.explain(model, images, "toy")
        # independent: the mean over heads of each head's own readout row of layer 0
        expected = gmar.head_attention(model, images)[:, 0].mean(dim=1)
        assert_close(alone.token_map, expected, **FLOAT32)
        assert alone.method == "toy" and alone.heatmap.shape == images.shape[:1] + images.shape[2:]
        assert methods_for(model) == [*[m for m in gmar.all_methods() if m != "toy"], "toy"]
        assert methods_for(model, "toy,gae") == ["toy", "gae"]
        assert select_methods("toy") == ["toy"]
        everything = gmar.explain(model, images, "all")
        assert list(everything)[-1] == "toy"
        assert_close(everything["toy"].token_map, alone.token_map, **FLOAT32)  # from the shared pass
        assert list(gmar.explain(model, images, ["toy", "rollout"])) == ["toy", "rollout"]
    assert "toy" not in gmar.available_methods()
    with pytest.raises(ValueError, match="unknown method 'toy'"):
        gmar.explain(model, images, "toy")
    with pytest.raises(gmar.GmarError, match="unknown method"):
        methods_for(model, "toy")


def test_a_method_asked_by_name_only_stays_out_of_all(images):
    model = make_timm()
    register(SlowToy)
    try:
        assert "slow_toy" in gmar.available_methods() and "slow_toy" not in gmar.all_methods()
        assert "slow_toy" not in methods_for(model) and methods_for(model, "slow_toy") == ["slow_toy"]
        assert gmar.explain(model, images, "slow_toy").token_map.shape == (4, 4, 4)
    finally:
        assert unregister("slow_toy") is SlowToy
    assert "slow_toy" not in gmar.available_methods()


def test_a_registered_method_is_refused_where_it_does_not_fit():
    with registered(FirstLayerAttention):
        with pytest.raises(gmar.UnsupportedModelError, match="no readout token for toy"):
            methods_for(make_siglip(), "toy")
        assert "toy" not in methods_for(make_siglip())


def test_registration_is_checked():
    class Unnamed(FirstLayerAttention):
        name = "two words"

    class Taken(FirstLayerAttention):
        name = "gmar"

    class All(FirstLayerAttention):
        name = "all"

    with pytest.raises(ValueError, match="must be a word"):
        register(Unnamed)
    with pytest.raises(ValueError, match="must be a word"):
        register(All)
    with pytest.raises(ValueError, match="'gmar' is already registered"):
        register(Taken)
    with pytest.raises(TypeError, match=r"subclass of gmar\.methods\.Explainer"):
        register(object)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no method named 'nothing'"):
        unregister("nothing")
    assert register(gmar.GMAR) is gmar.GMAR  # registering a class again is harmless
    assert gmar.available_methods()[0] == "gmar"


def test_registered_unregisters_when_the_block_raises():
    with pytest.raises(RuntimeError), registered(FirstLayerAttention):
        raise RuntimeError
    assert "toy" not in gmar.available_methods()


def test_the_command_lines_help_lists_a_method_registered_from_outside():
    """The help was built when the CLI module was imported, so a method registered later was missing."""
    import argparse

    from gmar.frontends.cli import build_parser

    def help_of(command: str) -> str:
        parser = build_parser()
        commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        return " ".join(commands.choices[command].format_help().split())

    with registered(SlowToy):
        assert "slow_toy" in help_of("explain") and "slow_toy" in help_of("evaluate")
    assert "slow_toy" not in help_of("explain")
