"""Taylor head scores, the head-weighted GAE (``gmar_gae``) and occlusion against independent
computations (tests/reference.py's hand-written forwards and gradients) on every family."""

from __future__ import annotations

import functools

import pytest
import torch
from torch.testing import assert_close

import gmar
import reference as R
from conftest import FACTORIES, IMAGE, clip_target, clip_tokenizer, make_clip_with_text, make_timm, target_for
from gmar.adapters import get_adapter
from tolerance import FLOAT32

TOL = FLOAT32
FAMILIES = sorted(FACTORIES)


@functools.cache
def model(name: str) -> torch.nn.Module:
    return FACTORIES[name]()


@functools.cache
def batch() -> torch.Tensor:
    return torch.randn(4, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(3))


@functools.cache
def ref(name: str) -> R.Gradients:
    return R.differentiate(R.trace(model(name), batch()), target_for(name))


# ------------------------------------------------------------------------------------ independent versions


def taylor_loop(g: R.Gradients) -> torch.Tensor:
    """``Σ_tokens O_h ⊙ ∂y/∂O_h`` head by head, from the reference's head outputs: ``(B, L, H)``."""
    batch_size, heads = g.head_outputs[0].shape[:2]
    scores = torch.zeros(batch_size, len(g.head_outputs), heads)
    for layer, (outputs, grads) in enumerate(zip(g.head_outputs, g.grad_head_outputs, strict=True)):
        for head in range(heads):
            scores[:, layer, head] = (outputs[:, head] * grads[:, head]).sum(dim=(1, 2))
    return scores


def taylor_weights(scores: torch.Tensor) -> torch.Tensor:
    """Per layer, the heads' non-negative scores ``(B, L, H)`` over their sum (uniform for a zero sum)."""
    total = scores.sum(dim=-1, keepdim=True)
    return torch.where(total > 0, scores / total, torch.full_like(scores, 1 / scores.shape[-1]))


def gmar_gae_written_out(g: R.Gradients, head_weights=True, signed=True, start_layer=0):
    """The head-weighted GAE, layer by layer and head by head: the map, the weights and the scores."""
    n = g.attentions[0].shape[-1]
    relevance = torch.eye(n).expand_as(g.attentions[0][:, 0])
    all_scores, all_weights = [], []
    for layer, (a, grad) in enumerate(zip(g.attentions, g.grad_attentions, strict=True)):
        heads = a.shape[1]
        products = [a[:, h] * grad[:, h] for h in range(heads)]
        scores = torch.stack([torch.relu(p).sum(dim=(1, 2)) for p in products], dim=1)
        if head_weights:
            total = scores.sum(dim=1, keepdim=True)
            weights = torch.where(total > 0, scores / total, torch.full_like(scores, 1 / heads))
        else:
            weights = torch.full_like(scores, 1 / heads)
        all_scores.append(scores)
        all_weights.append(weights)
        if layer < start_layer:
            continue
        if signed:
            mixed = torch.relu(sum(weights[:, h, None, None] * products[h] for h in range(heads)))
        else:
            mixed = sum(weights[:, h, None, None] * torch.relu(products[h]) for h in range(heads))
        relevance = relevance + mixed @ relevance
    return R.to_map(relevance, g), torch.stack(all_weights, dim=1), torch.stack(all_scores, dim=1)


