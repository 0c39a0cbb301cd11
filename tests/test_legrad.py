"""LeGrad against a per-layer reference: every layer's own score, one ``autograd.grad`` call per layer.

The reference never calls gmar. The block tokens and attention come from tests/reference.py (a
graph-connected hand-written forward; an eager copy for Hugging Face); each layer's score is the
layer's output tokens through the model's final norm, pooling and head, written out here from the
weights; ``∂s_l/∂A_l`` is taken separately for every layer on the ordinary, uncut graph.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

import gmar
import reference as R
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

TOL = FLOAT32
MODELS = {**FACTORIES, "timm_dynamic": lambda: make_timm(dynamic_img_size=True)}
#: CaiT has its own tests below: only its class-attention layers have a score of their own
FAMILIES = [name for name in MODELS if name != "cait"]
ROLLOUT_FAMILY = ["raw_attention", "rollout", "grad_rollout", "gmar", "gae"]


@functools.cache
def model(name: str) -> nn.Module:
    if name == "siglip":
        return make_siglip()
    if name == "clip_text":
        return make_clip_with_text()
    if name == "coca":
        return make_coca()
    return MODELS[name]()


@functools.cache
def batch(name: str, count: int = 4) -> torch.Tensor:
    """``count`` images; a non-square 32x48 batch (grid 4x6) for the dynamic-size timm model."""
    width = 48 if name == "timm_dynamic" else IMAGE
    return torch.randn(count, 3, IMAGE, width, generator=torch.Generator().manual_seed(1))


@functools.cache
def tokenizer():
    return clip_tokenizer()


# ------------------------------------------------------------------------------------ hand-written readouts


def linear(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    assert isinstance(module, nn.Linear), type(module)
    return F.linear(x, module.weight, module.bias)


def readout(name: str, net: nn.Module, tokens: torch.Tensor, pooling: str = "model") -> torch.Tensor:
    """Tokens ``(B, N, D)`` leaving a block -> the model's output, from the weights (not gmar's adapter)."""
    ln = R._layer_norm
    if name == "timm_relpos":
        return linear(net.head, ln(net.fc_norm, ln(net.norm, tokens)[:, 0]))
    if name.startswith("timm"):
        x = ln(net.norm, tokens)
        if hasattr(net, "dist_token"):  # DeiT distilled: mean of the two heads (eval mode)
            return (linear(net.head, x[:, 0]) + linear(net.head_dist, x[:, 1])) / 2
        if net.global_pool == "token":
            return linear(net.head, ln(net.fc_norm, x[:, 0]))
        assert net.global_pool == "avg"
        return linear(net.head, ln(net.fc_norm, x[:, net.num_prefix_tokens :].mean(dim=1)))
    if name.startswith(("eva", "beit")):  # timm Eva / Beit: class token or mean of patches, then fc_norm
        x = ln(net.norm, tokens)
        pooled = x[:, 0] if net.global_pool == "token" else x[:, net.num_prefix_tokens :].mean(dim=1)
        return linear(net.head, ln(net.fc_norm, pooled))
    if name == "hf_timm_wrapper":
        return readout("timm", net.timm_model, tokens)
    if name.startswith(("hf_clip", "hf_metaclip2", "hf_siglip")):
        tower = getattr(net, "vision_model", net)
        if name.startswith("hf_siglip"):  # SigLIP classifiers: mean of all (patch) tokens after the final norm
            return linear(net.classifier, ln(tower.post_layernorm, tokens).mean(dim=1))
        if name == "hf_clip_classifier":  # mean of the patch tokens, no final norm
            return linear(net.classifier, tokens[:, 1:].mean(dim=1))
        return linear(net.visual_projection, ln(tower.post_layernorm, tokens[:, 0]))
    if name in ("hf_beit", "hf_data2vec"):  # the pooler: layer norm of the mean of the patch tokens
        return linear(net.classifier, ln(net.base_model.pooler.layernorm, tokens[:, 1:].mean(dim=1)))
    if name.startswith("hf_"):
        x = ln(net.base_model.layernorm, tokens)
        if name in ("hf_vit", "hf_vit_msn"):
            return linear(net.classifier, x[:, 0])
        if name == "hf_ijepa":
            return linear(net.classifier, x.mean(dim=1))
        if name == "hf_vit_backbone":
            return torch.tanh(linear(net.pooler.dense, x[:, 0]))
        if name == "hf_dinov2_backbone":
            return x[:, 0]
        if name == "hf_deit_teacher":
            return (linear(net.cls_classifier, x[:, 0]) + linear(net.distillation_classifier, x[:, 1])) / 2
        registers = getattr(net.config, "num_register_tokens", 0) or 0
        return linear(net.classifier, torch.cat([x[:, 0], x[:, 1 + registers :].mean(dim=1)], dim=1))
    if name in ("openclip", "clip_text"):
        visual = net.visual
        assert not visual.final_ln_after_pool and visual.pool_type == "tok"
        pooled = tokens.mean(dim=1) if pooling == "all_tokens" else tokens[:, 0]
        return ln(visual.ln_post, pooled) @ visual.proj
    if name == "torchvision":
        return linear(net.heads.head, ln(net.encoder.ln, tokens)[:, 0])
    if name == "cait":  # tokens are [class token, patches]; the head reads the class token
        return linear(net.head, ln(net.norm, tokens)[:, 0])
    raise AssertionError(name)


def model_output(name: str, net: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The model's own forward (not the reference's)."""
    with torch.no_grad():
        if name in ("openclip", "clip_text"):
            return net.encode_image(images)
        if name.startswith("hf_"):
            return R.hf_forward(net, images)
        return net(images)


