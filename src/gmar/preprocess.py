"""Loading images and turning them into the tensors a given model expects."""

from __future__ import annotations

import errno
import os
import re
import stat
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from gmar.errors import ImageLoadError

#: The file suffixes the folder scans of ``gmar explain`` and ``gmar evaluate`` take (lower case).
IMAGE_SUFFIXES = frozenset({".avif", ".bmp", ".gif", ".ico", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp"})
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


@dataclass(frozen=True)
class PreprocessConfig:
    """How a model wants its images: resize the shorter side to ``size / crop_pct``, centre-crop
    ``size = (H, W)``, scale to [0, 1], normalise with ``mean`` and ``std``."""

    input_size: tuple[int, int] = (224, 224)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bicubic"
    crop_pct: float = 1.0


#: What transparent pixels are composited over (see :func:`to_rgb`).
WHITE = (255, 255, 255)


def load_image(path: str | Path, background: tuple[int, int, int] = WHITE) -> Image.Image:
    """Open an image file as the RGB picture it shows (see :func:`to_rgb`), turned upright by its EXIF
    orientation; raise :class:`ImageLoadError` with the reason if it cannot be read.

    Images of more than ``PIL.Image.MAX_IMAGE_PIXELS`` pixels are refused before they are decoded. A
    folder, a FIFO, a device, a broken link or a link loop is refused with what it is; a FIFO is never
    waited on.
    """
    path = Path(path)
    size = None
    try:
        with warnings.catch_warnings():
            # Pillow warns between one and two times its limit; gmar refuses that range itself, below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with _open_regular(path) as handle, Image.open(handle) as image:
                size = image.size
                limit = Image.MAX_IMAGE_PIXELS
                if limit is not None and image.width * image.height > limit:
                    raise ImageLoadError(f"{path}: too large: {image.width} x {image.height} pixels{_limit(limit)}")
                image.load()
                ImageOps.exif_transpose(image, in_place=True)
                return to_rgb(image, background)
    except MemoryError:
        raise ImageLoadError(f"{path}: out of memory while decoding it{_pixels(size)}") from None
    except Image.DecompressionBombError as error:
        count = re.search(r"\((\d+) pixels\)", str(error))
        pixels = f"{count.group(1)} pixels" if count else "more pixels than Pillow allows"
        raise ImageLoadError(f"{path}: too large: {pixels}{_limit(Image.MAX_IMAGE_PIXELS)}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        if isinstance(error, ImageLoadError):
            raise
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        if isinstance(error, UnidentifiedImageError):  # its message names the open file object, not the path
            reason = "cannot identify image file"
        raise ImageLoadError(f"{path}: not a readable image ({reason})") from None


def _open_regular(path: Path):
    """``path`` opened for reading if it is a regular file (or a link to one); else :class:`ImageLoadError`
    saying what it is. Opened without blocking, so a FIFO is refused, not waited on."""
    nonblocking = getattr(os, "O_NONBLOCK", 0)
    try:
        handle = open(path, "rb", opener=lambda name, flags: os.open(name, flags | nonblocking))
    except OSError as error:
        raise ImageLoadError(f"{path}: {_not_a_file(path, error)}") from None
    try:
        mode = os.fstat(handle.fileno()).st_mode
    except OSError:
        handle.close()
        raise
    if not stat.S_ISREG(mode):
        handle.close()
        raise ImageLoadError(f"{path}: {_kind(mode)}")
    return handle


def _not_a_file(path: Path, error: OSError) -> str:
    """Why ``path`` could not be opened, in words."""
    if error.errno == errno.ELOOP:
        return "is a symbolic-link loop"
    if path.is_dir():  # Windows refuses to open a folder
        return "is a folder, not an image file"
    if error.errno == errno.ENOENT:
        if path.is_symlink():
            return f"is a broken link (to {os.readlink(path)})"
        return "no such file"
    if error.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    return error.strerror or type(error).__name__


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "is a folder, not an image file"
    if stat.S_ISFIFO(mode):
        return "is a FIFO, not a regular file"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "is a device, not a regular file"
    if stat.S_ISSOCK(mode):
        return "is a socket, not a regular file"
    return "is not a regular file"


def _pixels(size: tuple[int, int] | None) -> str:
    return "" if size is None else f" ({size[0]} x {size[1]} pixels)"


def _limit(limit: int | None) -> str:
    return f", above Pillow's limit of {limit} (raise PIL.Image.MAX_IMAGE_PIXELS if you trust the file)"


def to_rgb(image: Image.Image, background: tuple[int, int, int] = WHITE) -> Image.Image:
    """The RGB picture an image shows, whatever its mode.

    Transparent and partly transparent pixels (alpha channels, palette or colour-key transparency) are
    composited over ``background``. 16-bit samples (modes ``I;16*`` and ``I``, as 16-bit PNG and TIFF
    files open) are scaled to 8 bit (65535 -> 255). Floating-point images (``F``) are taken as
    fractions of white when every value lies in [0, 1], else as 0-255 values; values outside 0-255
    are clipped. CMYK, YCbCr, grey and 1-bit images are converted with Pillow's formulas.
    """
    if image.mode == "RGB" and "transparency" not in image.info:
        return image
    if image.mode.startswith("I") or image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I"):
            values = values / 257.0
        elif values.size and np.nanmin(values) >= 0.0 and np.nanmax(values) <= 1.0:
            values = values * 255.0
        grey = np.clip(np.nan_to_num(np.round(values)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if image.mode in ("RGBA", "LA", "La", "RGBa", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        flat = Image.new("RGBA", rgba.size, (*background, 255))
        flat.alpha_composite(rgba)
        return flat.convert("RGB")
    return image.convert("RGB")


def resize_and_crop(image: Image.Image, config: PreprocessConfig) -> Image.Image:
    """Resize so the crop covers ``input_size / crop_pct``, then centre-crop to ``input_size``.

    Only the part of ``image`` that becomes the crop is resampled (Pillow's ``resize(box=...)``), so
    the memory taken is about the crop's, whatever the aspect ratio: a 30000 x 1 image is not first
    enlarged to 6720000 x 224. Raises :class:`ImageLoadError` if even that would exceed
    ``PIL.Image.MAX_IMAGE_PIXELS``.
    """
    height, width = config.input_size
    scale = max(height / image.height, width / image.width) / config.crop_pct
    # the size the whole image would be resized to, and the crop's place in it
    full = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    left = (full[0] - width) // 2
    top = (full[1] - height) // 2
    x_scale, y_scale = image.width / full[0], image.height / full[1]  # source pixels per resized pixel
    right, bottom = min((left + width) * x_scale, image.width), min((top + height) * y_scale, image.height)
    box = (left * x_scale, top * y_scale, right, bottom)
    limit = Image.MAX_IMAGE_PIXELS
    allocated = _resize_pixels(image.size, (width, height), box)
    if limit is not None and allocated > limit:
        raise ImageLoadError(
            f"resizing {image.width} x {image.height} pixels to {width} x {height} would allocate {allocated} "
            f"pixels{_limit(limit)}"
        )
    return image.resize((width, height), _RESAMPLE.get(config.interpolation, Image.Resampling.BICUBIC), box=box)


#: the widest filter's support, in source pixels per unit of scale (Lanczos: 3)
_SUPPORT = 3


def _resize_pixels(source: tuple[int, int], size: tuple[int, int], box: tuple[float, float, float, float]) -> int:
    """About how many pixels resizing ``box`` of a ``source`` image to ``size`` allocates: the output,
    and Pillow's intermediate image, ``size``'s width by the source rows its vertical filter reads."""
    rows_per_pixel = (box[3] - box[1]) / size[1]
    rows = min(source[1], int(box[3] - box[1] + 2 * _SUPPORT * max(rows_per_pixel, 1.0)) + 2)
    return size[0] * size[1] + size[0] * rows


@contextmanager
def warnings_of(path: str | Path) -> Iterator[list[tuple[type[Warning], str]]]:
    """Collect the warnings raised in the block (Pillow's "Corrupt EXIF data", numpy's "All-NaN
    slice"...) instead of letting them print unnamed; the list holds each one once, as its category
    and ``"PATH: message"``, for the caller to report."""
    named: list[tuple[type[Warning], str]] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield named
        finally:
            for warning in caught:
                entry = (warning.category, f"{path}: {warning.message}")
                if entry not in named:
                    named.append(entry)


def load_and_preprocess(path: str | Path, config: PreprocessConfig) -> torch.Tensor:
    """One image file as the model's input ``(1, 3, H, W)``: :func:`load_image`, then :func:`preprocess`.

    Every failure is one :class:`ImageLoadError` naming the file, running out of memory included.
    Warnings raised on the way (Pillow's "Corrupt EXIF data", numpy's "All-NaN slice") are issued
    again, once each, with the file's path in front (:func:`warnings_of`).
    """
    size = None
    with warnings_of(path) as named:
        try:
            image = load_image(path)
            size = image.size
            tensor = preprocess(image, config)
        except MemoryError:
            raise ImageLoadError(f"{path}: out of memory while resizing it{_pixels(size)}") from None
        except ImageLoadError as error:
            if str(error).startswith(str(path)):
                raise
            raise ImageLoadError(f"{path}: {error}") from None
    for category, line in named:
        warnings.warn(line, category, stacklevel=2)
    return tensor


def to_tensor(images: Sequence[Image.Image], config: PreprocessConfig) -> torch.Tensor:
    """Stack already cropped RGB images into a normalised float tensor ``(B, 3, H, W)``."""
    arrays = [np.asarray(image, dtype=np.float32) / 255.0 for image in images]
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    mean = torch.tensor(config.mean).view(1, 3, 1, 1)
    std = torch.tensor(config.std).view(1, 3, 1, 1)
    return (batch - mean) / std


def preprocess(images: Image.Image | Sequence[Image.Image], config: PreprocessConfig) -> torch.Tensor:
    """PIL image(s) to the model's input tensor ``(B, 3, H, W)``."""
    if isinstance(images, Image.Image):
        images = [images]
    return to_tensor([resize_and_crop(to_rgb(image), config) for image in images], config)


def denormalise(images: torch.Tensor, config: PreprocessConfig) -> torch.Tensor:
    """Undo the normalisation: ``(B, 3, H, W)`` model input to RGB in [0, 1] for display."""
    mean = torch.tensor(config.mean, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(config.std, device=images.device).view(1, 3, 1, 1)
    return (images.detach().float() * std + mean).clamp(0, 1)
