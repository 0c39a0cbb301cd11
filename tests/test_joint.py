"""Several methods in one call: equal to the single-method calls, from one shared pass (counted)."""

from __future__ import annotations

import functools

import pytest
import torch
from torch.testing import assert_close

import gmar
from conftest import (
    FACTORIES,
    IMAGE,
    clip_target,
    clip_tokenizer,
    make_clip_with_text,
    make_coca,
    make_siglip,
    make_timm,
    target_for,
)
from tolerance import FLOAT32

METHODS = gmar.available_methods()
TOL = FLOAT32
MODELS = {**FACTORIES, "siglip": make_siglip, "coca": make_coca}
#: every option of every method, away from its default
OPTIONS = {
    "gmar": {"norm": "l2", "head_grad": "attention", "start_layer": 1, "discard_ratio": 0.1, "residual": 0.5},
    "rollout": {"head_fusion": "max", "discard_ratio": 0.2, "residual": 0.5, "start_layer": 1},
    "grad_rollout": {"discard_ratio": 0.1, "residual": 2.0, "start_layer": 1},
    "gae": {"start_layer": 1},
    "gmar_gae": {"head_weights": False, "signed": False, "start_layer": 1},
    "occlusion": {"window": 2, "baseline": "blur", "batch_size": 7},
    "legrad": {"start_layer": -2},
    "gradcam": {"layer": 1},
    "raw_attention": {},
    "attnlrp": {"attention": "full", "epsilon": 1e-6, "linear_gamma": 0.05, "conv_gamma": 0.25},
    "transformer_attribution": {"start_layer": 1},
    "partial_lrp": {},
}


@functools.cache
def model(name: str) -> torch.nn.Module:
    return MODELS[name]()


@functools.cache
def batch() -> torch.Tensor:
    return torch.randn(4, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(7))


def target(name: str):
    return clip_target if name in ("siglip", "coca") else target_for(name)


def assert_same(joint: gmar.Explanation, alone: gmar.Explanation) -> None:
    assert joint.method == alone.method
    assert_close(joint.token_map, alone.token_map, **TOL)
    assert_close(joint.heatmap, alone.heatmap, **TOL)
    assert_close(joint.logits, alone.logits, **TOL)
    for field in ("target", "scores", "head_weights", "head_scores"):
        mine, theirs = getattr(joint, field), getattr(alone, field)
        assert (mine is None) == (theirs is None), field
        if mine is not None:
            assert_close(mine, theirs, **TOL)
    assert joint.prompts == alone.prompts


@pytest.mark.parametrize("name", sorted(MODELS))
def test_all_equals_each_method_alone(name):
    net = model(name)
    results = gmar.explain(net, batch(), "all", target=target(name))
    assert list(results) == gmar.supported_methods(net)
    for method, explanation in results.items():
        assert_same(explanation, gmar.explain(net, batch(), method, target=target(name)))


@pytest.mark.parametrize("name", ["timm", "hf_vit", "openclip", "timm_registers"])
def test_every_option_reaches_its_method(name):
    net = model(name)
    methods = [m for m in METHODS if m in gmar.supported_methods(net) or m == "occlusion"]
    options = {m: OPTIONS[m] for m in methods}
    results = gmar.explain(net, batch(), methods, target=target(name), options=options)
    assert list(results) == methods
    for method, explanation in results.items():
        assert_same(explanation, gmar.explain(net, batch(), method, target=target(name), **OPTIONS[method]))


@pytest.mark.parametrize("layer", [0, -1])
def test_gradcam_below_every_attention_layer_shares_the_pass(layer):
    """Grad-CAM on block 0's input lies under layer 0's attention: the shared pass runs through it."""
    net = model("timm")
    results = gmar.explain(net, batch(), ["gae", "gradcam"], options={"gradcam": {"layer": layer}})
    assert_same(results["gradcam"], gmar.explain(net, batch(), "gradcam", layer=layer))
    assert_same(results["gae"], gmar.explain(net, batch(), "gae"))


@pytest.mark.parametrize("name", ["timm", "hf_dinov2_registers", "openclip", "cait"])
def test_taylor_scores_and_gmar_gae_share_the_pass_and_equal_their_single_calls(name):
    net = model(name)
    options = {"gmar": {"head_score": "taylor"}, "gmar_gae": {"signed": False}}
    methods = ["gmar", "gmar_gae", "gae", "rollout", "occlusion"]
    results = gmar.explain(net, batch(), methods, target=target(name), options=options)
    for method, explanation in results.items():
        assert_same(explanation, gmar.explain(net, batch(), method, target=target(name), **options.get(method, {})))
        assert (explanation.head_scores is None) == (method not in ("gmar", "gmar_gae"))


def test_classes_per_sample_and_text_prompts():
    net = model("timm")
    classes = [4, 0, 2, 2]
    results = gmar.explain(net, batch(), ["gmar", "legrad", "rollout"], target=classes)
    for method, explanation in results.items():
        assert explanation.target.tolist() == classes
        assert_same(explanation, gmar.explain(net, batch(), method, target=classes))
    clip = make_clip_with_text()
    prompts = gmar.TextTarget(clip, clip_tokenizer(), ["a photo of a cat", "a dog", "a remote control"])
    results = gmar.explain(clip, batch()[:1], "all", target=prompts)
    for method, explanation in results.items():
        assert explanation.prompts == prompts.prompts
        assert_same(explanation, gmar.explain(clip, batch()[:1], method, target=prompts))


