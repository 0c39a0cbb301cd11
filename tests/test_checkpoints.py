"""Checkpoints that do not fit, unreadable weight files and mistyped paths: one line each, saying what to do."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import gmar
from conftest import one_error_line
from gmar.frontends.cli import main
from gmar.loading import load_model

TINY = "vit_tiny_patch16_224"


def timm_model(name: str = TINY, **kwargs) -> torch.nn.Module:
    import timm

    torch.manual_seed(1)
    return timm.create_model(name, pretrained=False, **kwargs)


def save(state: dict, path: Path) -> Path:
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def fine_tuned(tmp_path_factory) -> dict[str, Path]:
    """A ViT-Ti with a 10-class head, saved both ways, and its state dict for comparison."""
    folder = tmp_path_factory.mktemp("fine-tuned")
    state = timm_model(num_classes=10).state_dict()
    return {suffix: save(state, folder / f"ft{suffix}") for suffix in (".pth", ".safetensors")}


def shape_text(shape) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_head_of_another_size_names_the_keys_and_the_flag(fine_tuned, suffix):
    with pytest.raises(gmar.ModelLoadError) as caught:
        load_model(f"timm:{TINY}", checkpoint=fine_tuned[suffix])
    message = str(caught.value)
    assert "\n" not in message
    assert "head.weight (10, 192) in the checkpoint, (1000, 192) in the model" in message
    assert "head.bias (10,) in the checkpoint, (1000,) in the model" in message
    assert "--num-classes 10" in message


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_num_classes_loads_the_fine_tuned_head(fine_tuned, suffix):
    loaded = load_model(f"timm:{TINY}", checkpoint=fine_tuned[suffix], num_classes=10)
    expected = timm_model(num_classes=10).state_dict()
    state = loaded.model.state_dict()
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(state[key], value), key
    assert loaded.model.num_classes == 10
    assert loaded.class_names is None  # ImageNet's 1000 names do not label a 10-class head


def test_weights_of_another_architecture(tmp_path):
    tiny, small = timm_model().state_dict(), timm_model("vit_small_patch16_224").state_dict()
    path = save(tiny, tmp_path / "tiny.pth")
    with pytest.raises(gmar.ModelLoadError) as caught:
        load_model("timm:vit_small_patch16_224", checkpoint=path)
    message = str(caught.value)
    assert "\n" not in message
    differing = [k for k in small if k in tiny and tiny[k].shape != small[k].shape]
    first = differing[0]
    first_text = f"{shape_text(tiny[first].shape)} in the checkpoint, {shape_text(small[first].shape)} in the model"
    assert f"{first} {first_text}" in message
    assert f"and {len(differing) - 3} more" in message
    assert "another architecture" in message
    assert "--num-classes" not in message


def test_missing_and_unexpected_keys_are_still_named(tmp_path):
    state = timm_model().state_dict()
    state.pop("norm.weight")
    state["extra.weight"] = torch.zeros(3)
    path = save(state, tmp_path / "partial.pth")
    with pytest.raises(gmar.ModelLoadError) as caught:
        load_model(f"timm:{TINY}", checkpoint=path)
    assert "missing norm.weight" in str(caught.value) and "unexpected extra.weight" in str(caught.value)


@pytest.mark.parametrize("suffix", [".pth", ".pt", ".safetensors", ".bin"])
def test_a_text_file_is_named_for_what_it_is_not(tmp_path, suffix):
    path = tmp_path / f"notes{suffix}"
    path.write_text("these are my notes, not weights\n")
    with pytest.raises(gmar.ModelLoadError) as caught:
        load_model(f"timm:{TINY}", checkpoint=path)
    message = str(caught.value)
    assert "neither a safetensors file nor a torch.save file" in message
    assert "(101)" not in message


def test_a_truncated_torch_file_is_reported(tmp_path, fine_tuned):
    data = fine_tuned[".pth"].read_bytes()
    path = tmp_path / "cut.pth"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(gmar.ModelLoadError, match=r"cannot read it as a torch\.save file"):
        load_model(f"timm:{TINY}", checkpoint=path)


def test_cli_fine_tuned_checkpoint_with_and_without_num_classes(fine_tuned, tmp_path, capsys):
    argv = ["explain", "--example", "--model", f"timm:{TINY}", "--checkpoint", str(fine_tuned[".pth"])]
    argv += ["--method", "rollout", "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    line = one_error_line(capsys)
    assert "head.weight (10, 192) in the checkpoint" in line and "--num-classes 10" in line
    assert main([*argv, "--num-classes", "10"]) == 0
    assert len(list((tmp_path / "out").glob("*.png"))) == 2  # one figure per example image


def test_cli_evaluate_takes_num_classes(fine_tuned, tmp_path, capsys):
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (224, 224), (120, 30, 200)).save(images / "a.png")
    argv = ["evaluate", "--model", f"timm:{TINY}", "--checkpoint", str(fine_tuned[".safetensors"])]
    argv += ["--data", f"imagefolder:{images}", "--methods", "rollout", "--metrics", "deletion", "--steps", "2"]
    argv += ["--out", str(tmp_path / "eval")]
    assert main(argv) == 2
    assert "--num-classes 10" in one_error_line(capsys)
    assert main([*argv, "--num-classes", "10"]) == 0


def test_cli_weights_of_another_architecture(tmp_path, capsys):
    path = save(timm_model().state_dict(), tmp_path / "tiny.safetensors")
    argv = ["explain", "--example", "--model", "timm:vit_small_patch16_224", "--checkpoint", str(path)]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    assert "another architecture" in one_error_line(capsys)


def test_num_classes_needs_weights_that_fit_it(capsys, tmp_path):
    with pytest.raises(gmar.ModelLoadError, match="--checkpoint"):
        load_model(f"timm:{TINY}", num_classes=10)  # a new head on pretrained weights would be untrained
    with pytest.raises(gmar.ModelLoadError, match="at least 1"):
        load_model(f"timm:{TINY}", pretrained=False, num_classes=0)
    with pytest.raises(gmar.ModelLoadError, match="no class head"):
        load_model("openclip:ViT-B-32", pretrained=False, num_classes=10)
    assert main(["explain", "--example", "--model", "openclip:ViT-B-32", "--random-init", "--num-classes", "3"]) == 2
    assert "no class head" in one_error_line(capsys)


def test_hf_num_classes_sets_the_number_of_labels(tmp_path):
    from conftest import make_hf_vit

    folder = tmp_path / "hf"
    make_hf_vit().save_pretrained(folder)  # 5 labels
    source = make_hf_vit(num_labels=7)
    path = save(source.state_dict(), tmp_path / "seven.safetensors")
    with pytest.raises(gmar.ModelLoadError, match="--num-classes 7"):
        load_model(f"hf:{folder}", checkpoint=path)
    loaded = load_model(f"hf:{folder}", checkpoint=path, num_classes=7)
    assert loaded.model.config.num_labels == 7
    assert torch.equal(loaded.model.classifier.weight, source.classifier.weight)


def test_reference_checkpoint_as_a_torch_file(tmp_path, capsys):
    from gmar.eval.reference import build_reference_model, load_reference_model

    source = build_reference_model()
    with torch.no_grad():
        source.head.bias.fill_(0.5)
    path = save(source.state_dict(), tmp_path / "reference.pth")
    model = load_reference_model(path)
    assert torch.equal(model.head.bias, source.head.bias)


@pytest.mark.parametrize("kind", ["timm", "text"])
def test_cli_evaluate_reference_with_a_wrong_file(kind, tmp_path, fine_tuned, capsys):
    path = fine_tuned[".pth"] if kind == "timm" else tmp_path / "weights.pth"
    if kind == "text":
        path.write_text("not weights")
    assert main(["evaluate", "--model", "reference", "--checkpoint", str(path), "--out", str(tmp_path / "e")]) == 2
    line = one_error_line(capsys)
    assert ("another architecture" if kind == "timm" else "neither a safetensors file nor a torch.save") in line


@pytest.mark.parametrize("name", ["./nonexistent_dir", "../nowhere", "/no/such/model", "~/no-such-gmar-model",
                                  "a\\b", "some/deep/path"])  # fmt: skip
def test_a_mistyped_local_path_is_not_blamed_on_the_network(name, capsys):
    with pytest.raises(gmar.ModelLoadError) as caught:
        load_model(f"hf:{name}")
    message = str(caught.value)
    assert "no such directory" in message and "unreachable" not in message
    assert main(["explain", "--example", "--model", f"hf:{name}"]) == 2
    assert "no such directory" in one_error_line(capsys)


def test_a_file_given_as_an_hf_directory(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(b"x")
    with pytest.raises(gmar.ModelLoadError, match="not a directory"):
        load_model(f"hf:{path}")


@pytest.fixture
def offline(monkeypatch):
    import socket

    def no_dns(*args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)


def test_a_local_directory_without_a_model_is_not_blamed_on_the_network(tmp_path, offline, monkeypatch):
    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(tmp_path)
    for spec in (f"hf:{tmp_path / 'empty'}", "hf:empty"):  # a path, and a name that is a folder here
        with pytest.raises(gmar.ModelLoadError) as caught:
            load_model(spec)
        message = str(caught.value)
        assert "unreachable" not in message and "no network" not in message and "\n" not in message
        assert message.startswith(f"cannot load {spec}: ")


def test_a_mistyped_timm_name_is_not_blamed_on_the_network(offline, capsys):
    with pytest.raises(gmar.ModelLoadError, match="no timm model named 'vit_tiny_patch16_244'"):
        load_model("timm:vit_tiny_patch16_244")
    assert main(["explain", "--example", "--model", "timm:vit_tiny_patch16_244"]) == 2
    assert "unreachable" not in one_error_line(capsys)
