"""The overhead benchmark keeps running (a smoke run on a tiny model; no timing is asserted)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import gmar


def test_overhead_benchmark_reports_every_method(capsys):
    path = Path(__file__).parents[1] / "benchmarks" / "overhead.py"
    spec = importlib.util.spec_from_file_location("overhead", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    ratios = module.main(["--model", "test_vit", "--batch-size", "2", "--repeats", "1"])
    assert set(ratios) == {"F", "FB", *gmar.available_methods()}
    assert ratios["F"] == 1.0 and ratios["FB"] == 1.0
    printed = capsys.readouterr().out
    for method in gmar.available_methods():
        assert method in printed
