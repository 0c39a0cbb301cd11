"""Grad-CAM on ViT tokens against hand-written references.

Definition: ``X`` the tokens entering block ``layer``'s first norm (the block's input), ``G = ∂y/∂X``,
prefix tokens dropped, ``w = mean over patch tokens of G`` ``(B, D)``, map ``ReLU(Σ_c w_c X_c)`` on the
patch grid. The references take ``X`` from ``reference.trace`` (timm and OpenCLIP: a forward written out
from the weights; Hugging Face: ``hidden_states``, checked here against a hook on the block's first norm)
or from a forward pre-hook on a copy of the model, and ``G`` from ``torch.autograd.grad``.
"""

from __future__ import annotations

import copy
import functools
import inspect
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import gmar
import reference as R
from conftest import FACTORIES, IMAGE, clip_target, make_coca, make_hf_vit, make_siglip, make_timm, target_for
from tolerance import FLOAT32

TOL = FLOAT32
LAYERS = (-1, 0, 1)
MODELS = {
    **FACTORIES,
    "timm_dynamic": lambda: make_timm(dynamic_img_size=True),
    "siglip": make_siglip,
    "coca": make_coca,
}
FAMILIES = [*FACTORIES, "timm_dynamic"]


@functools.cache
def model(name: str) -> torch.nn.Module:
    return MODELS[name]()


@functools.cache
def batch(name: str) -> torch.Tensor:
    """Four images; a non-square 32x48 batch (grid 4x6) for the dynamic-size timm model."""
    width = 48 if name == "timm_dynamic" else IMAGE
    return torch.randn(4, 3, IMAGE, width, generator=torch.Generator().manual_seed(1))


def gradcam_map(tokens: torch.Tensor, grads: torch.Tensor, num_prefix: int, grid: tuple[int, int]) -> torch.Tensor:
    """``ReLU(Σ_c w_c X_c)`` over the patch tokens, ``w`` the mean gradient over the patch tokens."""
    patches, patch_grads = tokens[:, num_prefix:], grads[:, num_prefix:]
    assert patches.shape[1] == grid[0] * grid[1]
    weights = patch_grads.mean(dim=1)  # (B, D)
    return torch.relu(torch.einsum("bnd,bd->bn", patches, weights)).reshape(-1, *grid)


def scores_of(output: torch.Tensor, target) -> tuple[torch.Tensor, torch.Tensor | None]:
    if callable(target):
        return target(output), None
    classes = output.detach().argmax(dim=-1)
    return output[torch.arange(output.shape[0]), classes], classes


class Traced(NamedTuple):
    tokens: list[torch.Tensor]  # X entering block l (B, N, D)
    grads: list[torch.Tensor]  # ∂(Σ_b y_b)/∂X
    output: torch.Tensor
    scores: torch.Tensor
    classes: torch.Tensor | None
    num_prefix: int
    grid: tuple[int, int]


@functools.cache
def traced(name: str) -> Traced:
    """Reference tokens entering every block, their gradients, and the output, all detached."""
    t = R.trace(model(name), batch(name))
    layers = len(t.attentions)
    assert t.tokens is not None and len(t.tokens) == layers + 1
    scores, classes = scores_of(t.output, target_for(name))
    grads = torch.autograd.grad(scores.sum(), t.tokens[:layers])
    tokens = [x.detach() for x in t.tokens[:layers]]
    return Traced(tokens, list(grads), t.output.detach(), scores.detach(), classes, t.num_prefix, t.grid)


def reference_gradcam(name: str, layer: int) -> torch.Tensor:
    t = traced(name)
    return gradcam_map(t.tokens[layer], t.grads[layer], t.num_prefix, t.grid)


def hooked_gradcam(net: torch.nn.Module, norm_of, images: torch.Tensor, forward, target, num_prefix, grid):
    """Grad-CAM from a forward pre-hook on ``norm_of(copy)``, the first norm of the block, in a copy of ``net``."""
    twin = copy.deepcopy(net).eval()
    kept = []
    handle = norm_of(twin).register_forward_pre_hook(lambda module, args: kept.append(args[0]))
    try:
        output = forward(twin, images.detach().clone().requires_grad_(True))
    finally:
        handle.remove()
    assert len(kept) == 1, "the hooked norm must run exactly once"
    scores, _ = scores_of(output, target)
    (grad,) = torch.autograd.grad(scores.sum(), kept[0])
    return gradcam_map(kept[0].detach(), grad, num_prefix, grid), output.detach()


