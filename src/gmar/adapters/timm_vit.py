"""timm ``VisionTransformer`` and its relatives (DeiT distilled, register tokens, average pooling,
SigLIP-style attention pooling)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from gmar.adapters.base import ModelAdapter, additive_mask, check_pooling, override_forward, remove_all
from gmar.capture import Recorder, split_heads_hook
from gmar.errors import InputSizeError, UnsupportedModelError
from gmar.layout import TokenLayout
from gmar.preprocess import PreprocessConfig


class TimmAdapter(ModelAdapter):
    family = "timm"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        if not type(model).__module__.startswith("timm."):
            return False
        from timm.models.vision_transformer import VisionTransformer

        return isinstance(model, VisionTransformer)

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        from timm.layers import Attention

        name = type(model).__name__
        self._attention: list[nn.Module] = []
        for index, block in enumerate(model.blocks):
            attn = getattr(block, "attn", None)
            if not isinstance(attn, Attention):
                kind = type(attn).__name__ if attn is not None else "no 'attn'"
                raise UnsupportedModelError(
                    f"{name}: block {index} has {kind} attention; gmar captures timm's standard "
                    "`Attention` (vit_*, deit_*, register and average-pooled variants)"
                )
            self._attention.append(attn)
        self._distilled = hasattr(model, "dist_token") and hasattr(model, "head_dist")
        pool = "token" if self._distilled else model.global_pool
        attn_pool = getattr(model, "attn_pool", None)
        if attn_pool is not None:
            from timm.layers import AttentionPoolLatent

            if not isinstance(attn_pool, AttentionPoolLatent):
                raise UnsupportedModelError(f"{name}: attention pooler {type(attn_pool).__name__} is not supported")
            pool = "map"
            self.attention_pooled = True
            #: the official LeGrad code's readout for attention-pooled towers: no final norm before the pooler
            self.extra_poolings = ("no_final_norm",)
        if pool not in ("token", "avg", "map"):
            raise UnsupportedModelError(
                f"{name}: global_pool={pool!r} is not supported; gmar explains timm ViTs that read the "
                "class token ('token'), average the patch tokens ('avg') or pool with attention ('map')"
            )
        if pool == "avg" and getattr(model, "pool_include_prefix", False):
            raise UnsupportedModelError(f"{name}: average pooling that includes the prefix tokens is not supported")
        self._pool = pool

    @property
    def num_layers(self) -> int:
        return len(self._attention)

    def token_layout(self, image_size: tuple[int, int]) -> TokenLayout:
        embed = self.model.patch_embed
        if self.model.dynamic_img_size:
            grid = tuple(embed.dynamic_feat_size(tuple(image_size)))
        else:
            expected = tuple(embed.img_size)
            if tuple(image_size) != expected:
                raise InputSizeError(
                    f"{type(self.model).__name__} takes {expected[0]}x{expected[1]} inputs, got "
                    f"{image_size[0]}x{image_size[1]}; resize the images or create the model with "
                    "dynamic_img_size=True"
                )
            grid = tuple(embed.grid_size)
        prefix = self.model.num_prefix_tokens
        if self._pool == "token":
            readout: tuple[int, ...] = (0, 1) if self._distilled else (0,)
        else:
            readout = ()
        return TokenLayout(
            num_prefix_tokens=prefix,
            grid_size=grid,  # type: ignore[arg-type]
            patch_size=_pixels_per_token(embed),
            readout_prefix=readout,
            readout_patches=self._pool == "avg",
            attention_pooled=self.attention_pooled,
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    @contextmanager
    def instrument(self, recorder: Recorder) -> Iterator[None]:
        handles: list = []
        with ExitStack() as stack:
            stack.callback(remove_all(handles))
            for layer, attn in enumerate(self._attention):
                if recorder.stream is not None:
                    # gmar computes the attention core itself, from timm's q, k and v.
                    override_forward(stack, attn, partial(_streamed_attention, attn, layer, recorder))
                else:
                    # The fused kernel never materialises the probabilities: take the explicit path.
                    stack.callback(setattr, attn, "fused_attn", attn.fused_attn)
                    attn.fused_attn = False
                    handles.append(attn.attn_drop.register_forward_hook(partial(_record_output, recorder, layer)))
                handles.append(attn.norm.register_forward_pre_hook(split_heads_hook(layer, attn.num_heads, recorder)))
            yield

    @property
    def blocks(self) -> Sequence[nn.Module]:
        return list(self.model.blocks)

    def first_norm(self, layer: int) -> nn.Module:
        block = self.model.blocks[layer]
        # A post-norm block (ResPostBlock) normalises the attention's output: its first module on
        # the input tokens is the attention itself.
        return block.attn if isinstance(block, _post_norm_blocks()) else block.norm1

    def head_projections(self) -> list[tuple[nn.Module, int]]:
        return [(attn.proj, attn.num_heads) for attn in self._attention]

    def readout(self, tokens: torch.Tensor, pooling: str = "model") -> tuple[torch.Tensor, torch.Tensor | None]:
        check_pooling(self, pooling)
        model = self.model
        x = tokens if pooling == "no_final_norm" else model.norm(tokens)
        if not self.attention_pooled:
            return model.forward_head(x), None
        if not model.pool_include_prefix:
            x = x[:, model.num_prefix_tokens :]
        x, attention = attention_pool(model.attn_pool, x)
        x = model.head_drop(model.fc_norm(x))
        return model.head(x), attention

    def preprocess_config(self) -> PreprocessConfig:
        from timm.data import resolve_data_config

        config = resolve_data_config({}, model=self.model)
        # The data config falls back to 224x224 for a model built without a pretrained config (or
        # with another img_size); the patch embedding states the size the model really takes.
        return PreprocessConfig(
            input_size=tuple(self.model.patch_embed.img_size),  # type: ignore[arg-type]
            mean=tuple(config["mean"]),  # type: ignore[arg-type]
            std=tuple(config["std"]),  # type: ignore[arg-type]
            interpolation=config.get("interpolation", "bicubic"),
            crop_pct=config.get("crop_pct", 1.0),
        )

    def class_names(self) -> list[str] | None:
        cfg = getattr(self.model, "pretrained_cfg", None) or {}
        names = cfg.get("label_names")
        if names and len(names) == self.model.num_classes:
            return list(names)
        return None


def _pixels_per_token(embed: nn.Module) -> tuple[int, int]:
    """The pixels one token stands for along (H, W): the patch size of a plain patch embedding; for a
    hybrid one (a convolutional stem, then a patch projection on its features) the stem's stride times
    the projection's kernel, which timm states as ``feat_ratio``."""
    ratio = getattr(embed, "feat_ratio", None)
    if callable(ratio):
        return tuple(int(r) for r in ratio(as_scalar=False))  # type: ignore[return-value]
    return tuple(int(p) for p in embed.patch_size)  # type: ignore[return-value]


