"""Time of each method against the model's own passes, in one process, interleaved; medians.

    python benchmarks/overhead.py --model vit_small_patch16_224 --batch-size 8 --repeats 5

Baselines: F, the model's forward under inference mode; FB, forward plus backward of the summed
top logits to the input image with the parameters frozen. Attention-only methods are reported
against F, gradient methods against FB. Random weights: speed does not depend on them.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import timm
import torch

import gmar

ATTENTION_ONLY = {"rollout", "raw_attention"}


def forward(model: torch.nn.Module, images: torch.Tensor) -> None:
    with torch.inference_mode():
        model(images)


def forward_backward(model: torch.nn.Module, images: torch.Tensor) -> None:
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        inputs = images.detach().requires_grad_()
        torch.autograd.grad(model(inputs).max(dim=-1).values.sum(), inputs)
    finally:
        for p, flag in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(flag)


def measure(cases: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    for run in cases.values():  # warm-up
        run()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, run in cases.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_small_patch16_224", help="a timm model name")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False).eval()
    size = gmar.preprocess_config(model).input_size
    images = torch.randn(args.batch_size, 3, *size)
    cases: dict[str, Callable[[], None]] = {
        "F": lambda: forward(model, images),
        "FB": lambda: forward_backward(model, images),
    }
    for method in gmar.available_methods():
        cases[method] = lambda method=method: gmar.explain(model, images, method=method)
    medians = measure(cases, args.repeats)
    print(
        f"{args.model}, batch {args.batch_size}, {size[0]}x{size[1]}, {torch.get_num_threads()} threads, "
        f"median of {args.repeats}"
    )
    print(f"{'case':<14} {'ms':>9}  ratio")
    ratios = {}
    for name, seconds in medians.items():
        base = "F" if name == "F" or name in ATTENTION_ONLY else "FB"
        ratios[name] = seconds / medians[base]
        print(f"{name:<14} {seconds * 1e3:9.1f}  {ratios[name]:.2f} x {base}")
    return ratios


if __name__ == "__main__":
    main()
