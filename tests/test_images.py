"""Reading image files as the camera or the drawing program meant them, and refusing the unreadable."""

from __future__ import annotations

import importlib
import json
import os
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

PRE = importlib.import_module("gmar.preprocess")  # gmar.preprocess is the function
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


# ------------------------------------------------------------------ resizing: crop first, bounded memory

RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


def enlarge_then_crop(image: Image.Image, config: PreprocessConfig) -> Image.Image:
    """The reference: main 9dbe572's algorithm, which resizes the whole image and then crops it."""
    height, width = config.input_size
    scale = max(height / image.height, width / image.width) / config.crop_pct
    new_size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    image = image.resize(new_size, RESAMPLE[config.interpolation])
    left = (image.width - width) // 2
    top = (image.height - height) // 2
    return image.crop((left, top, left + width, top + height))


@pytest.mark.parametrize(
    ("size", "input_size", "crop_pct", "interpolation"),
    [
        ((640, 480), (224, 224), 0.875, "bicubic"),  # a photo, downscaled
        ((37, 50), (224, 224), 1.0, "bilinear"),  # enlarged
        ((300, 200), (16, 24), 1.0, "lanczos"),  # a non-square input
        ((224, 224), (224, 224), 1.0, "bicubic"),  # already the input's size
        ((1000, 30), (32, 32), 0.9, "nearest"),  # wide
        ((31, 97), (64, 48), 0.95, "bicubic"),  # tall, odd sizes
    ],
)
def test_crop_first_equals_enlarge_then_crop(size, input_size, crop_pct, interpolation):
    """Resizing only the source box that becomes the crop gives today's pixels, up to one level of 255
    (Pillow's fixed-point filter weights may round differently for a box that starts off the origin)."""
    rng = np.random.default_rng(sum(size))
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    config = PreprocessConfig(input_size=input_size, crop_pct=crop_pct, interpolation=interpolation)
    new = np.asarray(PRE.resize_and_crop(image, config)).astype(int)
    old = np.asarray(enlarge_then_crop(image, config)).astype(int)
    assert new.shape == old.shape == (*input_size, 3)
    assert np.abs(new - old).max() <= 1


