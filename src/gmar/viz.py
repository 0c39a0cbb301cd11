"""Pictures: a heatmap over an image, a methods × images grid, GMAR's layers × heads weights."""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg", force=False)
import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure

from gmar.explanation import Explanation


def _hwc(image: torch.Tensor | np.ndarray) -> np.ndarray:
    array = image.detach().cpu().float().numpy() if isinstance(image, torch.Tensor) else np.asarray(image, dtype=float)
    if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
        array = array.transpose(1, 2, 0)
    if array.max() > 1.0:
        array = array / 255.0
    return np.clip(array, 0.0, 1.0)


def overlay(
    image: torch.Tensor | np.ndarray, heatmap: torch.Tensor | np.ndarray, alpha: float = 0.5, cmap: str = "jet"
) -> np.ndarray:
    """Blend ``heatmap`` ``(H, W)`` in [0, 1] over ``image`` (``(3, H, W)`` or ``(H, W, 3)``, in [0, 1]
    or 0-255). Returns an RGB array ``(H, W, 3)`` in [0, 1]."""
    rgb = _hwc(image)
    heat = heatmap.detach().cpu().float().numpy() if isinstance(heatmap, torch.Tensor) else np.asarray(heatmap)
    if heat.shape != rgb.shape[:2]:
        raise ValueError(f"heatmap {heat.shape} and image {rgb.shape[:2]} differ in size")
    colours = plt.get_cmap(cmap)(np.clip(heat, 0.0, 1.0))[..., :3]
    return (1.0 - alpha) * rgb + alpha * colours


def method_grid(
    images: torch.Tensor,
    explanations: Mapping[str, Explanation],
    row_titles: Sequence[str] | None = None,
    column_titles: Mapping[str, Sequence[str]] | None = None,
    cell: float = 2.4,
) -> Figure:
    """A figure with one row per image: the image, then one overlay per method.

    Args:
        images: ``(B, 3, H, W)`` in [0, 1] (see :func:`gmar.denormalise`).
        explanations: method name -> its :class:`Explanation` of the same batch.
        row_titles: a title per image for the image column.
        column_titles: method name -> a title per image (default: the method name).
    """
    batch = images.shape[0]
    methods = list(explanations)
    figure, axes = plt.subplots(
        batch, len(methods) + 1, figsize=(cell * (len(methods) + 1), cell * batch + 0.3), squeeze=False
    )
    for row in range(batch):
        axes[row, 0].imshow(_hwc(images[row]))
        axes[row, 0].set_title(row_titles[row] if row_titles else "image", fontsize=8)
        for column, method in enumerate(methods, start=1):
            axes[row, column].imshow(overlay(images[row], explanations[method].heatmap[row]))
            title = column_titles[method][row] if column_titles and method in column_titles else method
            axes[row, column].set_title(title, fontsize=8)
    for axis in axes.flat:
        axis.axis("off")
    figure.tight_layout()
    return figure


def head_weights_figure(head_weights: torch.Tensor, title: str = "GMAR head weights") -> Figure:
    """A layers × heads heatmap of one sample's head weights ``(L, H)`` (each row sums to 1)."""
    weights = head_weights.detach().cpu().float().numpy()
    if weights.ndim != 2:
        raise ValueError(f"expected head weights of shape (L, H), got {weights.shape}")
    layers, heads = weights.shape
    figure, axis = plt.subplots(figsize=(1.2 + 0.45 * heads, 1.0 + 0.35 * layers))
    image = axis.imshow(weights, cmap="viridis", aspect="auto")
    axis.set_xlabel("head")
    axis.set_ylabel("layer")
    axis.set_xticks(range(heads))
    axis.set_yticks(range(layers))
    figure.colorbar(image, ax=axis, fraction=0.046, pad=0.04)
    _fit_title(figure, axis, title, fontsize=9)
    return figure


def _fit_title(figure: Figure, axis, title: str, fontsize: float, max_lines: int = 3) -> None:
    """Set ``axis``'s title wrapped (and, past ``max_lines`` lines, shortened with "…") so that it lies
    within the figure, then lay the figure out."""
    width = len(title)
    while True:
        lines = textwrap.wrap(title, width, break_long_words=True, break_on_hyphens=False) or [""]
        if len(lines) > max_lines:
            lines = lines[:max_lines]
            lines[-1] = lines[-1][:-1] + "…"
        text = axis.set_title("\n".join(lines), fontsize=fontsize)
        figure.tight_layout()
        figure.canvas.draw()
        box, frame = text.get_window_extent(), figure.bbox
        if width <= 8 or (frame.x0 <= box.x0 and box.x1 <= frame.x1 and box.y1 <= frame.y1):
            return
        width = max(8, min(width - 1, int(width * frame.width / box.width * 0.95)))


def save(figure: Figure, path) -> None:
    """Write ``figure`` to ``path`` and release it."""
    try:
        figure.savefig(path, dpi=110)
    finally:
        plt.close(figure)
