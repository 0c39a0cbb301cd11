"""Seeded synthetic scenes with ground truth: the offline benchmark's data.

Each scene holds one to three objects of different classes on a cluttered background. An object
is a shape with its class's fill (solid, stripes, a checkerboard, dots or concentric rings, turned
with the shape) at a random position, size, rotation and colour, so that a class can be told from
any of its patches as well as from its outline. The clutter (strokes, dots, arcs of rings and
corners of squares) belongs to no class, and some of it is cut from the very shapes the classes
are made of, so an explanation that lights up "anything shape-like" is wrong in a telling way.
Objects may sit close to each other but never overlap, so each object's pixel mask is exact.

A scene is a pure function of ``(seed, split, index)``: ``Scenes("test")[17]`` is the same image on
every machine. The train and test splits draw from different seed streams
(:class:`numpy.random.SeedSequence` spawn keys), so they never share a scene by construction.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from matplotlib.path import Path

#: The object classes, in label order.
CLASSES = ("circle", "square", "triangle", "cross", "ring", "star")
#: Each class's fill, in the object's own (rotated) coordinates.
FILLS = {
    "circle": "solid",
    "square": "stripes",
    "triangle": "checker",
    "cross": "dots",
    "ring": "solid",
    "star": "rings",
}
SPLITS = {"train": 0, "test": 1}


@dataclass(frozen=True)
class Scene:
    """One rendered scene.

    Attributes:
        image: ``(3, H, W)`` float32 in [0, 1].
        labels: ``(C,)`` float32 multi-hot over :data:`CLASSES`.
        masks: ``(C, H, W)`` bool; the pixels of each present object (all False for absent classes).
        index: the scene's index in its split.
    """

    image: torch.Tensor
    labels: torch.Tensor
    masks: torch.Tensor
    index: int

    @property
    def classes(self) -> list[int]:
        """Indices of the present classes."""
        return [int(i) for i in torch.nonzero(self.labels).flatten()]


class Scenes:
    """A deterministic split of synthetic scenes; indexable, iterable, ``len``-able.

    Args:
        split: ``"train"`` or ``"test"``.
        size: number of scenes.
        seed: the benchmark's seed; every scene derives from it, the split and its index.
        image_size: side of the square images in pixels (objects scale with it).
    """

    def __init__(self, split: str = "test", size: int = 1000, seed: int = 0, image_size: int = 64) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, not {split!r}")
        if size < 0:
            raise ValueError(f"size must be non-negative, not {size}")
        if image_size < 32:
            raise ValueError(f"image_size must be at least 32 pixels, not {image_size}")
        self.split, self.size, self.seed, self.image_size = split, size, seed, image_size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> Scene:
        if not -self.size <= index < self.size:
            raise IndexError(f"scene {index} out of range for {self.size} scenes")
        index %= self.size
        image, labels, masks = render(self.rng(index), self.image_size)
        return Scene(torch.from_numpy(image), torch.from_numpy(labels), torch.from_numpy(masks), index)

    def without(self, index: int, cls: int) -> Scene:
        """Scene ``index`` rendered again without its object of class ``cls``.

        Everything else is drawn from the same random stream, so every pixel off that object
        (background, clutter, the other objects, the noise) equals ``self[index]``'s; where the
        object was, the background and clutter under it show. Its label is 0 and its mask empty.
        This is what removing one object from the scene means, with no inpainting guesswork.
        """
        if not -self.size <= index < self.size:
            raise IndexError(f"scene {index} out of range for {self.size} scenes")
        index %= self.size
        image, labels, masks, left_out = _draw(self.rng(index), self.image_size, leave_out=cls)
        if left_out is None:
            present = ", ".join(CLASSES[int(c)] for c in np.flatnonzero(labels))
            raise ValueError(f"scene {index} holds no {_class_name(cls)} to leave out; it holds {present}")
        return Scene(torch.from_numpy(image), torch.from_numpy(labels), torch.from_numpy(masks), index)

    def __iter__(self) -> Iterator[Scene]:
        return (self[i] for i in range(self.size))

    def rng(self, index: int) -> np.random.Generator:
        """The random stream of scene ``index``: independent of every other scene and split."""
        sequence = np.random.SeedSequence(entropy=self.seed, spawn_key=(SPLITS[self.split], index))
        return np.random.default_rng(sequence)

    def batch(self, indices) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Images ``(B, 3, H, W)``, labels ``(B, C)`` and masks ``(B, C, H, W)`` of ``indices``."""
        scenes = [self[int(i)] for i in indices]
        return (
            torch.stack([s.image for s in scenes]),
            torch.stack([s.labels for s in scenes]),
            torch.stack([s.masks for s in scenes]),
        )


