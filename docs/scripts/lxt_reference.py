"""Reference relevance maps of AttnLRP (CP-LRP variant) made by lxt 2.1, the AttnLRP authors' package,
on torchvision's vit_b_16 with seeded weights, for gmar's own implementation to be tested against.

    bash docs/scripts/lxt_env.sh /tmp/lxt-env
    PYTHONPATH=/tmp/lxt-env python docs/scripts/lxt_reference.py --out tests/data/lxt_vit_b_16.pt [--images 4]

lxt patches torch.nn.GELU, torch.nn.LayerNorm and torch.nn.MultiheadAttention process-wide and needs
transformers 4, so this runs in that side environment only, never inside gmar's tests.

The recipe is lxt's own ViT example (examples/vit_torch.py of rachtibat/LRP-eXplains-Transformers):
``monkey_patch(torchvision.models.vision_transformer)``, ``monkey_patch_zennit()``, for the Gamma setting a
zennit ``LayerMapComposite([(Conv2d, Gamma(conv_gamma)), (Linear, Gamma(lin_gamma))])`` registered on the
model, parameters without gradients, the target logit back-propagated and relevance = ``(x * x.grad).sum(1)``.
All images of one (setting, target) go in one batch: every rule acts per sample (checked below).

Stored (torch.save of a dict; the axes of the maps are settings, images, targets):
  settings        [{"name", "conv_gamma", "lin_gamma"}]: 0 = no composite (CP-LRP patches only),
                  1 = Gamma(0.25) on the Conv2d, Gamma(0.05) on the Linear layers
  targets         (images, 2) int64: class 3, and the class the model predicts
  token_map       (2, images, 2, 14, 14) float32: the pixel map summed over each 16x16 patch
  pixel_map_first (2, 2, 224, 224) float32: the pixel map of the first image
  pixel_map       (2, images, 2, 224, 224) float32, only when it is at most 3 MB
  logits          (images, 1000) float32 of the patched model; plain_logits of the unpatched one
  gradient_x_input_token_map  (images, 2, 14, 14): plain gradient x input before patching, the check
                  that the patching changed the maps
  gamma_modules   names of the modules whose zennit Gamma hook ran (the Linear out_proj inside
                  nn.MultiheadAttention is applied functionally, so its hook never runs)
  batch_check     largest |batched - alone| of the first image's maps, over the largest |map|
  versions, seed, image_seed, images, model
"""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import version
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
from seeded import fill_seeded_, seeded_images  # noqa: E402

SETTINGS = [
    {"name": "cp_lrp", "conv_gamma": None, "lin_gamma": None},
    {"name": "gamma", "conv_gamma": 0.25, "lin_gamma": 0.05},
]
FIXED_CLASS = 3
PATCH = 16
FULL_PIXEL_MAP_BYTES = 3 * 1024 * 1024


def composite_for(setting):
    if setting["conv_gamma"] is None:
        return None
    from zennit.composites import LayerMapComposite
    from zennit.rules import Gamma

    return LayerMapComposite(
        [
            (torch.nn.Conv2d, Gamma(setting["conv_gamma"])),
            (torch.nn.Linear, Gamma(setting["lin_gamma"])),
        ]
    )


def zennit_hooks(model):
    """(name, hook) of every zennit BasicHook registered on the model's modules."""
    from zennit.core import BasicHook

    found = []
    for name, module in model.named_modules():
        for fn in module._forward_hooks.values():
            owner = getattr(fn, "__self__", None)
            if isinstance(owner, BasicHook):
                found.append((name, owner))
                break
    return found


def relevance(model, images, targets, composite=None):
    """Pixel relevance (batch, 224, 224), the logits and the names of the modules whose hook ran."""
    x = images.clone().requires_grad_(True)
    ran = []
    if composite is not None:
        composite.register(model)
    try:
        hooks = zennit_hooks(model)
        y = model(x)
        ran = [name for name, hook in hooks if "output" in hook.stored_tensors]
        y[torch.arange(len(targets)), targets].sum().backward()
    finally:
        if composite is not None:
            composite.remove()
    return (x * x.grad).sum(1).detach(), y.detach(), ran


