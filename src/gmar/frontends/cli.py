"""The ``gmar`` command line. Thin: parse, call the library, write files."""

from __future__ import annotations

import argparse
import json
import logging
import re
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from importlib import resources
from pathlib import Path

import numpy as np
import torch

import gmar
from gmar import viz
from gmar.adapters import get_adapter
from gmar.errors import GmarError, ImageLoadError
from gmar.eval.registry import selectors
from gmar.frontends import common
from gmar.loading import LoadedModel, load_model
from gmar.methods import all_methods, available_methods, explain, methods_for, select_methods
from gmar.outputs import TEMPORARY, OutputError, OutputFolder, distinct, previous_outputs
from gmar.preprocess import IMAGE_SUFFIXES, denormalise, load_and_preprocess
from gmar.progress import Progress, message
from gmar.targets import TextTarget

#: Flags of the official GMAR demo; a command line that starts with one of them means `explain`.
OFFICIAL_FLAGS = ("--input", "--output", "--pretrained", "--norm")


def methods_help() -> str:
    """``--method``'s help, from the method registry as it is when the parser is built (so a method
    registered from outside is listed)."""
    slow = ",".join(m for m in available_methods() if m not in all_methods())
    return f"comma-separated, or 'all' ({','.join(all_methods())}); by name only: {slow}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gmar", description="Explain Vision Transformer decisions.")
    parser.add_argument("--version", action="version", version=f"gmar {gmar.__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("explain", help="write a heatmap overlay per image and method")
    p.add_argument("images", nargs="*", metavar="IMAGE", help="image files or folders of images")
    p.add_argument("--input", action="append", default=[], metavar="IMAGE", help="an image (official demo's flag)")
    p.add_argument("--example", action="store_true", help="explain the example images shipped with gmar")
    p.add_argument(
        "--model", metavar="SPEC", help="timm:NAME, hf:NAME_OR_PATH, openclip:ARCH/TAG or 'reference' (the shipped ViT)"
    )
    p.add_argument("--pretrained", metavar="HF_ID", help="same as --model hf:HF_ID (official demo's flag)")
    _weights_arguments(p)
    p.add_argument("--method", default="all", help=methods_help())
    p.add_argument("--target", type=int, metavar="K", help="class index to explain (default: the predicted class)")
    p.add_argument(
        "--prompt",
        action="append",
        default=[],
        metavar="TEXT",
        help="text prompt to explain, for openclip: models (repeat for several; one overlay per prompt and method)",
    )
    p.add_argument("--norm", choices=("l1", "l2"), default="l1", help="GMAR's head-score norm")
    p.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="METHOD.NAME=VALUE",
        help="a method's option, e.g. attnlrp.attention=full, attnlrp.linear_gamma=0.05, "
        "transformer_attribution.start_layer=1 (repeat for several)",
    )
    p.add_argument("--out", "--output", dest="out", default="gmar-out", metavar="DIR", help="output folder")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    p.add_argument("--batch-size", type=int, default=8, metavar="N")
    p.add_argument("--save-maps", action="store_true", help="also write each heatmap (H, W) as .npy")
    p.set_defaults(func=run_explain)

    e = commands.add_parser("evaluate", help="score methods with faithfulness, localisation and sanity metrics")
    e.add_argument("--model", default="reference", metavar="SPEC", help="'reference' (default) or timm:/hf: SPEC")
    _weights_arguments(e)
    e.add_argument("--data", default="scenes", help="'scenes' (default) or imagefolder:DIR")
    e.add_argument("--masks", metavar="DIR", help="masks for imagefolder:, same file names, nonzero = object")
    e.add_argument("--imagenet-seg", metavar="FILE", help="the ImageNet-Segmentation file gtsegs_ijcv.mat")
    e.add_argument("--methods", default="all", help=methods_help())
    e.add_argument("--metrics", default="all", help="comma-separated, or 'all': " + ",".join(selectors()))
    e.add_argument("--out", default="gmar-eval", metavar="DIR")
    e.add_argument("--limit", type=int, metavar="N", help="scenes: how many (default 500); folders: the first N")
    e.add_argument("--batch-size", type=int, default=16, metavar="N")
    e.add_argument("--device", default="cpu")
    e.add_argument("--steps", type=int, default=20, help="deletion/insertion steps (default 20)")
    e.add_argument("--baseline", type=float, default=0.0, help="deletion's replacement value, in model input space")
    e.add_argument("--blur-sigma", type=float, default=5.0, help="insertion's blur, in pixels")
    e.add_argument("--tolerance", type=float, help="pointing-game tolerance in pixels (default 15 at 224 px, scaled)")
    e.add_argument("--sanity-items", type=int, default=16, metavar="N", help="items for the randomisation test")
    e.add_argument("--seed", type=int, default=0)
    e.set_defaults(func=run_evaluate)

    t = commands.add_parser("train-reference", help="train the reference ViT on the synthetic scenes")
    t.add_argument("--out", default="gmar-reference", metavar="DIR")
    t.add_argument("--steps", type=int, help="training steps (default: the shipped recipe's)")
    t.add_argument("--lr", type=float, help="peak learning rate (default: the shipped recipe's)")
    t.add_argument("--train-scenes", type=int, metavar="N", help="train scenes (default: the shipped recipe's)")
    t.add_argument("--token-loss", type=float, metavar="W", help="weight of the per-patch loss; 0 turns it off")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    t.set_defaults(func=run_train_reference)

    d = commands.add_parser("demo", help="offline: explain test scenes with the shipped reference ViT and score it")
    d.add_argument("--out", default="gmar-demo", metavar="DIR")
    d.add_argument("--scenes", type=int, default=100, help="scenes in the evaluation table (default 100)")
    d.set_defaults(func=run_demo)

    a = commands.add_parser("app", help="a web page to explain images, compare methods and look inside every head")
    a.add_argument("--model", default="reference", metavar="SPEC", help="'reference' (default) or SPEC as for explain")
    _weights_arguments(a)
    a.add_argument("--host", default="127.0.0.1", help="address to serve on (default %(default)s: this machine only)")
    a.add_argument("--port", type=int, default=7860, help="port to serve on (default %(default)s)")
    a.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    a.add_argument("--max-upload-mb", type=int, default=20, metavar="MB", help="largest upload (default %(default)s)")
    a.add_argument(
        "--max-pixels", type=int, default=40_000_000, metavar="N", help="most pixels of an image (default %(default)s)"
    )
    a.add_argument(
        "--max-prompts", type=int, default=16, metavar="N", help="most prompts per explanation (default %(default)s)"
    )
    a.set_defaults(func=run_app)

    m = commands.add_parser("models", help="which model classes gmar explains: build each small, run every method")
    m.add_argument("--zoo", default="", metavar="Z[,Z...]", help="timm, hf, openclip, torchvision (default: installed)")
    m.add_argument("--out", metavar="FILE", help="write the table as markdown (docs/models.md is this output)")
    m.set_defaults(func=run_models)

    b = commands.add_parser("bench", help="time and memory of every method against the model's forward/backward")
    b.add_argument(
        "--model", default="timm:vit_base_patch16_224", metavar="SPEC", help="random weights (default %(default)s)"
    )
    b.add_argument("--batch-size", default="8", metavar="N[,N...]", help="one or more batch sizes (default 8)")
    b.add_argument("--resolution", default="", metavar="R[,R...]", help="input sides in pixels (default: the model's)")
    b.add_argument("--methods", default="all", help="comma-separated, or 'all'")
    b.add_argument("--repeats", type=int, default=5, help="timed rounds after one warm-up round (default 5)")
    b.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    b.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    b.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    b.add_argument("--gradcam", action="store_true", help="also time pytorch-grad-cam's GradCAM (gmar[bench])")
    b.add_argument(
        "--torchcam",
        action="store_true",
        help="also time torchcam's GradCAM, and its LeGrad next to gmar's on a torchvision twin (gmar[bench])",
    )
    b.add_argument("--out", default="gmar-bench", metavar="DIR")
    b.set_defaults(func=run_bench)
    return parser


