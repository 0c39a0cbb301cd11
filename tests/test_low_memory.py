"""The memory-saving path (each layer reduced as it arrives) against the plain path (every layer's
attention and gradient first, the same reductions after): the same maps, and it really lets go.
"""

from __future__ import annotations

import weakref

import pytest
import torch
from torch.testing import assert_close

import gmar
from conftest import (
    FACTORIES,
    IMAGE,
    clip_tokenizer,
    make_clip_with_text,
    make_coca,
    make_siglip,
    make_timm,
    target_for,
)
from gmar.capture import AttentionStream
from gmar.errors import CaptureError
from gmar.methods import get_method
from gmar.methods.base import differentiate, stream_gradients
from tolerance import FLOAT32

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
    # The same reductions of the same attention; the streamed path forms the probabilities again,
    # chunk by chunk, so the numbers agree to float rounding, not bit for bit.
    scale = plain.token_map.abs().amax().clamp_min(1e-12)
    assert_close(saving.token_map / scale, plain.token_map / scale, rtol=0, atol=1e-5)
    assert_close(saving.heatmap, plain.heatmap, rtol=0, atol=1e-4)
    if plain.head_weights is None:
        assert saving.head_weights is None
    else:
        assert_close(saving.head_weights, plain.head_weights, rtol=0, atol=1e-5)
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


@pytest.mark.parametrize("factory", [make_siglip, make_coca])
@pytest.mark.parametrize("method", ["legrad", "gradcam"])
def test_same_maps_on_an_attention_pooled_model(method, factory):
    model = factory()
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


# --- the streamed attention core ------------------------------------------------------------


def explicit_layers(qkv, scale, mask):
    """Two chained attention layers computed the plain way: (P0, O0, P1, O1)."""
    q, k, v = qkv
    p0 = ((q * scale) @ k.transpose(-2, -1) + mask).softmax(-1)
    o0 = p0 @ v
    p1 = ((o0 * scale) @ k.transpose(-2, -1)).softmax(-1)
    return p0, o0, p1, p1 @ v


def qkv64(batch=5, heads=3, tokens=7, width=4, seed=6):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, tokens, width, dtype=torch.float64, generator=generator) for _ in range(3)]


