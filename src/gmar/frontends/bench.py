"""Speed and memory of every method against the model's own forward and backward pass.

Two baselines, measured in the same process as the methods:

- **F**: the model's forward under ``torch.inference_mode`` with its default attention
  implementation (timm's fused kernel, Hugging Face's sdpa);
- **FB**: forward plus backward of the summed target logits (the predicted classes) to the input
  image, parameters frozen: the cost of a plain input gradient.

Attention-only methods (``raw_attention``, ``rollout``) are reported against F, gradient methods
against FB. Times are medians of ``repeats`` interleaved rounds after one warm-up round; a
method's time is its whole call (``gmar.explain``, heatmaps included). Peak memory: on CUDA
``torch.cuda.max_memory_allocated`` per case; on the CPU the peak resident memory of a fresh child
process per case (Linux ``VmHWM``, reset after a warm-up call), reported both as the peak and as
the rise above the process's resident memory before its first call (model, input and runtime
loaded).

Weights are random: speed and memory do not depend on them.
"""

from __future__ import annotations

import csv
import json
import math
import multiprocessing
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from gmar.capture import model_lock
from gmar.errors import GmarError
from gmar.methods import all_methods, available_methods, explain, get_method
from gmar.outputs import OutputFolder

ATTENTION_ONLY = ("raw_attention", "rollout")
#: option variants timed as cases of their own when their method is asked: ``case -> (method, options)``
VARIANTS = {
    "gmar (taylor)": ("gmar", {"head_score": "taylor"}),
    "attnlrp (full)": ("attnlrp", {"attention": "full"}),
    # the AttnLRP authors' ViT setting: the γ-rule on the patch embedding and on every linear layer
    "attnlrp (γ 0.25/0.05)": ("attnlrp", {"conv_gamma": 0.25, "linear_gamma": 0.05}),
}
#: the case that runs every method asked in one call (``gmar.explain(model, images, [...])``)
ALL = "all (one call)"
GRADCAM_PACKAGE = "grad-cam"
#: torchcam's GradCAM on the same model and block as gmar's ``gradcam``
TORCHCAM_GRADCAM = "torchcam gradcam"
#: gmar's ``legrad`` and torchcam's LeGrad on a torchvision ``VisionTransformer`` with the timm model's weights
TWIN_LEGRAD = "legrad (torchvision twin)"
TORCHCAM_LEGRAD = "torchcam legrad (torchvision twin)"
DEFAULT_MODEL = "timm:vit_base_patch16_224"


@dataclass
class Row:
    """One case of one setting: seconds, and peak memory in bytes (None where not measured)."""

    case: str
    baseline: str | None
    seconds: float
    ratio: float | None = None
    peak: int | None = None
    peak_ratio: float | None = None
    rise: int | None = None
    rise_ratio: float | None = None


@dataclass
class Setting:
    model: str
    batch_size: int
    resolution: int
    device: str
    threads: int
    repeats: int
    rows: list[Row] = field(default_factory=list)
    gradcam_max_difference: float | None = None
    torchcam_max_difference: float | None = None


def build_model(spec: str, resolution: int | None, device: str) -> nn.Module:
    """``spec`` with seeded random weights, in eval mode, taking ``resolution``-pixel square inputs.

    ``timm:NAME`` takes any resolution (``dynamic_img_size`` where it differs from the model's own);
    ``reference`` is gmar's reference ViT; other specs go through :func:`gmar.load_model`.
    """
    torch.manual_seed(0)
    if spec == "reference":
        from gmar.eval.reference import build_reference_model

        model = build_reference_model()
    elif spec.startswith("timm:"):
        import timm

        name = spec.removeprefix("timm:")
        with torch.device("meta"):  # the architecture's own input size, without initialising weights
            native = timm.create_model(name, pretrained=False).patch_embed.img_size
        options = {} if resolution is None or tuple(native) == (resolution, resolution) else {"dynamic_img_size": True}
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False, **options)
    else:
        from gmar.loading import load_model

        model = load_model(spec, pretrained=False).model
    return model.to(device).eval()


