"""timm ``VisionTransformer`` and its relatives (DeiT distilled, register tokens, average pooling,
SigLIP-style attention pooling)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from gmar.adapters.base import ModelAdapter, additive_mask, check_pooling, override_forward, remove_all
from gmar.capture import Recorder, Residual, split_heads_hook
from gmar.errors import InputSizeError, UnsupportedModelError
from gmar.layout import TokenLayout
from gmar.preprocess import PreprocessConfig


class TimmAdapter(ModelAdapter):
    """timm's ``VisionTransformer``; the base of the other timm families (Eva, Beit), which share its
    token layout, pooling, readout and preprocessing and differ in their attention modules."""

    family = "timm"
    #: what the refusal of another attention module names as captured
    captured_attention = "timm's standard `Attention` (vit_*, deit_*, register and average-pooled variants)"

    @classmethod
    def model_classes(cls) -> tuple[type, ...]:
        """The timm model classes this adapter explains (imported only when asked)."""
        from timm.models.vision_transformer import VisionTransformer

        return (VisionTransformer,)

    @classmethod
    def attention_classes(cls) -> tuple[type, ...]:
        """The attention modules (``block.attn``) this adapter captures."""
        from timm.layers import Attention

        return (Attention,)

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return type(model).__module__.startswith("timm.") and isinstance(model, cls.model_classes())

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        name = type(model).__name__
        kinds = self.attention_classes()
        self._attention: list[nn.Module] = []
        for index, block in enumerate(model.blocks):
            attn = getattr(block, "attn", None)
            if not isinstance(attn, kinds):
                kind = type(attn).__name__ if attn is not None else "no 'attn'"
                raise UnsupportedModelError(
                    f"{name}: block {index} has {kind} attention; gmar captures {self.captured_attention}"
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
        if getattr(self.model, "dynamic_img_size", False):
            grid = tuple(embed.dynamic_feat_size(tuple(image_size)))
        else:
            expected = tuple(embed.img_size)
            if tuple(image_size) != expected:
                # Beit has no dynamic_img_size option: its relative position bias is tied to the grid.
                dynamic = hasattr(self.model, "dynamic_img_size")
                remedy = " or create the model with dynamic_img_size=True" if dynamic else ""
                raise InputSizeError(
                    f"{type(self.model).__name__} takes {expected[0]}x{expected[1]} inputs, got "
                    f"{image_size[0]}x{image_size[1]}; resize the images{remedy}"
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
            patch_size=pixels_per_token(embed),
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
                    # gmar computes the attention core itself, from the model's own q, k and v.
                    override_forward(stack, attn, self.streamed_forward(attn, layer, recorder))
                else:
                    # The fused kernel never materialises the probabilities: take the explicit path,
                    # whose dropout (an identity in eval mode) receives them.
                    stack.callback(setattr, attn, "fused_attn", attn.fused_attn)
                    attn.fused_attn = False
                    handles.append(attn.attn_drop.register_forward_hook(partial(_record_output, recorder, layer)))
                merged = _heads_input(attn)
                handles.append(merged.register_forward_pre_hook(split_heads_hook(layer, attn.num_heads, recorder)))
            yield

    def streamed_forward(self, attn: nn.Module, layer: int, recorder: Recorder) -> Callable[..., torch.Tensor]:
        """``attn.forward`` (eval mode) with the attention core computed by ``recorder.attend``."""
        return partial(_streamed_attention, attn, layer, recorder)

    def post_norm_blocks(self) -> tuple[type, ...]:
        """Block classes that normalise the attention's output rather than its input."""
        from timm.models.vision_transformer import ResPostBlock

        return (ResPostBlock,)

    @property
    def blocks(self) -> Sequence[nn.Module]:
        return list(self.model.blocks)

    def residuals(self) -> list[Residual] | None:
        # timm's pre-norm Block: x + drop_path1(ls1(attn(norm1(x)))), then x + drop_path2(ls2(mlp(norm2(x))))
        from timm.models.vision_transformer import Block

        sums: list[Residual] = []
        for block in self.model.blocks:
            if type(block) is not Block:
                return None
            sums += [Residual(block.norm1, block.drop_path1), Residual(block.norm2, block.drop_path2)]
        return sums

    def first_norm(self, layer: int) -> nn.Module:
        block = self.model.blocks[layer]
        # A post-norm block (ResPostBlock) normalises the attention's output: its first module on
        # the input tokens is the attention itself.
        return block.attn if isinstance(block, self.post_norm_blocks()) else block.norm1

    def readout(self, tokens: torch.Tensor, pooling: str = "model") -> tuple[torch.Tensor, torch.Tensor | None]:
        check_pooling(self, pooling)
        model = self.model
        x = tokens if pooling == "no_final_norm" else model.norm(tokens)
        if not self.attention_pooled:
            return model.forward_head(x), None
        # Eva pools every token (it has no pool_include_prefix); VisionTransformer says which it pools.
        if not getattr(model, "pool_include_prefix", True):
            x = x[:, model.num_prefix_tokens :]
        x, attention = attention_pool(model.attn_pool, x)
        x = model.head_drop(model.fc_norm(x))
        return model.head(x), attention

    def preprocess_config(self) -> PreprocessConfig:
        return timm_preprocess_config(self.model)

    def class_names(self) -> list[str] | None:
        return timm_class_names(self.model)


