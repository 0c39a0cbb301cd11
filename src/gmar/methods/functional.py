"""The methods' math: pure functions of captured tensors and a token layout.

Shapes: ``B`` batch, ``H`` heads, ``N`` tokens, ``d`` head width. An attention tensor is
``(B, H, N, N)`` with rows as queries; a fused (head-mixed) matrix is ``(B, N, N)``. A map has the
layout's grid shape, ``(B, *grid_size)``: ``(B, h, w)`` for an image's patches, ``(B, n)`` for a token
sequence; only occlusion's windows and pixels (:func:`occlusion_windows`, :func:`occlude`) need 2-D.
Nothing here knows which library a model came from.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from gmar.layout import TokenLayout

HeadFusion = Literal["mean", "max", "min"]
Norm = Literal["l1", "l2"]


def fuse_heads(attention: torch.Tensor, head_fusion: HeadFusion = "mean") -> torch.Tensor:
    """Fuse ``(B, H, N, N)`` over heads to ``(B, N, N)`` by mean, max or min."""
    if head_fusion == "mean":
        return attention.mean(dim=1)
    if head_fusion == "max":
        return attention.amax(dim=1)
    if head_fusion == "min":
        return attention.amin(dim=1)
    raise ValueError(f"head_fusion must be 'mean', 'max' or 'min', not {head_fusion!r}")


def discard_lowest(matrix: torch.Tensor, ratio: float, num_prefix_tokens: int) -> torch.Tensor:
    """Zero the ``ratio`` fraction of the smallest patch-column entries of every row of ``(B, N, N)``.

    Prefix columns (CLS, distillation, registers) are never discarded.
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"discard_ratio must be in [0, 1), not {ratio}")
    patches = matrix[..., num_prefix_tokens:]
    k = int(patches.shape[-1] * ratio)
    if k == 0:
        return matrix
    lowest = patches.topk(k, dim=-1, largest=False).indices
    kept = patches.scatter(-1, lowest, 0.0)
    return torch.cat([matrix[..., :num_prefix_tokens], kept], dim=-1)


def add_residual(matrix: torch.Tensor, residual: float = 1.0) -> torch.Tensor:
    """``rownorm(matrix + residual * I)`` for ``(B, N, N)``; an all-zero row stays zero."""
    eye = torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)
    matrix = matrix + residual * eye
    return matrix / matrix.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(matrix.dtype).tiny)