def _weights_arguments(parser: argparse.ArgumentParser) -> None:
    """Where ``--model``'s weights come from: the same three options for explain, evaluate and app."""
    parser.add_argument("--checkpoint", metavar="FILE", help="local weights (.safetensors or a torch.save state dict)")
    parser.add_argument("--random-init", action="store_true", help="seeded random weights: exercises the pipeline only")
    parser.add_argument("--num-classes", type=int, metavar="N", help="the checkpoint's number of classes (timm:, hf:)")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].split("=")[0] in OFFICIAL_FLAGS:
        argv = ["explain", *argv]
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except GmarError as error:
        print(f"gmar: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gmar: interrupted", file=sys.stderr)
        return 130


def run_explain(args: argparse.Namespace) -> int:
    named = select_methods(args.method)  # the names are checked before the model loads, not after it
    if args.batch_size < 1:
        raise GmarError("--batch-size must be at least 1")
    device = _device(args.device)
    paths = _image_paths(args)
    outputs = OutputFolder(args.out, inputs=paths)
    loaded = _load(args, device)
    # "all": the methods defined for this model; a named one it cannot run is refused here, on one line
    methods = methods_for(loaded.model, "all" if args.method.strip() == "all" else named)
    text_target = _text_target(args, loaded)
    target = args.target if text_target is None else text_target
    # Several prompts explain one image at a time (the image is repeated once per prompt).
    step = args.batch_size if text_target is None or len(text_target.prompts) == 1 else 1
    slugs = None if text_target is None else distinct([_slug(p) for p in text_target.prompts])

    failures = written = 0
    pending: list[tuple[Path, torch.Tensor]] = []
    bar = Progress(len(paths), "explaining", sys.stderr.isatty(), unit="images")
    try:
        for index, path in enumerate(paths):
            # Decoded one at a time and kept at the model's size only: memory is one photo, not all of them.
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    pending.append((path, load_and_preprocess(path, loaded.preprocess)))
                except ImageLoadError as error:
                    _report(f"skipped {error}", bar)
                    failures += 1
            for warning in caught:  # each starts with the file's path
                _report(str(warning.message), bar)
            if pending and (len(pending) == step or index == len(paths) - 1):
                batch = torch.cat([tensor for _, tensor in pending]).to(device)
                # one call: the methods that read the same attention and gradient share one pass
                explanations = explain(loaded.model, batch, methods, target=target, options=_options(methods, args))
                suffixes = _suffixes(explanations, slugs, args.save_maps)
                names = [outputs.reserve(p.name, suffixes, p) for p, _ in pending]
                sources = [p for p, _ in pending]
                if slugs is None:
                    done = _write(batch, explanations, loaded, names, sources, outputs, args.save_maps)
                else:
                    done = _write_prompts(batch, explanations, loaded, names, sources, slugs, outputs, args.save_maps)
                written += done
                failures += len(names) - done
                pending = []
            bar.update(index + 1)
    finally:
        bar.close()
        outputs.close()
    out = outputs.folder
    print(f"gmar: wrote {written} figure(s) to {out}" + (f"; {failures} input(s) failed" if failures else ""))
    return 2 if failures else 0


