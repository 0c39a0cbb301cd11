"""Adapters read any block's tokens out through the model's own head; capture can cut the graph."""

from __future__ import annotations

import functools

import pytest
import torch
from torch.testing import assert_close

import gmar
import reference as R
from conftest import ATTENTION_POOLED, FACTORIES, IMAGE, make_coca, make_siglip, make_timm
from gmar.capture import capture, collect, frozen_eval
from tolerance import FLOAT32

MODELS = {
    **FACTORIES,
    **ATTENTION_POOLED,
    "siglip": make_siglip,
    "coca": make_coca,
    "timm_map": lambda: make_timm(class_token=False, reg_tokens=2, global_pool="map"),
    "timm_map_prefix": lambda: make_timm(class_token=False, reg_tokens=2, global_pool="map", pool_include_prefix=True),
}


@functools.cache
def model(name: str) -> torch.nn.Module:
    return MODELS[name]()


def images() -> torch.Tensor:
    return torch.randn(3, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(5))


def own_forward(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    if hasattr(net, "encode_image"):
        return net.encode_image(x, normalize=False)
    if type(net).__module__.startswith("transformers."):
        return R.hf_forward(net, x)
    return net(x)


@pytest.mark.parametrize("name", MODELS)
def test_readout_of_the_last_block_is_the_model_output(name):
    net = model(name)
    adapter = gmar.get_adapter(net)
    x = images()
    with torch.no_grad():
        expected = own_forward(net, x)  # the model's own forward, no gmar instrumentation at all
        with frozen_eval(net), capture(adapter, block_outputs=True) as recorder:
            output = adapter.forward(x)
        captured = collect(recorder, output, net)
        readout, pooler = adapter.readout(adapter.block_tokens(captured.block_outputs[-1]))
    assert_close(readout, expected, **FLOAT32)  # fused vs explicit attention
    assert len(adapter.blocks) == adapter.num_layers == len(captured.block_outputs)
    layout = adapter.token_layout((IMAGE, IMAGE))
    if adapter.attention_pooled:
        assert layout.attention_pooled and pooler is not None
        assert pooler.shape[:2] == (3, 4) and pooler.shape[-1] >= layout.num_patches
        assert_close(pooler.sum(-1), torch.ones(pooler.shape[:-1]))
        with pytest.raises(ValueError, match="attention-pooled"):
            layout.readout_weights()
    else:
        assert pooler is None and not layout.attention_pooled


@pytest.mark.parametrize("name", ["timm", "hf_vit", "openclip"])
def test_intermediate_readout_differs_from_the_output(name):
    """A real readout of an early block, not the final output returned whatever the tokens."""
    net = model(name)
    adapter = gmar.get_adapter(net)
    with torch.no_grad(), frozen_eval(net), capture(adapter, block_outputs=True) as recorder:
        output = adapter.forward(images())
    early, _ = adapter.readout(adapter.block_tokens(recorder.block_outputs[0]))
    assert early.shape == output.shape
    assert (early - output).abs().max() > 1e-2


@pytest.mark.parametrize("name", ["timm", "hf_dinov2", "openclip"])
def test_detached_blocks_cut_the_graph_between_blocks(name):
    net = model(name)
    adapter = gmar.get_adapter(net)
    with frozen_eval(net), capture(adapter, detach_from=1) as recorder:
        output = adapter.forward(images().requires_grad_(True))
    captured = collect(recorder, output, net)
    grads = torch.autograd.grad(output.sum(), captured.attentions, allow_unused=True)
    assert grads[0] is None and grads[1] is None, "the last block's output must not reach earlier blocks"
    assert grads[2] is not None and grads[2].abs().sum() > 0
    # The cut changes no value: the output equals the model's own.
    with torch.no_grad():
        assert_close(output.detach(), own_forward(net, images()), **FLOAT32)  # fused vs explicit attention


@pytest.mark.parametrize("name", ["timm", "hf_vit", "openclip", "siglip"])
def test_block_hooks_are_removed(name):
    net = model(name)
    adapter = gmar.get_adapter(net)

    def hooks() -> list:
        return [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in net.modules()]

    before = hooks()
    with pytest.raises(RuntimeError, match="stop"):
        with capture(adapter, block_outputs=True, detach_from=0, norm_input_layer=1):
            raise RuntimeError("stop")
    assert hooks() == before


def test_readout_pooling_options():
    with pytest.raises(ValueError, match="all_tokens"):
        gmar.LeGrad(model("timm"), pooling="all_tokens")
    with pytest.raises(ValueError, match="pooling 'cls'"):
        gmar.LeGrad(model("openclip"), pooling="cls")
    with pytest.raises(ValueError, match="pooling 'all_tokens'"):
        gmar.LeGrad(model("siglip"), pooling="all_tokens")
