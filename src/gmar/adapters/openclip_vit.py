"""OpenCLIP models: the ``VisionTransformer`` image tower (``nn.MultiheadAttention`` blocks), and the
``TimmModel`` tower with a timm trunk gmar explains (a ViT as in SigLIP, with attention pooling; an
Eva as in ``EVA02-*`` and ``PE-Core-*``)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from gmar.adapters.base import ModelAdapter, check_pooling, override_forward
from gmar.adapters.mha import ExplicitAttention, multihead_attention_layers
from gmar.capture import Recorder
from gmar.errors import InputSizeError, UnsupportedModelError
from gmar.layout import TokenLayout
from gmar.preprocess import PreprocessConfig


class OpenCLIPAdapter(ModelAdapter):
    """The image tower of an OpenCLIP model; ``forward`` returns ``encode_image`` (not normalised).

    The output is an embedding, not logits, so targets must be callables on it (see
    :class:`gmar.TextTarget`). A ``TimmModel`` tower is handled through its timm trunk.
    """

    family = "openclip"
    is_classifier = False
    #: ``"all_tokens"``: the official LeGrad code's readout for CLIP towers, ``ln_post(mean of all tokens) @ proj``.
    extra_poolings = ("all_tokens",)

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return type(model).__module__.startswith("open_clip.")

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        from open_clip.timm_model import TimmModel
        from open_clip.transformer import VisionTransformer

        name = type(model).__name__
        visual = model if isinstance(model, (VisionTransformer, TimmModel)) else getattr(model, "visual", None)
        self._visual = visual
        self._trunk: ModelAdapter | None = None
        if isinstance(visual, TimmModel):
            self._trunk = _timm_trunk(name, visual.trunk)
            self.attention_pooled = self._trunk.attention_pooled
            self.extra_poolings = self._trunk.extra_poolings
            return
        if not isinstance(visual, VisionTransformer):
            tower = type(visual).__name__ if visual is not None else "no image tower"
            raise UnsupportedModelError(
                f"{name}: image tower {tower} is not supported; gmar explains OpenCLIP models whose "
                "`visual` is open_clip's VisionTransformer or a TimmModel with a timm trunk gmar supports"
            )
        if visual.attn_pool is not None:
            # CoCa: an attentional pooler's queries read every token; the embedding is its first query
            if visual.attn_pool_contrastive is not None or visual.pool_type not in ("tok", "avg"):
                raise UnsupportedModelError(
                    f"{name}: attentional pooling {visual.attn_pool_type!r} is not supported; gmar explains "
                    "OpenCLIP's CoCa towers (one pooler, attentional_pool=True)"
                )
            self.attention_pooled = True
            self.extra_poolings = ()
        elif visual.pool_type not in ("tok", "avg"):
            raise UnsupportedModelError(f"{name}: pool_type={visual.pool_type!r} is not supported")
        self._attention = multihead_attention_layers(
            visual.transformer.resblocks, "attn", name, "nn.MultiheadAttention blocks"
        )

    @property
    def num_layers(self) -> int:
        return self._trunk.num_layers if self._trunk else len(self._attention)

    def token_layout(self, image_size: tuple[int, int]) -> TokenLayout:
        if self._trunk:
            return self._trunk.token_layout(image_size)
        visual = self._visual
        patch = tuple(visual.conv1.kernel_size)
        grid = tuple(visual.grid_size)
        expected = (grid[0] * patch[0], grid[1] * patch[1])
        if tuple(image_size) != expected:
            raise InputSizeError(
                f"this OpenCLIP image tower takes {expected[0]}x{expected[1]} inputs, got "
                f"{image_size[0]}x{image_size[1]}"
            )
        average = visual.pool_type == "avg"
        pooled = self.attention_pooled
        return TokenLayout(
            num_prefix_tokens=1,
            grid_size=grid,  # type: ignore[arg-type]
            patch_size=patch,  # type: ignore[arg-type]
            readout_prefix=() if average or pooled else (0,),
            readout_patches=average and not pooled,
            attention_pooled=pooled,
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if hasattr(self.model, "encode_image"):
            output = self.model.encode_image(images, normalize=False)  # CoCa normalises by default
        else:
            output = self.model(images)
        return output[0] if isinstance(output, tuple) else output

    @contextmanager
    def instrument(self, recorder: Recorder) -> Iterator[None]:
        if self._trunk:
            with self._trunk.instrument(recorder):
                yield
            return
        with ExitStack() as stack:
            for layer, attn in enumerate(self._attention):
                # nn.MultiheadAttention computes its probabilities inside one functional call with
                # nothing to hook: give this instance an explicit forward for the duration.
                override_forward(stack, attn, ExplicitAttention(attn, layer, recorder))
            yield

    @property
    def blocks(self) -> Sequence[nn.Module]:
        return self._trunk.blocks if self._trunk else list(self._visual.transformer.resblocks)

    def first_norm(self, layer: int) -> nn.Module:
        return self._trunk.first_norm(layer) if self._trunk else self._visual.transformer.resblocks[layer].ln_1

    def block_tokens(self, tensor: torch.Tensor) -> torch.Tensor:
        if self._trunk or getattr(self._visual.transformer, "batch_first", True):
            return tensor
        return tensor.transpose(0, 1)

    def readout(self, tokens: torch.Tensor, pooling: str = "model") -> tuple[torch.Tensor, torch.Tensor | None]:
        check_pooling(self, pooling)
        visual = self._visual
        if self._trunk:
            output, attention = self._trunk.readout(tokens, pooling)
            return visual.head(output), attention
        if visual.attn_pool is not None:
            queries, attention = attentional_pool(visual.attn_pool, tokens)
            pooled = _global_pool(visual, visual.ln_post(queries))
            return (pooled @ visual.proj if visual.proj is not None else pooled), attention
        if pooling == "all_tokens":
            pooled = visual.ln_post(tokens.mean(dim=1))
        elif visual.final_ln_after_pool:
            pooled = visual.ln_post(_global_pool(visual, tokens))
        else:
            pooled = _global_pool(visual, visual.ln_post(tokens))
        return (pooled @ visual.proj if visual.proj is not None else pooled), None

    def preprocess_config(self) -> PreprocessConfig:
        from open_clip.model import get_model_preprocess_cfg

        cfg = get_model_preprocess_cfg(self.model)
        size = cfg.get("size", self._visual.image_size)
        size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        return PreprocessConfig(
            input_size=size,  # type: ignore[arg-type]
            mean=tuple(cfg.get("mean", (0.48145466, 0.4578275, 0.40821073))),  # type: ignore[arg-type]
            std=tuple(cfg.get("std", (0.26862954, 0.26130258, 0.27577711))),  # type: ignore[arg-type]
            interpolation=cfg.get("interpolation", "bicubic"),
        )


def _timm_trunk(name: str, trunk: nn.Module) -> ModelAdapter:
    """The adapter of a ``TimmModel`` tower's trunk: any timm family gmar explains (ViT, Eva, Beit, ...)."""
    from gmar.adapters import ADAPTERS

    for adapter in ADAPTERS:
        if adapter.family == "timm" and adapter.matches(trunk):
            return adapter(trunk)
    raise UnsupportedModelError(
        f"{name}: timm trunk {type(trunk).__name__} is not supported; gmar explains OpenCLIP timm towers whose "
        "trunk is a timm VisionTransformer, Eva (EVA02-*, PE-Core-*) or Beit"
    )


