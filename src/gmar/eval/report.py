"""The report of an evaluation: ``results.csv`` (method, metric, mean, ci95, n, better),
``results.md`` (the table, the head rankings, the model check, the paired sections, the sanity steps)
and a plot per metric group, all read from the store and laid out by :mod:`gmar.eval.registry`."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from gmar.eval import metrics as M
from gmar.eval import registry as R
from gmar.eval.harness import MODEL_CHECK, Settings
from gmar.eval.store import Store
from gmar.outputs import OutputFolder

#: below this rate of removals that drop the own class most, the report warns
MODEL_CHECK_WARNING = 0.8
#: groups without a bar chart of their own: head ablation has its curves, the model check its section
UNPLOTTED = ("head_ablation", "model_check")


def report_files() -> tuple[str, ...]:
    """The files :func:`report` may write (a plot per group of the registered metrics); none of them
    replaces a file gmar did not write."""
    plots = [f"{group}.png" for group in R.groups() if group != "model_check"]
    return ("results.csv", "results.md", *plots, "deletion_insertion.png")


def report(store: Store, settings: Settings, out: Path) -> dict:
    """Write ``results.csv``, ``results.md`` and the plots; return the summary table."""
    table: dict[tuple[str, str], list[float]] = {}
    scores = store.scores()
    for _, method, metric, value in scores:
        if metric.startswith("head_ablation_auc["):
            method, metric = metric[len("head_ablation_auc[") : -1], "head_ablation_auc"
            method = f"heads:{method}"
        table.setdefault((method, metric), []).append(float("nan") if value is None else value)
    summary = {key: (*M.mean_ci(values), sum(v == v for v in values)) for key, values in table.items()}
    metrics_present = [  # by group, then in registry order
        name
        for names in R.groups().values()
        for name in names
        if R.METRICS[name].unit == "method" and any(k[1] == name for k in summary)
    ]
    methods_present = [m for m in settings.methods if any(k[0] == m for k in summary)]
    outputs = OutputFolder(out)
    outputs.check(report_files())  # before writing any: a report is written whole or not at all

    def write_csv(path: Path) -> None:
        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["method", "metric", "mean", "ci95", "n", "better"])
            for (method, metric), (mean, ci, n) in sorted(summary.items()):
                writer.writerow([method, metric, f"{mean:.6f}", f"{ci:.6f}", n, _direction(metric)])

    markdown = _markdown(summary, methods_present, metrics_present, settings) + _model_check_section(summary, settings)
    paired = "".join(_paired(scores, methods_present, metrics_present, pair) for pair in PAIRS)
    paired += _paired_heads(scores)
    with outputs:  # the folder's list of outputs is folded when the report is written
        outputs.write("results.csv", write_csv)
        text = markdown + paired + _sanity_steps(store, methods_present)
        outputs.write("results.md", lambda path: path.write_text(text))
        _plots(store, summary, methods_present, outputs)
    return summary


def _markdown(summary, methods, metrics, settings: Settings) -> str:
    main = [m for m in metrics if m != "head_ablation_auc"]
    lines = [
        f"# gmar evaluate: {settings.model} on {settings.data}",
        "",
        "Mean over items with its 95 % confidence interval (± 1.96 standard errors); **bold**: the best",
        "method per metric (↑ higher is better, ↓ lower is better); n: items with a value.",
        "",
    ]
    if main:
        lines.append("| method | " + " | ".join(f"{m} {_arrow(m)}" for m in main) + " |")
        lines.append("|---|" + "---|" * len(main))
        best = {m: _best(summary, methods, m) for m in main}
        for method in methods:
            cells = []
            for metric in main:
                if (method, metric) not in summary:
                    cells.append("—")
                    continue
                mean, ci, n = summary[(method, metric)]
                text = f"{mean:.3f} ± {ci:.3f}" if ci == ci else f"{mean:.3f}"
                cells.append(f"**{text}**" if method in best[metric] else text)
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        counts = {m: max((summary[(x, m)][2] for x in methods if (x, m) in summary), default=0) for m in main}
        lines += ["", "Items per metric: " + ", ".join(f"{m} {n}" for m, n in counts.items()) + "."]
    heads = [k for k in summary if k[1] == "head_ablation_auc"]
    if heads:
        lines += [
            "",
            "## Head-importance faithfulness",
            "",
            "Heads switched off one by one in the order of a ranking; AUC of the target's probability over the",
            "share removed (↓ lower: the ranking finds the heads that matter first).",
            "",
            "| ranking | head_ablation_auc ↓ | n |",
            "|---|---|---|",
        ]
        for name in R.RANKINGS:
            if (f"heads:{name}", "head_ablation_auc") in summary:
                mean, ci, n = summary[(f"heads:{name}", "head_ablation_auc")]
                lines.append(f"| {name} | {mean:.3f} ± {ci:.3f} | {n} |")
    return "\n".join(lines) + "\n"


def _model_check_section(summary, settings: Settings) -> str:
    """The model check as a markdown section, with a warning line when the model fails it; empty
    when it was not selected."""
    checks = [metric for metric in R.selected(settings.metrics) if metric.unit == "model"]
    if not checks:
        return ""
    lines = ["", "## Model check: does removing an object lower its own class most?", ""]
    rate = summary.get((MODEL_CHECK, "removal_own_drops_most"))
    if rate is None or rate[2] == 0:
        lines.append(
            "Not measured: the check needs data that can re-render a scene without one of its objects and "
            "scenes with several objects (`--data scenes`)."
        )
        return "\n".join(lines) + "\n"
    lines += [
        "Each item of a scene with several objects, re-rendered without its object "
        "(`gmar.eval.scenes.Scenes.without`):",
        "the drop of each present class's logit. The localisation and class-discrimination scores above assume",
        "that the model finds each class on its own object; this measures it.",
        "",
        "| check | mean | n |",
        "|---|---|---|",
    ]
    for metric in checks:
        if (MODEL_CHECK, metric.name) not in summary:
            continue
        mean, ci, n = summary[(MODEL_CHECK, metric.name)]
        label = metric.label or metric.name
        lines.append(f"| {label} | {mean:.3f} ± {ci:.3f} | {n} |" if ci == ci else f"| {label} | {mean:.3f} | {n} |")
    lines.append("")
    lines.append(model_check_verdict(rate[0]))
    return "\n".join(lines) + "\n"


def model_check_verdict(rate: float) -> str:
    """One line on what the model check's rate means for the benchmark's localisation scores."""
    if rate < MODEL_CHECK_WARNING:
        return (
            f"**Warning:** removing an object lowered its own class most in only {rate:.1%} of the removals "
            f"(below {MODEL_CHECK_WARNING:.0%}): this model does not find each class on its own object in this "
            "data, so its maps cannot be scored as right or wrong by the objects' masks; read the localisation "
            "and class-discrimination columns as properties of this model, not of the methods."
        )
    return (
        f"Removing an object lowered its own class most in {rate:.1%} of the removals: the model finds each "
        "class on its own object, as the localisation scores assume."
    )


#: The pairs reported item by item when both were evaluated: the one GMAR's paper compares, and
#: the head-weighted GAE against GAE.
PAIRS = (
    ("gmar", "rollout"),
    ("gmar_gae", "gae"),
    ("transformer_attribution", "gae"),
    ("transformer_attribution", "gmar_gae"),
    ("attnlrp", "gae"),
)


def _paired(
    scores: list[tuple[str, str, str, float | None]],
    methods: list[str],
    metrics: list[str],
    pair: tuple[str, str] = PAIRS[0],
) -> str:
    """``pair[0]`` minus ``pair[1]`` per item (same items, so per-item noise cancels), as a markdown
    section; ``scores`` are the store's rows."""
    first, second = pair
    if first not in methods or second not in methods:
        return ""
    values: dict[str, dict[str, dict[str, float]]] = {}
    for item, method, metric, value in scores:
        if method in pair and value is not None and value == value:
            values.setdefault(metric, {}).setdefault(item, {})[method] = value
    rows = []
    for metric in metrics:
        differences = [v[first] - v[second] for v in values.get(metric, {}).values() if len(v) == 2]
        if len(differences) < 2:
            continue
        mean, ci = M.mean_ci(differences)
        gain = mean if _direction(metric) == "higher" else -mean
        verdict = f"{first} better" if gain > ci else f"{second} better" if gain < -ci else "no clear difference"
        rows.append(f"| {metric} {_arrow(metric)} | {mean:+.4f} ± {ci:.4f} | {len(differences)} | {verdict} |")
    if not rows:
        return ""
    header = [
        "",
        f"## {first} against {second}, item by item",
        "",
        f"The mean of {first}'s score minus {second}'s on the same item, with its 95 % confidence interval;",
        "a difference is clear when the interval excludes 0.",
        "",
        f"| metric | {first} − {second} | n | verdict |",
        "|---|---|---|---|",
    ]
    return "\n".join(header + rows) + "\n"


