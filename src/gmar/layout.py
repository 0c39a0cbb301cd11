"""Where the patches are in a ViT's token sequence, and which tokens its head reads."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TokenLayout:
    """The token sequence of one forward pass, as the model builds it.

    Tokens are ``[prefix tokens..., patch tokens (row-major over grid_size)]``.

    Nothing here assumes an image: the grid may have any rank, ``(h, w)`` for an image's patches,
    ``(n,)`` for a sequence of ``n`` tokens (a language model's), and the methods' maps have the
    grid's shape ``(B, *grid_size)``. What needs pixels says so: :func:`gmar.explanation.upsample`
    and occlusion (:func:`gmar.methods.functional.occlusion_windows`) take a 2-D grid only.

    Attributes:
        num_prefix_tokens: tokens before the patches (CLS, distillation, register tokens).
        grid_size: the grid of patch tokens for the actual input, ``(h, w)`` for an image.
        patch_size: input elements per patch along each axis of the grid, ``(ph, pw)`` pixels for an
            image (``(1,)`` for a token sequence).
        readout_prefix: indices of the prefix tokens the classifier reads (averaged).
        readout_patches: whether the classifier averages the patch tokens.
        attention_pooled: the model pools its tokens with an attention head (SigLIP's MAP pooler);
            then no fixed rows are read and :meth:`readout_weights` is undefined.

    When the head reads both (DINOv2: ``concat(CLS, mean(patches))``), the two groups get equal
    weight in :meth:`readout_weights`.
    """

    num_prefix_tokens: int
    grid_size: tuple[int, ...]
    patch_size: tuple[int, ...]
    readout_prefix: tuple[int, ...] = (0,)
    readout_patches: bool = False
    attention_pooled: bool = False

    def __post_init__(self) -> None:
        if len(self.grid_size) == 0 or len(self.grid_size) != len(self.patch_size):
            raise ValueError(
                f"grid_size {tuple(self.grid_size)} and patch_size {tuple(self.patch_size)} must have one entry "
                "per axis of the patch grid (two for an image, one for a token sequence)"
            )
        if self.attention_pooled and (self.readout_prefix or self.readout_patches):
            raise ValueError("an attention-pooled layout has no fixed readout tokens")
        if not self.attention_pooled and not self.readout_prefix and not self.readout_patches:
            raise ValueError("a token layout needs at least one readout token")
        for i in self.readout_prefix:
            if not 0 <= i < self.num_prefix_tokens:
                raise ValueError(f"readout token {i} is not a prefix token (have {self.num_prefix_tokens})")

    @property
    def num_patches(self) -> int:
        """The patch tokens: the product of :attr:`grid_size`."""
        return math.prod(self.grid_size)

    @property
    def is_2d(self) -> bool:
        """Whether the patches form a 2-D grid (an image's), which pixel-space steps need."""
        return len(self.grid_size) == 2

    @property
    def num_tokens(self) -> int:
        return self.num_prefix_tokens + self.num_patches

    @property
    def patch_slice(self) -> slice:
        return slice(self.num_prefix_tokens, self.num_tokens)

    def readout_weights(
        self, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """Weights ``(N,)`` over tokens, summing to 1, of the rows the classifier reads."""
        if self.attention_pooled:
            raise ValueError("an attention-pooled model reads no fixed token rows")
        weights = torch.zeros(self.num_tokens, dtype=dtype, device=device)
        groups = int(bool(self.readout_prefix)) + int(self.readout_patches)
        if self.readout_prefix:
            weights[list(self.readout_prefix)] = 1.0 / (groups * len(self.readout_prefix))
        if self.readout_patches:
            weights[self.patch_slice] = 1.0 / (groups * self.num_patches)
        return weights

    def patch_map(self, token_scores: torch.Tensor) -> torch.Tensor:
        """Reshape per-token scores ``(..., N)`` to the patch grid ``(..., *grid_size)`` (``(B, h, w)`` for an
        image), dropping prefix tokens."""
        if token_scores.shape[-1] != self.num_tokens:
            raise ValueError(f"expected {self.num_tokens} tokens, got {token_scores.shape[-1]}")
        return token_scores[..., self.patch_slice].reshape(*token_scores.shape[:-1], *self.grid_size)
