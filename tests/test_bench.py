"""``gmar bench``: a smoke run on the reference model, and the pytorch-grad-cam map check."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from conftest import IMAGE, make_timm
from gmar.errors import GmarError
from gmar.frontends import bench
from gmar.frontends.cli import main
from gmar.methods import explain


def test_bench_smoke_run_writes_every_case(tmp_path, capsys):
    code = main(
        [
            "bench",
            "--model",
            "reference",
            "--batch-size",
            "2,4",
            "--methods",
            "gmar,rollout",
            "--repeats",
            "1",
            "--threads",
            "1",
            "--gradcam",
            "--torchcam",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "batch 2, 64x64" in printed and "batch 4, 64x64" in printed
    settings = json.loads((tmp_path / "bench.json").read_text())
    assert [s["batch_size"] for s in settings] == [2, 4]
    for setting in settings:
        rows = {row["case"]: row for row in setting["rows"]}
        assert list(rows) == [
            "F",
            "FB",
            "gmar",
            "gmar (taylor)",
            "rollout",
            "all (one call)",
            "grad-cam",
            bench.TORCHCAM_GRADCAM,
            bench.TWIN_LEGRAD,
            bench.TORCHCAM_LEGRAD,
        ]
        assert rows["gmar"]["baseline"] == "FB" and rows["rollout"]["baseline"] == "F"
        assert rows["gmar (taylor)"]["baseline"] == "FB"
        assert rows["all (one call)"]["baseline"] == "FB"
        assert rows["grad-cam"]["baseline"] == "FB"
        for name, row in rows.items():
            assert row["seconds"] > 0
            assert row["peak"] > 2**20 and 0 <= row["rise"] < row["peak"], name
        assert rows["gmar"]["ratio"] == pytest.approx(rows["gmar"]["seconds"] / rows["FB"]["seconds"])
        assert rows["rollout"]["peak_ratio"] == pytest.approx(rows["rollout"]["peak"] / rows["F"]["peak"])
        assert setting["gradcam_max_difference"] < 1e-4
        assert setting["torchcam_max_difference"] < 1e-5
    with (tmp_path / "bench.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == 20
    assert (tmp_path / "scaling.png").stat().st_size > 0
    assert "| gmar |" in (tmp_path / "bench.md").read_text()


def test_bench_refuses_bad_lists(capsys):
    assert main(["bench", "--model", "reference", "--batch-size", "0", "--no-memory"]) != 0
    assert "--batch-size" in capsys.readouterr().err


@pytest.mark.parametrize(
    "options,size",
    [({}, (IMAGE, IMAGE)), ({"reg_tokens": 3}, (IMAGE, IMAGE)), ({"dynamic_img_size": True}, (IMAGE, IMAGE + 16))],
)
def test_package_gradcam_gives_gmars_map(options, size):
    """pytorch-grad-cam on ``blocks[-2]`` (the tokens entering the last block) is gmar's
    ``gradcam`` at ``layer=-1``, to the package's 1e-7 normalisation epsilon."""
    model = make_timm(**options)
    images = torch.randn(3, 3, *size, generator=torch.Generator().manual_seed(0))
    theirs = torch.from_numpy(bench._package_gradcam(model, images)())
    ours = explain(model, images, method="gradcam").heatmap
    assert theirs.shape == ours.shape
    assert ours.amax(dim=(1, 2)).min() == 1.0, "non-trivial maps"
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    # The check can fail: another layer's map is far off.
    other = explain(model, images, method="gradcam", layer=0).heatmap
    assert (theirs - other).abs().max() > 0.1


def test_package_gradcam_runs_as_its_users_run_it():
    """One forward and one backward pass, the package choosing the predicted classes itself: no extra
    forward pass of gmar's in the timed case."""
    model = make_timm()
    images = torch.randn(2, 3, IMAGE, IMAGE)
    run = bench._package_gradcam(model, images)
    forwards = []
    hook = model.register_forward_hook(lambda *args: forwards.append(1))
    try:
        run()
    finally:
        hook.remove()
    assert len(forwards) == 1


def test_package_gradcam_leaves_the_model_as_it_was():
    model = make_timm().train()
    images = torch.randn(2, 3, IMAGE, IMAGE)
    bench._package_gradcam(model, images)()
    for module in model.modules():
        assert not module._forward_hooks and not module._backward_hooks
        assert module.training
    assert all(p.grad is None for p in model.parameters()), "the package's backward must not leave .grad"


def test_bench_never_replaces_a_file_gmar_did_not_write(tmp_path, capsys):
    (tmp_path / "bench.csv").write_text("my table")
    assert main(["bench", "--model", "reference", "--out", str(tmp_path)]) == 2
    assert "bench.csv exists and was not written by gmar" in capsys.readouterr().err
    assert (tmp_path / "bench.csv").read_text() == "my table"


def test_each_case_is_measured_against_the_passes_it_takes():
    assert bench.baseline_of("gmar_gae") == bench.baseline_of("gmar (taylor)") == "FB"
    assert bench.baseline_of("occlusion") == bench.baseline_of("raw_attention") == "F"  # forward passes only


def test_torchvision_twin_computes_what_the_timm_model_computes():
    """The twin's logits, and gmar's maps on it, are the timm model's: the LeGrad comparison runs
    torchcam on the same weights."""
    model = make_timm()
    images = torch.randn(3, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(0))
    twin = bench.torchvision_twin(model)
    assert type(twin).__module__.startswith("torchvision")
    with torch.no_grad():
        torch.testing.assert_close(twin(images), model(images), rtol=0, atol=1e-5)
    for method in ("gae", "legrad", "rollout"):
        torch.testing.assert_close(
            explain(twin, images, method=method).token_map, explain(model, images, method=method).token_map
        )
    with pytest.raises(GmarError, match="plain timm ViTs"):
        bench.torchvision_twin(make_timm(reg_tokens=2))


def test_torchcam_gradcam_gives_gmars_map():
    """torchcam's GradCAM on ``blocks[-2]`` is gmar's ``gradcam`` token map, min-max normalised."""
    model = make_timm()
    images = torch.randn(3, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1))
    theirs = bench._torchcam_gradcam(model, images)()
    ours = explain(model, images, method="gradcam").token_map
    assert theirs.shape == ours.shape
    assert bench._torchcam_difference(model, images) < 1e-5
    other = explain(model, images, method="gradcam", layer=0).token_map
    other = other / other.flatten(1).amax(dim=1)[:, None, None]
    assert (theirs - other).abs().max() > 0.1, "the check can fail"


def test_torchcam_cases_leave_the_models_as_found():
    model = make_timm()
    images = torch.randn(2, 3, IMAGE, IMAGE)
    runs = bench.cases(model, images, ["gradcam"], gradcam=False, torchcam=True)
    assert list(runs) == ["F", "FB", "gradcam", bench.TORCHCAM_GRADCAM, bench.TWIN_LEGRAD, bench.TORCHCAM_LEGRAD]
    hooks = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]
    for name in (bench.TORCHCAM_GRADCAM, bench.TORCHCAM_LEGRAD):
        assert runs[name]().shape == (2, IMAGE // 8, IMAGE // 8)
    assert [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()] == hooks
    assert all(p.grad is None for p in model.parameters())