def rollout(layers: Sequence[torch.Tensor], residual: float = 1.0) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema 2020): ``R = Â_L ··· Â_1`` with ``Â = rownorm(Ā + residual·I)``.

    Args:
        layers: fused matrices ``Ā_l`` of shape ``(B, N, N)``, first layer first.
    Returns:
        ``R`` of shape ``(B, N, N)``.
    """
    if not layers:
        raise ValueError("rollout needs at least one layer")
    result = add_residual(layers[0], residual)
    for matrix in layers[1:]:
        result = add_residual(matrix, residual) @ result
    return result


def rollout_readout(layers: Sequence[torch.Tensor], weights: torch.Tensor, residual: float = 1.0) -> torch.Tensor:
    """``wᵀ R`` for the rollout ``R = Â_L ··· Â_1`` of :func:`rollout`, without forming ``R``.

    The row vector is multiplied into the layers from the left, last layer first: ``N²`` work per
    layer instead of the ``N³`` of a matrix product (at 785 tokens, a batch of 8 and 12 layers,
    0.15 instead of 93 GFLOP).

    Args:
        layers: fused matrices ``Ā_l`` ``(B, N, N)``, first layer first.
        weights: ``w`` ``(N,)``, the readout rows' weights (see :func:`readout_map`).
    Returns:
        ``(B, N)``.
    """
    if not layers:
        raise ValueError("rollout needs at least one layer")
    row = weights.to(layers[0]).expand(layers[0].shape[0], 1, -1)
    for matrix in reversed(layers):
        row = row @ add_residual(matrix, residual)
    return row.squeeze(1)


def check_discard_ratio(discard_ratio: float) -> None:
    """Refuse a ``discard_ratio`` outside ``[0, 1)`` (when a method is built, before any pass)."""
    if not 0.0 <= discard_ratio < 1.0:
        raise ValueError(f"discard_ratio must be in [0, 1), not {discard_ratio}")


def rollout_map(
    fused: Sequence[torch.Tensor], discard_ratio: float, residual: float, layout: TokenLayout
) -> torch.Tensor:
    """The readout rows of the rollout of ``fused`` on the patch grid: ``(B, *grid_size)``.

    Args:
        fused: each layer's head-mixed matrix ``Ā_l`` ``(B, N, N)``, first layer first; with
            ``discard_ratio`` the lowest patch entries of each row are zeroed first (:func:`discard_lowest`).
    """
    if discard_ratio:
        fused = [discard_lowest(m, discard_ratio, layout.num_prefix_tokens) for m in fused]
    weights = layout.readout_weights(dtype=fused[0].dtype, device=fused[0].device)
    return layout.patch_map(rollout_readout(fused, weights, residual))


def gradient_weighted(attention: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """``mean_h ReLU(A ⊙ ∂y/∂A)``: ``(B, H, N, N)`` twice to ``(B, N, N)``."""
    return (attention * gradient).clamp_min_(0).mean(dim=1)


def head_scores(gradient: torch.Tensor, norm: Norm = "l1") -> torch.Tensor:
    """GMAR head importance ``S_h = ||G_h||_p`` over all but the batch and head dims: ``(B, H, ...)`` to ``(B, H)``."""
    flat = gradient.flatten(start_dim=2)
    if norm == "l1":
        return flat.abs().sum(dim=-1)
    if norm == "l2":
        return flat.pow(2).sum(dim=-1).sqrt()
    raise ValueError(f"norm must be 'l1' or 'l2', not {norm!r}")


def normalise_head_scores(scores: torch.Tensor) -> torch.Tensor:
    """``w_h = S_h / Σ_h S_h`` per sample ``(B, H)``; uniform where the sum is zero."""
    total = scores.sum(dim=-1, keepdim=True)
    uniform = torch.full_like(scores, 1.0 / scores.shape[-1])
    return torch.where(total > 0, scores / total.clamp_min(torch.finfo(scores.dtype).tiny), uniform)


def taylor_head_scores(attention: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """First-order knock-out estimate per head (Michel, Levy & Neubig 2019): ``T_h = Σ O_h ⊙ ∂y/∂O_h``.

    Zeroing head ``h``'s output ``O_h = A_h V_h`` changes ``y`` by ``-T_h`` to first order. Since
    ``∂y/∂A_h = ∂y/∂O_h · V_hᵀ``, ``Σ O_h ⊙ ∂y/∂O_h = Σ A_h ⊙ ∂y/∂A_h``, which is what this computes:
    ``(B, H, N, N)`` twice to ``(B, H)``, signed (positive: the head supports ``y``).
    """
    return (attention * gradient).sum(dim=(-2, -1))


def positive_head_weights(scores: torch.Tensor) -> torch.Tensor:
    """Mixing weights from signed head scores ``(B, H)``: ``ReLU(S_h) / Σ_h ReLU(S_h)``; uniform where no
    head scores above zero."""
    return normalise_head_scores(scores.clamp_min(0))


def head_weighted_layer(
    attention: torch.Tensor, gradient: torch.Tensor, weighted: bool = True, signed: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer of the head-weighted GAE: the heads' scores and the layer's relevance matrix.

    With ``P_h = A_h ⊙ ∂y/∂A_h``: ``S_h = ‖ReLU(P_h)‖₁``, ``w_h = S_h / Σ_h S_h`` (``weighted``; else
    ``w_h = 1/H``), and ``Ā = ReLU(Σ_h w_h P_h)`` (``signed``: the heads' signed products mixed,
    then rectified) or ``Σ_h w_h ReLU(P_h)`` (rectified first, as GAE does).

    Args:
        attention, gradient: ``(B, H, N, N)``.
    Returns:
        ``S`` ``(B, H)`` and ``Ā`` ``(B, N, N)``.
    """
    product = attention * gradient
    if signed:
        scores = product.clamp_min(0).sum(dim=(-2, -1))  # the rectified copy is freed at once
        mixed = product
    else:
        mixed = product.clamp_min_(0)
        scores = mixed.sum(dim=(-2, -1))
    weights = normalise_head_scores(scores) if weighted else torch.full_like(scores, 1.0 / scores.shape[-1])
    mixed = mix_heads(mixed, weights)
    return scores, mixed.clamp_min_(0) if signed else mixed


