"""Image preprocessing and overlays, against values computed by hand."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from PIL import Image

import gmar
from conftest import make_timm
from gmar import viz
from gmar.preprocess import PreprocessConfig, resize_and_crop


def test_constant_image_is_normalised_exactly():
    config = PreprocessConfig(input_size=(8, 12), mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 1.0))
    image = Image.new("RGB", (30, 20), (255, 51, 0))
    batch = gmar.preprocess(image, config)
    assert batch.shape == (1, 3, 8, 12)
    expected = torch.tensor([(1.0 - 0.5) / 0.5, (0.2 - 0.25) / 0.25, 0.0]).view(1, 3, 1, 1).expand(1, 3, 8, 12)
    torch.testing.assert_close(batch, expected)
    torch.testing.assert_close(gmar.denormalise(batch, config)[0, :, 0, 0], torch.tensor([1.0, 0.2, 0.0]))


def test_resize_covers_the_crop_and_centres_it():
    # a 40x20 image, left half black, right half white; crop 10x10 at crop_pct 1: shorter side to 10,
    # so 20x10, centre crop keeps columns 5..14: half black, half white
    array = np.zeros((20, 40, 3), dtype=np.uint8)
    array[:, 20:] = 255
    cropped = np.asarray(resize_and_crop(Image.fromarray(array), PreprocessConfig(input_size=(10, 10))))
    assert cropped.shape == (10, 10, 3)
    assert cropped[:, :4].max() < 10 and cropped[:, 6:].min() > 245
    wide = resize_and_crop(Image.fromarray(array), PreprocessConfig(input_size=(10, 10), crop_pct=0.5))
    assert wide.size == (10, 10)  # resized to 40x20 first, then cropped


def test_preprocess_config_comes_from_the_timm_model():
    config = gmar.preprocess_config(make_timm())
    assert config.input_size == (32, 32)
    assert len(config.mean) == 3 and len(config.std) == 3


def test_overlay_blends_image_and_colour_map():
    image = torch.full((3, 2, 2), 0.5)
    heatmap = torch.tensor([[0.0, 1.0], [0.25, 0.75]])
    colours = plt.get_cmap("jet")(heatmap.numpy())[..., :3]
    np.testing.assert_allclose(viz.overlay(image, heatmap, alpha=0.0), np.full((2, 2, 3), 0.5))
    np.testing.assert_allclose(viz.overlay(image, heatmap, alpha=1.0), colours)
    np.testing.assert_allclose(viz.overlay(image, heatmap, alpha=0.5), 0.25 + 0.5 * colours)
    uint8 = np.full((2, 2, 3), 255, dtype=np.uint8)  # 0-255 images are scaled to [0, 1]
    np.testing.assert_allclose(viz.overlay(uint8, heatmap, alpha=0.0), np.ones((2, 2, 3)))
    with pytest.raises(ValueError, match="differ in size"):
        viz.overlay(image, torch.zeros(3, 3))


def test_figures_have_one_panel_per_image_and_method(images):
    model = make_timm()
    explanations = {m: gmar.explain(model, images[:2], method=m) for m in ("gmar", "rollout")}
    figure = viz.method_grid(gmar.denormalise(images[:2], gmar.preprocess_config(model)), explanations)
    assert len(figure.axes) == 2 * 3
    heads = viz.head_weights_figure(explanations["gmar"].head_weights[0])
    assert heads.axes[0].get_images()[0].get_array().shape == (3, 4)  # layers x heads
    plt.close("all")


@pytest.mark.parametrize("heads", [4, 12])
def test_head_weights_title_fits_in_the_figure(heads):
    name = "IMG_20240613_184512_" + "holiday-at-the-seaside-with-the-family" * 3 + ".jpg"
    figure = viz.head_weights_figure(torch.full((6, heads), 1 / heads), f"GMAR head weights: {name}")
    figure.canvas.draw()
    title = figure.axes[0].title
    box, frame = title.get_window_extent(), figure.bbox
    assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
    shown = title.get_text().replace("\n", "")
    assert shown.startswith("GMAR head weights: IMG_20240613") and (shown.endswith(".jpg") or "…" in shown)
    plt.close(figure)