def _paired_heads(scores: list[tuple[str, str, str, float | None]]) -> str:
    """Each head ranking's ablation AUC minus the oracle's and minus GMAR's, item by item, as a markdown section."""
    values: dict[str, dict[str, float]] = {}
    for item, _, metric, value in scores:
        if metric.startswith("head_ablation_auc[") and value is not None and value == value:
            values.setdefault(item, {})[metric[len("head_ablation_auc[") : -1]] = value

    def cell(name: str, other: str) -> str:
        differences = [v[name] - v[other] for v in values.values() if name in v and other in v]
        if len(differences) < 2 or name == other:
            return "—"
        mean, ci = M.mean_ci(differences)
        return f"{mean:+.3f} ± {ci:.3f}"

    present = [name for name in R.RANKINGS if any(name in v for v in values.values())]
    if "oracle" not in present or "gmar" not in present:
        return ""
    lines = [
        "",
        "## Head rankings against the oracle and GMAR, item by item",
        "",
        "Each ranking's head-ablation AUC minus the oracle's (the measured single-knock-out order) and minus",
        "GMAR's on the same item, with the 95 % confidence interval of the mean difference (↓ lower is better).",
        "",
        "| ranking | − oracle | − gmar |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {cell(name, 'oracle')} | {cell(name, 'gmar')} |" for name in present]
    return "\n".join(lines) + "\n"