LIMITED = """
import json, resource, sys
from gmar.preprocess import PreprocessConfig, load_image, preprocess
with open("/proc/self/status") as status:
    used = next(int(line.split()[1]) for line in status if line.startswith("VmSize:")) * 1024
hard = resource.getrlimit(resource.RLIMIT_AS)[1]
limit = used + 300 * 2**20  # 300 MB more than torch and gmar take once imported
resource.setrlimit(resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))
x = preprocess(load_image(sys.argv[1]), PreprocessConfig())
print(json.dumps({"shape": list(x.shape), "pixel": x[0, :, 100, 100].tolist()}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the address-space size from /proc")
@pytest.mark.parametrize("size", [(30000, 1), (1, 100000)])
def test_a_thin_image_is_resized_in_little_memory(tmp_path, size):
    """Enlarging a 30000 x 1 image to cover 224 x 224 would take 4.5 GB (1 x 100000: 15 GB); the crop takes 0.15 MB."""
    import subprocess
    import sys

    path = tmp_path / "thin.png"
    Image.new("RGB", size, (10, 200, 30)).save(path)
    done = subprocess.run([sys.executable, "-c", LIMITED, str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert result["shape"] == [1, 3, 224, 224]
    expected = [(c / 255 - m) / s for c, m, s in zip((10, 200, 30), PRE.IMAGENET_MEAN, PRE.IMAGENET_STD, strict=True)]
    np.testing.assert_allclose(result["pixel"], expected, atol=1e-5)


def test_the_pixel_limit_is_checked_on_what_resizing_allocates(tmp_path, monkeypatch):
    Image.new("RGB", (4, 4), (1, 2, 3)).save(tmp_path / "small.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # the file's 16 pixels pass; the 16 x 16 crop does not
    with pytest.raises(ImageLoadError) as error:
        PRE.load_and_preprocess(tmp_path / "small.png", PLAIN)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"{tmp_path / 'small.png'}: resizing 4 x 4 pixels to 16 x 16 would allocate ")
    assert "above Pillow's limit of 100" in message


@pytest.mark.parametrize("stage", ["decoding", "resizing"])
def test_out_of_memory_on_one_image_is_one_line(tmp_path, monkeypatch, stage):
    from PIL import ImageFile

    Image.new("RGB", (7, 5), (1, 2, 3)).save(tmp_path / "heavy.png")

    def exhausted(*args, **kwargs):
        raise MemoryError

    if stage == "decoding":
        monkeypatch.setattr(ImageFile.ImageFile, "load", exhausted)
    else:
        monkeypatch.setattr(PRE, "resize_and_crop", exhausted)
    with pytest.raises(ImageLoadError) as error:
        PRE.load_and_preprocess(tmp_path / "heavy.png", PLAIN)
    assert str(error.value) == f"{tmp_path / 'heavy.png'}: out of memory while {stage} it (7 x 5 pixels)"


# ------------------------------------------------------------------ what is not a regular file


@pytest.mark.skipif(not hasattr(os, "mkfifo") or not Path("/dev/null").exists(), reason="POSIX files")
def test_each_kind_of_non_file_has_its_own_reason(tmp_path):
    import threading

    folder = tmp_path / "folder.png"
    folder.mkdir()
    os.mkfifo(tmp_path / "pipe.png")
    (tmp_path / "loop.png").symlink_to(tmp_path / "loop.png")
    (tmp_path / "broken.png").symlink_to(tmp_path / "nowhere.png")
    (tmp_path / "to_folder.png").symlink_to(folder)
    (tmp_path / "to_device.png").symlink_to("/dev/null")
    expected = {
        "folder.png": "is a folder, not an image file",
        "to_folder.png": "is a folder, not an image file",
        "pipe.png": "is a FIFO, not a regular file",
        "to_device.png": "is a device, not a regular file",
        "loop.png": "is a symbolic-link loop",
        "broken.png": f"is a broken link (to {tmp_path / 'nowhere.png'})",
        "missing.png": "no such file",
    }
    found = {}

    def load_all():
        for name in expected:
            with pytest.raises(ImageLoadError) as error:
                gmar.load_image(tmp_path / name)
            found[name] = str(error.value)

    reader = threading.Thread(target=load_all, daemon=True)  # opening the FIFO for reading would block
    reader.start()
    reader.join(timeout=30)
    assert not reader.is_alive(), "load_image blocked on a FIFO"
    assert found == {name: f"{tmp_path / name}: {reason}" for name, reason in expected.items()}


# ------------------------------------------------------------------ warnings name the file


def corrupt_exif_jpeg(path: Path) -> Path:
    """A JPEG whose EXIF block announces two tags and holds one: Pillow warns "Corrupt EXIF data"."""
    tiff = b"II*\x00" + struct.pack("<IH", 8, 2) + struct.pack("<HHI4s", 0x0112, 3, 1, b"\x01\x00\x00\x00")
    Image.new("RGB", (8, 8), (1, 2, 3)).save(path, exif=b"Exif\x00\x00" + tiff)
    return path


def test_warnings_while_reading_an_image_start_with_its_path(tmp_path):
    import warnings

    jpeg = corrupt_exif_jpeg(tmp_path / "photo.jpg")
    nan = tmp_path / "nan.tif"
    Image.fromarray(np.full((4, 4), np.nan, dtype=np.float32), mode="F").save(nan)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        PRE.load_and_preprocess(jpeg, PLAIN)
        PRE.load_and_preprocess(nan, PLAIN)
    messages = [(w.category, str(w.message)) for w in caught]
    assert len(messages) == 2, messages
    assert messages[0][0] is UserWarning and messages[0][1].startswith(f"{jpeg}: Corrupt EXIF data.")
    assert messages[1] == (RuntimeWarning, f"{nan}: All-NaN slice encountered")
    assert all(w.filename == __file__ for w in caught), "the warning points at the caller's line"


# ------------------------------------------------------------------ formats


SUFFIXES = [".avif", ".bmp", ".gif", ".ico", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp"]


def test_the_suffixes_gmar_reads():
    """One list for the folder scans of explain and evaluate: what the CLI took, with AVIF and ICO."""
    assert getattr(PRE, "IMAGE_SUFFIXES", None) == frozenset(SUFFIXES)


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_a_file_of_each_listed_suffix_is_read(tmp_path, suffix):
    path = tmp_path / f"picture{suffix}"
    Image.new("RGB", (16, 16), (200, 30, 10)).save(path)
    assert np.abs(pixels(path)[8, 8] - [200, 30, 10]).max() <= 8  # lossy formats round a little
