"""The result of explaining a batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gmar.layout import TokenLayout


@dataclass
class Explanation:
    """One method's explanation of a batch of ``B`` images.

    Attributes:
        method: the method's name, as in :func:`gmar.available_methods`.
        heatmap: ``(B, H, W)`` the token map upsampled bilinearly to the input size, min-max
            normalised per image to [0, 1] (a constant map becomes all zeros).
        token_map: ``(B, h, w)`` raw relevance on the patch grid.
        target: ``(B,)`` long, the explained classes; None for a callable target.
        head_weights: ``(B, L, H)`` the per-layer head weights a head-weighting method (``gmar``,
            ``gmar_gae``) mixed the heads with (each row sums to 1); None otherwise.
        head_scores: ``(B, L, H)`` the same method's head scores before the per-layer normalisation,
            comparable across layers (they rank heads); None otherwise.
        prompts: the text prompt of each sample for a :class:`gmar.TextTarget`; None otherwise.
        logits: the model's output for the batch, detached (an embedding for CLIP models).
        scores: ``(B,)`` the explained score ``y`` of each sample, detached; None when a
            class-agnostic method explains an embedding model without a target.
        layout: the token layout of this forward pass.
        pixels: ``(B, H, W)`` the raw, signed map at the input's resolution, for a method whose
            relevance lives there (``attnlrp``: ``Σ_c x ⊙ g``; ``token_map`` is its sum per patch);
            None for the others.
    """

    method: str
    heatmap: torch.Tensor
    token_map: torch.Tensor
    target: torch.Tensor | None
    head_weights: torch.Tensor | None
    logits: torch.Tensor
    scores: torch.Tensor | None
    layout: TokenLayout
    prompts: list[str] | None = None
    head_scores: torch.Tensor | None = None
    pixels: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.token_map.shape[0]

    def __repr__(self) -> str:
        """One line: the method, batch size, shapes and explained classes, no tensor data."""
        fields = [
            f"method={self.method!r}",
            f"batch={len(self)}",
            f"heatmap={tuple(self.heatmap.shape)}",
            f"token_map={tuple(self.token_map.shape)}",
            f"target={_short(None if self.target is None else self.target.tolist())}",
        ]
        if self.head_weights is not None:
            fields.append(f"head_weights={tuple(self.head_weights.shape)}")
        if self.prompts is not None:
            fields.append(f"prompts={_short(self.prompts)}")
        return f"Explanation({', '.join(fields)})"


def _short(values: list | None, limit: int = 8) -> str:
    """A list's repr cut to its first ``limit`` items."""
    if values is None or len(values) <= limit:
        return repr(values)
    return "[" + ", ".join(repr(v) for v in values[:limit]) + ", ...]"


def upsample(token_map: torch.Tensor, layout: TokenLayout, image_size: tuple[int, int]) -> torch.Tensor:
    """Token map ``(B, h, w)`` to pixels ``(B, H, W)``, bilinearly, each patch over the pixels it covers.

    Pixels the patch grid does not cover (an input size that is not a multiple of the patch size)
    get zero; a grid that covers more than the image (timm's ``dynamic_img_pad``) is cropped.
    Pixels need a 2-D patch grid: a token sequence's layout is refused.
    """
    if not layout.is_2d:
        raise ValueError(f"upsampling to pixels needs a 2-D patch grid, not grid_size {layout.grid_size}")
    height, width = image_size
    covered = (layout.grid_size[0] * layout.patch_size[0], layout.grid_size[1] * layout.patch_size[1])
    pixels = F.interpolate(token_map[:, None].float(), size=covered, mode="bilinear", align_corners=False)[:, 0]
    pixels = pixels[:, :height, :width]
    pad_h, pad_w = height - pixels.shape[1], width - pixels.shape[2]
    if pad_h or pad_w:
        pixels = F.pad(pixels, (0, pad_w, 0, pad_h))
    return pixels


def min_max(maps: torch.Tensor) -> torch.Tensor:
    """Per-map min-max normalisation of ``(B, ...)`` to [0, 1]; a constant map becomes zeros."""
    flat = maps.flatten(start_dim=1)
    low = flat.min(dim=1, keepdim=True).values
    span = flat.max(dim=1, keepdim=True).values - low
    normalised = torch.where(span > 0, (flat - low) / span.clamp_min(torch.finfo(flat.dtype).tiny), 0.0)
    return normalised.view_as(maps)
