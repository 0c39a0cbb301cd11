"""`gmar evaluate` end to end: outputs, kill-and-resume, two torchrun processes, and the data sources."""

from __future__ import annotations

import csv
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gmar.eval.reference import ReferenceConfig, build_reference_model, save_reference
from gmar.frontends.cli import main
from tolerance import FLOAT32

TINY = ReferenceConfig(image_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4)
FAST = ["--methods", "gmar,gae", "--metrics", "deletion,perturbation,pointing,energy,head_ablation", "--steps", "4"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """An untrained reference-architecture checkpoint (the harness does not care how good it is)."""
    folder = tmp_path_factory.mktemp("tiny-reference")
    report = {"test_exact_set_accuracy": 0.0, "test_scenes": 0, "train_seconds": 0.0, "threads": 1}
    return save_reference(build_reference_model(TINY), TINY, report, folder)


def evaluate_argv(checkpoint: Path, out: Path, *extra: str) -> list[str]:
    return ["evaluate", "--checkpoint", str(checkpoint), "--out", str(out), *extra]


def read_csv(path: Path) -> dict[tuple[str, str], tuple[float, float, int]]:
    with open(path) as handle:
        return {
            (r["method"], r["metric"]): (float(r["mean"]), float(r["ci95"]), int(r["n"]))
            for r in csv.DictReader(handle)
        }


def assert_same_tables(a: Path, b: Path) -> None:
    first, second = read_csv(a / "results.csv"), read_csv(b / "results.csv")
    assert first.keys() == second.keys()
    for key in first:
        np.testing.assert_allclose(first[key][:2], second[key][:2], **FLOAT32, err_msg=str(key))
        assert first[key][2] == second[key][2], key


def done_count(db: Path) -> int:
    try:
        with sqlite3.connect(db, timeout=5) as connection:
            return connection.execute("SELECT COUNT(*) FROM done").fetchone()[0]
    except sqlite3.Error:
        return 0


def test_writes_tables_plots_and_per_item_rows(checkpoint, tmp_path):
    out = tmp_path / "run"
    assert main(evaluate_argv(checkpoint, out, "--limit", "4", "--steps", "4", "--sanity-items", "2")) == 0
    for name in ("results.md", "results.csv", "results.sqlite", "faithfulness.png", "localisation.png",
                 "deletion_insertion.png", "head_ablation.png", "sanity.png", "discrimination.png"):  # fmt: skip
        assert (out / name).is_file(), name
    table = read_csv(out / "results.csv")
    methods = {m for m, _ in table}
    rankings = {f"heads:{name}" for name in ("gmar", "taylor", "gmar_gae", "oracle", "random", "reverse")}
    assert {"gmar", "rollout", "legrad", "gradcam", "gmar_gae", *rankings} <= methods
    assert "occlusion" not in methods  # slow: asked by name only
    oracle = table[("heads:oracle", "head_ablation_auc")][0]
    assert all(oracle <= table[(name, "head_ablation_auc")][0] + 0.05 for name in rankings)
    with sqlite3.connect(out / "results.sqlite") as db:
        items = db.execute("SELECT COUNT(DISTINCT item) FROM done").fetchone()[0]
        rows = db.execute("SELECT COUNT(*) FROM scores WHERE method='gmar' AND metric='pointing_game'").fetchone()[0]
    assert items == rows == table[("gmar", "pointing_game")][2]
    assert table[("gmar", "sanity_spearman")][2] == 2  # --sanity-items
    for (method, metric), (mean, _, _) in table.items():
        if metric in ("pointing_game", "energy_pointing_game", "pixel_auroc", "pixel_ap", "segmentation_miou"):
            assert 0.0 <= mean <= 1.0, (method, metric)
    markdown = (out / "results.md").read_text()
    assert "| gmar |" in markdown and "Head-importance faithfulness" in markdown and "**" in markdown
    assert "## gmar_gae against gae, item by item" in markdown and "| oracle | — |" in markdown
    assert "## gmar against rollout, item by item" in markdown and "| pointing_game ↑ | " in markdown
    # The randomisation steps of a 2-block model: head, block 1, block 0, embeddings.
    assert "| method | head | block 1 | block 0 | embeddings |" in markdown


def test_resume_after_kill_loses_nothing(checkpoint, tmp_path):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    argv = ["--limit", "24", "--batch-size", "2", *FAST]
    assert main(evaluate_argv(checkpoint, whole, *argv)) == 0
    total = done_count(whole / "results.sqlite")

    command = [sys.executable, "-m", "gmar", *evaluate_argv(checkpoint, resumed, *argv)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while done_count(resumed / "results.sqlite") < 4 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    stored = done_count(resumed / "results.sqlite")
    assert 0 < stored < total, f"the kill must land mid-run (stored {stored} of {total})"
    assert not (resumed / "results.csv").exists()

    assert main(evaluate_argv(checkpoint, resumed, *argv)) == 0
    assert done_count(resumed / "results.sqlite") == total
    assert_same_tables(whole, resumed)


def test_other_settings_in_the_same_folder_are_refused(checkpoint, tmp_path, capsys):
    out = tmp_path / "mixed"
    assert main(evaluate_argv(checkpoint, out, "--limit", "2", *FAST)) == 0
    assert main(evaluate_argv(checkpoint, out, "--limit", "2", *FAST[:-1], "5")) == 2
    assert "other settings (steps)" in capsys.readouterr().err


def test_two_torchrun_processes_merge_to_the_single_process_table(checkpoint, tmp_path):
    single, double = tmp_path / "single", tmp_path / "double"
    argv = ["--limit", "6", *FAST]
    assert main(evaluate_argv(checkpoint, single, *argv)) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "gmar",
               *evaluate_argv(checkpoint, double, *argv)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    # a rank's own traceback comes first, the launcher's summary last: show both
    assert result.returncode == 0, result.stderr[:4000] + "\n...\n" + result.stderr[-1500:]
    assert result.stdout.count("results in") == 1, "rank 0 alone writes the report"
    assert_same_tables(single, double)


def write_imagenet_seg(path: Path, count: int = 3) -> list[np.ndarray]:
    """A file in gtsegs_ijcv.mat's layout: `value/img` and `value/gt` hold references to arrays
    stored transposed ((3, W, H) and (W, H))."""
    import h5py

    rng = np.random.default_rng(0)
    truths = []
    with h5py.File(path, "w") as handle:
        refs = handle.create_group("#refs#")
        images = handle.create_dataset("value/img", (count, 1), dtype=h5py.ref_dtype)
        gts = handle.create_dataset("value/gt", (count, 1), dtype=h5py.ref_dtype)
        for i in range(count):
            height, width = 40 + 8 * i, 56
            picture = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
            truth = np.zeros((height, width), dtype=np.uint8)
            truth[5:25, 10 + i : 40] = 1
            truths.append(truth)
            images[i, 0] = refs.create_dataset(f"img{i}", data=picture.transpose(2, 1, 0)).ref
            gts[i, 0] = refs.create_dataset(f"gt{i}", data=truth.transpose(1, 0)).ref
    return truths


def test_imagenet_segmentation_file(tmp_path):
    from gmar.eval.datasets import imagenet_seg_items
    from gmar.preprocess import PreprocessConfig

    path = tmp_path / "gtsegs_ijcv.mat"
    truths = write_imagenet_seg(path)
    config = PreprocessConfig(input_size=(32, 32), mean=(0.5,) * 3, std=(0.5,) * 3)
    items = imagenet_seg_items(path, config, limit=None)
    from gmar.eval.datasets import item_name

    assert [item_name(i.key) for i in items] == ["imagenet-seg/00000", "imagenet-seg/00001", "imagenet-seg/00002"]
    for item, truth in zip(items, truths, strict=True):
        assert item.image.shape == (3, 32, 32) and item.target is None
        # The mask went through the image's own resize and centre crop (nearest neighbour).
        from gmar.eval.datasets import _mask_to_input

        assert torch.equal(item.mask, _mask_to_input(truth > 0, config))
        assert 0 < int(item.mask.sum()) < 32 * 32
    assert len(imagenet_seg_items(path, config, limit=2)) == 2

    out = tmp_path / "seg"
    argv = ["evaluate", "--model", "timm:test_vit", "--random-init", "--imagenet-seg", str(path), "--out", str(out),
            "--methods", "rollout,gradcam", "--metrics", "pointing,energy,auroc,segmentation"]  # fmt: skip
    assert main(argv) == 0
    table = read_csv(out / "results.csv")
    assert table[("gradcam", "segmentation_miou")][2] == 3


def test_image_folder_with_masks_and_a_corrupt_image(tmp_path, capsys):
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    rng = np.random.default_rng(1)
    for name in ("a", "b"):
        Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(images / f"{name}.png")
    mask = np.zeros((48, 48), dtype=np.uint8)
    mask[10:30, 10:30] = 255
    Image.fromarray(mask).save(masks / "a.png")
    (images / "c.jpg").write_bytes(b"not an image")
    out = tmp_path / "folder"
    argv = ["evaluate", "--model", "timm:test_vit", "--random-init", "--data", f"imagefolder:{images}",
            "--masks", str(masks), "--out", str(out), "--methods", "gradcam", "--metrics", "deletion,pointing",
            "--steps", "2"]  # fmt: skip
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "c.jpg" in err and "no mask for b.png" in err
    table = read_csv(out / "results.csv")
    assert table[("gradcam", "deletion_auc")][2] == 2 and table[("gradcam", "pointing_game")][2] == 1


def test_scenes_need_a_model_with_the_scene_classes(tmp_path, capsys):
    argv = ["evaluate", "--model", "timm:test_vit", "--random-init", "--out", str(tmp_path / "x"), "--limit", "1"]
    assert main(argv) == 2
    assert "the scenes have 6 classes" in capsys.readouterr().err


def test_demo_writes_its_figures_and_table(checkpoint, tmp_path, monkeypatch, capsys):
    import gmar.frontends.demo
    from gmar.eval.reference import load_reference_model

    monkeypatch.setattr(gmar.frontends.demo, "load_reference_model", lambda: load_reference_model(checkpoint))
    assert main(["demo", "--out", str(tmp_path / "demo"), "--scenes", "3"]) == 0
    printed = capsys.readouterr().out
    for name in ("scenes.png", "gmar_heads.png", "evaluation/results.md", "evaluation/results.csv"):
        assert (tmp_path / "demo" / name).is_file(), name
        assert str(tmp_path / "demo" / name.split("/")[0]) in printed
    assert len(read_csv(tmp_path / "demo" / "evaluation" / "results.csv")) > 20


def test_store_waits_while_another_process_switches_the_journal(tmp_path, monkeypatch):
    """Two ranks opening the store at once: SQLite may refuse the WAL switch with "locked" at once."""
    import sqlite3

    from gmar.eval import store as S

    refusals = []

    class Busy(sqlite3.Connection):
        def execute(self, sql, *args):
            if sql.startswith("PRAGMA journal_mode") and len(refusals) < 3:
                refusals.append(sql)
                raise sqlite3.OperationalError("database is locked")
            return super().execute(sql, *args)

    connect = sqlite3.connect
    monkeypatch.setattr(S.sqlite3, "connect", lambda path, **kw: connect(path, factory=Busy, **kw))
    store = S.Store(tmp_path / "results.sqlite")
    assert len(refusals) == 3
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_gmar_against_rollout_item_by_item(tmp_path):
    """The paired section against a hand computation: per-item differences, their CI, the verdict."""
    import statistics

    from gmar.eval.report import _paired
    from gmar.eval.store import Store

    store = Store(tmp_path / "results.sqlite")
    deletion = {"a": (0.20, 0.30), "b": (0.30, 0.42), "c": (0.25, 0.33), "d": (0.10, 0.20)}  # gmar, rollout
    pointing = {"a": (1.0, 0.0), "b": (0.0, 1.0), "c": (1.0, 1.0), "d": (0.0, 0.0)}
    energy = {"a": (0.1, 0.3), "b": (0.2, 0.42), "c": (0.3, 0.48), "d": (0.1, 0.3)}
    for item in "abcd":
        for column, method in enumerate(("gmar", "rollout")):
            scores = {
                "deletion_auc": deletion[item][column],
                "pointing_game": pointing[item][column],
                "energy_pointing_game": energy[item][column],
            }
            store.write(item, method, scores, {})
    store.write("e", "gmar", {"deletion_auc": 0.9, "pointing_game": float("nan")}, {})  # no rollout: not paired
    store.write("f", "gmar", {"pointing_game": float("nan")}, {})
    store.write("f", "rollout", {"pointing_game": 1.0}, {})  # gmar has no value: not paired

    rows = store.scores()
    store.close()
    text = _paired(rows, ["gmar", "rollout", "gae"], ["deletion_auc", "pointing_game", "energy_pointing_game"])

    def row(pairs):
        differences = [g - r for g, r in pairs.values()]
        ci = 1.96 * statistics.stdev(differences) / 2  # sqrt(4 items)
        return f"{statistics.mean(differences):+.4f} ± {ci:.4f} | 4 |"

    assert f"| deletion_auc ↓ | {row(deletion)} gmar better |" in text
    assert f"| pointing_game ↑ | {row(pointing)} no clear difference |" in text
    assert f"| energy_pointing_game ↑ | {row(energy)} rollout better |" in text
    assert _paired(rows, ["gmar", "gae"], ["deletion_auc"]) == ""


def test_image_folder_skips_an_image_too_large_to_decode(tmp_path, capsys):
    from test_images import bomb_png

    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.random.default_rng(2).integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(images / "a.png")
    bomb_png(images / "huge.png")
    out = tmp_path / "folder"
    argv = ["evaluate", "--model", "timm:test_vit", "--random-init", "--data", f"imagefolder:{images}",
            "--out", str(out), "--methods", "gradcam", "--metrics", "deletion", "--steps", "2"]  # fmt: skip
    assert main(argv) == 0
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if "huge.png" in line]
    assert line.startswith("gmar: skipped ") and "too large: 400000000 pixels" in line and "Traceback" not in err
    assert read_csv(out / "results.csv")[("gradcam", "deletion_auc")][2] == 1


def test_a_report_never_replaces_a_file_gmar_did_not_write(checkpoint, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "results.md").write_text("my notes")
    assert main(evaluate_argv(checkpoint, out, "--limit", "2", *FAST)) == 2
    err = capsys.readouterr().err
    assert err == (
        f"gmar: error: {out / 'results.md'} exists and was not written by gmar; gmar leaves it alone: "
        "move it away or use another --out\n"
    )
    assert (out / "results.md").read_text() == "my notes" and not (out / "results.sqlite").exists()
    (out / "results.md").unlink()
    assert main(evaluate_argv(checkpoint, out, "--limit", "2", *FAST)) == 0
    assert main(evaluate_argv(checkpoint, out, "--limit", "2", *FAST)) == 0  # its own report is replaced


def test_occlusion_and_gmar_gae_by_name(checkpoint, tmp_path):
    """Occlusion is evaluated when named (it is not in "all"); gmar_gae is paired with GAE item by item."""
    out = tmp_path / "named"
    argv = ["--methods", "gae,gmar_gae,occlusion", "--metrics", "pointing,deletion", "--steps", "2", "--limit", "3"]
    assert main(evaluate_argv(checkpoint, out, *argv)) == 0
    table = read_csv(out / "results.csv")
    assert {m for m, _ in table} == {"gae", "gmar_gae", "occlusion"}
    markdown = (out / "results.md").read_text()
    assert "| occlusion |" in markdown and "## gmar_gae against gae, item by item" in markdown


def test_the_model_check_against_a_loop_over_removals(tmp_path, capsys):
    """Each item of a multi-object scene against logits read one image at a time, and the report's
    section with the verdict its rate calls for."""
    from conftest import spread
    from gmar.eval.reference import load_reference_model
    from gmar.eval.report import MODEL_CHECK_WARNING, model_check_verdict
    from gmar.eval.scenes import Scenes

    report = {"test_exact_set_accuracy": 0.0, "test_scenes": 0, "train_seconds": 0.0, "threads": 1}
    path = save_reference(spread(build_reference_model(TINY)), TINY, report, tmp_path / "spread")
    out = tmp_path / "check"
    argv = evaluate_argv(path, out, "--limit", "8", "--methods", "gae", "--metrics", "pointing,model_check")
    assert main(argv) == 0
    model, scenes = load_reference_model(path), Scenes("test", 8, image_size=32)
    expected = {}
    for scene in scenes:
        for cls in scene.classes if len(scene.classes) > 1 else []:
            with torch.no_grad():
                drop = (model(scene.image[None]) - model(scenes.without(scene.index, cls).image[None]))[0].tolist()
            rest = [drop[c] for c in scene.classes if c != cls]
            expected[f"scene{scene.index:05d}/c{cls}"] = {
                "removal_own_drop": drop[cls],
                "removal_other_drop": sum(rest) / len(rest),
                "removal_own_drops_most": float(drop[cls] > max(rest)),
            }
    assert len(expected) >= 6
    with sqlite3.connect(out / "results.sqlite") as db:
        rows = db.execute("SELECT item, metric, value FROM scores WHERE method='model_check'").fetchall()
        items = db.execute("SELECT COUNT(DISTINCT item) FROM done").fetchone()[0]
    stored = {}
    for item, metric, value in rows:
        stored.setdefault(item, {})[metric] = value
    assert stored.keys() == expected.keys() and items > len(expected)  # single-object scenes: no check
    for item, values in expected.items():
        for metric, value in values.items():
            assert stored[item][metric] == pytest.approx(value, abs=1e-4), (item, metric)
    rate = sum(v["removal_own_drops_most"] for v in expected.values()) / len(expected)
    table = read_csv(out / "results.csv")
    assert table[("model_check", "removal_own_drops_most")][0] == pytest.approx(rate)
    assert table[("model_check", "removal_own_drop")][2] == len(expected)
    markdown = (out / "results.md").read_text()
    assert "## Model check: does removing an object lower its own class most?" in markdown
    assert model_check_verdict(rate) in markdown and "| gae |" in markdown
    assert "model_check" not in markdown.split("## Model check")[0], "not a column of the methods' table"
    # an untrained model fails the check, and the console says so too
    assert rate < MODEL_CHECK_WARNING and "gmar: warning: removing an object" in capsys.readouterr().err
    assert model_check_verdict(rate).startswith("**Warning:**")
    assert model_check_verdict(MODEL_CHECK_WARNING - 0.01).startswith("**Warning:**")
    assert not model_check_verdict(MODEL_CHECK_WARNING).startswith("**Warning:**")


def test_the_model_check_says_when_the_data_cannot_run_it(checkpoint, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(np.full((32, 32, 3), 90, dtype=np.uint8)).save(folder / "a.png")
    out = tmp_path / "folder"
    argv = evaluate_argv(checkpoint, out, "--data", f"imagefolder:{folder}", "--methods", "gae", "--metrics", "all")
    assert main([*argv, "--steps", "2", "--sanity-items", "1"]) == 0
    markdown = (out / "results.md").read_text()
    assert "## Model check" in markdown and "Not measured: the check needs data that can re-render" in markdown
    assert not any(method == "model_check" for method, _ in read_csv(out / "results.csv"))
