"""`gmar evaluate` on every model zoo: every metric reads the model through its adapter (issue 20, item 2),
items stream batch by batch (item 9), and the command line fails early and in one line (item 11)."""

from __future__ import annotations

import csv
import math
import os
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import clip_target, make_clip, make_hf_vit, make_timm, make_torchvision, one_error_line
from gmar.adapters import get_adapter
from gmar.errors import GmarError
from gmar.eval import datasets as D
from gmar.eval import harness as H
from gmar.eval import metrics as M
from gmar.eval import registry as R
from gmar.eval import report as P
from gmar.eval import store as S
from gmar.eval.reference import ReferenceConfig, build_reference_model
from gmar.frontends.cli import main
from gmar.methods import explain, select_methods

SIZE = 32
TINY = ReferenceConfig(image_size=SIZE, patch_size=8, embed_dim=32, depth=2, num_heads=4)


def read_csv(path: Path) -> dict[tuple[str, str], tuple[float, float, int]]:
    with open(path) as handle:
        rows = csv.DictReader(handle)
        return {(r["method"], r["metric"]): (float(r["mean"]), float(r["ci95"]), int(r["n"])) for r in rows}


def hand_items(count: int = 3) -> list[D.Item]:
    """Items with everything a metric can use: masks, other objects, a re-rendered image without the target."""
    generator = torch.Generator().manual_seed(3)
    items = []
    for index in range(count):
        image = torch.randn(3, SIZE, SIZE, generator=generator)
        mask = torch.zeros(SIZE, SIZE, dtype=torch.bool)
        mask[4 + index : 20, 6:22] = True
        other = torch.zeros(1, SIZE, SIZE, dtype=torch.bool)
        other[0, 22:30, 2:12] = True
        removed = image.clone()
        removed[:, mask] = 0.0
        target = None if index == 0 else index  # the prediction, or a given class
        items.append(D.Item(f"item{index}", image, target, mask, other, ((index + 1) % 4,), removed))
    return items


ZOO = {
    "reference": lambda: build_reference_model(TINY),
    "timm": make_timm,
    "hf_vit": make_hf_vit,
    "torchvision": make_torchvision,
}


def stored(out: Path) -> dict[tuple[str, str, str], float | None]:
    with sqlite3.connect(out / "results.sqlite") as db:
        return {(i, m, k): v for i, m, k, v in db.execute("SELECT item, method, metric, value FROM scores")}


@pytest.mark.parametrize("zoo", list(ZOO))
def test_every_metric_on_a_tiny_model_of_each_zoo(zoo, tmp_path):
    model = ZOO[zoo]()
    metrics = R.select_metrics("all")
    settings = H.Settings(
        model=zoo, data="hand", methods=["gae", "gmar"], metrics=metrics, steps=4, sanity_items=2,
        multi_label=zoo == "reference",
    )  # fmt: skip
    items = hand_items()
    H.evaluate(model, items, settings, tmp_path, progress=False).close()
    values = stored(tmp_path)
    per_method = {"deletion_auc", "insertion_auc", "perturbation_positive", "perturbation_negative", "pointing_game",
                  "energy_pointing_game", "pixel_auroc", "pixel_ap", "segmentation_pixel_accuracy",
                  "segmentation_miou", "class_discrimination"}  # fmt: skip
    for item in items:
        for method in ("gae", "gmar"):
            for metric in per_method:
                value = values[(item.key, method, metric)]
                assert value is not None and math.isfinite(value), (item.key, method, metric)
        for metric in ("removal_own_drop", "removal_other_drop", "removal_own_drops_most"):
            assert math.isfinite(values[(item.key, H.MODEL_CHECK, metric)])
    for item in items[:2]:  # --sanity-items 2
        assert math.isfinite(values[(item.key, "gae", "sanity_spearman")])
    head_rows = [k for k in values if k[2].startswith("head_ablation_auc[")]
    assert len(head_rows) == len(items) * len(R.RANKINGS)  # torchvision's too: heads are switched off in the capture
    P.report(S.Store(tmp_path / "results.sqlite"), settings, tmp_path)
    assert (tmp_path / "results.md").is_file()


