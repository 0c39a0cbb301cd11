"""``gmar app``: a web page (gradio) to explain an image, compare methods and look inside every head.

Thin, like the command line: it reads the image and the choices on the page, calls
:func:`gmar.explain` once for every checked method and :func:`gmar.head_attention` for the head
view, and draws what they return. The event behind the Explain button is also the named API
endpoint ``explain`` (see the README), so a script can ask the page what a person would.
"""

import math
import os
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import nn

from gmar import viz
from gmar.adapters import get_adapter
from gmar.capture import model_lock
from gmar.errors import GmarError, ImageLoadError
from gmar.explanation import Explanation, min_max, upsample
from gmar.frontends import common
from gmar.layout import TokenLayout
from gmar.loading import LoadedModel
from gmar.methods import explain, head_attention, methods_for
from gmar.preprocess import PreprocessConfig, denormalise, load_image, preprocess

#: the shorter side, in pixels, that pictures are drawn at on the page (small inputs are enlarged)
DISPLAY = 256
#: no side of a picture is enlarged beyond this many pixels (a thin picture keeps its size)
LONGEST = 4 * DISPLAY
#: the margins of the head-weights picture, for the layer and head labels (and the page's own label)
LEFT, TOP = 40, 44
#: how many of the model's best classes the page offers as targets
TOP_K = 5
#: pyplot keeps global state: figures are drawn one at a time, whichever request asks
_PYPLOT = threading.Lock()


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the page (``gmar app --max-upload-mb``, ``--max-pixels``, ``--max-prompts``).

    Attributes:
        max_upload_mb: the largest upload, in MB (2**20 bytes); gradio refuses a larger file as it arrives.
        max_pixels: the most pixels an image may have, read from its header before it is decoded.
        max_prompts: the most text prompts one explanation takes (CLIP-style models).
    """

    max_upload_mb: int = 20
    max_pixels: int = 40_000_000
    max_prompts: int = 16


@dataclass
class Served:
    """A model as the page serves it: how to feed it, name its classes and what it can show.

    Attributes:
        model: the model, in eval mode.
        preprocess: how images become its input.
        class_names: a name per class, or None (classes are shown by index).
        spec: how the model was named (``reference``, ``timm:...``).
        multi_label: class probabilities are sigmoids (the reference model), not a softmax.
        tokenizer: text prompts' tokenizer for CLIP-style models; None for classifiers.
        examples: ``(image file, caption)`` pairs the page offers.
        methods: the methods defined for this model (:func:`gmar.methods.methods_for`), in its order.
        head_grid: ``(layers, heads)`` of the head view; None when the model has no readout rows.
        limits: what one request may ask (:class:`Limits`).
    """

    model: nn.Module
    preprocess: PreprocessConfig
    class_names: list[str] | None
    spec: str
    multi_label: bool = False
    tokenizer: Any = None
    examples: list[tuple[Path, str]] = field(default_factory=list)
    methods: list[str] = field(default_factory=list)
    head_grid: tuple[int, int] | None = None
    limits: Limits = field(default_factory=Limits)

    @property
    def is_classifier(self) -> bool:
        return get_adapter(self.model).is_classifier


def serve_reference(model: nn.Module, folder: Path, scenes: int = 6) -> Served:
    """The reference ViT with the first ``scenes`` test scenes, written into ``folder``, as examples."""
    from gmar.eval.scenes import CLASSES, Scenes

    adapter = get_adapter(model)
    size = adapter.preprocess_config().input_size[0]
    examples = []
    for scene in Scenes("test", scenes, image_size=size):
        path = folder / f"scene_{scene.index}.png"
        pixels = (scene.image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(pixels).save(path)
        examples.append((path, f"test scene {scene.index}: " + ", ".join(CLASSES[c] for c in scene.classes)))
    served = Served(model, adapter.preprocess_config(), list(CLASSES), "reference", multi_label=True)
    return _described(served, examples)


def serve_loaded(loaded: LoadedModel) -> Served:
    """A model from :func:`gmar.load_model`, with the example photos shipped with gmar."""
    from importlib import resources

    folder = resources.files("gmar") / "assets"
    examples = [(Path(str(folder / f"example_{name}.png")), f"example: {name}") for name in ("shapes", "stripes")]
    served = Served(
        loaded.model, loaded.preprocess, loaded.class_names, loaded.spec, tokenizer=loaded.extras.get("tokenizer")
    )
    return _described(served, examples)


def _described(served: Served, examples: list[tuple[Path, str]]) -> Served:
    """``served`` with its examples, its methods and the size of its head view."""
    served.examples = examples
    served.methods = methods_for(served.model)
    try:
        size = served.preprocess.input_size
        parameter = next(served.model.parameters())
        blank = torch.zeros(1, 3, *size, device=parameter.device, dtype=parameter.dtype)
        served.head_grid = tuple(head_attention(served.model, blank).shape[1:3])  # type: ignore[assignment]
    except GmarError:  # no readout rows (attention pooling) or no global attention: no head view
        served.head_grid = None
    return served


# ------------------------------------------------------------------------------------------- what is shown


@dataclass
class Result:
    """One explanation as the page keeps it for the head view (a session's state)."""

    pixels: torch.Tensor  # (3, H, W) in [0, 1]: the model's input, as it saw it
    explanations: dict[str, Explanation]
    rows: list[str]  # what each row of the batch explains: a class or a prompt
    head_maps: torch.Tensor | None  # (L, H, h, w), or None without a head view
    layout: TokenLayout


def read_image(path: str | Path | None, max_pixels: int | None = None) -> Image.Image:
    """The uploaded file as an RGB picture; a message for the page when it is none, or when its header
    says it has more than ``max_pixels`` pixels (checked before anything is decoded)."""
    if path is None:
        raise GmarError("no image: upload one or click an example")
    name = Path(path).name  # name the file as the user knows it, not the server's copy
    if max_pixels is not None:
        size = _header_size(path)
        if size is not None and (size[0] * size[1] if size[1] else size[0]) > max_pixels:
            pixels = f"{size[0]} x {size[1]}" if size[1] else str(size[0])
            raise ImageLoadError(
                f"{name}: too large: {pixels} pixels, above the page's limit of {max_pixels} (gmar app --max-pixels)"
            )
    try:
        return load_image(path)
    except ImageLoadError as error:
        raise ImageLoadError(str(error).replace(str(path), name)) from None


def _header_size(path: str | Path) -> tuple[int, int] | None:
    """``(width, height)`` from the file's header, ``(pixels, 0)`` when Pillow refuses it as a
    decompression bomb, None when it is no image (then :func:`gmar.preprocess.load_image` says why)."""
    import re
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                return image.size
    except Image.DecompressionBombError as error:
        count = re.search(r"\((\d+) pixels\)", str(error))
        return (int(count.group(1)), 0) if count else None
    except (OSError, ValueError, SyntaxError):
        return None


def model_input(served: Served, image: Image.Image) -> torch.Tensor:
    """``(1, 3, H, W)`` as the model takes it (:func:`gmar.preprocess.preprocess` crops before it
    resizes, so a thin image allocates about the input's size, not its whole length)."""
    return preprocess(image, served.preprocess)


def top_classes(served: Served, batch: torch.Tensor, k: int = TOP_K) -> list[tuple[int, str, float]]:
    """The model's ``k`` most probable classes for one image: ``(index, name, probability)``."""
    adapter = get_adapter(served.model)
    parameter = next(served.model.parameters())
    # another request may have the model instrumented: its lock keeps this forward out of that pass
    with model_lock(served.model), torch.no_grad():
        logits = adapter.forward(batch.to(device=parameter.device, dtype=parameter.dtype))[0].float().cpu()
    values, indices = common.probabilities(logits[None], served.multi_label)[0].topk(min(k, logits.numel()))
    return [
        (int(i), common.class_label(served.class_names, int(i)), float(p)) for p, i in zip(values, indices, strict=True)
    ]


def parse_prompts(text: str | None) -> list[str]:
    """One prompt per non-empty line."""
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


def explain_image(
    served: Served,
    path: str | Path | None,
    methods: Sequence[str],
    target: float | int | None = None,
    prompts: str | None = None,
) -> Result:
    """Every method in ``methods`` for the uploaded image, from one :func:`gmar.explain` call.

    ``target`` is a class index (None: the predicted class) for classifiers; ``prompts`` (one per
    line) is what a CLIP-style model is explained for. Wrong choices raise :class:`GmarError`.
    """
    methods = list(methods or [])
    if not methods:
        raise GmarError("choose at least one method")
    unknown = [m for m in methods if m not in served.methods]
    if unknown:
        raise GmarError(f"{', '.join(unknown)} cannot explain {served.spec}; choose from {', '.join(served.methods)}")
    texts = parse_prompts(prompts)
    if len(texts) > served.limits.max_prompts:
        raise GmarError(
            f"{len(texts)} prompts: the page explains at most {served.limits.max_prompts} at once"
            " (gmar app --max-prompts)"
        )
    chosen = _target(served, target, texts)
    batch = model_input(served, read_image(path, served.limits.max_pixels))
    explanations = explain(served.model, batch, methods, target=chosen)
    assert isinstance(explanations, dict)
    first = next(iter(explanations.values()))
    if texts:
        scores = [None] * len(texts) if first.scores is None else first.scores.tolist()
        rows = [f'"{prompt}"' + ("" if s is None else f" ({s:.3f})") for prompt, s in zip(texts, scores, strict=True)]
    else:
        index = int(first.target[0])  # type: ignore[index]
        shown = common.probabilities(first.logits, served.multi_label)
        rows = [f"{common.class_label(served.class_names, index)}, p={float(shown[0, index]):.2f}"]
    head_maps = head_attention(served.model, batch)[0].cpu() if served.head_grid is not None else None
    pixels = denormalise(batch, served.preprocess)[0].cpu()
    return Result(pixels, explanations, rows, head_maps, first.layout)


def _target(served: Served, target: float | int | None, prompts: list[str]) -> Any:
    if served.is_classifier:
        if prompts:
            raise GmarError(
                f"{served.spec} is a classifier: text prompts are for CLIP-style models; pick a class instead"
            )
        if target is None:
            return None
        if float(target) != int(target):
            raise GmarError(f"a class is a whole number, not {target}")
        return int(target)
    if target is not None:
        raise GmarError(f"{served.spec} compares images with text: explain it with text prompts, not a class index")
    if not prompts:
        raise GmarError(f"{served.spec} compares images with text: write at least one prompt")
    return common.text_target(served.model, served.tokenizer, prompts, served.spec)


def enlarged(picture: np.ndarray) -> np.ndarray:
    """An ``(H, W, 3)`` float picture in [0, 1] as uint8, enlarged by a whole factor to about :data:`DISPLAY`
    (no side beyond :data:`LONGEST`)."""
    pixels = (np.clip(picture, 0.0, 1.0) * 255).round().astype(np.uint8)
    factor = max(1, min(math.ceil(DISPLAY / min(pixels.shape[:2])), LONGEST // max(pixels.shape[:2])))
    return pixels.repeat(factor, axis=0).repeat(factor, axis=1) if factor > 1 else pixels


def overlays(result: Result) -> list[tuple[np.ndarray, str]]:
    """Each method's heatmap over the image, one per method and row, with a caption."""
    pictures = []
    for row, what in enumerate(result.rows):
        for method, explanation in result.explanations.items():
            picture = viz.overlay(result.pixels, explanation.heatmap[row].cpu())
            pictures.append((enlarged(picture), f"{method}: {what}"))
    return pictures


def head_methods(result: Result) -> list[str]:
    """The methods of ``result`` whose explanation has head weights (``gmar``, ``gmar_gae``), in its order."""
    return common.head_weighted(result.explanations)


def head_weights(result: Result, method: str | None = None) -> dict | None:
    """The head weights ``(rows, L, H)`` of every method that has them, with what each row explains;
    None when no such method ran.

    ``"method"`` and ``"head_weights"`` are the shown method's: ``method`` when it has head weights,
    else the first that has; ``"methods"`` maps each such method to its weights.
    """
    names = head_methods(result)
    if not names:
        return None
    weights = {name: result.explanations[name].head_weights.float().cpu().tolist() for name in names}  # type: ignore[union-attr]
    shown = method if method in weights else names[0]
    return {"rows": result.rows, "method": shown, "head_weights": weights[shown], "methods": weights}


def cell_size(grid: tuple[int, int]) -> int:
    """The side in pixels of one layer x head cell: large for a few heads, smaller for many."""
    return min(48, max(28, 400 // max(grid)))


def cell_box(layer: int, head: int, grid: tuple[int, int]) -> tuple[int, int, int, int]:
    """Where :func:`heads_picture` draws cell ``(layer, head)``: ``(left, top, right, bottom)``, inclusive."""
    cell = cell_size(grid)
    left, top = LEFT + head * cell, TOP + layer * cell
    return left, top, left + cell - 1, top + cell - 1


def heads_picture(weights: torch.Tensor | None, selected: tuple[int, int] | None, grid: tuple[int, int]) -> np.ndarray:
    """The layers x heads weights ``(L, H)`` as cells (layer 0 at the top, head 0 at the left), each
    with its weight, the selected cell outlined; all grey without weights (see :func:`cell_box`)."""
    layers, heads = grid
    right, bottom = cell_box(layers - 1, heads - 1, grid)[2:]
    picture = Image.new("RGB", (right + 3, bottom + 3), "white")
    draw = ImageDraw.Draw(picture)
    font = ImageFont.load_default()
    if weights is not None:
        values = weights.float().cpu().numpy()
        span = float(values.max() - values.min())
        scaled = (values - values.min()) / span if span > 0 else np.zeros_like(values)
        colours = (viz.plt.get_cmap("viridis")(scaled)[..., :3] * 255).round().astype(int)
    for layer in range(layers):
        for head in range(heads):
            box = cell_box(layer, head, grid)
            colour = tuple(colours[layer, head]) if weights is not None else (200, 200, 200)
            draw.rectangle(box, fill=colour)
            if weights is not None:  # the weight itself, dark on light cells and light on dark ones
                ink = "black" if sum(colour) > 3 * 140 else "white"
                middle = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
                draw.text(middle, f"{values[layer, head]:.2f}", fill=ink, font=font, anchor="mm")
        draw.text((LEFT - 6, (cell_box(layer, 0, grid)[1] + cell_box(layer, 0, grid)[3]) / 2), f"L{layer}",
                  fill="black", font=font, anchor="rm")  # fmt: skip
    for head in range(heads):
        box = cell_box(0, head, grid)
        draw.text(((box[0] + box[2]) / 2, TOP - 4), f"h{head}", fill="black", font=font, anchor="mb")
    if selected is not None:
        box = cell_box(*selected, grid)
        draw.rectangle(box, outline="white", width=3)
        draw.rectangle((box[0] - 1, box[1] - 1, box[2] + 1, box[3] + 1), outline="black", width=1)
    return np.asarray(picture)


def head_at(x: float, y: float, grid: tuple[int, int]) -> tuple[int, int] | None:
    """The ``(layer, head)`` of the cell of :func:`heads_picture` at pixel ``(x, y)``; None outside."""
    cell = cell_size(grid)
    layer, head = math.floor((y - TOP) / cell), math.floor((x - LEFT) / cell)
    if 0 <= layer < grid[0] and 0 <= head < grid[1]:
        return layer, head
    return None


def head_view(result: Result, layer: int, head: int, method: str | None = None) -> tuple[np.ndarray, str]:
    """Head ``head`` of layer ``layer``: its attention from the readout over the image, and a caption
    with its weight in ``method`` (see :func:`head_weights`: the first method with head weights by default)."""
    assert result.head_maps is not None
    token_map = result.head_maps[layer, head][None]
    heat = min_max(upsample(token_map, result.layout, tuple(result.pixels.shape[-2:])))[0]
    caption = f"layer {layer}, head {head}: attention from the readout token"
    weights = head_weights(result, method)
    if weights is not None:
        caption += f"; {weights['method']} weight {weights['head_weights'][0][layer][head]:.3f}"
        if len(result.rows) > 1:
            caption += f" for {result.rows[0]}"
    return enlarged(viz.overlay(result.pixels, heat)), caption


def write_downloads(result: Result, folder: Path) -> tuple[list[str], str]:
    """Each method's heatmap as ``METHOD.npy`` (``(H, W)``, or ``(prompts, H, W)``) and the figure as PNG."""
    folder.mkdir(parents=True, exist_ok=True)
    maps = []
    for method, explanation in result.explanations.items():
        heatmap = explanation.heatmap.float().cpu().numpy()
        path = folder / f"{method}.npy"
        np.save(path, heatmap[0] if len(result.rows) == 1 else heatmap)
        maps.append(str(path))
    images = result.pixels[None].expand(len(result.rows), *result.pixels.shape)
    columns = {m: [f"{m}: {what}" for what in result.rows] for m in result.explanations}
    with _PYPLOT:
        figure = viz.method_grid(images, result.explanations, row_titles=result.rows, column_titles=columns)
        viz.save(figure, folder / "gmar_figure.png")
    return maps, str(folder / "gmar_figure.png")


# -------------------------------------------------------------------------------------------------- the page


class Downloads:
    """A folder per request under one root, named by 128 random bits (a URL no other user can guess);
    folders older than ``keep_s`` go when a new one is made."""

    def __init__(self, root: Path, keep_s: float = 3600.0) -> None:
        self.root, self.keep_s = root, keep_s
        self._lock = threading.Lock()

    def new(self) -> Path:
        with self._lock:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            now = time.time()
            for old in self.root.iterdir():
                if now - old.stat().st_mtime > self.keep_s:
                    shutil.rmtree(old, ignore_errors=True)
            folder = self.root / secrets.token_urlsafe(16)
            folder.mkdir(mode=0o700)
            return folder


def build_page(served: Served, workdir: Path):
    """The gradio page for ``served``; its Explain event is the API endpoint ``explain``."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    downloads = Downloads(workdir / "downloads")
    grid = served.head_grid
    classifier = served.is_classifier

    def fail(error: Exception) -> gr.Error:
        return gr.Error(str(error), print_exception=False)

    def on_image(path):
        if path is None:
            return None, gr.update(choices=[], value=None), None
        try:
            batch = model_input(served, read_image(path, served.limits.max_pixels))
        except GmarError as error:
            raise fail(error) from None
        preview = enlarged(denormalise(batch, served.preprocess)[0].permute(1, 2, 0).numpy())
        if not classifier:
            return preview, gr.update(choices=[], value=None), None
        best = top_classes(served, batch)
        choices = [(f"{name}: p={p:.2f}", index) for index, name, p in best]
        return preview, gr.update(choices=choices, value=best[0][0]), best[0][0]

    def on_explain(path, methods, target, prompts):
        try:
            result = explain_image(served, path, methods, target, prompts)
            maps, figure = write_downloads(result, downloads.new())
        except GmarError as error:
            raise fail(error) from None
        weights = head_weights(result)
        first = None if weights is None else torch.tensor(weights["head_weights"][0])
        picture = heads_picture(first, None, grid) if grid is not None else None
        return overlays(result), weights, maps, figure, picture, result

    def on_methods(result, method):
        """The head-weights picker offers the explained methods that weight heads, keeping its choice."""
        names = [] if result is None else head_methods(result)
        return gr.update(choices=names, value=method if method in names else (names[0] if names else None))

    def on_head(result, layer, head, method):
        if result is None or grid is None or result.head_maps is None:
            return None, "explain an image first", None
        layer, head = int(layer), int(head)
        picture, caption = head_view(result, layer, head, method)
        weights = head_weights(result, method)
        first = None if weights is None else torch.tensor(weights["head_weights"][0])
        return picture, caption, heads_picture(first, (layer, head), grid)

    def on_cell(event: gr.SelectData):
        cell = None if grid is None else head_at(*event.index, grid)
        if cell is None:
            return gr.update(), gr.update()
        return cell[0], cell[1]

    def on_example(event: gr.SelectData):
        return str(served.examples[event.index][0])

    theme = gr.themes.Default(
        font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]
    )
    with gr.Blocks(title=f"gmar: {served.spec}", analytics_enabled=False, delete_cache=(3600, 3600)) as page:
        gr.Markdown(
            f"## gmar: why does `{served.spec}` see what it sees?\n"
            "Upload an image or click an example, choose what to explain and the methods, then **Explain**. "
            "Below, the layers × heads weights of a method that weights heads (GMAR, gmar_gae): click a cell "
            "(or move the sliders) to see what that head attends to."
        )
        with gr.Row():
            with gr.Column(scale=1):
                image_file = gr.File(label="image", file_types=["image"], type="filepath", elem_id="image-file")
                examples = gr.Gallery(
                    [(str(path), caption) for path, caption in served.examples],
                    label="examples: click one",
                    columns=3,
                    height=290,
                    allow_preview=False,
                    object_fit="contain",
                    buttons=[],
                    elem_id="examples",
                )
                preview = gr.Image(
                    label="what the model sees", interactive=False, format="png", buttons=[], elem_id="preview"
                )
            with gr.Column(scale=2):
                with gr.Row(visible=classifier):
                    best = gr.Dropdown(label=f"top-{TOP_K} classes", choices=[], elem_id="top-classes")
                    # no precision: gradio would round 2.5 to 2; explain_image refuses it instead
                    target = gr.Number(
                        label="class index (empty: the predicted class)", minimum=0, step=1, elem_id="target"
                    )
                prompts = gr.Textbox(
                    label="text prompts, one per line",
                    lines=3,
                    visible=not classifier,
                    elem_id="prompts",
                )
                methods = gr.CheckboxGroup(served.methods, value=served.methods, label="methods", elem_id="methods")
                run = gr.Button("Explain", variant="primary", elem_id="explain")
                overlay_gallery = gr.Gallery(
                    label="overlays",
                    columns=4,
                    height=420,
                    format="png",
                    object_fit="contain",
                    buttons=["download", "fullscreen"],
                    elem_id="overlays",
                )
                with gr.Row():
                    maps = gr.File(
                        label="maps (.npy, one per method)", file_count="multiple", height=170, elem_id="maps"
                    )
                    figure = gr.File(label="figure (PNG)", elem_id="figure")
        with gr.Row(visible=grid is not None):
            with gr.Column():
                heads_method = gr.Radio(
                    [], label="head weights of (the explained methods that weight heads)", elem_id="heads-method"
                )
                picture = gr.Image(
                    label="head weights (rows: layers, columns: heads): click a cell",
                    interactive=False,
                    format="png",
                    buttons=[],
                    elem_id="head-weights",
                )
                with gr.Accordion("head weights as numbers", open=False):
                    weights_json = gr.JSON(label="head weights", elem_id="head-weights-json")
            with gr.Column():
                layers, heads = grid or (1, 1)
                layer = gr.Slider(0, layers - 1, value=layers - 1, step=1, label="layer", elem_id="layer")
                head = gr.Slider(0, heads - 1, value=0, step=1, label="head", elem_id="head")
                head_image = gr.Image(
                    label="head view", interactive=False, format="png", buttons=["download"], elem_id="head-view"
                )
                head_caption = gr.Markdown(elem_id="head-caption")
        if grid is None:
            gr.Markdown(f"`{served.spec}` has no readout token (or no global attention), so there is no head view.")
        state = gr.State()

        examples.select(on_example, None, image_file, api_visibility="private")
        image_file.change(on_image, image_file, [preview, best, target], api_visibility="private")
        best.input(lambda index: index, best, target, api_visibility="private")
        run.click(
            on_explain,
            [image_file, methods, target, prompts],
            [overlay_gallery, weights_json, maps, figure, picture, state],
            api_name="explain",
            concurrency_limit=2,
        ).then(on_methods, [state, heads_method], heads_method, api_visibility="private").then(
            on_head, [state, layer, head, heads_method], [head_image, head_caption, picture], api_visibility="private"
        )
        picture.select(on_cell, None, [layer, head], api_visibility="private")
        head_inputs, head_outputs = [state, layer, head, heads_method], [head_image, head_caption, picture]
        for slider in (layer, head):
            slider.change(on_head, head_inputs, head_outputs, api_visibility="private")
        heads_method.input(on_head, head_inputs, head_outputs, api_visibility="private")
    page.queue(max_size=64)
    return page, theme


def require_gradio() -> None:
    """Refuse, with what to install, a machine without gradio (before the model loads)."""
    import importlib.util

    if importlib.util.find_spec("gradio") is None:
        raise GmarError("gmar app needs gradio: pip install 'gmar[app]'")


def check_port(host: str, port: int) -> None:
    """Refuse, with what to do, an address the page cannot be served on (before the model loads)."""
    import errno
    import socket

    if not 1 <= port <= 65535:
        raise GmarError(f"--port must be in [1, 65535], not {port}")
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except (socket.gaierror, UnicodeError):
        raise GmarError(f"--host {host} is not an address or a name of this machine: pass another --host") from None
    try:
        with socket.socket(family) as probe:
            probe.bind((host, port))
    except OSError as error:
        if error.errno == errno.EADDRNOTAVAIL:
            raise GmarError(f"--host {host} is not an address of this machine: pass another --host") from None
        raise GmarError(f"cannot serve on {host}:{port} ({error.strerror or error}): pass another --port") from None


@contextmanager
def private_folder(prefix: str = "gmar-app-") -> Iterator[Path]:
    """A new folder in the temporary directory that only this user can enter (0700), holding gradio's
    cache (``GRADIO_TEMP_DIR``, its ``gradio`` folder); while it is open the process's umask is 077, so
    what the server writes is 0600 and its folders 0700. On the way out, Ctrl+C and SIGTERM included,
    it is removed and the umask and ``GRADIO_TEMP_DIR`` are restored."""
    umask = os.umask(0o077)
    cache = os.environ.get("GRADIO_TEMP_DIR")
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        (folder / "gradio").mkdir()
        os.environ["GRADIO_TEMP_DIR"] = str(folder / "gradio")
        yield folder
    finally:
        if cache is None:
            os.environ.pop("GRADIO_TEMP_DIR", None)
        else:
            os.environ["GRADIO_TEMP_DIR"] = cache
        shutil.rmtree(folder, ignore_errors=True)
        os.umask(umask)


def launch(served: Served, host: str = "127.0.0.1", port: int = 7860, work: Path | None = None) -> None:
    """Serve the page until interrupted (offline: no share link, no analytics, fonts of the system).

    Everything the server writes stays in ``work`` (a :func:`private_folder`; a new one when None):
    gradio's cache, the downloads and private copies of the examples. Only the examples are served
    from there by name; uploads and results are served from gradio's cache, under names hashed with
    their content, and nothing else is."""
    if work is None:
        with private_folder() as folder:
            return launch(served, host, port, folder)
    examples = work / "examples"
    examples.mkdir(mode=0o700, exist_ok=True)
    copies = []
    for path, caption in served.examples:  # copies that the umask keeps private (shipped files are 0644)
        copy = path if path.parent == examples else examples / path.name
        if copy != path:
            shutil.copyfile(path, copy)
        copies.append((copy, caption))
    served.examples = copies
    page, theme = build_page(served, work)
    print(f"gmar: serving {served.spec} at http://{host}:{port} (Ctrl+C stops it)", flush=True)
    page.launch(
        server_name=host,
        server_port=port,
        share=False,
        quiet=True,
        show_error=True,
        allowed_paths=[str(examples)],
        max_file_size=served.limits.max_upload_mb * 2**20,
        ssr_mode=False,
        theme=theme,
        footer_links=["api"],
    )
