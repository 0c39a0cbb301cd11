"""Explaining from several threads: one model's calls are serialised, two models' calls are not.

Every call made from two threads must give what the same call gives alone, and the model must be
left exactly as it was found (hooks, instance attributes, modes, ``requires_grad``, ``.grad``,
fused-attention flags, attention implementation).
"""

from __future__ import annotations

import gc
import threading
import weakref

import pytest
import torch
from torch import nn

import gmar
from conftest import IMAGE, clip_target, make_clip, make_hf_vit, make_timm
from gmar.capture import model_lock
from test_capture import unusual_state
from tolerance import FLOAT32

METHODS = gmar.available_methods()
CALLS = 20


def full_state(model: nn.Module) -> dict:
    """Everything about ``model`` that an explanation may touch, except the weights' values."""
    modules = {}
    for name, module in model.named_modules():
        modules[name] = {
            "training": module.training,
            "attributes": sorted(module.__dict__),
            "hooks": {
                kind: list(getattr(module, kind))
                for kind in (
                    "_forward_hooks",
                    "_forward_hooks_with_kwargs",
                    "_forward_hooks_always_called",
                    "_forward_pre_hooks",
                    "_forward_pre_hooks_with_kwargs",
                    "_backward_hooks",
                    "_backward_pre_hooks",
                )
            },
            "fused_attn": getattr(module, "fused_attn", None),
        }
    parameters = {name: (p.requires_grad, p.grad is None) for name, p in model.named_parameters()}
    config = getattr(model, "config", None)
    implementation = None if config is None else config._attn_implementation
    return {"modules": modules, "parameters": parameters, "attn_implementation": implementation}


def batch(index: int) -> torch.Tensor:
    return torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(100 + index))


def job(family: str, thread: int, call: int, methods: list[str] = METHODS) -> tuple[str, int, object]:
    """Call ``call`` of thread ``thread``: the two threads run different methods side by side (of
    ``methods``, those the model supports)."""
    method = methods[(call + 3 * thread) % len(methods)]
    images = (call + thread) % 4
    target = clip_target if family == "openclip" else (call + thread) % 5
    return method, images, target


def explain(model: nn.Module, method: str, images: int, target: object) -> gmar.Explanation:
    return gmar.explain(model, batch(images), method=method, target=target)


def assert_same_explanation(got: gmar.Explanation, want: gmar.Explanation) -> None:
    assert got.method == want.method
    for field in ("heatmap", "token_map", "target", "head_weights", "logits", "scores"):
        a, b = getattr(got, field), getattr(want, field)
        assert (a is None) == (b is None), field
        if a is not None:
            torch.testing.assert_close(a, b, **FLOAT32, msg=lambda m, f=field: f"{f}: {m}")


FAMILIES = {"timm": make_timm, "hf": make_hf_vit, "openclip": make_clip}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_two_threads_on_one_model_give_the_single_threaded_results(family):
    model = unusual_state(FAMILIES[family]())
    before = full_state(model)
    methods = [m for m in METHODS if m in gmar.supported_methods(model) or m == "occlusion"]
    jobs = [job(family, thread, call, methods) for thread in range(2) for call in range(CALLS)]
    alone = {key: explain(model, *key) for key in set(jobs)}
    assert full_state(model) == before

    results: dict[int, list] = {0: [], 1: []}
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def worker(thread: int) -> None:
        start.wait()
        for call in range(CALLS):
            key = job(family, thread, call, methods)
            try:
                results[thread].append((key, explain(model, *key)))
            except BaseException as error:  # every failure is reported below
                errors.append(error)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert not errors, f"{len(errors)} of {2 * CALLS} calls failed, first: {errors[0]!r}"
    assert sum(len(r) for r in results.values()) == 2 * CALLS
    for key, explanation in results[0] + results[1]:
        assert_same_explanation(explanation, alone[key])
    assert full_state(model) == before


def test_a_model_is_serialised_and_another_model_is_not():
    first, second = make_timm(), make_timm()
    images = batch(0)
    done = {name: threading.Event() for name in ("first", "second")}

    def run(model: nn.Module, name: str) -> None:
        gmar.explain(model, images, method="gmar")
        done[name].set()

    with model_lock(first):  # another thread explaining `first` holds its lock
        other = threading.Thread(target=run, args=(second, "second"))
        blocked = threading.Thread(target=run, args=(first, "first"))
        other.start()
        blocked.start()
        assert done["second"].wait(timeout=60), "a call on another model waited for this model's lock"
        assert not done["first"].wait(timeout=0.5), "a call on the locked model ran while the lock was held"
    assert done["first"].wait(timeout=60)
    other.join()
    blocked.join()


def test_the_lock_is_reentrant_and_belongs_to_the_module_under_torch_compile():
    model = make_timm()
    compiled = torch.compile(model)  # wraps only: nothing is compiled until it is called
    with model_lock(compiled):
        # the same thread may explain (and so take the lock again) while holding it
        explanation = gmar.explain(compiled, batch(0), method="rollout")
        assert explanation.heatmap.shape == (2, IMAGE, IMAGE)
        acquired = []
        probe = threading.Thread(target=lambda: acquired.append(_try_lock(model)))
        probe.start()
        probe.join()
        assert acquired == [False], "the compiled wrapper and its module must share one lock"
    assert _try_lock(model)


def _try_lock(model: nn.Module) -> bool:
    from gmar.capture import lock_for

    lock = lock_for(model)
    if lock.acquire(blocking=False):
        lock.release()
        return True
    return False


def test_locks_do_not_keep_models_alive():
    model = make_timm()
    with model_lock(model):
        pass
    reference = weakref.ref(model)
    del model
    gc.collect()
    assert reference() is None


def test_text_targets_made_while_another_thread_explains():
    from conftest import clip_tokenizer, make_clip_with_text

    model = unusual_state(make_clip_with_text())
    tokenizer = clip_tokenizer()
    target = gmar.TextTarget(model, tokenizer, "a photo of a cat")
    before = full_state(model)
    want = gmar.explain(model, batch(0), method="gmar", target=target)
    embeddings = target.embeddings.clone()
    errors: list[BaseException] = []
    made: list[gmar.TextTarget] = []

    def explaining() -> None:
        for _ in range(CALLS):
            try:
                assert_same_explanation(gmar.explain(model, batch(0), method="gmar", target=target), want)
            except BaseException as error:  # every failure is reported below
                errors.append(error)

    def embedding() -> None:
        for _ in range(CALLS):
            try:
                made.append(gmar.TextTarget(model, tokenizer, "a photo of a cat"))
            except BaseException as error:  # every failure is reported below
                errors.append(error)

    threads = [threading.Thread(target=explaining), threading.Thread(target=embedding)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, f"{len(errors)} calls failed, first: {errors[0]!r}"
    assert len(made) == CALLS
    for other in made:
        torch.testing.assert_close(other.embeddings, embeddings, **FLOAT32)
    assert full_state(model) == before
