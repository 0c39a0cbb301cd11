"""Metrics for explanations, batched in torch; each states its protocol and its direction.

Every metric takes heatmaps ``(B, H, W)`` (higher = more relevant, any scale unless said) and
returns one value per sample ``(B,)`` (or per-sample curves), so that results can be stored per
image and aggregated with confidence intervals later. ``DIRECTION[name]`` is ``"higher"`` or
``"lower"``: which way is better (a view of :mod:`gmar.eval.registry`, where each metric evaluate
scores is declared with its group, selector and needs).

Faithfulness metrics call the model; they take a :class:`Scorer`, which turns the model's output
into the target's score and whether the model still "gets it".
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from gmar.capture import AttentionStream, Recorder, capture, model_lock
from gmar.imageops import gaussian_blur


@dataclass
class Scorer:
    """How a model's output is read for a target class.

    The output is the model adapter's (:meth:`gmar.adapters.ModelAdapter.forward`): logits for a
    Hugging Face classifier as for a timm, torchvision or reference model, an image embedding for
    an OpenCLIP model. A module no adapter knows is called directly and must return a tensor.

    Args:
        model: the model (called on ``(B, 3, H, W)``), or its adapter.
        multi_label: scores are ``sigmoid(logit)`` and a class counts as predicted when it is
            above 0.5 (the reference model); otherwise ``softmax`` and the arg-max.
        batch_size: the most images sent to the model at once.
        target: a callable target ``f(output) -> (N,)`` scores (a text prompt's
            :class:`gmar.TextTarget` with one prompt, any function of an embedding); the score is
            its value, and the classes passed are ignored. Such a target has no class to hit, so the
            perturbation tests (which count hits) refuse it.
    """

    model: nn.Module
    multi_label: bool = False
    batch_size: int = 64
    target: Callable[[torch.Tensor], torch.Tensor] | None = None

    def __post_init__(self) -> None:
        self.forward, self.module = model_output(self.model)

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor, classes: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Target probability ``(N,)`` and hit ``(N,)`` bool for ``images`` ``(N, 3, H, W)``; with a
        callable :attr:`target`, its score ``(N,)`` and ``score > 0``."""
        probabilities, hits = [], []
        for start in range(0, images.shape[0], self.batch_size):
            chunk = images[start : start + self.batch_size]
            with model_lock(self.module):  # not while another thread's explanation instruments it
                output = self.forward(chunk).float()
            if self.target is not None:
                score = self.target(output).float()
                probabilities.append(score)
                hits.append(score > 0)
                continue
            if classes is None:
                raise ValueError("a Scorer without a callable target needs the target classes")
            target = classes[start : start + self.batch_size].to(output.device)
            picked = output.gather(1, target[:, None]).squeeze(1)
            if self.multi_label:
                probabilities.append(torch.sigmoid(picked))
                hits.append(picked > 0)
            else:
                probabilities.append(output.softmax(dim=1).gather(1, target[:, None]).squeeze(1))
                hits.append(output.argmax(dim=1) == target)
        return torch.cat(probabilities), torch.cat(hits)

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """The model's outputs ``(N, C)`` (float32) for ``images`` ``(N, 3, H, W)``."""
        chunks = []
        for start in range(0, images.shape[0], self.batch_size):
            with model_lock(self.module):
                chunks.append(self.forward(images[start : start + self.batch_size]).float())
        return torch.cat(chunks)


def model_output(model: nn.Module) -> tuple[Callable[[torch.Tensor], torch.Tensor], nn.Module]:
    """The function that gives ``model``'s output tensor for ``(B, 3, H, W)`` (its adapter's
    :meth:`~gmar.adapters.ModelAdapter.forward`, or the module itself where no adapter knows it),
    and the module whose lock guards it."""
    from gmar.adapters import get_adapter
    from gmar.adapters.base import ModelAdapter
    from gmar.errors import UnsupportedModelError

    try:
        adapter = get_adapter(model)
    except UnsupportedModelError:
        adapter = None
    if adapter is not None:
        return adapter.forward, adapter.model
    if isinstance(model, ModelAdapter):  # pragma: no cover - get_adapter returns adapters as they are
        return model.forward, model.model

    def forward(images: torch.Tensor) -> torch.Tensor:
        output = model(images)
        if not isinstance(output, torch.Tensor):
            raise TypeError(
                f"{type(model).__name__} returned {type(output).__name__}, not a tensor of logits: pass a model "
                "gmar supports (gmar models lists them) or a module that returns its logits"
            )
        return output

    return forward, model


