"""gmar.methods.base.forward_pass, the one captured forward pass every method's call runs."""

from __future__ import annotations

import threading

import pytest
import torch

import gmar
from conftest import make_timm
from gmar.capture import lock_for
from gmar.methods.base import forward_pass
from test_capture import assert_same, snapshot, unusual_state


def test_the_block_sees_the_capture_and_the_scores(images):
    explainer = gmar.GMAR(make_timm())
    inputs, layout = explainer.inputs(images)
    with forward_pass(explainer.adapter, inputs, layout, None, gradients=True, capture_options={}) as run:
        assert len(run.captured.attentions) == explainer.adapter.num_layers
        assert run.captured.stream is not None and run.scores.requires_grad
        assert run.classes.tolist() == run.captured.output.argmax(dim=-1).tolist()
    with forward_pass(explainer.adapter, inputs, layout, capture_options=None, needs_target=True) as run:
        assert run.captured.attentions == [] and run.scores is not None and not run.scores.requires_grad
    with forward_pass(explainer.adapter, inputs, layout, capture_options={}, scored=False) as run:
        assert run.scores is None and run.classes is None


def test_the_model_is_left_as_found_when_the_block_raises(images):
    model = unusual_state(make_timm())
    before = snapshot(model)
    explainer = gmar.GAE(model)
    inputs, layout = explainer.inputs(images)
    with pytest.raises(RuntimeError, match="inside"):
        with forward_pass(explainer.adapter, inputs, layout, gradients=True, capture_options={}) as run:
            assert all(not p.requires_grad for p in model.parameters()) and not model.training
            raise RuntimeError("inside")
    assert_same(before, snapshot(model))
    assert run.captured.stream._inputs == [None] * explainer.adapter.num_layers  # closed: the graph is freed
    acquired = []

    def take() -> None:
        lock = lock_for(model)
        acquired.append(lock.acquire(timeout=5))
        if acquired[-1]:
            lock.release()

    taken = threading.Thread(target=take)
    taken.start()
    taken.join(timeout=10)
    assert acquired == [True]  # another thread can take the model's lock: it was released
    assert torch.isfinite(gmar.explain(model, images, "gae").heatmap).all()