def _class_name(cls: int) -> str:
    return CLASSES[cls] if 0 <= cls < len(CLASSES) else f"class {cls}"


# ------------------------------------------------------------------------------------------- rendering


def render(
    rng: np.random.Generator, size: int, leave_out: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw one scene from ``rng``: image ``(3, H, W)`` float32, labels ``(C,)``, masks ``(C, H, W)``.

    With ``leave_out``, the object of that class is placed and its colours drawn as usual (so the
    stream, and with it every other pixel, stays the same) but it is not painted, labelled or masked.
    """
    image, labels, masks, _ = _draw(rng, size, leave_out)
    return image, labels, masks


def _draw(
    rng: np.random.Generator, size: int, leave_out: int | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """:func:`render`, plus the left-out object's mask (None when the scene holds no such object)."""
    left_out = None
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    image = _background(rng, size)
    for _ in range(int(rng.integers(8, 16))):
        _draw_clutter(rng, image, xs, ys, size)

    count = int(rng.choice([1, 2, 3], p=[0.3, 0.4, 0.3]))
    classes = rng.choice(len(CLASSES), size=count, replace=False)
    labels = np.zeros(len(CLASSES), dtype=np.float32)
    masks = np.zeros((len(CLASSES), size, size), dtype=bool)
    occupied = np.zeros((size, size), dtype=bool)
    for cls in classes:
        for _ in range(50):  # rejection sampling of a free spot; 50 tries never run out at these sizes
            mask, (u, v) = _shape_mask(rng, int(cls), xs, ys, size)
            if mask.sum() > 0 and not (mask & _grow(occupied, 1)).any():
                break
        else:
            continue
        occupied |= mask
        colour = _object_colour(rng, image, mask)
        if cls == leave_out:  # objects never overlap, so no later object reads the pixels it would cover
            left_out = mask
            continue
        masks[cls] = mask
        labels[cls] = 1.0
        second = np.where(colour > 0.5, colour - 0.45, colour + 0.45).astype(np.float32)
        pattern = _fill(FILLS[CLASSES[cls]], u, v, size)
        image[:, mask & pattern] = colour[:, None]
        image[:, mask & ~pattern] = second[:, None]
    noise = rng.normal(0.0, 0.02, size=image.shape).astype(np.float32)
    return np.clip(image + noise, 0.0, 1.0), labels, masks, left_out


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A low-contrast, smoothly varying background."""
    base = rng.uniform(0.25, 0.75, size=3).astype(np.float32)
    direction = rng.uniform(0, 2 * math.pi)
    ramp = np.cos(direction) * np.linspace(-1, 1, size)[None, :] + np.sin(direction) * np.linspace(-1, 1, size)[:, None]
    return np.clip(base[:, None, None] + 0.08 * ramp[None].astype(np.float32), 0.0, 1.0)


def _object_colour(rng: np.random.Generator, image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """A colour that stands out from the background under ``mask`` (any hue)."""
    below = image[:, mask].mean(axis=1)
    for _ in range(20):
        colour = rng.uniform(0.0, 1.0, size=3).astype(np.float32)
        if np.abs(colour - below).sum() > 0.6:
            return colour
    return (1.0 - below).astype(np.float32)


def _rotate(xs: np.ndarray, ys: np.ndarray, cx: float, cy: float, angle: float) -> tuple[np.ndarray, np.ndarray]:
    c, s = math.cos(angle), math.sin(angle)
    dx, dy = xs - cx, ys - cy
    return c * dx + s * dy, -s * dx + c * dy


def _polygon(xs: np.ndarray, ys: np.ndarray, points: np.ndarray) -> np.ndarray:
    inside = Path(points).contains_points(np.stack([xs.ravel(), ys.ravel()], axis=1))
    return inside.reshape(xs.shape)


def _fill(kind: str, u: np.ndarray, v: np.ndarray, size: int) -> np.ndarray:
    """Where the object shows its main colour (elsewhere its second colour); period 4 px at 64 px."""
    period = 4 * size / 64
    if kind == "solid":
        return np.ones_like(u, dtype=bool)
    if kind == "stripes":
        return np.floor(u / (period / 2)) % 2 == 0
    if kind == "checker":
        return (np.floor(u / (period / 2)) + np.floor(v / (period / 2))) % 2 == 0
    if kind == "dots":
        return ((u % period) - period / 2) ** 2 + ((v % period) - period / 2) ** 2 > (period / 3.2) ** 2
    if kind == "rings":  # concentric bands around the object's centre
        return np.floor(np.sqrt(u**2 + v**2) / (period / 2)) % 2 == 0
    raise ValueError(f"unknown fill {kind!r}")


def _shape_mask(
    rng: np.random.Generator, cls: int, xs: np.ndarray, ys: np.ndarray, size: int
) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """The pixel mask of one object of class ``cls`` (3-4 patches of 8 px across at 64 px) and
    the object's own coordinates."""
    radius = rng.uniform(0.15, 0.22) * size  # half the object's extent
    cx, cy = rng.uniform(radius + 1, size - radius - 1, size=2)
    angle = rng.uniform(0, 2 * math.pi)
    u, v = _rotate(xs, ys, cx, cy, angle)
    return _outline(CLASSES[cls], u, v, xs, ys, cx, cy, radius, angle), (u, v)


def _outline(name, u, v, xs, ys, cx, cy, radius, angle) -> np.ndarray:
    if name == "circle":
        return u**2 + v**2 <= radius**2
    if name == "square":
        half = radius / math.sqrt(2) * 1.15
        return (np.abs(u) <= half) & (np.abs(v) <= half)
    if name == "triangle":
        corners = [(radius * math.cos(a + angle), radius * math.sin(a + angle)) for a in (0, 2.094, 4.189)]
        return _polygon(xs, ys, np.array(corners) + np.array([cx, cy]))
    if name == "cross":
        arm = radius * 0.34
        return ((np.abs(u) <= radius) & (np.abs(v) <= arm)) | ((np.abs(v) <= radius) & (np.abs(u) <= arm))
    if name == "ring":
        distance = np.sqrt(u**2 + v**2)
        return (distance <= radius) & (distance >= radius * 0.55)
    if name == "star":
        points = []
        for k in range(10):
            r = radius if k % 2 == 0 else radius * 0.45
            a = angle + k * math.pi / 5
            points.append((cx + r * math.cos(a), cy + r * math.sin(a)))
        return _polygon(xs, ys, np.array(points))
    raise ValueError(f"unknown class {name!r}")


def _draw_clutter(rng: np.random.Generator, image: np.ndarray, xs: np.ndarray, ys: np.ndarray, size: int) -> None:
    """One piece of clutter: a stroke, a dot, an arc of a ring or the corner of a square; small."""
    kind = rng.integers(4)
    cx, cy = rng.uniform(0, size, size=2)
    angle = rng.uniform(0, 2 * math.pi)
    u, v = _rotate(xs, ys, cx, cy, angle)
    scale = size / 64
    if kind == 0:  # stroke
        mask = (np.abs(u) <= rng.uniform(3, 8) * scale) & (np.abs(v) <= rng.uniform(0.5, 1.2) * scale)
    elif kind == 1:  # dot
        mask = u**2 + v**2 <= (rng.uniform(1, 2.2) * scale) ** 2
    elif kind == 2:  # an arc: a quarter of a thin ring
        distance = np.sqrt(u**2 + v**2)
        radius = rng.uniform(4, 7) * scale
        mask = (distance <= radius) & (distance >= radius - 1.5 * scale) & (u >= 0) & (v >= 0)
    else:  # a corner: the edges of a square's corner
        arm, width = rng.uniform(3, 6) * scale, rng.uniform(0.8, 1.5) * scale
        mask = ((u >= 0) & (u <= arm) & (v >= 0) & (v <= width)) | ((v >= 0) & (v <= arm) & (u >= 0) & (u <= width))
    image[:, mask] = rng.uniform(0.0, 1.0, size=3).astype(np.float32)[:, None]


def _grow(mask: np.ndarray, pixels: int) -> np.ndarray:
    """``mask`` dilated by ``pixels`` in the 4 directions (keeps objects from touching)."""
    grown = mask.copy()
    for _ in range(pixels):
        grown[1:] |= grown[:-1].copy()
        grown[:-1] |= grown[1:].copy()
        grown[:, 1:] |= grown[:, :-1].copy()
        grown[:, :-1] |= grown[:, 1:].copy()
    return grown