def _sanity_steps(store: Store, methods: list[str]) -> str:
    """Mean Spearman correlation per randomisation step and method, as a markdown section."""
    labels = json.loads(store.meta("sanity_steps") or "[]")
    curves: dict[str, list[list[float]]] = {}
    for _, method, curve, values in store.curves():
        if curve == "sanity":
            curves.setdefault(method, []).append(values)
    if not labels or not curves:
        return ""
    lines = [
        "",
        "## Sanity: cascading randomisation, step by step",
        "",
        "Spearman correlation of the map with the original after randomising from the head down to each step",
        "(↓ lower: the map depends on what the model learned).",
        "",
        "| method | " + " | ".join(labels) + " |",
        "|---|" + "---|" * len(labels),
    ]
    for method in methods:
        if method in curves:
            means = np.nanmean(np.array(curves[method], dtype=float), axis=0)
            lines.append(f"| {method} | " + " | ".join(f"{v:.3f}" for v in means) + " |")
    return "\n".join(lines) + "\n"


def _direction(metric: str) -> str:
    return R.METRICS[metric].direction


def _arrow(metric: str) -> str:
    return "↑" if _direction(metric) == "higher" else "↓"


def _best(summary, methods, metric) -> set[str]:
    """The methods with the best mean (all of them when tied)."""
    values = {m: summary[(m, metric)][0] for m in methods if (m, metric) in summary}
    values = {m: v for m, v in values.items() if v == v}
    if not values:
        return set()
    best = max(values.values()) if _direction(metric) == "higher" else min(values.values())
    return {m for m, v in values.items() if abs(v - best) <= 1e-12}


def _plots(store: Store, summary, methods, out: OutputFolder) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    for group, names in R.groups().items():
        names = [n for n in names if any((m, n) in summary for m in methods)]
        if not names or group in UNPLOTTED:
            continue
        figure, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.2), squeeze=False)
        for axis, name in zip(axes[0], names, strict=True):
            present = [m for m in methods if (m, name) in summary]
            means = [summary[(m, name)][0] for m in present]
            errors = [0 if summary[(m, name)][1] != summary[(m, name)][1] else summary[(m, name)][1] for m in present]
            axis.bar(range(len(present)), means, yerr=errors, color="tab:blue", capsize=3)
            axis.set_xticks(range(len(present)), present, rotation=45, ha="right", fontsize=8)
            axis.set_title(f"{name} {_arrow(name)}", fontsize=9)
        figure.tight_layout()
        out.write(f"{group}.png", lambda path, figure=figure: figure.savefig(path, dpi=100))
        plt.close(figure)
    curves: dict[tuple[str, str], list[list[float]]] = {}
    for _, method, curve, values in store.curves():
        curves.setdefault((curve, method), []).append(values)
    kinds = [("deletion", "deletion (↓ area)"), ("insertion", "insertion (↑ area)")]
    if any(k[0] in dict(kinds) for k in curves):
        figure, axes = plt.subplots(1, 2, figsize=(9, 3.5))
        for axis, (kind, title) in zip(axes, kinds, strict=True):
            for method in methods:
                if (kind, method) in curves:
                    mean = np.mean(np.array(curves[(kind, method)]), axis=0)
                    axis.plot(np.linspace(0, 1, len(mean)), mean, label=method)
            axis.set_xlabel("fraction of pixels")
            axis.set_ylabel("target probability")
            axis.set_title(title, fontsize=9)
        axes[0].legend(fontsize=7)
        figure.tight_layout()
        out.write("deletion_insertion.png", lambda path, figure=figure: figure.savefig(path, dpi=100))
        plt.close(figure)
    ablations = {k[0]: v for k, v in curves.items() if k[0].startswith("head_ablation[")}
    if ablations:
        figure, axis = plt.subplots(figsize=(4.5, 3.5))
        for kind, values in ablations.items():
            mean = np.mean(np.array(values), axis=0)
            axis.plot(np.linspace(0, 1, len(mean)), mean, label=kind[len("head_ablation[") : -1])
        axis.set_xlabel("fraction of heads removed")
        axis.set_ylabel("target probability")
        axis.set_title("head ablation (↓ area)", fontsize=9)
        axis.legend(fontsize=7)
        figure.tight_layout()
        out.write("head_ablation.png", lambda path, figure=figure: figure.savefig(path, dpi=100))
        plt.close(figure)
