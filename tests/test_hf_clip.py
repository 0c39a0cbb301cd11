"""Hugging Face CLIP / SigLIP beyond the shared tables (FACTORIES runs the rollout-capable classes through
every parametrised test): SigLIP's attention-pooling head, text prompts through the transformers tokenizer
or processor, the ``hf:`` loader and CLI with ``--prompt``, input sizes, and one-line refusals.

The references are written here from the weights (SigLIP's pooling head) or taken from the model's own
eager forward (``hidden_states``, ``get_text_features``, ``get_image_features``); none calls gmar.
"""

from __future__ import annotations

import copy
import functools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.testing import assert_close

import gmar
import reference as R
from conftest import ATTENTION_POOLED, IMAGE, clip_target, hf_clip_tokenizer, make_hf_beit, make_hf_clip
from gmar.frontends.cli import main
from gmar.methods import get_method
from tolerance import FLOAT32

TOL = FLOAT32
PROMPTS = ["a photo of a cat", "a remote control", "a dog on the grass"]


@functools.cache
def model(name: str) -> torch.nn.Module:
    if name in ATTENTION_POOLED:
        return ATTENTION_POOLED[name]()
    if name in ("Beit", "Data2VecVision"):
        return make_hf_beit(name)
    return make_hf_clip(name)


@functools.cache
def tokenizer():
    return hf_clip_tokenizer()


