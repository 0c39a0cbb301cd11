"""Loading models by name: ``timm:NAME``, ``hf:NAME_OR_PATH``, ``openclip:ARCH/TAG``.

Failures (no network, an unknown name, a checkpoint that does not fit) raise
:class:`ModelLoadError` with a one-line message.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gmar.adapters import get_adapter
from gmar.errors import ModelLoadError
from gmar.preprocess import PreprocessConfig

FAMILIES = ("timm", "hf", "openclip")


@dataclass
class LoadedModel:
    """A model ready to explain, with what it takes to feed and label it."""

    model: nn.Module
    preprocess: PreprocessConfig
    class_names: list[str] | None
    spec: str
    extras: dict[str, Any] = field(default_factory=dict)


def parse_spec(spec: str) -> tuple[str, str]:
    family, sep, name = spec.partition(":")
    if not sep or family not in FAMILIES or not name:
        raise ModelLoadError(f"model spec {spec!r} must be one of timm:NAME, hf:NAME_OR_PATH, openclip:ARCH/TAG")
    return family, name


def load_model(
    spec: str, *, checkpoint: str | Path | None = None, pretrained: bool = True, device: str | torch.device = "cpu"
) -> LoadedModel:
    """Load ``spec``; with ``checkpoint`` the weights come from that local file instead of a hub.

    ``pretrained=False`` builds the architecture with seeded random weights (for pipelines and tests;
    such a model's explanations mean nothing).
    """
    family, name = parse_spec(spec)
    from_hub = pretrained and checkpoint is None
    hub = _HubState()
    try:
        with torch.random.fork_rng(devices=[]), _hub_offline_unless_reachable(from_hub, hub):
            torch.manual_seed(0)
            loaded = _LOADERS[family](name, from_hub)
    except ModelLoadError:
        raise
    except ImportError as error:
        extra = {"timm": "timm", "hf": "hf", "openclip": "clip"}[family]
        raise ModelLoadError(f"{spec}: {error}; install it with pip install 'gmar[{extra}]'") from None
    except Exception as error:  # hub, network and name errors come in many types
        if hub.unreachable:
            raise ModelLoadError(
                f"cannot load {spec}: {hub.host} is unreachable and the weights are not in the local cache; "
                "pass --checkpoint FILE with local weights (or hf: with a saved directory)"
            ) from None
        hint = " (no network? use --checkpoint FILE, or hf: with a local directory)" if from_hub else ""
        raise ModelLoadError(f"cannot load {spec}: {_first_line(error)}{hint}") from None
    if checkpoint is not None:
        _load_checkpoint(loaded.model, Path(checkpoint))
    loaded.model.to(device).eval()
    return loaded


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a ``.safetensors`` file or a ``torch.save`` file (read with ``weights_only=True``)."""
    if not path.is_file():
        raise ModelLoadError(f"checkpoint {path}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ModelLoadError(f"checkpoint {path}: cannot read it ({_first_line(error)})") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ModelLoadError(f"checkpoint {path}: expected a state dict, found {type(state).__name__}")
    return state


def _load_checkpoint(model: nn.Module, path: Path) -> None:
    state = load_weights(path)
    result = model.load_state_dict(state, strict=False)
    problems = [f"missing {k}" for k in result.missing_keys] + [f"unexpected {k}" for k in result.unexpected_keys]
    if problems:
        shown = ", ".join(problems[:3]) + (f" and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise ModelLoadError(f"checkpoint {path} does not fit the model: {shown}")


@dataclass
class _HubState:
    host: str = ""
    unreachable: bool = False


@contextmanager
def _hub_offline_unless_reachable(from_hub: bool, state: _HubState) -> Iterator[None]:
    """Switch the Hugging Face hub client to offline mode while its host cannot even be resolved.

    Cached weights still load; a cold cache fails at once instead of after a minute of retries.
    """
    try:
        from huggingface_hub import constants
    except ImportError:
        yield
        return
    state.host = (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").split("://")[-1].split("/")[0]
    previous = constants.HF_HUB_OFFLINE
    if from_hub and not previous:
        try:
            socket.getaddrinfo(state.host, 443)
        except OSError:
            constants.HF_HUB_OFFLINE = state.unreachable = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = previous


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    line = text[0] if text else type(error).__name__
    return line if len(line) <= 300 else line[:297] + "..."


def _load_timm(name: str, from_hub: bool) -> LoadedModel:
    import timm

    model = timm.create_model(name, pretrained=from_hub)
    adapter = get_adapter(model)
    return LoadedModel(model, adapter.preprocess_config(), adapter.class_names(), f"timm:{name}")


def _load_hf(name: str, from_hub: bool) -> LoadedModel:
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForImageClassification

    hf_config = AutoConfig.from_pretrained(name)
    # An image-text model (CLIP, SigLIP) is explained through its image embedding and text prompts: build
    # it whole, not a classifier with a fresh head, unless the checkpoint is such a classifier.
    architectures = getattr(hf_config, "architectures", None) or []
    classifier = any(a.endswith("ForImageClassification") for a in architectures)
    text_image = hf_config.model_type in _TEXT_IMAGE and not classifier
    auto = AutoModel if text_image else AutoModelForImageClassification
    model = auto.from_pretrained(name) if from_hub or Path(name).is_dir() else auto.from_config(hf_config)
    adapter = get_adapter(model)
    extras = {"tokenizer": _hf_tokenizer(name)} if text_image else {}
    config = adapter.preprocess_config()
    try:
        processor = AutoImageProcessor.from_pretrained(name)
    except Exception:  # no saved processor (or offline): the family defaults stand
        processor = None
    if processor is not None and getattr(processor, "image_mean", None) and getattr(processor, "image_std", None):
        config = replace(config, mean=tuple(processor.image_mean), std=tuple(processor.image_std))
    return LoadedModel(model, config, adapter.class_names(), f"hf:{name}", extras)


#: transformers model types with a text tower, loaded whole for text-prompt targets
_TEXT_IMAGE = ("clip", "metaclip_2", "siglip", "siglip2")


def _hf_tokenizer(name: str) -> Any:
    """The saved tokenizer of an image-text model (None without one: the CLI then says so)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name)
    except Exception:  # no saved tokenizer (or offline)
        return None


def _load_openclip(name: str, from_hub: bool) -> LoadedModel:
    import open_clip

    arch, _, tag = name.partition("/")
    if from_hub and not tag:
        raise ModelLoadError(f"openclip:{name}: name the weights as ARCH/TAG, e.g. openclip:ViT-B-16/laion2b_s34b_b88k")
    model = open_clip.create_model(arch, pretrained=tag if from_hub else None)
    adapter = get_adapter(model)
    tokenizer = open_clip.get_tokenizer(arch)
    return LoadedModel(model, adapter.preprocess_config(), None, f"openclip:{name}", {"tokenizer": tokenizer})


_LOADERS = {"timm": _load_timm, "hf": _load_hf, "openclip": _load_openclip}