def _report(line: str, bar: Progress) -> None:
    """One ``gmar: ...`` line on stderr, above the progress bar when one is drawn."""
    bar.message(f"gmar: {line}")


def _suffixes(explanations: dict, slugs: list[str] | None, save_maps: bool) -> list[str]:
    """What follows an input's name in the names of its output files: the figure, a head-weights
    figure per method with head weights, and with ``save_maps`` each method's map (per prompt)."""
    suffixes = [".png"]
    for part in [""] if slugs is None else [f"_{slug}" for slug in slugs]:
        suffixes += [f"{part}_{common.heads_file(method)}" for method in common.head_weighted(explanations)]
        suffixes += [f"{part}_{method}.npy" for method in explanations] if save_maps else []
    return suffixes


def _text_target(args: argparse.Namespace, loaded: LoadedModel) -> TextTarget | None:
    """The prompts as a target for a CLIP model; None for a classifier."""
    if get_adapter(loaded.model).is_classifier:
        if args.prompt:
            raise GmarError(
                f"--prompt is for CLIP models (openclip:..., hf: CLIP/SigLIP); {loaded.spec} is a classifier, "
                "use --target"
            )
        return None
    if not args.prompt:
        raise GmarError(f"{loaded.spec} compares images with text: give what to explain with --prompt TEXT")
    if args.target is not None:
        raise GmarError("--target is a class index for classifiers; CLIP models are explained with --prompt")
    return common.text_target(loaded.model, loaded.extras.get("tokenizer"), args.prompt, loaded.spec)