def batch(count: int = 4, size: tuple[int, int] = (IMAGE, IMAGE), seed: int = 1) -> torch.Tensor:
    return torch.randn(count, 3, *size, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------- SigLIP's attention-pooling head


def pooling_head(head: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SigLIP's pooling head from its weights: a learned probe attends to the tokens ``x`` ``(B, N, D)``;
    returns the pooled output ``(B, D)`` and the probe's attention ``(B, heads, 1, N)``."""
    mha = head.attention
    batch_size, _, width = x.shape
    heads = mha.num_heads
    w_q, w_k, w_v = mha.in_proj_weight.chunk(3)
    b_q, b_k, b_v = mha.in_proj_bias.chunk(3)

    def project(t, weight, bias):
        return F.linear(t, weight, bias).view(batch_size, t.shape[1], heads, -1).transpose(1, 2)

    q = project(head.probe.expand(batch_size, 1, width), w_q, b_q)
    k, v = project(x, w_k, b_k), project(x, w_v, b_v)
    attention = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
    out = (attention @ v).transpose(1, 2).reshape(batch_size, 1, width)
    out = F.linear(out, mha.out_proj.weight, mha.out_proj.bias)
    norm, mlp = head.layernorm, head.mlp
    assert mlp.config.hidden_act == "gelu_pytorch_tanh"
    hidden = F.gelu(F.linear(F.layer_norm(out, norm.normalized_shape, norm.weight, norm.bias, norm.eps),
                             mlp.fc1.weight, mlp.fc1.bias), approximate="tanh")  # fmt: skip
    return (out + F.linear(hidden, mlp.fc2.weight, mlp.fc2.bias))[:, 0], attention


def layer_map(gradient: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """LeGrad's layer map: mean over heads and probe rows of ReLU(gradient), as ``(B, h, w)``."""
    return torch.relu(gradient).mean(dim=(1, 2)).reshape(gradient.shape[0], *grid)


@functools.cache
def pooled_reference(name: str, size: tuple[int, int] = (IMAGE, IMAGE), final_norm: bool = True):
    """Block outputs from the model's own forward; per layer, the head's attention and its gradient
    (``final_norm=False``: the head reads the block's tokens without ``post_layernorm``)."""
    net, images = model(name), batch(size=size)
    tower = getattr(net, "vision_model", net)
    with torch.no_grad():
        out = R.hf_call(net, images, output_hidden_states=True)
        expected = R.hf_forward(net, images)
        assert_close(pooling_head(tower.head, tower.post_layernorm(out.hidden_states[-1]))[0], expected, **TOL)
    grid = (size[0] // 8, size[1] // 8)
    maps = []
    for tokens in out.hidden_states[1:]:
        norm = tower.post_layernorm
        x = F.layer_norm(tokens, (tokens.shape[-1],), norm.weight, norm.bias, norm.eps) if final_norm else tokens
        embedding, attention = pooling_head(tower.head, x)
        (gradient,) = torch.autograd.grad(clip_target(embedding).sum(), attention)
        maps.append(layer_map(gradient, grid))
    return torch.stack(maps), expected


@pytest.mark.parametrize("name", list(ATTENTION_POOLED))
def test_legrad_reads_the_pooling_heads_attention(name):
    maps, output = pooled_reference(name)
    assert (maps.flatten(1).amax(dim=1) > 0).all(), "every layer must contribute"
    exp = gmar.explain(model(name), batch(), "legrad", target=clip_target)
    assert exp.layout.attention_pooled and exp.layout.num_prefix_tokens == 0
    assert_close(exp.token_map, maps.sum(dim=0), **TOL)
    assert_close(exp.logits, output, **TOL)
    assert_close(exp.scores, clip_target(output), **TOL)
    start = gmar.explain(model(name), batch(), "legrad", target=clip_target, start_layer=1)
    assert_close(start.token_map, maps[1:].sum(dim=0), **TOL)


def test_legrad_without_the_final_norm():
    """``pooling="no_final_norm"``: the official LeGrad code's readout, another map; the output is the model's."""
    maps, output = pooled_reference("hf_siglip", final_norm=False)
    exp = gmar.explain(model("hf_siglip"), batch(), "legrad", target=clip_target, pooling="no_final_norm")
    assert_close(exp.token_map, maps.sum(dim=0), **TOL)
    assert_close(exp.logits, output, **TOL)
    assert not torch.allclose(exp.token_map, pooled_reference("hf_siglip")[0].sum(dim=0), atol=1e-4)


def test_siglip2_non_square_input():
    """NaFlex: a 32x48 batch is a 4x6 grid of patches, the position grid resized to it."""
    maps, output = pooled_reference("hf_siglip2_vision", (IMAGE, 48))
    exp = gmar.explain(model("hf_siglip2_vision"), batch(size=(IMAGE, 48)), "legrad", target=clip_target)
    assert exp.token_map.shape == (4, 4, 6) and exp.heatmap.shape == (4, IMAGE, 48)
    assert_close(exp.token_map, maps.sum(dim=0), **TOL)
    assert_close(exp.logits, output, **TOL)


@pytest.mark.parametrize("name", list(ATTENTION_POOLED))
@pytest.mark.parametrize("layer", [0, -1])
def test_gradcam_on_the_block_input(name, layer):
    """Grad-CAM from the eager forward's ``hidden_states`` (the blocks' inputs) and their gradient."""
    net, images = model(name), batch()
    out = R.hf_call(copy.deepcopy(net).eval(), images.clone().requires_grad_(True), output_hidden_states=True)
    output = R.hf_output(net, out)
    tokens = out.hidden_states[layer % 3]
    (gradient,) = torch.autograd.grad(clip_target(output).sum(), tokens)
    expected = torch.relu(torch.einsum("bnd,bd->bn", tokens, gradient.mean(dim=1))).reshape(4, 4, 4)
    exp = gmar.explain(net, images, "gradcam", target=clip_target, layer=layer)
    assert (expected > 0).any()
    assert_close(exp.token_map, expected.detach(), **TOL)


@pytest.mark.parametrize("method", ["raw_attention", "rollout", "grad_rollout", "gmar", "gae"])
def test_rollout_family_refuses_attention_pooling(method):
    with pytest.raises(gmar.UnsupportedModelError, match=r"attention head.*legrad, gradcam or occlusion") as error:
        gmar.explain(model("hf_siglip"), batch(), method, target=clip_target)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("method", ["legrad", "gradcam"])
def test_pooled_batch_equals_single_images_and_paths_agree(method):
    net, images = model("hf_siglip"), batch()
    whole = gmar.explain(net, images, method, target=clip_target)
    for i in range(4):
        single = gmar.explain(net, images[i : i + 1], method, target=clip_target)
        assert_close(single.token_map[0], whole.token_map[i], **TOL)
    explainer = get_method(method)(net)
    explainer.low_memory = False
    assert_close(explainer(images, clip_target).token_map, whole.token_map, **TOL)


def test_pooled_model_left_as_found():
    net = make_hf_clip("SiglipModel").train()
    net.vision_model.encoder.layers[0].requires_grad_(False)
    before = (
        [m.training for m in net.modules()],
        [p.requires_grad for p in net.parameters()],
        [(len(m._forward_hooks), len(m._forward_pre_hooks), sorted(vars(m))) for m in net.modules()],
        net.vision_model.config._attn_implementation,
    )
    for method in ("legrad", "gradcam"):
        gmar.explain(net, batch(), method, target=clip_target)
    after = (
        [m.training for m in net.modules()],
        [p.requires_grad for p in net.parameters()],
        [(len(m._forward_hooks), len(m._forward_pre_hooks), sorted(vars(m))) for m in net.modules()],
        net.vision_model.config._attn_implementation,
    )
    assert after == before and all(p.grad is None for p in net.parameters())


# ---------------------------------------------------------------------------------- other classes, sizes


def test_clip_vision_model_explains_its_pooled_output():
    net, images = model("CLIPVisionModel"), batch()
    g = R.differentiate(R.trace(net, images), clip_target)
    for method in ("gae", "gmar"):
        exp = gmar.explain(net, images, method, target=clip_target)
        assert_close(exp.token_map, R.reference_map(method, g), **TOL)
    assert_close(exp.logits, R.hf_forward(net, images), **TOL)
    with pytest.raises(gmar.TargetError, match="image embedding"):
        gmar.explain(net, images, "gae", target=0)


def test_beit_with_cls_pooling():
    """``use_mean_pooling=False``: the classifier reads the final-normed CLS token."""
    net, images = make_hf_beit(use_mean_pooling=False), batch()
    trace = R.trace(net, images)
    trace.readout = R.readout_weights(trace.readout.numel(), 1, (0,), patches=False)
    g = R.differentiate(trace)
    exp = gmar.explain(net, images, "gmar")
    assert exp.layout.readout_prefix == (0,) and not exp.layout.readout_patches
    assert_close(exp.token_map, R.reference_map("gmar", g), **TOL)
    assert_close(exp.logits, R.hf_forward(net, images), **TOL)


@pytest.mark.parametrize(
    "name", ["CLIPModel", "CLIPForImageClassification", "SiglipForImageClassification", "Beit", "Data2VecVision"]
)
def test_non_square_input_interpolates_position_embeddings(name):
    """48x32 images: position embeddings (and BEiT's relative position bias) for a 6x4 grid."""
    net, images = model(name), batch(2, (48, IMAGE))
    target = clip_target if name == "CLIPModel" else None
    trace = R.trace(net, images)  # the eager forward with interpolate_pos_encoding=True
    g = R.differentiate(trace, target)
    exp = gmar.explain(net, images, "gae", target=target)
    assert exp.layout.grid_size == (6, 4) and exp.heatmap.shape == (2, 48, IMAGE)
    assert_close(exp.token_map, R.reference_map("gae", g), **TOL)
    assert_close(exp.logits, g.output, **TOL)


@pytest.mark.parametrize("name", ["CLIPModel", "Siglip2ForImageClassification"])
def test_size_not_a_multiple_of_the_patch_is_refused(name):
    with pytest.raises(gmar.InputSizeError, match="multiples of its patch size 8"):
        gmar.explain(model(name), batch(1, (IMAGE, 36)), "gradcam", target=clip_target if name == "CLIPModel" else None)


def test_siglip_tower_without_head_is_refused():
    with pytest.raises(gmar.UnsupportedModelError, match="no attention-pooling head") as error:
        gmar.get_adapter(make_hf_clip("SiglipVisionModel", vision_use_head=False))
    assert "\n" not in str(error.value)


# --------------------------------------------------------------------------------------- text prompts


def text_embeddings(net, **tokens) -> torch.Tensor:
    with torch.no_grad():
        return net.get_text_features(**tokens).pooler_output


def test_text_target_with_a_clip_tokenizer():
    """Each prompt embedded alone (no padding at all) by ``get_text_features``: padding must not matter."""
    net = model("CLIPModel")
    target = gmar.TextTarget(net, tokenizer(), PROMPTS)
    alone = torch.cat([text_embeddings(net, **tokenizer()([p], return_tensors="pt")) for p in PROMPTS])
    assert_close(target.embeddings, F.normalize(alone, dim=-1), **TOL)
    images = batch(3)
    exp = gmar.explain(net, images, "legrad", target=target)
    with torch.no_grad():
        image_embeddings = net.get_image_features(pixel_values=images).pooler_output
    assert_close(exp.scores, F.cosine_similarity(image_embeddings, alone, dim=-1), **TOL)
    assert exp.prompts == PROMPTS


def test_text_target_with_a_processor():
    from transformers import CLIPImageProcessor, CLIPProcessor

    net = model("CLIPModel")
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(), tokenizer=tokenizer())
    expected = gmar.TextTarget(net, tokenizer(), PROMPTS).embeddings
    assert_close(gmar.TextTarget(net, processor, PROMPTS).embeddings, expected)


def test_text_target_pads_siglip_prompts_to_the_full_length():
    """SigLIP was trained on prompts padded to the text tower's length (16 here) and pools the last token."""
    net = model("hf_siglip")
    target = gmar.TextTarget(net, tokenizer(), PROMPTS)
    full = tokenizer()(PROMPTS, padding="max_length", max_length=16, return_tensors="pt")
    assert full["input_ids"].shape == (3, 16)
    expected = F.normalize(text_embeddings(net, **full), dim=-1)
    assert_close(target.embeddings, expected, **TOL)
    longest = F.normalize(text_embeddings(net, **tokenizer()(PROMPTS, padding=True, return_tensors="pt")), dim=-1)
    assert not torch.allclose(longest, expected, atol=1e-3), "the padding must matter for this check to mean anything"
    exp = gmar.explain(net, batch(3), "legrad", target=target)
    assert_close(exp.scores, F.cosine_similarity(exp.logits, expected, dim=-1), **TOL)


def test_text_target_needs_a_text_tower():
    with pytest.raises(gmar.TargetError, match="no text tower"):
        gmar.TextTarget(model("CLIPVisionModel"), tokenizer(), "a cat")


# ------------------------------------------------------------------------------------ loader and CLI


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from transformers import CLIPImageProcessor

    path = tmp_path_factory.mktemp("tiny-hf-clip")
    make_hf_clip().save_pretrained(path)
    tokenizer().save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": IMAGE}, crop_size=IMAGE).save_pretrained(path)
    return path


def test_loader_builds_the_whole_clip_model_with_its_tokenizer(clip_dir):
    loaded = gmar.load_model(f"hf:{clip_dir}")
    assert type(loaded.model).__name__ == "CLIPModel"
    assert loaded.class_names is None and loaded.preprocess.input_size == (IMAGE, IMAGE)
    assert loaded.extras["tokenizer"](["a cat"])["input_ids"] == tokenizer()(["a cat"])["input_ids"]
    assert_close(loaded.model.visual_projection.weight, make_hf_clip().visual_projection.weight)


def test_cli_explains_a_prompt(clip_dir, tmp_path, capsys):
    image = tmp_path / "room.png"
    Image.fromarray(np.random.default_rng(4).integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(image)
    out = tmp_path / "out"
    code = main(["explain", str(image), "--model", f"hf:{clip_dir}", "--prompt", "a cat", "--method", "legrad,gmar",
                 "--out", str(out), "--save-maps"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    loaded = gmar.load_model(f"hf:{clip_dir}")
    images = gmar.preprocess([gmar.load_image(image)], loaded.preprocess)
    target = gmar.TextTarget(loaded.model, tokenizer(), "a cat")
    for method in ("legrad", "gmar"):
        expected = gmar.explain(loaded.model, images, method, target=target).heatmap[0].numpy()
        np.testing.assert_allclose(np.load(out / f"room.png_a-cat_{method}.npy"), expected, **FLOAT32)


@pytest.mark.parametrize("name", ["CLIPModel", "hf_siglip"])
def test_text_target_warns_about_a_prompt_cut_to_the_text_tower(name):
    """The tower reads 16 positions here; transformers' tokenizer truncates silently."""
    import warnings

    long = "a photo of a cat sitting on a red sofa next to a window in the afternoon sun"
    count = len(tokenizer()(long)["input_ids"])
    assert count > 16
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gmar.TextTarget(model(name), tokenizer(), [long, "a cat"])
    messages = [str(w.message) for w in caught if issubclass(w.category, gmar.GmarWarning)]
    assert messages == [
        f'prompt 0 ("{long[:39]}…") is {count} tokens long, but the text tower reads 16: '
        "only its first 16 tokens are explained"
    ]
