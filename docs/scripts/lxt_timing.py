"""AttnLRP's cost in gmar and in lxt 2.1 on torchvision's vit_b_16, each as a ratio to the model's own
forward + backward (FB) measured in the same process.

    bash docs/scripts/lxt_env.sh /tmp/lxt-env
    python docs/scripts/lxt_timing.py --lxt-env /tmp/lxt-env [--batch-size 8] [--repeats 5]

lxt patches torch.nn for the whole process, so its side runs in a subprocess of the side environment
(``--side``): there F and FB are timed before the patch and lxt's relevance after it. gmar's side runs
here, F, FB and ``gmar.AttnLRP`` interleaved. Both sides use the same weights (tests/seeded.py), batch,
thread count and machine; the two processes run one after the other. FB: the summed logits of the
predicted classes, differentiated to the input, parameters frozen (as ``gmar bench``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
from seeded import fill_seeded_, seeded_images  # noqa: E402


def model_and_images(batch: int):
    import torchvision

    model = fill_seeded_(torchvision.models.vit_b_16(weights=None).eval())
    for p in model.parameters():
        p.requires_grad_(False)
    return model, seeded_images(batch, 224).float()


def forward(model, images):
    with torch.no_grad():
        model(images)


def forward_backward(model, images):
    x = images.clone().requires_grad_(True)
    y = model(x)
    torch.autograd.grad(y.gather(1, y.argmax(1, keepdim=True)).sum(), x)
    return x


def timed(run, repeats: int) -> float:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def side(batch: int, repeats: int) -> dict:
    """In the lxt environment: F and FB unpatched, then lxt's AttnLRP (its ViT recipe, CP rules)."""
    import torchvision.models.vision_transformer as vision_transformer
    from lxt.efficient import monkey_patch

    model, images = model_and_images(batch)
    base = {"F": timed(lambda: forward(model, images), repeats), "FB": timed(lambda: forward_backward(model, images), repeats)}
    monkey_patch(vision_transformer)

    def relevance():
        x = forward_backward(model, images)
        return x

    base["lxt attnlrp"] = timed(relevance, repeats)
    return base


def here(batch: int, repeats: int) -> dict:
    import gmar

    model, images = model_and_images(batch)
    explainer = gmar.AttnLRP(model)
    runs = {
        "F": lambda: forward(model, images),
        "FB": lambda: forward_backward(model, images),
        "gmar attnlrp": lambda: explainer(images),
    }
    for run in runs.values():
        run()
    times = {name: [] for name in runs}
    for _ in range(repeats):  # interleaved rounds
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lxt-env", help="the folder docs/scripts/lxt_env.sh built")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--side", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        print(json.dumps(side(args.batch_size, args.repeats)))
        return
    if not args.lxt_env:
        parser.error("--lxt-env is required")
    env = {**os.environ, "PYTHONPATH": args.lxt_env}
    command = [sys.executable, __file__, "--side", "--batch-size", str(args.batch_size), "--repeats", str(args.repeats)]
    lxt = json.loads(subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout)
    ours = here(args.batch_size, args.repeats)
    print(f"torchvision vit_b_16, batch {args.batch_size}, 224 px, {torch.get_num_threads()} threads, median of {args.repeats}")
    print("| process | F s | FB s | AttnLRP s | AttnLRP ÷ FB |")
    print("|---|---|---|---|---|")
    for name, row, key in (("gmar", ours, "gmar attnlrp"), ("lxt 2.1", lxt, "lxt attnlrp")):
        print(f"| {name} | {row['F']:.3f} | {row['FB']:.3f} | {row[key]:.3f} | {row[key] / row['FB']:.2f} |")


if __name__ == "__main__":
    main()
