"""``gmar demo``: the whole pipeline offline on the shipped reference ViT and the synthetic scenes."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from gmar import viz
from gmar.adapters import get_adapter
from gmar.eval.datasets import scene_items
from gmar.eval.harness import Settings, evaluate
from gmar.eval.reference import load_reference_model
from gmar.eval.registry import select_metrics
from gmar.eval.report import report, report_files
from gmar.eval.scenes import CLASSES, Scenes
from gmar.frontends import common
from gmar.methods import explain, methods_for
from gmar.outputs import OutputFolder

#: the test scenes shown in the figure
SHOWN = (0, 1, 2, 3)


def demo(out: Path, scenes: int = 100) -> list[str]:
    """Write the figure, a head-weights picture per method with head weights (``gmar_heads.png``,
    ``gmar_gae_heads.png``) and the evaluation table; return what was written."""
    start = time.perf_counter()
    outputs = OutputFolder(out)
    outputs.check(["scenes.png"])
    OutputFolder(out / "evaluation").check(report_files())  # before the work, not after it
    model = load_reference_model()
    methods = methods_for(model)
    size = get_adapter(model).preprocess_config().input_size[0]
    test = Scenes("test", max(SHOWN) + 1, image_size=size)
    rows = [(test[i], cls) for i in SHOWN for cls in test[i].classes]
    images = torch.stack([scene.image for scene, _ in rows])
    targets = torch.tensor([cls for _, cls in rows])
    explanations = explain(model, images, methods, target=targets)  # one shared pass
    # the explained methods that weight heads: their pictures' names are checked before anything is written
    heads = common.head_weighted(explanations)
    outputs.check([common.heads_file(method) for method in heads])
    probabilities = common.probabilities(next(iter(explanations.values())).logits, multi_label=True)
    row_titles = [
        f"scene {scene.index}: {common.class_label(CLASSES, cls)} (p={probabilities[i, cls]:.2f})"
        for i, (scene, cls) in enumerate(rows)
    ]
    figure = viz.method_grid(images, explanations, row_titles=row_titles)
    columns = len(methods) + 1
    for i, (scene, cls) in enumerate(rows):  # outline the explained object in every panel of its row
        for axis in figure.axes[i * columns : (i + 1) * columns]:
            axis.contour(scene.masks[cls].float().numpy(), levels=[0.5], colors="white", linewidths=0.8)
    outputs.write("scenes.png", lambda path: viz.save(figure, path))
    for method in heads:
        picture = common.head_weights_figure(explanations, method, 0, row_titles[0])
        outputs.write(common.heads_file(method), lambda path, picture=picture: viz.save(picture, path))
    outputs.close()

    settings = Settings(
        model="reference",
        data="scenes",
        methods=methods,
        metrics=select_metrics("all"),
        limit=scenes,
        steps=10,
        sanity_items=8,
        multi_label=True,
    )
    evaluation = out / "evaluation"
    store = evaluate(model, scene_items(scenes, image_size=size), settings, evaluation, batch_size=32)
    report(store, settings, evaluation)
    store.close()
    seconds = time.perf_counter() - start
    return [
        f"explained {len(SHOWN)} test scenes, one row per object: {out / 'scenes.png'}",
        *(f"{method}'s layers x heads weights: {out / common.heads_file(method)}" for method in heads),
        f"evaluation of {len(methods)} methods on {scenes} scenes: {evaluation / 'results.md'} "
        f"(per image in {evaluation / 'results.sqlite'}, plots beside it)",
        f"done in {seconds:.0f} s",
    ]
