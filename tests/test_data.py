"""The synthetic scenes: deterministic, split-disjoint, exact masks, every class and count present."""

from __future__ import annotations

import collections
import functools

import pytest
import torch

from gmar.eval.scenes import CLASSES, FILLS, Scenes


@functools.cache
def sample(split: str = "test", count: int = 300) -> list:
    return list(Scenes(split, count))


def test_scenes_are_a_pure_function_of_seed_split_and_index():
    a, b = Scenes("test", 20)[7], Scenes("test", 20)[7]
    assert torch.equal(a.image, b.image) and torch.equal(a.masks, b.masks) and torch.equal(a.labels, b.labels)
    # The size of the split does not change a scene; another seed does.
    assert torch.equal(Scenes("test", 500)[7].image, a.image)
    assert not torch.equal(Scenes("test", 20, seed=1)[7].image, a.image)
    assert Scenes("test", 20)[-1].index == 19


def test_train_and_test_do_not_share_scenes():
    train = torch.stack([s.image for s in sample("train", 100)]).flatten(1)
    test = torch.stack([s.image for s in sample("test", 100)]).flatten(1)
    distances = torch.cdist(train, test)
    assert distances.min() > 1.0, "no test scene may repeat a train scene"


def test_labels_and_masks_agree():
    counts = collections.Counter()
    classes = collections.Counter()
    for scene in sample():
        present = scene.classes
        assert 1 <= len(present) <= 3 and len(set(present)) == len(present)
        assert scene.image.shape == (3, 64, 64) and scene.image.dtype == torch.float32
        assert 0.0 <= float(scene.image.min()) and float(scene.image.max()) <= 1.0
        for cls in range(len(CLASSES)):
            area = int(scene.masks[cls].sum())
            assert (area > 0) == (cls in present), "a mask exactly for each present class"
        # Objects never overlap, and never touch (one free pixel around each).
        total = scene.masks.sum(dim=0)
        assert int(total.max()) <= 1
        for cls in present:
            mask = scene.masks[cls]
            rows, cols = torch.nonzero(mask, as_tuple=True)
            extent = max(int(rows.max() - rows.min()), int(cols.max() - cols.min())) + 1
            assert extent >= 14, "objects span about two 8-pixel patches or more"
            # A solid object is one colour (plus faint noise); a patterned one shows two colours.
            pixels = scene.image[:, mask]
            if FILLS[CLASSES[cls]] == "solid":
                assert float(pixels.std(dim=1).max()) < 0.05
            else:
                assert float(pixels.std(dim=1).max()) > 0.15
        counts[len(present)] += 1
        classes.update(present)
    assert set(counts) == {1, 2, 3}
    assert set(classes) == set(range(len(CLASSES))) and len(CLASSES) >= 6
    assert len(set(FILLS.values())) >= 4
    assert min(classes.values()) > 0.1 * sum(classes.values()) / len(CLASSES)


def test_clutter_is_there_and_is_no_object():
    """Pixels off every mask vary (clutter, ramps) but hold no class: they are not in any mask."""
    scene = sample()[0]
    background = ~scene.masks.any(dim=0)
    assert int(background.sum()) > 0.5 * 64 * 64
    pixels = scene.image[:, background]
    # Clutter strokes make the background far from flat.
    assert float((pixels - pixels.median(dim=1, keepdim=True).values).abs().amax()) > 0.2


def test_batch_and_errors():
    images, labels, masks = Scenes("test", 10).batch([3, 1])
    assert images.shape == (2, 3, 64, 64) and labels.shape == (2, len(CLASSES)) and masks.shape == (2, 6, 64, 64)
    assert torch.equal(images[0], Scenes("test", 10)[3].image)
    with pytest.raises(ValueError, match="split"):
        Scenes("val")
    with pytest.raises(ValueError, match="non-negative"):
        Scenes("test", -1)
    with pytest.raises(IndexError):
        Scenes("test", 3)[3]
    assert Scenes("test", 5, image_size=96)[0].image.shape == (3, 96, 96)


def test_a_scene_without_one_object_changes_only_that_objects_pixels():
    """``Scenes.without`` re-renders a scene with one object left out: label 0, mask empty, every
    pixel off that object as in the scene, and the object's own pixels no longer the object's."""
    scenes = Scenes("test", 40)
    removals = 0
    for scene in sample()[:40]:
        for cls in scene.classes:
            left = scenes.without(scene.index, cls)
            kept = [c for c in scene.classes if c != cls]
            assert left.classes == kept and left.index == scene.index
            assert not left.masks[cls].any()
            assert torch.equal(left.masks[kept], scene.masks[kept])
            off = ~scene.masks[cls]
            assert torch.equal(left.image[:, off], scene.image[:, off])
            changed = (left.image - scene.image).abs().amax(dim=0)[scene.masks[cls]] > 0.1
            assert float(changed.float().mean()) > 0.5, "where the object was, most pixels are no longer it"
            removals += 1
    assert removals > 40
    # The scene itself is unchanged by having rendered it without an object.
    assert torch.equal(scenes[0].image, sample()[0].image)


def test_leaving_out_an_absent_class_is_an_error():
    scene = sample()[0]
    absent = next(c for c in range(len(CLASSES)) if c not in scene.classes)
    with pytest.raises(ValueError, match=f"scene 0 holds no {CLASSES[absent]} to leave out; it holds"):
        Scenes("test", 5).without(0, absent)
    with pytest.raises(IndexError):
        Scenes("test", 3).without(3, scene.classes[0])