def mix_heads(attention: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``Σ_h w_h A_h``: ``(B, H, N, N)`` and weights ``(B, H)`` to ``(B, N, N)``."""
    return torch.einsum("bh,bhij->bij", weights, attention)


def gae(layers: Sequence[torch.Tensor]) -> torch.Tensor:
    """Chefer et al. 2021: ``R = I``; for each layer ``R ← R + Ā_l R``; no normalisation.

    Args:
        layers: ``Ā_l = mean_h ReLU(∂y/∂A_l ⊙ A_l)`` of shape ``(B, N, N)``, first layer first.
    """
    if not layers:
        raise ValueError("gae needs at least one layer")
    first = layers[0]
    relevance = torch.eye(first.shape[-1], dtype=first.dtype, device=first.device).expand_as(first)
    for matrix in layers:
        relevance = relevance + matrix @ relevance
    return relevance


def gae_readout(layers: Sequence[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """``wᵀ R`` for :func:`gae`'s ``R = (I + Ā_L) ··· (I + Ā_1)``, the row vector multiplied in
    from the left (``N²`` per layer, as :func:`rollout_readout`): ``(N,)`` weights to ``(B, N)``."""
    if not layers:
        raise ValueError("gae needs at least one layer")
    row = weights.to(layers[0]).expand(layers[0].shape[0], 1, -1)
    for matrix in reversed(layers):
        row = row + row @ matrix
    return row.squeeze(1)


def readout_map(matrix: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """Mean of the readout rows of ``(B, N, N)`` (weighted as the head reads them), patch columns, as ``(B, h, w)``."""
    weights = layout.readout_weights(dtype=matrix.dtype, device=matrix.device)
    return layout.patch_map(torch.einsum("n,bnm->bm", weights, matrix))


def head_readout(attention: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Each head's attention from the readout: ``Σ_n w_n A_h[n, :]``, heads kept apart.

    Args:
        attention: ``(B, H, N, N)``, rows as queries.
        weights: ``(N,)``, the readout rows' weights (see :meth:`TokenLayout.readout_weights`).
    Returns:
        ``(B, H, N)``: over every token, how much the readout attends to it in each head.
    """
    return torch.einsum("n,bhnm->bhm", weights.to(attention), attention)


def legrad_layer(gradient: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """LeGrad's map of one layer: ``mean over heads and query rows of ReLU(∂s_l/∂A_l)``, patch columns.

    Args:
        gradient: ``(B, H, Q, K)``: the gradient of the layer's own score w.r.t. its attention
            (``Q = K = N``), or w.r.t. an attention pooler's attention (``Q`` latent queries,
            ``K`` the pooled tokens, which end with the patches).
    Returns:
        ``(B, h, w)``.
    """
    columns = gradient.clamp_min(0).mean(dim=(1, 2))
    patches = columns[:, columns.shape[-1] - layout.num_patches :]
    return patches.reshape(-1, *layout.grid_size)


def token_gradcam(activations: torch.Tensor, gradients: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """Grad-CAM over ViT tokens: ``ReLU(Σ_c w_c X_{:, c})`` with ``w_c`` the mean gradient over patches.

    Args:
        activations: tokens ``X`` ``(B, N, D)``; prefix tokens are dropped through ``layout``.
        gradients: ``∂y/∂X`` ``(B, N, D)``.
    Returns:
        ``(B, h, w)``.
    """
    patches, grads = activations[:, layout.patch_slice], gradients[:, layout.patch_slice]
    weights = grads.mean(dim=1, keepdim=True)
    return torch.relu((patches * weights).sum(dim=-1)).reshape(-1, *layout.grid_size)


def occlusion_windows(grid_size: tuple[int, ...], window: int) -> torch.Tensor:
    """Every ``window × window`` square of the patch grid, stride one patch: ``(K, h, w)`` bool,
    ``K = (h - window + 1)(w - window + 1)`` in row-major order of the top-left corner (the whole grid
    once where ``window`` exceeds it). Squares of pixels: a 2-D grid only."""
    if len(grid_size) != 2:
        raise ValueError(f"occlusion hides squares of an image's patches: it needs a 2-D grid, not {tuple(grid_size)}")
    height, width = grid_size
    side_h, side_w = min(window, height), min(window, width)
    masks = []
    for top in range(height - side_h + 1):
        for left in range(width - side_w + 1):
            mask = torch.zeros(height, width, dtype=torch.bool)
            mask[top : top + side_h, left : left + side_w] = True
            masks.append(mask)
    return torch.stack(masks)


def occlude(images: torch.Tensor, windows: torch.Tensor, baseline: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """``images`` ``(B, 3, H, W)`` with the pixels of each window's patches replaced by ``baseline``
    (``(B|1, 3, H, W)``): ``(K, B, 3, H, W)`` for windows ``(K, h, w)``. Pixels the patch grid does not
    cover are never occluded."""
    height, width = images.shape[-2:]
    ph, pw = layout.patch_size
    pixels = windows.repeat_interleave(ph, dim=1).repeat_interleave(pw, dim=2)[:, :height, :width]
    pixels = torch.nn.functional.pad(pixels, (0, width - pixels.shape[2], 0, height - pixels.shape[1]))
    covered = pixels.to(images.device)[:, None, None]  # (K, 1, 1, H, W)
    return torch.where(covered, baseline.expand_as(images)[None], images[None])


def occlusion_map(drops: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
    """Each patch's relevance: the mean score drop ``(B, K)`` of the windows ``(K, h, w)`` that cover it,
    ``(B, h, w)``."""
    cover = windows.flatten(1).to(drops)  # (K, h*w)
    total = drops @ cover
    return (total / cover.sum(dim=0).clamp_min(1)).view(drops.shape[0], *windows.shape[1:])
