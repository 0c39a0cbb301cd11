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

    @property
    def head_outputs(self) -> list[torch.Tensor]:
        return [self.split_heads(t) for t in self.head_graph]


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
    if module.startswith("timm."):
        return trace_timm(model, images)
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
        attentions=[a.detach() for a in t.attentions],
        head_outputs=[o.detach() for o in t.head_outputs],
        grad_attentions=list(grads[:layers]),
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
