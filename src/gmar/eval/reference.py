"""The reference ViT: a timm ``VisionTransformer`` trained on :mod:`gmar.eval.scenes` scenes, shipped with gmar.

``gmar.load_reference_model()`` loads the checkpoint in the package (no network); ``gmar
train-reference`` reproduces it from its seed. The model is multi-label: class ``c`` is present
when ``sigmoid(logit_c) > 0.5``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from gmar.errors import ModelLoadError
from gmar.eval.scenes import CLASSES, Scenes
from gmar.progress import Progress

CHECKPOINT = "reference_vit.safetensors"
CARD = "reference_vit.md"


@dataclass(frozen=True)
class ReferenceConfig:
    """Architecture and training recipe of the reference model."""

    image_size: int = 64
    patch_size: int = 8
    embed_dim: int = 64
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 2.0
    seed: int = 0
    data_seed: int = 0
    train_scenes: int = 80000
    test_scenes: int = 2000
    steps: int = 18000
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 500
    weight_decay: float = 0.05
    #: weight of the per-patch loss (token labels from the scene masks); 0 turns it off
    token_loss: float = 1.0
    #: share of a patch an object must cover for the patch to be labelled with its class
    token_cover: float = 0.1


def build_reference_model(config: ReferenceConfig = ReferenceConfig()) -> nn.Module:
    """The reference architecture with freshly initialised weights (seeded by ``config.seed``)."""
    from timm.models.vision_transformer import VisionTransformer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = VisionTransformer(
            img_size=config.image_size,
            patch_size=config.patch_size,
            embed_dim=config.embed_dim,
            depth=config.depth,
            num_heads=config.num_heads,
            mlp_ratio=config.mlp_ratio,
            num_classes=len(CLASSES),
            global_pool="token",
        )
    model.pretrained_cfg = {
        **(getattr(model, "pretrained_cfg", None) or {}),
        "label_names": list(CLASSES),
        "mean": (0.0,) * 3,
        "std": (1.0,) * 3,
    }
    return model


def load_reference_model(path: str | Path | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """The shipped reference ViT (or the checkpoint at ``path``), in eval mode. Needs no network.

    ``path`` may be a safetensors file written by ``gmar train-reference`` (its architecture is read from
    the file's metadata) or a ``torch.save`` state dict of the default architecture.
    """
    from gmar.loading import load_state, load_weights

    file = Path(path) if path is not None else Path(str(resources.files("gmar") / "assets" / CHECKPOINT))
    if not file.exists():
        raise ModelLoadError(f"no reference checkpoint at {file}; create one with gmar train-reference")
    state = load_weights(file)
    known = ReferenceConfig.__dataclass_fields__
    stored = _stored_config(file)
    config = ReferenceConfig(**{k: v for k, v in stored.items() if k in known})
    model = build_reference_model(config)
    load_state(model, state, file, "the reference ViT", head_flag=False)
    return model.to(device).eval()


def _stored_config(file: Path) -> dict:
    """The architecture saved in a safetensors file's metadata; empty for any other file."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as handle:
            metadata = handle.metadata() or {}
        return json.loads(metadata.get("config", "{}"))
    except Exception:  # a torch.save file (load_weights has read it already) or no readable metadata
        return {}


def decide(logits: torch.Tensor) -> torch.Tensor:
    """The predicted label set: ``sigmoid(logit) > 0.5``, as bool ``(B, C)``."""
    return logits > 0


@torch.no_grad()
def exact_set_accuracy(model: nn.Module, scenes: Scenes, batch_size: int = 256) -> float:
    """Share of scenes whose predicted label set is exactly the set of present classes."""
    was_training = model.training
    model.eval()
    correct = 0
    try:
        for start in range(0, len(scenes), batch_size):
            images, labels, _ = scenes.batch(range(start, min(start + batch_size, len(scenes))))
            correct += int((decide(model(images)) == labels.bool()).all(dim=1).sum())
    finally:
        model.train(was_training)
    return correct / max(1, len(scenes))


def train_reference(
    config: ReferenceConfig = ReferenceConfig(), out: str | Path | None = None, progress: bool = True
) -> tuple[nn.Module, dict]:
    """Train the reference model from its seed; returns it and a report (accuracy, time).

    The loss on the CLS logits is binary cross-entropy on every class, each class on its own. (An
    earlier recipe added a cross-entropy against the target spread evenly over the present classes;
    its optimum makes the present classes' logits equal, so their gradients coincide and gradient
    explanations cannot tell the classes apart: see docs/evaluation.md.) With ``token_loss`` > 0
    the classifier head is also applied to every patch token, whose target is the set of classes
    whose object covers at least ``token_cover`` of the patch (token labelling, with labels read
    exactly from the scene masks): the patches learn what they show from the first step instead
    of through the CLS token alone. That auxiliary term uses no parameter of its own; the trained
    model is a plain CLS-token classifier.
    """
    start, cpu_start = time.perf_counter(), time.process_time()
    torch.manual_seed(config.seed)
    train = Scenes("train", config.train_scenes, seed=config.data_seed, image_size=config.image_size)
    images, labels, cover = _render(train, progress, config.patch_size)
    model = build_reference_model(config).train()
    # The explicit attention is faster than the fused CPU kernel at 65 tokens, and the per-tensor
    # optimiser loop faster than the multi-tensor one for 50 small tensors.
    fused = [block.attn.fused_attn for block in model.blocks]
    for block in model.blocks:
        block.attn.fused_attn = False
    optimiser = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay, foreach=False)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda step: _lr_factor(step, config))
    generator = torch.Generator().manual_seed(config.seed)
    bar = Progress(config.steps, "training", progress, unit="steps")
    loss_avg = None
    try:
        for step in range(config.steps):
            index = torch.randint(len(train), (config.batch_size,), generator=generator)
            batch = images[index].float().div_(255)
            flip = torch.rand(config.batch_size, generator=generator) < 0.5
            batch[flip] = batch[flip].flip(-1)
            loss = _loss(model, batch, labels[index], cover[index], flip, config)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimiser.step()
            schedule.step()
            value = loss.item()
            loss_avg = value if loss_avg is None else 0.98 * loss_avg + 0.02 * value
            bar.update(step + 1, note=f"loss {loss_avg:.3f}")
    finally:
        bar.close()
        for block, flag in zip(model.blocks, fused, strict=True):
            block.attn.fused_attn = flag
    model.eval()
    test = Scenes("test", config.test_scenes, seed=config.data_seed, image_size=config.image_size)
    accuracy = exact_set_accuracy(model, test)
    report = {
        "test_exact_set_accuracy": accuracy,
        "test_scenes": config.test_scenes,
        "train_seconds": round(time.perf_counter() - start, 1),
        "cpu_seconds": round(time.process_time() - cpu_start, 1),
        "threads": torch.get_num_threads(),
        "final_loss": round(loss_avg or float("nan"), 4),
    }
    if out is not None:
        save_reference(model, config, report, Path(out))
    return model, report


