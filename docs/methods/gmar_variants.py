"""The research tables of gmar.md: head scores and gmar_gae options on the reference benchmark, paired
per item. Run: python docs/methods/gmar_variants.py 250  (scenes; prints markdown, writes the per-item values)."""

import json
import sys
import time

import torch
from torch.nn.utils.rnn import pad_sequence

import gmar
from gmar.adapters import get_adapter
from gmar.eval import metrics as M
from gmar.eval.datasets import scene_items
from gmar.eval.registry import item_seed

torch.set_num_threads(1)  # as measured: one thread, beside other work
scenes = int(sys.argv[1]) if len(sys.argv) > 1 else 100
model = gmar.load_reference_model()
adapter = get_adapter(model)
items = scene_items(scenes)
scorer = M.Scorer(model, multi_label=True, batch_size=64)
VARIANTS = {
    "gae": ("gae", {}),
    "gmar_gae": ("gmar_gae", {}),
    "gmar_gae[no weights]": ("gmar_gae", {"head_weights": False}),
    "gmar_gae[rectified]": ("gmar_gae", {"signed": False}),
    "gmar": ("gmar", {}),
    "gmar[taylor]": ("gmar", {"head_score": "taylor"}),
}
res = {k: {m: [] for m in ("deletion", "pointing", "energy", "discrimination")} for k in VARIANTS}
heads = {
    k: []
    for k in (
        "gmar[weights]",
        "gmar[scores]",
        "taylor[signed]",
        "taylor[abs]",
        "taylor[weights]",
        "gmar_gae[scores]",
        "gmar_gae[weights]",
        "oracle",
        "random",
        "reverse",
    )
}
spearman = {k: [] for k in ("gmar[weights]", "taylor[signed]", "taylor[abs]", "gmar_gae[scores]")}
start = time.time()
for s in range(0, len(items), 16):
    chunk = items[s : s + 16]
    images = torch.stack([i.image for i in chunk])
    targets = torch.tensor([i.target for i in chunk])
    masks = torch.stack([i.mask for i in chunk])
    several = [j for j, i in enumerate(chunk) if i.others is not None]
    exps = {}
    for name, (method, opts) in VARIANTS.items():
        e = gmar.explain(model, images, method, target=targets, **opts)
        exps[name] = e
        h = e.heatmap
        res[name]["deletion"] += M.deletion(scorer, images, h, targets, 20, 0.0)[0].tolist()
        res[name]["pointing"] += M.pointing_game(h, masks, 15 * 64 / 224).tolist()
        res[name]["energy"] += M.energy_pointing_game(h, masks).tolist()
        disc = torch.full((len(chunk),), float("nan"))
        if several:
            others = pad_sequence([chunk[j].others for j in several], batch_first=True)
            disc[several] = M.class_discrimination(h[several], masks[several], others)
        res[name]["discrimination"] += disc.tolist()
    drops = M.knockout_drops(scorer, adapter, images, targets)
    t = exps["gmar[taylor]"].head_scores.flatten(1)
    rankings = {
        "gmar[weights]": M.rank_heads(exps["gmar"].head_weights),
        "gmar[scores]": M.rank_heads(exps["gmar"].head_scores),
        "taylor[signed]": M.rank_heads(t),
        "taylor[abs]": M.rank_heads(t.abs()),
        "taylor[weights]": M.rank_heads(exps["gmar[taylor]"].head_weights),
        "gmar_gae[scores]": M.rank_heads(exps["gmar_gae"].head_scores),
        "gmar_gae[weights]": M.rank_heads(exps["gmar_gae"].head_weights),
        "oracle": M.rank_heads(drops),
    }
    gens = [torch.Generator().manual_seed(item_seed(0, i.key)) for i in chunk]
    rankings["random"] = torch.stack([torch.randperm(16, generator=g) for g in gens])
    rankings["reverse"] = rankings["gmar[weights]"].flip(1)
    for k, r in rankings.items():
        heads[k] += M.head_ablation(scorer, adapter, images, targets, r)[0].tolist()
    for k, v in (
        ("gmar[weights]", exps["gmar"].head_weights.flatten(1)),
        ("taylor[signed]", t),
        ("taylor[abs]", t.abs()),
        ("gmar_gae[scores]", exps["gmar_gae"].head_scores.flatten(1)),
    ):
        spearman[k] += M.spearman(v, drops).tolist()
    print(f"{s + len(chunk)}/{len(items)} {time.time() - start:.0f}s", file=sys.stderr, flush=True)


def paired(a, b):
    d = [x - y for x, y in zip(a, b) if x == x and y == y]
    return M.mean_ci(d)


out = {"maps": {}, "heads": {}, "spearman": {}}
print(f"## {len(items)} items ({scenes} scenes)")
print("| variant | deletion ↓ | pointing ↑ | energy ↑ | discrimination ↑ |\n|---|---|---|---|---|")
for k in VARIANTS:
    print(f"| {k} | " + " | ".join("%.3f ± %.3f" % M.mean_ci(res[k][m]) for m in res[k]) + " |")
print("\nPaired against gae:\n| variant | deletion | pointing | energy | discrimination |\n|---|---|---|---|---|")
for k in VARIANTS:
    print(f"| {k} − gae | " + " | ".join("%+.3f ± %.3f" % paired(res[k][m], res["gae"][m]) for m in res[k]) + " |")
print(
    "\n| ranking | head_ablation_auc ↓ | − oracle | − gmar[weights] | Spearman with knock-out drops |\n|---|---|---|---|---|"
)
for k in heads:
    sp = "%.2f" % M.mean_ci(spearman[k])[0] if k in spearman else "—"
    print(
        f"| {k} | %.3f ± %.3f | %+.3f ± %.3f | %+.3f ± %.3f | {sp} |"
        % (*M.mean_ci(heads[k]), *paired(heads[k], heads["oracle"]), *paired(heads[k], heads["gmar[weights]"]))
    )
json.dump({"res": res, "heads": heads, "spearman": spearman}, open(f"gmar_variants_{scenes}.json", "w"))