def input_size(model: nn.Module, resolution: int | None) -> tuple[int, int]:
    if resolution is not None:
        return (resolution, resolution)
    from gmar.adapters import get_adapter

    return tuple(get_adapter(model).preprocess_config().input_size)  # type: ignore[return-value]


def forward(model: nn.Module, images: torch.Tensor) -> None:
    """Baseline F."""
    with torch.inference_mode(), model_lock(model):
        model(images)


def forward_backward(model: nn.Module, images: torch.Tensor) -> None:
    """Baseline FB: the summed logits of the predicted classes, differentiated to the input image."""
    with model_lock(model):
        flags = [p.requires_grad for p in model.parameters()]
        for p in model.parameters():
            p.requires_grad_(False)
        try:
            inputs = images.detach().requires_grad_()
            torch.autograd.grad(model(inputs).max(dim=-1).values.sum(), inputs)
        finally:
            for p, flag in zip(model.parameters(), flags, strict=True):
                p.requires_grad_(flag)


def cases(
    model: nn.Module, images: torch.Tensor, methods: Sequence[str], gradcam: bool, torchcam: bool = False
) -> dict[str, Callable]:
    """The measured calls, by name: the baselines, each method, pytorch-grad-cam and torchcam if asked."""
    runs: dict[str, Callable] = {"F": lambda: forward(model, images), "FB": lambda: forward_backward(model, images)}
    for method in methods:
        runs[method] = lambda method=method: explain(model, images, method=method)
        for case, (base, options) in VARIANTS.items():
            if base == method:
                runs[case] = lambda base=base, options=options: explain(model, images, method=base, **options)
    if len(methods) > 1:  # every method asked, as one call: the shared pass
        runs[ALL] = lambda: explain(model, images, method=list(methods))
    if gradcam:
        runs[GRADCAM_PACKAGE] = _package_gradcam(model, images)
    if torchcam:
        runs[TORCHCAM_GRADCAM] = _torchcam_gradcam(model, images)
        twin = torchvision_twin(model)
        runs[TWIN_LEGRAD] = lambda: explain(twin, images, method="legrad")
        runs[TORCHCAM_LEGRAD] = _torchcam_legrad(twin, images)
    return runs


def baseline_of(case: str) -> str | None:
    if case in ("F", "FB"):
        return None
    method = VARIANTS[case][0] if case in VARIANTS else case
    if method in ATTENTION_ONLY or (method in available_methods() and not get_method(method).uses_gradients):
        return "F"  # forward passes only (occlusion: many)
    return "FB"


