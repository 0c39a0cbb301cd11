"""Time the knock-out oracle (every head switched off alone) against the model's own forward pass on
the same masked copies, in one process: the ratio is what compares across machines and versions.

    PYTHONPATH=src python docs/scripts/knockout_timing.py LABEL

The reference model, 64 test scenes, each with L*H + 1 = 17 rows (all heads, then each one off);
best of five. Run it alternately on two checkouts (PYTHONPATH of each) to compare them.
"""

import sys
import time

import torch

import gmar

torch.set_num_threads(2)
try:
    from gmar.eval import metrics as M
    from gmar.eval.datasets import scene_items
except ImportError:  # a checkout from before gmar.eval
    from gmar import metrics as M
    from gmar.evaluate import scene_items

model = gmar.load_reference_model()
items = scene_items(64, image_size=64, removals=False)[:64]
images = torch.stack([item.image for item in items])
classes = torch.tensor([item.target for item in items])
adapter = gmar.get_adapter(model)
scorer = M.Scorer(model, multi_label=True, batch_size=64)
rows = images.repeat_interleave(17, dim=0)  # the same number of images the knock-outs score
row_classes = classes.repeat_interleave(17)


def best(work, rounds: int = 5) -> float:
    work()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return min(times)


knockout = best(lambda: M.knockout_drops(scorer, adapter, images, classes))
forward = best(lambda: scorer(rows, row_classes))
print(f"{sys.argv[1]}: knock-outs {knockout * 1000:.0f} ms, forward of the same 1088 images {forward * 1000:.0f} ms, "
      f"ratio {knockout / forward:.2f}")
