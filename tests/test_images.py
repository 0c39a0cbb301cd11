"""Reading image files as the camera or the drawing program meant them, and refusing the unreadable."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import gmar
from gmar.errors import ImageLoadError
from gmar.preprocess import PreprocessConfig

PLAIN = PreprocessConfig(input_size=(16, 16), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def pixels(path: Path) -> np.ndarray:
    image = gmar.load_image(path)
    assert image.mode == "RGB"
    return np.asarray(image).astype(int)


def test_exif_orientation_is_applied(tmp_path):
    array = np.zeros((24, 40, 3), dtype=np.uint8)  # a wide picture: red on the left, blue on the right
    array[:, :20] = (255, 0, 0)
    array[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways; display rotated 90 degrees clockwise
    path = tmp_path / "phone.jpg"
    Image.fromarray(array).save(path, exif=exif, quality=95)
    with Image.open(path) as raw:
        stored = np.asarray(raw.convert("RGB")).astype(int)
    loaded = pixels(path)
    assert loaded.shape == (40, 24, 3)  # tall now
    np.testing.assert_array_equal(loaded, np.rot90(stored, k=-1))
    assert loaded[2, 12, 0] > 200 and loaded[-3, 12, 2] > 200  # red on top, blue at the bottom


def test_16_bit_grayscale_png_equals_its_8_bit_version(tmp_path):
    ramp = np.linspace(0, 65535, 48 * 64).reshape(48, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    eight = np.round(ramp / 257).astype(np.uint8)
    Image.fromarray(eight).save(tmp_path / "eight.png")
    deep = pixels(tmp_path / "deep.png")
    assert np.abs(deep - eight[..., None]).max() <= 1 and (deep == 255).mean() < 0.01
    a = gmar.preprocess(gmar.load_image(tmp_path / "deep.png"), PLAIN)
    b = gmar.preprocess(gmar.load_image(tmp_path / "eight.png"), PLAIN)
    assert (a - b).abs().max() <= 1 / 255 + 1e-6


def test_32_bit_integer_image_is_read_as_16_bit(tmp_path):
    values = np.array([[0, 257, 32896], [65535, 70000, 12850]], dtype=np.int32)
    Image.fromarray(values, mode="I").save(tmp_path / "int.tif")
    expected = np.clip(np.round(values / 257), 0, 255)
    np.testing.assert_array_equal(pixels(tmp_path / "int.tif"), np.repeat(expected[..., None], 3, axis=2))


@pytest.mark.parametrize(("scale", "values"), [(255.0, [0.0, 0.25, 1.0]), (1.0, [0.0, 100.0, 255.0, 300.0])])
def test_float_image(tmp_path, scale, values):
    """Floats in [0, 1] are read as fractions of white, others as 0-255 (clipped)."""
    array = np.array([values], dtype=np.float32)
    Image.fromarray(array, mode="F").save(tmp_path / "float.tif")
    expected = np.clip(np.round(array * scale), 0, 255)
    np.testing.assert_array_equal(pixels(tmp_path / "float.tif"), np.repeat(expected[..., None], 3, axis=2))


def test_palette_with_transparency_is_composited_over_white(tmp_path):
    image = Image.new("P", (3, 1))
    image.putpalette([200, 0, 0, 0, 150, 0, 0, 0, 90])
    image.putdata([0, 1, 2])
    image.save(tmp_path / "palette.png", transparency=1)
    np.testing.assert_array_equal(pixels(tmp_path / "palette.png")[0], [[200, 0, 0], [255, 255, 255], [0, 0, 90]])


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_is_composited_over_white(tmp_path, mode):
    rng = np.random.default_rng(0)
    channels = 4 if mode == "RGBA" else 2
    array = rng.integers(0, 256, (10, 12, channels), dtype=np.uint8)
    array[0, 0, -1], array[0, 1, -1] = 0, 255
    Image.fromarray(array, mode=mode).save(tmp_path / "alpha.png")
    colour = array[..., :-1].astype(float) if mode == "RGBA" else np.repeat(array[..., :1], 3, axis=2).astype(float)
    alpha = array[..., -1:].astype(float) / 255
    expected = colour * alpha + 255 * (1 - alpha)
    loaded = pixels(tmp_path / "alpha.png")
    assert np.abs(loaded - expected).max() <= 1
    np.testing.assert_array_equal(loaded[0, 0], [255, 255, 255])


def test_cmyk(tmp_path):
    cmyk = np.array([[[0, 0, 0, 0], [255, 0, 0, 0], [0, 128, 0, 64], [10, 20, 30, 255]]], dtype=np.uint8)
    Image.fromarray(cmyk, mode="CMYK").save(tmp_path / "print.tif")
    c, m, y, k = (cmyk[..., i].astype(float) / 255 for i in range(4))
    expected = np.stack([255 * (1 - c) * (1 - k), 255 * (1 - m) * (1 - k), 255 * (1 - y) * (1 - k)], axis=-1)
    assert np.abs(pixels(tmp_path / "print.tif") - expected).max() <= 1


@pytest.mark.parametrize("mode", ["L", "1"])
def test_grey_and_black_and_white(tmp_path, mode):
    grey = np.array([[0, 90, 200, 255]], dtype=np.uint8)
    Image.fromarray(grey).convert(mode).save(tmp_path / "grey.png")
    expected = grey.astype(int) if mode == "L" else np.where(grey >= 128, 255, 0)
    np.testing.assert_array_equal(pixels(tmp_path / "grey.png"), np.repeat(expected[..., None], 3, axis=2))


def test_preprocess_composites_a_given_rgba_image_like_load_image():
    image = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    torch.testing.assert_close(gmar.preprocess(image, PLAIN), torch.ones(1, 3, 16, 16))


@pytest.mark.parametrize(("side", "what"), [(12, "warns"), (20, "raises")])
def test_image_above_the_bomb_limit_is_one_line(tmp_path, monkeypatch, side, what):
    """Pillow warns above MAX_IMAGE_PIXELS (144 > 100) and raises above twice it (400 > 200)."""
    Image.new("RGB", (side, side), (1, 2, 3)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with _no_warning():
        with pytest.raises(ImageLoadError) as error:
            gmar.load_image(tmp_path / "big.png")
    message = str(error.value)
    assert "\n" not in message and "big.png: too large:" in message
    assert f"{side} x {side} pixels" in message if what == "warns" else f"{side * side} pixels" in message


class _no_warning:
    def __enter__(self):
        import warnings

        self._catch = warnings.catch_warnings(record=True)
        self.seen = self._catch.__enter__()
        warnings.simplefilter("always")

    def __exit__(self, *exc):
        self._catch.__exit__(*exc)
        assert not self.seen, [str(w.message) for w in self.seen]


def bomb_png(path: Path, side: int = 20000) -> Path:
    """A valid PNG header for a ``side`` x ``side`` grey image, without its pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
    return path


def test_a_real_20000_square_png_header_is_refused_without_decoding(tmp_path):
    with pytest.raises(ImageLoadError, match=r"bomb\.png: too large: 400000000 pixels"):
        gmar.load_image(bomb_png(tmp_path / "bomb.png"))