def reference_output(net: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return R.trace(net, images).output.detach()


def occlusion_loop(net, images, target, window=1, baseline=None, patch=8):
    """Hide each window of patches in turn (one image copy at a time), the hand-written forward's score
    drop, each patch averaged over the windows that cover it."""
    score = (lambda out: target(out)) if callable(target) else None
    output = reference_output(net, images)
    classes = output.argmax(-1) if target is None else None
    rows = torch.arange(images.shape[0])

    def y(out):
        return score(out) if score is not None else out[rows, classes]

    base = y(output)
    grid = images.shape[-1] // patch
    side = min(window, grid)
    total = torch.zeros(images.shape[0], grid, grid)
    count = torch.zeros(grid, grid)
    for top in range(grid - side + 1):
        for left in range(grid - side + 1):
            hidden = images.clone()
            box = (slice(None), slice(None), slice(top * patch, (top + side) * patch))
            box += (slice(left * patch, (left + side) * patch),)
            hidden[box] = 0.0 if baseline is None else baseline[box]
            drop = base - y(reference_output(net, hidden))
            total[:, top : top + side, left : left + side] += drop[:, None, None]
            count[top : top + side, left : left + side] += 1
    return total / count


# -------------------------------------------------------------------------------------------------- Taylor


@pytest.mark.parametrize("score", ["taylor", "taylor_abs"])
@pytest.mark.parametrize("name", FAMILIES)
def test_taylor_scores_and_map_against_a_per_head_loop(name, score):
    g = ref(name)
    exp = gmar.explain(model(name), batch(), "gmar", target=target_for(name), head_score=score)
    signed = taylor_loop(g)
    scores = signed.abs() if score == "taylor_abs" else signed
    assert_close(exp.head_scores, scores, **TOL)
    assert_close(exp.head_weights, taylor_weights(scores.clamp_min(0)), **TOL)
    if name == "cait":
        # Talking heads mix the probabilities across heads, so one head's rows may sum below zero; the
        # tiny CaiT's Taylor weights pick such a head alone, and rollout's row normalisation is then
        # undefined (gmar clamps the sum, the hand version divides by it). The map's mix is checked
        # with the weights above; the rollout itself on CaiT is test_reference's.
        return
    assert_close(exp.token_map, R.gmar(g, weights=taylor_weights(scores.clamp_min(0)))[0], **TOL)


@pytest.mark.parametrize("name", FAMILIES)
def test_paper_scores_are_the_unnormalised_weights(name):
    """``head_scores`` of the paper's GMAR: ``||∂y/∂O||₁``, normalised per layer they are ``head_weights``."""
    g = ref(name)
    exp = gmar.explain(model(name), batch(), "gmar", target=target_for(name))
    scores = torch.stack([grad.abs().sum(dim=(2, 3)) for grad in g.grad_head_outputs], dim=1)
    assert_close(exp.head_scores, scores, **TOL)
    assert_close(exp.head_weights, R.gmar_weights(g), **TOL)


#: the families whose heads gmar switches off at the output projection's input (nn.MultiheadAttention
#: hides it: OpenCLIP and torchvision are checked by the per-head loop above). EVA-02 L
#: (``eva_avg``, ``scale_attn_inner``) normalises the heads' outputs together before its projection,
#: so switching a head off there is not zeroing its ``O = A V``, which Taylor scores.
@pytest.mark.parametrize("name", FAMILIES)
def test_taylor_is_the_derivative_of_switching_a_head_off(name):
    """Scale each head's output by a gate ``g_h`` (1 = as is, 0 = switched off) where head ablation
    switches heads off (the capture's head mask): ``∂y/∂g_h`` at ``g = 1`` is the first-order change
    of ``y`` when the head is kept rather than removed, which is what the Taylor score claims to be.

    Before the head mask, the gate sat on the output projection's input, and the models whose
    attention normalises its merged heads (EVA-02's sub-LN) and those whose output projection runs
    inside ``nn.MultiheadAttention`` (OpenCLIP, torchvision) could not be checked."""
    net = model(name)
    adapter = get_adapter(net)
    target = target_for(name)
    exp = gmar.explain(net, batch(), "gmar", target=target, head_score="taylor")
    layers, heads = exp.head_scores.shape[1:]
    gates = torch.ones(batch().shape[0], layers, heads, requires_grad=True)
    with gmar.capture.capture(adapter, head_mask=gates):
        output = adapter.forward(batch())
    y = target(output) if callable(target) else output.gather(1, output.argmax(-1, keepdim=True)).squeeze(1)
    (derivatives,) = torch.autograd.grad(y.sum(), gates)
    assert_close(exp.head_scores, derivatives, **FLOAT32)
    magnitude = gmar.explain(net, batch(), "gmar", target=target, head_score="taylor_abs")
    assert_close(magnitude.head_scores, derivatives.abs(), **FLOAT32)


def test_taylor_takes_neither_norm_nor_head_grad():
    net = model("timm")
    for options in ({"norm": "l2"}, {"head_grad": "output"}, {"head_grad": "attention"}):
        for score in ("taylor", "taylor_abs"):
            with pytest.raises(ValueError, match=f"head_score='{score}' takes neither"):
                gmar.GMAR(net, head_score=score, **options)
    with pytest.raises(ValueError, match="head_score must be"):
        gmar.GMAR(net, head_score="hessian")


# ------------------------------------------------------------------------------------------------ gmar_gae


@pytest.mark.parametrize("name", FAMILIES)
def test_gmar_gae_against_the_written_out_propagation(name):
    g = ref(name)
    exp = gmar.explain(model(name), batch(), "gmar_gae", target=target_for(name))
    token_map, weights, scores = gmar_gae_written_out(g)
    assert exp.method == "gmar_gae"
    assert_close(exp.token_map, token_map, **TOL)
    assert_close(exp.head_weights, weights, **TOL)
    assert_close(exp.head_scores, scores, **TOL)
    assert_close(exp.scores, g.scores, **TOL)


OPTIONS = [dict(head_weights=False), dict(signed=False), dict(head_weights=False, signed=False), dict(start_layer=1)]


@pytest.mark.parametrize("options", OPTIONS, ids=str)
@pytest.mark.parametrize("name", ["timm", "timm_registers", "hf_dinov2_registers", "openclip", "cait"])
def test_gmar_gae_options_against_the_written_out_propagation(name, options):
    g = ref(name)
    exp = gmar.explain(model(name), batch(), "gmar_gae", target=target_for(name), **options)
    token_map, weights, scores = gmar_gae_written_out(g, **options)
    assert_close(exp.token_map, token_map, **TOL)
    assert_close(exp.head_weights, weights, **TOL)
    assert_close(exp.head_scores, scores, **TOL)


def test_gmar_gae_without_weights_or_sign_is_gae():
    net = model("timm")
    plain = gmar.explain(net, batch(), "gmar_gae", head_weights=False, signed=False)
    assert_close(plain.token_map, gmar.explain(net, batch(), "gae").token_map, **TOL)
    signed = gmar.explain(net, batch(), "gmar_gae")
    assert (signed.token_map - plain.token_map).abs().max() > 1e-3  # the default is not GAE


# ----------------------------------------------------------------------------------------------- occlusion


@pytest.mark.parametrize("name", FAMILIES)
def test_occlusion_against_a_loop_over_patches(name):
    net = model(name)
    target = target_for(name)
    exp = gmar.explain(net, batch(), "occlusion", target=target, batch_size=5)
    assert exp.method == "occlusion" and exp.head_weights is None
    assert_close(exp.token_map, occlusion_loop(net, batch(), target), **TOL)
    assert_close(exp.logits, reference_output(net, batch()), **TOL)


@pytest.mark.parametrize("name", ["timm", "hf_vit", "openclip"])
def test_occlusion_windows_and_baselines_against_the_loop(name):
    from gmar.eval.metrics import gaussian_blur

    net, target = model(name), target_for(name)
    exp = gmar.explain(net, batch(), "occlusion", target=target, window=2, baseline=0.5)
    assert_close(exp.token_map, occlusion_loop(net, batch(), target, 2, torch.full_like(batch(), 0.5)), **TOL)
    exp = gmar.explain(net, batch(), "occlusion", target=target, baseline="blur", window=9)  # wider than the grid
    blurred = gaussian_blur(batch(), 8.0)
    assert_close(exp.token_map, occlusion_loop(net, batch(), target, 9, blurred), **TOL)


def test_occlusion_with_text_prompts_equals_one_prompt_at_a_time():
    clip = make_clip_with_text()
    prompts = ["a photo of a cat", "a dog", "a remote control"]
    image = batch()[:1]
    together = gmar.explain(clip, image, "occlusion", target=gmar.TextTarget(clip, clip_tokenizer(), prompts))
    assert together.prompts == prompts
    for row, prompt in enumerate(prompts):
        alone = gmar.explain(clip, image, "occlusion", target=gmar.TextTarget(clip, clip_tokenizer(), prompt))
        assert_close(together.token_map[row], alone.token_map[0], **TOL)


def test_occlusion_refuses_bad_options_and_needs_a_target_for_embeddings():
    net = model("timm")
    for options in ({"window": 0}, {"batch_size": 0}, {"baseline": "noise"}, {"window": 1.5}, {"baseline": True}):
        with pytest.raises(ValueError):
            gmar.Occlusion(net, **options)
    with pytest.raises(gmar.TargetError, match="callable target"):
        gmar.explain(model("openclip"), batch(), "occlusion")


def test_occlusion_draws_a_progress_bar_when_asked(capsys):
    gmar.explain(model("timm"), batch(), "occlusion", progress=True, batch_size=8)
    err = capsys.readouterr().err
    assert "occlusion:" in err and "16/16 [" in err and " windows/s]" in err
    gmar.explain(model("timm"), batch(), "occlusion", progress=False)
    assert capsys.readouterr().err == ""


def test_occlusion_counts_its_forward_passes_and_takes_no_backward(monkeypatch):
    net = make_timm()
    calls = []
    hook = net.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    grad = torch.autograd.grad
    backward = []
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: backward.append(1) or grad(*a, **k))
    try:
        gmar.explain(net, batch(), "occlusion", batch_size=24)  # 6 windows of 4 images per pass
    finally:
        hook.remove()
    assert calls == [4, 24, 24, 16] and not backward


