"""Hand-written reference computations for the explanation methods.

Nothing here calls gmar. Attention ``A_l`` ``(B, H, N, N)``, per-head outputs ``O_l = A_l @ V_l``
``(B, H, N, d)`` and their gradients are obtained independently of the library:

* timm and OpenCLIP: a forward pass written out from the model's weights (checked against the
  model's own output by :func:`trace`'s callers);
* Hugging Face: an eager-attention copy of the model called with ``output_attentions=True`` and a
  forward pre-hook on each output projection (``o_proj``, ``out_proj``) that keeps the concatenated heads
  (transformers' timm wrapper: the timm forward of its ``timm_model``).

The methods are then computed from their definitions on those tensors.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Trace:
    """One graph-connected forward pass."""

    output: torch.Tensor  # logits (B, C) or a CLIP embedding (B, D)
    attentions: list[torch.Tensor]  # A_l (B, H, N, N)
    head_graph: list[torch.Tensor]  # the tensors holding O_l that lie on the graph
    split_heads: Callable[[torch.Tensor], torch.Tensor]  # a head_graph-shaped tensor -> (B, H, N, d)
    readout: torch.Tensor  # (N,) weights of the rows the head reads
    num_prefix: int
    grid: tuple[int, int]
    #: residual-stream tokens (B, N, D): tokens[l] enters block l, tokens[L] leaves the last block
    tokens: list[torch.Tensor] | None = None
    #: CaiT: ``embed(l, X, value)`` puts layer ``l``'s own attention (or its gradient) into the
    #: ``(B, H, N, N)`` of the whole sequence, ``value`` on the identity entries (1 for attention, 0 for
    #: a gradient); None: the attentions are already ``(B, H, N, N)``
    embed: Callable[[int, torch.Tensor, float], torch.Tensor] | None = None

    @property
    def head_outputs(self) -> list[torch.Tensor]:
        return [self.split_heads(t) for t in self.head_graph]

    def embedded(self, layer: int, tensor: torch.Tensor, value: float) -> torch.Tensor:
        return tensor if self.embed is None else self.embed(layer, tensor, value)


@dataclass
class Gradients:
    """``∂(Σ_b y_b)`` with respect to every layer's attention and head outputs, all detached."""

    output: torch.Tensor
    scores: torch.Tensor  # y (B,)
    classes: torch.Tensor | None  # (B,) or None for a callable target
    attentions: list[torch.Tensor]  # A_l
    head_outputs: list[torch.Tensor]  # O_l (B, H, N, d)
    grad_attentions: list[torch.Tensor]  # ∂y/∂A_l
    grad_head_outputs: list[torch.Tensor]  # ∂y/∂O_l (B, H, N, d)
    readout: torch.Tensor
    num_prefix: int
    grid: tuple[int, int]


def readout_weights(num_tokens: int, num_prefix: int, prefix_rows: tuple[int, ...], patches: bool) -> torch.Tensor:
    """Equal weight per group (the listed prefix rows, the patch rows), split equally inside each group."""
    weights = torch.zeros(num_tokens)
    groups = (1 if prefix_rows else 0) + (1 if patches else 0)
    for row in prefix_rows:
        weights[row] += 1.0 / groups / len(prefix_rows)
    if patches:
        weights[num_prefix:] += 1.0 / groups / (num_tokens - num_prefix)
    return weights


# --------------------------------------------------------------------------------------------------- forwards


