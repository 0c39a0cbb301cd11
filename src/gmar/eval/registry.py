"""The metrics evaluate knows, one :class:`Metric` entry each: the one place that says what a metric
is called, which way is better, how it is grouped and selected, what it needs and how it is computed.

The harness (:mod:`gmar.eval.harness`) scores the selected entries, the report
(:mod:`gmar.eval.report`) groups, orders and labels them, the CLI's ``--metrics`` takes their
selectors, and ``gmar.metrics.DIRECTION`` is a view of their directions. Adding a metric is one
:func:`register` call (and its test)::

    from gmar.eval.registry import Metric, register

    def mass_in_mask(ctx):  # ctx.heatmaps (n, H, W), ctx.masks (n, H, W): only items with a mask
        return (ctx.heatmaps * ctx.masks).flatten(1).sum(1) / ctx.heatmaps.flatten(1).sum(1)

    register(Metric("mass_in_mask", "higher", "localisation", "mass", frozenset({"mask"}), mass_in_mask))

after which ``gmar evaluate --metrics mass`` stores it per item and reports it in ``results.csv``,
``results.md`` and ``localisation.png``.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch.nn.utils.rnn import pad_sequence

from gmar.errors import GmarError, UnsupportedModelError
from gmar.eval import metrics as M

if TYPE_CHECKING:
    from torch import nn

    from gmar.eval.datasets import Item
    from gmar.eval.harness import Settings

#: what a metric may need of an item, and what each means; the harness gives a metric only the
#: items that have all it needs
NEEDS = {
    "mask": "the target's mask (`Item.mask`): localisation",
    "other_masks": "a mask and the other objects' masks (`Item.others`): scenes with several objects",
    "removed": "the scene re-rendered without the target's object (`Item.removed`): the scenes",
    "first_items": "only the first `--sanity-items` items of the data (a costly metric)",
    "model": "calls the model (or a copy of it) again; the others score the maps alone",
}
#: the head rankings of the head-ablation test: GMAR's paper weights, Taylor scores (``GMAR(head_score=
#: "taylor")``), ``gmar_gae``'s head scores, AttnLRP's head relevance (where AttnLRP explains the model),
#: the measured single-knock-out order (the oracle a score is judged by), a random order and GMAR's reversed
RANKINGS = ("gmar", "taylor", "gmar_gae", "attnlrp", "oracle", "random", "reverse")


@dataclass
class Values:
    """A metric's result on a :class:`Context`: ``scores`` ``(k,)`` for the context's ``rows`` (all of
    them when None), and optionally a curve per row, stored under the metric's :attr:`Metric.curve`."""

    scores: torch.Tensor | Sequence[float]
    rows: Sequence[int] | None = None
    curves: Sequence[Sequence[float]] | torch.Tensor | None = None


@dataclass
class Context:
    """What a metric's function sees: one method's maps of the items of one batch that have all the
    metric needs (for a ``unit="model"`` metric, no maps). Tensors are on the model's device.

    ``heatmaps`` ``(n, H, W)``, ``images`` ``(n, 3, H, W)``, ``targets`` ``(n,)``; ``head_weights``
    ``(n, L, H)`` where the method gives them; ``faithful`` the faithfulness protocols already
    measured for these maps (protocol -> ``(auc (n,), curve (n, S))``); ``indices`` each item's
    position in the data."""

    items: list[Item]
    images: torch.Tensor
    targets: torch.Tensor
    heatmaps: torch.Tensor | None
    head_weights: torch.Tensor | None
    faithful: dict[str, tuple[torch.Tensor, torch.Tensor]]
    indices: list[int]
    method: str | None
    model: nn.Module
    scorer: M.Scorer
    adapter: Any
    settings: Settings
    _shared: dict = field(default_factory=dict, repr=False)

    @property
    def masks(self) -> torch.Tensor:
        """``(n, H, W)`` bool: each item's target mask (needs ``"mask"``)."""
        return torch.stack([item.mask for item in self.items])

    @property
    def other_masks(self) -> torch.Tensor:
        """``(n, K, H, W)`` bool: the other objects' masks, padded with empty ones (needs ``"other_masks"``)."""
        return pad_sequence([item.others for item in self.items], batch_first=True)

    def once(self, key: str, compute: Callable[[], Any]) -> Any:
        """``compute()``, computed once for this context: for metrics that come out of one call."""
        if key not in self._shared:
            self._shared[key] = compute()
        return self._shared[key]


