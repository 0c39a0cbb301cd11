"""Loading by spec: real zoo code paths, local checkpoints, one-line failures offline."""

from __future__ import annotations

import socket

import pytest
import torch

import gmar
from conftest import make_hf_vit
from gmar.loading import load_model, parse_spec


def test_timm_architecture_with_random_weights():
    loaded = load_model("timm:test_vit", pretrained=False)
    assert type(loaded.model).__name__ == "VisionTransformer"
    assert not loaded.model.training
    assert loaded.preprocess.input_size == (160, 160)
    assert loaded.preprocess.crop_pct == pytest.approx(0.95)
    again = load_model("timm:test_vit", pretrained=False)  # seeded: the same weights every time
    for a, b in zip(loaded.model.state_dict().values(), again.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_timm_local_checkpoint(tmp_path, suffix):
    source = load_model("timm:test_vit", pretrained=False).model
    with torch.no_grad():
        source.head.bias.fill_(0.25)
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(source.state_dict(), str(path))
    else:
        torch.save({"state_dict": source.state_dict()}, path)
    loaded = load_model("timm:test_vit", checkpoint=path)
    assert torch.equal(loaded.model.head.bias, torch.full_like(loaded.model.head.bias, 0.25))


def test_checkpoint_that_does_not_fit(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"unrelated.weight": torch.zeros(2)}, path)
    with pytest.raises(gmar.ModelLoadError, match="does not fit timm:test_vit"):
        load_model("timm:test_vit", checkpoint=path)
    with pytest.raises(gmar.ModelLoadError, match="no such file"):
        load_model("timm:test_vit", checkpoint=tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(gmar.ModelLoadError, match=r"neither a safetensors file nor a torch\.save file"):
        load_model("timm:test_vit", checkpoint=tmp_path / "junk.pt")


@pytest.mark.parametrize(
    "spec", ["timm:vit_tiny_patch16_224", "hf:google/vit-base-patch16-224", "openclip:ViT-B-32/laion2b_s34b_b79k"]
)
def test_unreachable_hub_fails_in_one_line(spec, monkeypatch):
    def no_dns(*args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    with pytest.raises(gmar.ModelLoadError) as caught:
        load_model(spec)
    message = str(caught.value)
    assert "\n" not in message
    assert "unreachable" in message and "--checkpoint" in message


def test_hf_saved_directory_with_labels_and_processor(tmp_path):
    from transformers import ViTImageProcessor

    model = make_hf_vit(id2label={i: f"shape{i}" for i in range(5)}, label2id={f"shape{i}": i for i in range(5)})
    model.save_pretrained(tmp_path)
    ViTImageProcessor(
        image_mean=[0.1, 0.2, 0.3], image_std=[0.4, 0.5, 0.6], size={"height": 32, "width": 32}
    ).save_pretrained(tmp_path)
    loaded = load_model(f"hf:{tmp_path}")
    assert loaded.class_names == [f"shape{i}" for i in range(5)]
    assert loaded.preprocess.mean == pytest.approx((0.1, 0.2, 0.3))
    assert loaded.preprocess.input_size == (32, 32)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.model.state_dict()[key], value)


@pytest.mark.parametrize("spec", ["vit_base", "torch:resnet", "timm:", "openclip:ViT-B-32"])
def test_bad_specs(spec):
    with pytest.raises(gmar.ModelLoadError):
        load_model(spec)


def test_parse_spec():
    assert parse_spec("openclip:ViT-B-16/laion2b_s34b_b88k") == ("openclip", "ViT-B-16/laion2b_s34b_b88k")
    assert parse_spec("hf:/tmp/a:b") == ("hf", "/tmp/a:b")


def test_timm_models_name_their_imagenet_classes_offline():
    """timm ships ImageNet's class descriptions; a head of ImageNet-1k's size gets them (figures were
    titled "class 281"), a fine-tuned head of another size gets none rather than wrong ones."""
    loaded = load_model("timm:test_vit", pretrained=False)
    assert loaded.model.num_classes == 1000
    assert loaded.class_names is not None and len(loaded.class_names) == 1000
    assert loaded.class_names[0] == "tench, Tinca tinca"  # ImageNet-1k's first and 281st synsets
    assert loaded.class_names[281] == "tabby, tabby cat"
    assert load_model("timm:test_vit", pretrained=False, num_classes=10).class_names is None