def _loss(
    model: nn.Module,
    batch: torch.Tensor,
    target: torch.Tensor,
    cover: torch.Tensor,
    flip: torch.Tensor,
    config: ReferenceConfig,
) -> torch.Tensor:
    """The training loss of one batch (see :func:`train_reference`)."""
    features = model.forward_features(batch)
    logits = model.forward_head(features)
    loss = F.binary_cross_entropy_with_logits(logits, target)
    if config.token_loss:
        grid = config.image_size // config.patch_size
        labelled = (cover.float() >= config.token_cover * 255).view(len(batch), -1, grid, grid)
        labelled[flip] = labelled[flip].flip(-1)
        patches = model.head(features[:, model.num_prefix_tokens :])  # (B, grid², C)
        loss = loss + config.token_loss * F.binary_cross_entropy_with_logits(
            patches, labelled.flatten(2).transpose(1, 2).float()
        )
    return loss


def save_reference(model: nn.Module, config: ReferenceConfig, report: dict, folder: Path) -> Path:
    """Write the checkpoint (config in its metadata) and the model card into ``folder``."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / CHECKPOINT
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"config": json.dumps(asdict(config)), "report": json.dumps(report)})
    (folder / CARD).write_text(_card(config, report))
    return path


def _card(config: ReferenceConfig, report: dict) -> str:
    size = sum(math.prod(s) for s in _shapes(config))
    return f"""# gmar reference ViT

