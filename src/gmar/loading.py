"""Loading models by name: ``timm:NAME``, ``hf:NAME_OR_PATH``, ``openclip:ARCH/TAG`` (the specs of the
table of zoos, :mod:`gmar.adapters.zoos`).

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
from gmar.adapters.zoos import ZOOS, loadable
from gmar.errors import GmarError, ModelLoadError
from gmar.preprocess import PreprocessConfig

#: the zoos a model spec may name, from the table of zoos
FAMILIES = tuple(zoo.family for zoo in loadable())


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
        forms = ", ".join(zoo.spec for zoo in loadable())  # type: ignore[misc]
        raise ModelLoadError(f"model spec {spec!r} must be one of {forms}")
    return family, name


def load_model(
    spec: str,
    *,
    checkpoint: str | Path | None = None,
    pretrained: bool = True,
    device: str | torch.device = "cpu",
    num_classes: int | None = None,
) -> LoadedModel:
    """Load ``spec``; with ``checkpoint`` the weights come from that local file instead of a hub.

    ``pretrained=False`` builds the architecture with seeded random weights (for pipelines and tests;
    such a model's explanations mean nothing). ``num_classes`` builds the classifier head with that
    many outputs (timm's ``num_classes``, Hugging Face's ``num_labels``), for a fine-tuned checkpoint;
    it needs ``checkpoint`` or ``pretrained=False``, since a new head on hub weights is untrained.
    """
    family, name = parse_spec(spec)
    if family == "hf":
        name = _local_directory(name)
    local = family == "hf" and Path(name).is_dir()  # a saved model: nothing to fetch
    from_hub = pretrained and checkpoint is None and not local
    _check_num_classes(family, num_classes, pretrained and checkpoint is None)
    hub = _HubState()
    try:
        with torch.random.fork_rng(devices=[]), _hub_offline_unless_reachable(from_hub, hub):
            torch.manual_seed(0)
            loaded = _LOADERS[family](name, from_hub, num_classes)
    except GmarError:  # already one line: a load error, or a zoo version gmar does not support
        raise
    except ImportError as error:
        raise ModelLoadError(f"{spec}: {error}; install it with pip install 'gmar[{ZOOS[family].extra}]'") from None
    except Exception as error:  # hub, network and name errors come in many types
        if hub.unreachable:
            raise ModelLoadError(
                f"cannot load {spec}: {hub.host} is unreachable and the weights are not in the local cache; "
                "pass --checkpoint FILE with local weights (or hf: with a saved directory)"
            ) from None
        hint = " (no network? use --checkpoint FILE, or hf: with a local directory)" if from_hub else ""
        raise ModelLoadError(f"cannot load {spec}: {_first_line(error)}{hint}") from None
    if checkpoint is not None:
        load_state(loaded.model, load_weights(Path(checkpoint)), Path(checkpoint), spec)
    loaded.model.to(device).eval()
    return loaded


def _check_num_classes(family: str, num_classes: int | None, from_hub: bool) -> None:
    if num_classes is None:
        return
    if not ZOOS[family].class_heads:
        classifiers = ", ".join(f"{zoo.family}:" for zoo in loadable() if zoo.class_heads)
        raise ModelLoadError(
            f"--num-classes is for classifiers ({classifiers}); an {ZOOS[family].label} model has no class head"
        )
    if num_classes < 1:
        raise ModelLoadError(f"--num-classes must be at least 1, not {num_classes}")
    if from_hub:
        raise ModelLoadError(
            "--num-classes builds a new, untrained head: give the fine-tuned weights with --checkpoint FILE "
            "(or use --random-init)"
        )


def _local_directory(name: str) -> str:
    """``name`` itself, or the expanded path when it is clearly a path (not a hub id); refuses a missing one."""
    looks_like_path = name.startswith(("./", "../", "/", "~")) or "\\" in name or name.count("/") > 1
    if not looks_like_path:
        return name
    path = Path(name).expanduser()
    if not path.exists():
        raise ModelLoadError(f"hf:{name}: no such directory (a saved model is the folder save_pretrained wrote)")
    if not path.is_dir():
        raise ModelLoadError(f"hf:{name} is a file, not a directory: give the folder save_pretrained wrote")
    return str(path)


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a safetensors file or a ``torch.save`` file (read with ``weights_only=True``).

    The format is told from the file's first bytes, not its name.
    """
    if path.is_dir():
        raise ModelLoadError(f"checkpoint {path} is a folder; give the weights file (.safetensors or torch.save)")
    if not path.is_file():
        raise ModelLoadError(f"checkpoint {path}: no such file")
    kind = _weights_format(path)
    if kind is None:
        raise ModelLoadError(
            f"checkpoint {path} is neither a safetensors file nor a torch.save file{_what_it_looks_like(path)}; "
            "give weights saved with safetensors or torch.save"
        )
    try:
        if kind == "safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        if "Weights only load failed" in str(error):
            raise ModelLoadError(
                f"checkpoint {path} holds pickled objects besides tensors (a whole model?), which gmar does not "
                "unpickle; save model.state_dict() with torch.save or safetensors"
            ) from None
        raise ModelLoadError(
            f"checkpoint {path}: cannot read it as a {kind} file, it may be damaged or cut short ({_first_line(error)})"
        ) from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ModelLoadError(f"checkpoint {path}: expected a state dict, found {type(state).__name__}")
    return state


def _weights_format(path: Path) -> str | None:
    """``"safetensors"``, ``"torch.save"`` (a zip archive or a legacy pickle) or None, from the first bytes."""
    with open(path, "rb") as handle:
        head = handle.read(9)
    if head.startswith(b"PK\x03\x04") or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5):
        return "torch.save"
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") <= path.stat().st_size - 8:
        return "safetensors"
    return None


