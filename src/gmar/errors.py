"""Errors gmar raises on purpose. Each one says what went wrong and what to do next."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path


class GmarError(Exception):
    """Base class of every error gmar raises for a user mistake or an unusable input."""


class UnsupportedModelError(GmarError, TypeError):
    """The model belongs to no family gmar has an adapter for."""


class CaptureError(GmarError, RuntimeError):
    """A supported model ran, but its attention could not be captured as expected."""


class ModelLoadError(GmarError, RuntimeError):
    """A model named on the command line or in `gmar.load_model` could not be loaded."""


class ImageLoadError(GmarError, OSError):
    """An image file is missing, unreadable or not an image."""


class TargetError(GmarError, ValueError):
    """The `target` argument does not fit the model's output or the batch."""


class InputSizeError(GmarError, ValueError):
    """The images' size is one the model cannot take."""


class GmarWarning(UserWarning):
    """An input gmar explains anyway, although the result is meaningless (such as NaN pixels)."""


_PACKAGE = str(Path(__file__).resolve().parent)


def warn(message: str) -> None:
    """Issue a :class:`GmarWarning` attributed to the first caller outside gmar (the user's line)."""
    level, frame = 2, sys._getframe(1)
    while frame is not None and str(Path(frame.f_code.co_filename).resolve()).startswith(_PACKAGE + os.sep):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, GmarWarning, stacklevel=level)