def test_one_forward_and_two_backward_passes_for_all(monkeypatch):
    """The six attention methods and Grad-CAM share one forward and one backward pass; LeGrad,
    whose graph is cut between blocks, takes its own; the LRP methods add one modified backward pass
    per rule set (AttnLRP's; Chefer et al.'s, which Transformer Attribution and partial LRP share) to
    the shared forward pass; occlusion is not in "all"."""
    net = make_timm()
    counts = {"forward": 0, "backward": 0}
    hook = net.register_forward_hook(lambda *args: counts.__setitem__("forward", counts["forward"] + 1))
    grad = torch.autograd.grad

    def counting(*args, **kwargs):
        counts["backward"] += 1
        return grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", counting)
    try:
        gmar.explain(net, batch(), "all")
        assert counts == {"forward": 2, "backward": 4}
        counts.update(forward=0, backward=0)
        gmar.explain(net, batch(), ["gae", "attnlrp", "transformer_attribution", "partial_lrp"])
        assert counts == {"forward": 1, "backward": 3}
        counts.update(forward=0, backward=0)
        gmar.explain(net, batch(), ["gmar", "rollout", "grad_rollout", "gae", "gmar_gae", "gradcam", "raw_attention"])
        assert counts == {"forward": 1, "backward": 1}
        counts.update(forward=0, backward=0)
        options = {"gmar": {"head_score": "taylor"}, "occlusion": {"batch_size": 64}}
        gmar.explain(net, batch(), ["gmar", "gmar_gae", "gae", "occlusion"], options=options)
        assert counts == {"forward": 3, "backward": 1}  # the shared pass, occlusion's own pass and its 16 windows'
        counts.update(forward=0, backward=0)
        counts.update(forward=0, backward=0)
        gmar.explain(net, batch(), ["rollout", "raw_attention"])
        assert counts == {"forward": 1, "backward": 0}
        counts.update(forward=0, backward=0)
        for method in gmar.all_methods():
            gmar.explain(net, batch(), method)
        # Transformer Attribution alone: its true and its relevance pass
        assert counts == {"forward": 11, "backward": 10}
    finally:
        hook.remove()


def test_all_leaves_out_what_the_model_cannot_do_and_a_list_says_why():
    net = model("siglip")
    assert list(gmar.explain(net, batch(), "all", target=clip_target)) == ["legrad", "gradcam"]
    with pytest.raises(gmar.UnsupportedModelError, match="no readout token"):
        gmar.explain(net, batch(), ["legrad", "rollout"], target=clip_target)


@pytest.mark.parametrize("kind", ["timm_swin", "hf_swin"])
def test_all_on_a_hierarchical_model_is_gradcam(kind):
    from conftest import make_swin

    net = make_swin(kind)
    images = torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(2))
    results = gmar.explain(net, images, "all")
    assert list(results) == ["gradcam"]
    assert_same(results["gradcam"], gmar.explain(net, images, "gradcam"))


def test_bad_requests_are_one_line():
    net = model("timm")
    with pytest.raises(TypeError, match="options="):
        gmar.explain(net, batch(), ["gmar", "gae"], norm="l2")
    with pytest.raises(TypeError, match="keyword arguments"):
        gmar.explain(net, batch(), "gmar", options={"gmar": {"norm": "l2"}})
    with pytest.raises(ValueError, match="unknown method"):
        gmar.explain(net, batch(), ["gmar", "gcam"])
    with pytest.raises(ValueError, match="not among the methods"):
        gmar.explain(net, batch(), ["gmar"], options={"gae": {}})
    with pytest.raises(ValueError, match="twice"):
        gmar.explain(net, batch(), ["gmar", "gmar"])


def test_the_model_is_left_as_found_also_when_the_target_raises():
    from test_capture import assert_same as same_state
    from test_capture import snapshot, unusual_state

    net = unusual_state(make_timm())
    before = snapshot(net)
    gmar.explain(net, batch(), "all")
    same_state(before, snapshot(net))

    def broken(output):
        raise RuntimeError("from the target")

    before = snapshot(net)  # the comparison consumed the first one
    with pytest.raises(RuntimeError, match="from the target"):
        gmar.explain(net, batch(), "all", target=broken)
    same_state(before, snapshot(net))


def test_methods_for_a_model_is_one_answer():
    """``"all"`` is what the model supports; a named method it cannot run is one line with the reason."""
    from conftest import ATTENTION_POOLED
    from gmar.methods import methods_for, supported_methods

    vit = model("timm")
    assert methods_for(vit) == supported_methods(vit) == gmar.all_methods()
    assert methods_for(vit, "gae,gae, legrad") == ["gae", "legrad"]
    assert methods_for(vit, ["occlusion"]) == ["occlusion"]
    pooled = ATTENTION_POOLED["hf_siglip2_vision"]()
    assert methods_for(pooled) == supported_methods(pooled) == ["legrad", "gradcam"]
    with pytest.raises(gmar.UnsupportedModelError, match="no readout token for gmar") as caught:
        methods_for(pooled, "legrad,gmar")
    assert "\n" not in str(caught.value)