def hf_forward(net: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    kwargs = {}
    if "interpolate_pos_encoding" in inspect.signature(net.forward).parameters:
        kwargs["interpolate_pos_encoding"] = True
    return net(pixel_values=images, **kwargs).logits


def hf_first_norm(layer: int):
    def norm_of(net: torch.nn.Module) -> torch.nn.Module:
        base = net.base_model
        blocks = base.layers if hasattr(base, "layers") else base.encoder.layer  # ViT/DeiT vs DINOv2 naming
        block = blocks[layer]
        return block.layernorm_before if hasattr(block, "layernorm_before") else block.norm1

    return norm_of


# ------------------------------------------------------------------------------------- every family, layers


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("name", FAMILIES)
def test_token_map_matches_reference(name, layer):
    t = traced(name)
    output, scores, classes, num_prefix, grid = t.output, t.scores, t.classes, t.num_prefix, t.grid
    exp = gmar.explain(model(name), batch(name), "gradcam", target=target_for(name), layer=layer)
    expected = reference_gradcam(name, layer)
    assert exp.method == "gradcam"
    assert exp.token_map.shape == (4, *grid)
    assert exp.heatmap.shape == (4, *batch(name).shape[-2:])
    assert_close(exp.token_map, expected, **TOL)
    assert (expected > 0).any(dim=(1, 2)).all(), "a map that is zero everywhere would prove little"
    assert exp.layout.num_prefix_tokens == num_prefix
    assert tuple(exp.layout.grid_size) == grid
    assert exp.layout.patch_slice == slice(num_prefix, num_prefix + grid[0] * grid[1])
    assert_close(exp.logits, output, **TOL)
    assert_close(exp.scores, scores, **TOL)
    assert exp.head_weights is None and exp.prompts is None
    if classes is None:
        assert exp.target is None
    else:
        assert torch.equal(exp.target, classes)


@pytest.mark.parametrize("name", FAMILIES)
def test_layers_give_different_maps(name):
    """The layer argument selects the block: its maps differ from the other layers' maps."""
    maps = [reference_gradcam(name, layer) for layer in range(len(traced(name).tokens))]
    for i in range(len(maps)):
        for j in range(i):
            assert not torch.allclose(maps[i], maps[j], atol=1e-4), f"layers {j} and {i} give the same map"


def test_heatmap_is_the_upsampled_normalised_token_map():
    name = "timm_dynamic"
    exp = gmar.explain(model(name), batch(name), "gradcam", layer=-1)
    pixels = F.interpolate(reference_gradcam(name, -1)[:, None], size=(IMAGE, 48), mode="bilinear")[:, 0]
    low = pixels.amin(dim=(1, 2), keepdim=True)
    high = pixels.amax(dim=(1, 2), keepdim=True)
    assert_close(exp.heatmap, (pixels - low) / (high - low), **TOL)


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("name", ["hf_vit", "hf_deit_teacher", "hf_dinov2", "hf_dinov2_registers"])
def test_hf_hidden_states_are_the_first_norm_inputs(name, layer):
    """The reference's HF tokens are ``hidden_states`` (``hidden_states[l]`` entering layer ``l``):
    check that against a pre-hook on the block's first norm in an independent forward."""
    t = traced(name)
    hooked, hooked_output = hooked_gradcam(
        model(name), hf_first_norm(layer), batch(name), hf_forward, None, t.num_prefix, t.grid
    )
    assert_close(hooked_output, t.output, **TOL)
    assert_close(reference_gradcam(name, layer), hooked, **TOL)


# ------------------------------------------------------------------------------ attention-pooled, non-square


@pytest.mark.parametrize("layer", LAYERS)
def test_siglip_matches_hooked_reference(layer):
    net = model("siglip")
    images = batch("siglip")
    trunk = net.visual.trunk
    assert trunk.num_prefix_tokens == 0 and trunk.attn_pool is not None
    exp = gmar.explain(net, images, "gradcam", target=clip_target, layer=layer)

    def norm_of(twin):
        return twin.visual.trunk.blocks[layer].norm1

    expected, output = hooked_gradcam(net, norm_of, images, lambda m, x: m.encode_image(x), clip_target, 0, (4, 4))
    assert exp.layout.num_prefix_tokens == 0
    assert exp.token_map.shape == (4, 4, 4)
    assert (expected > 0).any(dim=(1, 2)).all()
    assert_close(exp.token_map, expected, **TOL)
    assert_close(exp.logits, output, **TOL)
    assert_close(exp.scores, clip_target(output), **TOL)
    assert exp.target is None


@pytest.mark.parametrize("layer", LAYERS)
def test_coca_matches_hooked_reference(layer):
    """CoCa (attentional pooler): Grad-CAM on the tokens entering a block, [class token, patches]."""
    net = model("coca")
    images = batch("coca")
    exp = gmar.explain(net, images, "gradcam", target=clip_target, layer=layer)

    def norm_of(twin):
        return twin.visual.transformer.resblocks[layer].ln_1

    def forward(twin, x):
        return twin.encode_image(x, normalize=False)

    expected, output = hooked_gradcam(net, norm_of, images, forward, clip_target, 1, (4, 4))
    assert (expected > 0).any(dim=(1, 2)).all()
    assert_close(exp.token_map, expected, **TOL)
    assert_close(exp.logits, output, **TOL)


@functools.cache
def hf_model(name: str) -> torch.nn.Module:
    return FACTORIES[name]()


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("name", ["hf_vit", "hf_dinov2_registers"])
def test_hf_non_square_input(name, layer):
    """48x32 images through interpolate_pos_encoding (ViT) / always-interpolating DINOv2: grid 6x4."""
    net = hf_model(name)
    images = torch.randn(3, 3, 48, 32, generator=torch.Generator().manual_seed(5))
    prefix = 1 + (getattr(net.config, "num_register_tokens", 0) or 0)
    expected, output = hooked_gradcam(net, hf_first_norm(layer), images, hf_forward, None, prefix, (6, 4))
    exp = gmar.explain(net, images, "gradcam", layer=layer)
    assert exp.token_map.shape == (3, 6, 4)
    assert tuple(exp.layout.grid_size) == (6, 4)
    assert (expected > 0).any(dim=(1, 2)).all()
    assert_close(exp.token_map, expected, **TOL)
    assert_close(exp.logits, output, **TOL)
    assert torch.equal(exp.target, output.argmax(-1))


def test_hf_vit_non_square_needs_interpolation():
    """The reference's premise: without interpolate_pos_encoding the HF ViT refuses 48x32."""
    with pytest.raises(ValueError):
        make_hf_vit()(pixel_values=torch.zeros(1, 3, 48, 32))


# ------------------------------------------------------------------------------------------- negative tests


@pytest.mark.parametrize("layer", LAYERS)
def test_dropping_the_prefix_matters(layer):
    """With the prefix tokens (CLS, registers) kept in the channel-weight mean the map is another one."""
    name = "timm_registers"
    t = traced(name)
    num_prefix = t.num_prefix
    assert num_prefix == 3
    exp = gmar.explain(model(name), batch(name), "gradcam", layer=layer)
    x, g = t.tokens[layer], t.grads[layer]
    patches = x[:, num_prefix:]
    for kept in (g[:, [0, *range(num_prefix, g.shape[1])]], g):  # CLS kept; every prefix token kept
        wrong = torch.relu(torch.einsum("bnd,bd->bn", patches, kept.mean(dim=1))).reshape(exp.token_map.shape)
        gap = (wrong - exp.token_map).abs().max() / exp.token_map.abs().max()
        assert gap > 0.05, f"keeping the prefix is indistinguishable (relative gap {gap:.3g})"
    assert_close(exp.token_map, reference_gradcam(name, layer), **TOL)


@pytest.mark.parametrize("layer", [3, -4, 100, 1.0, "1", None, True])
@pytest.mark.parametrize("name", ["timm", "hf_vit"])
def test_invalid_layer_is_refused(name, layer):
    with pytest.raises(ValueError, match="layer"):
        gmar.GradCAM(model(name), layer=layer)
    with pytest.raises(ValueError, match="layer"):
        gmar.explain(model(name), batch(name), "gradcam", layer=layer)


def test_negative_layers_count_from_the_end():
    name = "timm"
    for layer, positive in ((-1, 2), (-2, 1), (-3, 0)):
        exp = gmar.GradCAM(model(name), layer=layer)(batch(name))
        assert_close(exp.token_map, reference_gradcam(name, positive), **TOL)


# ------------------------------------------------------------------------------------ the model is untouched


def all_hooks(net: torch.nn.Module) -> list:
    hooks = []
    for module in net.modules():
        for attr in (
            "_forward_hooks",
            "_forward_pre_hooks",
            "_backward_hooks",
            "_backward_pre_hooks",
            "_forward_hooks_with_kwargs",
            "_forward_pre_hooks_with_kwargs",
        ):
            hooks.extend(getattr(module, attr, {}).values())
    return hooks


@pytest.mark.parametrize("name", ["timm", "hf_vit", "openclip", "siglip"])
def test_model_is_untouched(name):
    net = MODELS[name]()
    net.train()
    # a mixed state to restore: some modules in eval mode, some parameters frozen
    modules = list(net.modules())
    for module in modules[1::3]:
        module.training = False
    params = list(net.parameters())
    for param in params[::2]:
        param.requires_grad_(False)
    training = [m.training for m in modules]
    requires_grad = [p.requires_grad for p in params]
    forwards = [m.__dict__.get("forward") for m in modules]
    fused = [getattr(m, "fused_attn", None) for m in modules]
    attn_impl = getattr(getattr(net, "config", None), "_attn_implementation", None)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    assert not all_hooks(net)

    images = torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(3))
    target = clip_target if name in ("openclip", "siglip") else None
    exp = gmar.explain(net, images, "gradcam", target=target, layer=-1)
    assert exp.token_map.shape == (2, 4, 4)

    assert not all_hooks(net), "hooks were left on the model"
    assert [m.training for m in modules] == training
    assert [p.requires_grad for p in params] == requires_grad
    assert all(p.grad is None for p in params)
    assert [m.__dict__.get("forward") for m in modules] == forwards
    assert [getattr(m, "fused_attn", None) for m in modules] == fused
    assert getattr(getattr(net, "config", None), "_attn_implementation", None) == attn_impl
    for key, value in net.state_dict().items():
        assert torch.equal(value, state[key]), key