def time_cases(runs: dict[str, Callable], repeats: int, device: str) -> dict[str, float]:
    """Median seconds per case over ``repeats`` interleaved rounds, after one warm-up round."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for run in runs.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            sync()
            start = time.perf_counter()
            run()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def cuda_peaks(runs: dict[str, Callable]) -> dict[str, tuple[int, int]]:
    """Per case: (peak allocated bytes, rise above what was allocated before the call)."""
    peaks = {}
    for name, run in runs.items():
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        peaks[name] = (peak, peak - before)
    return peaks


#: glibc's threshold above which an allocation gets its own mapping, fixed for the memory children
MMAP_THRESHOLD = ("MALLOC_MMAP_THRESHOLD_", "65536")


def cpu_peaks(
    spec: str, batch: int, resolution: int | None, names: Sequence[str], threads: int, methods: Sequence[str] = ()
) -> dict:
    """Per case, in a fresh child process: (peak resident bytes, rise above the resident bytes before).

    The children run with glibc's mmap threshold fixed at 64 KiB: every tensor then has its own
    mapping, which goes back to the system when the tensor is freed, so the resident peak is the
    peak of live memory. (By default glibc raises the threshold as large blocks are freed and keeps
    freed heap memory, and the peak would depend on what the warm-up call left behind.)
    """
    context = multiprocessing.get_context("spawn")
    key, value = MMAP_THRESHOLD
    previous = os.environ.get(key)
    os.environ[key] = value  # read by the children's C library at start-up
    peaks = {}
    try:
        for name in names:
            with context.Pool(1) as pool:
                peaks[name] = pool.apply(_child_peak, (spec, batch, resolution, name, threads, list(methods)))
    finally:
        if previous is None:
            os.environ.pop(key)
        else:
            os.environ[key] = previous
    return peaks


def _child_peak(
    spec: str, batch: int, resolution: int | None, name: str, threads: int, every: Sequence[str] = ()
) -> tuple[int, int]:
    torch.set_num_threads(threads)
    model = build_model(spec, resolution, "cpu")
    images = torch.randn(batch, 3, *input_size(model, resolution), generator=torch.Generator().manual_seed(0))
    method = VARIANTS[name][0] if name in VARIANTS else name
    methods = list(every) if name == ALL else [method] if method in available_methods() else []
    peers = {"gradcam": name == GRADCAM_PACKAGE, "torchcam": name in (TORCHCAM_GRADCAM, TWIN_LEGRAD, TORCHCAM_LEGRAD)}
    run = cases(model, images, methods, **peers)[name]
    before = _status("VmRSS")  # runtime, weights and input: what the call starts from
    run()  # warm-up: libraries' caches are then in place, as they are for the timed calls
    _reset_peak()
    run()
    peak = _status("VmHWM")
    return peak, peak - before


def _reset_peak() -> None:
    """Reset the process's peak resident memory (Linux ≥ 4.0), so it reflects one call."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError as error:
        raise GmarError(f"cannot reset the peak resident memory on this system ({error}); use --no-memory") from None


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise GmarError(f"/proc/self/status has no {key}; CPU memory is measured on Linux only (use --no-memory)")


