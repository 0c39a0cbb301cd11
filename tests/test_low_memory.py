"""The memory-saving path (each layer reduced as it arrives) against the plain path (every layer's
attention and gradient first, the same reductions after): the same maps, and it really lets go.
"""

from __future__ import annotations

import weakref

import pytest
import torch
from torch.testing import assert_close

import gmar
from conftest import FACTORIES, IMAGE, clip_tokenizer, make_clip_with_text, make_siglip, make_timm, target_for
from gmar.methods import get_method
from gmar.methods.base import differentiate, stream_gradients

MODELS = {**FACTORIES, "timm_dynamic": lambda: make_timm(dynamic_img_size=True)}
OPTIONS = {
    "raw_attention": [{}],
    "rollout": [{}, {"start_layer": 1, "head_fusion": "max", "discard_ratio": 0.3}],
    "grad_rollout": [{}, {"start_layer": -1}],
    "gmar": [{}, {"norm": "l2", "head_grad": "attention", "start_layer": 1}],
    "gae": [{}, {"start_layer": 1}],
    "legrad": [{}, {"start_layer": -1}],
    "gradcam": [{}, {"layer": 0}],
}
CASES = [(m, i) for m, options in OPTIONS.items() for i in range(len(options))]


def both_paths(model, images, method, target=None, **options):
    explanations = []
    for low_memory in (False, True):
        explainer = get_method(method)(model, **options)
        explainer.low_memory = low_memory
        explanations.append(explainer(images, target))
    return explanations


def assert_same(plain, saving):
    # The reductions are the same operations on the same numbers; only when they run differs.
    assert_close(saving.token_map, plain.token_map, rtol=0, atol=0)
    assert_close(saving.heatmap, plain.heatmap, rtol=0, atol=0)
    if plain.head_weights is None:
        assert saving.head_weights is None
    else:
        assert_close(saving.head_weights, plain.head_weights, rtol=0, atol=0)
    assert torch.equal(saving.target, plain.target) if plain.target is not None else saving.target is None


@pytest.mark.parametrize("family", list(MODELS))
@pytest.mark.parametrize("method,case", CASES)
def test_same_maps_on_every_family(family, method, case):
    model = MODELS[family]()
    size = (IMAGE, IMAGE + 16) if family == "timm_dynamic" else (IMAGE, IMAGE)
    images = torch.randn(3, 3, *size, generator=torch.Generator().manual_seed(2))
    plain, saving = both_paths(model, images, method, target_for(family), **OPTIONS[method][case])
    assert plain.token_map.abs().sum() > 0, "a map of zeros would make the comparison empty"
    assert_same(plain, saving)


@pytest.mark.parametrize("method", ["legrad", "gradcam"])
def test_same_maps_on_an_attention_pooled_model(method):
    model = make_siglip()
    images = torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(3))
    from conftest import clip_target

    plain, saving = both_paths(model, images, method, clip_target)
    assert plain.token_map.abs().sum() > 0
    assert_same(plain, saving)


def test_same_maps_with_legrads_correction():
    """Two backward passes through the same graph (the prompt, then the empty prompt)."""
    model = make_clip_with_text()
    target = gmar.TextTarget(model, clip_tokenizer(), ["a red square", "a dog"])
    images = torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(4))
    plain, saving = both_paths(model, images, "legrad", target, correction=True, correction_threshold=0.5)
    assert (plain.token_map == 0).any(), "the correction must zero some patches for the test to mean anything"
    assert_same(plain, saving)


def chain(layers: int = 5, size: int = 64):
    """A chain ``a_{l+1} = tanh(W a_l)`` whose every link is a gradient input."""
    weight = torch.randn(size, size, generator=torch.Generator().manual_seed(5)) / size**0.5
    x = torch.randn(8, size, requires_grad=True)
    links = []
    for _ in range(layers):
        x = torch.tanh(x @ weight)
        links.append(x)
    return links, (x**2).sum()


@pytest.mark.parametrize("chained", [True, False])
def test_stream_gradients_equals_autograd_and_lets_each_gradient_go(chained):
    links, objective = chain()
    if not chained:  # make every link a dead end: each its own objective on a detached input
        links = [link.detach().requires_grad_() * 2 for link in links]
        objective = sum((link**2).sum() for link in links)
    expected = differentiate(objective, links, retain_graph=True)
    alive_when_reduced, seen = [], []

    def reduce(index, gradient):
        alive_when_reduced.append(sum(ref() is not None for ref in seen))
        seen.append(weakref.ref(gradient))
        return gradient.clone()

    got = stream_gradients(objective, links, reduce, chained=chained)
    for g, e in zip(got, expected, strict=True):
        assert_close(g, e, rtol=0, atol=0)
    assert len(alive_when_reduced) == len(links)
    # No gradient outlives its reduction: when a layer's gradient arrives, the earlier ones are gone.
    assert alive_when_reduced == [0] * len(links)


def test_plain_path_holds_every_gradient():
    """The other side of the check above: differentiate() keeps all of them at once."""
    links, objective = chain()
    grads = differentiate(objective, links)
    refs = [weakref.ref(g) for g in grads]
    assert sum(r() is not None for r in refs) == len(links)


def test_stream_gradients_reduces_an_unreached_input_from_zeros():
    x = torch.randn(4, requires_grad=True)
    used, unused = x * 2, x * 3
    got = stream_gradients(used.sum(), [used, unused], lambda i, g: g.clone(), chained=False)
    assert_close(got[0], torch.ones(4))
    assert_close(got[1], torch.zeros(4))


def test_stream_gradients_leaves_no_hook_behind_when_reduce_raises():
    links, objective = chain(3)

    def reduce(index, gradient):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        stream_gradients(objective, links, reduce, chained=True)
    for link in links:
        assert not link._backward_hooks, "hooks must be removed also when the reduction raises"
