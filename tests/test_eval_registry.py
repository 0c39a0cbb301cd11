"""The metric registry is the one place a metric is declared: a toy entry registered here reaches
the CLI's ``--metrics``, the harness, the store and the report without any other change."""

from __future__ import annotations

import argparse
import csv
import sqlite3

import pytest
import torch

from conftest import one_error_line
from gmar.eval import metrics as M
from gmar.eval import registry as R
from gmar.eval.reference import ReferenceConfig, build_reference_model, save_reference
from gmar.frontends.cli import build_parser, main

TINY = ReferenceConfig(image_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4)
REPORT = {"test_exact_set_accuracy": 0.0, "test_scenes": 0, "train_seconds": 0.0, "threads": 1}


def mass_in_mask(ctx: R.Context) -> torch.Tensor:
    """The share of the map's mass inside the target's mask (only items with a mask reach it)."""
    maps = ctx.heatmaps.flatten(1).clamp_min(0)
    return (maps * ctx.masks.flatten(1)).sum(1) / maps.sum(1).clamp_min(1e-12)


TOY = R.Metric("toy_mass", "higher", "toy_group", "toy", frozenset({"mask"}), mass_in_mask, label="toy")


@pytest.fixture
def toy():
    """The toy metric, registered for one test and removed after it."""
    before = dict(R.METRICS)
    R.register(TOY)
    yield TOY
    R.METRICS.clear()
    R.METRICS.update(before)


def help_text(command: str = "evaluate") -> str:
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return commands.choices[command].format_help()


def test_a_registered_metric_is_selectable_scored_stored_and_reported(toy, tmp_path):
    assert "toy" in help_text().replace("\n", "").replace(" ", "")
    assert R.select_metrics("toy") == ["toy_mass"] and "toy_mass" in R.select_metrics("all")
    assert M.DIRECTION["toy_mass"] == "higher"
    checkpoint = save_reference(build_reference_model(TINY), TINY, REPORT, tmp_path / "weights")
    out = tmp_path / "eval"
    argv = ["evaluate", "--checkpoint", str(checkpoint), "--methods", "gae", "--metrics", "toy,energy",
            "--limit", "2", "--sanity-items", "0", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    with open(out / "results.csv") as handle:
        rows = {(r["method"], r["metric"]): r for r in csv.DictReader(handle)}
    toy_row, energy = rows[("gae", "toy_mass")], rows[("gae", "energy_pointing_game")]
    assert toy_row["better"] == "higher" and int(toy_row["n"]) == int(energy["n"]) >= 2
    # the toy's share of the mass is the energy pointing game on these min-max normalised maps
    assert float(toy_row["mean"]) == pytest.approx(float(energy["mean"]), abs=1e-5)
    assert "toy_mass ↑" in (out / "results.md").read_text()
    assert (out / "toy_group.png").is_file()  # its group gets its plot


def test_the_store_names_each_items_class(tmp_path):
    checkpoint = save_reference(build_reference_model(TINY), TINY, REPORT, tmp_path / "weights")
    out = tmp_path / "eval"
    argv = ["evaluate", "--checkpoint", str(checkpoint), "--methods", "gae", "--metrics", "energy",
            "--limit", "2", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    with sqlite3.connect(out / "results.sqlite") as db:
        rows = db.execute("SELECT item, class, name FROM targets ORDER BY item").fetchall()
        scored = {item for (item,) in db.execute("SELECT DISTINCT item FROM scores")}
    from gmar.eval.scenes import CLASSES

    assert {item for item, _, _ in rows} == scored
    for item, cls, name in rows:
        assert item.endswith(f"/c{cls}") and name == CLASSES[cls]


def test_an_entry_is_checked_when_declared():
    with pytest.raises(ValueError, match="direction"):
        R.Metric("bad", "up", "toy_group", "toy", frozenset(), mass_in_mask)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs"):
        R.Metric("bad", "higher", "toy_group", "toy", frozenset({"masks"}), mass_in_mask)
    with pytest.raises(ValueError, match="registered already"):
        R.register(R.METRICS["deletion_auc"])


def test_an_unknown_selector_names_the_registered_ones(capsys, tmp_path):
    assert main(["evaluate", "--metrics", "nonsense", "--out", str(tmp_path / "o")]) == 2
    line = one_error_line(capsys)
    assert "nonsense" in line and all(name in line for name in R.selectors())