def class_score(output: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """The logit of the final prediction, the same class for every layer."""
    classes = output.detach().argmax(dim=-1)
    return lambda logits: logits[torch.arange(logits.shape[0]), classes]


def layer_map(gradient: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``mean over heads and query rows of ReLU(gradient)``, last ``h*w`` columns, as ``(B, h, w)``."""
    columns = torch.relu(gradient).sum(dim=(1, 2)) / (gradient.shape[1] * gradient.shape[2])
    return columns[:, -grid[0] * grid[1] :].reshape(gradient.shape[0], *grid)


@dataclass
class LeGradRef:
    maps: torch.Tensor  # (L, B, h, w): E_l, each from its own autograd.grad call
    total_maps: torch.Tensor  # (L, B, h, w): the same with the FINAL score's gradient at every layer
    output: torch.Tensor
    final_scores: torch.Tensor
    classes: torch.Tensor | None


def per_layer(name: str, net: nn.Module, images: torch.Tensor, score=None, pooling: str = "model") -> LeGradRef:
    t = R.trace(net, images)
    layers = len(t.attentions)
    assert len(t.tokens) == layers + 1
    assert all(a.grad_fn is not None for a in t.attentions), "the reference graph must be connected"
    # The hand readout of the last block's tokens is the model's output: the readout is right.
    assert_close(readout(name, net, t.tokens[-1]), t.output, **FLOAT32)
    # Against the model's own forward (fused attention, another summation order) float32 rounding
    # reaches 1.4e-6 on some CPUs: the same tolerance as every map comparison here.
    assert_close(readout(name, net, t.tokens[-1]), model_output(name, net, images), **TOL)
    classes = None
    if score is None:
        score, classes = class_score(t.output), t.output.detach().argmax(dim=-1)
    maps = []
    for layer in range(layers):
        s_l = score(readout(name, net, t.tokens[layer + 1], pooling))
        # a CaiT self-attention layer's score (the class token, not yet touched) has no gradient there
        (grad,) = torch.autograd.grad(s_l.sum(), t.attentions[layer], retain_graph=True, allow_unused=True)
        grad = torch.zeros_like(t.attentions[layer]) if grad is None else grad
        maps.append(layer_map(t.embedded(layer, grad, 0.0), t.grid))
    final = score(t.output)
    total = torch.autograd.grad(final.sum(), t.attentions)
    return LeGradRef(
        maps=torch.stack(maps),
        total_maps=torch.stack([layer_map(t.embedded(i, g, 0.0), t.grid) for i, g in enumerate(total)]),
        output=t.output.detach(),
        final_scores=final.detach(),
        classes=classes,
    )


@functools.cache
def ref(name: str, pooling: str = "model") -> LeGradRef:
    return per_layer(name, model(name), batch(name), target_for(name), pooling)


def legrad(name: str, images: torch.Tensor | None = None, target=None, **options) -> gmar.Explanation:
    target = target if target is not None else target_for(name)
    return gmar.explain(model(name), batch(name) if images is None else images, "legrad", target=target, **options)


# ---------------------------------------------------------------------------------------- all families


@pytest.mark.parametrize("name", FAMILIES)
def test_token_map_equals_per_layer_reference(name):
    r = ref(name)
    layers = r.maps.shape[0]
    assert layers == 3
    exp = gmar.LeGrad(model(name))(batch(name), target_for(name))
    grid = (4, 6) if name == "timm_dynamic" else (4, 4)
    assert exp.method == "legrad"
    assert exp.token_map.shape == (4, *grid)
    assert exp.heatmap.shape == batch(name).shape[:1] + batch(name).shape[2:]
    assert (r.maps.flatten(1).amax(dim=1) > 0).all(), "every layer must contribute"
    assert_close(exp.token_map, r.maps.sum(dim=0), **TOL)
    assert_close(exp.logits, r.output, **TOL)
    assert_close(exp.scores, r.final_scores, **TOL)
    if r.classes is None:
        assert exp.target is None
    else:
        assert torch.equal(exp.target, r.classes)


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("start_layer", [1, -1])
def test_start_layer(name, start_layer):
    r = ref(name)
    expected = r.maps[start_layer:].sum(dim=0)
    assert_close(legrad(name, start_layer=start_layer).token_map, expected, **TOL)
    assert not torch.allclose(expected, r.maps.sum(dim=0), atol=1e-4)


@pytest.mark.parametrize("start_layer", [3, -4, 1.5, True])
def test_invalid_start_layer(start_layer):
    with pytest.raises(ValueError):
        gmar.LeGrad(model("timm"), start_layer=start_layer)
    with pytest.raises(ValueError):
        legrad("openclip", start_layer=start_layer)


@pytest.mark.parametrize("name", ["timm", "timm_avg", "hf_vit", "hf_dinov2", "openclip"])
def test_not_the_final_scores_gradient(name):
    """Σ_l mean-ReLU(∂s_L/∂A_l) (one plain backward of the final score) is a different map."""
    r = ref(name)
    exp = legrad(name)
    assert_close(exp.token_map, r.maps.sum(dim=0), **TOL)
    assert_close(r.maps[-1], r.total_maps[-1], **TOL)  # the last layer's own score is the final score
    plain = r.total_maps.sum(dim=0)
    gap = (plain - exp.token_map).abs().max() / exp.token_map.abs().max()
    assert gap > 0.05, f"LeGrad is indistinguishable from the final score's gradient (relative gap {gap:.3g})"


def test_cait_class_attention_layers():
    """CaiT: a layer's score is the head on its class token, which only the class-attention layers
    (the last two) change; each of them explains itself, the self-attention layers' maps are zero."""
    r = ref("cait")
    assert r.maps.shape[0] == 4
    assert (r.maps[:2] == 0).all() and (r.maps[2:].flatten(1).amax(dim=1) > 0).all()
    assert not torch.allclose(r.maps[2], r.maps[3], atol=1e-4)
    exp = legrad("cait")
    assert torch.equal(exp.target, r.classes)
    assert_close(exp.scores, r.final_scores, **TOL)
    assert_close(exp.token_map, r.maps.sum(dim=0), **TOL)
    assert_close(legrad("cait", start_layer=-1).token_map, r.maps[-1], **TOL)
    assert_close(legrad("cait", start_layer=2).token_map, r.maps[2:].sum(dim=0), **TOL)
    plain = r.total_maps.sum(dim=0)  # the final score's gradient at every layer is another map
    assert (plain - exp.token_map).abs().max() / exp.token_map.abs().max() > 0.05


# ----------------------------------------------------------------------------------------------- pooling


def test_openclip_all_tokens_pooling():
    r = ref("openclip", "all_tokens")
    exp = legrad("openclip", pooling="all_tokens")
    assert_close(exp.token_map, r.maps.sum(dim=0), **TOL)
    assert_close(exp.scores, r.final_scores, **TOL)  # the explained score is still the model's own
    assert not torch.allclose(r.maps.sum(dim=0), ref("openclip").maps.sum(dim=0), atol=1e-4)
    assert_close(legrad("openclip", pooling="all_tokens", start_layer=-1).token_map, r.maps[-1], **TOL)


@pytest.mark.parametrize("name", ["timm", "timm_avg", "hf_vit", "hf_dinov2", "siglip"])
def test_all_tokens_pooling_is_for_openclip_vit_only(name):
    with pytest.raises(ValueError):
        gmar.LeGrad(model(name), pooling="all_tokens")


@pytest.mark.parametrize("name", ["timm", "openclip"])
@pytest.mark.parametrize("pooling", ["avg", "mean", "", None])
def test_unknown_pooling(name, pooling):
    with pytest.raises(ValueError):
        gmar.LeGrad(model(name), pooling=pooling)


# ------------------------------------------------------------------------------------------------ SigLIP


def pooler(pool: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """timm ``AttentionPoolLatent`` from its weights: the pooled output and its attention ``(B, heads, Q, N)``."""
    assert pool.pos_embed is None and isinstance(pool.q_norm, nn.Identity) and isinstance(pool.k_norm, nn.Identity)
    batch_size, tokens, _ = x.shape
    heads, dim = pool.num_heads, pool.head_dim
    q = linear(pool.q, pool.latent).view(1, -1, heads, dim).transpose(1, 2).expand(batch_size, -1, -1, -1)
    kv = linear(pool.kv, x).view(batch_size, tokens, 2, heads, dim)
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    attention = torch.softmax(torch.einsum("bhqd,bhkd->bhqk", q, k) * pool.scale, dim=-1)
    out = torch.einsum("bhqk,bhkd->bqhd", attention, v).flatten(2)
    out = linear(pool.proj, out)
    mlp = pool.mlp
    hidden = R._activation(mlp.act, linear(mlp.fc1, R._layer_norm(pool.norm, out)))
    out = out + linear(mlp.fc2, hidden)
    assert pool.pool == "token"
    return out[:, 0], attention


def siglip_readout(net: nn.Module, tokens: torch.Tensor, final_norm: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    trunk = net.visual.trunk
    assert isinstance(trunk.fc_norm, nn.Identity) and isinstance(trunk.head, nn.Identity)
    assert isinstance(net.visual.head, nn.Sequential) and len(net.visual.head) == 0
    assert not trunk.pool_include_prefix and trunk.num_prefix_tokens == 0
    return pooler(trunk.attn_pool, R._layer_norm(trunk.norm, tokens) if final_norm else tokens)


@functools.cache
def siglip_ref(final_norm: bool = True) -> LeGradRef:
    net, images = model("siglip"), batch("siglip")
    trunk = net.visual.trunk
    with torch.no_grad():  # the gradient at the pooler's attention never enters the blocks
        x = trunk.norm_pre(trunk.patch_drop(trunk._pos_embed(trunk.patch_embed(images))))
        tokens = []
        for block in trunk.blocks:
            x = block(x)
            tokens.append(x)
        expected = net.encode_image(images)
        # the pooler written out above is timm's
        assert_close(pooler(trunk.attn_pool, trunk.norm(tokens[-1]))[0], trunk.attn_pool(trunk.norm(tokens[-1])))
    maps = []
    for layer_tokens in tokens:
        embedding, attention = siglip_readout(net, layer_tokens, final_norm)
        assert attention.shape == (4, 4, 1, 16)
        (grad,) = torch.autograd.grad(clip_target(embedding).sum(), attention)
        maps.append(layer_map(grad, (4, 4)))
    output = siglip_readout(net, tokens[-1])[0].detach()
    assert_close(output, expected, **FLOAT32)
    maps = torch.stack(maps)
    return LeGradRef(maps, maps, output, clip_target(output), None)


def test_siglip_pooler_attention():
    r = siglip_ref()
    assert (r.maps.flatten(1).amax(dim=1) > 0).all()
    exp = gmar.LeGrad(model("siglip"))(batch("siglip"), clip_target)
    assert exp.token_map.shape == (4, 4, 4)
    assert exp.target is None
    assert_close(exp.logits, r.output, **TOL)
    assert_close(exp.scores, r.final_scores, **TOL)
    assert_close(exp.token_map, r.maps.sum(dim=0), **TOL)
    assert_close(legrad("siglip", target=clip_target, start_layer=-1).token_map, r.maps[-1], **TOL)
    assert_close(legrad("siglip", target=clip_target, start_layer=1).token_map, r.maps[1:].sum(dim=0), **TOL)


def test_siglip_without_the_final_norm_is_the_official_readout():
    """The official LeGrad code feeds each layer's tokens to the attention pooler without the trunk's
    final norm; ``pooling="no_final_norm"`` does the same (for every layer, the last one included)."""
    r, with_norm = siglip_ref(final_norm=False), siglip_ref()
    exp = gmar.LeGrad(model("siglip"), pooling="no_final_norm")(batch("siglip"), clip_target)
    assert_close(exp.token_map, r.maps.sum(dim=0), **TOL)
    assert not torch.allclose(r.maps.sum(dim=0), with_norm.maps.sum(dim=0), atol=1e-3)


@pytest.mark.parametrize("name", ["timm", "hf_vit", "openclip"])
def test_no_final_norm_is_for_attention_pooled_models_only(name):
    with pytest.raises(ValueError, match="no_final_norm"):
        gmar.LeGrad(model(name), pooling="no_final_norm")


@pytest.mark.parametrize("method", ROLLOUT_FAMILY)
def test_siglip_refused_by_rollout_family(method):
    with pytest.raises(gmar.UnsupportedModelError):
        gmar.explain(model("siglip"), batch("siglip"), method, target=clip_target)


def coca_readout(net: nn.Module, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CoCa's tower head from the weights: OpenCLIP's ``AttentionalPooler`` (LayerNorms on its queries and
    on the tokens, multi-head attention with its own key/value widths), ``ln_post``, the first query, ``proj``."""
    visual = net.visual
    pool, mha = visual.attn_pool, visual.attn_pool.attn
    assert visual.pool_type == "tok" and visual.attn_pool_contrastive is None
    batch_size, heads = tokens.shape[0], mha.num_heads
    x = R._layer_norm(pool.ln_k, tokens)
    queries = R._layer_norm(pool.ln_q, pool.query)
    b_q, b_k, b_v = mha.in_proj_bias.chunk(3)
    weights = (
        mha.in_proj_weight.chunk(3)
        if mha._qkv_same_embed_dim
        else (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
    )
    q = F.linear(queries, weights[0], b_q).view(1, -1, heads, mha.head_dim).transpose(1, 2)
    k = F.linear(x, weights[1], b_k).view(batch_size, -1, heads, mha.head_dim).transpose(1, 2)
    v = F.linear(x, weights[2], b_v).view(batch_size, -1, heads, mha.head_dim).transpose(1, 2)
    attention = torch.softmax(
        torch.einsum("bhqd,bhkd->bhqk", q.expand(batch_size, -1, -1, -1), k) / math.sqrt(mha.head_dim), -1
    )
    out = linear(mha.out_proj, torch.einsum("bhqk,bhkd->bqhd", attention, v).flatten(2))
    return R._layer_norm(visual.ln_post, out)[:, 0] @ visual.proj, attention


def test_coca_pooler_attention():
    """CoCa: each layer's map comes from the attentional pooler's attention when it pools that layer's tokens."""
    net, images = model("coca"), batch("coca")
    visual = net.visual
    with torch.no_grad():
        x = visual._embeds(images)
        tokens = []
        for block in visual.transformer.resblocks:
            x = block(x)
            tokens.append(x)
        expected = net.encode_image(images, normalize=False)
        assert_close(coca_readout(net, tokens[-1])[0], expected, **FLOAT32)
    maps = []
    for layer_tokens in tokens:
        embedding, attention = coca_readout(net, layer_tokens)
        assert attention.shape == (4, 4, 3, 17)  # 3 queries over [class token, 16 patches]
        (grad,) = torch.autograd.grad(clip_target(embedding).sum(), attention)
        assert (grad[:, :, 1:] == 0).all(), "only the first query makes the embedding"
        maps.append(layer_map(grad, (4, 4)))
    maps = torch.stack(maps)
    assert (maps.flatten(1).amax(dim=1) > 0).all()
    exp = gmar.LeGrad(net)(images, clip_target)
    assert exp.target is None
    assert_close(exp.logits, expected, **TOL)
    assert_close(exp.token_map, maps.sum(dim=0), **TOL)
    assert_close(legrad("coca", target=clip_target, start_layer=-1).token_map, maps[-1], **TOL)


@pytest.mark.parametrize("method", ROLLOUT_FAMILY)
def test_coca_refused_by_rollout_family(method):
    with pytest.raises(gmar.UnsupportedModelError, match="CoCa pools its tokens with an attention head"):
        gmar.explain(model("coca"), batch("coca"), method, target=clip_target)


# -------------------------------------------------------------------------------------------- correction


def text_score(net: nn.Module, prompt: str) -> tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor]:
    with torch.no_grad():
        text = F.normalize(net.encode_text(tokenizer()([prompt])), dim=-1)
    return (lambda embedding: (F.normalize(embedding, dim=-1) * text).sum(dim=-1)), text


def min_max_rows(maps: torch.Tensor) -> torch.Tensor:
    flat = maps.flatten(1)
    low, high = flat.min(dim=1, keepdim=True).values, flat.max(dim=1, keepdim=True).values
    return ((flat - low) / (high - low)).view_as(maps)


@functools.cache
def correction_ref(prompt: str, empty: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The prompt's map, the empty prompt's normalised map, and the prompt's text embedding."""
    net, images = model("clip_text"), batch("clip_text", 3)
    score, text = text_score(net, prompt)
    empty_score, _ = text_score(net, empty)
    full = per_layer("clip_text", net, images, score).maps.sum(dim=0)
    normalised = min_max_rows(per_layer("clip_text", net, images, empty_score).maps.sum(dim=0))
    return full, normalised, text


def test_correction_matches_threshold_rule():
    net, images = model("clip_text"), batch("clip_text", 3)
    target = gmar.TextTarget(net, tokenizer(), "a photo of a cat")
    full, normalised, text = correction_ref("a photo of a cat", "a photo of a")
    assert_close(target.embeddings, text, **TOL)
    masked = normalised > 0.8
    assert masked.any() and not masked.all(), "the correction must change some patches and keep others"
    assert ((normalised - 0.8).abs() > 1e-4).all(), "no patch may sit on the threshold"
    expected = torch.where(masked, torch.zeros_like(full), full)
    assert (full[masked] > 1e-6).any(), "the zeroed patches must have had relevance"

    exp = gmar.LeGrad(net, correction=True)(images, target)
    assert exp.token_map.shape == (3, 4, 4)
    assert_close(exp.token_map, expected, **TOL)
    assert exp.prompts == ["a photo of a cat"] * 3
    plain = gmar.explain(net, images, "legrad", target=target)
    assert_close(plain.token_map, full, **TOL)
    assert_close(gmar.explain(net, images, "legrad", target=target, correction=True).token_map, expected, **TOL)
    no_op = gmar.LeGrad(net, correction=True, correction_threshold=1.0)(images, target)
    assert_close(no_op.token_map, full, **TOL)


def test_correction_with_another_prompt():
    net, images = model("clip_text"), batch("clip_text", 3)
    target = gmar.TextTarget(net, tokenizer(), "a photo of a cat")
    full, normalised, _ = correction_ref("a photo of a cat", "a blurry image")
    threshold = 0.5
    assert ((normalised - threshold).abs() > 1e-4).all()
    expected = torch.where(normalised > threshold, torch.zeros_like(full), full)
    exp = gmar.LeGrad(net, correction=True, correction_prompt="a blurry image", correction_threshold=threshold)
    assert_close(exp(images, target).token_map, expected, **TOL)


def test_correction_needs_text_target():
    with pytest.raises(gmar.TargetError):
        legrad("openclip", correction=True)  # a plain callable
    with pytest.raises(gmar.TargetError):
        legrad("timm", correction=True)  # a class


@pytest.mark.parametrize("threshold", [-0.1, 1.5, math.nan])
def test_correction_threshold_range(threshold):
    with pytest.raises(ValueError):
        gmar.LeGrad(model("openclip"), correction=True, correction_threshold=threshold)


# ------------------------------------------------------------------------------------------- batching


@pytest.mark.parametrize(
    "name", ["timm", "timm_distilled", "hf_vit", "hf_dinov2_registers", "openclip", "siglip", "coca", "cait"]
)
def test_batch_equals_single_images(name):
    target = clip_target if name in ("openclip", "siglip", "coca") else None
    whole = legrad(name, target=target)
    for i in range(4):
        single = legrad(name, images=batch(name)[i : i + 1], target=target)
        assert_close(single.token_map[0], whole.token_map[i], **TOL)
        assert_close(single.scores[0], whole.scores[i], **TOL)


# --------------------------------------------------------------------------------------- model untouched


def snapshot(net: nn.Module) -> dict:
    modules = list(net.named_modules())
    state = {
        "training": [(n, m.training) for n, m in modules],
        "requires_grad": [(n, p.requires_grad) for n, p in net.named_parameters()],
        "grad_is_none": [(n, p.grad is None) for n, p in net.named_parameters()],
        "hooks": [
            (
                n,
                tuple(m._forward_hooks),
                tuple(m._forward_hooks_with_kwargs),
                tuple(m._forward_pre_hooks),
                tuple(m._forward_pre_hooks_with_kwargs),
                tuple(m._backward_hooks),
                tuple(m._backward_pre_hooks),
            )
            for n, m in modules
        ],
        "attributes": [(n, sorted(vars(m))) for n, m in modules],
        "fused": [(n, getattr(m, "fused_attn", None)) for n, m in modules],
        "global_hooks": (
            tuple(nn.modules.module._global_forward_hooks),
            tuple(nn.modules.module._global_forward_pre_hooks),
        ),
    }
    config = getattr(net, "config", None)
    if config is not None:
        state["attn_implementation"] = config._attn_implementation
    return state


def odd_state(net: nn.Module) -> nn.Module:
    """Training mode here and there, some frozen parameters."""
    net.train()
    for i, module in enumerate(net.modules()):
        if i % 4 == 1:
            module.eval()
    for i, param in enumerate(net.named_parameters()):
        if i % 3 == 0:
            param[1].requires_grad_(False)
    return net


UNTOUCHED = {
    "timm": lambda: make_timm(),
    "hf_vit": FACTORIES["hf_vit"],
    "openclip": FACTORIES["openclip"],
    "siglip": make_siglip,
}


class Boom(RuntimeError):
    pass


def raising_target(output):
    raise Boom("target")


def raising_on_second_call():
    """Fine on the model's output, raises on the first layer readout (inside the backward preparation)."""
    calls = []

    def target(output):
        calls.append(1)
        if len(calls) > 1:
            raise Boom("layer readout")
        return output.sum(dim=-1)

    return target


@pytest.mark.parametrize("name", list(UNTOUCHED))
def test_model_untouched(name):
    net = odd_state(UNTOUCHED[name]())
    images = batch(name)
    pristine = images.clone()
    target = clip_target if name in ("openclip", "siglip") else None
    before = snapshot(net)
    exp = gmar.LeGrad(net, start_layer=1)(images, target)
    assert exp.token_map.abs().sum() > 0
    assert snapshot(net) == before
    assert torch.equal(images, pristine) and not images.requires_grad and images.grad is None

    for failing in (raising_target, raising_on_second_call()):
        with pytest.raises(Boom):
            gmar.explain(net, images, "legrad", target=failing)
        assert snapshot(net) == before

    # A failure inside the captured forward pass: a user hook on the last block raises.
    def explode(module, args, output):
        raise Boom("forward")

    last_block = {
        "timm": lambda: net.blocks[-1],
        "hf_vit": lambda: net.vit.layers[-1],
        "openclip": lambda: net.visual.transformer.resblocks[-1],
        "siglip": lambda: net.visual.trunk.blocks[-1],
    }[name]()
    handle = last_block.register_forward_hook(explode)
    try:
        with_user_hook = snapshot(net)
        with pytest.raises(Boom):
            gmar.explain(net, images, "legrad", target=target)
        assert snapshot(net) == with_user_hook
    finally:
        handle.remove()
    assert snapshot(net) == before
    assert gmar.explain(net, images, "legrad", target=target).token_map.abs().sum() > 0