A timm `VisionTransformer` trained from scratch, multi-label, on gmar's synthetic scenes
(`gmar.eval.scenes.Scenes`, classes: {", ".join(CLASSES)}). Shipped with gmar so that the benchmark runs
offline; load it with `gmar.load_reference_model()`.

- Architecture: {config.image_size}x{config.image_size} input, patch {config.patch_size} \
({config.image_size // config.patch_size}x{config.image_size // config.patch_size} grid), width {config.embed_dim}, \
{config.depth} blocks, {config.num_heads} heads, MLP ratio {config.mlp_ratio}, CLS token; {size:,} parameters.
- Input: RGB in [0, 1], no normalisation. Decision: class present when `sigmoid(logit) > 0.5`.
- Training: `gmar train-reference` (seed {config.seed}, data seed {config.data_seed}), {config.steps} steps of batch \
{config.batch_size} over {config.train_scenes} train scenes with horizontal flips, AdamW (lr {config.lr}, weight \
decay {config.weight_decay}, {config.warmup} warm-up steps, cosine decay), loss: binary cross-entropy of each \
class on the CLS logits{_token_text(config)}.
- Test exact-set accuracy: **{report["test_exact_set_accuracy"]:.4f}** on {report["test_scenes"]} test scenes \
(every present class and no other above the threshold).
- Training time: {report["train_seconds"]} s wall clock with {report["threads"]} CPU threads{_cpu_text(report)}.
- Date: {time.strftime("%Y-%m-%d")}.
"""


def _cpu_text(report: dict) -> str:
    if "cpu_seconds" not in report:
        return ""
    return f" ({report['cpu_seconds']} s of CPU time, user and system, over all threads)"


def _token_text(config: ReferenceConfig) -> str:
    if not config.token_loss:
        return ""
    return (
        f", plus {config.token_loss} × binary cross-entropy of the same head applied to every patch token, "
        f"against the classes whose object covers at least {config.token_cover:.0%} of that patch (token labels "
        "from the scene masks; training only)"
    )


def _shapes(config: ReferenceConfig) -> list[tuple[int, ...]]:
    with torch.device("meta"):
        return [tuple(p.shape) for p in build_reference_model(config).parameters()]


def _lr_factor(step: int, config: ReferenceConfig) -> float:
    if step < config.warmup:
        return (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _render(scenes: Scenes, progress: bool, patch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All scenes as uint8 images ``(N, 3, H, W)``, float labels ``(N, C)`` and each object's
    cover of each patch ``(N, C, grid²)`` as uint8 (255: the whole patch)."""
    size, grid = scenes.image_size, scenes.image_size // patch
    images = torch.empty(len(scenes), 3, size, size, dtype=torch.uint8)
    labels = torch.empty(len(scenes), len(CLASSES))
    cover = torch.empty(len(scenes), len(CLASSES), grid * grid, dtype=torch.uint8)
    bar = Progress(len(scenes), "rendering scenes", progress, unit="scenes")
    for i in range(len(scenes)):
        scene = scenes[i]
        images[i] = (scene.image * 255).round().to(torch.uint8)
        labels[i] = scene.labels
        masks = scene.masks[:, : grid * patch, : grid * patch].float()
        share = masks.reshape(len(CLASSES), grid, patch, grid, patch).mean(dim=(2, 4))
        cover[i] = (share.flatten(1) * 255).round().to(torch.uint8)
        bar.update(i + 1)
    bar.close()
    return images, labels, cover
