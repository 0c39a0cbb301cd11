"""The reference ViT shipped with gmar: loads offline, is what its card says, and is accurate."""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path

import pytest
import torch

import gmar
from gmar.data import CLASSES, Scenes
from gmar.reference import CARD, CHECKPOINT, ReferenceConfig, build_reference_model, exact_set_accuracy

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
    # The shipped model's measured figure (0.91); the goal is 0.95 (docs/evaluation.md).
    assert report["test_exact_set_accuracy"] >= 0.89 and report["test_scenes"] >= 1000
    assert report["train_seconds"] <= 20 * 60


def test_reference_accuracy_on_fresh_test_scenes():
    """Exact-set accuracy on the first 400 test scenes agrees with the card's figure (on 2000)."""
    from safetensors import safe_open

    with safe_open(str(ASSETS / CHECKPOINT), framework="pt") as handle:
        stated = json.loads(handle.metadata()["report"])["test_exact_set_accuracy"]
    measured = exact_set_accuracy(gmar.load_reference_model(), Scenes("test", 400))
    assert abs(measured - stated) < 0.06 and measured >= 0.85


def test_build_is_seeded_and_the_loader_refuses_a_missing_file(tmp_path):
    a, b = build_reference_model(ReferenceConfig()), build_reference_model(ReferenceConfig())
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    with pytest.raises(gmar.ModelLoadError, match="gmar train-reference"):
        gmar.load_reference_model(tmp_path / "missing.safetensors")


def test_train_reference_runs_a_few_steps(tmp_path):
    from gmar.reference import train_reference

    config = ReferenceConfig(image_size=32, embed_dim=32, depth=2, num_heads=4, train_scenes=64, test_scenes=16,
                             steps=3, batch_size=8, warmup=2)  # fmt: skip
    model, report = train_reference(config, out=tmp_path, progress=False)
    assert 0.0 <= report["test_exact_set_accuracy"] <= 1.0
    loaded = gmar.load_reference_model(tmp_path / CHECKPOINT)
    assert all(
        torch.equal(x, y) for x, y in zip(model.state_dict().values(), loaded.state_dict().values(), strict=True)
    )
    assert "Test exact-set accuracy" in (tmp_path / CARD).read_text()
