"""Text-prompt targets (``gmar.TextTarget``) on a tiny OpenCLIP CLIP with the real BPE tokenizer.

Every expectation is computed here by hand: the text embeddings with ``model.encode_text`` under
``torch.no_grad()``, the scores as cosine similarities with ``model.encode_image``, and the maps of a
prompt as those of a hand-written cosine target.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import gmar
from conftest import IMAGE, clip_target, clip_tokenizer, make_clip_with_text, make_timm
from tolerance import FLOAT32

TOL = FLOAT32
GRADIENT_METHODS = ["gmar", "grad_rollout", "gae", "legrad", "gradcam"]
AGNOSTIC_METHODS = ["rollout", "raw_attention"]
PROMPTS = ["a photo of a cat", "a remote control", "a dog on the grass"]


@functools.cache
def model() -> torch.nn.Module:
    return make_clip_with_text()


@functools.cache
def tokenizer():
    return clip_tokenizer()


@functools.cache
def images(count: int = 3, seed: int = 11) -> torch.Tensor:
    return torch.randn(count, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed))


def image() -> torch.Tensor:
    return images(1, seed=12)


@functools.cache
def text_embedding(prompt: str) -> torch.Tensor:
    """``(D,)`` the prompt's text embedding, not normalised, computed here."""
    with torch.no_grad():
        return model().encode_text(tokenizer()([prompt]))[0]


def cosine_target(*prompts: str):
    """A hand-written target: row ``b`` of the image embeddings against prompt ``b`` (or the only prompt)."""
    texts = torch.stack([text_embedding(p) for p in prompts])

    def target(embedding: torch.Tensor) -> torch.Tensor:
        return F.cosine_similarity(embedding, texts.expand_as(embedding), dim=-1)

    return target