@pytest.mark.parametrize("chunk_bytes", [1, 2 * 3 * 7 * 7 * 8, 2**30])  # one sample, two, the whole batch
@pytest.mark.parametrize("gradient_of", ["attention", "output"])
def test_streamed_core_gives_the_explicit_gradients_chunk_by_chunk(chunk_bytes, gradient_of):
    qkv = [t.requires_grad_() for t in qkv64()]
    mask = torch.randn(5, 1, 7, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    weight = torch.randn(5, 3, 7, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    p0, o0, p1, o1 = explicit_layers(qkv, 0.3, mask)
    expected = torch.autograd.grad((o1 * weight).sum(), [p0, p1] if gradient_of == "attention" else [o0, o1])

    stream = AttentionStream(2, chunk_bytes=chunk_bytes)
    q, k, v = qkv
    out0, _ = stream.attend(0, q, k, v, 0.3, mask)
    out1, _ = stream.attend(1, out0, k, v, 0.3, None)
    assert_close(out1, o1, rtol=0, atol=1e-12)
    chunk_sizes = []

    def reduce(index, gradient, attention):
        chunk_sizes.append(gradient.shape[0])
        return gradient.clone(), attention.clone()

    got = stream.backward((out1 * weight).sum(), [0, 1], reduce, gradient_of=gradient_of, chained=True)
    for (gradient, attention), want, probabilities in zip(got, expected, (p0, p1), strict=True):
        assert_close(gradient, want, rtol=0, atol=1e-12)
        assert_close(attention, probabilities, rtol=0, atol=1e-12)
    per_chunk = {1: 1, 2 * 3 * 7 * 7 * 8: 2, 2**30: 5}[chunk_bytes]
    assert max(chunk_sizes) == per_chunk and sum(chunk_sizes) == 2 * 5


def test_streamed_core_passes_the_right_gradient_to_q_k_v():
    def core(q, k, v):
        return AttentionStream(1, chunk_bytes=1).attend(0, q, k, v, 0.5, None)[0]

    assert torch.autograd.gradcheck(core, tuple(t.requires_grad_() for t in qkv64(2, 2, 5, 3)))


def test_streamed_core_reduces_forward_chunks_and_joins_them():
    q, k, v = qkv64()
    mask = torch.randn(1, 1, 7, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    probabilities = ((q * 0.7) @ k.transpose(-2, -1) + mask).softmax(-1)
    seen = []

    def reduce(layer, p):
        seen.append(p.shape[0])
        return p.mean(dim=1), p.amax(dim=1)

    out, (mean, peak) = AttentionStream(1, reduce, chunk_bytes=1).attend(0, q, k, v, 0.7, mask)
    assert seen == [1] * 5
    assert_close(out, probabilities @ v, rtol=0, atol=1e-12)
    assert_close(mean, probabilities.mean(dim=1), rtol=0, atol=1e-12)
    assert_close(peak, probabilities.amax(dim=1), rtol=0, atol=1e-12)


def test_streamed_core_lets_every_chunk_go_and_reduces_an_unreached_layer_from_zeros():
    q, k, v = [t.requires_grad_() for t in qkv64()]
    stream = AttentionStream(3, chunk_bytes=1)
    out0, _ = stream.attend(0, q, k, v, 0.3, None)
    stream.attend(1, q * 2, k, v, 0.3, None)  # its output is never used
    out2, _ = stream.attend(2, out0, k, v, 0.3, None)
    alive_when_reduced, seen, zero = [], [], []

    def reduce(index, gradient, attention):
        alive_when_reduced.append(sum(ref() is not None for ref in seen))
        seen.extend([weakref.ref(gradient), weakref.ref(attention)])
        zero.append(bool((gradient == 0).all()))
        return gradient.sum(dim=(1, 2, 3))

    got = stream.backward(out2.square().sum(), [0, 1, 2], reduce, chained=True)
    # Inside the pass, no chunk's probabilities or gradient outlives its reduction.
    assert alive_when_reduced == [0] * 15
    assert zero == [False] * 10 + [True] * 5, "layers 2 and 0 in the pass, layer 1 from zeros after it"
    assert (got[1] == 0).all() and got[1].shape == (5,)
    with pytest.raises(CaptureError, match="pass is over"):
        stream.backward(out2.sum(), [0], reduce)


def test_streamed_explanation_stops_the_backward_pass_at_the_first_layer():
    """Gradient rollout needs nothing below layer 0's attention: the patch embedding gets no gradient."""
    model = make_timm()
    reached = []

    def on_output(module, args, output):
        output.register_hook(lambda gradient: reached.append(True))

    handle = model.patch_embed.register_forward_hook(on_output)
    try:
        gmar.explain(model, torch.randn(2, 3, IMAGE, IMAGE), method="grad_rollout")
        assert not reached
        explainer = get_method("grad_rollout")(model)
        explainer.low_memory = False
        explainer(torch.randn(2, 3, IMAGE, IMAGE))
        assert not reached, "the plain path stops at layer 0's attention too"
        images = torch.randn(2, 3, IMAGE, IMAGE, requires_grad=True)
        torch.autograd.grad(model(images).sum(), images)
        assert reached, "an input gradient passes the hook: the check can fail"
    finally:
        handle.remove()


@pytest.mark.parametrize("family", list(MODELS))
def test_streamed_forward_gives_the_models_own_output(family):
    model = MODELS[family]()
    size = (IMAGE, IMAGE + 16) if family == "timm_dynamic" else (IMAGE, IMAGE)
    images = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(10))
    explainer = get_method("gmar")(model)
    with torch.no_grad():
        expected = explainer.adapter.forward(images)
    assert_close(explainer(images, target_for(family)).logits, expected, **FLOAT32)


@pytest.mark.parametrize("low_memory", [True, False])
@pytest.mark.parametrize("method", ["gmar", "gae", "legrad", "gradcam", "rollout"])
def test_nothing_of_the_graph_outlives_the_call(method, low_memory):
    """Grad-CAM's backward pass ends at the last block; the rest of the graph (which refers to the
    stream that refers to it) must still be freed when the call returns."""
    model = make_timm()
    alive = []
    handle = model.blocks[0].register_forward_hook(lambda module, args, output: alive.append(weakref.ref(output)))
    try:
        explainer = get_method(method)(model)
        explainer.low_memory = low_memory
        explainer(torch.randn(2, 3, IMAGE, IMAGE))
    finally:
        handle.remove()
    assert len(alive) == 1 and alive[0]() is None


def test_default_chunk_size_follows_the_device():
    """The stream's chunks hold 16 MB of probabilities on the CPU (its caches), 256 MB elsewhere
    (fewer kernel launches on an accelerator): ViT-B/16 at 224 px, 8 samples a chunk against 142."""
    from gmar.capture import chunk_bytes_for
    from gmar.capture.stream import _Core

    assert chunk_bytes_for(torch.device("cpu")) == 16 * 2**20
    assert chunk_bytes_for(torch.device("cuda")) == chunk_bytes_for(torch.device("mps")) == 256 * 2**20
    per_sample = 12 * 197 * 197 * 4
    for device, budget in (("cpu", 16 * 2**20), ("meta", 256 * 2**20)):
        q, k, v = (torch.zeros((), device=device).expand(300, 12, 197, 64) for _ in range(3))
        chunks = AttentionStream(1)._chunks(_Core(v, q=q, k=k, scale=0.125))
        assert chunks[0] == slice(0, budget // per_sample), device
        assert chunks[-1].stop == 300
    assert AttentionStream(1, chunk_bytes=1)._chunks(_Core(v, q=q, k=k))[0] == slice(0, 1)
