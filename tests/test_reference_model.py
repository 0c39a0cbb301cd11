"""The reference ViT shipped with gmar: loads offline, is what its card says, and is accurate."""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path

import pytest
import torch

import gmar
from gmar.eval.reference import CARD, CHECKPOINT, ReferenceConfig, build_reference_model, exact_set_accuracy
from gmar.eval.scenes import CLASSES, Scenes

ASSETS = Path(str(resources.files("gmar") / "assets"))


def test_checkpoint_is_small_and_loads_without_network(monkeypatch):
    import socket

    def no_network(*args, **kwargs):
        raise OSError("network is off in this test")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    assert (ASSETS / CHECKPOINT).stat().st_size <= 10 * 2**20
    model = gmar.load_reference_model()
    assert not model.training
    assert model.patch_embed.grid_size == (8, 8) and len(model.blocks) >= 4 and model.blocks[0].attn.num_heads >= 4
    assert gmar.get_adapter(model).class_names() == list(CLASSES)
    config = gmar.preprocess_config(model)
    assert config.input_size == (64, 64) and config.mean == (0.0,) * 3 and config.std == (1.0,) * 3


def test_the_card_states_config_seed_command_and_accuracy():
    from safetensors import safe_open

    with safe_open(str(ASSETS / CHECKPOINT), framework="pt") as handle:
        metadata = handle.metadata()
    config, report = json.loads(metadata["config"]), json.loads(metadata["report"])
    card = (ASSETS / CARD).read_text()
    assert "gmar train-reference" in card and f"seed {config['seed']}" in card
    assert f"{report['test_exact_set_accuracy']:.4f}" in card and re.search(r"Date: \d{4}-\d\d-\d\d", card)
    # The goal: at least 95 % exact-set accuracy on the test split.
    assert report["test_exact_set_accuracy"] >= 0.95 and report["test_scenes"] >= 1000
    # Its other goal, 20 minutes on 2 cores, depends on the machine (and on what else runs there):
    # a unit test does not pin a time. The card states the measured time and threads, as trained.
    assert f"{report['train_seconds']:.1f} s wall clock with {report['threads']} CPU threads" in card


def test_reference_accuracy_on_the_test_split_is_the_cards():
    """The shipped model, measured again here on the card's test scenes, gives the card's figure."""
    from safetensors import safe_open

    with safe_open(str(ASSETS / CHECKPOINT), framework="pt") as handle:
        report = json.loads(handle.metadata()["report"])
    measured = exact_set_accuracy(gmar.load_reference_model(), Scenes("test", report["test_scenes"]))
    assert measured >= 0.95
    # to one scene: a logit within rounding of 0 may fall either side on another CPU
    assert abs(measured - report["test_exact_set_accuracy"]) <= 1 / report["test_scenes"] + 1e-9


def test_build_is_seeded_and_the_loader_refuses_a_missing_file(tmp_path):
    a, b = build_reference_model(ReferenceConfig()), build_reference_model(ReferenceConfig())
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    with pytest.raises(gmar.ModelLoadError, match="gmar train-reference"):
        gmar.load_reference_model(tmp_path / "missing.safetensors")


def test_train_reference_runs_a_few_steps(tmp_path):
    from gmar.eval.reference import train_reference

    config = ReferenceConfig(image_size=32, embed_dim=32, depth=2, num_heads=4, train_scenes=64, test_scenes=16,
                             steps=3, batch_size=8, warmup=2)  # fmt: skip
    model, report = train_reference(config, out=tmp_path, progress=False)
    assert 0.0 <= report["test_exact_set_accuracy"] <= 1.0
    loaded = gmar.load_reference_model(tmp_path / CHECKPOINT)
    assert all(
        torch.equal(x, y) for x, y in zip(model.state_dict().values(), loaded.state_dict().values(), strict=True)
    )
    assert "Test exact-set accuracy" in (tmp_path / CARD).read_text()


class _Corners:
    """Two scenes with one object each, in a known patch: what ``_render`` must find."""

    def __init__(self, image_size: int = 32) -> None:
        self.image_size = image_size

    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int):
        from gmar.eval.scenes import Scene

        size = self.image_size
        masks = torch.zeros(len(CLASSES), size, size, dtype=torch.bool)
        labels = torch.zeros(len(CLASSES))
        if index == 0:  # class 2 fills the top-right patch and half of the one below it
            masks[2, 0:8, 24:32] = True
            masks[2, 8:12, 24:32] = True
            labels[2] = 1
        else:  # class 4 covers 3 pixels of the bottom-left patch
            masks[4, 31, 0:3] = True
            masks[4, 32:, :] = True  # outside every patch when the image is 36 px: not counted
            labels[4] = 1
        return Scene(torch.rand(3, size, size), labels, masks, index)