def run_evaluate(args: argparse.Namespace) -> int:
    from gmar.eval.datasets import image_files, imagenet_seg_images, scene_items
    from gmar.eval.distributed import barrier, distributed
    from gmar.eval.harness import MODEL_CHECK, Settings, evaluate
    from gmar.eval.registry import select_metrics, selected
    from gmar.eval.report import MODEL_CHECK_WARNING, model_check_verdict, report, report_files
    from gmar.eval.store import check_writable

    methods, metrics = select_methods(args.methods), select_metrics(args.metrics)
    if args.batch_size < 1 or (args.limit is not None and args.limit < 1) or args.steps < 1:
        raise GmarError("--batch-size, --limit and --steps must be at least 1")
    device = _device(args.device)
    OutputFolder(args.out).check(report_files())  # before the work, not after it
    check_writable(Path(args.out))  # before the model loads, not after it
    rank, world = distributed()
    model, config, multi_label = _evaluation_model(args, device)
    methods = methods_for(model, methods if args.methods.strip() != "all" else "all")  # what this model can run
    if args.imagenet_seg:
        data = f"imagenet-seg:{args.imagenet_seg}"
        items = imagenet_seg_images(Path(args.imagenet_seg), config, args.limit)
    elif args.data == "scenes":
        from gmar.eval.scenes import CLASSES

        classes = _num_classes(model)
        if classes != len(CLASSES):
            raise GmarError(f"the scenes have {len(CLASSES)} classes but {args.model} has {classes} outputs")
        data = "scenes"
        checks = any("removed" in metric.needs for metric in selected(metrics))  # only they need re-rendered scenes
        items = scene_items(args.limit, seed=args.seed, image_size=config.input_size[0], removals=checks)
    elif args.data.startswith("imagefolder:"):
        data = args.data
        masks = Path(args.masks) if args.masks else None
        items = image_files(Path(args.data.partition(":")[2]), masks, config, args.limit)
    else:
        raise GmarError(f"--data must be 'scenes' or imagefolder:DIR, not {args.data!r}")
    if not items:
        raise GmarError("nothing to evaluate: the data holds no images")
    settings = Settings(
        model=args.model if args.checkpoint is None else f"{args.model}+{Path(args.checkpoint).name}",
        data=data,
        methods=methods,
        metrics=metrics,
        limit=args.limit,
        steps=args.steps,
        baseline=args.baseline,
        blur_sigma=args.blur_sigma,
        tolerance=args.tolerance,
        sanity_items=args.sanity_items,
        seed=args.seed,
        multi_label=multi_label,
    )
    out = Path(args.out)
    store = evaluate(model, items, settings, out, batch_size=args.batch_size, rank=rank, world=world)
    barrier()
    if rank == 0:
        evaluated = len({item for item, _ in store.done()})
        if not evaluated:
            store.close()
            raise GmarError("nothing to evaluate: the data holds no readable images")
        summary = report(store, settings, out)
        print(f"gmar: evaluated {evaluated} item(s) with {len(methods)} method(s); results in {out / 'results.md'}")
        check = summary.get((MODEL_CHECK, "removal_own_drops_most"))
        if check is not None and check[0] < MODEL_CHECK_WARNING:
            print("gmar: " + model_check_verdict(check[0]).replace("**Warning:**", "warning:"), file=sys.stderr)
    store.close()
    return 0