# -------------------------------------------------------------------------- every new method and option


NEW = [
    ("gmar", {"head_score": "taylor"}),
    ("gmar", {"head_score": "taylor_abs"}),
    ("gmar_gae", {}),
    ("gmar_gae", {"signed": False}),
    ("occlusion", {}),
]


@pytest.mark.parametrize(("method", "options"), NEW, ids=str)
@pytest.mark.parametrize("name", ["timm", "hf_dinov2_registers", "openclip", "torchvision", "eva"])
def test_a_batch_of_four_equals_four_of_one(name, method, options):
    net, target = model(name), target_for(name)
    whole = gmar.explain(net, batch(), method, target=target, **options)
    for i in range(4):
        single = gmar.explain(net, batch()[i : i + 1], method, target=target, **options)
        assert_close(whole.token_map[i : i + 1], single.token_map, **TOL)
        if whole.head_scores is not None:
            assert_close(whole.head_scores[i : i + 1], single.head_scores, **TOL)
            assert_close(whole.head_weights[i : i + 1], single.head_weights, **TOL)


@pytest.mark.parametrize(("method", "options"), NEW, ids=str)
def test_the_model_is_left_as_found(method, options):
    from test_capture import assert_same, snapshot, unusual_state

    net = unusual_state(make_timm())
    before = snapshot(net)
    gmar.explain(net, batch(), method, **options)
    assert_same(before, snapshot(net))

    def broken(output):
        raise RuntimeError("from the target")

    before = snapshot(net)
    with pytest.raises(RuntimeError, match="from the target"):
        gmar.explain(net, batch(), method, target=broken, **options)
    assert_same(before, snapshot(net))