def hand_deletion(model, image: torch.Tensor, heatmap: torch.Tensor, target: int, steps: int) -> float:
    """Deletion AUC computed directly: the adapter's logits, softmax, pixels zeroed most relevant first."""
    forward = get_adapter(model).forward
    order = torch.argsort(heatmap.flatten(), descending=True, stable=True)
    pixels = heatmap.numel()
    curve = []
    for k in range(steps + 1):
        perturbed = image.clone().view(3, -1)
        perturbed[:, order[: round(k / steps * pixels)]] = 0.0
        with torch.no_grad():
            logits = forward(perturbed.view(1, *image.shape))
        curve.append(float(logits.softmax(dim=1)[0, target]))
    return sum((curve[i] + curve[i + 1]) / 2 / steps for i in range(steps))


def test_hf_deletion_auc_equals_a_hand_computation(tmp_path):
    model = make_hf_vit()
    settings = H.Settings(model="hf", data="hand", methods=["gae"], metrics=["deletion_auc"], steps=5)
    items = hand_items(2)
    H.evaluate(model, items, settings, tmp_path, progress=False).close()
    values = stored(tmp_path)
    for item in items:
        target = item.target
        if target is None:
            with torch.no_grad():
                target = int(get_adapter(model).forward(item.image[None]).argmax())
        heatmap = explain(model, item.image[None], "gae", target=target).heatmap[0]
        expected = hand_deletion(model, item.image, heatmap, target, 5)
        assert values[(item.key, "gae", "deletion_auc")] == pytest.approx(expected, abs=1e-5)


def test_metrics_take_an_openclip_model_with_a_callable_target():
    """An OpenCLIP model returns an embedding: deletion and insertion score the callable's value."""
    model = make_clip()
    images = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))
    heatmaps = torch.rand(2, SIZE, SIZE, generator=torch.Generator().manual_seed(6))
    scorer = M.Scorer(model, target=clip_target)
    auc, curve = M.deletion(scorer, images, heatmaps, None, steps=4)
    torch.testing.assert_close(auc, M.trapezoid(curve, torch.linspace(0, 1, 5)))
    forward = get_adapter(model).forward
    for b in range(2):
        order = torch.argsort(heatmaps[b].flatten(), descending=True, stable=True)
        expected = []
        for k in range(5):
            perturbed = images[b].clone().view(3, -1)
            perturbed[:, order[: round(k / 4 * SIZE * SIZE)]] = 0.0
            with torch.no_grad():
                expected.append(float(clip_target(forward(perturbed.view(1, 3, SIZE, SIZE)))[0]))
        torch.testing.assert_close(curve[b], torch.tensor(expected), atol=1e-5, rtol=1e-5)
    insertion, _ = M.insertion(scorer, images, heatmaps, None, steps=4)
    assert insertion.shape == (2,) and torch.isfinite(insertion).all()
    with pytest.raises(ValueError, match="callable target"):
        M.perturbation(scorer, images, heatmaps, None)
    steps = M.cascading_randomisation(model, lambda m: explain(m, images, "gae", target=clip_target).heatmap)
    assert steps[0][0] == "head" and steps[-1][0] == "embeddings" and len(steps) == 3 + 2


def test_library_evaluate_refuses_an_embedding_model(tmp_path):
    settings = H.Settings(model="clip", data="hand", methods=["gae"], metrics=["deletion_auc"], steps=2)
    with pytest.raises(GmarError, match="classifier"):
        H.evaluate(make_clip(), hand_items(1), settings, tmp_path, progress=False)


def test_cascading_steps_of_every_zoo_follow_the_adapter():
    """Head first, each block from the last, embeddings last: found from the adapter, not timm's names."""
    for factory in (make_hf_vit, make_torchvision):
        model = factory()
        steps = M.cascading_randomisation_steps(model)
        assert [label for label, _ in steps] == ["head", "block 2", "block 1", "block 0", "embeddings"]
        named = dict(steps)
        blocks = get_adapter(model).blocks
        for index, block in enumerate(blocks):
            ids = {id(p) for p in block.parameters()}
            params = dict(model.named_parameters())
            assert {id(params[n]) for n in named[f"block {index}"]} == ids
        assert any("class" in n or "cls" in n for n in named["embeddings"]), named["embeddings"]
        assert any("classifier" in n or "heads" in n for n in named["head"]), named["head"]
        listed = [n for _, names in steps for n in names]
        assert sorted(listed) == sorted(n for n, _ in model.named_parameters())


# ------------------------------------------------------------------------------------------ command line