@pytest.mark.parametrize("size", [32, 36])  # 36: a 4x4 grid, the last 4 pixels in no patch
def test_render_gives_each_patch_its_objects_cover_in_token_order(size):
    from gmar.eval.reference import _render

    images, labels, cover = _render(_Corners(size), progress=False, patch=8)
    assert images.dtype == torch.uint8 and labels[0, 2] == 1 and labels[1, 4] == 1
    assert cover.shape == (2, len(CLASSES), 16) and cover.dtype == torch.uint8
    expected = torch.zeros(2, len(CLASSES), 16, dtype=torch.uint8)
    expected[0, 2, 3] = 255  # row 0, column 3: timm's tokens run along rows
    expected[0, 2, 7] = 128  # row 1, column 3: half covered (127.5 rounds to 128)
    expected[1, 4, 12] = round(3 / 64 * 255)  # row 3, column 0
    assert torch.equal(cover, expected)


def test_the_token_loss_labels_patches_from_their_cover_and_follows_the_flip():
    """``_loss`` against a hand computation: BCE of the CLS logits plus BCE of the head on each patch token."""
    import torch.nn.functional as F

    from gmar.eval.reference import _loss

    config = ReferenceConfig(image_size=32, embed_dim=32, depth=2, num_heads=4, token_cover=0.3)
    model = build_reference_model(config).eval()
    batch = torch.rand(2, 3, 32, 32)
    target = torch.zeros(2, len(CLASSES))
    target[0, 2] = target[1, 4] = target[1, 0] = 1
    cover = torch.zeros(2, len(CLASSES), 16, dtype=torch.uint8)
    cover[0, 2, 3] = 255  # labelled, and flipped to column 0 below
    cover[0, 2, 7] = 70  # 27 %: under token_cover, not labelled
    cover[1, 4, 12] = 77  # 30 %: labelled
    flip = torch.tensor([True, False])

    features = model.forward_features(batch)
    logits = features[:, 0] @ model.head.weight.T + model.head.bias
    # each class on its own: no term that ties the present classes' logits together
    cls_loss = F.binary_cross_entropy_with_logits(logits, target)
    tokens = torch.zeros(2, 16, len(CLASSES))
    tokens[0, 0, 2] = 1
    tokens[1, 12, 4] = 1
    patch_logits = features[:, 1:] @ model.head.weight.T + model.head.bias
    token_loss = F.binary_cross_entropy_with_logits(patch_logits, tokens)

    off = _loss(model, batch, target, cover, flip, ReferenceConfig(**{**config.__dict__, "token_loss": 0.0}))
    torch.testing.assert_close(off, cls_loss)
    torch.testing.assert_close(_loss(model, batch, target, cover, flip, config), cls_loss + token_loss)


def test_training_restores_the_attention_flags():
    from gmar.eval.reference import train_reference

    config = ReferenceConfig(image_size=32, embed_dim=32, depth=2, num_heads=4, train_scenes=16, test_scenes=4,
                             steps=2, batch_size=4, warmup=1)  # fmt: skip
    before = [block.attn.fused_attn for block in build_reference_model(config).blocks]
    model, _ = train_reference(config, progress=False)
    assert [block.attn.fused_attn for block in model.blocks] == before and not model.training


def test_the_shipped_model_passes_the_model_check():
    """Removing an object lowers the shipped model's logit of that object's class, and far more than
    the other present classes' (docs/evaluation.md): the batched check against a loop, and its level."""
    from gmar.eval import metrics as M
    from gmar.eval.datasets import scene_items
    from gmar.eval.report import MODEL_CHECK_WARNING

    model = gmar.load_reference_model()
    items = [item for item in scene_items(60) if item.removed is not None]
    images, removed = torch.stack([i.image for i in items]), torch.stack([i.removed for i in items])
    targets = torch.tensor([i.target for i in items])
    own, other, most = M.object_removal(M.Scorer(model), images, removed, targets, [i.other_classes for i in items])
    loop = []
    for item in items:
        with torch.no_grad():
            drop = (model(item.image[None]) - model(item.removed[None]))[0].tolist()
        rest = [drop[c] for c in item.other_classes]
        loop.append((drop[item.target], sum(rest) / len(rest), float(drop[item.target] > max(rest))))
    torch.testing.assert_close(torch.stack([own, other, most], dim=1), torch.tensor(loop), atol=1e-4, rtol=0)
    assert len(items) >= 90
    assert float(most.mean()) >= 0.95 > MODEL_CHECK_WARNING
    assert float(own.mean()) >= 8.0 and abs(float(other.mean())) <= 2.0
