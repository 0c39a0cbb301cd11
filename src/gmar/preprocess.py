"""Loading images and turning them into the tensors a given model expects."""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from gmar.errors import ImageLoadError

#: The file suffixes (lowercase) that folder scans take as images: ``gmar explain`` and ``gmar evaluate``.
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".avif", ".ico"})
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

    Images of more than ``PIL.Image.MAX_IMAGE_PIXELS`` pixels are refused before they are decoded.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageLoadError(f"{path}: no such file")
    try:
        with warnings.catch_warnings():
            # Pillow warns between one and two times its limit; gmar refuses that range itself, below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                limit = Image.MAX_IMAGE_PIXELS
                if limit is not None and image.width * image.height > limit:
                    raise ImageLoadError(f"{path}: too large: {image.width} x {image.height} pixels{_limit(limit)}")
                image.load()
                ImageOps.exif_transpose(image, in_place=True)
                return to_rgb(image, background)
    except Image.DecompressionBombError as error:
        count = re.search(r"\((\d+) pixels\)", str(error))
        pixels = f"{count.group(1)} pixels" if count else "more pixels than Pillow allows"
        raise ImageLoadError(f"{path}: too large: {pixels}{_limit(Image.MAX_IMAGE_PIXELS)}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        if isinstance(error, ImageLoadError):
            raise
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ImageLoadError(f"{path}: not a readable image ({reason})") from None


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
    """Resize so the crop covers ``input_size / crop_pct``, then centre-crop to ``input_size``."""
    height, width = config.input_size
    scale = max(height / image.height, width / image.width) / config.crop_pct
    new_size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    image = image.resize(new_size, _RESAMPLE.get(config.interpolation, Image.Resampling.BICUBIC))
    left = (image.width - width) // 2
    top = (image.height - height) // 2
    return image.crop((left, top, left + width, top + height))


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