@pytest.mark.parametrize("name", ["timm", "hf_vit", "openclip", "torchvision"])
def test_gradcam_alone_runs_the_models_own_attention_and_stops_at_its_block(name, monkeypatch):
    """Grad-CAM reads no attention: alone, it lets the model run its own (fused) attention, and its
    backward pass goes no lower than the block whose input it reads."""
    from gmar.capture import AttentionStream, Recorder

    net = FACTORIES[name]()
    images = torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(4))
    expected = gmar.explain(net, images, "gradcam", target=target_for(name), layer=-1).token_map

    def refuse(*args, **kwargs):
        raise AssertionError("Grad-CAM alone must not route the attention through gmar")

    monkeypatch.setattr(AttentionStream, "attend", refuse)
    monkeypatch.setattr(Recorder, "attention", refuse)
    below, recorded = [], []
    embed = {"timm": lambda m: m.patch_embed, "hf_vit": lambda m: m.vit.embeddings}.get(name, lambda m: None)(net)
    handle = embed.register_full_backward_hook(lambda *args: below.append(1)) if embed is not None else None

    def first_block(module, args, output):
        recorded.append((output[0] if isinstance(output, tuple) else output).requires_grad)

    first = gmar.adapters.get_adapter(net).blocks[0].register_forward_hook(first_block)
    try:
        exp = gmar.explain(net, images, "gradcam", target=target_for(name), layer=-1)
    finally:
        first.remove()
        if handle is not None:
            handle.remove()
    assert_close(exp.token_map, expected, **TOL)
    assert below == []  # no gradient reached the patch embedding
    assert recorded == [False]  # and the blocks before the last one ran unrecorded
