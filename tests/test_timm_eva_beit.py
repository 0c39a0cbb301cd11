"""timm ``Eva`` (RoPE inside attention) and ``Beit`` (relative position bias) beyond the parametrised
families of conftest.FACTORIES: non-square inputs, the position terms being material, attention
pooling (Perception Encoder), grouped-query attention, post-norm blocks, and OpenCLIP towers with an
Eva trunk (``EVA02-*``, ``PE-Core-*``). References come from tests/reference.py (forwards written out
from the weights, with their own RoPE rotation and relative-position indexing)."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import gmar
import reference as R
from conftest import FACTORIES, GELU_MLP, IMAGE, PATCH, clip_target, make_beit, make_eva, make_eva_pe, spread
from gmar.methods import get_method
from test_gradcam import gradcam_map
from test_legrad import class_score, layer_map, per_layer
from tolerance import FLOAT32

TOL = FLOAT32
ROLLOUT_FAMILY = ["raw_attention", "rollout", "grad_rollout", "gmar", "gae"]
WIDE = (IMAGE, IMAGE + 16)  # a 4x6 grid

#: models taking a 32x48 input: Eva with dynamic_img_size (with and without absolute positions, which
#: are resampled), and a Beit built for that size (its bias table and index cover a 4x6 grid)
NON_SQUARE = {
    "eva_avg": FACTORIES["eva_avg"],
    "eva_dinov3": FACTORIES["eva_dinov3"],
    "beit_wide": lambda: make_beit(img_size=WIDE),
}


@functools.cache
def model(name: str) -> nn.Module:
    return NON_SQUARE[name]()


@functools.cache
def wide_batch() -> torch.Tensor:
    return torch.randn(4, 3, *WIDE, generator=torch.Generator().manual_seed(5))


@functools.cache
def wide_ref(name: str) -> R.Gradients:
    return R.differentiate(R.trace(model(name), wide_batch()))


def explain(net: nn.Module, images: torch.Tensor, method: str, low_memory: bool = True, target=None, **options):
    explainer = get_method(method)(net, **options)
    explainer.low_memory = low_memory
    return explainer(images, target)


# ------------------------------------------------------------------------------------------- non-square


@pytest.mark.parametrize("name", list(NON_SQUARE))
def test_non_square_reference_forward_matches_the_model(name):
    trace = R.trace(model(name), wide_batch())
    assert trace.grid == (4, 6)
    with torch.no_grad():
        assert_close(trace.output.detach(), model(name)(wide_batch()), **TOL)


@pytest.mark.parametrize("low_memory", [True, False])
@pytest.mark.parametrize("method", ROLLOUT_FAMILY)
@pytest.mark.parametrize("name", list(NON_SQUARE))
def test_non_square_rollout_family_matches_reference(name, method, low_memory):
    g = wide_ref(name)
    exp = explain(model(name), wide_batch(), method, low_memory)
    assert exp.token_map.shape == (4, 4, 6) and exp.heatmap.shape == (4, *WIDE)
    assert_close(exp.token_map, R.reference_map(method, g), **TOL)
    if method == "gmar":
        assert_close(exp.head_weights, R.gmar_weights(g), **TOL)


@pytest.mark.parametrize("low_memory", [True, False])
@pytest.mark.parametrize("name", list(NON_SQUARE))
def test_non_square_legrad_and_gradcam_match_reference(name, low_memory):
    net, images = model(name), wide_batch()
    legrad = per_layer(name, net, images)  # each layer's own score, its own autograd.grad call
    assert_close(explain(net, images, "legrad", low_memory).token_map, legrad.maps.sum(dim=0), **TOL)

    t = R.trace(net, images)
    score = class_score(t.output)(t.output)
    tokens = t.tokens[1]
    (grad,) = torch.autograd.grad(score.sum(), tokens)
    expected = gradcam_map(tokens.detach(), grad, t.num_prefix, t.grid)
    assert_close(explain(net, images, "gradcam", low_memory, layer=1).token_map, expected, **TOL)


@pytest.mark.parametrize("method", [*ROLLOUT_FAMILY, "legrad", "gradcam"])
@pytest.mark.parametrize("name", ["eva_dinov3", "beit_wide"])
def test_batch_equals_single_images(name, method):
    whole = gmar.explain(model(name), wide_batch(), method)
    for i in range(4):
        single = gmar.explain(model(name), wide_batch()[i : i + 1], method)
        assert_close(single.token_map[0], whole.token_map[i], **TOL)


def test_beit_takes_only_its_own_size():
    with pytest.raises(gmar.InputSizeError, match=r"takes 32x32 inputs, got 32x48; resize the images$"):
        gmar.explain(FACTORIES["beit"](), wide_batch(), "rollout")


# ----------------------------------------------------------------------- the position terms are material


def without_rope(net: nn.Module) -> nn.Module:
    twin = copy.deepcopy(net)
    twin.rope = None
    return twin


def without_relative_bias(net: nn.Module) -> nn.Module:
    twin = copy.deepcopy(net)
    with torch.no_grad():
        for name, param in twin.named_parameters():
            if name.endswith("relative_position_bias_table"):
                param.zero_()
    return twin


@pytest.mark.parametrize(
    ("name", "switch_off"),
    [
        ("eva", without_rope),
        ("eva_dinov3", without_rope),
        ("eva_rope_mixed", without_rope),
        ("beit", without_relative_bias),
        ("beit_shared", without_relative_bias),
    ],
)
def test_position_terms_change_the_maps(name, switch_off):
    """RoPE / the relative bias move the attention of the factories' models: a capture that dropped them
    would give maps a hundred times further off than the reference comparisons' tolerance (the
    reference, which applies them, matches the model and gmar in test_reference)."""
    net = FACTORIES[name]()
    images = torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(6))
    plain = gmar.explain(net, images, "raw_attention").token_map
    other = gmar.explain(switch_off(net), images, "raw_attention").token_map
    assert not torch.allclose(plain, other, rtol=100 * TOL["rtol"], atol=100 * TOL["atol"])


# ------------------------------------------------------------------------ attention pooling (PE), GQA


@functools.cache
def pe_ref() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """LeGrad's per-layer maps ``(L, B, h, w)`` from the pooler's attention, Grad-CAM's map at block 1,
    the output and the images, all from the written-out forward and pooler."""
    net = make_eva_pe()
    images = torch.randn(4, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(7))
    t = R.trace(net, images)
    with torch.no_grad():
        assert_close(t.output.detach(), net(images), **TOL)
    score = class_score(t.output)
    maps = []
    for tokens in t.tokens[1:]:
        pooled, attention = R.attention_pool(net.attn_pool, R._layer_norm(net.norm, tokens))
        assert attention.shape == (4, 2, 1, 1 + 16)  # the pooler reads the class token too
        logits = R._linear(net.head, R._layer_norm(net.fc_norm, pooled))
        (grad,) = torch.autograd.grad(score(logits).sum(), attention, retain_graph=True)
        maps.append(layer_map(grad, t.grid))
    (grad,) = torch.autograd.grad(score(t.output).sum(), t.tokens[1])
    gradcam = gradcam_map(t.tokens[1].detach(), grad, t.num_prefix, t.grid)
    return torch.stack(maps), gradcam, t.output.detach(), images


@pytest.mark.parametrize("low_memory", [True, False])
def test_attention_pooled_eva_legrad_and_gradcam(low_memory):
    maps, gradcam, output, images = pe_ref()
    net = make_eva_pe()
    assert gmar.get_adapter(net).attention_pooled
    exp = explain(net, images, "legrad", low_memory)
    assert (maps.flatten(1).amax(dim=1) > 0).all(), "every layer must contribute"
    assert_close(exp.token_map, maps.sum(dim=0), **TOL)
    assert_close(exp.logits, output, **TOL)
    assert_close(explain(net, images, "legrad", low_memory, start_layer=-1).token_map, maps[-1], **TOL)
    assert_close(explain(net, images, "gradcam", low_memory, layer=1).token_map, gradcam, **TOL)


@pytest.mark.parametrize("method", ROLLOUT_FAMILY)
def test_attention_pooled_eva_refused_by_rollout_family(method):
    with pytest.raises(gmar.UnsupportedModelError):
        gmar.explain(make_eva_pe(), torch.randn(1, 3, IMAGE, IMAGE), method)


def make_eva_gqa() -> nn.Module:
    """Sapiens2-like: AttentionRope with separate projections and 2 key/value heads for 4 query heads."""
    return make_eva(attn_type="rope", qkv_fused=False, num_kv_heads=2, **GELU_MLP)


@pytest.mark.parametrize("low_memory", [True, False])
@pytest.mark.parametrize("method", ROLLOUT_FAMILY)
def test_grouped_query_attention_matches_reference(method, low_memory):
    net = make_eva_gqa()
    images = torch.randn(3, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(8))
    t = R.trace(net, images)
    with torch.no_grad():
        assert_close(t.output.detach(), net(images), **TOL)
    exp = explain(net, images, method, low_memory)
    assert_close(exp.token_map, R.reference_map(method, R.differentiate(t)), **TOL)


def test_post_norm_eva_gradcam_reads_the_block_input():
    """``EvaBlockPostNorm`` normalises the attention's output: Grad-CAM takes the block's own input."""
    net = make_eva(use_post_norm=True, **GELU_MLP)
    images = torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(9))
    kept = []
    handle = net.blocks[1].register_forward_pre_hook(lambda module, args: kept.append(args[0]))
    try:
        logits = net(images)
    finally:
        handle.remove()
    scores = class_score(logits)(logits)
    (grad,) = torch.autograd.grad(scores.sum(), kept[0])
    expected = gradcam_map(kept[0].detach(), grad, 1, (4, 4))
    net.zero_grad(set_to_none=True)
    for low_memory in (True, False):
        assert_close(explain(net, images, "gradcam", low_memory, layer=1).token_map, expected, **TOL)


# ------------------------------------------------------------------------------- OpenCLIP Eva/PE towers


def make_openclip_eva(timm_name: str, pool: str) -> nn.Module:
    """An OpenCLIP ``CLIP`` whose image tower is a ``TimmModel`` built as ``EVA02-*`` / ``PE-Core-*`` build
    it (the registered timm model, ``num_classes`` = the embedding width, the config's pool), with a
    tiny trunk of that registered model in place of the real one."""
    import open_clip
    import timm

    vision_cfg = dict(timm_model_name="test_vit", timm_model_pretrained=False, timm_pool="token", image_size=IMAGE)
    text_cfg = dict(context_length=8, vocab_size=64, width=16, heads=2, layers=1)
    net = open_clip.CLIP(embed_dim=16, vision_cfg={**vision_cfg, "timm_proj": None}, text_cfg=text_cfg)
    tiny = dict(img_size=IMAGE, patch_size=PATCH, embed_dim=32, depth=3, num_heads=4, ref_feat_shape=(4, 4))
    if pool == "map":
        tiny.update(attn_pool_num_heads=2)
    net.visual.trunk = timm.create_model(timm_name, pretrained=False, num_classes=16, global_pool=pool, **tiny)
    return spread(net)


OPENCLIP_TOWERS = {
    "EVA02-B-16": ("eva02_base_patch16_clip_224", "token"),
    "PE-Core-T-16-384": ("vit_pe_core_tiny_patch16_384", "map"),
}


@pytest.mark.parametrize("arch", list(OPENCLIP_TOWERS))
def test_openclip_config_builds_a_timm_tower_with_an_eva_trunk(arch):
    import open_clip

    vision = open_clip.get_model_config(arch)["vision_cfg"]
    assert (vision["timm_model_name"], vision["timm_pool"]) == OPENCLIP_TOWERS[arch]
    assert vision["timm_proj"] is None


@pytest.mark.parametrize("method", [*ROLLOUT_FAMILY, "legrad", "gradcam"])
@pytest.mark.parametrize("arch", list(OPENCLIP_TOWERS))
def test_openclip_eva_tower_explains_like_its_trunk(arch, method):
    """The tower adds no head (``timm_proj`` None), so its maps are those of the trunk on the
    embedding, which the trunk's reference gives."""
    net = make_openclip_eva(*OPENCLIP_TOWERS[arch])
    assert type(net.visual).__name__ == "TimmModel" and type(net.visual.trunk).__name__ == "Eva"
    images = torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(10))
    if method in ROLLOUT_FAMILY and arch.startswith("PE"):
        with pytest.raises(gmar.UnsupportedModelError):
            gmar.explain(net, images, method, target=clip_target)
        return
    exp = gmar.explain(net, images, method, target=clip_target)
    with torch.no_grad():
        assert_close(exp.logits, net.encode_image(images), **TOL)
    trunk_exp = gmar.explain(net.visual.trunk, images, method, target=clip_target)
    assert_close(exp.token_map, trunk_exp.token_map, **TOL)
    if method in ROLLOUT_FAMILY:
        g = R.differentiate(R.trace(net.visual.trunk, images), clip_target)
        assert_close(exp.token_map, R.reference_map(method, g), **TOL)


def test_eva_loads_by_spec():
    from gmar.loading import load_model

    loaded = load_model("timm:eva02_tiny_patch14_224", pretrained=False)
    assert type(gmar.get_adapter(loaded.model)).__name__ == "TimmEvaAdapter"
    assert loaded.preprocess.input_size == (224, 224)
    assert gmar.get_adapter(loaded.model).token_layout((224, 224)).grid_size == (16, 16)
