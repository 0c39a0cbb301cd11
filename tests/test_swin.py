"""Swin and Swin-v2 (timm, transformers): Grad-CAM on the last stage's tokens with that stage's grid;
every other method refuses them in one line.

The reference is pytorch-grad-cam's definition written out on an independent, hooked forward: a
pre-hook on a copy of the model keeps the tokens entering a last-stage block, ``torch.autograd.grad``
gives their gradient, the channel weights are its mean over the stage's positions and the map is
``ReLU(Σ_c w_c X_c)`` on the stage's ``(H', W')`` grid.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch.testing import assert_close

import gmar
from conftest import IMAGE, SWIN, make_swin
from tolerance import FLOAT32

TOL = FLOAT32


@functools.cache
def model(kind: str) -> torch.nn.Module:
    return make_swin(kind)


def images(width: int = IMAGE) -> torch.Tensor:
    return torch.randn(3, 3, IMAGE, width, generator=torch.Generator().manual_seed(7))


def last_stage_blocks(net: torch.nn.Module) -> list[torch.nn.Module]:
    return list(net.base_model.encoder.layers[-1].blocks if hasattr(net, "config") else net.layers[-1].blocks)


def forward(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return net(pixel_values=x).logits if hasattr(net, "config") else net(x)


def hooked_gradcam(net: torch.nn.Module, layer: int, x: torch.Tensor, grid: tuple[int, int]):
    twin = copy.deepcopy(net).eval()
    kept = []
    handle = last_stage_blocks(twin)[layer].register_forward_pre_hook(lambda module, args: kept.append(args[0]))
    try:
        output = forward(twin, x)
    finally:
        handle.remove()
    assert len(kept) == 1
    classes = output.argmax(dim=-1)
    (grad,) = torch.autograd.grad(output[torch.arange(len(x)), classes].sum(), kept[0])
    tokens, grad = kept[0].detach(), grad
    if tokens.ndim == 3:  # transformers: (B, H'·W', C) -> (B, H', W', C)
        tokens, grad = (t.reshape(t.shape[0], *grid, t.shape[-1]) for t in (tokens, grad))
    assert tokens.shape[1:3] == grid
    weights = grad.mean(dim=(1, 2))  # (B, C)
    return torch.relu(torch.einsum("bhwc,bc->bhw", tokens, weights)), output.detach(), classes


@pytest.mark.parametrize("layer", [-1, 0])
@pytest.mark.parametrize("kind", SWIN)
def test_gradcam_matches_hooked_reference(kind, layer):
    net, x = model(kind), images()
    expected, output, classes = hooked_gradcam(net, layer, x, (4, 4))
    exp = gmar.explain(net, x, "gradcam", layer=layer)
    assert exp.layout.grid_size == (4, 4) and exp.layout.patch_size == (8, 8)
    assert exp.layout.num_prefix_tokens == 0
    assert (expected > 0).any(dim=(1, 2)).all()
    assert_close(exp.token_map, expected, **TOL)
    assert_close(exp.logits, output, **TOL)
    assert torch.equal(exp.target, classes)
    assert exp.heatmap.shape == (3, IMAGE, IMAGE)
    other, _, _ = hooked_gradcam(net, 1 - layer if layer == 0 else 0, x, (4, 4))
    assert not torch.allclose(other, expected, atol=1e-4), "the layer argument must select the block"


def test_hf_swin_non_square_input():
    """transformers' Swin takes other sizes: 32x48 pixels give a 4x6 last-stage grid."""
    net, x = model("hf_swin"), images(48)
    expected, _, _ = hooked_gradcam(net, -1, x, (4, 6))
    exp = gmar.explain(net, x, "gradcam")
    assert exp.token_map.shape == (3, 4, 6)
    assert_close(exp.token_map, expected, **TOL)


def test_hf_swin_input_that_does_not_tile_is_refused():
    with pytest.raises(gmar.InputSizeError, match="multiples of 8"):
        gmar.explain(model("hf_swin"), images(44), "gradcam")


@pytest.mark.parametrize("method", [m for m in gmar.available_methods() if m not in ("gradcam", "occlusion")])
@pytest.mark.parametrize("kind", SWIN)
def test_other_methods_refuse_in_one_line(kind, method):
    net = model(kind)
    with pytest.raises(gmar.UnsupportedModelError) as caught:
        gmar.explain(net, images(), method)
    message = str(caught.value)
    assert "\n" not in message and type(net).__name__ in message
    assert "shifted windows" in message and "gradcam" in message and "occlusion" in message


@pytest.mark.parametrize("kind", SWIN)
def test_occlusion_explains_on_the_last_stage_grid(kind):
    """Occlusion reads no attention: it hides each last-stage token's pixels (8x8 here) in turn."""
    net = model(kind)
    explanation = gmar.explain(net, images(), "occlusion")
    assert explanation.token_map.shape == (images().shape[0], 4, 4)
    with torch.no_grad():
        hidden = images().clone()
        hidden[:, :, 8:16, 0:8] = 0.0
        logits, occluded = gmar.get_adapter(net).forward(images()), gmar.get_adapter(net).forward(hidden)
    rows = torch.arange(images().shape[0])
    drop = logits[rows, explanation.target] - occluded[rows, explanation.target]
    torch.testing.assert_close(explanation.token_map[:, 1, 0], drop, **FLOAT32)


@pytest.mark.parametrize("kind", SWIN)
def test_model_untouched(kind):
    net = make_swin(kind)
    net.train()
    hooks = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in net.modules()]
    state = {k: v.clone() for k, v in net.state_dict().items()}
    gmar.explain(net, images(), "gradcam")
    assert net.training and all(p.requires_grad and p.grad is None for p in net.parameters())
    assert [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in net.modules()] == hooks
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())
