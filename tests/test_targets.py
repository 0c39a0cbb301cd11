from __future__ import annotations

import numpy as np
import pytest
import torch

import gmar
from conftest import make_timm
from gmar.targets import resolve_target

LOGITS = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 0.5]], requires_grad=True)


def test_default_is_the_predicted_class():
    scores, classes = resolve_target(LOGITS, None)
    assert classes.tolist() == [1, 0]
    torch.testing.assert_close(scores, torch.tensor([2.0, 3.0]))


def test_int_sequence_tensor_and_callable():
    assert resolve_target(LOGITS, 2)[1].tolist() == [2, 2]
    assert resolve_target(LOGITS, [2, 1])[1].tolist() == [2, 1]
    assert resolve_target(LOGITS, torch.tensor([0, 2]))[1].tolist() == [0, 2]
    scores, classes = resolve_target(LOGITS, lambda out: out[:, 0] - out[:, 2])
    assert classes is None
    torch.testing.assert_close(scores, torch.tensor([1.1, 2.5]))


@pytest.mark.parametrize(
    ("target", "message"),
    [
        (3, r"\[0, 3\)"),
        (-1, r"\[0, 3\)"),
        ([0, 1, 2], "2 integer"),
        (torch.tensor([0.5, 1.0]), "integer"),
        (True, "bool"),
        (lambda out: out, r"shape \(2,\)"),
        ("cat", "not a string"),
    ],
)
def test_bad_targets_are_explained(target, message):
    with pytest.raises(gmar.TargetError, match=message):
        resolve_target(LOGITS, target)


def test_explicit_targets_change_the_gradient_maps(images):
    model = make_timm()
    a = gmar.explain(model, images, method="gmar", target=0)
    b = gmar.explain(model, images, method="gmar", target=[1, 2, 3, 4])
    assert a.target.tolist() == [0, 0, 0, 0] and b.target.tolist() == [1, 2, 3, 4]
    assert (a.token_map - b.token_map).abs().amax(dim=(1, 2)).min() > 1e-4
    torch.testing.assert_close(a.scores, a.logits[:, 0])


def test_detached_callable_target_is_refused(images):
    with pytest.raises(gmar.TargetError, match="do not depend"):
        gmar.explain(make_timm(), images, method="gae", target=lambda out: out.detach()[:, 0])


@pytest.mark.parametrize(
    "target",
    [np.int64(2), np.int32(2), np.uint8(2), torch.tensor(2), torch.tensor(2, dtype=torch.int32), np.array(2)],
    ids=["np.int64", "np.int32", "np.uint8", "tensor", "tensor_int32", "ndarray"],
)
def test_any_integral_scalar_is_one_class_for_every_sample(target):
    scores, classes = resolve_target(LOGITS, target)
    assert classes.tolist() == [2, 2] and classes.dtype == torch.long
    torch.testing.assert_close(scores, LOGITS[:, 2])


@pytest.mark.parametrize(
    ("target", "message"),
    [
        (np.bool_(True), "bool"),
        (torch.tensor(True), "bool"),
        (torch.tensor(1.0), "integer"),
        (np.float64(1.0), "integer"),
        (np.int64(3), r"\[0, 3\)"),
        (torch.tensor(-1), r"\[0, 3\)"),
    ],
)
def test_scalars_that_are_no_class_index_are_refused(target, message):
    with pytest.raises(gmar.TargetError, match=message):
        resolve_target(LOGITS, target)
