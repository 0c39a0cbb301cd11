"""Reference maps of Chefer et al.'s *Transformer Attribution* (CVPR 2021) made by their OFFICIAL code.

Usage::

    python docs/scripts/chefer_reference.py --chefer /tmp/chefer --out tests/data/chefer_transformer_attribution.pt

``--chefer`` is a checkout of https://github.com/hila-chefer/Transformer-Explainability (it needs
``einops``). Their code is imported from that path, never copied here. Their ``LRP.generate_LRP``
hard-codes ``.cuda()`` and a float32 one-hot, so its steps are done here on the CPU: forward, backward
of ``(one_hot * logits).sum()`` (so the attention-gradient hooks fire), then
``model.relprop(one_hot, method="transformer_attribution", start_layer=S, alpha=1)``, with a float64
one-hot of value 1 at the target.

The weights are ``tests/seeded.py``'s ``fill_seeded_(timm_model, seed=0)`` on timm's
``vit_base_patch16_224``, loaded into Chefer's ``vit_base_patch16_224``; both in float64, and their
logits are checked to agree to 1e-10. Chefer's final ``norm`` is built with LayerNorm's default
``eps=1e-5`` where timm (and their blocks) use 1e-6; it is set to timm's 1e-6 here (LayerNorm is an
identity in their relevance propagation, so only the forward pass sees it).

Saved: ``maps`` (start_layers, images, targets, 14, 14) float64 — ``rollout[:, 0, 1:]`` of their
``relprop``; ``targets`` (images, 3) long — class 3, class 17, the predicted class; ``start_layers``;
``seed``; ``logits`` (images, 1000) float64 of Chefer's model; ``chefer_commit``; ``torch_version``;
``timm_version``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

from seeded import fill_seeded_, seeded_images  # noqa: E402

TARGETS = (3, 17)  # plus the predicted class
START_LAYERS = (0, 1)
SEED = 0
IMAGES = 4


def chefer_commit(checkout: Path) -> str:
    try:
        return subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], check=True,
                              capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        # an extracted archive (git archive | tar x) has no .git; `git archive` stores the commit
        # in the tar's global header, which `tar x` drops, so fall back to a file written beside it
        marker = checkout / "COMMIT"
        return marker.read_text().strip() if marker.exists() else "unknown"


def build_models(checkout: Path):
    import timm

    sys.path.insert(0, str(checkout))
    from baselines.ViT.ViT_LRP import vit_base_patch16_224 as chefer_vit  # their code, from the path

    reference = timm.create_model("vit_base_patch16_224", pretrained=False)
    fill_seeded_(reference, seed=SEED)
    chefer = chefer_vit(pretrained=False)

    state = reference.state_dict()
    # the names coincide; map explicitly any that would not (none for timm 1.x)
    rename: dict[str, str] = {}
    state = {rename.get(name, name): value for name, value in state.items()}
    result = chefer.load_state_dict(state, strict=False)
    assert not result.missing_keys, f"missing in the timm state dict: {result.missing_keys}"
    assert not result.unexpected_keys, f"unexpected for Chefer's model: {result.unexpected_keys}"
    for name, value in chefer.state_dict().items():
        assert torch.equal(value, state[name]), name

    # their final norm is LayerNorm(embed_dim) with eps=1e-5; timm's is 1e-6 (as are their blocks')
    assert chefer.norm.eps == 1e-5 and reference.norm.eps == 1e-6
    chefer.norm.eps = reference.norm.eps
    for block, ref_block in zip(chefer.blocks, reference.blocks):
        assert block.norm1.eps == ref_block.norm1.eps and block.norm2.eps == ref_block.norm2.eps
    return chefer, reference


def transformer_attribution(model, image: torch.Tensor, target: int, start_layer: int) -> torch.Tensor:
    """Their ``LRP.generate_LRP(image, index=target, method="transformer_attribution")`` on the CPU."""
    dtype = next(model.parameters()).dtype
    output = model(image)
    one_hot = torch.zeros(1, output.shape[-1], dtype=dtype)
    one_hot[0, target] = 1
    model.zero_grad()
    (one_hot * output).sum().backward(retain_graph=True)
    rollout = model.relprop(one_hot, method="transformer_attribution", start_layer=start_layer, alpha=1)
    assert rollout.shape == (1, 196)
    return rollout.detach().reshape(14, 14)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chefer", type=Path, required=True, help="checkout of Transformer-Explainability")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import timm

    chefer, reference = build_models(args.chefer.resolve())
    chefer = chefer.double().eval()
    reference = reference.double().eval()
    images = seeded_images(IMAGES, 224, seed=SEED)

    with torch.no_grad():
        ref_logits = reference(images)
    logits = torch.cat([chefer(image[None]) for image in images]).detach()
    difference = (logits - ref_logits).abs().max().item()
    print(f"max |logits chefer - timm| = {difference:.3e}")
    assert difference < 1e-10, difference

    predicted = logits.argmax(-1)
    targets = torch.tensor([[*TARGETS, int(p)] for p in predicted], dtype=torch.long)
    maps = torch.zeros(len(START_LAYERS), IMAGES, targets.shape[1], 14, 14, dtype=torch.float64)
    started = time.time()
    for i, image in enumerate(images):
        for t, target in enumerate(targets[i].tolist()):
            for s, start_layer in enumerate(START_LAYERS):
                maps[s, i, t] = transformer_attribution(chefer, image[None], target, start_layer)
        print(f"image {i} done, {time.time() - started:.0f}s", flush=True)

    # cross-checks, reported only
    print(f"targets = {targets.tolist()}")
    for s, start_layer in enumerate(START_LAYERS):
        m = maps[s]
        print(f"start_layer {start_layer}: max|map| {m.abs().max():.6e}  min {m.min():.6e}  "
              f"mean {m.mean():.6e}  per-map max {[f'{v:.4e}' for v in m.flatten(2).amax(-1).flatten().tolist()]}")
    print(f"all maps >= 0: {bool((maps >= 0).all())}; any NaN: {bool(maps.isnan().any())}")
    print(f"start 0 vs 1 max|diff| / max|map|: {(maps[0] - maps[1]).abs().max() / maps[0].abs().max():.3e}")

    chefer32 = chefer.float()
    for target in (targets[0, 2].item(), TARGETS[0]):
        map32 = transformer_attribution(chefer32, images[0:1].float(), target, 0).double()
        map64 = maps[0, 0, targets[0].tolist().index(target)]
        print(f"float32 vs float64, image 0, target {target}, start 0: max|diff| / max|map64| = "
              f"{(map32 - map64).abs().max() / map64.abs().max():.3e}")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({
        "maps": maps,
        "targets": targets,
        "start_layers": list(START_LAYERS),
        "seed": SEED,
        "logits": logits,
        "chefer_commit": chefer_commit(args.chefer),
        "torch_version": torch.__version__,
        "timm_version": timm.__version__,
    }, args.out)
    print(f"saved {args.out} ({args.out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
