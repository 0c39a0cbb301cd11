"""Layer-wise relevance propagation as rules on the backward pass, applied inside one call.

A rule set (:class:`RuleSet`) says what each kind of module does to a backward pass: the linear
layers, the norms, the element-wise activations, the constant scales, the residual sums and the
attention core. The model's adapter says which of its modules are which
(:meth:`gmar.adapters.ModelAdapter.relevance_modules` and :meth:`~gmar.adapters.ModelAdapter.residuals`).
:func:`instrument_rules` puts a pass-through node after each such module for one forward pass: in an
ordinary backward pass the node hands the gradient to the module's own backward, in a backward pass
run with a rule set (``AttentionStream.backward(..., rules=...)``) it applies the rule instead. So one
forward pass serves the true gradient and any number of modified ones, and nothing of the model, its
classes or ``torch.nn`` changes: the nodes are forward hooks of the instances, removed on exit. The
attention core's rule lives in :class:`~gmar.capture.stream.AttentionStream`, which computes the core.

Two conventions for what a backward pass carries:

- ``"gradient"`` (AttnLRP, as its authors' ``lxt`` implements it): a modified gradient ``g`` with
  relevance ``R = x ⊙ g`` at every tensor ``x``, so a rule that maps ``R_out`` to ``R_in`` hands on
  ``R_in / x``. Linear maps need no rule in this convention: their true gradient is LRP-0 with the
  bias absorbing its share.
- ``"relevance"`` (Chefer et al.'s Transformer Attribution): the relevance itself. Every module that
  does more than move or select values needs a rule, and operations between modules (reshapes, the
  class token's selection) must only move values.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

if TYPE_CHECKING:
    from gmar.adapters.base import ModelAdapter
    from gmar.capture.stream import AttentionStream

#: The kinds of module a rule set can rewrite.
Kind = Literal["linear", "functional_linear", "conv", "norm", "activation", "scale"]
KINDS: tuple[Kind, ...] = ("linear", "functional_linear", "conv", "norm", "activation", "scale")


def stabilize(x: torch.Tensor, epsilon: float) -> torch.Tensor:
    """``x + ε · sign(x)``, with sign +1 at 0: a denominator that is never 0 and keeps its sign."""
    return x + epsilon * torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


def safe_divide(numerator: torch.Tensor, denominator: torch.Tensor, epsilon: float = 1e-9) -> torch.Tensor:
    """``numerator / (denominator + ε)``, 0 where the denominator is 0 (the stabiliser of Chefer et
    al.'s reference code, where ``ε`` is added whatever the denominator's sign)."""
    shifted = denominator + epsilon
    shifted.masked_fill_(shifted == 0, epsilon)
    return torch.div(numerator, shifted).masked_fill_(denominator == 0, 0.0)


@dataclass(frozen=True)
class AttentionRelevance:
    """What a rule makes of one chunk of an attention core ``O = P v``, ``P = softmax(q kᵀ · s + m)``:
    what reaches ``P`` (handed to the method's reduction) and what goes on to ``q``, ``k``, ``v`` (None:
    nothing)."""

    at_probabilities: torch.Tensor | None
    q: torch.Tensor | None
    k: torch.Tensor | None
    v: torch.Tensor | None


class RuleSet:
    """A set of LRP rules: for each kind of module, what a backward pass run with it does there.

    Each method returns what goes to the module's input, or None for the module's true gradient. A
    rule set is a value: two equal rule sets give the same pass, which several methods can share.
    """

    #: what a backward pass carries: ``"gradient"`` (relevance = input ⊙ gradient) or ``"relevance"``
    convention: ClassVar[Literal["gradient", "relevance"]]
    #: the residual sums need a rule (the adapter must declare them: :meth:`ModelAdapter.residuals`)
    needs_residuals: ClassVar[bool] = False
    #: what :meth:`attention` needs besides ``P``, ``v`` and the output's gradient: ``q`` and ``k``
    #: (a rule through the softmax) or nothing (the attention held constant)
    through_softmax: bool = True

    def modifies(self, kind: Kind, module: nn.Module) -> bool:
        """Whether a backward pass with this rule set does anything but the true gradient at ``module``."""
        return False

    def module(self, kind: Kind, module: nn.Module, x: torch.Tensor, y: torch.Tensor, g: torch.Tensor):
        """What reaches the input ``x`` of ``module`` (output ``y``, output's incoming ``g``), or None."""
        return None

    #: the rule set has a rule for element-wise products of two branches (gates): :meth:`gate`
    handles_gates: ClassVar[bool] = False

    def gate(self, a: torch.Tensor, b: torch.Tensor, g: torch.Tensor):
        """For ``p = a ⊙ b`` (both on the graph), what reaches ``a`` and ``b``, or None for the true gradient."""
        return None

    def fork(self, x: torch.Tensor, g: torch.Tensor):
        """What a tensor ``x`` that feeds a residual sum and its branch keeps of the relevance ``g`` both
        hand it (their sum), or None to keep it all."""
        return None

    def residual(self, stream: torch.Tensor, branch: torch.Tensor, g: torch.Tensor):
        """For ``s = stream + branch``, the pair (extra for ``stream`` on top of the ``g`` the sum hands
        it, what reaches ``branch``), or None for the true gradient."""
        return None

    def attention(
        self,
        p: torch.Tensor,
        v: torch.Tensor,
        g: torch.Tensor,
        q: torch.Tensor | None,
        k: torch.Tensor | None,
        scale: float,
        needs: tuple[bool, ...],
    ) -> AttentionRelevance:
        """The rule at one chunk of an attention core, for ``g`` arriving at its output ``(b, H, N, d)``.
        ``q`` and ``k`` are None when the model formed ``P`` itself; ``needs`` says which of
        ``(q, k, v)`` (or ``(P, v)``) must get something."""
        raise NotImplementedError


# -- AttnLRP -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttnLRPRules(RuleSet):
    """AttnLRP (Achtibat et al., ICML 2024) in the gradient convention.

    - linear layers: LRP-ε, ``R_in = x ⊙ Wᵀ (R_out / (z + ε·sign z))``, with ``z = Wx + b``; at ``ε = 0``
      the true gradient. With ``linear_gamma`` / ``conv_gamma`` > 0, the generalised γ-rule on the
      ``nn.Linear`` / ``nn.Conv2d`` modules: positive outputs take their relevance from the
      contributions ``W↑x⁺ + W↓x⁻ + b↑`` (``W↑ = W + γW⁺``, ``W↓ = W + γW⁻``), negative outputs from
      ``W↓x⁺ + W↑x⁻ + b↓``, each divided by its own total (stabilised by 1e-6);
    - element-wise activations (GELU, SiLU, QuickGELU, ...): the identity rule, ``R_in = R_out``;
    - norms: the identity rule on the division, i.e. the true gradient with the standard deviation
      (LayerNorm) or the root mean square (RMSNorm) held constant;
    - the attention core, ``attention="full"``: the uniform rule on both products (half the relevance
      to each operand: ``P v`` and ``q kᵀ``) and the softmax rule ``R_in = x ⊙ (R_out − s Σ R_out)`` at
      the logits, which in this convention is the softmax's true gradient. ``"cp"``: the attention
      probabilities held constant, all relevance through the values (CP-LRP, Ali et al. 2022), as
      the authors ship it for ViTs;
    - constant scales and the residual sums: the true gradient (conservative as they stand).
    """

    attention_rule: Literal["cp", "full"] = "cp"
    epsilon: float = 0.0
    linear_gamma: float = 0.0
    conv_gamma: float = 0.0

    convention: ClassVar = "gradient"
    #: the stabiliser of the γ-rule's denominators (zennit's)
    GAMMA_STABILIZER: ClassVar[float] = 1e-6

    def __post_init__(self) -> None:
        if self.attention_rule not in ("cp", "full"):
            raise ValueError(f"attention must be 'cp' or 'full', got {self.attention_rule!r}")
        for name in ("epsilon", "linear_gamma", "conv_gamma"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")

    @property
    def through_softmax(self) -> bool:  # type: ignore[override]
        return self.attention_rule == "full"

    def modifies(self, kind: Kind, module: nn.Module) -> bool:
        # "functional_linear": a linear module the model's own forward applies functionally (the
        # authors' recipe never reaches it): its true gradient, LRP-0
        if kind == "linear":
            return self.epsilon > 0 or self.linear_gamma > 0
        if kind == "conv":
            return self.epsilon > 0 or self.conv_gamma > 0
        return kind in ("norm", "activation")

    def module(self, kind, module, x, y, g):
        if kind == "activation":
            # R_in = R_out: g ⊙ y / x, and nothing where x = 0 (no relevance sits there)
            return torch.div(y, x).mul_(g).masked_fill_(x == 0, 0.0)
        if kind == "norm":
            return _norm_gradient(module, x, g)
        if kind in ("linear", "conv"):
            gamma = self.linear_gamma if kind == "linear" else self.conv_gamma
            relevance = g * y
            if gamma > 0:
                r_in = _gamma_relevance(module, x, relevance, gamma, self.GAMMA_STABILIZER)
            elif self.epsilon > 0:
                z = _apply(module, x, module.weight, module.bias)
                r_in = x * _input_gradient(module, x, relevance / stabilize(z, self.epsilon))
            else:
                return None
            return r_in / _nonzero(x)
        return None

    handles_gates: ClassVar[bool] = True

    def gate(self, a, b, g):
        # the uniform rule: half of R_p = p ⊙ g to each factor, R_a = a ⊙ (½ g ⊙ b)
        half = g * 0.5
        return half * b, half * a

    def attention(self, p, v, g, q, k, scale, needs):
        g_v = p.transpose(-2, -1) @ g if needs[-1] else None
        if self.attention_rule == "cp":
            # P is a constant: the relevance reaches v alone, and none goes to P, q or k
            return AttentionRelevance(None, None, None, g_v)
        g_v = None if g_v is None else g_v.mul_(0.5)
        g_p = (g @ v.transpose(-2, -1)).mul_(0.5)
        at_p = g_p.clone()
        if q is None:  # the model formed P itself: it goes on from P
            return AttentionRelevance(at_p, g_p if needs[0] else None, None, g_v)
        # the softmax's gradient, then half of it to each of q and k
        g_p.sub_((g_p * p).sum(dim=-1, keepdim=True)).mul_(p)
        g_q = (g_p @ k) * (0.5 * scale) if needs[0] else None
        g_k = (g_p.transpose(-2, -1) @ q) * (0.5 * scale) if needs[1] else None
        return AttentionRelevance(at_p, g_q, g_k, g_v)


def _nonzero(x: torch.Tensor) -> torch.Tensor:
    """``x`` with its zeros moved to the dtype's smallest normal number (so ``R / x`` is defined and
    ``x ⊙ (R / x) = R`` exactly elsewhere; no other value moves)."""
    return stabilize(x, torch.finfo(x.dtype).tiny)


def _norm_gradient(module: nn.Module, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The gradient of a LayerNorm or RMSNorm at ``x`` with its divisor held constant."""
    weight = getattr(module, "weight", None)
    eps = getattr(module, "eps", None)
    if eps is None:
        eps = getattr(module, "variance_epsilon", 1e-6)
    # a channels-first norm (timm's LayerNorm2d) normalises dimension 1, the others the last one
    dim = 1 if type(module).__name__.endswith("2d") else -1
    if weight is not None and dim == 1:
        weight = weight.reshape(-1, *([1] * (x.ndim - 2)))
    scaled = g if weight is None else g * weight
    if _is_rms_norm(module):
        rms = (x.pow(2).mean(dim=dim, keepdim=True) + eps).sqrt()
        return scaled / rms
    std = (x.var(dim=dim, keepdim=True, unbiased=False) + eps).sqrt()
    scaled = scaled / std
    return scaled - scaled.mean(dim=dim, keepdim=True)


def _is_rms_norm(module: nn.Module) -> bool:
    return "rmsnorm" in type(module).__name__.lower()


def _apply(module: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The module's affine map with other parameters: ``F.linear`` or the module's convolution."""
    if isinstance(module, nn.Conv2d):
        return F.conv2d(x, weight, bias, module.stride, module.padding, module.dilation, module.groups)
    return F.linear(x, weight, bias)


def _bias_shape(module: nn.Module, bias: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The bias as it broadcasts over the module's output (channels first for a convolution)."""
    return bias[:, None, None] if isinstance(module, nn.Conv2d) else bias


def _input_gradient(module: nn.Module, x: torch.Tensor, g: torch.Tensor, weight: torch.Tensor | None = None):
    """``∂/∂x ⟨g, W x⟩`` for the module's affine map (``weight`` in place of its own when given)."""
    weight = module.weight if weight is None else weight
    if isinstance(module, nn.Conv2d):
        return torch.nn.grad.conv2d_input(
            x.shape, weight, g, module.stride, module.padding, module.dilation, module.groups
        )
    return g @ weight


def _gamma_relevance(module: nn.Module, x: torch.Tensor, relevance: torch.Tensor, gamma: float, eps: float):
    """The generalised γ-rule's input relevance for ``relevance`` at the module's output."""
    weight, bias = module.weight, module.bias
    up = weight + gamma * weight.clamp(min=0)
    down = weight + gamma * weight.clamp(max=0)
    up_bias = None if bias is None else bias + gamma * bias.clamp(min=0)
    down_bias = None if bias is None else bias + gamma * bias.clamp(max=0)
    x_pos, x_neg = x.clamp(min=0), x.clamp(max=0)
    z = _apply(module, x, weight, bias)
    # positive outputs: W↑x⁺ + W↓x⁻ + b↑; negative ones: W↓x⁺ + W↑x⁻ + b↓
    z_pos = _apply(module, x_pos, up, up_bias) + _apply(module, x_neg, down, None)
    z_neg = _apply(module, x_pos, down, down_bias) + _apply(module, x_neg, up, None)
    s_pos = torch.where(z > 0, relevance / stabilize(z_pos, eps), 0.0)
    s_neg = torch.where(z < 0, relevance / stabilize(z_neg, eps), 0.0)
    on_pos = _input_gradient(module, x, s_pos, up) + _input_gradient(module, x, s_neg, down)
    on_neg = _input_gradient(module, x, s_pos, down) + _input_gradient(module, x, s_neg, up)
    return x_pos * on_pos + x_neg * on_neg


# -- Chefer et al.'s LRP ---------------------------------------------------------------------------


@dataclass(frozen=True)
class CheferRules(RuleSet):
    """The LRP rules of Chefer, Gur & Wolf (CVPR 2021), in the relevance convention.

    - linear layers (and convolutions): z⁺ (α = 1, β = 0) on signed inputs, bias ignored:
      ``R_in = x⁺ ⊙ W⁺ᵀ (R/z) + x⁻ ⊙ W⁻ᵀ (R/z)`` with ``z = W⁺x⁺ + W⁻x⁻``;
    - norms, activations, constant scales, softmax: the identity, ``R_in = R_out``;
    - each of the attention's products by LRP-0 on both operands, halved:
      ``R_P = ½ P ⊙ ((R/O) vᵀ)``, ``R_v = ½ v ⊙ (Pᵀ (R/O))`` for ``O = P v``, and alike for ``q kᵀ``
      with the relevance at the logits equal to ``R_P``;
    - residual sums: LRP-0 on both terms, each term's map rescaled so that the two take the sum's total
      relevance in the proportion ``|ΣR_a| : |ΣR_b|`` (sums per sample); where the stream forks into
      the sum and the branch, the two relevances are added as ``x ⊙ Σ R_i / x``.

    Divisions use :func:`safe_divide`.
    """

    convention: ClassVar = "relevance"
    needs_residuals: ClassVar[bool] = True

    def modifies(self, kind: Kind, module: nn.Module) -> bool:
        return True

    def module(self, kind, module, x, y, g):
        if kind in ("norm", "activation", "scale"):
            return g
        # z = W⁺x⁺ + W⁻x⁻ = ½ (W x + |W| |x|), and x⁺ ⊙ W⁺ᵀs + x⁻ ⊙ W⁻ᵀs = ½ (x ⊙ Wᵀs + |x| ⊙ |W|ᵀs):
        # three products with W or |W| instead of four, and W x is the module's output less its bias
        weight, bias = module.weight, module.bias
        magnitude, size = weight.abs(), x.abs()
        linear = y if bias is None else y - _bias_shape(module, bias, y)
        z = _apply(module, size, magnitude, None).add_(linear).mul_(0.5)
        s = safe_divide(g, z)
        return _input_gradient(module, x, s).mul_(x).addcmul_(size, _input_gradient(module, x, s, magnitude)).mul_(0.5)

    def fork(self, x, g):
        # the reference code's Clone: x ⊙ Σ_i R_i / x, with its stabiliser (nothing where x = 0)
        return safe_divide(g, x).mul_(x)

    def residual(self, stream, branch, g):
        s = safe_divide(g, stream + branch)
        r_a, r_b = stream * s, branch * s
        dims = tuple(range(1, g.ndim))
        total = g.sum(dim=dims, keepdim=True)
        sum_a, sum_b = r_a.sum(dim=dims, keepdim=True), r_b.sum(dim=dims, keepdim=True)
        share = sum_a.abs() + sum_b.abs()
        r_a = r_a * safe_divide(safe_divide(sum_a.abs(), share) * total, sum_a)
        r_b = r_b * safe_divide(safe_divide(sum_b.abs(), share) * total, sum_b)
        return r_a - g, r_b

    def attention(self, p, v, g, q, k, scale, needs):
        output = p @ v
        s = safe_divide(g, output)
        r_p = p * (s @ v.transpose(-2, -1)) * 0.5
        r_v = v * (p.transpose(-2, -1) @ s) * 0.5 if needs[-1] else None
        if q is None:
            return AttentionRelevance(r_p, r_p if needs[0] else None, None, r_v)
        # the softmax passes the relevance on; LRP-0 on q kᵀ (the scale cancels in R / z)
        s = safe_divide(r_p, q @ k.transpose(-2, -1))
        r_q = q * (s @ k) * 0.5 if needs[0] else None
        r_k = k * (s.transpose(-2, -1) @ q) * 0.5 if needs[1] else None
        return AttentionRelevance(r_p, r_q, r_k, r_v)


# -- which module is which -------------------------------------------------------------------------

#: activation classes by name, for the families that define their own (Hugging Face's, OpenCLIP's)
_ACTIVATION_NAMES = (
    "GELUActivation",
    "NewGELUActivation",
    "FastGELUActivation",
    "QuickGELUActivation",
    "QuickGELU",
    "GELUTanh",
    "PytorchGELUTanh",
    "SiLUActivation",
    "GELU",
    "SiLU",
)


def module_kind(module: nn.Module) -> Kind | None:
    """The kind of ``module`` for the rules, by its type: None for a module that only moves values or
    holds others (its children are looked at one by one)."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d):
        return "conv"
    if isinstance(module, nn.LayerNorm) or _is_rms_norm(module) or type(module).__name__.endswith("LayerNorm"):
        return "norm"
    if isinstance(module, (nn.GELU, nn.SiLU, nn.ReLU, nn.Tanh)):
        return "activation"
    if type(module).__name__ in _ACTIVATION_NAMES:
        return "activation"
    if type(module).__name__.endswith("LayerScale"):
        return "scale"
    return None


def discover(root: nn.Module) -> list[tuple[Kind, nn.Module]]:
    """Every module under ``root`` the rules act on, with its kind (a kind's module is not searched
    further: a norm's or a linear layer's children are its own business)."""
    found: list[tuple[Kind, nn.Module]] = []

    def visit(module: nn.Module) -> None:
        kind = module_kind(module)
        if kind is not None:
            found.append((kind, module))
            return
        for child in module.children():
            visit(child)

    visit(root)
    return found


# -- applying the rules for one forward pass -------------------------------------------------------


@dataclass(frozen=True)
class Gate:
    """One element-wise product of two branches inside a module: ``first``'s output times ``second``'s,
    which ``consumer`` takes as its input (timm's ``SwiGLU``: ``act(fc1_g(x)) * fc1_x(x)`` into ``drop1``)."""

    first: nn.Module
    second: nn.Module
    consumer: nn.Module
    #: the second factor is this half of ``second``'s output, split in two along :attr:`dim` (None: all of it)
    half: int | None = None
    dim: int = -1


def discover_gates(root: nn.Module) -> list[Gate]:
    """The gates gmar knows under ``root``: timm's ``SwiGLU`` and packed ``GluMlp`` MLPs."""
    gates = []
    for module in root.modules():
        name = type(module).__name__
        if name == "SwiGLU" and all(hasattr(module, n) for n in ("act", "fc1_x", "drop1")):
            gates.append(Gate(module.act, module.fc1_x, module.drop1))
        elif name == "GluMlp" and all(hasattr(module, n) for n in ("act", "fc1", "drop1")):
            # fc1's output in two halves: act(x2) · x1 (gate_last) or act(x1) · x2
            other = 0 if getattr(module, "gate_last", True) else 1
            gates.append(Gate(module.act, module.fc1, module.drop1, half=other, dim=getattr(module, "chunk_dim", -1)))
    return gates


@dataclass(frozen=True)
class Residual:
    """One residual sum inside a block: ``stream + branch``, where ``stream`` is the input of module
    ``stream_input`` (the block's input, or the sum before) and ``branch`` the output of ``branch_end``."""

    stream_input: nn.Module
    branch_end: nn.Module


@contextmanager
def instrument_rules(adapter: ModelAdapter, stream: AttentionStream) -> Iterator[None]:
    """For one forward pass: a pass-through node after every module the stream's rule sets rewrite,
    and at every residual sum when one of them needs it; all removed on exit."""
    rule_sets = stream.rules
    handles: list = []
    with ExitStack() as stack:
        stack.callback(lambda: [h.remove() for h in handles])
        for kind, module in adapter.relevance_modules():
            if any(rules.modifies(kind, module) for rules in rule_sets):
                handles.append(module.register_forward_hook(_module_hook(stream, kind)))
        if any(rules.handles_gates for rules in rule_sets):
            for gate in adapter.gates():
                slots: list[torch.Tensor | None] = [None, None]
                handles.append(gate.first.register_forward_hook(_remember_output(slots, 0)))
                handles.append(gate.second.register_forward_hook(_remember_output(slots, 1, gate)))
                handles.append(gate.consumer.register_forward_pre_hook(_gate_hook(stream, slots)))
        if any(rules.needs_residuals for rules in rule_sets):
            residuals = adapter.residuals()
            if residuals is None:
                raise ValueError(f"{type(adapter.model).__name__}'s adapter declares no residual sums")
            for residual in residuals:
                slot: list[torch.Tensor | None] = [None]
                handles.append(residual.stream_input.register_forward_pre_hook(_remember_input(slot, stream)))
                handles.append(residual.branch_end.register_forward_hook(_residual_hook(stream, slot)))
        yield


def _module_hook(stream: AttentionStream, kind: Kind) -> Callable:
    def hook(module: nn.Module, args: tuple, output):
        x = args[0] if args else None
        y = output[0] if isinstance(output, tuple) else output
        if not (torch.is_grad_enabled() and isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)):
            return None
        if not (x.requires_grad or y.requires_grad):
            return None
        routed = _ModuleRule.apply(stream, kind, module, x, y)
        return (routed, *output[1:]) if isinstance(output, tuple) else routed

    return hook


def _remember_output(slots: list, index: int, gate: Gate | None = None) -> Callable:
    def hook(module: nn.Module, args: tuple, output) -> None:
        if gate is not None and gate.half is not None:
            output = output.chunk(2, dim=gate.dim)[gate.half]
        slots[index] = output

    return hook


def _gate_hook(stream: AttentionStream, slots: list) -> Callable:
    def hook(module: nn.Module, args: tuple):
        (a, b), slots[:] = slots, [None, None]
        product = args[0] if args else None
        if a is None or b is None or product is None or not torch.is_grad_enabled() or not product.requires_grad:
            return None
        return (_GateRule.apply(stream, a, b, product), *args[1:])

    return hook


class _GateRule(torch.autograd.Function):
    """A gate's product passed through; a modified pass with a gate rule splits its relevance between
    the two factors here instead of the product's own gradient."""

    @staticmethod
    def forward(ctx, stream, a, b, product):  # type: ignore[override]
        ctx.stream = stream
        ctx.save_for_backward(a, b)
        return product.view_as(product)

    @staticmethod
    @once_differentiable
    def backward(ctx, g):  # type: ignore[override]
        rules = ctx.stream.active_rules
        if rules is not None and rules.handles_gates:
            a, b = ctx.saved_tensors
            split = rules.gate(a, b, g)
            if split is not None:
                return None, split[0], split[1], None
        return None, None, None, g


def _remember_input(slot: list, stream: AttentionStream) -> Callable:
    def hook(module: nn.Module, args: tuple) -> None:
        x = args[0] if args else None
        slot[0] = x
        if isinstance(x, torch.Tensor) and torch.is_grad_enabled() and x.requires_grad:
            # the fork of the residual stream: a hook on this pass's tensor (it goes with the graph)
            x.register_hook(_fork_hook(stream, x))

    return hook


def _fork_hook(stream: AttentionStream, x: torch.Tensor) -> Callable:
    def on_gradient(g: torch.Tensor) -> torch.Tensor | None:
        rules = stream.active_rules
        return None if rules is None or not rules.needs_residuals else rules.fork(x.detach(), g)

    return on_gradient


def _residual_hook(stream: AttentionStream, slot: list) -> Callable:
    def hook(module: nn.Module, args: tuple, output):
        branch = output[0] if isinstance(output, tuple) else output
        base, slot[0] = slot[0], None
        if base is None or not torch.is_grad_enabled() or not branch.requires_grad:
            return None
        routed = _ResidualRule.apply(stream, base, branch)
        return (routed, *output[1:]) if isinstance(output, tuple) else routed

    return hook


class _ModuleRule(torch.autograd.Function):
    """A module's output passed through: the true gradient goes on into the module's own backward,
    a modified pass's rule straight to the module's input."""

    @staticmethod
    def forward(ctx, stream, kind, module, x, y):  # type: ignore[override]
        ctx.stream, ctx.kind, ctx.module = stream, kind, module
        ctx.save_for_backward(x, y)
        return y.view_as(y)

    @staticmethod
    @once_differentiable
    def backward(ctx, g):  # type: ignore[override]
        rules = ctx.stream.active_rules
        if rules is not None and rules.modifies(ctx.kind, ctx.module):
            x, y = ctx.saved_tensors
            on_input = rules.module(ctx.kind, ctx.module, x, y, g)
            if on_input is not None:
                return None, None, None, on_input.to(x.dtype), None
        return None, None, None, None, g


class _ResidualRule(torch.autograd.Function):
    """A residual branch's output passed through; a modified pass with a residual rule splits the
    sum's relevance between the stream and the branch here."""

    @staticmethod
    def forward(ctx, stream, base, branch):  # type: ignore[override]
        ctx.stream = stream
        ctx.save_for_backward(base, branch)
        return branch.view_as(branch)

    @staticmethod
    @once_differentiable
    def backward(ctx, g):  # type: ignore[override]
        rules = ctx.stream.active_rules
        if rules is not None and rules.needs_residuals:
            base, branch = ctx.saved_tensors
            split = rules.residual(base, branch, g)
            if split is not None:
                extra, on_branch = split
                return None, extra if ctx.needs_input_grad[1] else None, on_branch
        return None, None, g