def _evaluation_model(args: argparse.Namespace, device: torch.device):
    """The model, its preprocessing and whether it is multi-label (the reference model is)."""
    if args.model == "reference":
        from gmar.eval.reference import load_reference_model

        if args.num_classes is not None:
            raise GmarError("--num-classes is for --model SPEC; the reference model has the scenes' classes")

        model = load_reference_model(args.checkpoint, device=device)
        return model, get_adapter(model).preprocess_config(), True
    loaded = load_model(
        args.model,
        checkpoint=args.checkpoint,
        pretrained=not args.random_init,
        device=device,
        num_classes=args.num_classes,
    )
    if not get_adapter(loaded.model).is_classifier:
        raise GmarError("gmar evaluate scores classifiers; CLIP models are explained with gmar explain --prompt")
    return loaded.model, loaded.preprocess, False


def _num_classes(model: torch.nn.Module) -> int:
    adapter = get_adapter(model)
    size = adapter.preprocess_config().input_size
    with torch.no_grad():
        parameter = next(model.parameters())
        return int(adapter.forward(torch.zeros(1, 3, *size, device=parameter.device)).shape[-1])


def run_train_reference(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from gmar.eval.reference import ReferenceConfig, train_reference

    if args.threads:
        torch.set_num_threads(args.threads)
    config = ReferenceConfig(seed=args.seed)
    # option: the smallest value allowed (None: any positive number)
    for option, low in (("steps", 1), ("lr", None), ("train_scenes", 1), ("token_loss", 0)):
        value = getattr(args, option)
        if value is None:
            continue
        if not (value > 0 if low is None else value >= low):
            flag = "--" + option.replace("_", "-")
            raise GmarError(f"{flag} must be {'positive' if low is None else f'at least {low}'}, not {value}")
        config = replace(config, **{option: value})
    print(f"gmar: training the reference ViT: {json.dumps(asdict(config))}")
    _, summary = train_reference(config, out=args.out)
    print(
        f"gmar: test exact-set accuracy {summary['test_exact_set_accuracy']:.4f} on {summary['test_scenes']} scenes, "
        f"{summary['train_seconds']} s; wrote {Path(args.out) / 'reference_vit.safetensors'} and its model card"
    )
    return 0


def run_bench(args: argparse.Namespace) -> int:
    from gmar.frontends import bench

    _device(args.device)
    OutputFolder(args.out).check(bench.FILES)
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = _int_list(args.batch_size, "--batch-size")
    resolutions: list[int | None] = _int_list(args.resolution, "--resolution") if args.resolution else [None]  # type: ignore[assignment]
    methods = select_methods(args.methods)
    where = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else bench.cpu_name()
    settings = []
    for resolution in resolutions:
        for batch in batches:
            setting = bench.run_setting(
                args.model,
                batch,
                resolution,
                methods=methods,
                repeats=args.repeats,
                device=args.device,
                memory=not args.no_memory,
                gradcam=args.gradcam,
                torchcam=args.torchcam,
            )
            print(f"{bench.table(setting)}\n{where}, torch {torch.__version__}\n", flush=True)
            settings.append(setting)
    for path in bench.save(settings, Path(args.out)):
        print(f"wrote {path}")
    return 0


def run_models(args: argparse.Namespace) -> int:
    from gmar.frontends import models as coverage

    zoos = [z.strip() for z in args.zoo.split(",") if z.strip()] or coverage.installed_zoos()
    unknown = [z for z in zoos if z not in coverage.CASES]
    if unknown:
        raise GmarError(f"--zoo takes {', '.join(coverage.CASES)}, not {', '.join(unknown)}")
    missing = [z for z in zoos if z not in coverage.installed_zoos()]
    if missing:
        raise GmarError(f"{', '.join(missing)} not installed: pip install 'gmar[all]'")
    results = []
    for case in coverage.cases(zoos):
        result = coverage.check(case)
        marks = " ".join(coverage.SYMBOLS[o.status] for o in result.outcomes.values())
        print(f"{case.zoo:11} {result.class_name:45} {marks}", file=sys.stderr, flush=True)
        results.append(result)
    text = coverage.markdown(results)
    if args.out:
        out = Path(args.out)
        if out.exists() and not out.read_text(errors="replace").startswith(coverage.HEADER):
            raise GmarError(f"{out} exists and is not a table gmar models wrote; name another file")
        out.write_text(text)
        print(f"gmar: wrote {args.out}")
    else:
        print(text)
    counts = coverage.summary(results)
    print(
        f"gmar: {len(results)} classes: {counts['every method']} explained by every method, "
        f"{counts['some methods']} by some, {counts['none']} refused; {counts['failures']} failure(s)"
    )
    return 1 if counts["failures"] else 0


def run_app(args: argparse.Namespace) -> int:
    from PIL import Image

    from gmar.frontends import app

    app.require_gradio()  # an extra
    app.check_port(args.host, args.port)
    for flag in ("max_upload_mb", "max_pixels", "max_prompts"):
        if getattr(args, flag) < 1:
            raise GmarError(f"--{flag.replace('_', '-')} must be at least 1, not {getattr(args, flag)}")
    if Image.MAX_IMAGE_PIXELS is not None and args.max_pixels > Image.MAX_IMAGE_PIXELS:
        raise GmarError(f"--max-pixels must be at most Pillow's limit, {Image.MAX_IMAGE_PIXELS}, not {args.max_pixels}")
    limits = app.Limits(args.max_upload_mb, args.max_pixels, args.max_prompts)
    device = _device(args.device)
    with _terminated_as_interrupted():  # SIGTERM, as Ctrl+C, removes the app's folder on the way out
        if args.model == "reference":
            from gmar.eval.reference import load_reference_model

            if args.random_init or args.num_classes is not None:
                raise GmarError("--random-init and --num-classes are for --model SPEC; the reference model is trained")
            model = load_reference_model(args.checkpoint, device=device)
            with app.private_folder() as work:
                (work / "examples").mkdir()
                served = app.serve_reference(model, work / "examples")
                served.limits = limits
                app.launch(served, args.host, args.port, work=work)
            return 0
        served = app.serve_loaded(_load(args, device))
        served.limits = limits
        with app.private_folder() as work:
            app.launch(served, args.host, args.port, work=work)
    return 0


@contextmanager
def _terminated_as_interrupted() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt, as Ctrl+C does, so that what cleans up after Ctrl+C runs;
    the previous handler comes back afterwards. Only the main thread can handle signals."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise GmarError(f"{flag} takes comma-separated positive integers, not {text!r}") from None
    if not values or min(values) < 1:
        raise GmarError(f"{flag} takes comma-separated positive integers, not {text!r}")
    return values


def run_demo(args: argparse.Namespace) -> int:
    from gmar.frontends.demo import demo

    if args.scenes < 1:
        raise GmarError("--scenes must be at least 1")
    for line in demo(Path(args.out), scenes=args.scenes):
        print(f"gmar: {line}")
    return 0


def _write(
    batch: torch.Tensor,
    explanations: dict,
    loaded: LoadedModel,
    names: list[str],
    sources: list[Path],
    out: OutputFolder,
    save_maps: bool,
) -> int:
    """Write each image's figure (and heads and maps); return how many images were written whole."""
    pixels = denormalise(batch, loaded.preprocess).cpu()
    first = next(iter(explanations.values()))
    shown = common.probabilities(first.logits, bool(loaded.extras.get("multi_label")))
    written = 0
    for i, name in enumerate(names):
        predicted = int(shown[i].argmax())
        class_names = loaded.class_names
        row = [f"predicted: {common.class_label(class_names, predicted)} ({shown[i, predicted]:.2f})"]
        columns = {m: [f"{m}: {common.class_label(class_names, int(e.target[i]))}"] for m, e in explanations.items()}
        single = {m: _select(e, i) for m, e in explanations.items()}
        grid = viz.method_grid(pixels[i : i + 1], single, row_titles=row, column_titles=columns)
        files = [(f"{name}.png", lambda path, figure=grid: viz.save(figure, path))]
        files += _row_files(name, explanations, i, name, save_maps)
        written += _write_files(files, sources[i], out)
    return written


def _write_prompts(
    batch: torch.Tensor,
    explanations: dict,
    loaded: LoadedModel,
    names: list[str],
    sources: list[Path],
    slugs: list[str],
    out: OutputFolder,
    save_maps: bool,
) -> int:
    """One figure per image: a row per prompt, the image and one overlay per method, labelled with the prompt.

    Returns how many images were written whole."""
    pixels = denormalise(batch, loaded.preprocess).cpu()
    first = next(iter(explanations.values()))
    prompts = first.prompts
    count = len(slugs)  # maps per image: one per prompt
    written = 0
    for i, name in enumerate(names):
        rows = list(range(i * count, (i + 1) * count))
        images = pixels[i : i + 1].expand(count, *pixels.shape[1:])
        row_titles = [f'"{_short(prompts[r])}"' for r in rows]
        columns = {
            m: [f"{m}: {_short(prompts[r])}" + ("" if e.scores is None else f" ({e.scores[r]:.2f})") for r in rows]
            for m, e in explanations.items()
        }
        single = {m: replace(e, heatmap=e.heatmap[rows[0] : rows[-1] + 1]) for m, e in explanations.items()}
        grid = viz.method_grid(images, single, row_titles=row_titles, column_titles=columns)
        files = [(f"{name}.png", lambda path, figure=grid: viz.save(figure, path))]
        for slug, r in zip(slugs, rows, strict=True):
            files += _row_files(f"{name}_{slug}", explanations, r, f'{name}, "{_short(prompts[r])}"', save_maps)
        written += _write_files(files, sources[i], out)
    return written


def _row_files(prefix: str, explanations: dict, row: int, title: str, save_maps: bool) -> list:
    """The files of one explained row but its figure: ``PREFIX_METHOD_heads.png`` for each method with
    head weights and, with ``save_maps``, ``PREFIX_METHOD.npy`` (name, writer pairs)."""
    files = []
    for method in common.head_weighted(explanations):
        figure = common.head_weights_figure(explanations, method, row, title)
        files.append((f"{prefix}_{common.heads_file(method)}", lambda path, figure=figure: viz.save(figure, path)))
    if save_maps:
        for method, explanation in explanations.items():
            heatmap = explanation.heatmap[row].cpu().numpy()
            files.append((f"{prefix}_{method}.npy", lambda path, heatmap=heatmap: np.save(path, heatmap)))
    return files


def _write_files(files: list[tuple[str, Callable[[Path], object]]], source: Path, out: OutputFolder) -> int:
    """Write one image's ``files`` (name, writer); 1 if all were written, 0 (and one line on stderr) if not.

    An image whose files cannot be written (full disk, a name the file system refuses) does not stop
    the run: the next images are still explained, and the run ends with exit code 2.
    """
    try:
        for name, writer in files:
            out.write(name, writer)
    except OutputError as error:
        message(f"gmar: {source}: {error}")
        import matplotlib.pyplot as plt

        for _, writer in files:  # the figures not written are released all the same
            for value in writer.__defaults__ or ():
                if isinstance(value, plt.Figure):
                    plt.close(value)
        return 0
    return 1


def _short(text: str, width: int = 40) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _slug(text: str) -> str:
    """A file-name-safe form of a prompt: lower case, runs of other characters as one '-'."""
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug[:60] or "prompt"


def _select(explanation, index: int):
    return replace(explanation, heatmap=explanation.heatmap[index : index + 1])


def _options(methods: list[str], args: argparse.Namespace) -> dict:
    options: dict[str, dict] = {"gmar": {"norm": args.norm}} if "gmar" in methods else {}
    for text in args.option:
        method, name, value = parse_option(text)
        if method not in methods:
            raise GmarError(f"--option {text!r} is for {method}, which is not among the methods {', '.join(methods)}")
        options.setdefault(method, {})[name] = value
    for method, given in options.items():
        try:
            gmar.methods.check_options(method, given)
        except ValueError as error:
            raise GmarError(str(error)) from None
    return options


def parse_option(text: str) -> tuple[str, str, object]:
    """``METHOD.NAME=VALUE`` as ``(method, name, value)``; the value is a Python literal (a number,
    True/False/None) or else the string itself."""
    import ast

    match = re.fullmatch(r"([A-Za-z][\w-]*)\.([A-Za-z_]\w*)=(.*)", text)
    if match is None:
        raise GmarError(f"--option {text!r} must read METHOD.NAME=VALUE, e.g. attnlrp.attention=full")
    method, name, raw = match.groups()
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    return method, name, value


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise GmarError(f"--device {name!r} is not a device; use cpu, cuda, cuda:N or mps") from None
    if device.type == "meta":
        raise GmarError("--device meta holds no data, so nothing can be explained on it; use cpu, cuda or mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GmarError("--device cuda asked for, but no CUDA device is available")
    if device.type not in ("cpu", "cuda"):
        backend = getattr(torch.backends, device.type, None) or getattr(torch, device.type, None)
        available = getattr(backend, "is_available", None)
        if available is None or not available():
            raise GmarError(f"--device {name} asked for, but this machine has none; use cpu")
    return device


def _image_paths(args: argparse.Namespace) -> list[Path]:
    given = [Path(p) for p in [*args.images, *args.input]]
    if args.example:
        folder = resources.files("gmar") / "assets"
        given += sorted(Path(str(folder / name)) for name in ("example_shapes.png", "example_stripes.png"))
    if not given:
        raise GmarError("no images given: name image files or folders, or use --example")
    paths: list[Path] = []
    for path in given:
        if path.is_dir():
            ours = previous_outputs(path)  # figures gmar wrote into this folder are not inputs
            found = sorted(
                p
                for p in path.iterdir()
                if p.suffix.lower() in IMAGE_SUFFIXES and p.name not in ours and not p.name.startswith(TEMPORARY)
            )
            if not found:
                print(f"gmar: no images in folder {path}", file=sys.stderr)
            paths += found
        else:
            paths.append(path)
    return paths


def _load(args: argparse.Namespace, device: torch.device) -> LoadedModel:
    spec = args.model or (f"hf:{args.pretrained}" if args.pretrained else None)
    if spec is None:
        raise GmarError(
            "name a model: --model timm:NAME | hf:NAME_OR_PATH | openclip:ARCH/TAG | reference (or --pretrained HF_ID)"
        )
    if spec == "reference":
        return _reference(args, device)
    # Hub clients log retries and fallbacks, and a failed download as an error, and transformers draws
    # a progress bar while it loads weights: gmar reports a failure on one line and loads quietly.
    disabled = logging.root.manager.disable
    logging.disable(logging.ERROR)
    bars = None
    if spec.startswith("hf:"):
        from transformers.utils import logging as bars

        shown = bars.is_progress_bar_enabled()
        bars.disable_progress_bar()
    try:
        return load_model(
            spec,
            checkpoint=args.checkpoint,
            pretrained=not args.random_init,
            device=device,
            num_classes=args.num_classes,
        )
    finally:
        logging.disable(disabled)
        if bars is not None and shown:
            bars.enable_progress_bar()


def _reference(args: argparse.Namespace, device: torch.device) -> LoadedModel:
    """The shipped reference ViT (or ``--checkpoint``), labelled with the scenes' classes; multi-label."""
    from gmar.eval.reference import load_reference_model
    from gmar.eval.scenes import CLASSES

    if args.random_init or args.num_classes is not None:
        raise GmarError("--random-init and --num-classes are for --model SPEC; the reference model is trained")
    model = load_reference_model(args.checkpoint, device=device)
    config = get_adapter(model).preprocess_config()
    return LoadedModel(model, config, list(CLASSES), "reference", extras={"multi_label": True})


if __name__ == "__main__":
    sys.exit(main())
