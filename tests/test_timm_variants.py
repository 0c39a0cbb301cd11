"""timm ViT variants whose layout or block order differs from the plain ViT: hybrid patch embeddings
(a convolutional stem before the patch projection) and post-norm blocks (``ResPostBlock``)."""

from __future__ import annotations

from functools import partial

import pytest
import timm.models.vision_transformer
import torch
import torch.nn.functional as F
from torch import nn

import gmar
from conftest import IMAGE, spread
from tolerance import FLOAT32

TOL = FLOAT32


def make_hybrid() -> nn.Module:
    """A tiny hybrid ViT: a stride-4 convolutional stem, then a 2x2 patch projection on its features,
    so each token stands for 8x8 pixels (the stem's stride times the projection's)."""
    from timm.layers import HybridEmbed
    from timm.models.vision_transformer import VisionTransformer

    stem = nn.Sequential(nn.Conv2d(3, 8, kernel_size=4, stride=4), nn.ReLU())
    embed = partial(HybridEmbed, backbone=stem, patch_size=2)
    net = VisionTransformer(
        img_size=IMAGE, embed_layer=embed, embed_dim=32, depth=3, num_heads=4, num_classes=5, patch_size=2
    )
    return spread(net)


def make_post_norm() -> nn.Module:
    from timm.models.vision_transformer import ResPostBlock, VisionTransformer

    net = VisionTransformer(
        img_size=IMAGE, patch_size=8, embed_dim=32, depth=3, num_heads=4, num_classes=5, block_fn=ResPostBlock
    )
    return spread(net)


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(3))


def test_hybrid_embedding_tokens_stand_for_the_stem_stride_in_pixels(images):
    net = make_hybrid()
    layout = gmar.get_adapter(net).token_layout((IMAGE, IMAGE))
    assert layout.grid_size == (4, 4)
    # 8 pixels per token: the stem's stride 4 times the projection's kernel 2, not the kernel alone
    assert layout.patch_size == (8, 8)
    exp = gmar.explain(net, images, "rollout")
    expected = F.interpolate(exp.token_map[:, None], size=(IMAGE, IMAGE), mode="bilinear", align_corners=False)[:, 0]
    low = expected.flatten(1).min(1).values[:, None, None]
    high = expected.flatten(1).max(1).values[:, None, None]
    torch.testing.assert_close(exp.heatmap, (expected - low) / (high - low), **TOL)


def test_gradcam_on_a_post_norm_block_reads_the_block_input(images):
    """In a post-norm block the first norm comes after the attention, so its input is not the tokens
    entering the block; Grad-CAM must take the block's own input (hooked here independently)."""
    net = make_post_norm()
    kept = []
    handle = net.blocks[-1].register_forward_pre_hook(lambda module, args: kept.append(args[0]))
    try:
        inputs = images.clone()
        logits = net(inputs)
    finally:
        handle.remove()
    classes = logits.argmax(1)
    tokens = kept[0]
    grads = torch.autograd.grad(logits.gather(1, classes[:, None]).sum(), tokens)[0]
    patches, patch_grads = tokens[:, 1:].detach(), grads[:, 1:]
    expected = torch.relu((patches * patch_grads.mean(1, keepdim=True)).sum(-1)).reshape(-1, 4, 4)
    for param in net.parameters():
        param.grad = None
    exp = gmar.explain(net, images, "gradcam")
    assert torch.equal(exp.target, classes)
    torch.testing.assert_close(exp.token_map, expected, **TOL)


@pytest.mark.parametrize("method", gmar.available_methods())
def test_post_norm_and_hybrid_models_run_every_method(images, method):
    for net in (make_post_norm(), make_hybrid()):
        if method in ("transformer_attribution", "partial_lrp") and method not in gmar.supported_methods(net):
            # Chefer et al.'s rules need the residual sums, which gmar declares for timm's pre-norm Block
            assert isinstance(net.blocks[0], timm.models.vision_transformer.ResPostBlock)
            with pytest.raises(gmar.UnsupportedModelError, match="use attnlrp"):
                gmar.explain(net, images, method)
            continue
        exp = gmar.explain(net, images, method)
        assert exp.heatmap.shape == (2, IMAGE, IMAGE)
        assert torch.isfinite(exp.token_map).all()