def write_images(folder: Path, count: int, size: int = 40, seed: int = 0, suffix: str = ".png") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for index in range(count):
        path = folder / f"im{index:03d}{suffix}"
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hf-vit")
    make_hf_vit().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def hf_scenes_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hf-vit-6")
    make_hf_vit(num_labels=6).save_pretrained(folder)
    return folder


def test_cli_evaluate_a_saved_hf_classifier_on_a_folder(hf_dir, tmp_path):
    images = tmp_path / "img"
    write_images(images, 3)
    out = tmp_path / "out"
    argv = ["evaluate", "--model", f"hf:{hf_dir}", "--data", f"imagefolder:{images}", "--methods", "gae,gmar",
            "--metrics", "all", "--steps", "2", "--sanity-items", "1", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    table = read_csv(out / "results.csv")
    assert table[("gae", "deletion_auc")][2] == 3 and table[("gmar", "perturbation_positive")][2] == 3
    assert table[("gae", "sanity_spearman")][2] == 1 and table[("heads:oracle", "head_ablation_auc")][2] == 3


def test_cli_evaluate_a_six_class_hf_classifier_on_scenes(hf_scenes_dir, tmp_path):
    out = tmp_path / "out"
    argv = ["evaluate", "--model", f"hf:{hf_scenes_dir}", "--limit", "2", "--steps", "2", "--sanity-items", "1",
            "--methods", "gae", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    table = read_csv(out / "results.csv")
    assert table[("gae", "deletion_auc")][2] >= 2 and ("gae", "class_discrimination") in table


# ------------------------------------------------------------------------------------------- streaming


def count_decodes(monkeypatch) -> list[str]:
    decoded: list[str] = []
    load = D.load_image

    def counting(path, *args, **kwargs):
        decoded.append(Path(path).name)
        return load(path, *args, **kwargs)

    monkeypatch.setattr(D, "load_image", counting)
    return decoded


def folder_settings(folder: Path) -> H.Settings:
    return H.Settings(model="t", data=f"imagefolder:{folder}", methods=["gae"], metrics=["deletion_auc"], steps=2)


def test_folder_items_stream_one_batch_at_a_time(tmp_path, monkeypatch):
    folder = tmp_path / "img"
    write_images(folder, 10)
    decoded = count_decodes(monkeypatch)
    config = get_adapter(make_timm()).preprocess_config()
    items = D.image_files(folder, None, config, None)
    assert decoded == []  # listing decodes nothing
    seen = []
    H.evaluate(make_timm(), items, folder_settings(folder), tmp_path / "out", batch_size=3, progress=False,
               after_batch=lambda: seen.append(len(decoded)))  # fmt: skip
    assert seen == [3, 6, 9, 10]
    decoded.clear()
    H.evaluate(make_timm(), items, folder_settings(folder), tmp_path / "out", batch_size=3, progress=False).close()
    assert decoded == []  # resumed: every item is done, none is decoded


def test_a_rank_decodes_only_its_share(tmp_path, monkeypatch):
    folder = tmp_path / "img"
    paths = write_images(folder, 7)
    decoded = count_decodes(monkeypatch)
    config = get_adapter(make_timm()).preprocess_config()
    items = D.image_files(folder, None, config, None)
    H.evaluate(make_timm(), items, folder_settings(folder), tmp_path / "out", progress=False, rank=1, world=3).close()
    assert decoded == [paths[i].name for i in (1, 4)]


def test_a_memory_error_on_one_image_skips_it(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "img"
    write_images(folder, 3)
    load = D.load_image

    def failing(path, *args, **kwargs):
        if Path(path).name == "im001.png":
            raise MemoryError
        return load(path, *args, **kwargs)

    monkeypatch.setattr(D, "load_image", failing)
    config = get_adapter(make_timm()).preprocess_config()
    store = H.evaluate(make_timm(), D.image_files(folder, None, config, None), folder_settings(folder),
                       tmp_path / "out", progress=False)  # fmt: skip
    assert sorted(item.split("@")[0] for item, _ in store.done()) == ["im000.png", "im002.png"]
    store.close()
    lines = [line for line in capsys.readouterr().err.splitlines() if "im001.png" in line]
    assert len(lines) == 1 and lines[0].startswith("gmar: skipped ") and "memory" in lines[0]


def test_folder_scans_take_the_suffixes_explain_takes(tmp_path):
    from gmar.frontends.cli import IMAGE_SUFFIXES as CLI_SUFFIXES
    from gmar.preprocess import IMAGE_SUFFIXES

    assert set(CLI_SUFFIXES) <= IMAGE_SUFFIXES and {".gif", ".avif", ".ico"} <= IMAGE_SUFFIXES
    folder = tmp_path / "img"
    write_images(folder, 1, suffix=".gif")
    write_images(folder, 1, suffix=".ico", seed=1)
    (folder / "notes.txt").write_text("not an image")
    items = D.folder_items(folder, None, get_adapter(make_timm()).preprocess_config(), None)
    assert sorted(item.key.split("@")[0] for item in items) == ["im000.gif", "im000.ico"]


# ------------------------------------------------------------------------------------------- early errors


def test_a_method_named_twice_runs_once(capsys):
    assert select_methods("gae,gae, gmar,gae") == ["gae", "gmar"]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "gae" in err and "twice" in err and "Traceback" not in err


def test_cli_evaluate_with_a_method_named_twice(tmp_path):
    out = tmp_path / "out"
    argv = ["evaluate", "--model", "reference", "--limit", "1", "--methods", "gae,gae", "--metrics", "deletion",
            "--steps", "2", "--sanity-items", "0", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert {m for m, _ in read_csv(out / "results.csv")} == {"gae"}


def test_cli_explain_with_a_method_named_twice(tmp_path):
    out = tmp_path / "out"
    assert main(["explain", "--example", "--model", "timm:test_vit", "--random-init", "--method", "gae,gae",
                 "--out", str(out)]) == 0  # fmt: skip
    assert len([p for p in out.iterdir() if p.suffix == ".png"]) == 2


@pytest.mark.parametrize("kind", ["under_a_file", "read_only"])
def test_an_unwritable_out_is_refused_before_the_model_loads(tmp_path, monkeypatch, capsys, kind):
    import gmar.frontends.cli

    if kind == "under_a_file":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "eval"
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        out = locked / "eval"
    loaded = []
    monkeypatch.setattr(gmar.frontends.cli, "_evaluation_model", lambda *a: loaded.append(1) or 1 / 0)
    assert main(["evaluate", "--model", "reference", "--out", str(out), "--limit", "1"]) == 2
    line = one_error_line(capsys)
    assert str(out) in line and "--out" in line and loaded == []


def test_cli_evaluate_asks_the_method_registry_which_methods_fit(tmp_path, capsys, monkeypatch):
    """``all`` is what the model can run (a Swin model: Grad-CAM, as the attention methods need global
    attention; before, every method was tried); a named method it cannot run is one line."""
    from conftest import make_swin
    from gmar.frontends import cli
    from gmar.methods import methods_for

    swin = make_swin("timm_swin")
    assert methods_for(swin) == ["gradcam"]
    monkeypatch.setattr(
        cli, "_evaluation_model", lambda args, device: (swin, get_adapter(swin).preprocess_config(), False)
    )
    folder = tmp_path / "img"
    folder.mkdir()
    Image.new("RGB", (40, 40), (120, 30, 200)).save(folder / "a.png")
    argv = [
        "evaluate",
        "--model",
        "timm:swin",
        "--data",
        f"imagefolder:{folder}",
        "--metrics",
        "deletion",
        "--steps",
        "2",
    ]
    assert cli.main([*argv, "--methods", "all", "--out", str(tmp_path / "all")]) == 0
    with open(tmp_path / "all" / "results.csv") as handle:
        assert {row["method"] for row in csv.DictReader(handle)} == {"gradcam"}
    capsys.readouterr()
    assert cli.main([*argv, "--methods", "gae", "--out", str(tmp_path / "gae")]) == 2
    assert "no global token-to-token attention for gae" in one_error_line(capsys)


def test_evaluate_names_the_file_a_warning_comes_from(tmp_path, capsys):
    """Pillow's "Corrupt EXIF data" while evaluate decodes a folder is one line naming the image (it
    printed as a bare UserWarning before), and the image is still evaluated."""
    from gmar.frontends.cli import main
    from test_images import corrupt_exif_jpeg

    folder = tmp_path / "img"
    folder.mkdir()
    photo = corrupt_exif_jpeg(folder / "photo.jpg")
    argv = ["evaluate", "--model", "reference", "--data", f"imagefolder:{folder}", "--methods", "rollout"]
    assert main([*argv, "--metrics", "deletion", "--steps", "2", "--out", str(tmp_path / "out")]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if "EXIF" in line]
    assert len(lines) == 1 and lines[0].startswith(f"gmar: {photo}: Corrupt EXIF data."), lines
