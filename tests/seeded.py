"""Random weights that do not depend on a library's own initialisation: every parameter of a model
drawn from one seeded generator, in ``named_parameters`` order, so that a model of the same
architecture gets the same weights in any process, environment or library version (the reference
maps of peers' code are made on such weights in another environment and compared here)."""

from __future__ import annotations

import math

import torch
from torch import nn


@torch.no_grad()
def fill_seeded_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Overwrite every parameter of ``model`` in place; returns ``model``.

    Matrices and kernels (2-D or more, named ``*weight``) get ``N(0, 1/fan_in)``, so activations keep
    their scale through the depth (libraries' ViT inits of std 0.02 leave the attention near uniform);
    1-D weights (norms) ``1 + N(0, 0.1²)``; biases ``N(0, 0.05²)``; everything else (class tokens,
    position embeddings) ``N(0, 0.1²)``. Drawn in float64 on the CPU, then cast to the parameter's dtype.
    """
    generator = torch.Generator().manual_seed(seed)
    for name, parameter in model.named_parameters():
        noise = torch.randn(parameter.shape, generator=generator, dtype=torch.float64)
        leaf = name.rsplit(".", 1)[-1]
        if leaf.endswith("weight") and parameter.ndim >= 2:
            value = noise / math.sqrt(math.prod(parameter.shape[1:]))
        elif leaf.endswith("weight"):
            value = 1 + 0.1 * noise
        elif leaf.endswith("bias"):
            value = 0.05 * noise
        else:
            value = 0.1 * noise
        parameter.copy_(value.to(parameter.dtype))
    return model


def seeded_images(batch: int, size: int = 224, seed: int = 0) -> torch.Tensor:
    """``(batch, 3, size, size)`` images from ``N(0, 1)``, float64, the same in every environment."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=generator, dtype=torch.float64)