def token_sum(pixel_map):
    *lead, h, w = pixel_map.shape
    return pixel_map.reshape(*lead, h // PATCH, PATCH, w // PATCH, PATCH).sum((-3, -1))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from torchvision.models import vision_transformer

    model = vision_transformer.vit_b_16(weights=None)
    fill_seeded_(model, seed=0)
    model = model.float().eval()
    for parameter in model.parameters():
        parameter.requires_grad = False
    images = seeded_images(args.images, 224, seed=0).float()
    n = len(images)

    # plain gradient x input before lxt touches torch.nn (the check that the patching is active)
    with torch.no_grad():
        plain_logits = model(images)
    predicted = plain_logits.argmax(1)
    targets = torch.stack([torch.full_like(predicted, FIXED_CLASS), predicted], 1)
    plain = torch.stack([relevance(model, images, targets[:, t])[0] for t in range(2)], 1)

    from lxt.efficient import monkey_patch, monkey_patch_zennit

    monkey_patch(vision_transformer, verbose=True)
    monkey_patch_zennit(verbose=True)
    for cls in (torch.nn.GELU, torch.nn.LayerNorm, torch.nn.MultiheadAttention):
        assert cls.forward.__module__ == "lxt.efficient.patches", f"{cls.__name__} is not patched"

    maps = torch.zeros(len(SETTINGS), n, 2, 224, 224)
    logits = None
    gamma_modules = []
    for s, setting in enumerate(SETTINGS):
        for t in range(2):
            pixel, y, ran = relevance(model, images, targets[:, t], composite_for(setting))
            maps[s, :, t] = pixel
            if logits is None:
                logits = y
            torch.testing.assert_close(y, logits)  # the hooks leave the forward pass as it is
            if setting["conv_gamma"] is not None:
                assert ran, "no zennit hook ran"
                gamma_modules = ran
            print(f"{setting['name']} target {t}: |R| max {pixel.abs().max():.4g}, sum {pixel.sum((1, 2)).tolist()}")
    torch.testing.assert_close(logits, plain_logits, rtol=1e-3, atol=1e-3)  # lxt's LayerNorm is the same map
    assert (logits.argmax(1) == predicted).all()

    # the patching must change the maps: CP-LRP differs from plain gradient x input, Gamma from CP-LRP
    def rel_diff(a, b):
        return float((a - b).abs().max() / b.abs().max())

    assert rel_diff(maps[0], plain) > 1e-2, "lxt's patches did not change gradient x input"
    assert rel_diff(maps[1], maps[0]) > 1e-2, "the Gamma composite did not change the maps"

    # batching: the first image alone gives the same maps (Gamma setting, both targets)
    alone = torch.stack(
        [relevance(model, images[:1], targets[:1, t], composite_for(SETTINGS[1]))[0][0] for t in range(2)]
    )
    batch_check = float((alone - maps[1, 0]).abs().max() / maps[1, 0].abs().max())
    assert batch_check < 1e-4, batch_check

    result = {
        "settings": SETTINGS,
        "targets": targets,
        "token_map": token_sum(maps),
        "pixel_map_first": maps[:, 0].clone(),
        "logits": logits,
        "plain_logits": plain_logits,
        "gradient_x_input_token_map": token_sum(plain),
        "gamma_modules": gamma_modules,
        "batch_check": batch_check,
        "model": "torchvision.models.vit_b_16(weights=None), tests/seeded.py fill_seeded_(seed=0), eval, float32",
        "seed": 0,
        "image_seed": 0,
        "images": n,
        "versions": {name: version(name) for name in ("lxt", "zennit", "torch", "torchvision", "transformers")},
    }
    if maps.numel() * maps.element_size() <= FULL_PIXEL_MAP_BYTES:
        result["pixel_map"] = maps
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(result, args.out)
    print(f"wrote {args.out}: gamma hooks ran on {len(gamma_modules)} modules, batch check {batch_check:.2e}")


if __name__ == "__main__":
    main()
