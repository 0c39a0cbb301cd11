"""Output safety: gmar never writes over an input or a file it did not write, and says when it renames."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gmar.errors import GmarError
from gmar.frontends.cli import main
from gmar.outputs import MANIFEST, OutputFolder, distinct, read_manifest

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


# --- issue 20: links planted in a race, truncated writes, concurrent runs, cost, long names ---


def test_a_link_planted_after_reserving_is_never_followed(tmp_path, capsys):
    """The issue's race: out/im007.png.png -> victim.txt appears between reserve and write."""
    victim = tmp_path / "victim.txt"
    victim.write_text("the user's data")
    out = tmp_path / "out"
    folder = OutputFolder(out)
    name = folder.reserve("im007.png", [".png"], "im007.png")
    assert name == "im007.png"
    out.mkdir()
    (out / "im007.png.png").symlink_to(victim)
    written = folder.write("im007.png.png", lambda path: path.write_bytes(b"a figure"))
    assert victim.read_text() == "the user's data"
    assert (out / "im007.png.png").is_symlink() and os.readlink(out / "im007.png.png") == str(victim)
    assert written == out / "im007.png-2.png" and written.read_bytes() == b"a figure"
    (line,) = gmar_lines(capsys.readouterr().err)
    assert "im007.png" in line and "im007.png-2.png" in line and "link" in line
    assert "im007.png-2.png" in read_manifest(out) and "im007.png.png" not in read_manifest(out)


def test_a_link_planted_while_writing_or_over_a_listed_output_is_left_alone(tmp_path, capsys):
    victim = tmp_path / "victim.txt"
    victim.write_text("the user's data")
    out = tmp_path / "out"
    OutputFolder(out).write("a.png", lambda path: path.write_bytes(b"first run"))  # gmar's own, listed
    folder = OutputFolder(out)
    assert folder.reserve("a", [".png", "_heads.png"], "a") == "a"

    def plant_then_write(path: Path) -> None:  # the writer is slow; meanwhile someone swaps names
        (out / "a.png").unlink()
        (out / "a.png").symlink_to(victim)
        (out / "a_heads.png").symlink_to(victim)
        path.write_bytes(b"second run")

    folder.write("a.png", plant_then_write)
    folder.write("a_heads.png", lambda path: path.write_bytes(b"heads"))
    assert victim.read_text() == "the user's data"
    assert (out / "a.png").is_symlink() and (out / "a_heads.png").is_symlink()
    assert (out / "a-2.png").read_bytes() == b"second run" and (out / "a-2_heads.png").read_bytes() == b"heads"
    assert len(gmar_lines(capsys.readouterr().err)) == 2
    # a fixed name (checked, not numbered) that a link took since is refused on one line
    report = OutputFolder(out)
    report.check(["results.md"])
    (out / "results.md").symlink_to(victim)
    with pytest.raises(GmarError, match=r"results\.md is a link.*gmar leaves it alone"):
        report.write("results.md", lambda path: path.write_text("table"))
    assert victim.read_text() == "the user's data"


def full_disk(path: Path) -> None:
    with open(path, "wb") as handle:
        handle.write(b"half a PNG")
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def leftovers(folder: Path) -> list[str]:
    """Files in ``folder`` other than gmar's bookkeeping (list, journal, lock) and ``keep``."""
    return sorted(n for n in os.listdir(folder) if not n.startswith(".gmar-outputs"))


def test_a_truncated_write_never_keeps_a_final_name(tmp_path):
    out = tmp_path / "out"
    folder = OutputFolder(out)
    with pytest.raises(GmarError, match=r"^cannot write .*new\.png: No space left on device$"):
        folder.write("new.png", full_disk)
    assert leftovers(out) == []  # neither the final name nor the temporary file
    folder.write("old.png", lambda path: path.write_bytes(b"a whole figure"))
    again = OutputFolder(out)
    with pytest.raises(GmarError, match="No space left on device"):
        again.write("old.png", full_disk)
    assert (out / "old.png").read_bytes() == b"a whole figure"  # the earlier output is kept whole

    def interrupted(path: Path) -> None:
        path.write_bytes(b"ha")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        again.write("late.png", interrupted)
    assert leftovers(out) == ["old.png"]
    assert set(read_manifest(out)) == {"old.png"}


