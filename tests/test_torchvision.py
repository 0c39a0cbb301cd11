"""torchvision's VisionTransformer: the same maps as a timm ViT that carries the same weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gmar
from conftest import IMAGE, PATCH, make_torchvision
from tolerance import FLOAT32

TOL = FLOAT32


def timm_twin(tv: nn.Module) -> nn.Module:
    """A timm ``VisionTransformer`` holding ``tv``'s weights: the same function, another implementation."""
    from timm.models.vision_transformer import VisionTransformer

    layers = tv.encoder.layers
    twin = VisionTransformer(
        img_size=IMAGE,
        patch_size=PATCH,
        embed_dim=tv.hidden_dim,
        depth=len(layers),
        num_heads=layers[0].self_attention.num_heads,
        mlp_ratio=layers[0].mlp[0].out_features / tv.hidden_dim,
        num_classes=tv.heads.head.out_features,
        qkv_bias=True,
    ).eval()
    with torch.no_grad():
        twin.patch_embed.proj.weight.copy_(tv.conv_proj.weight)
        twin.patch_embed.proj.bias.copy_(tv.conv_proj.bias)
        twin.cls_token.copy_(tv.class_token)
        twin.pos_embed.copy_(tv.encoder.pos_embedding)
        for block, layer in zip(twin.blocks, layers, strict=True):
            pairs = [
                (block.norm1, layer.ln_1),
                (block.norm2, layer.ln_2),
                (block.attn.proj, layer.self_attention.out_proj),
                (block.mlp.fc1, layer.mlp[0]),
                (block.mlp.fc2, layer.mlp[3]),
            ]
            for mine, theirs in pairs:
                mine.weight.copy_(theirs.weight)
                mine.bias.copy_(theirs.bias)
            block.attn.qkv.weight.copy_(layer.self_attention.in_proj_weight)
            block.attn.qkv.bias.copy_(layer.self_attention.in_proj_bias)
        twin.norm.weight.copy_(tv.encoder.ln.weight)
        twin.norm.bias.copy_(tv.encoder.ln.bias)
        twin.head.weight.copy_(tv.heads.head.weight)
        twin.head.bias.copy_(tv.heads.head.bias)
    return twin


@pytest.fixture(scope="module")
def pair() -> tuple[nn.Module, nn.Module]:
    tv = make_torchvision()
    return tv, timm_twin(tv)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(4, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(5))


def test_the_twin_computes_the_same_function(pair, images):
    tv, twin = pair
    with torch.no_grad():
        torch.testing.assert_close(twin(images), tv(images), **TOL)


@pytest.mark.parametrize("method", gmar.available_methods())
def test_maps_equal_the_timm_twins(pair, images, method):
    tv, twin = pair
    if method in ("transformer_attribution", "partial_lrp"):
        # the twin's qkv is a module, torchvision's in-projection a raw parameter: Chefer et al.'s z⁺
        # rule has no module to act on there, so the torchvision model is refused (the twin is not)
        with pytest.raises(gmar.UnsupportedModelError, match="use attnlrp"):
            gmar.explain(tv, images, method)
        assert method in gmar.supported_methods(twin)
        return
    mine, theirs = gmar.explain(tv, images, method), gmar.explain(twin, images, method)
    assert torch.equal(mine.target, theirs.target)
    torch.testing.assert_close(mine.token_map, theirs.token_map, **TOL)
    if method == "gmar":
        torch.testing.assert_close(mine.head_weights, theirs.head_weights, **TOL)


@pytest.mark.parametrize("method", ["gmar", "legrad", "rollout"])
def test_a_batch_of_four_equals_four_batches_of_one(pair, images, method):
    tv, _ = pair
    whole = gmar.explain(tv, images, method, target=[0, 1, 2, 3])
    alone = torch.cat([gmar.explain(tv, images[i : i + 1], method, target=i).token_map for i in range(4)])
    torch.testing.assert_close(whole.token_map, alone, **TOL)


def test_input_of_another_size_is_refused(pair):
    tv, _ = pair
    with pytest.raises(gmar.InputSizeError, match="takes 32x32 inputs"):
        gmar.explain(tv, torch.randn(1, 3, 48, 48), "rollout")


def test_convolutional_stem_is_refused():
    from torchvision.models.vision_transformer import ConvStemConfig

    stem = [ConvStemConfig(out_channels=8, kernel_size=3, stride=2), ConvStemConfig(8, 3, 2)]
    net = make_torchvision(conv_stem_configs=stem)
    with pytest.raises(gmar.UnsupportedModelError, match="convolutional stem"):
        gmar.explain(net, torch.randn(1, 3, IMAGE, IMAGE), "rollout")
