"""Running evaluate under ``torchrun``: each process's rank and the world size, and a barrier.

Process ``r`` of ``N`` takes the items whose index modulo ``N`` is ``r``
(:func:`gmar.eval.harness.evaluate`); all write to the same store, and rank 0 writes the report.
"""

from __future__ import annotations

import os


def distributed() -> tuple[int, int]:
    """``(rank, world size)``; initialises a gloo process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return dist.get_rank(), world


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
