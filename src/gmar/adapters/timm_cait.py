"""timm ``Cait``: self-attention layers over the patch tokens, then class-attention layers in which
the class token reads the patches.

gmar sees CaiT as one sequence of ``N = 1 + P`` tokens, ``[class token, patches]``, through
``L_sa + L_ca`` layers, so that every method's pure functions take it unchanged:

- a self-attention layer leaves the class token as it is: its attention ``A`` ``(B, H, P, P)`` is
  embedded in ``(B, H, N, N)`` with the class token as an identity row and column;
- a class-attention layer leaves the patches as they are: the class token's row ``a``
  ``(B, H, 1, N)`` over ``[class token, patches]`` is stacked on identity rows for the patches.

The model really computes its attention outputs through these matrices (``E @ [0; v]`` and
``E @ v``), so gradients at the embedded entries are the model's own, and zero at the identity
entries. A self-attention layer's matrix is what multiplies ``v`` in timm's ``TalkingHeadAttn``:
the softmax's output mixed across heads by ``proj_w`` (its rows need not sum to one). The
definition of the rollout this gives is in ``docs/methods/attention.md``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from gmar.adapters.base import ModelAdapter, check_pooling, override_forward
from gmar.adapters.timm_vit import pixels_per_token, timm_class_names, timm_preprocess_config
from gmar.capture import Recorder
from gmar.errors import InputSizeError, UnsupportedModelError
from gmar.layout import TokenLayout
from gmar.preprocess import PreprocessConfig


class CaitAdapter(ModelAdapter):
    own_probabilities = "mixes its heads' attention logits (talking heads) and attends in two kinds of layer"

    # gmar's stages exist only while it instruments the model
    runs_own_attention = False
    family = "timm"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        if not type(model).__module__.startswith("timm."):
            return False
        from timm.models.cait import Cait

        return isinstance(model, Cait)

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        from timm.models.cait import ClassAttn, TalkingHeadAttn

        name = type(model).__name__
        if model.global_pool != "token":
            raise UnsupportedModelError(
                f"{name}: global_pool={model.global_pool!r} is not supported; gmar explains CaiT models that "
                "classify from the class token (global_pool='token', as every pretrained cait_*)"
            )
        if model.blocks_token_only is None or model.cls_token is None:
            raise UnsupportedModelError(
                f"{name}: a CaiT without its class-attention layers has no class token to explain"
            )
        self._attention: list[nn.Module] = []
        stages: list[nn.Module] = []
        for kind, blocks, attention, stage in (
            ("self-attention", model.blocks, TalkingHeadAttn, _SelfAttentionStage),
            ("class-attention", model.blocks_token_only, ClassAttn, _ClassAttentionStage),
        ):
            for index, block in enumerate(blocks):
                if not isinstance(getattr(block, "attn", None), attention):
                    raise UnsupportedModelError(
                        f"{name}: {kind} block {index} has {type(getattr(block, 'attn', None)).__name__} attention; "
                        f"gmar captures timm's {attention.__name__} there"
                    )
                self._attention.append(block.attn)
                stages.append(stage(block))
        #: gmar's blocks: each takes and returns the whole sequence ``(B, 1 + P, D)``
        self._stages = stages

    @property
    def num_layers(self) -> int:
        return len(self._stages)

    def token_layout(self, image_size: tuple[int, int]) -> TokenLayout:
        embed = self.model.patch_embed
        expected = tuple(embed.img_size)
        if tuple(image_size) != expected:
            raise InputSizeError(
                f"{type(self.model).__name__} takes {expected[0]}x{expected[1]} inputs, got "
                f"{image_size[0]}x{image_size[1]}; resize the images"
            )
        return TokenLayout(
            num_prefix_tokens=1,
            grid_size=tuple(embed.grid_size),  # type: ignore[arg-type]
            patch_size=pixels_per_token(embed),
            readout_prefix=(0,),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    @contextmanager
    def instrument(self, recorder: Recorder) -> Iterator[None]:
        with ExitStack() as stack:
            # The model runs its blocks through gmar's stages, which carry the whole sequence.
            override_forward(stack, self.model, self._forward_features, name="forward_features")
            for layer, (stage, attn) in enumerate(zip(self._stages, self._attention, strict=True)):
                core = _self_attention if isinstance(stage, _SelfAttentionStage) else _class_attention
                override_forward(stack, attn, partial(core, attn, layer, recorder))
            yield

    def _forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """``Cait.forward_features`` with the class token in the sequence from the start."""
        model = self.model
        x = model.pos_drop(model.patch_embed(images) + model.pos_embed)
        tokens = torch.cat([model.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        for stage in self._stages:
            tokens = stage(tokens)
        return model.norm(tokens)

    @property
    def blocks(self) -> Sequence[nn.Module]:
        return list(self._stages)

    def first_norm(self, layer: int) -> nn.Module:
        # The stage's input is the whole sequence entering the layer (its block's first norm sees
        # only the patches in a self-attention layer).
        return self._stages[layer]

    def readout(self, tokens: torch.Tensor, pooling: str = "model") -> tuple[torch.Tensor, torch.Tensor | None]:
        check_pooling(self, pooling)
        return self.model.forward_head(self.model.norm(tokens)), None

    def preprocess_config(self) -> PreprocessConfig:
        return timm_preprocess_config(self.model)

    def class_names(self) -> list[str] | None:
        return timm_class_names(self.model)


class _SelfAttentionStage(nn.Module):
    """A ``LayerScaleBlock`` on the patches of ``[class token, patches]``; the class token passes."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.cat([tokens[:, :1], self.block(tokens[:, 1:])], dim=1)