def _what_it_looks_like(path: Path) -> str:
    with open(path, "rb") as handle:
        head = handle.read(512)
    if not head:
        return " (it is empty)"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return ""
    return " (it holds text)"


def load_state(model: nn.Module, state: dict, path: Path, spec: str, *, head_flag: bool = True) -> None:
    """Copy ``state`` into ``model`` once every key and shape is known to fit; else one line naming the misfits.

    ``head_flag``: whether a head of another size may be answered with ``--num-classes N``.
    """
    own = model.state_dict()
    shapes, missing = [], []
    for key, value in own.items():
        if key not in state:
            missing.append(key)
        elif not isinstance(state[key], torch.Tensor):
            shapes.append((key, f"{key} is a {type(state[key]).__name__} in the checkpoint, not a tensor"))
        elif tuple(state[key].shape) != tuple(value.shape):
            text = f"{key} {_shape(state[key].shape)} in the checkpoint, {_shape(value.shape)} in the model"
            shapes.append((key, text))
    unexpected = [key for key in state if key not in own]
    problems = [t for _, t in shapes] + [f"missing {k}" for k in missing] + [f"unexpected {k}" for k in unexpected]
    if problems:
        shown = ", ".join(problems[:3]) + (f" and {len(problems) - 3} more" if len(problems) > 3 else "")
        classes = _head_size(model, state, [k for k, _ in shapes]) if head_flag and not missing + unexpected else None
        if classes is not None:
            advice = f"it holds a {classes}-class head: pass --num-classes {classes}"
        else:
            advice = "this checkpoint is for another architecture: pass the --model it was trained as"
        raise ModelLoadError(f"checkpoint {path} does not fit {spec}: {shown}; {advice}")
    try:
        model.load_state_dict(state, strict=False)
    except Exception as error:
        raise ModelLoadError(f"checkpoint {path} does not fit {spec}: {_first_line(error)}") from None


def _head_size(model: nn.Module, state: dict, keys: list[str]) -> int | None:
    """The checkpoint's number of classes when the only misfits are the classifier's rows, else None."""
    config = getattr(model, "config", None)
    classes = getattr(model, "num_classes", None) or getattr(config, "num_labels", None)
    own = model.state_dict()
    if not keys or not isinstance(classes, int):
        return None
    sizes = set()
    for key in keys:
        theirs, mine = state[key], own[key]
        if not isinstance(theirs, torch.Tensor) or theirs.ndim == 0 or mine.shape[0] != classes:
            return None
        if tuple(theirs.shape[1:]) != tuple(mine.shape[1:]):
            return None
        sizes.add(int(theirs.shape[0]))
    return sizes.pop() if len(sizes) == 1 else None


def _shape(shape: torch.Size) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


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


def _load_timm(name: str, from_hub: bool, num_classes: int | None) -> LoadedModel:
    import timm

    if not name.startswith(("hf-hub:", "hf_hub:", "local-dir:")) and not timm.is_model(name):
        raise ModelLoadError(f"timm:{name}: no timm model named {name!r}; timm.list_models('*vit*') lists them")
    head = {} if num_classes is None else {"num_classes": num_classes}
    model = timm.create_model(name, pretrained=from_hub, **head)
    adapter = get_adapter(model)
    return LoadedModel(model, adapter.preprocess_config(), adapter.class_names(), f"timm:{name}")


def _load_hf(name: str, from_hub: bool, num_classes: int | None) -> LoadedModel:
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForImageClassification

    hf_config = AutoConfig.from_pretrained(name, **({} if num_classes is None else {"num_labels": num_classes}))
    # An image-text model (CLIP, SigLIP) is explained through its image embedding and text prompts: build
    # it whole, not a classifier with a fresh head, unless a classifier is asked for or saved.
    architectures = getattr(hf_config, "architectures", None) or []
    classifier = num_classes is not None or any(a.endswith("ForImageClassification") for a in architectures)
    text_image = hf_config.model_type in _TEXT_IMAGE and not classifier
    auto = AutoModel if text_image else AutoModelForImageClassification
    if num_classes is None and (from_hub or Path(name).is_dir()):
        model = auto.from_pretrained(name)
    else:  # the weights come from a checkpoint (or are random): build from the config
        model = auto.from_config(hf_config)
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


def _load_openclip(name: str, from_hub: bool, num_classes: int | None) -> LoadedModel:
    import open_clip

    arch, _, tag = name.partition("/")
    if from_hub and not tag:
        raise ModelLoadError(f"openclip:{name}: name the weights as ARCH/TAG, e.g. openclip:ViT-B-16/laion2b_s34b_b88k")
    model = open_clip.create_model(arch, pretrained=tag if from_hub else None)
    adapter = get_adapter(model)
    tokenizer = open_clip.get_tokenizer(arch)
    return LoadedModel(model, adapter.preprocess_config(), None, f"openclip:{name}", {"tokenizer": tokenizer})


#: family -> its loader, named in the table of zoos
_LOADERS = {zoo.family: globals()[zoo.loader] for zoo in loadable() if zoo.loader is not None}