def timm_preprocess_config(model: nn.Module) -> PreprocessConfig:
    """How to prepare an image for a timm model, from its pretrained config and patch embedding."""
    from timm.data import resolve_data_config

    config = resolve_data_config({}, model=model)
    # The data config falls back to 224x224 for a model built without a pretrained config (or
    # with another img_size); the patch embedding states the size the model really takes.
    return PreprocessConfig(
        input_size=tuple(model.patch_embed.img_size),  # type: ignore[arg-type]
        mean=tuple(config["mean"]),  # type: ignore[arg-type]
        std=tuple(config["std"]),  # type: ignore[arg-type]
        interpolation=config.get("interpolation", "bicubic"),
        crop_pct=config.get("crop_pct", 1.0),
    )


def timm_class_names(model: nn.Module) -> list[str] | None:
    """The class names of a timm model's head: those its pretrained config carries, else the ImageNet
    subset's descriptions ("tabby, tabby cat") that timm ships, when the head has that subset's size."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    names = cfg.get("label_names")
    if names and len(names) == model.num_classes:
        return list(names)
    # timm ships the ImageNet subsets' class descriptions offline; its pretrained config says which
    # one a head was trained on (a head of another size, e.g. fine-tuned, matches none of them).
    try:
        from timm.data import ImageNetInfo, infer_imagenet_subset

        subset = infer_imagenet_subset(model)
        if subset:
            info = ImageNetInfo(subset)
            if info.num_classes() == model.num_classes:
                return info.label_descriptions()
    except (ImportError, OSError, ValueError, KeyError):
        pass
    return None


def pixels_per_token(embed: nn.Module) -> tuple[int, int]:
    """The pixels one token stands for along (H, W): the patch size of a plain patch embedding; for a
    hybrid one (a convolutional stem, then a patch projection on its features) the stem's stride times
    the projection's kernel, which timm states as ``feat_ratio``."""
    ratio = getattr(embed, "feat_ratio", None)
    if callable(ratio):
        return tuple(int(r) for r in ratio(as_scalar=False))  # type: ignore[return-value]
    return tuple(int(p) for p in embed.patch_size)  # type: ignore[return-value]


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
    return streamed_core(attn, layer, recorder, q, k, v, sdpa_mask(attn_mask, is_causal, q), gate)


def sdpa_mask(attn_mask: torch.Tensor | None, is_causal: bool, q: torch.Tensor) -> torch.Tensor | None:
    """An SDPA-style ``attn_mask`` / ``is_causal`` pair as one additive mask for ``q`` ``(B, H, N, d)``."""
    if is_causal:
        tokens = q.shape[-2]
        attn_mask = torch.ones(tokens, tokens, dtype=torch.bool, device=q.device).tril()
    return additive_mask(attn_mask, q.dtype, keep_where_true=True)


def streamed_core(
    attn: nn.Module,
    layer: int,
    recorder: Recorder,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    gate: torch.Tensor | None = None,
) -> torch.Tensor:
    """The rest of a timm attention module from its heads' ``q, k, v`` ``(B, H, N, d)``: the core
    ``softmax(q kᵀ · scale + mask) v`` through ``recorder.attend``, the heads merged, then the module's
    own output norm (where it has one), gate and projection. Returns ``(B, N, D)``."""
    batch, _, tokens, _ = q.shape
    x = recorder.attend(layer, q, k, v, scale=attn.scale, mask=mask)
    x = x.transpose(1, 2).reshape(batch, tokens, -1)
    if getattr(attn, "norm", None) is not None:
        x = attn.norm(x)
    if gate is not None:
        x = x * gate
    return attn.proj_drop(attn.proj(x))


def _heads_input(attn: nn.Module) -> nn.Module:
    """The first module that takes the heads' outputs concatenated: the attention's output norm
    where it has one (an identity by default), else its output projection (Beit)."""
    norm = getattr(attn, "norm", None)
    return norm if isinstance(norm, nn.Module) else attn.proj


def _record_output(recorder: Recorder, layer: int, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
    recorder.attention(layer, output)
