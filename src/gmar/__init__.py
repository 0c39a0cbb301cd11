"""gmar: explain Vision Transformer decisions with GMAR and the methods it is compared with."""

from gmar.adapters import get_adapter
from gmar.errors import (
    CaptureError,
    GmarError,
    GmarWarning,
    ImageLoadError,
    InputSizeError,
    ModelLoadError,
    TargetError,
    UnsupportedModelError,
)
from gmar.explanation import Explanation
from gmar.layout import TokenLayout
from gmar.loading import LoadedModel, load_model
from gmar.methods import (
    GAE,
    GMAR,
    AttentionRollout,
    GradCAM,
    GradientRollout,
    HeadWeightedGAE,
    LeGrad,
    Occlusion,
    RawAttention,
    all_methods,
    available_methods,
    explain,
    head_attention,
    supported_methods,
)
from gmar.preprocess import PreprocessConfig, denormalise, load_image, preprocess
from gmar.reference import load_reference_model
from gmar.targets import TextTarget

__version__ = "0.1.0"

__all__ = [
    "GAE",
    "GMAR",
    "AttentionRollout",
    "CaptureError",
    "Explanation",
    "GmarError",
    "GmarWarning",
    "GradCAM",
    "GradientRollout",
    "HeadWeightedGAE",
    "ImageLoadError",
    "InputSizeError",
    "LeGrad",
    "LoadedModel",
    "ModelLoadError",
    "Occlusion",
    "PreprocessConfig",
    "RawAttention",
    "TargetError",
    "TextTarget",
    "TokenLayout",
    "UnsupportedModelError",
    "all_methods",
    "available_methods",
    "denormalise",
    "explain",
    "get_adapter",
    "head_attention",
    "load_image",
    "load_model",
    "load_reference_model",
    "preprocess",
    "preprocess_config",
    "supported_methods",
]


def preprocess_config(model) -> PreprocessConfig:
    """How to preprocess images for ``model`` (from the model's own data config where it has one)."""
    return get_adapter(model).preprocess_config()
