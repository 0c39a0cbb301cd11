"""gmar: explain Vision Transformer decisions with GMAR and the methods it is compared with.

``import gmar`` loads the core: the adapters, the capture, the methods and what they share. The
evaluation harness (:mod:`gmar.eval`, with :mod:`gmar.metrics`), the pictures (:mod:`gmar.viz`) and the
front ends (:mod:`gmar.frontends`: the command line, the demo, the web page, the benchmark) load when
they are first used, e.g. ``gmar.viz.overlay(...)`` or ``gmar.load_reference_model()``.
"""

import importlib
from typing import Any

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
    AttnLRP,
    GradCAM,
    GradientRollout,
    HeadWeightedGAE,
    LeGrad,
    Occlusion,
    PartialLRP,
    RawAttention,
    TransformerAttribution,
    all_methods,
    available_methods,
    explain,
    head_attention,
    supported_methods,
)
from gmar.preprocess import PreprocessConfig, denormalise, load_image, preprocess
from gmar.targets import TextTarget

__version__ = "0.1.0"

__all__ = [
    "GAE",
    "GMAR",
    "AttentionRollout",
    "AttnLRP",
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
    "PartialLRP",
    "PreprocessConfig",
    "RawAttention",
    "TargetError",
    "TextTarget",
    "TokenLayout",
    "TransformerAttribution",
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


#: attributes loaded on first use, so that ``import gmar`` loads no evaluation or front-end module
_LAZY = {
    "eval": "gmar.eval",
    "metrics": "gmar.metrics",
    "viz": "gmar.viz",
    "frontends": "gmar.frontends",
    "load_reference_model": "gmar.eval.reference",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'gmar' has no attribute {name!r}")
    module = importlib.import_module(_LAZY[name])
    return getattr(module, name) if name == "load_reference_model" else module
