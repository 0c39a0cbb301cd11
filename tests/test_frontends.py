"""What the front ends share (`gmar.frontends.common`), and that CLI explain, the demo and the app use it:
class labels, probabilities, the text target, which methods run, and head-weight figures for every
method that has head weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import gmar
from conftest import clip_tokenizer, make_clip_with_text, one_error_line
from gmar import viz
from gmar.adapters import get_adapter
from gmar.frontends import common
from gmar.frontends.cli import main


@pytest.fixture(scope="module")
def timm_test_vit():
    """timm's test_vit with the seeded random weights ``--random-init`` builds."""
    return gmar.load_model("timm:test_vit", pretrained=False)


@pytest.fixture
def cat(tmp_path):
    path = tmp_path / "cat.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(path)
    return path


def explain_argv(*paths, model="timm:test_vit", method="gmar", out):
    return ["explain", *map(str, paths), "--model", model, "--random-init", "--method", method, "--out", str(out)]


# ------------------------------------------------------------------------------------------ the shared module


def test_class_label_names_a_class_from_the_adapter(timm_test_vit):
    names = get_adapter(timm_test_vit.model).class_names()
    assert names is not None and len(names) == 1000
    assert common.class_label(names, 281) == f"{names[281]} [281]" == "tabby, tabby cat [281]"
    assert common.class_label(None, 3) == "class 3"
    assert common.class_label(names, 1000) == "class 1000"  # an index the names do not cover
    assert common.class_label(names, -1) == "class -1"


def test_probabilities_are_sigmoids_for_multi_label_models_and_a_softmax_otherwise(timm_test_vit):
    model = timm_test_vit.model
    images = torch.randn(2, 3, *timm_test_vit.preprocess.input_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(images)
    torch.testing.assert_close(common.probabilities(logits, multi_label=False), torch.softmax(logits, dim=-1))
    torch.testing.assert_close(common.probabilities(logits, multi_label=True), torch.sigmoid(logits))


def test_text_target_comes_from_the_model_and_its_tokenizer():
    model = make_clip_with_text()
    target = common.text_target(model, clip_tokenizer(), ["a cat", "a dog"], "openclip:tiny")
    assert isinstance(target, gmar.TextTarget) and target.prompts == ["a cat", "a dog"]
    with pytest.raises(gmar.GmarError, match="openclip:tiny came without a tokenizer"):
        common.text_target(model, None, ["a cat"], "openclip:tiny")


def test_head_weighted_methods_are_those_whose_explanation_has_head_weights(timm_test_vit):
    model = timm_test_vit.model
    images = torch.randn(1, 3, *timm_test_vit.preprocess.input_size, generator=torch.Generator().manual_seed(0))
    explanations = gmar.explain(model, images, ["rollout", "gmar_gae", "gmar"])
    assert common.head_weighted(explanations) == ["gmar_gae", "gmar"]
    assert common.heads_file("gmar_gae") == "gmar_gae_heads.png"
    figure = common.head_weights_figure(explanations, "gmar_gae", 0, "cat.png")
    try:
        assert figure.axes[0].get_title().replace("\n", " ") == "gmar_gae head weights: cat.png"  # wrapped to fit
    finally:
        import matplotlib.pyplot as plt

        plt.close(figure)


# -------------------------------------------------------------------------------------------- gmar explain


def test_explain_draws_head_weights_for_every_method_that_has_them(cat, tmp_path):
    out = tmp_path / "out"
    assert main(explain_argv(cat, method="gmar,gmar_gae,rollout", out=out)) == 0
    written = sorted(p.name for p in out.glob("*.png"))
    assert written == ["cat.png.png", "cat.png_gmar_gae_heads.png", "cat.png_gmar_heads.png"]
    alone = tmp_path / "alone"
    assert main(explain_argv(cat, method="gmar_gae", out=alone)) == 0
    assert sorted(p.name for p in alone.glob("*.png")) == ["cat.png.png", "cat.png_gmar_gae_heads.png"]


def test_explain_titles_name_timm_classes(cat, tmp_path, monkeypatch, timm_test_vit):
    """timm names ImageNet's classes offline; the figure's titles show them, with the softmax's probability."""
    titles = []
    grid = viz.method_grid

    def spy(images, explanations, row_titles=None, column_titles=None, **kwargs):
        titles.append((list(row_titles), {m: list(t) for m, t in column_titles.items()}))
        return grid(images, explanations, row_titles=row_titles, column_titles=column_titles, **kwargs)

    monkeypatch.setattr(viz, "method_grid", spy)
    assert main([*explain_argv(cat, method="gmar,rollout", out=tmp_path / "out"), "--target", "281"]) == 0
    batch = gmar.preprocess([gmar.load_image(cat)], timm_test_vit.preprocess)
    with torch.no_grad():
        probabilities = torch.softmax(timm_test_vit.model(batch), dim=-1)[0]
    predicted = int(probabilities.argmax())
    names = get_adapter(timm_test_vit.model).class_names()
    ((rows, columns),) = titles
    assert rows == [f"predicted: {names[predicted]} [{predicted}] ({probabilities[predicted]:.2f})"]
    assert columns == {"gmar": ["gmar: tabby, tabby cat [281]"], "rollout": ["rollout: tabby, tabby cat [281]"]}


def test_a_named_method_the_model_cannot_run_is_one_line_before_any_image_is_read(cat, tmp_path, capsys):
    """methods_for refuses it with its reason when the model loads, not image by image."""
    out = tmp_path / "out"
    argv = explain_argv(tmp_path / "missing.png", cat, model="timm:test_vit3", method="legrad,gmar", out=out)
    assert main(argv) == 2
    line = one_error_line(capsys)
    assert "pools its tokens with an attention head" in line and "legrad" in line
    assert not out.exists() or not any(out.glob("*.png"))


def test_explain_all_runs_the_methods_for_the_model(cat, tmp_path):
    out = tmp_path / "out"
    assert main([*explain_argv(cat, model="timm:test_vit3", method="all", out=out), "--save-maps"]) == 0
    model = gmar.load_model("timm:test_vit3", pretrained=False).model
    expected = gmar.methods.methods_for(model, "all")
    assert sorted(p.name for p in out.glob("*.npy")) == sorted(f"cat.png_{m}.npy" for m in expected)


# ------------------------------------------------------------------------------------------------ gmar demo


def test_demo_draws_head_weights_for_every_method_that_has_them(tmp_path, monkeypatch):
    import gmar.frontends.demo as demo

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):  # the figures are written before the evaluation: stop there
        raise Stop

    monkeypatch.setattr(demo, "evaluate", stop)
    with pytest.raises(Stop):
        demo.demo(tmp_path / "demo", scenes=1)
    heads = sorted(p.name for p in (tmp_path / "demo").glob("*_heads.png"))
    model = gmar.load_reference_model()
    images = torch.rand(1, 3, *gmar.preprocess_config(model).input_size, generator=torch.Generator().manual_seed(0))
    explanations = gmar.explain(model, images, gmar.methods.methods_for(model))
    expected = [m for m, e in explanations.items() if e.head_weights is not None]
    assert "gmar_gae" in expected
    assert "gmar_heads.png" in heads  # the README's name
    assert heads == sorted(f"{m}_heads.png" for m in expected)
