"""The LRP family: AttnLRP, Transformer Attribution and partial LRP.

- each rule against its formula on random tensors (explicit contributions, no autograd);
- conservation of AttnLRP's relevance, per block and in total, with biases and embeddings zeroed;
- AttnLRP against an independent computation (tests/reference.py: lxt's way of applying the rules,
  by detaching, on a written-out forward) and against lxt's own maps (tests/test_lrp_peers.py);
- the rules stay inside the call: the model, torch.nn and the libraries are as they were after it,
  and the true gradient of the other methods is unchanged next to them.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

import gmar
from gmar.adapters import get_adapter
from gmar.capture import AttentionStream, AttnLRPRules, CheferRules, capture, collect, frozen_eval
from gmar.capture.rules import safe_divide

sys.path.insert(0, str(Path(__file__).parent))
import reference as R
from seeded import fill_seeded_, seeded_images
from tolerance import FLOAT32

timm = pytest.importorskip("timm")

#: float64 computations compared two ways: the float32 bound of tests/tolerance.py scaled to float64's ε
FLOAT64 = {"rtol": 2**8 * torch.finfo(torch.float64).eps, "atol": 2**8 * torch.finfo(torch.float64).eps}


@functools.cache
def vit(depth: int = 3, dtype: torch.dtype = torch.float64) -> nn.Module:
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, depth=depth)
    return fill_seeded_(model.eval()).to(dtype)


def zero_biases(model: nn.Module) -> nn.Module:
    """A copy with every bias, the class token and the position embedding zeroed: no relevance leaves
    the network except through the input."""
    import copy

    clone = copy.deepcopy(model)
    with torch.no_grad():
        for name, parameter in clone.named_parameters():
            if name.endswith("bias") or "pos_embed" in name or "cls_token" in name:
                parameter.zero_()
    return clone


def random(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# -- the rules against their formulas -----------------------------------------------------------------


def test_attnlrp_attention_rules_follow_the_uniform_and_softmax_rules():
    """``full``: R_P = ½ Σ_d P_ij v_jd R_O,id / O_id; at the logits S, R_S = S ⊙ (R_P − P Σ_j R_P);
    R_q = ½ Σ_j q_id k_jd s R_S,ij / S_ij, and alike for k; R_v = ½ Σ_i P_ij v_jd R_O,id / O_id. ``cp``:
    all of R_O to v (R_v = Σ_i P_ij v_jd R_O,id / O_id), nothing to P, q, k."""
    b, h, n, d, scale = 2, 3, 5, 4, 0.7
    q, k, v, g = random(b, h, n, d, seed=1), random(b, h, n, d, seed=2), random(b, h, n, d, seed=3), random(b, h, n, d)
    logits = scale * q @ k.transpose(-2, -1)
    p = logits.softmax(dim=-1)
    o = p @ v
    r_o = o * g  # the gradient convention: R = x ⊙ g
    # explicit contributions: c[b,h,i,j,d] = P_ij v_jd
    c = p[..., :, :, None] * v[..., None, :, :]
    share = c / o[..., :, None, :]
    r_p = 0.5 * (share * r_o[..., :, None, :]).sum(-1)
    r_v = 0.5 * (share * r_o[..., :, None, :]).sum(-3)
    r_s = logits * (r_p - p * r_p.sum(-1, keepdim=True))
    cq = q[..., :, None, :] * k[..., None, :, :] * scale  # S_ij = Σ_d q_id k_jd s
    r_q = 0.5 * (cq / logits[..., None] * r_s[..., None]).sum(-2)
    r_k = 0.5 * (cq / logits[..., None] * r_s[..., None]).sum(-3)

    full = AttnLRPRules("full").attention(p, v, g, q, k, scale, (True, True, True))
    assert_close(p * full.at_probabilities, r_p, **FLOAT64)
    assert_close(q * full.q, r_q, **FLOAT64)
    assert_close(k * full.k, r_k, **FLOAT64)
    assert_close(v * full.v, r_v, **FLOAT64)

    cp = AttnLRPRules("cp").attention(p, v, g, q, k, scale, (True, True, True))
    assert cp.at_probabilities is None and cp.q is None and cp.k is None
    assert_close(v * cp.v, 2 * r_v, **FLOAT64)


def test_attnlrp_activation_and_norm_rules():
    rules = AttnLRPRules()
    x, g = random(3, 7, seed=1), random(3, 7, seed=2)
    gelu = nn.GELU()
    y = gelu(x)
    # identity rule: R_in = R_out, i.e. x ⊙ g_in = y ⊙ g
    assert_close(x * rules.module("activation", gelu, x, y, g), y * g, **FLOAT64)
    # LayerNorm with its standard deviation constant: the Jacobian of (x - mean(x)) / σ · w
    norm = nn.LayerNorm(7, dtype=torch.float64)
    with torch.no_grad():
        norm.weight.copy_(random(7, seed=4))
    sigma = (x.var(dim=-1, unbiased=False, keepdim=True) + norm.eps).sqrt()
    centre = torch.eye(7, dtype=torch.float64) - 1 / 7
    want = torch.einsum("bj,ij,b->bi", g * norm.weight, centre, 1 / sigma[:, 0])
    assert_close(rules.module("norm", norm, x, norm(x), g), want, **FLOAT64)


@pytest.mark.parametrize("gamma", [0.0, 0.25])
def test_gamma_rule_follows_its_definition(gamma):
    """The generalised γ-rule with explicit contributions c_ji = W_ji x_i (and the bias as one more)."""
    layer = nn.Linear(6, 4, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(random(4, 6, seed=5))
        layer.bias.copy_(random(4, seed=6))
    x, g = random(2, 6, seed=7), random(2, 4, seed=8)
    y = layer(x)
    relevance = y * g
    w, bias = layer.weight, layer.bias
    contrib = w[None] * x[:, None, :]  # (B, out, in)
    boost = gamma * torch.where(contrib > 0, contrib, 0.0)
    dampen = gamma * torch.where(contrib < 0, contrib, 0.0)
    # positive outputs favour the positive contributions, negative ones the negative
    positive = contrib + boost
    negative = contrib + dampen
    z_pos = positive.sum(-1) + bias + gamma * bias.clamp(min=0)
    z_neg = negative.sum(-1) + bias + gamma * bias.clamp(max=0)
    eps = AttnLRPRules.GAMMA_STABILIZER
    stab = lambda z: z + eps * torch.where(z >= 0, 1.0, -1.0)  # noqa: E731
    s = torch.where(y > 0, relevance / stab(z_pos), relevance / stab(z_neg))
    share = torch.where(y[..., None] > 0, positive, negative)
    want = (share * s[..., None]).sum(1)
    rules = AttnLRPRules(linear_gamma=gamma) if gamma else AttnLRPRules(epsilon=eps)
    got = x * rules.module("linear", layer, x, y, g)
    assert_close(got, want, **FLOAT64)


def test_chefer_linear_rule_is_z_plus_on_signed_inputs():
    layer = nn.Linear(6, 4, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(random(4, 6, seed=9))
    x, r = random(2, 6, seed=10), random(2, 4, seed=11)
    contrib = (layer.weight[None] * x[:, None, :]).clamp(min=0)  # only positive contributions, bias ignored
    want = (contrib / (contrib.sum(-1, keepdim=True) + 1e-9) * r[..., None]).sum(1)
    assert_close(CheferRules().module("linear", layer, x, layer(x), r), want, **FLOAT64)


def test_chefer_residual_and_attention_rules():
    a, b, r = random(2, 5, 3, seed=12), random(2, 5, 3, seed=13), random(2, 5, 3, seed=14)
    extra, on_b = CheferRules().residual(a, b, r)
    on_a = r + extra  # the sum hands the stream r itself
    eps = 1e-9  # every division of the reference code adds it to the denominator
    for i in range(2):  # per sample: LRP-0 shares, rescaled to |Σ R_a| : |Σ R_b| of Σ R
        ra, rb = a[i] * r[i] / (a[i] + b[i] + eps), b[i] * r[i] / (a[i] + b[i] + eps)
        total, sa, sb = r[i].sum(), ra.sum(), rb.sum()
        assert_close(on_a[i], ra * (sa.abs() / (sa.abs() + sb.abs() + eps) * total) / (sa + eps), **FLOAT64)
        assert_close(on_b[i], rb * (sb.abs() / (sa.abs() + sb.abs() + eps) * total) / (sb + eps), **FLOAT64)
    # conserved up to the stabilisers' share
    assert_close(on_a.sum((1, 2)) + on_b.sum((1, 2)), r.sum((1, 2)), rtol=1e-7, atol=0)

    bh, n, d = (2, 3), 5, 4
    q, k, v, r_o = (random(*bh, n, d, seed=s) for s in (15, 16, 17, 18))
    logits = 0.5 * q @ k.transpose(-2, -1)
    p = logits.softmax(-1)
    o = p @ v
    got = CheferRules().attention(p, v, r_o, q, k, 0.5, (True, True, True))
    c = p[..., :, :, None] * v[..., None, :, :]
    s = r_o / (o + 1e-9)
    assert_close(got.at_probabilities, 0.5 * (c * s[..., :, None, :]).sum(-1), **FLOAT64)
    assert_close(got.v, 0.5 * (c * s[..., :, None, :]).sum(-3), **FLOAT64)
    z = q @ k.transpose(-2, -1)
    cq = q[..., :, None, :] * k[..., None, :, :]
    ratio = got.at_probabilities / (z + 1e-9)
    assert_close(got.q, 0.5 * (cq * ratio[..., None]).sum(-2), **FLOAT64)
    assert_close(got.k, 0.5 * (cq * ratio[..., None]).sum(-3), **FLOAT64)


def test_safe_divide_is_zero_where_the_denominator_is():
    got = safe_divide(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.0, 2.0, -1e-9]))
    assert got[0] == 0 and torch.isclose(got[1], torch.tensor(1.0)) and torch.isfinite(got).all()


# -- conservation --------------------------------------------------------------------------------------


@pytest.mark.parametrize("attention", ["cp", "full"])
def test_attnlrp_conserves_the_logit_per_block_and_at_the_input(attention):
    """With every bias and embedding zeroed and ε = 0, each block's input carries the target logit as
    relevance, and so do the pixels; with ``full`` the softmax rule does not conserve (it absorbs
    relevance at the logits), so only the layers above the first attention do, and the check says so."""
    model = zero_biases(vit())
    images = seeded_images(2, seed=1)
    adapter = get_adapter(model)
    rules = AttnLRPRules(attention)
    stream = AttentionStream(adapter.num_layers, rules=(rules,))
    with frozen_eval(model), capture(adapter, stream=stream, block_outputs=True) as recorder:
        inputs = images.clone().requires_grad_(True)
        output = model(inputs)
    captured = collect(recorder, output, model)
    classes = output.argmax(dim=1)
    logit = output.gather(1, classes[:, None])[:, 0]
    tensors = [inputs, *captured.block_outputs]
    grads = stream.backward(logit.sum(), [], lambda *a: None, extra=tensors, rules=rules)
    totals = [(t * g).flatten(1).sum(1) for t, g in zip(tensors, grads, strict=True)]
    assert_close(totals[-1], logit.detach(), **FLOAT64)  # through the final norm and the head
    if attention == "cp":
        for total in totals:
            assert_close(total, logit.detach(), **FLOAT64)
    else:
        assert not torch.allclose(totals[0], logit.detach(), rtol=1e-3)


def test_attnlrp_map_sums_to_the_logit_without_biases():
    model = zero_biases(vit())
    explanation = gmar.AttnLRP(model)(seeded_images(2, seed=2))
    assert_close(explanation.token_map.double().sum((1, 2)), explanation.scores, **FLOAT32)


# -- against an independent computation ----------------------------------------------------------------


@pytest.mark.parametrize("attention", ["cp", "full"])
def test_attnlrp_equals_the_rules_applied_by_detaching(attention):
    model = vit()
    images = seeded_images(3, seed=3)
    classes = torch.tensor([1, 4, 7])
    got = gmar.AttnLRP(model, attention=attention)(images, target=classes)
    want = R.attnlrp_timm(model, images, classes, attention)
    assert_close(got.heatmap, _min_max(want.float()), **FLOAT32)
    patches = want.reshape(3, 14, 16, 14, 16).sum((2, 4))
    assert_close(got.token_map.double(), patches, rtol=FLOAT32["rtol"], atol=FLOAT32["atol"] * patches.abs().max())
    # the other rule differs: the check can fail
    other = R.attnlrp_timm(model, images, classes, "full" if attention == "cp" else "cp")
    assert (other - want).abs().max() > 1e-2 * want.abs().max()


def _min_max(maps: torch.Tensor) -> torch.Tensor:
    low = maps.flatten(1).min(1).values[:, None, None]
    high = maps.flatten(1).max(1).values[:, None, None]
    return (maps - low) / (high - low)


# -- scoped to the call ---------------------------------------------------------------------------------


def _library_state() -> dict:
    """Every forward (and the functions the rules could patch) of torch.nn and timm, by identity."""
    import timm.layers
    import timm.models.vision_transformer as tv

    classes = [nn.Linear, nn.Conv2d, nn.LayerNorm, nn.GELU, nn.SiLU, nn.MultiheadAttention, nn.Dropout]
    classes += [tv.Block, tv.VisionTransformer, timm.layers.Attention, timm.layers.Mlp, timm.layers.LayerScale]
    state = {f"{c.__module__}.{c.__qualname__}.forward": c.__dict__.get("forward") for c in classes}
    for name in ("linear", "conv2d", "layer_norm", "gelu", "softmax", "scaled_dot_product_attention"):
        state[f"F.{name}"] = getattr(F, name)
    state["torch.matmul"] = torch.matmul
    return state


def _model_state(model: nn.Module) -> list:
    return [
        (name, sorted(m.__dict__), dict(m._forward_hooks), dict(m._forward_pre_hooks), dict(m._backward_hooks))
        for name, m in model.named_modules()
    ]


@pytest.mark.parametrize("method", ["attnlrp", "transformer_attribution", "partial_lrp"])
def test_rules_stay_inside_the_call(method):
    model = vit(dtype=torch.float32)
    images = seeded_images(2, seed=4).float()
    library, before = _library_state(), _model_state(model)
    gae_before = gmar.explain(model, images, "gae")
    gmar.explain(model, images, method, linear_gamma=0.05) if method == "attnlrp" else gmar.explain(
        model, images, method
    )

    def failing(output):
        raise RuntimeError("a target that fails")

    with pytest.raises(RuntimeError, match="a target that fails"):
        gmar.explain(model, images, method, target=failing)
    assert _library_state() == library
    assert _model_state(model) == before
    assert all(p.grad is None for p in model.parameters())
    gae_after = gmar.explain(model, images, "gae")
    assert_close(gae_after.token_map, gae_before.token_map, rtol=0, atol=0)
    # in one pass with the LRP methods, GAE is still GAE
    joint = gmar.explain(model, images, ["gae", method])
    assert_close(joint["gae"].token_map, gae_before.token_map, **FLOAT32)


def test_transformer_attribution_start_layer_and_partial_lrp_differ_from_gae():
    model = vit(dtype=torch.float32)
    images = seeded_images(2, seed=5).float()
    ta0 = gmar.explain(model, images, "transformer_attribution").token_map
    ta1 = gmar.explain(model, images, "transformer_attribution", start_layer=1).token_map
    gae = gmar.explain(model, images, "gae").token_map
    assert (ta0 - ta1).abs().max() > 1e-3 * ta0.abs().max()
    assert (ta0 / ta0.sum() - gae / gae.sum()).abs().max() > 1e-3 * (gae / gae.sum()).max()


def test_refusals_are_one_line():
    from gmar.errors import UnsupportedModelError

    with pytest.raises(ValueError, match="attention must be"):
        gmar.AttnLRP(vit(), attention="softmax")
    with pytest.raises(ValueError, match="linear_gamma"):
        gmar.AttnLRP(vit(), linear_gamma=-1)
    eva = timm.create_model("eva02_tiny_patch14_224", pretrained=False, num_classes=5, depth=2, img_size=56)
    with pytest.raises(UnsupportedModelError) as refused:
        gmar.TransformerAttribution(eva)
    assert "\n" not in str(refused.value) and "attnlrp" in str(refused.value)