@dataclass(frozen=True)
class Metric:
    """One metric evaluate can score.

    Attributes:
        name: the stored and reported name (``results.csv``'s ``metric``).
        direction: ``"higher"`` or ``"lower"``: which way is better.
        group: how the report groups it (a plot per group): ``faithfulness``, ``localisation``,
            ``discrimination``, ``sanity``, ``head_ablation``, ``model_check`` or a new one.
        selector: the ``--metrics`` name that selects it (several metrics may share one).
        needs: what it needs of an item (:data:`NEEDS`).
        compute: ``compute(ctx: Context) -> Values | Tensor (n,)``; with :attr:`variants`, a dict
            ``variant -> Values``, stored as ``name[variant]``.
        curve: the name its per-item curves are stored under (``None``: no curve).
        protocol: a protocol of :func:`gmar.eval.metrics.faithfulness`, which the harness runs for
            every method of a batch at once (sharing the perturbed images); ``ctx.faithful`` holds it.
        unit: ``"method"`` (scored per method) or ``"model"`` (once per item, a property of the model).
        methods: only these methods are scored (``None``: every one).
        label: a one-line description for the report (defaults to the name).
        variants: the variants it is stored under (``name[variant]``), in report order.
        unavailable: ``unavailable(adapter)``: why this model cannot be scored with it (a note
            ending in what is skipped), or ``None`` when it can.
    """

    name: str
    direction: Literal["higher", "lower"]
    group: str
    selector: str
    needs: frozenset[str]
    compute: Callable[[Context], Any]
    curve: str | None = None
    protocol: str | None = None
    unit: Literal["method", "model"] = "method"
    methods: tuple[str, ...] | None = None
    label: str = ""
    variants: tuple[str, ...] = ()
    unavailable: Callable[[Any], str | None] | None = None

    def __post_init__(self) -> None:
        if self.direction not in ("higher", "lower"):
            raise ValueError(f"{self.name}: direction must be 'higher' or 'lower', not {self.direction!r}")
        unknown = set(self.needs) - set(NEEDS)
        if unknown:
            raise ValueError(f"{self.name}: unknown needs {sorted(unknown)}; choose from {', '.join(NEEDS)}")
        if self.unit not in ("method", "model"):
            raise ValueError(f"{self.name}: unit must be 'method' or 'model', not {self.unit!r}")

    def admits(self, item: Item, index: int, settings: Settings) -> bool:
        """Whether ``item`` (at ``index`` in the data) has all this metric needs."""
        needs = self.needs
        return not (
            ("mask" in needs and item.mask is None)
            or ("other_masks" in needs and (item.mask is None or item.others is None))
            or ("removed" in needs and item.removed is None)
            or ("first_items" in needs and index >= settings.sanity_items)
        )


#: every metric by name, in report order (the order of ``--metrics all`` and of the report's columns)
METRICS: dict[str, Metric] = {}


def register(metric: Metric) -> Metric:
    """Add ``metric`` to :data:`METRICS` (a name already taken is refused); returns it."""
    if metric.name in METRICS:
        raise ValueError(f"a metric named {metric.name!r} is registered already")
    METRICS[metric.name] = metric
    return metric


def unregister(name: str) -> None:
    """Remove the metric ``name`` (a toy metric of a test, for instance)."""
    METRICS.pop(name, None)


def groups() -> dict[str, list[str]]:
    """Group -> its metrics' names, in registry order."""
    found: dict[str, list[str]] = {}
    for metric in METRICS.values():
        found.setdefault(metric.group, []).append(metric.name)
    return found


def selectors() -> dict[str, list[str]]:
    """``--metrics`` name -> the metrics it selects, in registry order."""
    found: dict[str, list[str]] = {}
    for metric in METRICS.values():
        found.setdefault(metric.selector, []).append(metric.name)
    return found


