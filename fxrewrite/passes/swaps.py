"""Architecture swaps: ReLU -> SmeLU, LayerNorm -> RMSNorm, LayerNorm/RMSNorm -> DyT.

All approximate (the function changes): for models about to be trained or fine-tuned. Opt-in by
name (`optimize(model, x, passes=["norm_to_dyt"])`), preset ("swap_dyt", "swap_smelu") or with
options through the factories below, e.g. `passes=[relu_to_smelu(beta=0.5, only=nn.ReLU)]`.
Each replacement is a `call_module` to a new, ordinary module (rewrite.nn.SmeLU /
GeneralizedSmeLU / DyT, torch.nn.RMSNorm) registered on the GraphModule next to the module it
replaces (`blocks.0.norm1` -> `blocks.0.norm1_dyt`), so it trains, saves and exports. The report
gets one "rewrote" record per swap with the layer's output deviation on the example inputs, one
note with the model's output deviation, and a "skipped" record with the reason for every op of
the kind that was not swapped.

The maths, and what each swap gives up:
- SmeLU(beta): 0 for x <= -beta, (x + beta)^2 / (4 beta) on [-beta, beta], x for x >= beta.
  Differs from ReLU only on |x| < beta, by at most beta / 4 (at x = 0).
- Generalized SmeLU: slopes g_left / g_right outside [-alpha, beta], C1 quadratic inside
  (`rewrite.nn.GeneralizedSmeLU`); ReLU is the limit g_left = 0, g_right = 1, alpha, beta -> 0.
- LayerNorm -> RMSNorm: LN(x) = (x - mean) / sqrt(var + eps) * w + b becomes
  x / sqrt(mean(x^2) + eps) * w. Dropped: the mean subtraction (exact only when the input
  already has zero mean over the normalised dims, see `passes.prenorm` for when that can be
  arranged) and the bias b (unless `keep_bias=True`, which adds b after the RMSNorm).
- LayerNorm/RMSNorm -> DyT: w * tanh(alpha x) + b with the norm's own w (and b; 0 for RMSNorm or
  a norm without one). No normalisation at all: tanh only squashes, so the deviation depends on
  the input scale; `fxrewrite.calibrate` fits alpha (and optionally w, b) to the replaced norm's
  outputs on sample data. alpha0 = 0.5 by default ("Transformers without Normalization"); with
  `alpha="llm"` the paper's LLM rule: a larger alpha0 for norms that feed attention than for the
  others, by model width (4096: 0.8 / 0.2, 5120: 0.6 / 0.15, 8192: 0.2 / 0.05; narrower models
  use the 4096 row). DyT's weight and bias are per channel of the last dim, so a norm over
  several dims is skipped.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.fx as fx
import torch.nn as nn

from ..rewrite import ops
from ..rewrite.nn import DyT, GeneralizedSmeLU, SmeLU
from ..rewrite.passmanager import Pass
from ..rewrite.shapes import tensor_dtype
from ..rewrite.values import creating_like, has_values
from ..rewrite.verify import deviation

from .swap_common import (Selector, fmt_dev, kept_inplace_relu, module_path, nodes_with, observed_inplace, op_name,
                          run_recording, swapped_input)

# ---------------------------------------------------------------- the driver


@dataclass
class SwapPlan:
    """One swap, decided before the graph changes."""

    module: nn.Module
    detail: str
    bias: fx.Node | None = None  # a get_attr added after the module (RMSNorm keep_bias)
    reference: nn.Module | None = None  # the replaced norm as a module, kept for calibration
    extra: dict = field(default_factory=dict)

    def local(self, x, rw):
        y = self.module(x)
        return y + rw.value(self.bias) if self.bias is not None else y


def swap_pass(name: str, targets, input_arg: str, plan: Callable, suffix: str, only, doc: str,
              other_forms: Callable[[fx.Node], bool] | None = None) -> Pass:
    """A Pass that replaces each selected op of `targets` by the module `plan(rw, node)` gives
    (or skips it with the reason `plan` returns), measuring each swap. `other_forms` also
    matches non-canonical nodes of the same op (an in-place ReLU that canonicalisation kept as
    written); their input is their first argument."""
    select = Selector(only)
    kinds = "/".join(ops.short_name(t) for t in targets)

    def analysis(rw):
        gm = rw.gm
        nodes = nodes_with(gm, targets, other_forms)
        if not nodes:
            rw.note("model", f"nothing to swap: the graph has no {kinds}")
            return
        plans: dict[fx.Node, SwapPlan] = {}
        for n in nodes:
            if not select(n):
                rw.skip(n.name, f"not selected by only={select} (op from {module_path(n) or 'no module'})")
                continue
            with creating_like(gm):  # a plan on meta weights makes its modules on meta
                p = plan(rw, n)
            if isinstance(p, str):
                rw.skip(n.name, p)
            else:
                plans[n] = p
        if not plans:
            rw.note("model", f"nothing swapped: none of the {len(nodes)} {kinds} qualified")
            return
        inputs = {n: swapped_input(n, input_arg) for n in plans}
        outputs, seen = run_recording(gm, inputs)
        for n, p in plans.items():
            _to_like(p.module, n)
            new = rw.at(n).call_module(f"{module_path(n) or n.name}_{suffix}", p.module, (inputs[n],))
            if p.reference is not None:
                gm.meta.setdefault("swapped_norms", {})[new.target] = _to_like(p.reference, n)
            if p.bias is not None:
                new = rw.call(ops.add, self=new, other=p.bias)
            if outputs is None:
                dev = seen
            else:
                x, y = seen[n]
                with torch.no_grad():
                    dev = "layer output deviation on the example inputs: " + fmt_dev(deviation(y, p.local(x, rw)))
            rw.replace(n, new, f"{module_path(n) or n.name} -> {new.target if new.op == 'call_module' else new.name}"
                               f" ({p.detail}); {dev}")
            if not n.users:  # replaced: an in-place op would otherwise stay as an effect
                rw.erase(n)
        rw.sweep()
        if outputs is not None:
            after, _ = run_recording(gm, {})
            what = fmt_dev(deviation(outputs, after)) if after is not None else _
        else:
            what = seen  # why not measured
        rw.note("model", f"{len(plans)} swapped; model output deviation on the example inputs: {what}")

    return Pass(name, "approximate", analysis=analysis, doc=doc)


def _to_like(module: nn.Module, node: fx.Node) -> nn.Module:
    """Put a new module on the device and floating dtype of the value it replaces."""
    dtype = tensor_dtype(node)
    device = getattr(node.meta.get("val"), "device", None)
    if device is not None and device.type != "meta":
        module.to(device=device)
    if dtype is not None and dtype.is_floating_point:
        module.to(dtype=dtype)
    return module


def _constant(rw, node: fx.Node, arg: str):
    """The tensor behind a norm's weight/bias argument: None, a tensor, or a reason string."""
    v = ops.arg(node, arg)
    if v is None:
        return None
    if isinstance(v, fx.Node) and v.op == "get_attr":
        return rw.value(v).detach()
    return f"its {arg} is computed ({v.name if isinstance(v, fx.Node) else v!r}), not a parameter"


