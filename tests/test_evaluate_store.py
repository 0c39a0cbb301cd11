"""The evaluation store keeps results honest: resumed only with the same weights, never on top of a
damaged database; image-folder masks that do not fit are reported and skipped."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import one_error_line
from gmar.errors import GmarError
from gmar.eval import datasets as D
from gmar.eval import harness as H
from gmar.eval import store as S
from gmar.eval.datasets import folder_items
from gmar.eval.harness import Settings
from gmar.eval.reference import ReferenceConfig, build_reference_model, save_reference
from gmar.eval.store import Store
from gmar.frontends.cli import main
from gmar.preprocess import PreprocessConfig

TINY = ReferenceConfig(image_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4)
FAST = ["--methods", "gae", "--metrics", "deletion", "--steps", "2", "--limit", "2", "--sanity-items", "0"]
REPORT = {"test_exact_set_accuracy": 0.0, "test_scenes": 0, "train_seconds": 0.0, "threads": 1}


def fingerprint(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


# ----------------------------------------------------------------------------------------- stale results


def test_overwritten_checkpoint_is_not_resumed(tmp_path, capsys):
    folder = tmp_path / "weights"
    path = save_reference(build_reference_model(TINY), TINY, REPORT, folder)
    out = tmp_path / "eval"
    argv = ["evaluate", "--checkpoint", str(path), "--out", str(out), *FAST]
    assert main(argv) == 0
    capsys.readouterr()
    before = fingerprint(out)

    other = build_reference_model(ReferenceConfig(**{**TINY.__dict__, "seed": 1}))
    save_reference(other, TINY, REPORT, folder)  # same file name, other weights
    assert main(argv) == 2
    line = one_error_line(capsys)
    assert "weights" in line and "another --out" in line
    assert fingerprint(out) == before  # neither the store nor the tables were touched

    save_reference(build_reference_model(TINY), TINY, REPORT, folder)  # the first weights again: resumes
    assert main(argv) == 0


def test_library_evaluate_keys_the_store_by_the_weights(tmp_path):
    from gmar.eval.datasets import scene_items
    from gmar.eval.harness import evaluate
    from gmar.eval.registry import select_metrics

    settings = Settings(model="mine", data="scenes", methods=["gae"], metrics=select_metrics("deletion"), steps=2)
    items = scene_items(1, image_size=TINY.image_size)
    first = build_reference_model(TINY)
    evaluate(first, items, settings, tmp_path, progress=False).close()
    store = Store(tmp_path / "results.sqlite")
    assert json.loads(store.meta("settings"))["weights"] == H.weights_digest(first)
    store.close()
    other = build_reference_model(ReferenceConfig(**{**TINY.__dict__, "seed": 1}))
    with pytest.raises(GmarError, match="weights"):
        evaluate(other, items, settings, tmp_path, progress=False)
    assert settings.weights == ""  # the caller's settings are not changed


def test_weights_digest_covers_values_dtypes_shapes_and_buffers():
    model = build_reference_model(TINY)
    digest = H.weights_digest(model)
    assert len(digest) == 16 and int(digest, 16) >= 0
    assert H.weights_digest(build_reference_model(TINY)) == digest  # the same weights, another instance
    with torch.no_grad():
        model.head.bias[0] = torch.nextafter(model.head.bias[0], torch.tensor(1.0))
    assert H.weights_digest(model) != digest
    nudged = H.weights_digest(model)
    model.register_buffer("extra", torch.zeros(2))
    assert H.weights_digest(model) != nudged
    model.extra = torch.zeros(2, dtype=torch.float64)
    assert H.weights_digest(model) not in (nudged, digest)
    bfloat = build_reference_model(TINY).to(torch.bfloat16)
    assert H.weights_digest(bfloat) != digest
    assert model.training  # the model is left as found


def test_stored_settings_name_the_weights(tmp_path):
    settings = Settings(model="m", data="d", methods=["gae"], metrics=["deletion_auc"], weights="0123456789abcdef")
    store = Store(tmp_path / "results.sqlite")
    store.check_settings(settings)
    store.check_settings(settings)  # the same run: resumes
    with pytest.raises(GmarError, match="weights") as caught:
        store.check_settings(replace(settings, weights="fedcba9876543210"))
    assert "\n" not in str(caught.value)
    store.close()


# ------------------------------------------------------------------------------------------ damaged store


def damaged_files(tmp_path: Path) -> dict[str, Path]:
    whole = tmp_path / "whole.sqlite"
    store = Store(whole)
    for i in range(2000):
        store.write(f"item{i}", "gmar", {"deletion_auc": 0.5}, {"deletion": [0.25] * 20})
    store.close()
    data = whole.read_bytes()
    assert len(data) > 40000
    files = {}
    for kind, content in (("truncated", data[: len(data) // 2]), ("random", os.urandom(20000))):
        folder = tmp_path / kind
        folder.mkdir()
        (folder / "results.sqlite").write_bytes(content)
        files[kind] = folder / "results.sqlite"
    return files


@pytest.mark.parametrize("kind", ["truncated", "random"])
def test_damaged_store_is_reported_and_left_alone(tmp_path, kind):
    path = damaged_files(tmp_path)[kind]
    before = path.read_bytes()
    with pytest.raises(GmarError) as caught:
        Store(path)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message
    assert "damaged" in message and "move it away" in message and "another --out" in message
    assert path.read_bytes() == before


@pytest.mark.parametrize("kind", ["truncated", "random"])
def test_cli_evaluate_on_a_damaged_store(tmp_path, capsys, kind):
    path = damaged_files(tmp_path)[kind]
    before = fingerprint(path.parent)
    checkpoint = save_reference(build_reference_model(TINY), TINY, REPORT, tmp_path / "weights")
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--out", str(path.parent), *FAST]) == 2
    line = one_error_line(capsys)
    assert "damaged" in line and "move it away" in line
    assert fingerprint(path.parent) == before


def test_a_corrupted_page_is_found_on_open(tmp_path):
    path = tmp_path / "results.sqlite"
    store = Store(path)
    for i in range(2000):
        store.write(f"item{i}", "gmar", {"deletion_auc": 0.5}, {"deletion": [0.25] * 20})
    store.close()
    with sqlite3.connect(path) as db:
        page = db.execute("PRAGMA page_size").fetchone()[0]
    data = bytearray(path.read_bytes())
    data[5 * page : 6 * page] = os.urandom(page)  # one page of the tables overwritten
    path.write_bytes(bytes(data))
    with pytest.raises(GmarError, match="damaged"):
        Store(path)


# ------------------------------------------------------------------------------------------------ masks


def write_folder(tmp_path: Path, masks: dict[str, bytes | tuple[int, int]]) -> tuple[Path, Path]:
    """Images a, b, c (48×40 px); masks as given: a (width, height) for a real mask, bytes for a file."""
    images, mask_dir = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    mask_dir.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a", "b", "c"):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(images / f"{name}.png")
    for name, mask in masks.items():
        if isinstance(mask, bytes):
            (mask_dir / f"{name}.png").write_bytes(mask)
        else:
            pixels = np.zeros((mask[1], mask[0]), dtype=np.uint8)
            pixels[5:20, 5:20] = 255
            Image.fromarray(pixels).save(mask_dir / f"{name}.png")
    return images, mask_dir


CONFIG = PreprocessConfig(input_size=(32, 32))


def test_mask_of_another_size_skips_the_item(tmp_path, capsys):
    images, masks = write_folder(tmp_path, {"a": (48, 40), "b": (40, 48), "c": (48, 40)})
    items = folder_items(images, masks, CONFIG, None)
    assert [D.item_name(item.key) for item in items] == ["a.png", "c.png"]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "b.png" in err[0] and "40×48" in err[0] and "48×40" in err[0]


def test_transparent_mask_pixels_are_background(tmp_path):
    """A mask drawn as a transparent PNG marks the object with opaque pixels; transparent ones are not
    the object, whatever colour they hold (images are composited over white, masks must not be)."""
    images, masks = write_folder(tmp_path, {})
    drawn = np.zeros((40, 48, 4), dtype=np.uint8)
    drawn[:, :24] = (255, 255, 255, 255)  # the object: the left half, opaque white
    drawn[:, 24:] = (255, 255, 255, 0)  # transparent white elsewhere
    Image.fromarray(drawn, mode="RGBA").save(masks / "a.png")
    item = folder_items(images, masks, PreprocessConfig(input_size=(40, 48)), None)[0]
    expected = torch.zeros(40, 48, dtype=torch.bool)
    expected[:, :24] = True
    assert torch.equal(item.mask, expected)


def test_corrupt_mask_skips_the_item(tmp_path, capsys):
    images, masks = write_folder(tmp_path, {"a": (48, 40), "b": b"not a png", "c": (48, 40)})
    items = folder_items(images, masks, CONFIG, None)
    assert [D.item_name(item.key) for item in items] == ["a.png", "c.png"]
    assert all(item.mask is not None for item in items)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "b.png" in err[0] and "mask" in err[0]


def test_cli_masks_that_do_not_fit(tmp_path, capsys):
    images, masks = write_folder(tmp_path, {"a": (48, 40), "b": b"not a png", "c": (20, 20)})
    out = tmp_path / "eval"
    argv = ["evaluate", "--model", "timm:test_vit", "--random-init", "--data", f"imagefolder:{images}",
            "--masks", str(masks), "--out", str(out), "--methods", "gae", "--metrics", "deletion,pointing",
            "--steps", "2"]  # fmt: skip
    assert main(argv) == 0
    err = capsys.readouterr().err
    reported = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("gmar:")]
    assert "Traceback" not in err and len(reported) == 2, err  # the progress bar also writes to stderr
    assert "b.png" in reported[0] and "c.png: its mask" in reported[1] and "20×20" in reported[1]
    with sqlite3.connect(out / "results.sqlite") as db:
        assert [D.item_name(r[0]) for r in db.execute("SELECT DISTINCT item FROM done")] == ["a.png"]


def test_missing_masks_folder_is_one_error_before_anything_runs(tmp_path, capsys):
    images, _ = write_folder(tmp_path, {})
    out = tmp_path / "eval"
    argv = ["evaluate", "--model", "timm:test_vit", "--random-init", "--data", f"imagefolder:{images}",
            "--masks", str(tmp_path / "nonexistent"), "--out", str(out), "--methods", "gae"]  # fmt: skip
    assert main(argv) == 2
    assert "nonexistent" in one_error_line(capsys)
    assert not out.exists()
    with pytest.raises(GmarError, match="not a folder"):
        folder_items(images, tmp_path / "nonexistent", CONFIG, None)


def test_a_store_that_cannot_be_opened_is_not_called_damaged(tmp_path):
    path = tmp_path / "results.sqlite"
    path.mkdir()  # a folder where the database should be
    with pytest.raises(GmarError, match="cannot use") as caught:
        Store(path)
    assert "damaged" not in str(caught.value)


# ------------------------------------------------------------------------------- databases gmar did not write


OLD_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS scores(item TEXT, method TEXT, metric TEXT, value REAL, PRIMARY KEY(item, method, metric));
CREATE TABLE IF NOT EXISTS curves(item TEXT, method TEXT, curve TEXT, value TEXT, PRIMARY KEY(item, method, curve));
CREATE TABLE IF NOT EXISTS done(item TEXT, method TEXT, PRIMARY KEY(item, method));
"""


