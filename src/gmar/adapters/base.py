"""The one interface every model family implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import ClassVar

import torch
from torch import nn

from gmar.capture import Recorder
from gmar.layout import TokenLayout
from gmar.preprocess import PreprocessConfig


class ModelAdapter(ABC):
    """What gmar needs to know about a model, and how to instrument it.

    One subclass per family (timm, Hugging Face, OpenCLIP). Everything family-specific lives in
    the subclass; methods only see captured tensors and a :class:`TokenLayout`.
    """

    family: ClassVar[str]
    #: True when ``forward`` returns class logits, False when it returns an embedding (CLIP).
    is_classifier: ClassVar[bool] = True

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    @classmethod
    @abstractmethod
    def matches(cls, model: nn.Module) -> bool:
        """Whether ``model`` belongs to this family (cheap; imports nothing it need not)."""

    @property
    @abstractmethod
    def num_layers(self) -> int:
        """Number of attention layers."""

    @abstractmethod
    def token_layout(self, image_size: tuple[int, int]) -> TokenLayout:
        """Token layout for an input of ``image_size = (H, W)``; raises if the model cannot take it."""

    @abstractmethod
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The model's output for ``(B, 3, H, W)``: logits ``(B, classes)`` or an embedding ``(B, D)``."""

    @abstractmethod
    def instrument(self, recorder: Recorder) -> AbstractContextManager[None]:
        """Context manager: make every attention layer report to ``recorder``; undo it all on exit."""

    def preprocess_config(self) -> PreprocessConfig:
        """How to turn an image file into this model's input."""
        return PreprocessConfig()

    def class_names(self) -> list[str] | None:
        """Names of the output classes, where the model carries them."""
        return None


def remove_all(handles: list) -> Callable[[], None]:
    """A callback that removes every hook handle in ``handles`` (for ``ExitStack.callback``)."""

    def remove() -> None:
        for handle in handles:
            handle.remove()
        handles.clear()

    return remove
