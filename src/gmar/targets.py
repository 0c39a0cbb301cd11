"""Turning the ``target`` argument into one score per sample."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Union

import torch

from gmar.errors import TargetError

Target = Union[None, int, Sequence[int], torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]


def resolve_target(
    output: torch.Tensor, target: Target, *, is_classifier: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The score ``y`` ``(B,)`` to explain, and the explained classes ``(B,)`` (None for a callable).

    ``target`` is None (each sample's predicted class), an int (the same class for every sample),
    ``B`` ints, or a callable ``f(model_output) -> (B,)`` scores.
    """
    batch = output.shape[0]
    if callable(target) and not isinstance(target, torch.Tensor):
        scores = target(output)
        if not isinstance(scores, torch.Tensor) or scores.shape != (batch,):
            shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
            raise TargetError(f"a callable target must return a tensor of shape ({batch},), got {shape}")
        return scores, None
    if not is_classifier:
        raise TargetError(
            "this model returns an image embedding, not class logits: pass a callable target "
            "f(embedding) -> (B,) scores, e.g. the cosine similarity with a text embedding"
        )
    if output.ndim != 2:
        raise TargetError(f"expected logits of shape (B, classes), got {tuple(output.shape)}")
    num_classes = output.shape[1]
    if target is None:
        classes = output.detach().argmax(dim=-1)
    elif isinstance(target, bool):
        raise TargetError("target must be a class index, not a bool")
    elif isinstance(target, (str, bytes)):
        raise TargetError(f"target must be None, an int, {batch} class indices or a callable, not a string")
    elif isinstance(target, int):
        classes = torch.full((batch,), target, dtype=torch.long, device=output.device)
    else:
        try:
            classes = torch.as_tensor(target, device=output.device)
        except (TypeError, ValueError) as error:
            raise TargetError(f"target must be None, an int, {batch} ints or a callable: {error}") from None
        if classes.is_floating_point() or classes.shape != (batch,):
            raise TargetError(f"target must hold {batch} integer class indices, got shape {tuple(classes.shape)}")
        classes = classes.long()
    if classes.numel() and (int(classes.min()) < 0 or int(classes.max()) >= num_classes):
        raise TargetError(f"target classes must be in [0, {num_classes}), got {classes.tolist()}")
    return output.gather(1, classes[:, None]).squeeze(1), classes
