"""The evaluation loop: explain a dataset with several methods, score every map with the selected
metrics of :mod:`gmar.eval.registry`, and store every number per item (:mod:`gmar.eval.store`).

Each ``(item, method)`` is stored in one transaction with a ``done`` mark, so a killed run started
again with the same arguments skips what is stored and loses nothing. Under ``torchrun`` every
process takes the items whose index modulo the world size is its rank (:mod:`gmar.eval.distributed`),
all write to the same database, and rank 0 writes the report (:mod:`gmar.eval.report`).
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from gmar.adapters import get_adapter
from gmar.errors import GmarError
from gmar.eval import metrics as M
from gmar.eval import registry as R
from gmar.eval.datasets import ImageFile, ImageNetSegImage, Item
from gmar.eval.store import Store
from gmar.methods import explain
from gmar.progress import Progress

#: the unit under which the model check's results are stored (it scores the model, not a method)
MODEL_CHECK = "model_check"


@dataclass
class Settings:
    """Everything that changes the numbers; stored with the results, checked on resume."""

    model: str
    data: str
    methods: list[str]
    metrics: list[str]
    limit: int | None = None
    steps: int = 20
    baseline: float = 0.0
    blur_sigma: float = 5.0
    tolerance: float | None = None
    sanity_items: int = 16
    seed: int = 0
    multi_label: bool = False
    extra: dict = field(default_factory=dict)
    #: :func:`weights_digest` of the model; :func:`evaluate` fills it in, so a changed checkpoint is never resumed
    weights: str = ""


def evaluate(
    model: nn.Module,
    items: Sequence[Item | ImageFile | ImageNetSegImage],
    settings: Settings,
    out: Path,
    batch_size: int = 16,
    progress: bool = True,
    rank: int = 0,
    world: int = 1,
    after_batch: Callable[[], None] | None = None,
) -> Store:
    """Explain and score ``items`` (this process's share of them), storing as it goes.

    ``items`` are decoded :class:`~gmar.eval.datasets.Item` or undecoded entries
    (:func:`~gmar.eval.datasets.image_files`, :func:`~gmar.eval.datasets.imagenet_seg_images`):
    each process takes those whose index modulo ``world`` is its ``rank``, skips those already
    stored without decoding them (their key comes from the file's bytes), and decodes, explains,
    scores and stores the rest a batch at a time, on the model's device; memory holds one batch. An
    entry that cannot be read is reported on one line and skipped.

    The store is keyed by ``settings`` and by :func:`weights_digest` of ``model``: a folder holding
    another run's results, or results of other weights, is refused.
    """
    adapter = get_adapter(model)
    if not adapter.is_classifier:
        raise GmarError(
            f"gmar evaluate scores classifiers, and {type(model).__name__} returns an embedding; score its maps with "
            "gmar.eval.metrics and a callable target (Scorer(model, target=...)) instead"
        )
    settings = replace(settings, weights=weights_digest(model))
    out.mkdir(parents=True, exist_ok=True)
    store = Store(out / "results.sqlite")
    try:
        store.check_settings(settings)
    except GmarError:
        store.close()
        raise
    units = _units(settings)
    mine = [(index, entry) for index, entry in enumerate(items) if index % world == rank]
    scorer = M.Scorer(model, multi_label=settings.multi_label, batch_size=64)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    for metric in R.selected(settings.metrics):
        scored = metric.methods is None or any(m in metric.methods for m in settings.methods)
        reason = metric.unavailable(adapter) if metric.unavailable is not None and scored else None
        if reason is not None:
            print(f"gmar: note: {reason}", file=sys.stderr)
            settings = replace(settings, metrics=[m for m in settings.metrics if m != metric.name])
    if "sanity_spearman" in settings.metrics:
        labels = [label for label, _ in M.cascading_randomisation_steps(model)]
        store.set_meta("sanity_steps", json.dumps(labels))
    names = adapter.class_names()  # where the model names its classes (the reference model: the scenes')
    bar = Progress(len(mine), "evaluating", progress and rank == 0, unit="items")

    def pending_batches():
        """Batches of this process's entries still to do, as ``(index, entry, units done)``; entries
        already done, and unreadable ones, advance the bar here."""
        batch = []
        for index, entry in mine:
            key = entry.key
            finished = store.done_units(key) if key is not None else set(units)
            if all(unit in finished for unit in units):
                bar.update(advance=1)
                continue
            batch.append((index, entry, finished))
            if len(batch) == batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    for pending in pending_batches():
        decoded = [(index, entry.load(), finished) for index, entry, finished in pending]
        ready = [(index, item, finished) for index, item, finished in decoded if item is not None]
        if ready:
            _evaluate_batch(model, scorer, adapter, ready, settings, store, device, names)
        bar.update(advance=len(pending))
        del decoded, ready  # the batch's images are dropped before the next is decoded
        if after_batch is not None:
            after_batch()
    bar.close()
    return store


def _evaluate_batch(model, scorer, adapter, ready, settings: Settings, store: Store, device, names) -> None:
    """Explain, score and store one batch: ``ready`` holds ``(index, item, units already done)``."""
    chunk = [item for _, item, _ in ready]
    indices = [index for index, _, _ in ready]
    done = {(item.key, unit) for _, item, finished in ready for unit in finished}
    for item in chunk:
        if not any(key == item.key for key, _ in done):
            store.forget_other_contents(item.key)  # this name's earlier content, if the file was replaced
    images = torch.stack([item.image for item in chunk]).to(device)
    targets = _targets(scorer, images, chunk)

    def context_of(pending: list[int], method: str | None, **maps) -> R.Context:
        """What a metric sees of the ``pending`` items of this batch, for ``method`` (None: the model)."""
        return R.Context(
            items=[chunk[i] for i in pending],
            images=images[pending],
            targets=targets[pending],
            indices=[indices[i] for i in pending],
            method=method,
            model=model,
            scorer=scorer,
            adapter=adapter,
            settings=settings,
            **maps,
        )

    store.set_targets(
        [
            (item.key, target, names[target] if names is not None and 0 <= target < len(names) else None)
            for item, target in zip(chunk, targets.tolist(), strict=True)
        ]
    )
    chosen = R.selected(settings.metrics)
    per_method = [metric for metric in chosen if metric.unit == "method"]
    # The methods no item of the chunk has yet are explained in one call, sharing their pass.
    whole = [m for m in settings.methods if all((item.key, m) not in done for item in chunk)]
    shared = explain(model, images, whole, target=targets) if whole else {}
    # Their perturbation curves too: each perturbed image that several curves share is scored once.
    curves = _faithfulness(scorer, images, targets, [shared[m].heatmap for m in whole], settings)
    for method in settings.methods:
        pending = [i for i, item in enumerate(chunk) if (item.key, method) not in done]
        if not pending:
            continue
        explanation = (
            shared[method] if method in shared else explain(model, images[pending], method, target=targets[pending])
        )
        if method in shared:
            position, faithful = whole.index(method), curves
        else:
            position = 0
            faithful = _faithfulness(scorer, images[pending], targets[pending], [explanation.heatmap], settings)
        faithful = {k: (auc[position], curve[position]) for k, (auc, curve) in faithful.items()}
        context = context_of(
            pending, method, heatmaps=explanation.heatmap, head_weights=explanation.head_weights, faithful=faithful
        )
        wanted = [m for m in per_method if m.methods is None or method in m.methods]
        for key, (scores, curves_of) in zip(context.items, _score(context, wanted), strict=True):
            store.write(key.key, method, scores, curves_of)
    checks = [metric for metric in chosen if metric.unit == "model"]
    if checks:
        pending = [i for i, item in enumerate(chunk) if (item.key, MODEL_CHECK) not in done]
        context = context_of(pending, None, heatmaps=None, head_weights=None, faithful={})
        for item, (scores, _) in zip(context.items, _score(context, checks), strict=True):
            store.write(item.key, MODEL_CHECK, scores, {})


def _score(context: R.Context, metrics: Sequence[R.Metric]) -> list[tuple[dict, dict]]:
    """``metrics`` on ``context``'s items: per item its ``(scores, curves)``. Each metric sees only the
    items that have all it needs (:meth:`~gmar.eval.registry.Metric.admits`); metrics with the same
    needs share one sub-context (and what it computed once)."""
    results: list[tuple[dict, dict]] = [({}, {}) for _ in context.items]
    subsets: dict[tuple[int, ...], R.Context] = {}
    for metric in metrics:
        rows = tuple(
            i
            for i, (item, index) in enumerate(zip(context.items, context.indices, strict=True))
            if metric.admits(item, index, context.settings)
        )
        if not rows:
            continue
        if rows not in subsets:
            subsets[rows] = context if len(rows) == len(context.items) else _subset(context, list(rows))
        produced = metric.compute(subsets[rows])
        if not isinstance(produced, dict):
            produced = {None: produced}
        for variant, values in produced.items():
            if not isinstance(values, R.Values):
                values = R.Values(values)
            suffix = "" if variant is None else f"[{variant}]"
            scores = values.scores.tolist() if isinstance(values.scores, torch.Tensor) else list(values.scores)
            where = [rows[i] for i in values.rows] if values.rows is not None else list(rows)
            curves = values.curves.tolist() if isinstance(values.curves, torch.Tensor) else values.curves
            for k, (row, value) in enumerate(zip(where, scores, strict=True)):
                results[row][0][metric.name + suffix] = float(value)
                if curves is not None and metric.curve is not None:
                    results[row][1][metric.curve + suffix] = list(curves[k])
    return results


def _subset(context: R.Context, rows: list[int]) -> R.Context:
    def pick(tensor):
        return None if tensor is None else tensor[rows]

    return replace(
        context,
        items=[context.items[i] for i in rows],
        images=context.images[rows],
        targets=context.targets[rows],
        heatmaps=pick(context.heatmaps),
        head_weights=pick(context.head_weights),
        faithful={k: (auc[rows], curve[rows]) for k, (auc, curve) in context.faithful.items()},
        indices=[context.indices[i] for i in rows],
        _shared={},
    )


def weights_digest(model: nn.Module) -> str:
    """The first 16 hex digits of a SHA-256 over the model's state dict (parameters and persistent
    buffers): each entry's name, dtype, shape and bytes, in order. Equal weights give equal digests."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        value = tensor.detach()
        digest.update(f"{name}|{value.dtype}|{tuple(value.shape)}|".encode())
        digest.update(value.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:16]


def _units(settings: Settings) -> list[str]:
    """What is stored per item: each method's scores, and the model check's when one of its metrics is selected."""
    check = any(metric.unit == "model" for metric in R.selected(settings.metrics))
    return [*settings.methods, *([MODEL_CHECK] if check else [])]


def _targets(scorer: M.Scorer, images: torch.Tensor, chunk: Sequence[Item]) -> torch.Tensor:
    """The explained classes: the item's own, or the model's prediction."""
    targets = [item.target for item in chunk]
    if any(t is None for t in targets):
        predicted = scorer.logits(images).argmax(dim=1)  # the adapter's logits, whatever the model returns
        targets = [int(p) if t is None else t for t, p in zip(targets, predicted, strict=True)]
    return torch.tensor(targets, dtype=torch.long)


def _faithfulness(scorer, images, targets, heatmaps: list[torch.Tensor], settings) -> dict:
    """The faithfulness protocols of the selected metrics for several maps ``(B, H, W)`` of ``images``
    at once (:func:`gmar.eval.metrics.faithfulness`): per protocol ``(auc, curve)`` with a leading map axis."""
    wanted = [metric.protocol for metric in R.selected(settings.metrics) if metric.protocol is not None]
    if not heatmaps or not wanted:
        return {}
    return M.faithfulness(
        scorer, images, torch.stack(heatmaps), targets, wanted, settings.steps, settings.baseline, settings.blur_sigma
    )
