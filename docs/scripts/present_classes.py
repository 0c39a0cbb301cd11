"""How far a reference model keeps the classes present in one scene apart, as a gradient sees them.

    python docs/scripts/present_classes.py [CHECKPOINT]      # default: the shipped reference ViT

On the multi-object scenes among the first 500 test scenes: how far apart the present classes'
logits are, how alike the gradients of two present classes are at each block's output, and how
often GAE peaks on the same patch for both; then, for test scene 0, where GAE puts each class's
mass and how much removing each other object moves that class's logit. docs/evaluation.md quotes
its output for the model before and after the loss was changed.
"""

import itertools
import sys

import torch

import gmar
from gmar.eval.scenes import CLASSES, Scenes

model = gmar.load_reference_model(sys.argv[1] if len(sys.argv) > 1 else None)
scenes = Scenes("test", 500)
multi = [scene for scene in scenes if len(scene.classes) > 1]
images = torch.stack([scene.image for scene in multi])
first = torch.tensor([scene.classes[0] for scene in multi])
second = torch.tensor([scene.classes[1] for scene in multi])
with torch.no_grad():
    logits = model(images)
gaps = [
    float((logits[i, a] - logits[i, b]).abs())
    for i, scene in enumerate(multi)
    for a, b in itertools.combinations(scene.classes, 2)
]
rows = torch.arange(len(multi))
pair = torch.stack([logits[rows, first], logits[rows, second]])
print(
    f"{len(multi)} scenes with several objects: present classes' logits differ by {sum(gaps) / len(gaps):.3f} "
    f"on average (|a - b| over {len(gaps)} pairs); correlation of two present classes' logits over the scenes "
    f"{float(torch.corrcoef(pair)[0, 1]):+.2f}"
)

outputs = []
hooks = [block.register_forward_hook(lambda module, args, out: outputs.append(out)) for block in model.blocks]
try:
    outputs.clear()
    scores = model(images)
    grads = [torch.autograd.grad(scores[rows, cls].sum(), outputs, retain_graph=True) for cls in (first, second)]
finally:
    for hook in hooks:
        hook.remove()
cosines = [
    float(torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1), dim=1).mean())
    for a, b in zip(*grads, strict=True)
]
print("cosine of the two classes' gradients at each block's output:", ", ".join(f"{c:+.2f}" for c in cosines))
peak_a = gmar.explain(model, images, "gae", target=first).token_map.flatten(1).argmax(1)
peak_b = gmar.explain(model, images, "gae", target=second).token_map.flatten(1).argmax(1)
print(f"GAE peaks on the same patch for both classes in {float((peak_a == peak_b).float().mean()):.0%} of the scenes")

scene = scenes[0]
with torch.no_grad():
    own = model(scene.image[None])[0]
for cls in scene.classes:
    heat = gmar.explain(model, scene.image[None], "gae", target=cls).heatmap[0].clamp_min(0)
    mass = ", ".join(f"{CLASSES[c]} {float((heat * scene.masks[c]).sum() / heat.sum()):.2f}" for c in scene.classes)
    moves = []
    for other in (c for c in scene.classes if c != cls):
        with torch.no_grad():
            after = model(scenes.without(0, other).image[None])[0, cls]
        moves.append(f"{float(after - own[cls]):+.2f} without the {CLASSES[other]}")
    name = CLASSES[cls]
    print(f"scene 0, GAE for {name} (logit {float(own[cls]):.2f}): mass on {mass}; its logit {', '.join(moves)}")
