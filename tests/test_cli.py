"""`gmar explain` end to end on a saved tiny Hugging Face model, bad inputs included."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import gmar
from conftest import make_hf_vit, one_error_line
from gmar.frontends.cli import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-vit")
    labels = {i: f"thing{i}" for i in range(5)}
    make_hf_vit(id2label=labels, label2id={v: k for k, v in labels.items()}).save_pretrained(path)
    return path


@pytest.fixture
def inputs(tmp_path):
    rng = np.random.default_rng(0)
    good = []
    for name, size in (("cat", (40, 48)), ("dog", (64, 32))):
        path = tmp_path / f"{name}.png"
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(path)
        good.append(path)
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff this is not really a jpeg")
    return good, corrupt, tmp_path / "missing.png"


def test_explain_writes_figures_and_reports_bad_inputs(model_dir, inputs, tmp_path, capsys):
    (cat, dog), corrupt, missing = inputs
    out = tmp_path / "out"
    code = main(
        [
            "explain",
            str(cat),
            str(corrupt),
            str(missing),
            str(dog),
            "--model",
            f"hf:{model_dir}",
            "--method",
            "gmar,rollout",
            "--out",
            str(out),
            "--batch-size",
            "1",
            "--save-maps",
        ]
    )
    captured = capsys.readouterr()
    assert code == 2
    assert "Traceback" not in captured.err
    errors = [line for line in captured.err.splitlines() if line.startswith("gmar:")]
    assert len(errors) == 2
    assert "corrupt.jpg" in errors[0] and "missing.png" in errors[1]
    for name in ("cat.png", "dog.png"):
        assert Image.open(out / f"{name}.png").size[0] > 300
        assert (out / f"{name}_gmar_heads.png").is_file()
        for method in ("gmar", "rollout"):
            heatmap = np.load(out / f"{name}_{method}.npy")
            assert heatmap.shape == (32, 32) and heatmap.min() == 0.0 and heatmap.max() == 1.0
    assert "wrote 2 figure(s)" in captured.out


def test_official_demo_flags(model_dir, inputs, tmp_path):
    (cat, _), _, _ = inputs
    out = tmp_path / "official"
    assert main(["--input", str(cat), "--output", str(out), "--pretrained", str(model_dir), "--norm", "l2"]) == 0
    assert (out / "cat.png.png").is_file() and (out / "cat.png_gmar_heads.png").is_file()


def test_folder_of_images_and_all_methods(model_dir, inputs, tmp_path):
    (cat, _), _, _ = inputs
    out = tmp_path / "folder"
    code = main(["explain", str(cat.parent), "--model", f"hf:{model_dir}", "--out", str(out), "--save-maps"])
    assert code == 2  # the corrupt file in the folder is reported, the others explained
    assert sorted(p.name for p in out.glob("*_gmar.npy")) == ["cat.png_gmar.npy", "dog.png_gmar.npy"]
    model = gmar.load_model(f"hf:{model_dir}").model
    expected = sorted(f"cat.png_{m}.npy" for m in gmar.supported_methods(model))
    assert sorted(p.name for p in out.glob("cat.png_*.npy")) == expected
    assert len(gmar.all_methods()) == 11 and gmar.available_methods() == [
        *[m for m in gmar.all_methods() if m in gmar.available_methods()[:8]],
        "occlusion",
        "attnlrp",
        "transformer_attribution",
        "partial_lrp",
    ]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["explain", "x.png"], "name a model"),
        (["explain", "--model", "timm:test_vit", "--random-init"], "no images given"),
        (["explain", "x.png", "--model", "timm:test_vit", "--method", "magic"], "unknown method"),
        (["explain", "x.png", "--model", "nowhere:thing"], "must be one of"),
        (["train-reference", "--lr", "0"], "--lr must be positive, not 0.0"),
        (["train-reference", "--train-scenes", "0"], "--train-scenes must be at least 1, not 0"),
        (["train-reference", "--token-loss", "-1"], "--token-loss must be at least 0, not -1.0"),
        (["explain", "--example", "--model", "reference", "--option", "attnlrp"], "must read METHOD.NAME=VALUE"),
        (
            ["explain", "--example", "--model", "reference", "--method", "gae", "--option", "attnlrp.attention=full"],
            "is for attnlrp, which is not among the methods gae",
        ),
        (
            ["explain", "--example", "--model", "reference", "--method", "attnlrp", "--option", "attnlrp.foo=1"],
            "attnlrp takes no option 'foo'; its options: attention, epsilon, linear_gamma, conv_gamma",
        ),
    ],
)
def test_user_errors_are_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_unloadable_model_is_one_line_through_the_real_entry_point(tmp_path):
    env = {"PATH": "", "HF_HUB_OFFLINE": "1", "HOME": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-m", "gmar", "explain", "a.png", "--model", "hf:no-such-org/no-such-model"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gmar: error: cannot load hf:no-such-org/no-such-model")


def test_occlusion_and_gmar_gae_by_name_on_the_command_line(tmp_path):
    out = tmp_path / "named"
    argv = ["explain", "--example", "--model", "timm:test_vit", "--random-init", "--out", str(out)]
    assert main([*argv, "--method", "gmar_gae,occlusion", "--save-maps"]) == 0
    names = sorted(p.name for p in out.iterdir() if p.suffix == ".npy")
    assert names == [f"example_{s}.png_{m}.npy" for s in ("shapes", "stripes") for m in ("gmar_gae", "occlusion")]


def test_method_options_on_the_command_line_reach_the_method(tmp_path):
    """``--option attnlrp.attention=full`` gives the map of ``gmar.AttnLRP(model, attention="full")``."""
    argv = ["explain", "--example", "--model", "reference", "--method", "attnlrp", "--save-maps"]
    assert main([*argv, "--out", str(tmp_path / "cp")]) == 0
    assert main([*argv, "--out", str(tmp_path / "full"), "--option", "attnlrp.attention=full"]) == 0
    name = "example_shapes.png_attnlrp.npy"
    cp, full = np.load(tmp_path / "cp" / name), np.load(tmp_path / "full" / name)
    from importlib import resources

    model = gmar.load_reference_model()
    example = resources.files("gmar") / "assets" / "example_shapes.png"
    image = gmar.preprocess(gmar.load_image(example), gmar.get_adapter(model).preprocess_config())
    want = gmar.AttnLRP(model, attention="full")(image).heatmap[0].numpy()
    assert np.abs(full - want).max() <= 1e-5
    assert np.abs(cp - want).max() > 1e-2


def test_example_images_with_a_random_timm_model(tmp_path):
    out = tmp_path / "example"
    assert main(["explain", "--example", "--model", "timm:test_vit", "--random-init", "--out", str(out)]) == 0
    assert {p.name for p in out.glob("*.png")} == {
        "example_shapes.png.png",
        "example_shapes.png_gmar_heads.png",
        "example_shapes.png_gmar_gae_heads.png",
        "example_stripes.png.png",
        "example_stripes.png_gmar_heads.png",
        "example_stripes.png_gmar_gae_heads.png",
    }


def test_attention_pooled_model_gets_the_methods_that_explain_it(inputs, tmp_path, capsys):
    """timm's test_vit3 pools with an attention head (over its register token and patches)."""
    (cat, _), _, _ = inputs
    out = tmp_path / "map"
    assert (
        main(["explain", str(cat), "--model", "timm:test_vit3", "--random-init", "--out", str(out), "--save-maps"]) == 0
    )
    assert sorted(p.name for p in out.glob("*.npy")) == ["cat.png_gradcam.npy", "cat.png_legrad.npy"]
    code = main(
        ["explain", str(cat), "--model", "timm:test_vit3", "--random-init", "--method", "gmar", "--out", str(out)]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "pools its tokens with an attention head" in err and "legrad" in err and "Traceback" not in err


def test_train_reference_options_reach_the_recipe(monkeypatch, tmp_path, capsys):
    import gmar.eval.reference

    seen = []

    def fake(config, out):
        seen.append(config)
        return None, {"test_exact_set_accuracy": 0.5, "test_scenes": 1, "train_seconds": 0.0}

    monkeypatch.setattr(gmar.eval.reference, "train_reference", fake)
    argv = ["train-reference", "--out", str(tmp_path), "--steps", "40", "--lr", "3e-4", "--train-scenes", "500"]
    assert main([*argv, "--token-loss", "0"]) == 0
    assert main(["train-reference", "--out", str(tmp_path)]) == 0
    changed, default = seen
    assert (changed.steps, changed.lr, changed.train_scenes, changed.token_loss) == (40, 3e-4, 500, 0.0)
    assert default == gmar.eval.reference.ReferenceConfig()
    assert "test exact-set accuracy 0.5000" in capsys.readouterr().out


def test_version(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.strip() == f"gmar {gmar.__version__}"


@pytest.mark.parametrize(
    "argv",
    [
        ["explain", "x.png", "--model", "timm:test_vit", "--random-init", "--out", __file__],
        ["evaluate", "--model", "timm:test_vit", "--random-init", "--out", __file__],
        ["demo", "--out", __file__],
        ["bench", "--model", "timm:test_vit", "--out", __file__],
    ],
)
def test_out_naming_a_file_is_one_line(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == f"gmar: error: --out {__file__} is a file, not a folder: name a folder (it is created if missing)\n"


@pytest.mark.parametrize(("device", "message"), [("meta", "--device meta holds no data"), ("mps", "has none")])
@pytest.mark.parametrize("command", ["explain", "evaluate", "bench"])
def test_devices_without_data_or_hardware_are_one_line(inputs, tmp_path, capsys, device, message, command):
    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has an MPS device")
    (cat, _), _, _ = inputs
    argv = {
        "explain": ["explain", str(cat), "--model", "timm:test_vit", "--random-init"],
        "evaluate": ["evaluate", "--model", "timm:test_vit", "--random-init", "--data", f"imagefolder:{cat.parent}"],
        "bench": ["bench", "--model", "timm:test_vit"],
    }[command]
    assert main([*argv, "--device", device, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_hf_loading_draws_no_progress_bar(model_dir, inputs, tmp_path, capsys):
    from transformers.utils import logging as hf_logging

    (cat, _), _, _ = inputs
    assert hf_logging.is_progress_bar_enabled()
    assert main(["explain", str(cat), "--model", f"hf:{model_dir}", "--method", "rollout", "--out", str(tmp_path)]) == 0
    assert capsys.readouterr().err == ""
    assert hf_logging.is_progress_bar_enabled()  # the setting is restored


def test_offline_openclip_is_exactly_one_line(tmp_path):
    env = {"PATH": "", "HF_HUB_OFFLINE": "1", "HOME": str(tmp_path), "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    result = subprocess.run(
        [sys.executable, "-m", "gmar", "explain", "a.png", "--model", "openclip:ViT-B-32/openai"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gmar: error: cannot load openclip:ViT-B-32/openai"), lines


def test_a_folder_of_mixed_files_explained_into_itself(tmp_path, capsys):
    """README's promise: each unreadable input is one line, the others are explained, exit code 2, and
    with --out the input folder itself no input changes."""
    import hashlib

    from test_images import bomb_png

    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(5)
    Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(photos / "good.png")
    Image.fromarray(rng.integers(0, 65535, (40, 48), dtype=np.uint16)).save(photos / "deep.png")
    (photos / "corrupt.jpg").write_bytes(b"\xff\xd8\xff this is not really a jpeg")
    (photos / "notes.jpg").write_text("a text file with the wrong name\n")
    bomb_png(photos / "huge.png")
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in photos.iterdir()}
    missing = tmp_path / "missing.jpg"
    code = main(["explain", str(photos), str(missing), "--model", "timm:test_vit", "--random-init", "--method",
                 "gmar", "--out", str(photos)])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 2
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in photos.iterdir() if p.name in before} == before
    lines = captured.err.splitlines()
    assert len(lines) == 4 and all(line.startswith("gmar: skipped ") for line in lines), lines
    for name, why in (("corrupt.jpg", "not a readable image"), ("notes.jpg", "not a readable image"),
                      ("huge.png", "too large"), ("missing.jpg", "no such file")):  # fmt: skip
        assert any(name in line and why in line for line in lines), name
    for name in ("good.png", "deep.png"):
        assert (photos / f"{name}.png").is_file() and (photos / f"{name}_gmar_heads.png").is_file()
    assert captured.out.strip().endswith("wrote 2 figure(s) to " + str(photos) + "; 4 input(s) failed")


def test_out_of_memory_on_one_image_is_reported_and_the_next_is_explained(tmp_path, monkeypatch, capsys):
    """A MemoryError while one image decodes is that image's one line; the images after it are explained."""
    from PIL import ImageFile

    rng = np.random.default_rng(6)
    paths = []
    for name, size in (("a", (40, 48)), ("b", (7, 7)), ("c", (64, 32))):
        paths.append(tmp_path / f"{name}.png")
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(paths[-1])
    decode = ImageFile.ImageFile.load

    def load(image):
        if image.size == (7, 7):
            raise MemoryError
        return decode(image)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    out = tmp_path / "out"
    argv = ["explain", *map(str, paths), "--model", "timm:test_vit", "--random-init", "--method", "rollout"]
    assert main([*argv, "--out", str(out), "--batch-size", "1"]) == 2
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [f"gmar: skipped {paths[1]}: out of memory while decoding it (7 x 7 pixels)"]
    assert (out / "a.png.png").is_file() and (out / "c.png.png").is_file()
    assert "wrote 2 figure(s)" in captured.out and "1 input(s) failed" in captured.out


def test_warnings_while_reading_an_input_are_one_line_naming_it(tmp_path, capsys):
    from test_images import corrupt_exif_jpeg

    photo = corrupt_exif_jpeg(tmp_path / "photo.jpg")
    argv = ["explain", str(photo), "--model", "timm:test_vit", "--random-init", "--method", "rollout"]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 0
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"gmar: {photo}: Corrupt EXIF data."), lines


def test_folder_scans_take_every_listed_suffix(tmp_path):
    from gmar.frontends.cli import _image_paths, build_parser

    names = ["a.avif", "b.ico", "c.gif", "d.PNG", "e.jpg", "f.webp"]
    for name in names:
        Image.new("RGB", (16, 16), (1, 2, 3)).save(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not an image\n")
    args = build_parser().parse_args(["explain", str(tmp_path)])
    assert [p.name for p in _image_paths(args)] == names


def test_explain_takes_the_reference_model(tmp_path, monkeypatch, capsys):
    """As evaluate and the app do: its classes are the scenes' (multi-label, so each is a sigmoid)."""
    from gmar import viz
    from gmar.eval.scenes import CLASSES

    titles = []
    grid = viz.method_grid

    def method_grid(*args, **kwargs):
        titles.extend(kwargs["row_titles"])
        return grid(*args, **kwargs)

    monkeypatch.setattr(viz, "method_grid", method_grid)
    out = tmp_path / "ref"
    assert main(["explain", "--example", "--model", "reference", "--method", "gmar", "--out", str(out)]) == 0
    assert (out / "example_shapes.png.png").is_file() and (out / "example_shapes.png_gmar_heads.png").is_file()
    assert len(titles) == 2
    assert all(re.fullmatch(rf"predicted: ({'|'.join(CLASSES)}) \[\d\] \(\d\.\d\d\)", t) for t in titles), titles


@pytest.mark.parametrize("flag", [["--random-init"], ["--num-classes", "3"]])
def test_reference_model_weight_flags_are_one_line(tmp_path, capsys, flag):
    assert main(["explain", "--example", "--model", "reference", *flag, "--out", str(tmp_path / "x")]) == 2
    assert "the reference model" in one_error_line(capsys)


def test_explain_shows_progress_on_a_terminal(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    argv = ["explain", "--example", "--model", "timm:test_vit", "--random-init", "--method", "rollout"]
    assert main([*argv, "--out", str(tmp_path / "out"), "--batch-size", "1"]) == 0
    err = capsys.readouterr().err
    assert "explaining:" in err and "2/2 [" in err and " images/s]" in err
    assert err.endswith("\n")


def test_explain_draws_no_progress_into_a_file(tmp_path, capsys):
    argv = ["explain", "--example", "--model", "timm:test_vit", "--random-init", "--method", "rollout"]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 0
    assert capsys.readouterr().err == ""