def run_setting(
    spec: str,
    batch: int,
    resolution: int | None,
    *,
    methods: Sequence[str] | None = None,
    repeats: int = 5,
    device: str = "cpu",
    memory: bool = True,
    gradcam: bool = False,
    torchcam: bool = False,
) -> Setting:
    """Measure every case for one model, batch size and resolution."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, not {repeats}")
    methods = list(all_methods() if methods is None else methods)
    model = build_model(spec, resolution, device)
    size = input_size(model, resolution)
    images = torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(0)).to(device)
    runs = cases(model, images, methods, gradcam, torchcam)
    setting = Setting(spec, batch, size[0], device, torch.get_num_threads(), repeats)
    if gradcam:
        setting.gradcam_max_difference = _gradcam_difference(model, images)
    if torchcam:
        setting.torchcam_max_difference = _torchcam_difference(model, images)
    seconds = time_cases(runs, repeats, device)
    peaks: dict = {}
    if memory:
        if device.startswith("cuda"):
            peaks = cuda_peaks(runs)
        else:
            peaks = cpu_peaks(spec, batch, resolution, list(runs), torch.get_num_threads(), methods)
    for name, value in seconds.items():
        base = baseline_of(name)
        row = Row(name, base, value)
        if base is not None:
            row.ratio = value / seconds[base]
        if name in peaks:
            row.peak, row.rise = peaks[name]
            if base is not None:
                row.peak_ratio = row.peak / peaks[base][0]
                row.rise_ratio = row.rise / max(1, peaks[base][1])
        setting.rows.append(row)
    return setting


def _package_gradcam(model: nn.Module, images: torch.Tensor) -> Callable[[], object]:
    """pytorch-grad-cam's ``GradCAM`` on the tokens entering the last block (``blocks[-2]``'s
    output), as its documentation sets it up for a ViT, explaining the predicted classes: with
    ``targets=None`` it picks them from its own forward pass, so the case is one forward and one
    backward, as its users run it (parameters left requiring grad, as they come)."""
    try:
        from pytorch_grad_cam import GradCAM as PackageGradCAM
    except ImportError:
        raise GmarError(f"the comparison needs {GRADCAM_PACKAGE}: pip install 'gmar[bench]'") from None
    from gmar.adapters import get_adapter

    adapter = get_adapter(model)
    if adapter.family != "timm":
        raise GmarError("the pytorch-grad-cam comparison is set up for timm ViTs only")
    layout = adapter.token_layout(tuple(images.shape[-2:]))

    def to_grid(tokens: torch.Tensor) -> torch.Tensor:
        patches = tokens[:, layout.patch_slice]
        return patches.reshape(patches.shape[0], *layout.grid_size, patches.shape[-1]).permute(0, 3, 1, 2)

    def run() -> object:
        with model_lock(model):
            # The package puts the model in eval mode and backpropagates into the parameters' .grad;
            # both are undone afterwards, so the other cases see the model as it was.
            modes = [(module, module.training) for module in model.modules()]
            grads = [(param, param.grad) for param in model.parameters()]
            cam = PackageGradCAM(model=model, target_layers=[model.blocks[-2]], reshape_transform=to_grid)
            try:
                return cam(input_tensor=images, targets=None)  # the predicted class of each image
            finally:
                cam.activations_and_grads.release()
                for module, training in modes:
                    module.training = training
                for param, grad in grads:
                    param.grad = grad

    return run


def _torchcam_gradcam(model: nn.Module, images: torch.Tensor) -> Callable[[], object]:
    """torchcam's ``GradCAM`` on the tokens entering the last block (``blocks[-2]``'s output, the
    block gmar's ``gradcam`` reads), explaining the predicted classes, as its documentation runs it:
    the user's forward pass, then the extractor called on its scores (parameters as they come)."""
    cam_class = _torchcam("GradCAM")
    layout = _timm_layout(model, images, "torchcam")

    def to_grid(tokens: torch.Tensor) -> torch.Tensor:
        patches = tokens[:, layout.patch_slice]
        return patches.reshape(patches.shape[0], *layout.grid_size, patches.shape[-1]).permute(0, 3, 1, 2)

    def run() -> torch.Tensor:
        with model_lock(model), cam_class(model, target_layer=model.blocks[-2], reshape_transform=to_grid) as cam:
            scores = model(images)
            return cam(class_idx=scores.argmax(dim=1).tolist(), scores=scores)[0]

    return run


def _torchcam_legrad(twin: nn.Module, images: torch.Tensor) -> Callable[[], object]:
    """torchcam's ``LeGrad`` on every block of a torchvision ``VisionTransformer``, explaining the
    predicted classes (the user's forward pass, then the extractor). Its readout for the layers'
    scores is its own (the head on the final norm of the *mean* token), not the class token, so its
    map differs from gmar's ``legrad``; the case measures time and memory only."""
    cam_class = _torchcam("LeGrad")

    def run() -> torch.Tensor:
        with model_lock(twin), cam_class(twin, list(twin.encoder.layers)) as cam:
            scores = twin(images)
            return cam(class_idx=scores.argmax(dim=1).tolist(), scores=scores)[0]

    return run


def _torchcam(name: str) -> type:
    try:
        import torchcam.methods
    except ImportError:
        raise GmarError("the comparison needs torchcam: pip install 'gmar[bench]'") from None
    return getattr(torchcam.methods, name)


def _timm_layout(model: nn.Module, images: torch.Tensor, peer: str):
    from gmar.adapters import get_adapter

    adapter = get_adapter(model)
    if adapter.family != "timm":
        raise GmarError(f"the {peer} comparison is set up for timm ViTs only")
    return adapter.token_layout(tuple(images.shape[-2:]))


