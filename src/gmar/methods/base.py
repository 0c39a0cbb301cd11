"""What every method shares: one captured forward, at most one backward, one Explanation."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from gmar.adapters import ModelAdapter, get_adapter
from gmar.capture import AttentionStream, Captured, GradientOf, RuleSet, capture, collect, frozen_eval, model_lock
from gmar.errors import CaptureError, InputSizeError, ModelLoadError, TargetError, UnsupportedModelError, warn
from gmar.explanation import Explanation, min_max, upsample
from gmar.layout import TokenLayout
from gmar.methods import functional as Fn
from gmar.targets import Target, TextTarget, prepare_images, resolve_target


class Explainer:
    """Base class. A method sets ``name``, ``uses_gradients`` and implements :meth:`relevance`,
    plus :meth:`reduce_attention` (forward-only methods) or :meth:`reduce_gradient` (gradient
    methods), which turn one layer's capture into what :meth:`relevance` needs of that layer.

    Calling an explainer runs the model once (eval mode, parameters frozen, attention captured)
    and, for gradient methods, takes one ``torch.autograd.grad`` call for the whole batch. The
    model is left as it was found, also when the call raises. Calls on one model from several
    threads run one at a time (:func:`gmar.capture.model_lock`); calls on different models do not
    wait for each other.

    With ``low_memory`` (the default) the attention runs through an
    :class:`~gmar.capture.AttentionStream`: each layer's core is computed in chunks of samples, a
    forward-only method reduces each chunk as it is formed, and a gradient method reduces each
    chunk's probabilities and gradient inside the backward pass, the probabilities formed again
    from ``q`` and ``k`` there. No layer's ``(B, H, N, N)`` attention or gradient is ever held
    whole, and the graph keeps only what a fused kernel keeps. ``low_memory = False`` is the
    plain path: the model's explicit attention on the graph, all gradients first, then the same
    reductions. Both give the same maps, up to float rounding.
    """

    name: ClassVar[str]
    uses_gradients: ClassVar[bool] = False
    #: The method reads fixed readout rows of the attention (the rollout family); an
    #: attention-pooled model (SigLIP's MAP head) has none.
    needs_readout_rows: ClassVar[bool] = True
    #: The method reads the model's token-to-token attention (all but Grad-CAM); a model without
    #: global attention (Swin's shifted windows) has none.
    needs_attention: ClassVar[bool] = True
    #: Each gradient input lies on the graph of the ones before it (the layers are chained), so
    #: the backward pass can stop at the first; False when every input is a dead end (LeGrad's
    #: graph is cut between blocks).
    chained_gradients: ClassVar[bool] = True
    #: What :meth:`reduce_gradient` gets the gradient of: each layer's attention probabilities
    #: or its heads' outputs.
    gradient_of: GradientOf = "attention"
    #: The method runs the model its own way (occlusion: once per window), never in a shared pass.
    runs_alone: ClassVar[bool] = False
    #: ``method="all"`` includes the method (False for the slow ones, which are asked by name).
    in_all: ClassVar[bool] = True
    #: Options for a smoke run that checks the method works on a model (``gmar models``), where its
    #: defaults would be slow for no gain (occlusion: one window over the whole grid).
    smoke_options: ClassVar[dict] = {}
    low_memory: bool = True

    def __init__(self, model: nn.Module, *, start_layer: int = 0) -> None:
        self.adapter = get_adapter(model)
        self.model = self.adapter.model
        refusal = self.refusal(self.adapter)
        if refusal is not None:
            raise UnsupportedModelError(refusal)
        layers = self.adapter.num_layers
        if layers == 0:
            raise CaptureError(f"{type(model).__name__} has no attention layers to explain")
        self.start_layer = self._layer_index(start_layer, "start_layer")

    @classmethod
    def refusal(cls, adapter: ModelAdapter) -> str | None:
        """Why this method cannot explain ``adapter``'s model (one line that names what can), or None."""
        name = type(adapter.model).__name__
        if cls.needs_readout_rows and adapter.attention_pooled:
            return (
                f"{name} pools its tokens with an attention head, so it has no readout token for {cls.name}; "
                "explain it with legrad, gradcam or occlusion"
            )
        if cls.needs_attention and adapter.no_global_attention:
            return (
                f"{name} {adapter.no_global_attention}, so it has no global token-to-token attention for "
                f"{cls.name}; explain it with gradcam or occlusion"
            )
        return None

    def _layer_index(self, index: int, what: str) -> int:
        layers = self.adapter.num_layers
        if isinstance(index, bool) or not isinstance(index, int) or not -layers <= index < layers:
            raise ValueError(
                f"{what} must be an int in [{-layers}, {layers}) for this {layers}-layer model, got {index}"
            )
        return index % layers

    def stream_rules(self) -> tuple[RuleSet, ...]:
        """The LRP rule sets the method's modified backward passes use (none for the others): the
        forward pass is instrumented for them, and always runs through the attention stream."""
        return ()

    def pixel_map(self, captured: Captured, reduced: list[Any], layout: TokenLayout) -> torch.Tensor | None:
        """A map ``(B, H, W)`` at the input's resolution, for a method whose relevance lives there (LRP's
        relevance at the pixels); None: the heatmap is the token map upsampled."""
        return None

    def capture_options(self) -> dict:
        """Keyword arguments for :func:`gmar.capture.capture` (what the method needs recorded)."""
        return {"head_outputs": self.uses_gradients and self.gradient_of == "output"}

    def reduce_attention(self, layer: int, attention: torch.Tensor) -> torch.Tensor | None:
        """What a forward-only method keeps of layer ``layer``'s attention ``(B, H, N, N)``.

        It must work per sample: it may be called on chunks of the batch, whose results are
        concatenated.
        """
        return attention

    def reduction_key(self) -> Hashable:
        """Explainers whose keys are equal reduce every layer identically (:meth:`reduce_attention`
        or :meth:`reduce_gradient`), so a pass shared by several methods computes it once."""
        return (type(self), id(self))

    def reduce_gradient(
        self,
        layer: int,
        gradient: torch.Tensor,
        attention: torch.Tensor | None,
        captured: Captured,
        layout: TokenLayout,
    ) -> Any:
        """What a gradient method keeps of layer ``layer``: ``gradient`` is the gradient w.r.t. the
        layer's attention ``(B, H, N, N)`` or heads' outputs ``(B, H, N, d)`` (:attr:`gradient_of`),
        ``attention`` the layer's probabilities. Per sample, like :meth:`reduce_attention`; the
        result is a tensor, a tuple of tensors, or None, and must not be ``gradient`` itself (its
        buffer may be reused once this returns).
        """
        raise NotImplementedError

    def relevance(
        self, captured: Captured, reduced: list[Any], layout: TokenLayout
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The token map ``(B, h, w)`` and the head weights ``(B, L, H)`` or None, from each layer's
        reduction (:meth:`reduce_gradient` for gradient methods, else :meth:`reduce_attention`)."""
        raise NotImplementedError

    def head_scores(self, reduced: list[Any]) -> torch.Tensor | None:
        """Each head's importance ``(B, L, H)`` before any per-layer normalisation, comparable across
        layers (what ranks heads), from the same reductions as :meth:`relevance`; None for a method
        without per-head scores."""
        return None

    def __call__(self, images: torch.Tensor, target: Target = None) -> Explanation:
        images, layout = self.inputs(images, target)
        # A method that reads no attention lets the model run its own (fused) attention.
        own_attention = not self.needs_attention and self.adapter.runs_own_attention
        with forward_pass(
            self.adapter,
            images,
            layout,
            target,
            gradients=self.uses_gradients,
            capture_options={**self.capture_options(), "attention": not own_attention},
            stream=(self.low_memory or bool(self.stream_rules())) and not own_attention,
            reduce_attention=None if self.uses_gradients else self.reduce_attention,
            rules=self.stream_rules(),
        ) as run:
            captured = run.captured
            if self.uses_gradients:
                reduced = self.gradients(captured, run.scores, run.classes, target, layout)  # type: ignore[arg-type]
            elif captured.stream is not None:
                reduced = captured.attentions
            else:
                reduced = [self.reduce_attention(i, a) for i, a in enumerate(captured.attentions)]
            with torch.no_grad():
                token_map, head_weights = self.relevance(captured, reduced, layout)
                head_scores = self.head_scores(reduced)
                pixels = self.pixel_map(captured, reduced, layout)
        return self.explanation(
            token_map,
            head_weights,
            captured,
            run.scores,
            run.classes,
            layout,
            images,
            target,
            head_scores=head_scores,
            pixels=pixels,
        )

    def inputs(self, images: torch.Tensor, target: Target = None) -> tuple[torch.Tensor, TokenLayout]:
        """The batch the model runs on (checked, on the model's device and dtype, shaped by ``target``:
        a :class:`~gmar.TextTarget` with several prompts repeats one image) and its token layout."""
        images = prepare_images(target, self._prepare(images))
        return images, self.adapter.token_layout(tuple(images.shape[-2:]))

    def explanation(
        self,
        token_map: torch.Tensor,
        head_weights: torch.Tensor | None,
        captured: Captured,
        scores: torch.Tensor | None,
        classes: torch.Tensor | None,
        layout: TokenLayout,
        images: torch.Tensor,
        target: Target,
        head_scores: torch.Tensor | None = None,
        pixels: torch.Tensor | None = None,
    ) -> Explanation:
        """This method's :class:`Explanation` of ``images`` from its token map (and its map at the
        input's resolution, when it has one: :meth:`pixel_map`)."""
        token_map = token_map.detach().float()
        own = None if pixels is None else pixels.detach().float()
        drawn = own if own is not None else upsample(token_map, layout, tuple(images.shape[-2:]))
        return Explanation(
            method=self.name,
            heatmap=min_max(drawn),
            token_map=token_map,
            target=classes,
            head_weights=head_weights,
            head_scores=head_scores,
            logits=captured.output.detach(),
            scores=None if scores is None else scores.detach(),
            layout=layout,
            prompts=_prompts(target, token_map.shape[0]),
            pixels=own,
        )

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a float tensor (B, 3, H, W), got {type(images).__name__}")
        if images.ndim == 3:
            images = images.unsqueeze(0)
        if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(f"images must be a float tensor (B, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        if images.shape[0] == 0:
            raise InputSizeError(f"empty batch: images has shape {tuple(images.shape)}; pass at least one image")
        if images.is_meta:
            raise ValueError(
                f"images are on the meta device (shapes without data): {tuple(images.shape)}; pass images that hold "
                "pixels, e.g. gmar.preprocess(gmar.load_image(path), config) or a tensor on cpu or cuda"
            )
        if any(t.is_meta for t in (*self.model.parameters(), *self.model.buffers())):
            raise ModelLoadError(
                f"the parameters of {type(self.model).__name__} are on the meta device (no weights loaded): "
                "materialise them with model.to_empty(device=...) and load the weights (load_state_dict) first"
            )
        parameter = next(self.model.parameters(), None)
        if parameter is not None:
            images = images.to(device=parameter.device, dtype=parameter.dtype)
        broken = (~torch.isfinite(images)).flatten(start_dim=1).any(dim=1)
        for index in broken.nonzero().flatten().tolist():
            warn(f"images[{index}] holds NaN or Inf values; its explanation (map, target and score) is meaningless")
        return images

    def gradients(
        self,
        captured: Captured,
        scores: torch.Tensor,
        classes: torch.Tensor | None,
        target: Target,
        layout: TokenLayout,
    ) -> list[Any]:
        """Every layer's reduced gradient of the summed scores, one backward pass."""
        return self.layer_gradients(scores.sum(), list(range(self.adapter.num_layers)), captured, layout)

    def layer_gradients(
        self,
        objective: torch.Tensor,
        layers: list[int],
        captured: Captured,
        layout: TokenLayout,
        retain_graph: bool = False,
    ) -> list[Any]:
        """``reduce_gradient`` of each of ``layers`` (its attention's or heads' outputs' gradient,
        :attr:`gradient_of`), in one backward pass."""
        if captured.stream is not None:

            def reduce(index: int, gradient: torch.Tensor, attention: torch.Tensor) -> Any:
                with torch.no_grad():
                    return self.reduce_gradient(layers[index], gradient, attention, captured, layout)

            return captured.stream.backward(
                objective,
                layers,
                reduce,
                gradient_of=self.gradient_of,
                chained=self.chained_gradients,
                retain_graph=retain_graph,
            )
        source = captured.head_outputs if self.gradient_of == "output" else captured.attentions
        if source is None:
            raise CaptureError(f"{self.name}: the heads' outputs were not captured")
        inputs = [source[layer] for layer in layers]
        attentions = [captured.attentions[layer] for layer in layers]
        return self.reduced_gradients(objective, inputs, attentions, captured, layout, retain_graph, layers=layers)

    def reduced_gradients(
        self,
        objective: torch.Tensor,
        inputs: list[torch.Tensor],
        attentions: list[torch.Tensor | None],
        captured: Captured,
        layout: TokenLayout,
        retain_graph: bool = False,
        layers: list[int] | None = None,
    ) -> list[Any]:
        """``reduce_gradient(layers[i], ∂ objective / ∂ inputs[i], attentions[i])`` for every input,
        in one backward pass (``layers`` defaults to the positions)."""
        labels = list(range(len(inputs))) if layers is None else layers

        def reduce(index: int, gradient: torch.Tensor) -> Any:
            with torch.no_grad():
                return self.reduce_gradient(labels[index], gradient, attentions[index], captured, layout)

        if not self.low_memory:
            return [reduce(i, g) for i, g in enumerate(differentiate(objective, inputs, retain_graph))]
        return stream_gradients(objective, inputs, reduce, chained=self.chained_gradients, retain_graph=retain_graph)


class GradientWeightedAttention(Explainer):
    """The per-layer reduction GAE and gradient rollout share (GAE's Eq. 5): ``mean_h ReLU(∂y/∂A_l ⊙
    A_l)`` from ``start_layer`` on, computed once per layer in a pass they share
    (:meth:`reduction_key`); the subclass says how the layers are combined (:meth:`relevance`)."""

    uses_gradients = True

    def reduce_gradient(self, layer, gradient, attention, captured, layout):
        if layer < self.start_layer:
            return None
        return Fn.gradient_weighted(attention.float(), gradient.float())  # type: ignore[union-attr]

    def reduction_key(self):
        return ("gradient_weighted", self.start_layer)


@dataclass
class ForwardPass:
    """What :func:`forward_pass` ran: the capture, the target's scores ``(B,)`` and classes (None when
    not scored or class-agnostic), and the call's cleanup stack (closed when the pass's block ends)."""

    captured: Captured
    scores: torch.Tensor | None
    classes: torch.Tensor | None
    cleanup: ExitStack


@contextmanager
def forward_pass(
    adapter: ModelAdapter,
    images: torch.Tensor,
    layout: TokenLayout,
    target: Target = None,
    *,
    gradients: bool = False,
    capture_options: Mapping[str, Any] | None = None,
    stream: bool = True,
    reduce_attention: Callable[[int, torch.Tensor], Any] | None = None,
    scored: bool = True,
    needs_target: bool | None = None,
    rules: Sequence[RuleSet] = (),
) -> Iterator[ForwardPass]:
    """The one forward pass every method's call runs, and the block that works on its results.

    Inside :func:`instrumented` (the model's lock, eval mode, frozen parameters, gradients on or off):
    ``images`` (from :meth:`Explainer.inputs`) run once through the model, captured with
    ``capture_options`` (:func:`gmar.capture.capture`'s keywords; the attention through an
    :class:`~gmar.capture.AttentionStream` when ``stream``, which ``reduce_attention`` reduces chunk by
    chunk for a forward-only method), and the output is scored for ``target`` (:func:`score`; a class is
    chosen even without gradients when ``needs_target``). ``capture_options=None`` runs the model as it
    is, nothing captured (occlusion, which then runs it again per window inside the block). The
    block's backward passes and reductions run with all of this still in place; on exit the stream is
    closed (freeing the graph) and the model is left as it was found.
    """
    with instrumented(adapter.model, gradients) as cleanup:
        if capture_options is None:
            captured = Captured(output=adapter.forward(images), attentions=[], head_outputs=None)
        else:
            attention_stream = None
            if stream:
                attention_stream = AttentionStream(adapter.num_layers, reduce_attention=reduce_attention, rules=rules)
                # The stream and the graph refer to each other; closing it frees the graph at once.
                cleanup.callback(attention_stream.close)
            captured = run_forward(adapter, images, layout, attention_stream, dict(capture_options), gradients)
        scores, classes = None, None
        if scored:
            scores, classes = score(
                adapter, captured.output, target, gradients if needs_target is None else needs_target
            )
        yield ForwardPass(captured, scores, classes, cleanup)


@contextmanager
def instrumented(model: nn.Module, gradients: bool) -> Iterator[ExitStack]:
    """Where a call on ``model`` runs: the model's lock held (another thread's call on this model
    waits, so neither sees the other's hooks, flags or frozen parameters), eval mode with frozen
    parameters, gradients on or off, and a stack for cleanups. ``inference_mode(False)``: gradient
    methods must work even when called under inference mode."""
    with (
        torch.inference_mode(False),
        model_lock(model),
        frozen_eval(model),
        torch.set_grad_enabled(gradients),
        ExitStack() as cleanup,
    ):
        yield cleanup


def run_forward(
    adapter: ModelAdapter,
    images: torch.Tensor,
    layout: TokenLayout,
    stream: AttentionStream | None,
    options: dict,
    gradients: bool,
) -> Captured:
    """One captured forward pass of ``images`` (``options`` go to :func:`gmar.capture.capture`)."""
    inputs = images.detach()
    if inputs.is_inference():
        inputs = inputs.clone()
    # With a leaf block (Grad-CAM's), the image needs no gradient: the blocks before it run unrecorded.
    inputs.requires_grad_(gradients and options.get("leaf_at") is None)
    with capture(adapter, stream=stream, **options) as recorder:
        output = adapter.forward(inputs)
    captured = collect(recorder, output, adapter.model)
    captured.inputs = inputs
    tokens = captured.num_tokens
    if not options.get("attention", True):  # no attention ran through gmar: count the block input's tokens
        tokens = adapter.block_tokens(captured.norm_input).shape[1]  # type: ignore[arg-type]
    if tokens != layout.num_tokens:
        raise CaptureError(
            f"captured {tokens} tokens, but the token layout of {type(adapter.model).__name__} "
            f"expects {layout.num_tokens}"
        )
    return captured


def score(
    adapter: ModelAdapter, output: torch.Tensor, target: Target, gradients: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The scores ``(B,)`` and classes to explain; none for a class-agnostic call on an embedding model."""
    if target is None and not gradients and not adapter.is_classifier:
        return None, None  # class-agnostic: an embedding model needs no target here
    return resolve_target(output, target, is_classifier=adapter.is_classifier)


def _prompts(target: Target, batch: int) -> list[str] | None:
    prompts = getattr(target, "prompts", None) if isinstance(target, TextTarget) else None
    if prompts is None:
        return None
    return list(prompts) * batch if len(prompts) == 1 else list(prompts)


def stream_gradients(
    objective: torch.Tensor,
    inputs: list[torch.Tensor],
    reduce: Callable[[int, torch.Tensor], Any],
    *,
    chained: bool,
    retain_graph: bool = False,
) -> list[Any]:
    """``[reduce(i, ∂ objective / ∂ inputs[i])]``, each reduced inside the backward pass.

    A tensor hook on every input reduces its gradient as soon as autograd has it; the gradient
    then flows on (or is freed), so no more than one layer's full gradient exists at a time. The
    backward pass runs to the first input when the inputs are ``chained`` (each later input lies
    on the graph between the objective and the first one), else to every input. The inputs where
    it stops hand autograd an all-zero stand-in without storage instead of their gradient, so
    ``autograd.grad`` returns nothing large. An input the objective does not reach is reduced
    from zeros, as :func:`differentiate` would give.
    """
    if not objective.requires_grad:
        raise TargetError("the target scores do not depend on the model's output, so they have no gradient")
    sinks = inputs[:1] if chained else inputs
    stops = {id(t) for t in sinks}
    results: list[Any] = [None] * len(inputs)
    done = [False] * len(inputs)

    def hook(index: int, stop: bool) -> Callable[[torch.Tensor], torch.Tensor | None]:
        def on_gradient(gradient: torch.Tensor) -> torch.Tensor | None:
            results[index], done[index] = reduce(index, gradient), True
            return gradient.new_zeros(()).expand_as(gradient) if stop else None

        return on_gradient

    handles = [t.register_hook(hook(i, id(t) in stops)) for i, t in enumerate(inputs) if t.requires_grad]
    try:
        torch.autograd.grad(objective, sinks, allow_unused=True, retain_graph=retain_graph)
    finally:
        for handle in handles:
            handle.remove()
    for index, tensor in enumerate(inputs):
        if not done[index]:
            results[index] = reduce(index, torch.zeros_like(tensor))
    return results


def differentiate(
    objective: torch.Tensor, inputs: list[torch.Tensor], retain_graph: bool = False
) -> list[torch.Tensor]:
    """``∂ objective / ∂ inputs`` (zeros for an input the objective does not reach)."""
    if not objective.requires_grad:
        raise TargetError("the target scores do not depend on the model's output, so they have no gradient")
    grads = torch.autograd.grad(objective, inputs, allow_unused=True, retain_graph=retain_graph)
    return [torch.zeros_like(t) if g is None else g for t, g in zip(inputs, grads, strict=True)]