def test_the_plain_path_gives_the_streamed_maps():
    """``low_memory = False`` (the model's explicit attention, all gradients first) equals the stream."""
    net = model("timm")
    for cls, options in ((gmar.GMAR, {"head_score": "taylor"}), (gmar.HeadWeightedGAE, {})):
        streamed = cls(net, **options)(batch())
        plain = cls(net, **options)
        plain.low_memory = False
        whole = plain(batch())
        assert_close(whole.token_map, streamed.token_map, **TOL)
        assert_close(whole.head_scores, streamed.head_scores, **TOL)


def test_callable_targets_reach_the_new_methods():
    net = model("openclip")
    for method, options in NEW:
        exp = gmar.explain(net, batch(), method, target=clip_target, **options)
        assert exp.target is None and exp.scores is not None


def test_a_progress_bar_inside_another_stays_quiet(capsys):
    from gmar.progress import Progress

    outer = Progress(3, "evaluating", True)
    capsys.readouterr()
    gmar.explain(model("timm"), batch(), "occlusion", progress=True)
    assert capsys.readouterr().err == ""
    outer.close()
    gmar.explain(model("timm"), batch(), "occlusion", progress=True)
    assert "occlusion:" in capsys.readouterr().err


def test_windows_cover_the_grid_and_their_map_averages_the_drops():
    from gmar.methods import functional as Fn

    windows = Fn.occlusion_windows((3, 4), 2)
    assert windows.shape == (6, 3, 4) and windows.sum(dim=(1, 2)).tolist() == [4] * 6
    assert windows.sum(dim=0).tolist() == [[1, 2, 2, 1], [2, 4, 4, 2], [1, 2, 2, 1]]
    assert Fn.occlusion_windows((3, 4), 9).shape == (1, 3, 4)
    drops = torch.arange(6.0)[None]
    token_map = Fn.occlusion_map(drops, windows)
    # patch (1, 1) lies in windows 0, 1, 3 and 4
    assert token_map[0, 1, 1].item() == pytest.approx((0 + 1 + 3 + 4) / 4)
    assert token_map[0, 0, 0].item() == 0.0 and token_map[0, 2, 3].item() == 5.0


def test_head_ablation_pairs_each_ranking_with_the_oracle_and_gmar(tmp_path):
    import statistics

    from gmar.eval.report import _paired_heads
    from gmar.eval.store import Store

    store = Store(tmp_path / "results.sqlite")
    aucs = {"a": (0.6, 0.4, 0.3), "b": (0.7, 0.5, 0.35), "c": (0.65, 0.38, 0.33)}  # gmar, taylor, oracle
    for item, values in aucs.items():
        names = ("gmar", "taylor", "oracle")
        store.write(item, "gmar", {f"head_ablation_auc[{n}]": v for n, v in zip(names, values, strict=True)}, {})
    rows = store.scores()
    store.close()
    text = _paired_heads(rows)
    differences = [t - o for _, t, o in aucs.values()]
    ci = 1.96 * statistics.stdev(differences) / 3**0.5
    assert f"| taylor | {statistics.mean(differences):+.3f} ± {ci:.3f} |" in text
    assert "| oracle | — |" in text and "| gmar | " in text
    assert _paired_heads([r for r in rows if "oracle" not in r[2]]) == ""