def _layer_norm(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if isinstance(module, nn.Identity):
        return x
    assert isinstance(module, nn.LayerNorm), type(module)
    return F.layer_norm(x, module.normalized_shape, module.weight, module.bias, module.eps)


def _scale(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm / OpenCLIP layer scale (``gamma``) or Identity."""
    if isinstance(module, nn.Identity):
        return x
    return x * module.gamma


def _activation(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if isinstance(module, nn.GELU):
        return F.gelu(x, approximate=module.approximate)
    if type(module).__name__ == "QuickGELU":
        return x * torch.sigmoid(1.702 * x)
    raise AssertionError(f"unexpected activation {type(module).__name__}")


def _self_attention(x, w_q, b_q, w_k, b_k, w_v, b_v, heads):
    """Multi-head self-attention up to the per-head context: returns ``A`` and ``O = A @ V``."""
    batch, tokens, _ = x.shape

    def project(weight, bias):
        return F.linear(x, weight, bias).view(batch, tokens, heads, -1).permute(0, 2, 1, 3)

    q, k, v = project(w_q, b_q), project(w_k, b_k), project(w_v, b_v)
    logits = torch.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(q.shape[-1])
    attention = torch.softmax(logits, dim=-1)
    return attention, torch.einsum("bhij,bhjd->bhid", attention, v)


def _merge(heads: torch.Tensor) -> torch.Tensor:
    batch, h, tokens, d = heads.shape
    return heads.permute(0, 2, 1, 3).reshape(batch, tokens, h * d)


def trace_timm(model: nn.Module, images: torch.Tensor) -> Trace:
    """timm ``VisionTransformer`` / ``VisionTransformerDistilled``, written out from the weights."""
    distilled = hasattr(model, "dist_token") and hasattr(model, "head_dist")
    conv = model.patch_embed.proj
    x = F.conv2d(images, conv.weight, conv.bias, stride=conv.stride)  # (B, C, gh, gw)
    batch, width, gh, gw = x.shape
    x = _layer_norm(model.patch_embed.norm, x.flatten(2).transpose(1, 2))

    prefix = []
    if model.cls_token is not None:
        prefix.append(model.cls_token)
    if distilled:
        prefix.append(model.dist_token)
    elif model.reg_token is not None:
        prefix.append(model.reg_token)
    prefix = torch.cat(prefix, dim=1) if prefix else x.new_zeros(1, 0, width)
    num_prefix = prefix.shape[1]
    assert num_prefix == model.num_prefix_tokens

    pos = model.pos_embed
    pos_prefix = 0 if model.no_embed_class else num_prefix
    patch_pos = pos[:, pos_prefix:]
    old = tuple(model.patch_embed.grid_size)
    if (gh, gw) != old:  # timm's dynamic_img_size: bicubic, antialiased resampling of the patch part
        grid_pos = patch_pos.reshape(1, *old, width).permute(0, 3, 1, 2)
        grid_pos = F.interpolate(grid_pos, size=(gh, gw), mode="bicubic", antialias=True, align_corners=False)
        patch_pos = grid_pos.permute(0, 2, 3, 1).reshape(1, gh * gw, width)
    tokens = prefix.expand(batch, -1, -1)
    if model.no_embed_class:
        x = torch.cat([tokens, x + patch_pos], dim=1)
    else:
        x = torch.cat([tokens, x], dim=1) + torch.cat([pos[:, :pos_prefix], patch_pos], dim=1)
    x = _layer_norm(model.norm_pre, x)

    attentions, outputs, stream = [], [], [x]
    for block in model.blocks:
        attn = block.attn
        assert isinstance(attn.q_norm, nn.Identity) and isinstance(attn.norm, nn.Identity)
        w_q, w_k, w_v = attn.qkv.weight.chunk(3)
        b_q, b_k, b_v = attn.qkv.bias.chunk(3) if attn.qkv.bias is not None else (None, None, None)
        a, o = _self_attention(_layer_norm(block.norm1, x), w_q, b_q, w_k, b_k, w_v, b_v, attn.num_heads)
        attentions.append(a)
        outputs.append(o)
        x = x + _scale(block.ls1, F.linear(_merge(o), attn.proj.weight, attn.proj.bias))
        mlp = block.mlp
        hidden = _activation(mlp.act, F.linear(_layer_norm(block.norm2, x), mlp.fc1.weight, mlp.fc1.bias))
        x = x + _scale(block.ls2, F.linear(hidden, mlp.fc2.weight, mlp.fc2.bias))
        stream.append(x)
    x = _layer_norm(model.norm, x)

    n = x.shape[1]
    if distilled:
        logits = (F.linear(x[:, 0], model.head.weight, model.head.bias)
                  + F.linear(x[:, 1], model.head_dist.weight, model.head_dist.bias)) / 2  # fmt: skip
        readout = readout_weights(n, num_prefix, (0, 1), patches=False)
    elif model.global_pool == "token":
        logits = F.linear(_layer_norm(model.fc_norm, x[:, 0]), model.head.weight, model.head.bias)
        readout = readout_weights(n, num_prefix, (0,), patches=False)
    elif model.global_pool == "avg":
        pooled = x[:, num_prefix:].mean(dim=1)
        logits = F.linear(_layer_norm(model.fc_norm, pooled), model.head.weight, model.head.bias)
        readout = readout_weights(n, num_prefix, (), patches=True)
    else:
        raise AssertionError(f"unexpected global_pool {model.global_pool!r}")
    return Trace(logits, attentions, outputs, lambda t: t, readout, num_prefix, (gh, gw), stream)


def trace_openclip(model: nn.Module, images: torch.Tensor) -> Trace:
    """OpenCLIP ``CLIP.visual`` (VisionTransformer, token pooling), written out from the weights."""
    visual = model.visual
    assert visual.pool_type == "tok" and visual.attn_pool is None
    x = F.conv2d(images, visual.conv1.weight, visual.conv1.bias, stride=visual.conv1.stride)
    batch, width, gh, gw = x.shape
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([visual.class_embedding.view(1, 1, width).expand(batch, 1, width), x], dim=1)
    x = _layer_norm(visual.ln_pre, x + visual.positional_embedding)

    attentions, outputs, stream = [], [], [x]
    for block in visual.transformer.resblocks:
        mha = block.attn
        w_q, w_k, w_v = mha.in_proj_weight.chunk(3)
        b_q, b_k, b_v = mha.in_proj_bias.chunk(3)
        a, o = _self_attention(_layer_norm(block.ln_1, x), w_q, b_q, w_k, b_k, w_v, b_v, mha.num_heads)
        attentions.append(a)
        outputs.append(o)
        x = x + _scale(block.ls_1, F.linear(_merge(o), mha.out_proj.weight, mha.out_proj.bias))
        hidden = F.linear(_layer_norm(block.ln_2, x), block.mlp.c_fc.weight, block.mlp.c_fc.bias)
        hidden = _activation(block.mlp.gelu, hidden)
        x = x + _scale(block.ls_2, F.linear(hidden, block.mlp.c_proj.weight, block.mlp.c_proj.bias))
        stream.append(x)
    embedding = _layer_norm(visual.ln_post, x[:, 0]) @ visual.proj
    readout = readout_weights(x.shape[1], 1, (0,), patches=False)
    return Trace(embedding, attentions, outputs, lambda t: t, readout, 1, (gh, gw), stream)


def trace_torchvision(model: nn.Module, images: torch.Tensor) -> Trace:
    """torchvision's ``VisionTransformer``, written out from the weights."""
    x = F.conv2d(images, model.conv_proj.weight, model.conv_proj.bias, stride=model.conv_proj.stride)
    batch, width, gh, gw = x.shape
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([model.class_token.expand(batch, 1, width), x], dim=1) + model.encoder.pos_embedding
    attentions, outputs, stream = [], [], [x]
    for block in model.encoder.layers:
        mha = block.self_attention
        w_q, w_k, w_v = mha.in_proj_weight.chunk(3)
        b_q, b_k, b_v = mha.in_proj_bias.chunk(3)
        a, o = _self_attention(_layer_norm(block.ln_1, x), w_q, b_q, w_k, b_k, w_v, b_v, mha.num_heads)
        attentions.append(a)
        outputs.append(o)
        x = x + F.linear(_merge(o), mha.out_proj.weight, mha.out_proj.bias)
        fc1, fc2 = block.mlp[0], block.mlp[3]
        x = x + F.linear(F.gelu(F.linear(_layer_norm(block.ln_2, x), fc1.weight, fc1.bias)), fc2.weight, fc2.bias)
        stream.append(x)
    logits = model.heads(_layer_norm(model.encoder.ln, x[:, 0]))
    readout = readout_weights(x.shape[1], 1, (0,), patches=False)
    return Trace(logits, attentions, outputs, lambda t: t, readout, 1, (gh, gw), stream)


# ------------------------------------------------------------------- timm Eva (RoPE) and Beit (relative bias)


def _linear(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    assert isinstance(module, nn.Linear), type(module)
    return F.linear(x, module.weight, module.bias)


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``(B, N, heads * d)`` -> ``(B, heads, N, d)``."""
    return x.view(*x.shape[:2], heads, -1).transpose(1, 2)


def rotate(x: torch.Tensor, table: torch.Tensor, half: bool) -> torch.Tensor:
    """RoPE: each pair of channels of ``x`` ``(..., N, d)`` turned by its angle, ``table`` ``(..., N, 2d)``
    holding ``[sin | cos]`` per channel. Pairs are channels ``(2i, 2i+1)``, or ``(i, i + d/2)`` with ``half``."""
    sin, cos = table.chunk(2, dim=-1)
    d = x.shape[-1]
    if half:
        first, second = slice(0, d // 2), slice(d // 2, d)
        assert torch.equal(sin[..., first], sin[..., second]), "a rotate-half table repeats its angles"
        a, b, s, c = x[..., first], x[..., second], sin[..., first], cos[..., first]
        return torch.cat([a * c - b * s, a * s + b * c], dim=-1)
    assert torch.equal(sin[..., 0::2], sin[..., 1::2]), "an interleaved table repeats each angle twice"
    a, b, s, c = x[..., 0::2], x[..., 1::2], sin[..., 0::2], cos[..., 0::2]
    return torch.stack([a * c - b * s, a * s + b * c], dim=-1).flatten(-2)


def _resample_grid(patch_pos: torch.Tensor, old: tuple[int, int], new: tuple[int, int]) -> torch.Tensor:
    """timm's position-embedding resampling for another grid: bicubic, antialiased."""
    if tuple(old) == tuple(new):
        return patch_pos
    width = patch_pos.shape[-1]
    grid = patch_pos.reshape(1, *old, width).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=new, mode="bicubic", antialias=True, align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(1, new[0] * new[1], width)


def _mlp(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm ``Mlp`` (GELU), ``GluMlp`` (packed SwiGLU, gate first) or ``SwiGLU`` (separate gate); inner norm."""
    kind = type(mlp).__name__
    if kind == "GluMlp":
        assert isinstance(mlp.act, nn.SiLU) and not mlp.gate_last
        gate, value = _linear(mlp.fc1, x).chunk(2, dim=-1)
        hidden = F.silu(gate) * value
    elif kind == "SwiGLU":
        assert isinstance(mlp.act, nn.SiLU)
        hidden = F.silu(_linear(mlp.fc1_g, x)) * _linear(mlp.fc1_x, x)
    else:
        assert kind == "Mlp", kind
        hidden = _activation(mlp.act, _linear(mlp.fc1, x))
    return _linear(mlp.fc2, _layer_norm(mlp.norm, hidden))


def _gamma(gamma: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    return x if gamma is None else gamma * x


def _embed_patches(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    conv = model.patch_embed.proj
    x = F.conv2d(images, conv.weight, conv.bias, stride=conv.stride)
    return _layer_norm(model.patch_embed.norm, x.flatten(2).transpose(1, 2)), tuple(x.shape[-2:])


def _core(q, k, v, bias=None):
    """``softmax(q kᵀ / sqrt(d) + bias)`` and its product with ``v``."""
    logits = torch.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(q.shape[-1])
    attention = torch.softmax(logits if bias is None else logits + bias, dim=-1)
    return attention, torch.einsum("bhij,bhjd->bhid", attention, v)


def attention_pool(pool: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """timm ``AttentionPoolLatent`` (one latent, token output) on ``x``: output, attention ``(B, h, 1, N)``."""
    assert pool.pos_embed is None and isinstance(pool.q_norm, nn.Identity) and pool.pool == "token"
    heads = pool.num_heads
    q = _heads(_linear(pool.q, pool.latent), heads).expand(x.shape[0], -1, -1, -1)
    k, v = (_heads(t, heads) for t in _linear(pool.kv, x).chunk(2, dim=-1))
    attention, out = _core(q, k, v)
    out = _linear(pool.proj, _merge(out))
    out = out + _mlp(pool.mlp, _layer_norm(pool.norm, out))
    return out[:, 0], attention


def trace_eva(model: nn.Module, images: torch.Tensor) -> Trace:
    """timm ``Eva``, written out from the weights; RoPE applied here to ``q, k`` of the patch tokens from
    the model's sin/cos table (``model.rope``), prefix tokens left as they are."""
    x, grid = _embed_patches(model, images)
    batch = x.shape[0]
    prefix = [t for t in (model.cls_token, model.reg_token) if t is not None]
    num_prefix = sum(t.shape[1] for t in prefix)
    assert num_prefix == model.num_prefix_tokens
    if model.pos_embed is not None:
        pos_prefix = 0 if model.no_embed_class else num_prefix
        pos = model.pos_embed
        patch_pos = _resample_grid(pos[:, pos_prefix:], model.patch_embed.grid_size, grid)
        pos = torch.cat([pos[:, :pos_prefix], patch_pos], dim=1)
        if model.no_embed_class:
            x = x + pos
    x = torch.cat([t.expand(batch, -1, -1) for t in prefix] + [x], dim=1)
    if model.pos_embed is not None and not model.no_embed_class:
        x = x + pos
    x = _layer_norm(model.norm_pre, x)
    rope = model.rope
    if rope is None:
        table = None
    elif model.dynamic_img_size or not hasattr(rope, "feat_shape"):
        table = rope.get_embed(shape=grid)
    else:
        table = rope.get_embed()

    attentions, outputs, stream = [], [], [x]
    for index, block in enumerate(model.blocks):
        assert type(block).__name__ == "EvaBlock", "the reference writes out pre-norm blocks"
        attn = block.attn
        assert attn.gate is None and isinstance(attn.q_norm, nn.Identity) and isinstance(attn.k_norm, nn.Identity)
        h = _layer_norm(block.norm1, x)
        heads, kv_heads = attn.num_heads, getattr(attn, "num_kv_heads", attn.num_heads)
        if attn.qkv is not None:
            w_q, w_k, w_v = attn.qkv.weight.chunk(3)
            if getattr(attn, "q_bias", None) is not None:  # EvaAttention: q and v biases, no k bias
                assert not attn.k_bias.any()
                b_q, b_k, b_v = attn.q_bias, None, attn.v_bias
            else:
                b_q, b_k, b_v = attn.qkv.bias.chunk(3) if attn.qkv.bias is not None else (None, None, None)
            q, k, v = (_heads(F.linear(h, w, b), heads) for w, b in ((w_q, b_q), (w_k, b_k), (w_v, b_v)))
        else:
            q = _heads(_linear(attn.q_proj, h), heads)
            k, v = _heads(_linear(attn.k_proj, h), kv_heads), _heads(_linear(attn.v_proj, h), kv_heads)
        if table is not None:
            angles = table[index] if model.rope_mixed else table
            q, k = (torch.cat([t[:, :, :num_prefix], rotate(t[:, :, num_prefix:], angles, attn.rotate_half)], 2)
                    for t in (q, k))  # fmt: skip
        # grouped-query attention: head i reads key/value head i // (heads / kv_heads)
        k, v = (t.repeat_interleave(heads // kv_heads, dim=1) for t in (k, v))
        a, o = _core(q, k, v)
        attentions.append(a)
        outputs.append(o)
        x = x + _gamma(block.gamma_1, _linear(attn.proj, _layer_norm(attn.norm, _merge(o))))
        x = x + _gamma(block.gamma_2, _mlp(block.mlp, _layer_norm(block.norm2, x)))
        stream.append(x)
    x = _layer_norm(model.norm, x)

    n = x.shape[1]
    if model.global_pool == "map":  # attention pooling over every token: no fixed readout rows
        pooled, readout = attention_pool(model.attn_pool, x)[0], torch.zeros(n)
    elif model.global_pool == "token":
        pooled, readout = x[:, 0], readout_weights(n, num_prefix, (0,), patches=False)
    else:
        assert model.global_pool == "avg", model.global_pool
        pooled, readout = x[:, num_prefix:].mean(dim=1), readout_weights(n, num_prefix, (), patches=True)
    logits = _linear(model.head, _layer_norm(model.fc_norm, pooled))
    return Trace(logits, attentions, outputs, lambda t: t, readout, num_prefix, grid, stream)


def relative_position_bias(table: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """BEiT's bias ``(H, N, N)`` from its table ``((2h-1)(2w-1) + 3, H)``: patch pairs by their offset
    ``(dy, dx)``; the last three rows are class-to-patch, patch-to-class and class-to-class."""
    gh, gw = grid
    ys, xs = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    dy = ys.flatten()[:, None] - ys.flatten()[None, :] + gh - 1
    dx = xs.flatten()[:, None] - xs.flatten()[None, :] + gw - 1
    pairs = dy * (2 * gw - 1) + dx  # (P, P)
    count = (2 * gh - 1) * (2 * gw - 1)
    assert table.shape[0] == count + 3
    n = gh * gw + 1
    index = torch.empty(n, n, dtype=torch.long)
    index[1:, 1:] = pairs
    index[0, :] = count  # the class token's query row
    index[:, 0] = count + 1  # every query's class-token key column
    index[0, 0] = count + 2
    return table[index].permute(2, 0, 1)


def trace_beit(model: nn.Module, images: torch.Tensor) -> Trace:
    """timm ``Beit``, written out from the weights; each block's relative position bias (its own, the
    shared one, or both) added to the attention logits here, from the bias tables."""
    x, grid = _embed_patches(model, images)
    batch = x.shape[0]
    x = torch.cat([model.cls_token.expand(batch, -1, -1), x], dim=1)
    if model.pos_embed is not None:
        x = x + model.pos_embed
    shared = None
    if model.rel_pos_bias is not None:
        shared = relative_position_bias(model.rel_pos_bias.relative_position_bias_table, grid)

    attentions, outputs, stream = [], [], [x]
    for block in model.blocks:
        attn = block.attn
        w_q, w_k, w_v = attn.qkv.weight.chunk(3)
        assert attn.q_bias is not None and not attn.k_bias.any()
        h = _layer_norm(block.norm1, x)
        projections = ((w_q, attn.q_bias), (w_k, None), (w_v, attn.v_bias))
        q, k, v = (_heads(F.linear(h, w, b), attn.num_heads) for w, b in projections)
        bias = shared
        if attn.relative_position_bias_table is not None:
            own = relative_position_bias(attn.relative_position_bias_table, grid)
            bias = own if bias is None else own + bias
        a, o = _core(q, k, v, bias)
        attentions.append(a)
        outputs.append(o)
        x = x + _gamma(block.gamma_1, _linear(attn.proj, _merge(o)))
        x = x + _gamma(block.gamma_2, _mlp(block.mlp, _layer_norm(block.norm2, x)))
        stream.append(x)
    x = _layer_norm(model.norm, x)
    n = x.shape[1]
    if model.global_pool == "token":
        pooled, readout = x[:, 0], readout_weights(n, 1, (0,), patches=False)
    else:
        assert model.global_pool == "avg", model.global_pool
        pooled, readout = x[:, 1:].mean(dim=1), readout_weights(n, 1, (), patches=True)
    logits = _linear(model.head, _layer_norm(model.fc_norm, pooled))
    return Trace(logits, attentions, outputs, lambda t: t, readout, 1, grid, stream)


def _relative_position_bias(rel_pos: nn.Module) -> torch.Tensor:
    """timm ``RelPosMlp`` ('cr' mode) from its weights: an MLP on the log-spaced relative coordinates,
    looked up per (query, key) patch pair, zero for the prefix tokens: ``(1, H, N, N)``."""
    assert type(rel_pos).__name__ == "RelPosMlp" and rel_pos.mode == "cr", type(rel_pos).__name__
    mlp = rel_pos.mlp
    hidden = F.relu(F.linear(rel_pos.rel_coords_log, mlp.fc1.weight, mlp.fc1.bias))
    table = F.linear(hidden, mlp.fc2.weight, mlp.fc2.bias).reshape(-1, rel_pos.num_heads)
    area = rel_pos.window_area
    bias = table[rel_pos.relative_position_index].reshape(area, area, -1).permute(2, 0, 1)
    prefix = rel_pos.prefix_tokens
    return F.pad(bias, (prefix, 0, prefix, 0))[None]


def trace_timm_relpos(model: nn.Module, images: torch.Tensor) -> Trace:
    """timm ``VisionTransformerRelPos`` (pre-norm blocks, per-block relative position MLP), from the weights."""
    conv = model.patch_embed.proj
    x = F.conv2d(images, conv.weight, conv.bias, stride=conv.stride)
    batch, _, gh, gw = x.shape
    x = x.flatten(2).transpose(1, 2)
    num_prefix = model.num_prefix_tokens
    if num_prefix:
        x = torch.cat([model.cls_token.expand(batch, -1, -1), x], dim=1)
    attentions, outputs, stream = [], [], [x]
    for block in model.blocks:
        attn = block.attn
        assert isinstance(attn.q_norm, nn.Identity) and model.shared_rel_pos is None
        h = _layer_norm(block.norm1, x)
        q, k, v = (
            F.linear(h, w, b).view(batch, -1, attn.num_heads, attn.head_dim).transpose(1, 2)
            for w, b in zip(attn.qkv.weight.chunk(3), attn.qkv.bias.chunk(3), strict=True)
        )
        logits = torch.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(attn.head_dim)
        a = torch.softmax(logits + _relative_position_bias(attn.rel_pos), dim=-1)
        o = torch.einsum("bhij,bhjd->bhid", a, v)
        attentions.append(a)
        outputs.append(o)
        x = x + _scale(block.ls1, F.linear(_merge(o), attn.proj.weight, attn.proj.bias))
        mlp = block.mlp
        hidden = _activation(mlp.act, F.linear(_layer_norm(block.norm2, x), mlp.fc1.weight, mlp.fc1.bias))
        x = x + _scale(block.ls2, F.linear(hidden, mlp.fc2.weight, mlp.fc2.bias))
        stream.append(x)
    x = _layer_norm(model.norm, x)
    token = model.global_pool == "token"
    pooled = x[:, 0] if token else x[:, num_prefix:].mean(dim=1)
    logits = F.linear(_layer_norm(model.fc_norm, pooled), model.head.weight, model.head.bias)
    readout = readout_weights(x.shape[1], num_prefix, (0,) if token else (), patches=not token)
    return Trace(logits, attentions, outputs, lambda t: t, readout, num_prefix, (gh, gw), stream)


def _heads_mix(scores: torch.Tensor, mix: nn.Linear) -> torch.Tensor:
    """Talking heads: ``(B, H, N, M)`` mixed across heads by a ``Linear(H, H)``."""
    return torch.einsum("bhij,gh->bgij", scores, mix.weight) + mix.bias[:, None, None]


def trace_cait(model: nn.Module, images: torch.Tensor) -> Trace:
    """timm ``Cait``, written out from the weights, as gmar defines its attention (docs/methods/attention.md).

    The sequence is ``[class token, patches]`` throughout. A self-attention layer updates the patches
    (its attention ``(B, H, P, P)`` is the talking-heads softmax mixed by ``proj_w``), a class-attention
    layer the class token (its attention is the class token's row ``(B, H, 1, 1 + P)``); ``embed`` puts
    either into ``(B, H, 1 + P, 1 + P)`` with identity entries for the token the layer leaves alone.
    """
    conv = model.patch_embed.proj
    x = F.conv2d(images, conv.weight, conv.bias, stride=conv.stride)
    batch, width, gh, gw = x.shape
    x = x.flatten(2).transpose(1, 2) + model.pos_embed
    sequence = torch.cat([model.cls_token.expand(batch, 1, width), x], dim=1)
    attentions, outputs, stream = [], [], [sequence]

    def mlp(block: nn.Module, t: torch.Tensor) -> torch.Tensor:
        hidden = _activation(
            block.mlp.act, F.linear(_layer_norm(block.norm2, t), block.mlp.fc1.weight, block.mlp.fc1.bias)
        )
        return block.gamma_2 * F.linear(hidden, block.mlp.fc2.weight, block.mlp.fc2.bias)

    for block in model.blocks:  # self-attention over the patches
        attn = block.attn
        cls, x = sequence[:, :1], sequence[:, 1:]
        w_q, w_k, w_v = attn.qkv.weight.chunk(3)
        b_q, b_k, b_v = attn.qkv.bias.chunk(3)
        h = _layer_norm(block.norm1, x)

        def heads(weight, bias, h=h, attn=attn):
            return F.linear(h, weight, bias).view(batch, -1, attn.num_heads, width // attn.num_heads).transpose(1, 2)

        q, k, v = heads(w_q, b_q), heads(w_k, b_k), heads(w_v, b_v)
        logits = _heads_mix(torch.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(q.shape[-1]), attn.proj_l)
        a = _heads_mix(torch.softmax(logits, dim=-1), attn.proj_w)
        o = torch.einsum("bhij,bhjd->bhid", a, v)
        attentions.append(a)
        outputs.append(o)
        x = x + block.gamma_1 * F.linear(_merge(o), attn.proj.weight, attn.proj.bias)
        x = x + mlp(block, x)
        sequence = torch.cat([cls, x], dim=1)
        stream.append(sequence)
    for block in model.blocks_token_only:  # the class token reads [class token, patches]
        attn = block.attn
        cls, x = sequence[:, :1], sequence[:, 1:]
        h = _layer_norm(block.norm1, sequence)

        def heads(t, module, attn=attn):
            return (
                F.linear(t, module.weight, module.bias)
                .view(batch, -1, attn.num_heads, width // attn.num_heads)
                .transpose(1, 2)
            )

        q, k, v = heads(h[:, :1], attn.q), heads(h, attn.k), heads(h, attn.v)
        a = torch.softmax(torch.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(q.shape[-1]), dim=-1)
        o = torch.einsum("bhij,bhjd->bhid", a, v)
        attentions.append(a)
        outputs.append(o)
        cls = cls + block.gamma_1 * F.linear(_merge(o), attn.proj.weight, attn.proj.bias)
        cls = cls + mlp(block, cls)
        sequence = torch.cat([cls, x], dim=1)
        stream.append(sequence)
    logits = F.linear(_layer_norm(model.norm, sequence)[:, 0], model.head.weight, model.head.bias)
    tokens = sequence.shape[1]
    self_attention_layers = len(model.blocks)

    def embed(layer: int, tensor: torch.Tensor, value: float) -> torch.Tensor:
        if layer < self_attention_layers:  # the class token: an identity row and column
            corner = torch.zeros(tokens, tokens)
            corner[0, 0] = value
            return F.pad(tensor, (1, 0, 1, 0)) + corner
        eye = value * torch.eye(tokens)[1:]  # the patches: identity rows
        return torch.cat([tensor, eye.expand(*tensor.shape[:2], -1, -1)], dim=2)

    readout = readout_weights(tokens, 1, (0,), patches=False)
    return Trace(logits, attentions, outputs, lambda t: t, readout, 1, (gh, gw), stream, embed)


#: Hugging Face class -> (prefix tokens before registers, readout prefix rows, head averages the patches)
HF_HEADS = {
    "ViTForImageClassification": (1, (0,), False),
    "DeiTForImageClassificationWithTeacher": (2, (0, 1), False),
    "Dinov2ForImageClassification": (1, (0,), True),
    "Dinov2WithRegistersForImageClassification": (1, (0,), True),
    "ViTMSNForImageClassification": (1, (0,), False),
    "IJepaForImageClassification": (0, (), True),
    "ViTModel": (1, (0,), False),
    "Dinov2Model": (1, (0,), False),
    "CLIPModel": (1, (0,), False),
    "CLIPVisionModel": (1, (0,), False),
    "CLIPForImageClassification": (1, (), True),
    "MetaClip2VisionModelWithProjection": (1, (0,), False),
    "SiglipForImageClassification": (0, (), True),
    "Siglip2ForImageClassification": (0, (), True),
    "BeitForImageClassification": (1, (), True),
    "Data2VecVisionForImageClassification": (1, (), True),
}


def hf_inputs(model: nn.Module, images: torch.Tensor) -> dict:
    """Keyword arguments for a Hugging Face model (SigLIP 2: its patches, row-major, each (row, column, channel))."""
    config = getattr(model.config, "vision_config", model.config)
    if config.model_type != "siglip2_vision_model":
        size = getattr(config, "image_size", None)  # the timm wrapper's config has none
        size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        resized = size[0] is not None and tuple(images.shape[-2:]) != size
        return {"pixel_values": images, **({"interpolate_pos_encoding": True} if resized else {})}
    p = config.patch_size
    patches = images.unfold(2, p, p).unfold(3, p, p)  # (B, C, rows, columns, p, p)
    rows, columns = patches.shape[2:4]
    pixels = patches.permute(0, 2, 3, 4, 5, 1).reshape(images.shape[0], rows * columns, -1)
    shapes = torch.tensor([[rows, columns]] * images.shape[0])
    return {"pixel_values": pixels, "spatial_shapes": shapes, "pixel_attention_mask": None}


def hf_call(model: nn.Module, images: torch.Tensor, **kwargs):
    """The model's own call: ``get_image_features`` for an image-text model, else its forward."""
    call = model.get_image_features if hasattr(model, "get_image_features") else model
    return call(**hf_inputs(model, images), **kwargs)


def hf_output(model: nn.Module, out) -> torch.Tensor:
    """A Hugging Face model's explained output: logits, a projected image embedding, or the pooled output."""
    for name in ("logits", "image_embeds", "pooler_output"):
        value = getattr(out, name, None)
        if value is not None:
            return value
    raise AssertionError(f"no output in {type(out).__name__}")


def hf_forward(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf_output(model, hf_call(model, images))


def _hf_attention_parts(tower: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """(value projection, output projection) of every self-attention layer of a vision tower."""
    parts = []
    for module in tower.modules():
        if hasattr(module, "v_proj") and (hasattr(module, "o_proj") or hasattr(module, "out_proj")):
            parts.append((module.v_proj, getattr(module, "o_proj", None) or module.out_proj))
        elif type(module).__name__ == "Data2VecVisionAttention":
            parts.append((module.attention.value, module.output.dense))
    return parts


def trace_hf(model: nn.Module, images: torch.Tensor) -> Trace:
    """An eager copy of a Hugging Face model, ``output_attentions=True``, output projections' inputs kept."""
    if type(model).__name__.startswith("Data2VecVision"):  # its attention class is fixed when it is built
        eager = type(model)._from_config(copy.deepcopy(model.config), attn_implementation="eager")
        eager.load_state_dict(model.state_dict())
        eager.eval()
    else:
        eager = copy.deepcopy(model).eval()
        eager.set_attn_implementation("eager")
    tower = getattr(eager, "vision_model", eager)  # CLIP's and SigLIP's text towers have attention too
    config = tower.config
    assert config._attn_implementation == "eager"
    parts = _hf_attention_parts(tower)
    assert len(parts) == config.num_hidden_layers
    merged, values = [], []
    handles = []
    for value, projection in parts:
        handles.append(projection.register_forward_pre_hook(lambda mod, args: merged.append(args[0])))
        handles.append(value.register_forward_hook(lambda mod, args, out: values.append(out)))
    try:
        out = hf_call(eager, images, output_attentions=True, output_hidden_states=True)
    finally:
        for handle in handles:
            handle.remove()
    attentions = list(out.attentions)
    heads = config.num_attention_heads

    def split(t: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = t.shape
        return t.view(batch, tokens, heads, width // heads).permute(0, 2, 1, 3)

    # O_l must be A_l @ V_l: checks that the hooked tensors are the per-head context vectors.
    for a, o, v in zip(attentions, merged, values, strict=True):
        torch.testing.assert_close(split(o), a @ split(v), rtol=1e-5, atol=1e-5)

    prefix, rows, patches = HF_HEADS[type(model).__name__]
    prefix += getattr(config, "num_register_tokens", 0) or 0
    patch = config.patch_size
    grid = (images.shape[-2] // patch, images.shape[-1] // patch)
    n = attentions[0].shape[-1]
    assert n == prefix + grid[0] * grid[1]
    readout = readout_weights(n, prefix, rows, patches)
    return Trace(hf_output(eager, out), attentions, merged, split, readout, prefix, grid, list(out.hidden_states))


def trace(model: nn.Module, images: torch.Tensor) -> Trace:
    """A graph-connected forward of ``model`` on ``images`` (which are made to require grad)."""
    images = images.detach().clone().requires_grad_(True)
    module = type(model).__module__
    if type(model).__name__ == "Cait":
        return trace_cait(model, images)
    if type(model).__name__ == "VisionTransformerRelPos":
        return trace_timm_relpos(model, images)
    if module.startswith("timm."):
        return {"Eva": trace_eva, "Beit": trace_beit}.get(type(model).__name__, trace_timm)(model, images)
    if module.startswith("transformers."):
        if hasattr(model, "timm_model"):  # transformers' timm wrapper: the timm model's written-out forward
            return trace_timm(model.timm_model, images)
        return trace_hf(model, images)
    if module.startswith("open_clip."):
        return trace_openclip(model, images)
    if module.startswith("torchvision."):
        return trace_torchvision(model, images)
    raise AssertionError(f"no reference forward for {type(model).__name__}")


def differentiate(t: Trace, target=None) -> Gradients:
    """``y`` per sample (``target`` None: argmax class; ints; or a callable on the output) and its gradients."""
    if callable(target):
        scores, classes = target(t.output), None
    else:
        if target is None:
            classes = t.output.detach().argmax(dim=-1)
        else:
            classes = torch.as_tensor(target).long().expand(t.output.shape[0])
        scores = t.output[torch.arange(t.output.shape[0]), classes]
    for tensor in t.attentions + t.head_graph:
        assert tensor.grad_fn is not None, "the reference tensors must be graph-connected"
    grads = torch.autograd.grad(scores.sum(), t.attentions + t.head_graph)
    layers = len(t.attentions)
    return Gradients(
        output=t.output.detach(),
        scores=scores.detach(),
        classes=classes,
        attentions=[t.embedded(i, a.detach(), 1.0) for i, a in enumerate(t.attentions)],
        head_outputs=[o.detach() for o in t.head_outputs],
        grad_attentions=[t.embedded(i, g, 0.0) for i, g in enumerate(grads[:layers])],
        grad_head_outputs=[t.split_heads(g) for g in grads[layers:]],
        readout=t.readout,
        num_prefix=t.num_prefix,
        grid=t.grid,
    )


# ---------------------------------------------------------------------------------------------------- methods


def to_map(matrix: torch.Tensor, g: Gradients) -> torch.Tensor:
    """Readout rows of ``(B, N, N)``, weighted; patch columns; ``(B, h, w)``."""
    rows = (g.readout[None, :, None] * matrix).sum(dim=1)
    return rows[:, g.num_prefix :].reshape(matrix.shape[0], *g.grid)


def fuse(attention: torch.Tensor, how: str = "mean") -> torch.Tensor:
    return {"mean": attention.mean(dim=1), "max": attention.max(dim=1).values, "min": attention.min(dim=1).values}[how]


def discard(matrix: torch.Tensor, ratio: float, num_prefix: int) -> torch.Tensor:
    """Zero the ``floor(P * ratio)`` smallest patch-column entries of each row."""
    patches = matrix[..., num_prefix:]
    k = math.floor(patches.shape[-1] * ratio)
    if k == 0:
        return matrix
    smallest = patches.argsort(dim=-1)[..., :k]
    drop = torch.zeros_like(patches, dtype=torch.bool).scatter(-1, smallest, True)
    return torch.cat([matrix[..., :num_prefix], patches.masked_fill(drop, 0.0)], dim=-1)


def roll_out(fused: list[torch.Tensor], g: Gradients, residual=1.0, discard_ratio=0.0) -> torch.Tensor:
    """``R = Â_L ··· Â_1`` with ``Â = rownorm(Ā + residual I)``, after the optional discard; as a map."""
    n = fused[0].shape[-1]
    result = torch.eye(n).expand_as(fused[0])
    for matrix in fused:
        matrix = discard(matrix, discard_ratio, g.num_prefix) + residual * torch.eye(n)
        result = (matrix / matrix.sum(dim=-1, keepdim=True)) @ result
    return to_map(result, g)


def gradient_weighted(attention: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    return torch.relu(attention * gradient).mean(dim=1)


def raw_attention(g: Gradients) -> torch.Tensor:
    return to_map(g.attentions[-1].mean(dim=1), g)


def rollout(g: Gradients, head_fusion="mean", discard_ratio=0.0, residual=1.0, start_layer=0) -> torch.Tensor:
    fused = [fuse(a, head_fusion) for a in g.attentions[start_layer:]]
    return roll_out(fused, g, residual, discard_ratio)


def grad_rollout(g: Gradients, discard_ratio=0.0, residual=1.0, start_layer=0, pairing=None) -> torch.Tensor:
    """``pairing[l]`` is the layer whose gradient goes with ``A_l`` (default: its own; for negative tests)."""
    pairing = pairing or list(range(len(g.attentions)))
    fused = [gradient_weighted(a, g.grad_attentions[pairing[i]]) for i, a in enumerate(g.attentions)]
    return roll_out(fused[start_layer:], g, residual, discard_ratio)


def gmar_weights(g: Gradients, norm="l1", head_grad="output") -> torch.Tensor:
    """``w_{l,h} = S_{l,h} / Σ_h S_{l,h}``, ``S = ||G_{l,h}||_p``: ``(B, L, H)``."""
    grads = g.grad_head_outputs if head_grad == "output" else g.grad_attentions
    weights = []
    for grad in grads:
        flat = grad.reshape(*grad.shape[:2], -1)
        score = flat.abs().sum(-1) if norm == "l1" else flat.square().sum(-1).sqrt()
        total = score.sum(dim=1, keepdim=True)
        weights.append(torch.where(total > 0, score / total, torch.full_like(score, 1.0 / score.shape[1])))
    return torch.stack(weights, dim=1)


def gmar(g: Gradients, norm="l1", head_grad="output", residual=1.0, start_layer=0, discard_ratio=0.0, weights=None):
    """The map and the head weights ``(B, L, H)``; ``weights`` overrides the computed ones."""
    weights = gmar_weights(g, norm, head_grad) if weights is None else weights
    mixed = [torch.einsum("bh,bhij->bij", weights[:, i], a) for i, a in enumerate(g.attentions)]
    return roll_out(mixed[start_layer:], g, residual, discard_ratio), weights


def gae(g: Gradients, start_layer=0) -> torch.Tensor:
    n = g.attentions[0].shape[-1]
    relevance = torch.eye(n).expand_as(g.attentions[0][:, 0])
    for a, grad in list(zip(g.attentions, g.grad_attentions, strict=True))[start_layer:]:
        relevance = relevance + gradient_weighted(a, grad) @ relevance
    return to_map(relevance, g)


def reference_map(method: str, g: Gradients, **options) -> torch.Tensor:
    """The reference ``token_map`` of ``method`` with ``options`` (as gmar's classes take them)."""
    if method == "raw_attention":
        return raw_attention(g, **options)
    if method == "gmar":
        return gmar(g, **options)[0]
    return {"rollout": rollout, "grad_rollout": grad_rollout, "gae": gae}[method](g, **options)


# -- AttnLRP, independently: the written-out timm forward with lxt's way of applying the rules ---------
# (values kept, gradients changed by detaching: no custom autograd function, no gmar)


def _keep_value(value: torch.Tensor, surrogate: torch.Tensor) -> torch.Tensor:
    """``value``'s values with ``surrogate``'s gradient."""
    return value.detach() + (surrogate - surrogate.detach())


def _identity_rule(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``y = f(x)`` element-wise with gradient ``y / x``: the identity rule in the gradient convention."""
    ratio = (y / torch.where(x >= 0, x + 1e-10, x - 1e-10)).detach()
    return _keep_value(y, x * ratio)


def _lrp_layer_norm(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """LayerNorm with its standard deviation detached."""
    mean = x.mean(dim=-1, keepdim=True)
    std = (x.var(dim=-1, keepdim=True, unbiased=False) + module.eps).sqrt()
    y = (x - mean) / std.detach() * module.weight + module.bias
    return _keep_value(F.layer_norm(x, module.normalized_shape, module.weight, module.bias, module.eps), y)


def _gradient_times(x: torch.Tensor, factor: float) -> torch.Tensor:
    """``x`` with its gradient multiplied by ``factor``."""
    return _keep_value(x, x * factor)


def attnlrp_timm(model: nn.Module, images: torch.Tensor, classes: torch.Tensor, attention: str) -> torch.Tensor:
    """AttnLRP's input relevance ``Σ_c x ⊙ g`` ``(B, H, W)`` for a plain timm ViT (class token, no layer
    scale), the rules applied as lxt applies them: GELU by the identity rule, LayerNorm with its
    standard deviation detached, the attention detached at q and k (``"cp"``) or with the gradient at q
    and k divided by 4 and at v by 2 (``"full"``: the uniform rule on both products), linear layers
    and everything else by their true gradient."""
    x_in = images.detach().clone().requires_grad_(True)
    conv = model.patch_embed.proj
    x = F.conv2d(x_in, conv.weight, conv.bias, stride=conv.stride).flatten(2).transpose(1, 2)
    batch = x.shape[0]
    x = torch.cat([model.cls_token.expand(batch, -1, -1), x], dim=1) + model.pos_embed
    for block in model.blocks:
        attn = block.attn
        h = _lrp_layer_norm(block.norm1, x)
        q, k, v = (
            F.linear(h, w, b).view(batch, -1, attn.num_heads, attn.head_dim).transpose(1, 2)
            for w, b in zip(attn.qkv.weight.chunk(3), attn.qkv.bias.chunk(3), strict=True)
        )
        if attention == "cp":
            q, k = q.detach(), k.detach()
        else:
            q, k, v = _gradient_times(q, 0.25), _gradient_times(k, 0.25), _gradient_times(v, 0.5)
        a = torch.softmax(torch.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(attn.head_dim), dim=-1)
        o = torch.einsum("bhij,bhjd->bhid", a, v)
        x = x + F.linear(_merge(o), attn.proj.weight, attn.proj.bias)
        mlp = block.mlp
        pre = F.linear(_lrp_layer_norm(block.norm2, x), mlp.fc1.weight, mlp.fc1.bias)
        hidden = _identity_rule(pre, F.gelu(pre))
        x = x + F.linear(hidden, mlp.fc2.weight, mlp.fc2.bias)
    x = _lrp_layer_norm(model.norm, x)
    logits = F.linear(x[:, 0], model.head.weight, model.head.bias)
    (gradient,) = torch.autograd.grad(logits.gather(1, classes[:, None]).sum(), x_in)
    return (x_in * gradient).sum(dim=1).detach()