class _ClassAttentionStage(nn.Module):
    """A ``LayerScaleBlockClassAttn`` on ``[class token, patches]``; the patches pass."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.block(tokens[:, 1:], tokens[:, :1]), tokens[:, 1:]], dim=1)


def _self_attention(attn: nn.Module, layer: int, recorder: Recorder, x: torch.Tensor) -> torch.Tensor:
    """``TalkingHeadAttn.forward`` on the patches ``(B, P, C)``, its attention embedded in ``(B, H, 1+P, 1+P)``."""
    batch, patches, width = x.shape
    heads = attn.num_heads
    q, k, v = attn.qkv(x).reshape(batch, patches, 3, heads, width // heads).permute(2, 0, 3, 1, 4).unbind(0)
    logits = (q * attn.scale) @ k.transpose(-2, -1)
    logits = attn.proj_l(logits.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    weights = attn.proj_w(logits.softmax(dim=-1).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    weights = attn.attn_drop(weights)
    corner = torch.zeros(patches + 1, patches + 1, dtype=weights.dtype, device=weights.device)
    corner[0, 0] = 1.0
    embedded = F.pad(weights, (1, 0, 1, 0)) + corner  # the class token: an identity row and column
    context = recorder.attend_probabilities(layer, embedded, F.pad(v, (0, 0, 1, 0)))
    context = recorder.head_output(layer, context)
    x = context[:, :, 1:].transpose(1, 2).reshape(batch, patches, width)
    return attn.proj_drop(attn.proj(x))


def _class_attention(attn: nn.Module, layer: int, recorder: Recorder, x: torch.Tensor) -> torch.Tensor:
    """``ClassAttn.forward`` on ``[class token, patches]`` ``(B, N, C)``, the class token's row
    stacked on identity rows for the patches: ``(B, H, N, N)``."""
    batch, tokens, width = x.shape
    heads = attn.num_heads

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(batch, t.shape[1], heads, width // heads).transpose(1, 2)

    q, k, v = split(attn.q(x[:, :1])), split(attn.k(x)), split(attn.v(x))
    row = attn.attn_drop(((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1))
    eye = torch.eye(tokens, dtype=row.dtype, device=row.device)[1:]
    embedded = torch.cat([row, eye.expand(batch, heads, -1, -1)], dim=2)
    context = recorder.attend_probabilities(layer, embedded, v)
    context = recorder.head_output(layer, context)
    x_cls = context[:, :, :1].transpose(1, 2).reshape(batch, 1, width)
    return attn.proj_drop(attn.proj(x_cls))
