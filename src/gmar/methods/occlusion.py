"""Occlusion (Zeiler & Fergus, *Visualizing and Understanding Convolutional Networks*, ECCV 2014, Sec. 4.2).

A patch's relevance is the drop of the target's score ``y - y_occluded`` when the patches under a
sliding window are hidden, averaged over the windows that cover it. It hides pixels, so it needs a
2-D patch grid (:func:`gmar.methods.functional.occlusion_windows`).
"""

from __future__ import annotations

import sys
from typing import ClassVar

import torch
from torch import nn

from gmar.capture import Captured
from gmar.explanation import Explanation
from gmar.layout import TokenLayout
from gmar.methods import functional as Fn
from gmar.methods.base import Explainer, forward_pass
from gmar.methods.registry import register
from gmar.progress import Progress
from gmar.targets import Target, score_of


@register
class Occlusion(Explainer):
    """Occlusion (Zeiler & Fergus 2014): each patch's relevance is how much the target's score drops
    when it is hidden.

    Every ``window × window`` square of patches (stride one patch) is replaced by ``baseline`` and
    the model run again; a patch's relevance is the mean drop ``y - y_occluded`` over the windows
    that cover it (with ``window=1``, the drop when that patch alone is hidden). The occluded copies
    run ``batch_size`` images per forward pass, with a progress bar. It is exact but slow: one
    forward pass per window and image, so ``method="all"`` leaves it out; name it to use it.

    Args:
        window: the side of the occluded square, in patches (default 1: each patch alone).
        baseline: ``"mean"`` (default): 0 in the model's input space, which is the preprocessing's
            mean colour; ``"blur"``: the image blurred (Gaussian, sigma one patch side); or a number
            in input space.
        batch_size: occluded images per forward pass.
        progress: draw a progress bar on stderr (None: when stderr is a terminal).
    """

    name = "occlusion"
    needs_readout_rows = False
    needs_attention = False
    runs_alone = True
    in_all = False
    smoke_options: ClassVar[dict] = {"window": 2**31}

    def __init__(
        self,
        model: nn.Module,
        window: int = 1,
        baseline: str | float = "mean",
        batch_size: int = 64,
        progress: bool | None = None,
    ) -> None:
        super().__init__(model)
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be a positive int (patches), not {window!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, not {batch_size!r}")
        if isinstance(baseline, str) and baseline not in ("mean", "blur"):
            raise ValueError(f"baseline must be 'mean', 'blur' or a number, not {baseline!r}")
        if not isinstance(baseline, (str, int, float)) or isinstance(baseline, bool):
            raise ValueError(f"baseline must be 'mean', 'blur' or a number, not {baseline!r}")
        self.window, self.baseline, self.batch_size = window, baseline, batch_size
        self.progress = sys.stderr.isatty() if progress is None else progress

    def __call__(self, images: torch.Tensor, target: Target = None) -> Explanation:
        images, layout = self.inputs(images, target)
        windows = Fn.occlusion_windows(layout.grid_size, self.window)
        batch = images.shape[0]
        step = max(1, self.batch_size // batch)  # windows per forward pass
        # The model runs as it is (nothing captured), and a target is needed even without gradients.
        with forward_pass(self.adapter, images, layout, target, capture_options=None, needs_target=True) as run:
            scores, classes = run.scores, run.classes
            replacement = self._replacement(images, layout)
            drops = []
            bar = Progress(len(windows), "occlusion", self.progress, unit="windows")
            try:
                for start in range(0, len(windows), step):
                    chunk = windows[start : start + step]
                    occluded = Fn.occlude(images, chunk, replacement, layout)
                    outputs = self.adapter.forward(occluded.flatten(0, 1))
                    for j in range(len(chunk)):
                        hidden = score_of(outputs[j * batch : (j + 1) * batch], target, classes)
                        drops.append(scores - hidden)  # type: ignore[operator]
                    bar.update(advance=len(chunk))
            finally:
                bar.close()
            token_map = Fn.occlusion_map(torch.stack(drops, dim=1).float(), windows)
        return self.explanation(token_map, None, run.captured, scores, classes, layout, images, target)

    def _replacement(self, images: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        if self.baseline == "mean":
            return images.new_zeros(())
        if self.baseline == "blur":
            from gmar.imageops import gaussian_blur

            return gaussian_blur(images, float(max(layout.patch_size)))
        return images.new_full((), float(self.baseline))

    def relevance(self, captured: Captured, reduced: list, layout: TokenLayout):
        raise NotImplementedError("occlusion runs the model once per window; it has no per-layer reduction")