def test_two_runs_on_one_folder_list_every_file(tmp_path):
    """Two runs that opened the folder before either wrote: each file is listed, none numbered on a re-run."""
    out = tmp_path / "out"
    first, second = OutputFolder(out), OutputFolder(out)
    for i in range(20):
        first.write(f"a{i}.png", lambda path, i=i: path.write_bytes(b"a%d" % i))
        second.write(f"b{i}.png", lambda path, i=i: path.write_bytes(b"b%d" % i))
    expected = {f"{p}{i}.png" for p in "ab" for i in range(20)}
    assert set(read_manifest(out)) == expected
    for folder in (first, second):
        folder.close()
    assert set(read_manifest(out)) == expected
    rerun = OutputFolder(out)
    assert [rerun.reserve(f"{p}{i}", [".png"], "x") for p in "ab" for i in range(20)] == [
        f"{p}{i}" for p in "ab" for i in range(20)
    ]


def test_concurrent_runs_writing_the_same_names_share_one_list(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    names = [f"im{i:03d}.png" for i in range(60)]
    errors: list[BaseException] = []

    def run(tag: str) -> None:
        try:
            folder = OutputFolder(out)
            for name in names + [f"{tag}{i}.png" for i in range(30)]:
                base = folder.reserve(name, [".png", "_heads.png"], name)
                for suffix in (".png", "_heads.png"):
                    folder.write(base + suffix, lambda path: path.write_bytes(tag.encode() * 50))
            folder.close()
        except BaseException as error:  # reported by the main thread
            errors.append(error)

    threads = [threading.Thread(target=run, args=(tag,)) for tag in ("x", "y")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    on_disk = {n for n in os.listdir(out) if not n.startswith(".gmar-")}
    assert on_disk == set(read_manifest(out))  # every file listed
    assert not any("-2" in n for n in on_disk)  # gmar's own files, replaced rather than numbered
    assert len(on_disk) == 2 * (60 + 60)
    assert gmar_lines(capsys.readouterr().err) == []


@pytest.mark.parametrize("count", [50, 400])
def test_manifest_work_per_file_does_not_grow_with_the_folder(tmp_path, monkeypatch, count):
    """The bookkeeping of N files is O(N): lstat calls and bytes of list written per file stay flat."""
    tally = {"lstat": 0, "bytes": 0}
    real_lstat, real_replace, real_write = os.lstat, os.replace, os.write

    def lstat(path, *args, **kwargs):
        tally["lstat"] += 1
        return real_lstat(path, *args, **kwargs)

    def replace(source, target, *args, **kwargs):
        if os.path.basename(target).startswith(".gmar-outputs"):
            tally["bytes"] += real_lstat(source).st_size
        return real_replace(source, target, *args, **kwargs)

    def write(fd, data):
        tally["bytes"] += len(data)
        return real_write(fd, data)

    out = tmp_path / "out"
    folder = OutputFolder(out)
    monkeypatch.setattr(os, "lstat", lstat)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "write", write)
    for i in range(count):
        base = folder.reserve(f"image{i:05d}.jpg", [".png"], "x")
        folder.write(base + ".png", lambda path: path.write_bytes(b"png"))
    folder.close()
    monkeypatch.undo()
    assert len(read_manifest(out)) == count
    assert tally["lstat"] / count < 40  # a few per file (realpath included), not one per listed file
    assert tally["bytes"] / count < 400  # a journal line and a share of one final list, not a list per file


def test_names_over_the_file_system_limit_are_shortened_deterministically(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    limit = os.pathconf(out, "PC_NAME_MAX")
    folder = OutputFolder(out)
    suffixes = [".png", "_gmar_heads.png", "_gmar_gae.npy"]
    for base in ("x" * 241 + ".png", "é" * 121 + ".jpg"):  # 245 characters; 246 bytes of UTF-8
        short = folder.reserve(base, suffixes, base)
        assert short != base and short.startswith(base[:20])
        assert all(len((short + s).encode()) <= limit - 6 for s in suffixes)  # room left for "-NNNNN"
        assert OutputFolder(out).reserve(base, suffixes, base) == short  # the same name on every run
        for s in suffixes:
            folder.write(short + s, lambda path: path.write_bytes(b"1"))
    lines = gmar_lines(capsys.readouterr().err)
    assert len(lines) == 4 and all("name limit" in line for line in lines)
    assert OutputFolder(out).reserve("x" * 241 + ".png", suffixes, "x") != OutputFolder(out).reserve(
        "x" * 240 + "y.png", suffixes, "y"
    )


def test_a_long_input_name_and_a_failing_write_do_not_stop_the_run(tmp_path, capsys, monkeypatch):
    photos = tmp_path / "photos"
    photos.mkdir()
    long = picture(photos / ("a" * 241 + ".png"), 0)
    picture(photos / "b.png", 1)
    picture(photos / "c.png", 2)
    out = tmp_path / "out"
    argv = ["explain", str(photos), *MODEL, "--out", str(out), "--save-maps"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    (line,) = gmar_lines(captured.err)
    assert str(long) in line and "name limit" in line
    figures = sorted(n for n in os.listdir(out) if n.endswith(".png") and not n.endswith("_heads.png"))
    assert len(figures) == 3 and "b.png.png" in figures and "c.png.png" in figures
    assert "wrote 3 figure(s)" in captured.out
    assert main(argv) == 0  # a re-run replaces the shortened names rather than numbering them
    assert sorted(n for n in os.listdir(out) if n.endswith(".png") and not n.endswith("_heads.png")) == figures

    import gmar.viz

    real_save = gmar.viz.save
    calls: list[str] = []

    def failing_once(figure, path):
        calls.append(str(path))
        if len(calls) == 3:  # the second image's figure (after the first image's figure and heads)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(figure, path)

    monkeypatch.setattr(gmar.viz, "save", failing_once)
    fresh = tmp_path / "fresh"
    assert main(["explain", str(photos), *MODEL, "--out", str(fresh)]) == 2
    captured = capsys.readouterr()
    errors = [line for line in gmar_lines(captured.err) if "No space left on device" in line]
    assert len(errors) == 1 and "b.png" in errors[0] and "Traceback" not in captured.err
    assert (fresh / "c.png.png").is_file() and not (fresh / "b.png.png").exists()
    assert "1 input(s) failed" in captured.out


def test_an_old_list_is_read_and_its_files_replaced(tmp_path):
    """A folder written before the journal existed: its ``.gmar-outputs.json`` still says what is gmar's."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "cat.jpg.png").write_bytes(b"old figure")
    info = (out / "cat.jpg.png").lstat()
    (out / MANIFEST).write_text(
        json.dumps({"gmar_outputs": 1, "files": {"cat.jpg.png": {"size": info.st_size, "mtime_ns": info.st_mtime_ns}}})
    )
    with OutputFolder(out) as folder:
        assert folder.reserve("cat.jpg", [".png"], "cat.jpg") == "cat.jpg"
        folder.write("cat.jpg.png", lambda path: path.write_bytes(b"new figure"))
    assert (out / "cat.jpg.png").read_bytes() == b"new figure"
    assert sorted(os.listdir(out)) == [MANIFEST, "cat.jpg.png"]  # the journal folded, nothing else left
    assert set(json.loads((out / MANIFEST).read_text())["files"]) == {"cat.jpg.png"}


def test_without_hard_links_or_flock_a_taken_name_is_still_never_replaced(tmp_path, monkeypatch, capsys):
    import gmar.outputs

    def no_links(*args, **kwargs):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)  # FAT, some network file systems
    monkeypatch.setattr(gmar.outputs, "fcntl", None)  # as where fcntl cannot be imported
    out = tmp_path / "out"
    folder = OutputFolder(out)
    assert folder.reserve("a", [".png"], "a") == "a"
    out.mkdir()
    (out / "a.png").write_bytes(b"someone else's")
    assert folder.write("a.png", lambda path: path.write_bytes(b"figure")) == out / "a-2.png"
    assert (out / "a.png").read_bytes() == b"someone else's" and (out / "a-2.png").read_bytes() == b"figure"
    folder.write("b.png", lambda path: path.write_bytes(b"b"))
    folder.close()
    assert set(read_manifest(out)) == {"a-2.png", "b.png"}
    assert leftovers(out) == ["a-2.png", "a.png", "b.png"]
    assert len(gmar_lines(capsys.readouterr().err)) == 1


def test_a_name_a_concurrent_run_wrote_is_replaced_even_when_this_run_saw_it_listed(tmp_path, capsys):
    """Run B learns of run A's file (reading the list for another name) before it writes the same
    name: the file is still gmar's and is replaced, not written as a numbered copy. This interleaving
    made test_concurrent_runs_writing_the_same_names_share_one_list fail now and then."""
    out = tmp_path / "out"
    out.mkdir()
    first, second = OutputFolder(out), OutputFolder(out)
    assert first.reserve("a", [".png"], "a") == "a" and second.reserve("a", [".png"], "a") == "a"
    first.write("a.png", lambda path: path.write_bytes(b"first"))
    first.write("b.png", lambda path: path.write_bytes(b"first"))
    assert second.reserve("b", [".png"], "b") == "b"  # b.png is unknown to it: it catches up, a.png too
    second.write("a.png", lambda path: path.write_bytes(b"second"))
    assert (out / "a.png").read_bytes() == b"second" and not (out / "a-2.png").exists()
    for folder in (first, second):
        folder.close()
    assert set(read_manifest(out)) == {"a.png", "b.png"}
    assert gmar_lines(capsys.readouterr().err) == []
