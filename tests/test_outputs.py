"""Output safety: gmar never writes over an input or a file it did not write, and says when it renames."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gmar.cli import main
from gmar.errors import GmarError
from gmar.outputs import MANIFEST, OutputFolder, distinct

MODEL = ["--model", "timm:test_vit", "--random-init", "--method", "gmar,rollout"]


def picture(path: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (36, 40, 3), dtype=np.uint8)).save(path)
    return path


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir() if p.is_file()}


def gmar_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("gmar:")]


def test_out_in_the_input_folder_replaces_no_input(tmp_path, capsys):
    """The issue's folder: cat.jpg, cat.png, cat-2.jpg, a user's cat_gmar_heads.png, plane.png."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for seed, name in enumerate(("cat.jpg", "cat.png", "cat-2.jpg", "cat_gmar_heads.png", "plane.png")):
        picture(photos / name, seed)
    before = digests(photos)
    assert main(["explain", str(photos), *MODEL, "--out", str(photos), "--save-maps"]) == 0
    captured = capsys.readouterr()
    after = digests(photos)
    assert {n: after[n] for n in before} == before  # every input byte for byte
    for name in before:
        assert Image.open(photos / f"{name}.png").size[0] > 300
        assert (photos / f"{name}_gmar_heads.png").is_file()
        for method in ("gmar", "rollout"):
            assert np.load(photos / f"{name}_{method}.npy").shape == (160, 160)  # test_vit takes 160 px
    assert "wrote 5 figure(s)" in captured.out
    assert gmar_lines(captured.err) == []
    assert set(after) == set(before) | {MANIFEST} | {
        f"{n}{s}" for n in before for s in (".png", "_gmar_heads.png", "_gmar.npy", "_rollout.npy")
    }


def test_running_again_replaces_its_own_outputs_and_does_not_explain_them(tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    picture(photos / "cat.jpg", 0)
    argv = ["explain", str(photos), *MODEL, "--out", str(photos)]
    for _ in range(3):
        assert main(argv) == 0
        captured = capsys.readouterr()
        assert "wrote 1 figure(s)" in captured.out and gmar_lines(captured.err) == []
        assert sorted(os.listdir(photos)) == [MANIFEST, "cat.jpg", "cat.jpg.png", "cat.jpg_gmar_heads.png"]


def test_an_output_changed_since_is_no_longer_gmars(tmp_path, capsys):
    image = picture(tmp_path / "cat.jpg", 0)
    out = tmp_path / "out"
    argv = ["explain", str(image), *MODEL, "--out", str(out)]
    assert main(argv) == 0
    os.utime(out / "cat.jpg.png", ns=(0, 0))  # touched by someone else since
    changed = (out / "cat.jpg.png").read_bytes()
    assert main(argv) == 0
    captured = capsys.readouterr()
    (line,) = gmar_lines(captured.err)
    assert "outputs named cat.jpg-2" in line and "cat.jpg.png exists and was not written by gmar" in line
    assert (out / "cat.jpg.png").read_bytes() == changed and (out / "cat.jpg-2.png").is_file()
    assert captured.out.splitlines()[-1].startswith("gmar: wrote 1 figure(s)")


def test_same_name_in_two_folders_is_numbered_and_reported(tmp_path, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first, second = picture(tmp_path / "a" / "cat.jpg", 1), picture(tmp_path / "b" / "cat.jpg", 2)
    out = tmp_path / "out"
    assert main(["explain", str(first), str(second), *MODEL, "--out", str(out), "--save-maps"]) == 0
    captured = capsys.readouterr()
    (line,) = gmar_lines(captured.err)
    assert str(second) in line and "outputs named cat.jpg-2" in line and "another output of this run" in line
    assert "wrote 2 figure(s)" in captured.out
    one, two = np.load(out / "cat.jpg_gmar.npy"), np.load(out / "cat.jpg-2_gmar.npy")
    assert not np.array_equal(one, two)


def test_a_foreign_file_is_never_replaced(tmp_path, capsys):
    image = picture(tmp_path / "dog.png", 3)
    out = tmp_path / "out"
    out.mkdir()
    (out / "dog.png_gmar_heads.png").write_bytes(b"the user's own file")
    assert main(["explain", str(image), *MODEL, "--out", str(out)]) == 0
    assert (out / "dog.png_gmar_heads.png").read_bytes() == b"the user's own file"
    assert (out / "dog.png-2.png").is_file() and (out / "dog.png-2_gmar_heads.png").is_file()
    assert not (out / "dog.png.png").exists()  # one input's files keep one name
    assert len(gmar_lines(capsys.readouterr().err)) == 1


def test_out_naming_a_file_is_one_line(tmp_path, capsys):
    image = picture(tmp_path / "dog.png", 3)
    assert main(["explain", str(image), *MODEL, "--out", str(image)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a file, not a folder" in err and "Traceback" not in err


def test_output_folder_rules(tmp_path):
    source = picture(tmp_path / "in.png", 0)
    folder = OutputFolder(tmp_path, inputs=[source])
    assert folder.taken("in.png") == "is an input of this run"
    link = tmp_path / "link.png"
    link.symlink_to(source)
    assert folder.taken("link.png") == "is an input of this run"
    assert folder.taken("new.png") is None
    folder.write("new.png", lambda p: p.write_bytes(b"1"))
    assert OutputFolder(tmp_path).taken("new.png") is None  # listed and unchanged
    (tmp_path / "new.png").write_bytes(b"22")
    assert OutputFolder(tmp_path).taken("new.png") == "exists and was not written by gmar"
    with pytest.raises(GmarError, match="was not written by gmar; gmar leaves it alone"):
        OutputFolder(tmp_path).write("new.png", lambda p: p.write_bytes(b"3"))
    assert (tmp_path / "new.png").read_bytes() == b"22"
    (tmp_path / MANIFEST).write_text("not json")
    with pytest.raises(GmarError, match="is not gmar's list of outputs"):
        OutputFolder(tmp_path)
    assert distinct(["a", "a", "a-2", "b"]) == ["a", "a-2", "a-2-2", "b"]