# ---------------------------------------------------------------- ReLU -> SmeLU

def relu_to_smelu(beta: float = 1.0, learnable: bool = False, only=None) -> Pass:
    """ReLU -> SmeLU(beta) (see the module docstring); `only` limits it (type, name, regex)."""
    if not beta > 0:
        raise ValueError(f"SmeLU needs beta > 0, got {beta}")

    def plan(rw, n):
        if why := observed_inplace(n):
            return why
        return SwapPlan(SmeLU(beta, learnable),
                        f"SmeLU beta={beta:g}: differs by at most {beta / 4:g} on |x| < {beta:g}")

    return swap_pass("relu_to_smelu", [ops.relu], "self", plan, "smelu", only, __doc__, kept_inplace_relu)


def relu_to_generalized_smelu(alpha: float = 1.0, beta: float = 1.0, g_left: float = 0.0, g_right: float = 1.0,
                              learnable: bool = False, only=None) -> Pass:
    """ReLU -> GeneralizedSmeLU(alpha, beta, g_left, g_right)."""
    GeneralizedSmeLU(alpha, beta, g_left, g_right)  # validate now, not at the first match

    def plan(rw, n):
        if why := observed_inplace(n):
            return why
        return SwapPlan(GeneralizedSmeLU(alpha, beta, g_left, g_right, learnable),
                        f"GeneralizedSmeLU alpha={alpha:g} beta={beta:g} g_left={g_left:g} g_right={g_right:g}")

    return swap_pass("relu_to_generalized_smelu", [ops.relu], "self", plan, "gsmelu", only, __doc__,
                     kept_inplace_relu)