def foreign_database(path: Path, kind: str) -> None:
    with sqlite3.connect(path) as db:
        if kind == "users":
            db.execute("CREATE TABLE users(name TEXT, email TEXT)")
            db.execute("INSERT INTO users VALUES ('ada', 'ada@example.org')")
        elif kind == "meta":
            db.execute("CREATE TABLE meta(id INTEGER, a TEXT, b TEXT)")
            db.execute("INSERT INTO meta VALUES (1, 'x', 'y')")
        else:  # gmar's tables and one more
            db.executescript(OLD_SCHEMA + "CREATE TABLE notes(text TEXT);")
    db.close()


@pytest.mark.parametrize("kind", ["users", "meta", "extra_table"])
def test_a_database_gmar_did_not_write_is_refused_untouched(tmp_path, kind):
    path = tmp_path / "results.sqlite"
    foreign_database(path, kind)
    before = fingerprint(tmp_path)
    with pytest.raises(GmarError) as caught:
        Store(path)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message and "not written by gmar" in message
    assert "another --out" in message
    assert fingerprint(tmp_path) == before  # no WAL switch, no table added: not a byte changed
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    db.close()


def test_cli_evaluate_refuses_a_foreign_database_in_one_line(tmp_path, capsys):
    out = tmp_path / "eval"
    out.mkdir()
    foreign_database(out / "results.sqlite", "users")
    before = fingerprint(out)
    checkpoint = save_reference(build_reference_model(TINY), TINY, REPORT, tmp_path / "weights")
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--out", str(out), *FAST]) == 2
    line = one_error_line(capsys)
    assert "users" in line and "not written by gmar" in line
    assert fingerprint(out) == before