def _post_norm_blocks() -> tuple[type, ...]:
    from timm.models.vision_transformer import ResPostBlock

    return (ResPostBlock,)


def attention_pool(pool: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """timm's ``AttentionPoolLatent`` on ``x`` ``(B, N, D)``, computed step by step.

    Returns the pooled output and the pooler's attention ``(B, heads, latents, N)``, which lies on
    the graph (the module's own forward may use a fused kernel that never forms it).
    """
    batch, tokens, width = x.shape
    if pool.pos_embed is not None:
        x = x + pool.pos_embed.unsqueeze(0).to(x.dtype)
    latent = pool.latent.expand(batch, -1, -1)
    q = pool.q(latent).reshape(batch, pool.latent_len, pool.num_heads, pool.head_dim).transpose(1, 2)
    k, v = pool.kv(x).reshape(batch, tokens, 2, pool.num_heads, pool.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = pool.q_norm(q), pool.k_norm(k)
    attention = F.softmax((q * pool.scale) @ k.transpose(-2, -1), dim=-1)
    out = (attention @ v).transpose(1, 2).reshape(batch, pool.latent_len, width)
    out = pool.proj_drop(pool.proj(out))
    if pool.mlp is not None:
        out = out + pool.mlp(pool.norm(out))
    if pool.pool == "token":
        out = out[:, 0]
    elif pool.pool == "avg":
        out = out.mean(1)
    return out, attention


def _streamed_attention(
    attn: nn.Module,
    layer: int,
    recorder: Recorder,
    x: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
) -> torch.Tensor:
    """timm's ``Attention.forward`` (eval mode) with the core computed by ``recorder.attend``."""
    batch, tokens, _ = x.shape
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    qkv = attn.qkv(x).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if is_causal:
        attn_mask = torch.ones(tokens, tokens, dtype=torch.bool, device=x.device).tril()
    mask = additive_mask(attn_mask, q.dtype, keep_where_true=True)
    x = recorder.attend(layer, q, k, v, scale=attn.scale, mask=mask)
    x = attn.norm(x.transpose(1, 2).reshape(batch, tokens, -1))
    if gate is not None:
        x = x * gate
    return attn.proj_drop(attn.proj(x))


def _record_output(recorder: Recorder, layer: int, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
    recorder.attention(layer, output)