# ---------------------------------------------------------------- LayerNorm -> RMSNorm (plain)

def _ln_reference(n, w, b) -> nn.Module:
    shape = list(ops.arg(n, "normalized_shape"))
    ref = nn.LayerNorm(shape, eps=ops.arg(n, "eps"), elementwise_affine=w is not None, bias=b is not None)
    with torch.no_grad():
        if w is not None:
            ref.weight.copy_(w)
        if b is not None:
            ref.bias.copy_(b)
    return ref.requires_grad_(False)


def _rms_reference(n, w) -> nn.Module:
    ref = nn.RMSNorm(list(ops.arg(n, "normalized_shape")), eps=ops.arg(n, "eps"), elementwise_affine=w is not None)
    if w is not None:
        with torch.no_grad():
            ref.weight.copy_(w)
    return ref.requires_grad_(False)


def norm_kind(n: fx.Node) -> str:
    return "LayerNorm" if n.target is ops.layer_norm else "RMSNorm"


def elementwise_why(swap: str) -> str:
    """Why an elementwise swap cannot replace a norm over several dims jointly."""
    return f"{swap} is elementwise with a weight and bias per channel of the last dim, so it cannot stand in for it"


def last_dim_norm(rw, n: fx.Node, why_not_joint: str):
    """(width, weight, bias, the norm as a module) of a LayerNorm/RMSNorm over the last dim, for a
    swap to an elementwise module; or why not: it normalises several dims jointly (then
    `why_not_joint` says why the swap needs one), or its weight or bias is computed. weight and
    bias are None where the norm has none (an RMSNorm never has a bias)."""
    shape = list(ops.arg(n, "normalized_shape"))
    if len(shape) != 1:
        return f"normalises over {len(shape)} dims {shape} jointly; {why_not_joint}"
    w = _constant(rw, n, "weight")
    b = _constant(rw, n, "bias") if n.target is ops.layer_norm else None
    for v in (w, b):
        if isinstance(v, str):
            return v
    ref = _ln_reference(n, w, b) if n.target is ops.layer_norm else _rms_reference(n, w)
    return shape[0], w, b, ref


def with_affine(mod: nn.Module, w, b) -> nn.Module:
    """`mod` with the replaced norm's weight and bias copied in (those it had: None leaves the
    new module's own)."""
    with torch.no_grad():
        if w is not None:
            mod.weight.copy_(w)
        if b is not None:
            mod.bias.copy_(b)
    return mod


def layernorm_to_rmsnorm(only=None, keep_bias: bool = False) -> Pass:
    """LayerNorm -> torch.nn.RMSNorm with the same weight and eps; drops the mean subtraction and
    (unless keep_bias) the bias, and says so in the report."""

    def plan(rw, n):
        w, b = _constant(rw, n, "weight"), _constant(rw, n, "bias")
        for v in (w, b):
            if isinstance(v, str):
                return v
        shape = list(ops.arg(n, "normalized_shape"))
        mod = nn.RMSNorm(shape, eps=ops.arg(n, "eps"), elementwise_affine=w is not None)
        if w is not None:
            with torch.no_grad():
                mod.weight.copy_(w)
        dropped = ["the mean subtraction"]
        if b is not None and not keep_bias:
            dropped.append(f"the bias (max |b| {float(b.abs().max()):.3g})" if has_values(b) else "the bias")
        notes = "" if w is not None else "; the LayerNorm had no weight: RMSNorm without one"
        kept = "; bias kept as an add" if b is not None and keep_bias else ""
        return SwapPlan(mod, f"RMSNorm over {shape}; dropped: {' and '.join(dropped)}{kept}{notes}",
                        bias=ops.arg(n, "bias") if b is not None and keep_bias else None)

    return swap_pass("layernorm_to_rmsnorm", [ops.layer_norm], "input", plan, "rms", only, __doc__)


# ---------------------------------------------------------------- LayerNorm / RMSNorm -> DyT

