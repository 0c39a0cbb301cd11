"""docs/extending.md's worked examples run as written: a model family, a method and a metric
registered from outside the package, explained and evaluated."""

from __future__ import annotations

import re
from pathlib import Path

import gmar

DOC = Path(__file__).resolve().parent.parent / "docs" / "extending.md"


def blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def test_the_worked_examples_run_and_check_themselves(tmp_path, monkeypatch):
    from gmar import adapters, methods
    from gmar.eval import registry

    monkeypatch.chdir(tmp_path)  # anything an example writes lands here
    before = (list(adapters.REGISTERED), dict(methods.METHODS), dict(registry.METRICS))
    code = blocks()
    assert len(code) >= 4, "the examples are python blocks of docs/extending.md"
    namespace: dict = {"__name__": "extending_example"}
    try:
        for block in code:
            exec(compile(block, str(DOC), "exec"), namespace)
    finally:
        adapters.REGISTERED[:] = before[0]
        methods.METHODS.clear()
        methods.METHODS.update(before[1])
        registry.METRICS.clear()
        registry.METRICS.update(before[2])
    assert "last_attention" not in gmar.available_methods() and "mass_in_mask" not in registry.METRICS
    assert (tmp_path / "evaluation" / "results.md").is_file()