# ------------------------------------------------------------------------------------------ faithfulness


def trapezoid(values: torch.Tensor, fractions: torch.Tensor) -> torch.Tensor:
    """Area under ``values`` ``(..., S)`` over ``fractions`` ``(S,)`` by the trapezoid rule."""
    widths = fractions[1:] - fractions[:-1]
    return ((values[..., 1:] + values[..., :-1]) / 2 * widths).sum(dim=-1)


#: the faithfulness protocols :func:`faithfulness` runs, by name
FAITHFULNESS = ("deletion", "insertion", "perturbation_positive", "perturbation_negative")


def faithfulness(
    scorer: Scorer,
    images: torch.Tensor,
    heatmaps: torch.Tensor,
    classes: torch.Tensor | None,
    protocols: Sequence[str] = FAITHFULNESS,
    steps: int = 20,
    baseline: float | torch.Tensor = 0.0,
    blur_sigma: float = 5.0,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Several faithfulness protocols for several maps of the same images, each perturbed image
    scored once.

    ``heatmaps`` is ``(B, H, W)`` or ``(M, B, H, W)``: M maps (methods) of each of the B images.
    Returns, per protocol of ``protocols`` (:data:`FAITHFULNESS`), what :func:`deletion`,
    :func:`insertion` or :func:`perturbation` returns, with a leading ``M`` axis when ``heatmaps``
    has one: ``(auc, curve)``. The values are those of the single calls; only the work is shared:

    - an image that several curves pass through is scored once: the unperturbed image (the start of
      deletion and of both perturbation tests, the end of insertion), the fully deleted one (the end
      of every deletion curve), the blurred one (the start of every insertion curve), and, with a
      zero ``baseline``, every step of the positive perturbation test, which lies on the deletion
      curve (the same pixels set to 0);
    - the remaining perturbed images of all maps and protocols go to the model together, in batches
      of ``scorer.batch_size``, built batch by batch (memory stays at one batch of images).
    """
    unknown = [p for p in protocols if p not in FAITHFULNESS]
    if unknown:
        raise ValueError(f"unknown protocols {unknown}; choose from {FAITHFULNESS}")
    if scorer.target is not None and any(p.startswith("perturbation") for p in protocols):
        raise ValueError(
            "the perturbation tests count whether the model still predicts the target class; a callable target "
            "has no class: score it with deletion and insertion"
        )
    single = heatmaps.ndim == 3
    maps = heatmaps[None] if single else heatmaps
    methods, batch, height, width = maps.shape
    if images.shape[0] != batch or images.shape[-2:] != (height, width):
        raise ValueError(f"heatmaps {tuple(heatmaps.shape)} do not match images {tuple(images.shape)}")
    pixels = height * width
    if classes is None:  # a callable target: the scorer ignores the classes
        classes = torch.zeros(batch, dtype=torch.long)
    # The images a perturbed image is made of, by kind: it is ``base`` where a pixel's rank is at
    # least ``count``, ``replacement`` elsewhere.
    sources = {"image": images}
    zero_baseline = not isinstance(baseline, torch.Tensor) and float(baseline) == 0.0
    if "deletion" in protocols and not zero_baseline:
        sources["baseline"] = torch.as_tensor(baseline, dtype=images.dtype, device=images.device).expand_as(images)
    if {"perturbation_positive", "perturbation_negative"} & set(protocols) or zero_baseline:
        sources["zero"] = torch.zeros((), dtype=images.dtype, device=images.device).expand_as(images)
    if "insertion" in protocols:
        sources["blur"] = gaussian_blur(images, blur_sigma)
    flat = maps.flatten(2).float()
    ranks = {}  # (direction) -> (M, B, P): each pixel's position in the order of removal
    for descending in (True, False):
        order = torch.sort(flat, dim=2, descending=descending, stable=True).indices
        rank = torch.empty_like(order)
        rank.scatter_(2, order, torch.arange(pixels, device=order.device).expand_as(order))
        ranks[descending] = rank
    curve_fractions = torch.linspace(0, 1, steps + 1)
    test_fractions = torch.arange(10) / 10
    plans = {  # protocol -> (base, replacement, most relevant first, fractions)
        "deletion": ("image", "zero" if zero_baseline else "baseline", True, curve_fractions),
        "insertion": ("blur", "image", True, curve_fractions),
        "perturbation_positive": ("image", "zero", True, test_fractions),
        "perturbation_negative": ("image", "zero", False, test_fractions),
    }
    keys: dict[tuple, int] = {}  # a perturbed image's description -> its position among the scored
    wanted: dict[str, list[int]] = {}
    for protocol in protocols:
        base, replacement, descending, fractions = plans[protocol]
        positions = []
        for m in range(methods):
            for b in range(batch):
                for fraction in fractions.tolist():
                    count = round(fraction * pixels)
                    if count == 0:
                        key: tuple = (b, base)
                    elif count == pixels:
                        key = (b, replacement)
                    else:
                        key = (b, base, replacement, m, descending, count)
                    positions.append(keys.setdefault(key, len(keys)))
        wanted[protocol] = positions
    described = list(keys)
    probabilities, hits = [], []
    for start in range(0, len(described), scorer.batch_size):
        part = described[start : start + scorer.batch_size]
        rows = torch.tensor([key[0] for key in part], device=images.device)
        chosen = _perturbed(part, rows, sources, ranks, height, width)
        p, h = scorer(chosen, classes[rows.to(classes.device)])
        probabilities.append(p)
        hits.append(h)
    scores, hit = torch.cat(probabilities), torch.cat(hits)
    results = {}
    for protocol in protocols:
        fractions = plans[protocol][3]
        index = torch.tensor(wanted[protocol], device=scores.device).view(methods, batch, len(fractions))
        if protocol.startswith("perturbation"):
            curve = hit[index].float()
            auc = 100 * trapezoid(curve, fractions.to(curve.device))
        else:
            curve = scores[index]
            auc = trapezoid(curve, fractions.to(curve.device))
        results[protocol] = (auc[0], curve[0]) if single else (auc, curve)
    return results


def _perturbed(
    keys: list[tuple], rows: torch.Tensor, sources: dict, ranks: dict, height: int, width: int
) -> torch.Tensor:
    """The images ``(n, 3, H, W)`` that ``keys`` describe (see :func:`faithfulness`)."""
    bases = torch.stack([sources[key[1]][key[0]] for key in keys])
    partial = [i for i, key in enumerate(keys) if len(key) > 2]
    if partial:
        picked = [keys[i] for i in partial]
        replacements = torch.stack([sources[key[2]][key[0]] for key in picked])
        rank = torch.stack([ranks[key[4]][key[3], key[0]] for key in picked])
        counts = torch.tensor([key[5] for key in picked], device=rank.device)
        replaced = (rank < counts[:, None]).view(len(picked), 1, height, width)
        bases[partial] = torch.where(replaced, replacements, bases[partial])
    return bases


def deletion(
    scorer: Scorer,
    images: torch.Tensor,
    heatmaps: torch.Tensor,
    classes: torch.Tensor | None,
    steps: int = 20,
    baseline: float | torch.Tensor = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Deletion (Petsiuk et al. 2018): pixels set to ``baseline`` from most to least relevant.

    The target's probability is measured after removing a fraction ``k / steps`` of the pixels,
    ``k = 0 … steps``; the AUC is the trapezoid over the fraction in [0, 1]. **Lower is better.**
    ``baseline`` is a value (in the model's input space) or an image ``(B|1, 3, H, W)``.
    Returns ``(auc (B,), curve (B, steps + 1))``.
    """
    return faithfulness(scorer, images, heatmaps, classes, ["deletion"], steps, baseline)["deletion"]


def insertion(
    scorer: Scorer,
    images: torch.Tensor,
    heatmaps: torch.Tensor,
    classes: torch.Tensor | None,
    steps: int = 20,
    blur_sigma: float = 5.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Insertion (Petsiuk et al. 2018): from a blurred copy, the original pixels are put back from
    most to least relevant; the AUC of the target's probability over the fraction inserted, in
    ``k / steps`` steps, by the trapezoid rule. **Higher is better.** Returns ``(auc, curve)``."""
    return faithfulness(scorer, images, heatmaps, classes, ["insertion"], steps, blur_sigma=blur_sigma)["insertion"]


def perturbation(
    scorer: Scorer, images: torch.Tensor, heatmaps: torch.Tensor, classes: torch.Tensor | None, positive: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chefer et al.'s perturbation test: 0 %, 10 %, … 90 % of the pixels set to 0, most relevant
    first (``positive``, **lower is better**) or least relevant first (negative, **higher is
    better**); per image the hit (the model still predicts the target) at each step. The dataset's
    score is the trapezoid AUC of the mean hit curve over the fraction, **including the 0 % step**,
    in percent; per image this returns ``100 × trapezoid(hits)``, whose mean is exactly that.
    Returns ``(auc (B,), hits (B, 10))``.
    """
    protocol = "perturbation_positive" if positive else "perturbation_negative"
    return faithfulness(scorer, images, heatmaps, classes, [protocol])[protocol]


# ------------------------------------------------------------------------------------------ localisation


def pointing_game(heatmaps: torch.Tensor, masks: torch.Tensor, tolerance: int = 15) -> torch.Tensor:
    """Zhang et al. 2018: a hit (1.0) when the heatmap's maximum lies on the target's mask or within
    ``tolerance`` pixels of it (Euclidean), else 0.0. Ties: the first maximum in row-major order.
    **Higher is better.**"""
    _batch, height, width = heatmaps.shape
    top = heatmaps.flatten(1).argmax(dim=1)
    ty, tx = (top // width).float(), (top % width).float()
    ys, xs = torch.meshgrid(
        torch.arange(height, device=heatmaps.device), torch.arange(width, device=heatmaps.device), indexing="ij"
    )
    distance = ((ys[None] - ty[:, None, None]) ** 2 + (xs[None] - tx[:, None, None]) ** 2).sqrt()
    near = (distance <= tolerance) & masks.bool()
    return near.flatten(1).any(dim=1).float()


def energy_pointing_game(heatmaps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Wang et al. 2020 (Score-CAM): the share of the positive heatmap mass inside the target's
    mask; 0 for a map with no positive mass. **Higher is better.**"""
    positive = heatmaps.clamp_min(0).flatten(1).float()
    inside = (positive * masks.flatten(1).float()).sum(dim=1)
    total = positive.sum(dim=1)
    return torch.where(total > 0, inside / total.clamp_min(torch.finfo(total.dtype).tiny), 0.0)


def pixel_auroc(heatmaps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Area under the ROC curve of the heatmap as a pixel classifier of the mask, per image (ties
    count one half: the Mann-Whitney U statistic). NaN when the mask is empty or full. **Higher
    is better**; 0.5 is chance."""
    scores, labels = heatmaps.flatten(1).double(), masks.flatten(1).bool()
    ranks = _average_ranks(scores)
    positives = labels.sum(dim=1).double()
    negatives = labels.shape[1] - positives
    rank_sum = (ranks * labels).sum(dim=1)
    auc = (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)
    return torch.where((positives > 0) & (negatives > 0), auc, torch.nan).float()


def pixel_ap(heatmaps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Average precision of the heatmap as a pixel classifier of the mask, per image: the mean of
    the precision at each positive pixel's rank, tied scores taken together (as scikit-learn's
    ``average_precision_score``). NaN when the mask is empty. **Higher is better**; chance is the
    mask's area share."""
    results = []
    for scores, labels in zip(heatmaps.flatten(1).double(), masks.flatten(1).bool(), strict=True):
        positives = int(labels.sum())
        if positives == 0:
            results.append(float("nan"))
            continue
        order = torch.argsort(scores, descending=True, stable=True)
        sorted_scores, sorted_labels = scores[order], labels[order].double()
        # the last index of each run of equal scores: thresholds between distinct values only
        last = torch.ones_like(sorted_scores, dtype=torch.bool)
        last[:-1] = sorted_scores[1:] != sorted_scores[:-1]
        true_pos = torch.cumsum(sorted_labels, 0)[last]
        predicted = (torch.arange(len(sorted_scores), dtype=torch.double) + 1)[last]
        precision, recall = true_pos / predicted, true_pos / positives
        previous = torch.cat([torch.zeros(1, dtype=torch.double), recall[:-1]])
        results.append(float(((recall - previous) * precision).sum()))
    return torch.tensor(results, dtype=torch.float32)


def segmentation(heatmaps: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Chefer et al.'s segmentation protocol, per image: the heatmap is thresholded at its own mean
    (foreground where it is above); returns the pixel accuracy against the mask and the mean IoU
    over the two classes, foreground and background. **Higher is better** for both."""
    # double: the float32 mean of a constant map can round below the constant
    flat, labels = heatmaps.flatten(1).double(), masks.flatten(1).bool()
    predicted = flat > flat.mean(dim=1, keepdim=True)
    accuracy = (predicted == labels).float().mean(dim=1)
    ious = []
    for pred, truth in ((predicted, labels), (~predicted, ~labels)):
        intersection = (pred & truth).sum(dim=1).float()
        union = (pred | truth).sum(dim=1).float()
        ious.append(torch.where(union > 0, intersection / union.clamp_min(1), 1.0))
    return accuracy, (ious[0] + ious[1]) / 2


def class_discrimination(heatmaps: torch.Tensor, target_masks: torch.Tensor, other_masks: torch.Tensor) -> torch.Tensor:
    """For a scene with several objects, explained for one of them: the share of the positive
    heatmap mass on the target object minus the mean share on each of the other present objects,
    in [-1, 1]. A class-agnostic method gives every target of a scene the same map, so over the
    targets of a scene its scores sum to exactly 0. **Higher is better.**

    Args:
        target_masks: ``(B, H, W)`` the explained object.
        other_masks: ``(B, K, H, W)`` the other objects, one mask each (all-False masks are
            ignored, so scenes with fewer objects can be padded), or ``(B, H, W)`` for one.
    """
    if other_masks.ndim == heatmaps.ndim:
        other_masks = other_masks[:, None]
    target = energy_pointing_game(heatmaps, target_masks)
    batch, objects = other_masks.shape[:2]
    repeated = heatmaps[:, None].expand(batch, objects, *heatmaps.shape[1:])
    shares = energy_pointing_game(repeated.flatten(0, 1), other_masks.flatten(0, 1)).view(batch, objects)
    present = other_masks.flatten(2).any(dim=2).float()
    mean_other = (shares * present).sum(dim=1) / present.sum(dim=1).clamp_min(1)
    return target - mean_other


# ------------------------------------------------------------------------------------------- model check


def object_removal(
    scorer: Scorer,
    images: torch.Tensor,
    removed: torch.Tensor,
    classes: torch.Tensor,
    others: Sequence[Sequence[int]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What a localisation benchmark assumes of its model: removing an object lowers the score of
    the object's own class more than that of any other class present. A property of the model and
    the data, not of an explanation; a model that fails it may find a class anywhere, and no map
    of it can be scored as right or wrong by the object's mask.

    The score is the logit: a probability near 0 or 1 hides how far it moved. A drop is the logit
    on the image minus the logit on the image without the object; the other classes are those of
    the scene's other objects.

    Args:
        images: ``(B, 3, H, W)`` the scenes.
        removed: ``(B, 3, H, W)`` each scene without the target's object (re-rendered, e.g.
            :meth:`gmar.eval.scenes.Scenes.without`).
        classes: ``(B,)`` the removed object's class.
        others: per image, the classes of the scene's other objects (the target's own is ignored).
    Returns:
        ``(own_drop, other_drop, own_drops_most)``, each ``(B,)``: the own class's drop (**higher**
        is better), the mean drop of the other present classes (**lower**: ideally about 0), and
        1.0 when the own class dropped more than every other present class, else 0.0 (**higher**).
        The last two are NaN for a scene with no other object.
    """
    drop = scorer.logits(images) - scorer.logits(removed)
    rows = torch.arange(len(classes), device=drop.device)
    classes = classes.to(drop.device)
    own = drop[rows, classes]
    present = torch.zeros_like(drop, dtype=torch.bool)
    for row, found in enumerate(others):
        present[row, list(found)] = True
    present[rows, classes] = False
    count = present.sum(dim=1)
    other_mean = torch.where(present, drop, 0.0).sum(dim=1) / count.clamp_min(1)
    other_max = torch.where(present, drop, -torch.inf).amax(dim=1)
    most = (own > other_max).float()
    none = count == 0
    return own, other_mean.masked_fill(none, torch.nan), most.masked_fill(none, torch.nan)


# ------------------------------------------------------------------------------------------------ sanity


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation per row of ``(B, ...)`` pairs (ties get average ranks); NaN when
    either map is constant."""
    ra, rb = _average_ranks(a.flatten(1).double()), _average_ranks(b.flatten(1).double())
    ra, rb = ra - ra.mean(dim=1, keepdim=True), rb - rb.mean(dim=1, keepdim=True)
    denominator = ra.norm(dim=1) * rb.norm(dim=1)
    return torch.where(denominator > 0, (ra * rb).sum(dim=1) / denominator, torch.nan).float()


def cascading_randomisation_steps(model: nn.Module) -> list[tuple[str, list[str]]]:
    """The steps of Adebayo et al.'s cascading randomisation, from the head down, for any model gmar
    explains: the head (every parameter after the last block: final norms, pooling, classifier or
    projection), then each block from the last to the first, then the embeddings (every parameter the
    first block's input depends on: patch embedding, position embedding, class, distillation and
    register tokens, pre-norm). Each step lists parameter names.

    The blocks are the adapter's (:attr:`gmar.adapters.ModelAdapter.blocks`), so the cascade has one
    step per block whatever the family. A parameter outside the blocks goes with the first block whose
    input depends on it (found by autograd on one blank image: the embeddings for block 0, the block
    before for a layer between two blocks, such as Swin's patch merging); the others the output
    depends on form the head. Parameters the explained output does not depend on (a CLIP model's text
    tower) are in no step. The model is not touched: the dependencies are traced on a copy.
    """
    with model_lock(model):  # a copy taken while another thread instruments the model would keep its hooks
        twin = copy.deepcopy(model)
    return _cascade(twin)


def _block_input(inputs: list[torch.Tensor], module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Append a block's input tokens (its first argument, positional or not) to ``inputs``."""
    tensors = [value for value in (*args, *kwargs.values()) if isinstance(value, torch.Tensor)]
    inputs.append(tensors[0])


def _cascade(model: nn.Module) -> list[tuple[str, list[str]]]:
    """:func:`cascading_randomisation_steps` of ``model``, which this may change (pass a copy)."""
    from gmar.adapters import get_adapter

    adapter = get_adapter(model)
    blocks = list(adapter.blocks)
    names = {id(param): name for name, param in model.named_parameters()}
    inside = [[names[id(p)] for p in block.parameters() if id(p) in names] for block in blocks]
    in_blocks = {name for listed in inside for name in listed}
    outside = [(name, param) for name, param in model.named_parameters() if name not in in_blocks]
    inputs: list[torch.Tensor] = []
    handles = [block.register_forward_pre_hook(partial(_block_input, inputs), with_kwargs=True) for block in blocks]
    parameter = next(model.parameters())
    image = torch.zeros(1, 3, *adapter.preprocess_config().input_size, dtype=parameter.dtype, device=parameter.device)
    try:
        model.eval()
        for _, param in outside:
            param.requires_grad_(True)
        # Instrumented, as when explained: some adapters run their blocks only then (CaiT's stages).
        with torch.enable_grad(), adapter.instrument(Recorder(adapter.num_layers)):
            output = adapter.forward(image)
    finally:
        for handle in handles:
            handle.remove()
    if len(inputs) != len(blocks):
        raise RuntimeError(f"{type(model).__name__}: {len(inputs)} block calls for {len(blocks)} blocks")
    # owner[name]: the index of the first block whose input depends on it; len(blocks): only the output does
    owner: dict[str, int] = {}
    pending = [(name, param) for name, param in outside]
    for index, tensor in enumerate([*inputs, output]):
        if not pending or not tensor.requires_grad:
            continue
        grads = torch.autograd.grad(tensor.float().sum(), [p for _, p in pending], allow_unused=True, retain_graph=True)
        owner.update({name: index for (name, _), grad in zip(pending, grads, strict=True) if grad is not None})
        pending = [(name, param) for (name, param), grad in zip(pending, grads, strict=True) if grad is None]
    order = [name for name, _ in model.named_parameters()]
    steps = [("head", [n for n in order if owner.get(n) == len(blocks)])]
    for index in reversed(range(len(blocks))):
        between = [n for n in order if owner.get(n) == index + 1 and index + 1 < len(blocks)]
        steps.append((f"block {index}", [n for n in order if n in set(inside[index]) or n in between]))
    steps.append(("embeddings", [n for n in order if owner.get(n) == 0]))
    return [(label, params) for label, params in steps if params]


def cascading_randomisation(
    model: nn.Module,
    explain: Callable[[nn.Module], torch.Tensor],
    seed: int = 0,
) -> list[tuple[str, torch.Tensor]]:
    """Adebayo et al. 2018, cascading: randomise the model's parameters step by step from the head
    down (:func:`cascading_randomisation_steps`), each step on top of the previous ones, and after
    each step compare the map with the original by Spearman rank correlation, per image. **Lower
    is better** (a map that survives randomisation does not depend on what the model learned).

    Randomised weights are drawn from a normal distribution with the parameter's own mean and
    standard deviation (0.02 where that is zero), so scales stay realistic. The model is not
    touched: the steps run on a deep copy.

    Args:
        explain: ``f(model) -> heatmaps (B, H, W)`` for the images and targets under test.
    Returns:
        ``[(step label, spearman (B,)), ...]``.
    """
    original = explain(model).detach()
    with model_lock(model):  # a copy taken while another thread instruments the model would keep its hooks
        twin = copy.deepcopy(model)
    flags = [(param, param.requires_grad) for param in twin.parameters()]
    modes = [(module, module.training) for module in twin.modules()]
    steps = _cascade(twin)
    for param, requires_grad in flags:  # as the model had them: the explanations run on the twin
        param.requires_grad_(requires_grad)
    for module, training in modes:
        module.training = training
    parameters = dict(twin.named_parameters())
    generator = torch.Generator().manual_seed(seed)
    results = []
    for label, names in steps:
        with torch.no_grad():
            for name in names:
                param = parameters[name]
                std = float(param.float().std()) if param.numel() > 1 else 0.0
                noise = torch.randn(param.shape, generator=generator).to(param)
                param.copy_(noise * (std or 0.02) + float(param.float().mean()))
        results.append((label, spearman(original, explain(twin).detach())))
    return results


# ------------------------------------------------------------------------------------------ head ablation


def head_ablation(
    scorer: Scorer,
    adapter,
    images: torch.Tensor,
    classes: torch.Tensor,
    rankings: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Remove attention heads one by one, most important first, and follow the target's score.

    Head ``(l, h)`` is removed by zeroing its output ``O_h`` where the capture reads it (see
    :func:`head_counts`): the heads' context vectors before they are merged (and, where the attention
    normalises them, before that norm). For each image, heads are removed in the order of its ranking; after ``k``
    removals (``k = 0 … L·H``) the target's probability is recorded. The AUC is the trapezoid over
    the fraction removed in [0, 1]. **Lower is better** for a ranking that finds the heads that
    matter; compare with a random and the reverse ranking, and with :func:`knockout_ranking`.

    Args:
        adapter: the model's :class:`gmar.adapters.ModelAdapter`.
        rankings: ``(B, L*H)`` flat head indices ``l * H + h``, most important first.
    Returns:
        ``(auc (B,), curve (B, L*H + 1))``.
    """
    layers, heads = head_counts(adapter)
    total = layers * heads
    # Row k of an image's masks has its first k ranked heads removed: head order[j] is kept in rows k <= j.
    positions = torch.empty_like(rankings)
    positions.scatter_(1, rankings, torch.arange(total, device=rankings.device).expand_as(rankings))
    removals = torch.arange(total + 1, device=rankings.device)
    keep = (removals[None, :, None] <= positions[:, None, :]).float()  # (B, L*H + 1, L*H)
    curve = _with_heads(scorer, adapter, images, classes, keep.to(images.device), (layers, heads))
    fractions = torch.linspace(0, 1, total + 1, device=curve.device)
    return trapezoid(curve, fractions), curve


def knockout_drops(scorer: Scorer, adapter, images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """The measured importance of every head: the target's probability with all heads minus with
    that head alone switched off (as in :func:`head_ablation`), ``(B, L*H)`` flat ``l * H + h``.
    Ranked by :func:`rank_heads`, it is the single-knock-out oracle a head score is compared with."""
    layers, heads = head_counts(adapter)
    total = layers * heads
    keep = torch.cat([torch.ones(1, total), 1.0 - torch.eye(total)]).to(images.device)
    probabilities = _with_heads(scorer, adapter, images, classes, keep.expand(images.shape[0], -1, -1), (layers, heads))
    return probabilities[:, :1] - probabilities[:, 1:]


def head_counts(adapter) -> tuple[int, int]:
    """``(layers, heads per layer)`` of the heads gmar can switch off: those the capture records
    (:meth:`gmar.capture.Recorder.head_output`), read from one pass on a blank image."""
    from gmar.errors import UnsupportedModelError

    parameter = next(adapter.model.parameters())
    image = torch.zeros(1, 3, *adapter.preprocess_config().input_size, dtype=parameter.dtype, device=parameter.device)
    with torch.inference_mode(), capture(adapter, head_outputs=True, stream=AttentionStream(adapter.num_layers)) as rec:
        adapter.forward(image)
        heads = [None if h is None else h.shape[1] for h in rec.head_outputs]
    if any(h is None for h in heads) or len(set(heads)) != 1:
        raise UnsupportedModelError(
            f"{type(adapter.model).__name__}: gmar cannot switch off single heads of this model"
        )
    return len(heads), int(heads[0])


def _with_heads(
    scorer: Scorer,
    adapter,
    images: torch.Tensor,
    classes: torch.Tensor,
    keep: torch.Tensor,
    counts: tuple[int, int],
) -> torch.Tensor:
    """The target's probability ``(B, R)`` for each image of ``images`` ``(B, 3, H, W)`` with each of
    its rows of ``keep`` ``(B, R, L*H)`` (1 keeps a head, 0 switches it off): all ``B·R`` masked
    copies in batches of the scorer's batch size. ``counts`` is :func:`head_counts`' ``(L, H)``.

    A head is switched off where the capture reads it (:meth:`gmar.capture.Recorder.head_output`),
    so the heads that head scores describe and the heads removed here are the same tensors."""
    layers, heads = counts
    batch, per_image = keep.shape[:2]
    rows_total = batch * per_image
    keep = keep.reshape(rows_total, layers, heads)
    scores = []
    for start in range(0, rows_total, scorer.batch_size):
        rows = slice(start, start + scorer.batch_size)  # each chunk masks with its own rows of `keep`
        owners = torch.arange(rows_total)[rows] // per_image  # the image each row belongs to
        # The stream computes each layer's attention without keeping its probabilities.
        stream = AttentionStream(adapter.num_layers)
        with capture(adapter, stream=stream, head_mask=keep[rows].to(images.device)):
            scores.append(scorer(images[owners.to(images.device)], classes[owners.to(classes.device)])[0])
    return torch.cat(scores).view(batch, per_image)


def rank_heads(weights: torch.Tensor) -> torch.Tensor:
    """Flat head indices ``(B, L*H)`` ordered by decreasing weight: ``(B, L, H)`` head weights or
    scores, or ``(B, L*H)`` (:func:`knockout_drops`)."""
    return torch.argsort(weights.flatten(1), dim=1, descending=True, stable=True)


# ---------------------------------------------------------------------------------------------- helpers


def _average_ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks 1..n per row of ``(B, n)``, ties sharing their average rank."""
    batch, n = values.shape
    order = torch.argsort(values, dim=1, stable=True)
    sorted_values = torch.gather(values, 1, order)
    ranks = torch.empty_like(values)
    for row in range(batch):
        vals = sorted_values[row]
        starts = torch.ones(n, dtype=torch.bool, device=values.device)
        starts[1:] = vals[1:] != vals[:-1]
        group = torch.cumsum(starts.long(), 0) - 1
        first = torch.nonzero(starts).flatten()
        sizes = torch.diff(torch.cat([first, torch.tensor([n], device=values.device)]))
        average = first.double() + (sizes.double() + 1) / 2
        ranks[row, order[row]] = average[group].to(ranks.dtype)
    return ranks


def mean_ci(values: Sequence[float], z: float = 1.96) -> tuple[float, float]:
    """Mean and the half-width of its normal-approximation 95 % confidence interval (NaNs dropped)."""
    clean = [v for v in values if v == v]
    if not clean:
        return float("nan"), float("nan")
    n = len(clean)
    mean = sum(clean) / n
    if n < 2:
        return mean, float("nan")
    variance = sum((v - mean) ** 2 for v in clean) / (n - 1)
    return mean, z * math.sqrt(variance / n)


def __getattr__(name: str):
    if name == "DIRECTION":  # metric name -> "higher" | "lower", read from the registry (which imports this module)
        from gmar.eval.registry import Directions

        return Directions()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