def image_embeddings(batch: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model().encode_image(batch)


def cosines(batch: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    texts = torch.stack([text_embedding(p) for p in prompts])
    embeddings = image_embeddings(batch)
    return F.cosine_similarity(embeddings, texts.expand_as(embeddings), dim=-1)


@functools.cache
def text_target(*prompts: str) -> gmar.TextTarget:
    return gmar.TextTarget(model(), tokenizer(), list(prompts))


@functools.cache
def reference(method: str, prompt: str, index: int | None = None) -> torch.Tensor:
    """The map of one image (``image()``, or ``images()[index]``) for one prompt, via a hand-written
    cosine target."""
    one = image() if index is None else images()[index : index + 1]
    return gmar.explain(model(), one, method, target=cosine_target(prompt)).token_map[0]


def assert_differs(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    gap = (a - b).abs().max() / a.abs().max().clamp_min(1e-12)
    assert gap > 0.02, f"{what} (relative gap {gap:.3g})"


# ------------------------------------------------------------------------------------------ TextTarget itself


def test_embeddings_are_normalised_text_embeddings():
    target = gmar.TextTarget(model(), tokenizer(), PROMPTS)
    assert target.prompts == PROMPTS
    with torch.no_grad():
        expected = model().encode_text(tokenizer()(PROMPTS))
    expected = expected / expected.norm(dim=-1, keepdim=True)
    assert target.embeddings.shape == (3, expected.shape[-1])
    assert_close(target.embeddings.norm(dim=-1), torch.ones(3), **TOL)
    assert_close(target.embeddings, expected, **TOL)
    assert not target.embeddings.requires_grad and target.embeddings.grad_fn is None
    assert not torch.allclose(target.embeddings[0], target.embeddings[1], atol=1e-3)


def test_one_prompt_string():
    target = gmar.TextTarget(model(), tokenizer(), "a photo of a cat")
    assert target.prompts == ["a photo of a cat"]
    assert target.embeddings.shape[0] == 1
    assert_close(target.embeddings[0], F.normalize(text_embedding("a photo of a cat"), dim=0), **TOL)


def test_call_is_the_cosine_similarity():
    dim = text_embedding(PROMPTS[0]).shape[0]
    embedding = torch.randn(3, dim, generator=torch.Generator().manual_seed(2)) * 5.0
    texts = torch.stack([text_embedding(p) for p in PROMPTS])
    one = text_target(PROMPTS[1])
    assert_close(one(embedding), F.cosine_similarity(embedding, texts[1:2].expand(3, -1), dim=-1), **TOL)
    several = text_target(*PROMPTS)
    assert_close(several(embedding), F.cosine_similarity(embedding, texts, dim=-1), **TOL)
    # row p against prompt p, not every row against one prompt
    assert not torch.allclose(several(embedding), one(embedding), atol=1e-3)


def test_call_needs_one_embedding_per_prompt():
    dim = text_embedding(PROMPTS[0]).shape[0]
    with pytest.raises(gmar.TargetError):
        text_target(*PROMPTS)(torch.randn(2, dim))


def test_prepare_images():
    one, three = image(), images()
    several = text_target(*PROMPTS)
    repeated = several.prepare_images(one)
    assert repeated.shape == (3, 3, IMAGE, IMAGE)
    for p in range(3):
        assert torch.equal(repeated[p], one[0])
    assert torch.equal(several.prepare_images(three), three)
    assert torch.equal(text_target(PROMPTS[0]).prepare_images(three), three)
    assert torch.equal(text_target(PROMPTS[0]).prepare_images(one), one)
    with pytest.raises(gmar.TargetError, match=r"2 prompts.*3 images"):
        text_target(*PROMPTS[:2]).prepare_images(three)
    with pytest.raises(gmar.TargetError):
        several.prepare_images(images(2))


def test_model_without_encode_text_is_refused():
    with pytest.raises(gmar.TargetError, match="encode_text"):
        gmar.TextTarget(make_timm(), tokenizer(), "a photo of a cat")
    with pytest.raises(gmar.TargetError):
        gmar.TextTarget(torch.nn.Linear(2, 2), tokenizer(), ["a photo of a cat"])


def test_empty_prompt_list_is_refused():
    with pytest.raises(gmar.TargetError):
        gmar.TextTarget(model(), tokenizer(), [])


def test_modes_restored_and_text_embedded_in_eval_mode():
    net = copy.deepcopy(model())
    net.train()
    net.transformer.resblocks[0].eval()  # a mixed state to restore
    params = list(net.parameters())
    params[0].requires_grad_(False)
    modes = [m.training for m in net.modules()]
    flags = [p.requires_grad for p in params]
    seen = []
    handle = net.transformer.register_forward_pre_hook(lambda module, args: seen.append(module.training))
    try:
        target = gmar.TextTarget(net, tokenizer(), PROMPTS[:2])
    finally:
        handle.remove()
    assert seen == [False], "the text tower must run in eval mode"
    assert [m.training for m in net.modules()] == modes
    assert [p.requires_grad for p in params] == flags
    assert all(p.grad is None for p in params)
    assert not target.embeddings.requires_grad

    exp = gmar.explain(net, image(), "gmar", target=target)
    assert len(exp) == 2
    assert [m.training for m in net.modules()] == modes
    assert [p.requires_grad for p in params] == flags
    assert all(p.grad is None for p in params)


def test_constructed_under_inference_mode():
    """Built under inference mode, used for explanations outside it."""
    with torch.inference_mode():
        target = gmar.TextTarget(model(), tokenizer(), PROMPTS)
    expected = torch.stack([F.normalize(text_embedding(p), dim=0) for p in PROMPTS])
    assert_close(target.embeddings, expected, **TOL)
    for method in ("gmar", "legrad"):
        exp = gmar.explain(model(), image(), method, target=target)
        for p, prompt in enumerate(PROMPTS):
            assert_close(exp.token_map[p], reference(method, prompt), **TOL)
        assert_close(exp.scores, cosines(image().expand(3, -1, -1, -1), PROMPTS), **TOL)
    assert not target.embeddings.is_inference()


def test_used_under_inference_mode():
    """Built normally, used for an explanation called under inference mode."""
    target = gmar.TextTarget(model(), tokenizer(), PROMPTS)
    with torch.inference_mode():
        exp = gmar.explain(model(), image(), "gae", target=target)
    for p, prompt in enumerate(PROMPTS):
        assert_close(exp.token_map[p], reference("gae", prompt), **TOL)


# --------------------------------------------------------------------------------- every gradient method


@pytest.mark.parametrize("method", GRADIENT_METHODS)
def test_one_prompt_many_images(method):
    prompt = PROMPTS[0]
    exp = gmar.explain(model(), images(), method, target=text_target(prompt))
    own = gmar.explain(model(), images(), method, target=cosine_target(prompt))
    assert exp.token_map.shape == (3, 4, 4)
    assert_close(exp.token_map, own.token_map, **TOL)
    assert_close(exp.scores, cosines(images(), [prompt]), **TOL)
    assert exp.prompts == [prompt] * 3
    assert exp.target is None
    for i in range(3):
        single = gmar.explain(model(), images()[i : i + 1], method, target=text_target(prompt))
        assert_close(single.token_map[0], exp.token_map[i], **TOL)
        assert single.prompts == [prompt]
    assert (exp.token_map > 0).any(dim=(1, 2)).all()


@pytest.mark.parametrize("method", GRADIENT_METHODS)
def test_many_prompts_one_image(method):
    exp = gmar.explain(model(), image(), method, target=text_target(*PROMPTS))
    assert exp.token_map.shape == (3, 4, 4) and exp.heatmap.shape == (3, IMAGE, IMAGE)
    assert exp.prompts == PROMPTS
    for p, prompt in enumerate(PROMPTS):
        assert_close(exp.token_map[p], reference(method, prompt), **TOL)
    assert_close(exp.scores, cosines(image().expand(3, -1, -1, -1), PROMPTS), **TOL)
    assert_close(exp.logits, image_embeddings(image()).expand(3, -1), **TOL)


@pytest.mark.parametrize("method", GRADIENT_METHODS)
def test_prompts_pair_with_images(method):
    exp = gmar.explain(model(), images(), method, target=text_target(*PROMPTS))
    assert exp.prompts == PROMPTS
    for i, prompt in enumerate(PROMPTS):
        assert_close(exp.token_map[i], reference(method, prompt, i), **TOL)
    assert_close(exp.scores, cosines(images(), PROMPTS), **TOL)
    # the pairing is image i with prompt i, not a rotation of it
    assert_differs(exp.token_map[0], reference(method, PROMPTS[1], 0), "image 0 paired with another prompt")


@pytest.mark.parametrize("method", GRADIENT_METHODS + AGNOSTIC_METHODS)
def test_prompt_count_must_match_the_images(method):
    with pytest.raises(gmar.TargetError, match=r"2 prompts.*3 images"):
        gmar.explain(model(), images(), method, target=text_target(*PROMPTS[:2]))


@pytest.mark.parametrize("method", GRADIENT_METHODS)
def test_different_prompts_give_different_maps(method):
    maps = [reference(method, prompt) for prompt in PROMPTS]
    exp = gmar.explain(model(), image(), method, target=text_target(*PROMPTS))
    for i in range(3):
        for j in range(i):
            assert_differs(maps[i], maps[j], f"prompts {j} and {i} give the same {method} map")
            assert_differs(exp.token_map[i], exp.token_map[j], f"prompts {j} and {i} give the same {method} map")


# ------------------------------------------------------------------------------------ class-agnostic methods


@pytest.mark.parametrize("method", AGNOSTIC_METHODS)
def test_class_agnostic_methods_ignore_the_prompt(method):
    none = gmar.explain(model(), image(), method)
    assert none.scores is None and none.target is None and none.prompts is None
    exp = gmar.explain(model(), image(), method, target=text_target(*PROMPTS))
    assert exp.token_map.shape == (3, 4, 4)
    assert exp.prompts == PROMPTS
    assert_close(exp.scores, cosines(image().expand(3, -1, -1, -1), PROMPTS), **TOL)
    for p in range(3):
        assert torch.equal(exp.token_map[p], none.token_map[0])
    for prompt in PROMPTS:
        single = gmar.explain(model(), image(), method, target=text_target(prompt))
        assert torch.equal(single.token_map, none.token_map)
    assert (none.token_map > 0).all()


# ---------------------------------------------------------------------------------------- non-text targets


def test_prompts_is_none_for_other_targets():
    assert gmar.explain(model(), images(), "gmar", target=cosine_target(PROMPTS[0])).prompts is None
    assert gmar.explain(model(), images(), "legrad", target=clip_target).prompts is None
    timm_images = torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(4))
    assert gmar.explain(make_timm(), timm_images, "gradcam").prompts is None


@pytest.mark.parametrize("prompts", ["", "   ", ["a cat", ""], ["a cat", "\n\t"]])
def test_an_empty_prompt_is_refused(prompts):
    with pytest.raises(gmar.TargetError, match=r"^prompt \d is empty: give the text to explain") as caught:
        gmar.TextTarget(model(), tokenizer(), prompts)
    assert "\n" not in str(caught.value)


def test_a_prompt_longer_than_the_text_tower_is_warned_about_once():
    """OpenCLIP cuts a prompt to the context length (77 here) silently; gmar says so, naming the prompt."""
    import warnings

    long = " ".join(["a very small and slightly blurry photo of a cat"] * 10)
    count = len(tokenizer().encode(long)) + 2  # with the start and end tokens
    assert count > 77
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gmar.TextTarget(model(), tokenizer(), ["a cat", long, "a dog"])
    messages = [str(w.message) for w in caught if issubclass(w.category, gmar.GmarWarning)]
    assert messages == [
        f'prompt 1 ("{long[:39]}…") is {count} tokens long, but the text tower reads 77: '
        "only its first 77 tokens are explained"
    ]
    assert caught[0].filename == __file__


def test_prompts_that_fit_give_no_warning():
    import warnings

    fits = " ".join(["cat"] * 75)  # 75 tokens and the start and end tokens: exactly 77
    assert len(tokenizer().encode(fits)) == 75
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gmar.TextTarget(model(), tokenizer(), [fits, "a dog"])
