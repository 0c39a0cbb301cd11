"""The coverage sweep (``gmar models``) and docs/models.md, which it writes."""

from __future__ import annotations

import functools
import re
from pathlib import Path

import pytest

import gmar
from gmar.frontends import models as C
from gmar.frontends.cli import main

DOC = Path(__file__).resolve().parents[1] / "docs" / "models.md"
METHODS = gmar.available_methods()
ROLLOUT_FAMILY = {"raw_attention", "rollout", "grad_rollout", "gae", "gmar_gae", "gmar"}
#: Chefer et al.'s rules: classifiers whose residual sums gmar knows (timm's pre-norm ViT blocks)
CHEFER = {"transformer_attribution", "partial_lrp"}


@functools.cache
def sweep() -> tuple[C.Result, ...]:
    return tuple(C.check(case) for case in C.cases())


def statuses(result: C.Result) -> dict[str, str]:
    return {method: outcome.status for method, outcome in result.outcomes.items()}


def test_the_sweep_covers_every_installed_zoo_and_method():
    results = sweep()
    assert {r.case.zoo for r in results} == set(C.installed_zoos()) == {"timm", "hf", "openclip", "torchvision"}
    for result in results:
        assert list(result.outcomes) == METHODS, result.case.example


def test_no_class_fails_every_refusal_is_one_line():
    """A model is explained or refused with gmar's one-line reason, never a crash or a wrong-sized map."""
    failures = [(r.case.example, m, o.detail) for r in sweep() for m, o in r.outcomes.items() if o.status == C.FAILED]
    assert failures == []
    for result in sweep():
        for outcome in result.outcomes.values():
            assert "\n" not in outcome.detail
            assert outcome.status == C.EXPLAINED or outcome.detail


@pytest.mark.parametrize(
    ("example", "explained"),
    [
        ("vit_tiny_patch16_224", set(METHODS)),
        ("vit_tiny_r_s16_p8_224", set(METHODS)),  # hybrid stem: the grid must cover the whole input
        ("vit_base_mci_224", set(METHODS)),
        ("vit_base_patch16_siglip_224", {"legrad", "gradcam", "occlusion"}),  # attention pooling: no readout token
        ("ViTForImageClassification", set(METHODS) - CHEFER),
        ("Dinov2Model", set(METHODS) - CHEFER),  # a backbone: an embedding, no class logit
        ("vit_b_16", set(METHODS) - CHEFER),  # its attention's in-projection is functional
        ("ViT-B-32", set(METHODS) - CHEFER),
        ("ViT-B-16-SigLIP", {"legrad", "gradcam", "occlusion"}),
        ("CLIPModel", set(METHODS) - CHEFER),  # Hugging Face image-text models (issue 13)
        ("Siglip2Model", {"legrad", "gradcam", "occlusion"}),
        ("BeitForImageClassification", set(METHODS) - CHEFER),  # its λ scales are inline
    ],
)
def test_what_is_known_to_work(example, explained):
    result = next(r for r in sweep() if r.case.example == example)
    assert {m for m, s in statuses(result).items() if s == C.EXPLAINED} == explained


def test_attention_pooled_models_refuse_the_rollout_family_saying_what_works():
    result = next(r for r in sweep() if r.case.example == "vit_base_patch16_siglip_224")
    for method in ROLLOUT_FAMILY:
        assert "explain it with legrad, gradcam or occlusion" in result.outcomes[method].detail


def test_docs_models_md_is_the_sweeps_output():
    """docs/models.md holds the same verdicts as a sweep of the installed zoos (regenerate it with
    ``gmar models --out docs/models.md`` when this fails after a change)."""
    written = DOC.read_text()
    assert written.startswith(C.HEADER)
    expected = C.markdown(sweep())
    assert _cells(written) == _cells(expected)


def _cells(markdown: str) -> list[str]:
    """The table rows without the reasons' numbers (their order depends on the first refusal met)."""
    rows = [line for line in markdown.splitlines() if line.startswith("| ") and "`" in line]
    return [re.sub(r" \[\d+\]", "", row) for row in rows]


def test_markdown_numbers_each_reason_once():
    text = C.markdown(sweep())
    reasons = text.split("## Reasons", 1)[1].strip().splitlines()
    details = [line.split(". ", 1)[1] for line in reasons]
    assert len(details) == len(set(details))
    referenced = {int(n) for n in re.findall(r"\[(\d+)\]", text.split("## Reasons", 1)[0])}
    assert referenced == set(range(1, len(details) + 1))


def test_cli_writes_the_table_and_never_over_a_foreign_file(tmp_path, capsys):
    out = tmp_path / "models.md"
    assert main(["models", "--zoo", "torchvision", "--out", str(out)]) == 0
    text = out.read_text()
    assert text.startswith(C.HEADER) and "`vit_b_16`" in text
    assert main(["models", "--zoo", "torchvision", "--out", str(out)]) == 0  # its own file: rewritten
    foreign = tmp_path / "notes.md"
    foreign.write_text("my notes\n")
    assert main(["models", "--zoo", "torchvision", "--out", str(foreign)]) == 2
    assert foreign.read_text() == "my notes\n"
    assert "not a table gmar models wrote" in capsys.readouterr().err
    assert main(["models", "--zoo", "keras"]) == 2