def _global_pool(visual: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """OpenCLIP's token pooling: the class token ('tok') or the mean of the patch tokens ('avg')."""
    return x[:, 0] if visual.pool_type == "tok" else x[:, 1:].mean(dim=1)


def attentional_pool(pool: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """OpenCLIP's ``AttentionalPooler`` on ``x`` ``(B, N, D)``, step by step: its queries' outputs
    ``(B, Q, d_model)`` and their attention ``(B, heads, Q, N)``, on the graph."""
    attn = pool.attn
    batch = x.shape[0]
    keys = pool.ln_k(x)
    queries = pool.ln_q(pool.query).unsqueeze(0).expand(batch, -1, -1)
    if attn._qkv_same_embed_dim:
        w_q, w_k, w_v = attn.in_proj_weight.chunk(3)
    else:
        w_q, w_k, w_v = attn.q_proj_weight, attn.k_proj_weight, attn.v_proj_weight
    b_q, b_k, b_v = attn.in_proj_bias.chunk(3) if attn.in_proj_bias is not None else (None,) * 3
    heads = attn.num_heads

    def split(t: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(t, weight, bias).view(batch, t.shape[1], heads, -1).transpose(1, 2)

    q, k, v = split(queries, w_q, b_q), split(keys, w_k, b_k), split(keys, w_v, b_v)
    attention = ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
    out = (attention @ v).transpose(1, 2).reshape(batch, q.shape[2], -1)
    return attn.out_proj(out), attention
