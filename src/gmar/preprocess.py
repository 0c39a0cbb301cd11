"""Loading images and turning them into the tensors a given model expects."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from gmar.errors import ImageLoadError

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


def load_image(path: str | Path) -> Image.Image:
    """Open an image file as RGB; raise :class:`ImageLoadError` with the reason if it cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise ImageLoadError(f"{path}: no such file")
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ImageLoadError(f"{path}: not a readable image ({reason})") from None


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
    return to_tensor([resize_and_crop(image.convert("RGB"), config) for image in images], config)


def denormalise(images: torch.Tensor, config: PreprocessConfig) -> torch.Tensor:
    """Undo the normalisation: ``(B, 3, H, W)`` model input to RGB in [0, 1] for display."""
    mean = torch.tensor(config.mean, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(config.std, device=images.device).view(1, 3, 1, 1)
    return (images.detach().float() * std + mean).clamp(0, 1)