def select_metrics(spec: str) -> list[str]:
    """``all`` or comma-separated selector names (:func:`selectors`) to metric names."""
    table = selectors()
    names = list(table) if spec.strip() == "all" else [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [n for n in names if n not in table]
    if unknown or not names:
        raise GmarError(f"unknown metric(s) {', '.join(unknown) or spec!r}; choose from {', '.join(table)}")
    return [metric for name in names for metric in table[name]]


def selected(names: Sequence[str]) -> list[Metric]:
    """The registered metrics among ``names``, in registry order."""
    wanted = set(names)
    return [metric for name, metric in METRICS.items() if name in wanted]


class Directions(Mapping):
    """``name -> "higher" | "lower"`` of every registered metric: a live view of :data:`METRICS`."""

    def __getitem__(self, name: str) -> str:
        return METRICS[name].direction

    def __iter__(self) -> Iterator[str]:
        return iter(METRICS)

    def __len__(self) -> int:
        return len(METRICS)

    def __repr__(self) -> str:
        return repr(dict(self))


# ------------------------------------------------------------------------------------- the metrics


def _protocol(protocol: str) -> Callable[[Context], Values]:
    def compute(ctx: Context) -> Values:
        auc, curve = ctx.faithful[protocol]
        return Values(auc, curves=curve)

    return compute


def _pointing(ctx: Context) -> torch.Tensor:
    tolerance = ctx.settings.tolerance
    if tolerance is None:
        tolerance = 15 * min(ctx.heatmaps.shape[-2:]) / 224  # 15 px at 224 px, scaled
    return M.pointing_game(ctx.heatmaps, ctx.masks, tolerance)


def _segmentation(ctx: Context) -> tuple[torch.Tensor, torch.Tensor]:
    return ctx.once("segmentation", lambda: M.segmentation(ctx.heatmaps, ctx.masks))


def _sanity(ctx: Context) -> Values:
    from gmar.methods import explain

    def heatmaps(net: nn.Module) -> torch.Tensor:
        return explain(net, ctx.images, ctx.method, target=ctx.targets).heatmap

    steps = M.cascading_randomisation(ctx.model, heatmaps, seed=ctx.settings.seed)
    scores, curves = [], []
    for position in range(len(ctx.items)):
        values = [float(rho[position]) for _, rho in steps]
        clean = [v for v in values if v == v]
        scores.append(sum(clean) / len(clean) if clean else float("nan"))
        curves.append(values)
    return Values(scores, curves=curves)


def can_switch_heads(adapter) -> bool:
    """Whether head ablation can switch ``adapter``'s model's heads off one by one."""
    try:
        M.head_counts(adapter)
    except UnsupportedModelError:
        return False
    return True


def head_rankings(ctx: Context) -> dict[str, torch.Tensor]:
    """Every head ranking gmar offers, and the bounds it is judged by, ``(n, L*H)`` each (see :data:`RANKINGS`)."""
    from gmar.methods import explain, supported_methods

    paper = M.rank_heads(ctx.head_weights)
    # Each item's random ranking comes from its own key, whatever batch or process it falls in.
    generators = [torch.Generator().manual_seed(item_seed(ctx.settings.seed, item.key)) for item in ctx.items]
    # Taylor's, gmar_gae's and AttnLRP's scores come from one shared forward pass.
    scorers = ["gmar", "gmar_gae", *(["attnlrp"] if "attnlrp" in supported_methods(ctx.model) else [])]
    scored = explain(ctx.model, ctx.images, scorers, target=ctx.targets, options={"gmar": {"head_score": "taylor"}})
    relevance = {"attnlrp": M.rank_heads(scored["attnlrp"].head_scores)} if "attnlrp" in scored else {}
    return {
        "gmar": paper,
        "taylor": M.rank_heads(scored["gmar"].head_scores),
        "gmar_gae": M.rank_heads(scored["gmar_gae"].head_scores),
        **relevance,
        "oracle": M.rank_heads(M.knockout_drops(ctx.scorer, ctx.adapter, ctx.images, ctx.targets)),
        "random": torch.stack([torch.randperm(paper.shape[1], generator=g) for g in generators]),
        "reverse": paper.flip(1),
    }


def item_seed(seed: int, key: str) -> int:
    """A seed of its own for the item ``key`` under the run's ``seed``."""
    return zlib.crc32(f"{seed}:{key}".encode())


def _head_ablation(ctx: Context) -> dict[str, Values]:
    results = {}
    for name, ranking in head_rankings(ctx).items():
        auc, curve = M.head_ablation(ctx.scorer, ctx.adapter, ctx.images, ctx.targets, ranking)
        results[name] = Values(auc, curves=curve)
    return results


def _removal(position: int) -> Callable[[Context], torch.Tensor]:
    def compute(ctx: Context) -> torch.Tensor:
        def run():
            removed = torch.stack([item.removed for item in ctx.items]).to(ctx.images.device)
            others = [item.other_classes for item in ctx.items]
            return M.object_removal(ctx.scorer, ctx.images, removed, ctx.targets, others)

        return ctx.once("object_removal", run)[position]

    return compute


_MASK = frozenset({"mask"})
_MODEL = frozenset({"model"})
_REMOVED = frozenset({"removed", "model"})


def _heads_unavailable(adapter) -> str | None:
    if can_switch_heads(adapter):
        return None
    return f"{type(adapter.model).__name__}'s heads cannot be switched off one by one; head ablation is skipped"


for _entry in (
    # faithfulness: the protocols of gmar.eval.metrics.faithfulness, run for all methods of a batch at once
    Metric("deletion_auc", "lower", "faithfulness", "deletion", _MODEL, _protocol("deletion"),
           curve="deletion", protocol="deletion"),
    Metric("insertion_auc", "higher", "faithfulness", "insertion", _MODEL, _protocol("insertion"),
           curve="insertion", protocol="insertion"),
    Metric("perturbation_positive", "lower", "faithfulness", "perturbation", _MODEL,
           _protocol("perturbation_positive"), protocol="perturbation_positive"),
    Metric("perturbation_negative", "higher", "faithfulness", "perturbation", _MODEL,
           _protocol("perturbation_negative"), protocol="perturbation_negative"),
    # localisation: the map against the target's mask
    Metric("pointing_game", "higher", "localisation", "pointing", _MASK, _pointing),
    Metric("energy_pointing_game", "higher", "localisation", "energy", _MASK,
           lambda c: M.energy_pointing_game(c.heatmaps, c.masks)),
    Metric("pixel_auroc", "higher", "localisation", "auroc", _MASK, lambda c: M.pixel_auroc(c.heatmaps, c.masks)),
    Metric("pixel_ap", "higher", "localisation", "auroc", _MASK, lambda c: M.pixel_ap(c.heatmaps, c.masks)),
    Metric("segmentation_pixel_accuracy", "higher", "localisation", "segmentation", _MASK,
           lambda c: _segmentation(c)[0]),
    Metric("segmentation_miou", "higher", "localisation", "segmentation", _MASK, lambda c: _segmentation(c)[1]),
    # discrimination: the target's object against the other objects of the scene
    Metric("class_discrimination", "higher", "discrimination", "discrimination", frozenset({"other_masks"}),
           lambda c: M.class_discrimination(c.heatmaps, c.masks, c.other_masks)),
    # sanity: the map of a cascade of randomised copies of the model
    Metric("sanity_spearman", "lower", "sanity", "sanity", frozenset({"first_items", "model"}), _sanity,
           curve="sanity"),
    # head ablation: GMAR's head rankings (and their bounds) by switching heads off
    Metric("head_ablation_auc", "lower", "head_ablation", "head_ablation", _MODEL, _head_ablation,
           curve="head_ablation", methods=("gmar",), variants=RANKINGS, unavailable=_heads_unavailable),
    # the model check: a property of the model and the data, stored once per item
    Metric("removal_own_drops_most", "higher", "model_check", "model_check", _REMOVED, _removal(2), unit="model",
           label="removed object's class drops most of the present classes (rate) ↑"),
    Metric("removal_own_drop", "higher", "model_check", "model_check", _REMOVED, _removal(0), unit="model",
           label="drop of the removed object's class logit ↑"),
    Metric("removal_other_drop", "lower", "model_check", "model_check", _REMOVED, _removal(1), unit="model",
           label="mean drop of the other present classes' logits (ideally about 0)"),
):  # fmt: skip
    register(_entry)
del _entry