def torchvision_twin(model: nn.Module) -> nn.Module:
    """A torchvision ``VisionTransformer`` computing what the timm ``VisionTransformer`` ``model``
    computes, with a copy of its weights (class-token readout, pre-norm blocks, no layer scale)."""
    try:
        from torchvision.models.vision_transformer import VisionTransformer
    except ImportError:
        raise GmarError("the torchvision twin needs torchvision: pip install 'gmar[torchvision]'") from None
    blocks = model.blocks
    first = blocks[0]
    plain = (
        type(model).__name__ == "VisionTransformer"
        and model.global_pool == "token"
        and model.num_prefix_tokens == 1
        and model.has_class_token
        and isinstance(model.fc_norm, nn.Identity)
        and isinstance(model.norm_pre, nn.Identity)
        and isinstance(first.ls1, nn.Identity)
        and first.attn.qkv.bias is not None
        and model.patch_embed.proj.kernel_size[0] == model.patch_embed.proj.kernel_size[1]
    )
    if not plain:
        raise GmarError("a torchvision twin exists only for plain timm ViTs (class token, pre-norm, no layer scale)")
    size = model.patch_embed.img_size
    if size[0] != size[1] or getattr(model, "dynamic_img_size", False):
        raise GmarError("a torchvision twin needs a square, fixed input size")
    twin = VisionTransformer(
        image_size=size[0],
        patch_size=model.patch_embed.proj.kernel_size[0],
        num_layers=len(blocks),
        num_heads=first.attn.num_heads,
        hidden_dim=model.embed_dim,
        mlp_dim=first.mlp.fc1.out_features,
        num_classes=model.num_classes,
    )
    copies = {
        "conv_proj": model.patch_embed.proj,
        "encoder.ln": model.norm,
        "heads.head": model.head,
    }
    for i, block in enumerate(blocks):
        layer = f"encoder.layers.encoder_layer_{i}"
        copies |= {
            f"{layer}.ln_1": block.norm1,
            f"{layer}.self_attention.out_proj": block.attn.proj,
            f"{layer}.ln_2": block.norm2,
            f"{layer}.mlp.0": block.mlp.fc1,
            f"{layer}.mlp.3": block.mlp.fc2,
        }
    state = {}
    for name, module in copies.items():
        state |= {f"{name}.{key}": value for key, value in module.state_dict().items()}
    for i, block in enumerate(blocks):
        layer = f"encoder.layers.encoder_layer_{i}.self_attention"
        state[f"{layer}.in_proj_weight"] = block.attn.qkv.weight
        state[f"{layer}.in_proj_bias"] = block.attn.qkv.bias
    state["class_token"] = model.cls_token
    state["encoder.pos_embedding"] = model.pos_embed
    with torch.no_grad():
        twin.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=True)
    parameter = next(model.parameters())
    return twin.to(device=parameter.device, dtype=parameter.dtype).eval()


def _torchcam_difference(model: nn.Module, images: torch.Tensor) -> float:
    """Largest difference between torchcam's GradCAM map and gmar's ``gradcam`` token map, both
    min-max normalised on the patch grid."""
    theirs = _torchcam_gradcam(model, images)().detach().cpu()
    ours = explain(model, images, method="gradcam").token_map.cpu()
    low = ours.flatten(1).amin(dim=1)[:, None, None]
    high = ours.flatten(1).amax(dim=1)[:, None, None]
    return float((theirs - (ours - low) / (high - low + 1e-8)).abs().max())


def _gradcam_difference(model: nn.Module, images: torch.Tensor) -> float:
    """Largest pixel difference between pytorch-grad-cam's map and gmar's ``gradcam`` (both in [0, 1])."""
    theirs = torch.from_numpy(_package_gradcam(model, images)())
    ours = explain(model, images, method="gradcam").heatmap.cpu()
    return float((theirs - ours).abs().max())


# ------------------------------------------------------------------------------------------ reports