LLM_ALPHA = [  # (width up to, alpha0 for norms before attention, alpha0 for the others), DyT paper, LLaMA
    (4096, 0.8, 0.2),
    (5120, 0.6, 0.15),
    (float("inf"), 0.2, 0.05),
]


def llm_alpha(width: int) -> tuple[float, float]:
    """(alpha0 before attention, alpha0 elsewhere) for an LLM of this width (DyT paper, Table 11)."""
    for limit, attn, other in LLM_ALPHA:
        if width <= limit:
            return attn, other
    raise AssertionError


_LIGHT = {"view", "reshape", "_unsafe_view", "transpose", "permute", "split", "split_with_sizes", "getitem",
          "slice", "select", "cat", "mul", "add", "sub", "neg", "contiguous", "expand", "unsqueeze", "squeeze",
          "clone", "alias", "to", "_to_copy", "flatten", "unbind", "chunk", "t", "type_as", "float", "size"}
_ATTENTION = {"scaled_dot_product_attention", "softmax", "_softmax", "_safe_softmax"}
_SCORES = {"matmul", "bmm", "baddbmm", "einsum"}
_PROJECTION = {"linear", "addmm", "mm", "convolution"}


def feeds_attention(norm: fx.Node, max_depth: int = 24) -> bool:
    """Whether the norm's output reaches attention scores through one projection and only
    reshaping/rotary-style ops (q = proj(norm(x)) -> ... -> softmax/sdpa/q @ k^T)."""
    todo, seen = [(norm, 0, 0)], set()
    while todo:
        node, projections, depth = todo.pop()
        for u in node.users:
            if u in seen or depth >= max_depth:
                continue
            seen.add(u)
            name = op_name(u)
            if name in _ATTENTION or (name in _SCORES and projections == 1):
                return True
            if name in _PROJECTION and projections == 0:
                todo.append((u, 1, depth + 1))
            elif name in _LIGHT:
                todo.append((u, projections, depth + 1))
    return False


def norm_to_dyt(alpha: float | str = 0.5, attention_alpha: float | None = None, only=None,
                norms=("layer_norm", "rms_norm")) -> Pass:
    """LayerNorm/RMSNorm -> DyT. `alpha`: alpha0 for every norm, or "llm" for the paper's LLM rule
    by width; `attention_alpha`: a separate alpha0 for norms that feed attention."""
    if alpha != "llm" and not isinstance(alpha, (int, float)):
        raise ValueError(f"alpha must be a number or 'llm', got {alpha!r}")
    for label, v in (("alpha", alpha), ("attention_alpha", attention_alpha)):
        if isinstance(v, (int, float)) and not v > 0:  # tanh(0 x) = 0: the layer would output its bias only
            raise ValueError(f"{label} must be > 0, got {v}")
    targets = [{"layer_norm": ops.layer_norm, "rms_norm": ops.rms_norm}[k] for k in norms]

    def plan(rw, n):
        found = last_dim_norm(rw, n, elementwise_why("DyT"))
        if isinstance(found, str):
            return found
        width, w, b, ref = found
        attn = feeds_attention(n)
        if alpha == "llm":
            a_attn, a_other = llm_alpha(width)
            a0 = a_attn if attn else a_other
            why = f"LLM rule for width {width}, {'feeds' if attn else 'does not feed'} attention"
        elif attention_alpha is not None and attn:
            a0, why = float(attention_alpha), "feeds attention"
        else:
            a0, why = float(alpha), "default" if attention_alpha is None else "does not feed attention"
        mod = with_affine(DyT(width, a0, bias=True), w, b)
        kind = norm_kind(n)
        affine = "" if w is not None or b is not None else f"; the {kind} had no affine parameters: weight 1, bias 0"
        return SwapPlan(mod, f"DyT from {kind}, alpha0={a0:g} ({why}){affine}", reference=ref)

    return swap_pass("norm_to_dyt", targets, "input", plan, "dyt", only, __doc__)


RELU_TO_SMELU = relu_to_smelu()
RELU_TO_GENERALIZED_SMELU = relu_to_generalized_smelu()
LAYERNORM_TO_RMSNORM = layernorm_to_rmsnorm()
NORM_TO_DYT = norm_to_dyt()
