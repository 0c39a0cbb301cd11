"""Inputs a user may pass by mistake: each gets one clear line (error or warning), never a silent result."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import gmar
from conftest import FACTORIES, IMAGE, make_timm, target_for
from gmar.errors import GmarWarning
from tolerance import FLOAT32

METHODS = gmar.available_methods()


def poisoned(images: torch.Tensor) -> torch.Tensor:
    """Image 1 holds a NaN, image 3 an Inf; images 0 and 2 are clean."""
    images = images.clone()
    images[1, 0, 5, 7] = float("nan")
    images[3, 2, 0, 0] = float("-inf")
    return images


@pytest.mark.parametrize("name", ["timm", "hf_vit", "openclip"])
@pytest.mark.parametrize("method", ["gmar", "rollout"])
def test_nan_and_inf_images_are_warned_about_once_each(name, method, images):
    model = FACTORIES[name]()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        explanation = gmar.explain(model, poisoned(images), method=method, target=target_for(name))
    ours = [w for w in caught if issubclass(w.category, GmarWarning)]
    assert [str(w.message) for w in ours] == [
        "images[1] holds NaN or Inf values; its explanation (map, target and score) is meaningless",
        "images[3] holds NaN or Inf values; its explanation (map, target and score) is meaningless",
    ]
    assert all(w.filename == __file__ for w in ours), "the warning must point at the caller's line"
    # the clean images are explained as they would be alone
    clean = gmar.explain(model, images[[0, 2]], method=method, target=target_for(name))
    torch.testing.assert_close(explanation.token_map[[0, 2]], clean.token_map, **FLOAT32)


def test_finite_images_give_no_warning(images):
    with warnings.catch_warnings():
        warnings.simplefilter("error", GmarWarning)
        gmar.explain(make_timm(), images, method="gmar")


def test_gmar_warning_is_a_user_warning():
    assert issubclass(gmar.GmarWarning, UserWarning)
    with pytest.warns(gmar.GmarWarning, match=r"images\[0\] holds NaN or Inf"):
        gmar.explain(make_timm(), torch.full((1, 3, IMAGE, IMAGE), float("nan")), method="rollout")


@pytest.mark.parametrize("name", ["timm", "hf_vit", "openclip"])
@pytest.mark.parametrize("method", ["gmar", "raw_attention"])
def test_an_empty_batch_is_one_clear_error(name, method):
    with pytest.raises(gmar.InputSizeError, match=r"^empty batch: images has shape \(0, 3, 32, 32\)"):
        gmar.explain(FACTORIES[name](), torch.zeros(0, 3, IMAGE, IMAGE), method=method, target=target_for(name))


def test_a_model_on_the_meta_device_is_one_clear_error(images):
    from timm.models.vision_transformer import VisionTransformer

    with torch.device("meta"):
        model = VisionTransformer(img_size=IMAGE, patch_size=8, embed_dim=32, depth=3, num_heads=4, num_classes=5)
    with pytest.raises(gmar.ModelLoadError, match="meta device") as caught:
        gmar.explain(model, images, method="gmar")
    assert "\n" not in str(caught.value)
    assert "to_empty" in str(caught.value) and "load" in str(caught.value)


@pytest.mark.parametrize("wrapper", ["DataParallel", "DistributedDataParallel"])
def test_a_data_parallel_wrapper_is_refused_with_what_to_pass(wrapper, images):
    model = make_timm()
    if wrapper == "DataParallel":
        wrapped = nn.DataParallel(model)
    else:
        # building a real DistributedDataParallel needs a process group; the refusal goes by class
        wrapped = nn.parallel.DistributedDataParallel.__new__(nn.parallel.DistributedDataParallel)
        nn.Module.__init__(wrapped)
        wrapped.module = model
    with pytest.raises(gmar.UnsupportedModelError, match=rf"{wrapper} .*pass `model\.module`"):
        gmar.explain(wrapped, images)
    # and doing what it says works
    assert gmar.explain(wrapped.module, images).heatmap.shape == (4, IMAGE, IMAGE)


def test_the_refusal_lists_the_families_of_the_readme():
    with pytest.raises(gmar.UnsupportedModelError) as caught:
        gmar.get_adapter(nn.Linear(2, 2))
    message = str(caught.value)
    for name in (
        "VisionTransformerDistilled",
        "global_pool='map'",
        "ViTForImageClassification",
        "DeiTForImageClassificationWithTeacher",
        "Dinov2WithRegistersForImageClassification",
        "TimmModel",
    ):
        assert name in message, name


def test_explanation_repr_is_short_and_holds_no_tensor_data(images):
    explanation = gmar.explain(make_timm(), images, method="gmar", target=[0, 1, 2, 3])
    text = repr(explanation)
    assert text == (
        "Explanation(method='gmar', batch=4, heatmap=(4, 32, 32), token_map=(4, 4, 4), "
        "target=[0, 1, 2, 3], head_weights=(4, 3, 4))"
    )


def test_explanation_repr_of_a_large_batch_and_of_prompts():
    from conftest import make_clip

    model = make_clip()
    many = torch.randn(12, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(0))
    text = repr(gmar.explain(model, many, method="gae", target=target_for("openclip")))
    assert text == "Explanation(method='gae', batch=12, heatmap=(12, 32, 32), token_map=(12, 4, 4), target=None)"
    text = repr(gmar.explain(make_timm(), many, method="rollout", target=4))
    assert "target=[4, 4, 4, 4, 4, 4, 4, 4, ...]" in text and "tensor" not in text


def test_explanation_repr_names_the_prompts():
    from conftest import clip_tokenizer, make_clip_with_text

    model = make_clip_with_text()
    target = gmar.TextTarget(model, clip_tokenizer(), ["a cat", "a dog"])
    text = repr(gmar.explain(model, torch.zeros(1, 3, IMAGE, IMAGE), method="gmar", target=target))
    assert text == (
        "Explanation(method='gmar', batch=2, heatmap=(2, 32, 32), token_map=(2, 4, 4), target=None, "
        "head_weights=(2, 3, 4), prompts=['a cat', 'a dog'])"
    )


@pytest.mark.parametrize("method", ["gmar", "rollout", "occlusion", ["gmar", "gae"]])
def test_images_on_the_meta_device_are_one_clear_error(method):
    meta = torch.zeros(2, 3, IMAGE, IMAGE, device="meta")
    with pytest.raises(ValueError, match=r"^images are on the meta device \(shapes without data\)") as caught:
        gmar.explain(make_timm(), meta, method=method)
    assert "\n" not in str(caught.value)


def test_head_attention_of_images_on_the_meta_device_is_one_clear_error():
    with pytest.raises(ValueError, match=r"^images are on the meta device"):
        gmar.head_attention(make_timm(), torch.zeros(1, 3, IMAGE, IMAGE, device="meta"))