def table(setting: Setting) -> str:
    """A Markdown table of one setting."""
    head = (
        f"{setting.model}, batch {setting.batch_size}, {setting.resolution}x{setting.resolution}, {setting.device}"
        f"{'' if setting.device.startswith('cuda') else f' ({setting.threads} threads)'}, median of {setting.repeats}"
    )
    lines = [
        head,
        "",
        "| case | ms | time ratio | peak MB | peak ratio | rise MB | rise ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in setting.rows:
        ratio = f"{row.ratio:.2f}× {row.baseline}" if row.ratio is not None else "baseline"
        lines.append(
            f"| {row.case} | {row.seconds * 1e3:.1f} | {ratio} | {_mb(row.peak)} | {_x(row.peak_ratio)} "
            f"| {_mb(row.rise)} | {_x(row.rise_ratio)} |"
        )
    if setting.gradcam_max_difference is not None:
        lines += [
            "",
            f"pytorch-grad-cam against gmar gradcam: max pixel difference {setting.gradcam_max_difference:.1e}",
        ]
    if setting.torchcam_max_difference is not None:
        lines += [
            "",
            f"torchcam GradCAM against gmar gradcam: max difference on the patch grid "
            f"{setting.torchcam_max_difference:.1e}",
        ]
    return "\n".join(lines)


def _mb(value: int | None) -> str:
    return "–" if value is None else f"{value / 2**20:.0f}"


def _x(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}×"


#: The files :func:`save` writes; none of them replaces a file gmar did not write.
FILES = ("bench.md", "bench.csv", "bench.json", "scaling.png")


def save(settings: list[Setting], out: Path) -> list[Path]:
    """Write ``bench.md``, ``bench.csv``, ``bench.json`` and, for several settings, ``scaling.png``."""
    outputs = OutputFolder(out)
    outputs.check(FILES)

    def write_csv(path: Path) -> None:
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["model", "batch_size", "resolution", "device", *Row.__dataclass_fields__])
            for s in settings:
                for row in s.rows:
                    writer.writerow([s.model, s.batch_size, s.resolution, s.device, *asdict(row).values()])

    records = json.dumps([asdict(s) for s in settings], indent=1)
    with outputs:  # the folder's list of outputs is folded once they are written
        paths = [
            outputs.write("bench.md", lambda path: path.write_text("\n\n".join(table(s) for s in settings) + "\n")),
            outputs.write("bench.csv", write_csv),
            outputs.write("bench.json", lambda path: path.write_text(records)),
        ]
        if len(settings) > 1:
            paths.append(outputs.write("scaling.png", lambda path: plot_scaling(settings, path)))
    return paths


def plot_scaling(settings: list[Setting], path: Path) -> Path:
    """Time ratio, time per image and peak-memory ratio of every case over the settings."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"b{s.batch_size}\n{s.resolution}px" for s in settings]
    names = [row.case for row in settings[0].rows]
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for index, name in enumerate(names):
        style = {"marker": "o", "label": name, "color": f"C{index % 10}"}  # one colour per case in every panel
        rows = [next((r for r in s.rows if r.case == name), None) for s in settings]
        per_image = [r.seconds / s.batch_size * 1e3 if r else math.nan for r, s in zip(rows, settings, strict=True)]
        axes[1].plot(labels, per_image, **style)
        if name in ("F", "FB"):
            continue
        axes[0].plot(labels, [r.ratio if r and r.ratio else math.nan for r in rows], **style)
        axes[2].plot(labels, [r.peak_ratio if r and r.peak_ratio else math.nan for r in rows], **style)
    axes[0].set_title("time / baseline (F or FB)")
    axes[1].set_title("ms per image")
    axes[1].set_yscale("log")
    axes[2].set_title("peak memory / baseline")
    for axis in axes:
        axis.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    figure.suptitle(f"{settings[0].model} on {settings[0].device}")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return os.uname().machine
