"""Where each method puts its mass on one test scene, and what the model uses there.

    python docs/scripts/scene_masses.py [--scene 1] [--class ring]

For the shipped reference ViT and one test scene: the drop of the explained class's logit when each
object is rendered away (``Scenes.without``), and for every method the share of the map's positive
mass on each object's mask (heatmap at pixel resolution, clipped at 0; the rest lies on background).
Signed methods (AttnLRP's relevance) also report the share of the negative mass.
"""

from __future__ import annotations

import argparse

import torch

import gmar
from gmar.eval.scenes import CLASSES, Scenes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scene", type=int, default=1)
    parser.add_argument("--class", dest="cls", default="ring", choices=CLASSES)
    args = parser.parse_args()
    model = gmar.load_reference_model()
    scenes = Scenes("test", image_size=64)
    scene = scenes[args.scene]
    cls = CLASSES.index(args.cls)
    present = [c for c in range(len(CLASSES)) if scene.labels[c] > 0]
    if cls not in present:
        raise SystemExit(f"scene {args.scene} holds {[CLASSES[c] for c in present]}, not {args.cls}")
    image = scene.image[None]
    with torch.no_grad():
        logit = model(image)[0, cls].item()
        print(f"scene {args.scene}, explained class {args.cls}: logit {logit:.2f}")
        for other in present:
            without = scenes.without(args.scene, other).image[None]
            drop = logit - model(without)[0, cls].item()
            print(f"  without the {CLASSES[other]}: {args.cls} logit drops by {drop:.2f}")
    methods = [*gmar.supported_methods(model), "occlusion"]
    results = gmar.explain(model, image, methods, target=cls)
    names = [CLASSES[c] for c in present]
    print("\nshare of the heatmap's mass (min-max normalised, as drawn) on each object:\n")
    print(f"| method | {' | '.join(names)} | background |")
    print("|---|" + "---|" * (len(names) + 1))
    areas = [scene.masks[c].float().mean() for c in present]  # what a flat map would put there
    print(f"| (each object's area) | {' | '.join(f'{a:.2f}' for a in areas)} | {1 - sum(areas):.2f} |")
    for method, explanation in results.items():
        heatmap = explanation.heatmap[0]
        shares = [(heatmap * scene.masks[c]).sum() / heatmap.sum() for c in present]
        print(f"| {method} | {' | '.join(f'{s:.2f}' for s in shares)} | {1 - sum(shares):.2f} |")
    print("\nshare of the signed map's positive mass on each object, and where its negative mass lies:\n")
    print(f"| method | {' | '.join(names)} | background | negative mass on {args.cls} |")
    print("|---|" + "---|" * (len(names) + 2))
    for method, explanation in results.items():
        # the signed token map, each patch's value spread over its pixels
        signed = _signed_pixels(explanation, image.shape[-2:])
        positive, negative = signed.clamp(min=0), (-signed).clamp(min=0)
        total = positive.sum()
        shares = [(positive * scene.masks[c]).sum() / total for c in present]
        background = 1 - sum(shares)
        neg = negative.sum()
        on_target = (negative * scene.masks[cls]).sum() / neg if neg > 0 else torch.tensor(0.0)
        cells = " | ".join(f"{s:.2f}" for s in shares)
        print(f"| {method} | {cells} | {background:.2f} | {on_target:.2f} of {neg / (neg + total):.2f} |")


def _signed_pixels(explanation: gmar.Explanation, size) -> torch.Tensor:
    import torch.nn.functional as F

    token_map = explanation.token_map[0]
    per_pixel = F.interpolate(token_map[None, None].float(), size=tuple(size), mode="nearest")[0, 0]
    return per_pixel / (per_pixel.numel() / token_map.numel())


if __name__ == "__main__":
    main()