def test_gmar_marks_its_database_and_takes_the_previous_versions(tmp_path):
    path = tmp_path / "results.sqlite"
    store = Store(path)
    store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA application_id").fetchone()[0] == S.APPLICATION_ID
        assert db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()[0] == str(S.SCHEMA_VERSION)
    db.close()
    Store(path).close()  # its own: opened again

    old = tmp_path / "old" / "results.sqlite"
    old.parent.mkdir()
    with sqlite3.connect(old) as db:  # as the previous version wrote it: gmar's tables, no mark
        db.execute("PRAGMA journal_mode=WAL")
        db.executescript(OLD_SCHEMA)
        db.execute("INSERT INTO done VALUES ('a.png', 'gae')")
    db.close()
    store = Store(old)
    assert store.done() == {("a.png", "gae")}
    store.close()
    with sqlite3.connect(old) as db:
        assert db.execute("PRAGMA application_id").fetchone()[0] == S.APPLICATION_ID
    db.close()


# ----------------------------------------------------------------------------------------- content keys


def test_replaced_images_under_the_same_names_are_evaluated_again(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(images / f"{name}.png")
    checkpoint = save_reference(build_reference_model(TINY), TINY, REPORT, tmp_path / "weights")
    argv = ["evaluate", "--checkpoint", str(checkpoint), "--data", f"imagefolder:{images}", *FAST[:-4]]
    out = tmp_path / "eval"
    assert main([*argv, "--out", str(out)]) == 0
    first = (out / "results.csv").read_text()
    for name in ("a", "b"):  # other pictures, the same names
        Image.fromarray(np.full((40, 40, 3), 200 if name == "a" else 30, dtype=np.uint8)).save(images / f"{name}.png")
    assert main([*argv, "--out", str(out)]) == 0
    fresh = tmp_path / "fresh"
    assert main([*argv, "--out", str(fresh)]) == 0
    with sqlite3.connect(fresh / "results.sqlite") as db:
        keys = [row[0] for row in db.execute("SELECT DISTINCT item FROM done ORDER BY item")]
    db.close()
    assert [key.split("@")[0] for key in keys] == ["a.png", "b.png"]
    digest = hashlib.blake2b((images / "a.png").read_bytes(), digest_size=8).hexdigest()
    assert keys[0] == f"a.png@{digest}"
    # the re-run scored the new pictures and forgot the old ones': its report is a fresh run's
    with sqlite3.connect(out / "results.sqlite") as db:
        assert [row[0] for row in db.execute("SELECT DISTINCT item FROM done ORDER BY item")] == keys
        assert [row[0] for row in db.execute("SELECT DISTINCT item FROM scores ORDER BY item")] == keys
    db.close()
    assert (out / "results.csv").read_text() == (fresh / "results.csv").read_text() != first


def test_imagenet_seg_items_are_keyed_by_their_content(tmp_path):
    from test_evaluate import write_imagenet_seg

    path = tmp_path / "gtsegs_ijcv.mat"
    write_imagenet_seg(path)
    keys = [item.key for item in D.imagenet_seg_items(path, CONFIG, None)]
    assert [key.split("@")[0] for key in keys] == ["imagenet-seg/00000", "imagenet-seg/00001", "imagenet-seg/00002"]
    assert len(set(key.split("@")[1] for key in keys)) == 3
    assert keys == [item.key for item in D.imagenet_seg_items(path, CONFIG, None)]  # deterministic


def test_a_previous_versions_name_keys_are_replaced_by_content_keys(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.full((40, 40, 3), 90, dtype=np.uint8)).save(images / "a.png")
    checkpoint = save_reference(build_reference_model(TINY), TINY, REPORT, tmp_path / "weights")
    argv = ["evaluate", "--checkpoint", str(checkpoint), "--data", f"imagefolder:{images}", *FAST[:-4]]
    out = tmp_path / "eval"
    assert main([*argv, "--out", str(out)]) == 0
    with sqlite3.connect(out / "results.sqlite") as db:  # as the previous version keyed it: the bare name
        for table in ("scores", "curves", "done"):
            db.execute(f"UPDATE {table} SET item = 'a.png'")
    db.close()
    assert main([*argv, "--out", str(out)]) == 0
    with sqlite3.connect(out / "results.sqlite") as db:
        items = {row[0] for table in ("scores", "done") for row in db.execute(f"SELECT item FROM {table}")}
    db.close()
    assert [D.item_name(item) for item in items] == ["a.png"] and "@" in items.pop()
