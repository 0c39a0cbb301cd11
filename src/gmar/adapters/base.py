"""The one interface every model family implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, ExitStack
from typing import ClassVar

import torch
from torch import nn

from gmar.capture import Gate, Recorder, Residual
from gmar.layout import TokenLayout
from gmar.preprocess import PreprocessConfig


class ModelAdapter(ABC):
    """What gmar needs to know about a model, and how to instrument it.

    One subclass per family (timm, Hugging Face, OpenCLIP). Everything family-specific lives in
    the subclass; methods only see captured tensors and a :class:`TokenLayout`.
    """

    family: ClassVar[str]
    #: True when ``forward`` returns class logits, False when it returns an embedding (CLIP).
    is_classifier: ClassVar[bool] = True
    #: Readout poolings :meth:`readout` takes besides ``"model"``.
    extra_poolings: ClassVar[tuple[str, ...]] = ()
    #: Why the model has no global token-to-token attention, as "attends within ..." (None: it has).
    #: Only methods that need no attention (Grad-CAM) explain such a model; its layers report
    #: :meth:`Recorder.no_attention`.
    no_global_attention: ClassVar[str | None] = None
    #: True when :attr:`blocks` and :meth:`first_norm` work while the model runs its own attention
    #: uninstrumented (so a method that reads no attention, Grad-CAM, can leave it alone).
    runs_own_attention: ClassVar[bool] = True

    def __init__(self, model: nn.Module) -> None:
        from gmar.versions import check_supported

        check_supported(self.family)  # an older zoo is refused before the model is touched
        self.model = model
        #: True when the model pools its tokens with an attention head (SigLIP's MAP pooler).
        self.attention_pooled = False

    @classmethod
    @abstractmethod
    def matches(cls, model: nn.Module) -> bool:
        """Whether ``model`` belongs to this family (cheap; imports nothing it need not)."""

    @property
    @abstractmethod
    def num_layers(self) -> int:
        """Number of attention layers."""

    @abstractmethod
    def token_layout(self, image_size: tuple[int, int]) -> TokenLayout:
        """Token layout for an input of ``image_size = (H, W)``; raises if the model cannot take it."""

    @abstractmethod
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The model's output for ``(B, 3, H, W)``: logits ``(B, classes)`` or an embedding ``(B, D)``."""

    @abstractmethod
    def instrument(self, recorder: Recorder) -> AbstractContextManager[None]:
        """Context manager: make every attention layer report to ``recorder``; undo it all on exit."""

    @property
    @abstractmethod
    def blocks(self) -> Sequence[nn.Module]:
        """The transformer blocks in order; each takes the tokens first and returns the tokens."""

    @abstractmethod
    def first_norm(self, layer: int) -> nn.Module:
        """The first module block ``layer`` applies to its input tokens (so that module's input is the
        block's input): the first norm of a pre-norm block, the attention of a post-norm one."""

    def block_tokens(self, tensor: torch.Tensor) -> torch.Tensor:
        """A tensor in the blocks' token layout as ``(B, N, D)`` (OpenCLIP may run sequence-first)."""
        return tensor

    @abstractmethod
    def readout(self, tokens: torch.Tensor, pooling: str = "model") -> tuple[torch.Tensor, torch.Tensor | None]:
        """Tokens ``(B, N, D)`` through the model's own final norm, pooling and head.

        Returns the output (logits or embedding, as :meth:`forward`) and, for an attention-pooled
        model, the pooler's attention ``(B, heads, queries, keys)`` on the graph (else None). Given
        the last block's output it reproduces :meth:`forward`. ``pooling="model"`` pools as the
        model does; the adapter may offer others (:attr:`extra_poolings`).
        """

    #: Why the adapter's attention cores take probabilities the model formed itself in a way AttnLRP's
    #: rule through the softmax cannot follow (CaiT's talking heads), or None.
    own_probabilities: ClassVar[str | None] = None

    def relevance_modules(self) -> list[tuple[str, nn.Module]]:
        """The modules LRP rules act on, with their kind (``"linear"``, ``"conv"``, ``"norm"``,
        ``"activation"``, ``"scale"``): by default every such module of the model, found by type
        (:func:`gmar.capture.rules.discover`). Everything between them must be linear (reshapes,
        selections, sums, constant factors) for the gradient-convention rules to hold."""
        from gmar.capture.rules import discover

        return discover(self.model)  # type: ignore[return-value]

    def gates(self) -> list[Gate]:
        """Every element-wise product of two branches the rules must split (by default timm's ``SwiGLU``
        MLPs, found by type: :func:`gmar.capture.rules.discover_gates`)."""
        from gmar.capture.rules import discover_gates

        return discover_gates(self.model)

    def residuals(self) -> list[Residual] | None:
        """Every residual sum of the blocks (for rules that split them, Chefer et al.'s), or None
        when the adapter does not declare them."""
        return None

    def preprocess_config(self) -> PreprocessConfig:
        """How to turn an image file into this model's input."""
        return PreprocessConfig()

    def class_names(self) -> list[str] | None:
        """Names of the output classes, where the model carries them."""
        return None


def remove_all(handles: list) -> Callable[[], None]:
    """A callback that removes every hook handle in ``handles`` (for ``ExitStack.callback``)."""

    def remove() -> None:
        for handle in handles:
            handle.remove()
        handles.clear()

    return remove


def override_forward(stack: ExitStack, module: nn.Module, forward: Callable, name: str = "forward") -> None:
    """Give ``module`` (this instance only) another method ``name`` (``forward``) until ``stack`` closes."""
    own = module.__dict__.get(name)
    setattr(module, name, forward)
    if own is None:
        stack.callback(module.__dict__.pop, name, None)
    else:
        stack.callback(setattr, module, name, own)


def additive_mask(mask: torch.Tensor | None, dtype: torch.dtype, *, keep_where_true: bool) -> torch.Tensor | None:
    """An attention mask as an additive float mask; a boolean mask marks the pairs kept
    (``keep_where_true``, PyTorch's SDPA convention) or the pairs masked out (``nn.MultiheadAttention``)."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    blocked = ~mask if keep_where_true else mask
    return torch.zeros(blocked.shape, dtype=dtype, device=blocked.device).masked_fill(blocked, float("-inf"))


def check_pooling(adapter: ModelAdapter, pooling: str) -> None:
    if pooling != "model" and pooling not in adapter.extra_poolings:
        offered = ", ".join(repr(p) for p in ("model", *adapter.extra_poolings))
        raise ValueError(f"pooling {pooling!r} is not offered for {type(adapter.model).__name__}; choose {offered}")
