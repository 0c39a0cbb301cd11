"""The model is left exactly as it was found, also when a call raises; capture finds every layer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gmar
from conftest import FACTORIES, make_clip, make_hf_vit, make_timm, target_for

METHODS = gmar.available_methods()


def snapshot(model: nn.Module) -> dict:
    state = {
        "modes": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "grads": [p.grad is None for p in model.parameters()],
        "hooks": [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks)) for m in model.modules()],
        "fused": [getattr(m, "fused_attn", None) for m in model.modules()],
        "instance_forward": ["forward" in m.__dict__ for m in model.modules()],
        "weights": {k: v.clone() for k, v in model.state_dict().items()},
    }
    config = getattr(model, "config", None)
    if config is not None:
        state["attn_implementation"] = config._attn_implementation
    return state


def assert_same(before: dict, after: dict) -> None:
    weights_before, weights_after = before.pop("weights"), after.pop("weights")
    assert before == after
    for key, value in weights_before.items():
        torch.testing.assert_close(weights_after[key], value, rtol=0, atol=0)


def unusual_state(model: nn.Module) -> nn.Module:
    """Mixed train/eval modes and some frozen parameters, as a user might leave them."""
    model.train()
    for i, module in enumerate(model.modules()):
        if i % 3 == 0:
            module.eval()
    for i, param in enumerate(model.parameters()):
        if i % 2 == 0:
            param.requires_grad_(False)
    return model


@pytest.mark.parametrize("name", sorted(FACTORIES))
@pytest.mark.parametrize("method", METHODS)
def test_model_untouched_after_call(name, method, images):
    """Explained or refused (in one line, before anything is touched), the model is as it was."""
    model = unusual_state(FACTORIES[name]())
    before = snapshot(model)
    if method in gmar.supported_methods(model) or method == "occlusion":
        gmar.explain(model, images, method=method, target=target_for(name))
    else:
        with pytest.raises(gmar.UnsupportedModelError) as refused:
            gmar.explain(model, images, method=method, target=target_for(name))
        assert "\n" not in str(refused.value)
    assert_same(before, snapshot(model))


class Boom(Exception):
    pass


def exploding_target(output):
    raise Boom("from the target")


@pytest.mark.parametrize("name", ["timm", "hf_vit", "openclip"])
@pytest.mark.parametrize("method", ["gmar", "rollout"])
def test_model_untouched_when_target_raises(name, method, images):
    model = unusual_state(FACTORIES[name]())
    before = snapshot(model)
    with pytest.raises(Boom):
        gmar.explain(model, images, method=method, target=exploding_target)
    assert_same(before, snapshot(model))


@pytest.mark.parametrize("name", ["timm", "hf_vit", "openclip"])
def test_model_untouched_when_forward_raises_and_user_hooks_survive(name, images):
    model = unusual_state(FACTORIES[name]())
    calls = []
    tower = model.visual if name == "openclip" else model  # CLIP's text tower has blocks too
    user_hook = tower.register_forward_pre_hook(lambda module, args: calls.append(1))
    blocks = [m for m in tower.modules() if type(m).__name__ in ("Block", "ViTLayer", "ResidualAttentionBlock")]

    def explode(module, args, output):
        raise Boom("inside the forward pass")

    bomb = blocks[-1].register_forward_hook(explode)
    bomb.remove()  # register it again after the snapshot, so the snapshot holds the user hook only
    before = snapshot(model)
    bomb = blocks[-1].register_forward_hook(explode)
    with pytest.raises(Boom):
        gmar.explain(model, images, method="gmar", target=target_for(name))
    bomb.remove()
    assert_same(before, snapshot(model))
    assert calls == [1]
    user_hook.remove()


def test_model_untouched_when_target_is_invalid(images):
    model = make_timm()
    before = snapshot(model)
    with pytest.raises(gmar.TargetError):
        gmar.explain(model, images, method="gae", target=99)
    assert_same(before, snapshot(model))


@pytest.mark.parametrize("method", METHODS)
def test_fused_and_explicit_timm_attention_give_the_same_maps(method, images):
    fused = make_timm()
    explicit = make_timm()
    for block in explicit.blocks:
        block.attn.fused_attn = False
    assert all(block.attn.fused_attn for block in fused.blocks)
    a = gmar.explain(fused, images, method=method)
    b = gmar.explain(explicit, images, method=method)
    torch.testing.assert_close(a.token_map, b.token_map)
    assert all(block.attn.fused_attn for block in fused.blocks)
    assert not any(block.attn.fused_attn for block in explicit.blocks)


def test_hf_sdpa_model_is_explained_and_keeps_sdpa(images):
    model = make_hf_vit()
    assert model.config._attn_implementation == "sdpa"
    explanation = gmar.explain(model, images, method="grad_rollout")
    assert explanation.token_map.shape == (4, 4, 4)
    assert model.config._attn_implementation == "sdpa"
    assert all(layer.attention.config._attn_implementation == "sdpa" for layer in model.vit.layers)


@pytest.mark.parametrize("method", ["gmar", "raw_attention"])
def test_explanations_run_in_eval_mode(method, images):
    model = make_timm(attn_drop_rate=0.5, proj_drop_rate=0.5, drop_rate=0.5)
    reference = gmar.explain(model.eval(), images, method=method)
    model.train()
    first = gmar.explain(model, images, method=method)
    second = gmar.explain(model, images, method=method)
    torch.testing.assert_close(first.token_map, reference.token_map)
    torch.testing.assert_close(second.token_map, reference.token_map)
    assert model.training


def test_unsupported_model_names_class_and_families(images):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten())
    with pytest.raises(gmar.UnsupportedModelError) as caught:
        gmar.explain(model, images)
    assert isinstance(caught.value, TypeError)
    assert "Sequential" in str(caught.value)
    for family in ("timm", "transformers", "OpenCLIP"):
        assert family in str(caught.value)


def test_unsupported_timm_pooling_is_refused():
    with pytest.raises(gmar.UnsupportedModelError, match="global_pool='max'"):
        gmar.get_adapter(make_timm(global_pool="max"))


def test_model_whose_attention_never_runs_is_an_error(images):
    model = make_timm()
    model.forward = lambda x: model.head(model.patch_embed(x).mean(dim=1))
    with pytest.raises(gmar.CaptureError, match="no attention was captured"):
        gmar.explain(model, images, method="rollout")
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_clip_without_callable_target_says_what_to_do(images):
    with pytest.raises(gmar.TargetError, match="callable target"):
        gmar.explain(make_clip(), images, method="gmar")


def test_gradient_methods_use_one_backward_call(images, monkeypatch):
    calls = []
    original = torch.autograd.grad

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", counting)
    for method in ("gmar", "grad_rollout", "gae"):
        calls.clear()
        gmar.explain(make_timm(), images, method=method)
        assert calls == [1], method


def test_model_without_attention_layers_is_an_error(images):
    with pytest.raises(gmar.CaptureError, match="no attention layers"):
        gmar.explain(make_timm(depth=0), images, method="rollout")


@pytest.mark.parametrize("method", ["gmar", "rollout"])
def test_works_under_inference_mode(method, images):
    model = make_timm()
    expected = gmar.explain(model, images, method=method).token_map
    with torch.inference_mode():
        frozen = images.clone()
        result = gmar.explain(model, frozen, method=method).token_map
    torch.testing.assert_close(result, expected)


def test_compiled_model_is_explained_through_the_module_it_wraps(images):
    model = make_timm()
    compiled = torch.compile(model)
    torch.testing.assert_close(
        gmar.explain(compiled, images, method="gmar").token_map, gmar.explain(model, images, method="gmar").token_map
    )
