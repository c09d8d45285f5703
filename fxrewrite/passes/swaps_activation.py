"""Activation swaps: GELU/SiLU -> ReLU (ReLU-fication, for activation sparsity) and ReLU ->
fitted quadratic (PolyReLU, for private inference).

Both approximate (the function changes) and opt-in: by name (`passes=["relufication"]`,
`passes=["relu_to_poly"]`) or with options through the factories below
(`passes=[relufy(threshold=0.1)]`, `passes=[relu_to_poly(per_channel=False)]`). Each
replacement is a `call_module` to an ordinary module (torch.nn.ReLU, or
`rewrite.activations.ShiftedReLU / ThresholdReLU / PolyReLU`) registered next to the op it
replaces (`blocks.0.mlp.act` -> `blocks.0.mlp.act_relu`), so it trains, saves and exports. As
the other swaps (`passes.swaps`), the report gets one "rewrote" record per swap with the
layer's output deviation on the example inputs, a note with the model's output deviation, and a
"skipped" record with the reason for every op of the kind not swapped. Both passes measure on the
graph's example inputs (one extra run of the graph, recording each swapped op's input).

ReLU-fication (ProSparse; "ReLU Strikes Back" / "ReLU's Revival"). GELU (exact or tanh
approximation) and SiLU, each a canonical op (`ops.gelu` with either `approximate`, `ops.silu`)
whatever spelling the model used, become one of the following. GELU / SiLU written out with
elementwise ops (GPT-2's 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), x * sigmoid(x),
x * 0.5 (1 + erf(x / sqrt 2))) are recognised first (`written_out_activations`: the elementwise
cone under a tanh / sigmoid / erf that reads one tensor, checked numerically against the forms
on probe values) and swapped like the canonical ops:
- ReLU:            max(x, 0)                       (shift = 0, threshold = None, the default)
- shifted ReLU:    max(x - shift, 0)               (`shift`; continuous, output moved down by shift)
- thresholded ReLU: x if x > threshold else 0     (`threshold >= 0`; ProSparse's FATReLU: keeps
                                                   the values it passes, cuts the rest to 0)
GELU(x) and SiLU(x) equal x * Phi(x) and x * sigmoid(x): ReLU is their limit for large |x|; they
differ most near 0 (GELU(-0.75) = -0.17, SiLU(-1.28) = -0.28) and the swap changes every small
or negative value, so the model needs fine-tuning afterwards (the papers' recipe). In a gated FFN,
act(gate) * up (LLaMA, Qwen2, SwiGLU/GeGLU), the act is the GELU/SiLU node and is what is
swapped; the product then inherits the ReLU's zeros. Each record gives the activation sparsity
(fraction of exact zeros) on the example inputs before (the GELU/SiLU's output: essentially
none) and after (the ReLU's), and for a gated FFN that of the product act(gate) * up too; see
`fxrewrite.sparsity.activation_sparsity` to measure it on other data.

Polynomial ReLU (AutoReP). ReLU (module, functional or in place) becomes PolyReLU:
y = a x^2 + b x + c per channel, where the channel is dim 1 of a 4-d (NCHW, convolution)
activation (kept as dim -3: `PolyReLU` counts from the end) and the last dim of any other
((..., features)) activation, or one polynomial for
the layer (`per_channel=False`); `channel_dim=` overrides the rule. a, b, c are fitted by least
squares (float64) to ReLU on the inputs the ReLU receives on the example inputs (a layer with
fewer than `min_rows` values per channel there, e.g. late stages at a small image size, gets one
polynomial fitted on all its values for every channel: a quadratic through a few points per
channel extrapolates wildly, and the errors compound through the layers), and stay parameters
(trainable). Each record gives the fit's relative error ||p(x) - relu(x)|| /
||relu(x)|| on those inputs. The reference ReLU is kept in `gm.meta["swapped_norms"]` (the key
`norm_to_dyt` uses) so that calibration can refit each PolyReLU (`PolyReLU.fit_to`) on more
data, each on the inputs it sees after the layers before it were replaced. Without example
inputs a PolyReLU starts as the least-squares fit for standard normal inputs.

In-place ReLUs kept as written (timm's `ReLU(inplace=True)` after an Identity) are swapped unless
the value they mutate is read elsewhere (then the mutation is observed and they are skipped with
the reason), as `relu_to_smelu` does.
"""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn

from ..rewrite import ops
from ..rewrite.activations import PolyReLU, ShiftedReLU, ThresholdReLU, relative_error
from ..rewrite.passmanager import Pass
from ..rewrite.shapes import tensor_shape

from .swap_common import (Selector, kept_inplace_relu, module_path, nodes_with, observed_inplace, run_recording,
                          swapped_input)
from .swaps import SwapPlan, swap_pass


def _zeros(t: torch.Tensor) -> float:
    return float((t == 0).sum()) / t.numel() if t.numel() else 0.0


def _gated_products(n: fx.Node) -> list[tuple[fx.Node, fx.Node]]:
    """(mul node, other operand) for each elementwise product act * up of `n`'s output."""
    out = []
    for u in n.users:
        if ops.is_call(u, ops.mul):
            a, b = ops.arg(u, "self"), ops.arg(u, "other")
            other = b if a is n else a if b is n else None
            if isinstance(other, fx.Node) and other is not n:
                out.append((u, other))
    return out


def _measured(name: str, targets, plan, suffix: str, only, doc: str, other_forms=None, products: bool = False,
              lift: bool = False) -> Pass:
    """`passes.swaps.swap_pass`, with `plan(rw, node, recorded)` given what the selected ops saw
    on the example inputs: {node: (input, output)} (and with `products`, {act * up node:
    (up, product)} for the gated products of each op), or a reason string when not measured.
    With `lift`, written-out GELU / SiLU are first made canonical ops (`_lift`)."""

    def analysis(rw):
        gm, select = rw.gm, Selector(only)
        if lift:
            _lift(rw, select)
        nodes = [n for n in nodes_with(gm, targets, other_forms) if select(n)]
        wanted = {n: swapped_input(n, "self") for n in nodes}
        if products:
            wanted.update({m: up for n in nodes for m, up in _gated_products(n)})
        recorded = run_recording(gm, wanted)[1] if nodes else {}
        inner = swap_pass(name, targets, "self", lambda rw_, n: plan(rw_, n, recorded), suffix, only, doc,
                          other_forms)
        inner.analysis(rw)

    return Pass(name, "approximate", analysis=analysis, doc=doc)


# ---------------------------------------------------------------- written-out GELU / SiLU

_ERF = {torch.ops.aten.erf.default, torch.erf, torch.special.erf}  # not canonical ops: every spelling
_ELEMENTWISE = {ops.add, ops.sub, ops.mul, ops.div, ops.pow, ops.tanh, ops.sigmoid, *_ERF}
_PROBE = torch.linspace(-8, 8, 161, dtype=torch.float64)
_FORMS = {  # what a written-out activation may compute, and the canonical call that computes it
    "GELU (tanh approximation)": (lambda x: torch.nn.functional.gelu(x, approximate="tanh"),
                                  dict(op=ops.gelu, approximate="tanh")),
    "GELU": (torch.nn.functional.gelu, dict(op=ops.gelu, approximate="none")),
    "SiLU": (torch.nn.functional.silu, dict(op=ops.silu)),
}


def _pointwise(n) -> bool:
    return isinstance(n, fx.Node) and n.op == "call_function" and n.target in _ELEMENTWISE


def _cone(root: fx.Node, limit: int = 16):
    """The elementwise nodes `root` is computed from and the one tensor they read, or None
    (more than one tensor read, or more than `limit` nodes)."""
    cone, leaves, todo = set(), set(), [root]
    while todo:
        n = todo.pop()
        if n in cone:
            continue
        cone.add(n)
        for a in n.all_input_nodes:
            if _pointwise(a):
                todo.append(a)
            else:
                leaves.add(a)
        if len(cone) > limit or len(leaves) > 1:
            return None
    return (cone, leaves.pop()) if len(leaves) == 1 else None


def _computes(cone: set, root: fx.Node, x: fx.Node):
    """Which of `_FORMS` the nodes of `cone` compute from `x` (probed at -8..8, float64), or None."""
    env = {x: _PROBE}
    try:
        for n in root.graph.nodes:  # graph order is a topological order
            if n in cone:
                env[n] = n.target(*fx.node.map_arg(n.args, env.__getitem__),
                                  **fx.node.map_arg(n.kwargs, env.__getitem__))
    except Exception:  # e.g. an operand of another shape: not an activation of x alone
        return None
    y = env[root]
    if not isinstance(y, torch.Tensor) or y.shape != _PROBE.shape:
        return None
    for name, (ref, _) in _FORMS.items():
        if torch.allclose(y, ref(_PROBE), rtol=1e-6, atol=1e-7):
            return name
    return None


def written_out_activations(gm: fx.GraphModule) -> list[tuple[fx.Node, fx.Node, str]]:
    """(root, input, form) of each GELU / SiLU the graph computes with elementwise ops (GPT-2's
    0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), x * sigmoid(x), x * 0.5 (1 + erf(x / sqrt 2)),
    in any order of the operands): from each tanh / sigmoid / erf, the first elementwise node
    below it whose cone reads one tensor, has no value read outside it, and computes one of the
    forms on probe values."""
    found, used = [], set()
    for s in gm.graph.nodes:
        if not (_pointwise(s) and (s.target in (ops.tanh, ops.sigmoid) or s.target in _ERF)) or s in used:
            continue
        frontier = [s]
        for _ in range(5):
            frontier = [u for n in frontier for u in n.users if _pointwise(u)]
            hit = None
            for r in frontier:
                got = _cone(r)
                if got is None:
                    continue
                cone, x = got
                if any(u not in cone for n in cone - {r} for u in n.users):
                    continue  # an intermediate value is read elsewhere
                form = _computes(cone, r, x)
                if form is not None:
                    hit = (r, x, form, cone)
                    break
            if hit is not None:
                found.append(hit[:3])
                used |= hit[3]
                break
    return found


def _lift(rw, select) -> int:
    """Replace each selected written-out GELU / SiLU by its canonical op (equal up to rounding),
    so that the swap sees it; returns how many."""
    lifted = 0
    for root, x, form in written_out_activations(rw.gm):
        if not select(root):
            rw.skip(root.name, f"a written-out {form}, not selected by only={select} "
                               f"(op from {module_path(root) or 'no module'})")
            continue
        spec = dict(_FORMS[form][1])
        new = rw.at(root).call(spec.pop("op"), self=x, **spec)
        rw.redirect(root, new)
        lifted += 1
    if lifted:
        rw.note("model", f"{lifted} written-out GELU/SiLU (elementwise ops) recognised and swapped as canonical ops")
    return lifted


# ---------------------------------------------------------------- GELU / SiLU -> ReLU

def _kind(n: fx.Node) -> str:
    if n.target is ops.silu:
        return "SiLU"
    return "GELU (tanh approximation)" if ops.arg(n, "approximate") == "tanh" else "GELU"


def relufy(shift: float = 0.0, threshold: float | None = None, only=None) -> Pass:
    """GELU/SiLU -> ReLU (shift = 0, threshold = None), max(x - shift, 0) (`ShiftedReLU`) or
    x if x > threshold else 0 (`ThresholdReLU`, threshold >= 0); see the module docstring.
    `only` limits it (module type, name or prefix, regex)."""
    shift = float(shift)
    if threshold is not None:
        if shift != 0:
            raise ValueError("relufy takes a shift or a threshold, not both")
        ThresholdReLU(threshold)  # validate now, not at the first match

    def make() -> tuple[nn.Module, str]:
        if threshold is not None:
            return ThresholdReLU(threshold), f"ThresholdReLU: x if x > {threshold:g} else 0"
        if shift != 0:
            return ShiftedReLU(shift), f"ShiftedReLU: max(x - {shift:g}, 0)"
        return nn.ReLU(), "ReLU"

    def plan(rw, n, recorded):
        mod, what = make()
        detail = f"{_kind(n)} -> {what}"
        if isinstance(recorded, str):
            return SwapPlan(mod, f"{detail}; sparsity {recorded}")
        x, y = recorded[n]
        with torch.no_grad():
            new = mod.to(dtype=x.dtype)(x)
            detail += f"; activation sparsity on the example inputs {_zeros(y):.2%} -> {_zeros(new):.2%}"
            for m, _ in _gated_products(n):
                if m in recorded:
                    up, prod = recorded[m]
                    if (new * up).shape == prod.shape:
                        detail += f"; gated product act(gate) * up {_zeros(prod):.2%} -> {_zeros(new * up):.2%}"
        return SwapPlan(mod, detail)

    return _measured("relufication", [ops.gelu, ops.silu], plan, "relu", only, __doc__, products=True, lift=True)


# ---------------------------------------------------------------- ReLU -> PolyReLU

def _layout(shape, per_channel: bool, channel_dim: int | None) -> tuple[int, int]:
    """(num_channels, channel_dim counted from the end) of a PolyReLU for an input of `shape`
    (None: unknown); IndexError when `channel_dim` is not a dim of it."""
    if not per_channel or shape is None or len(shape) == 0:
        return 1, -1
    d = channel_dim if channel_dim is not None else 1 if len(shape) == 4 else -1
    if not -len(shape) <= d < len(shape):
        raise IndexError(d)
    d = d - len(shape) if d >= 0 else d
    return int(shape[d]), d


def relu_to_poly(per_channel: bool = True, channel_dim: int | None = None, min_rows: int = 32, only=None) -> Pass:
    """ReLU -> PolyReLU a x^2 + b x + c fitted by least squares to ReLU on each layer's inputs on
    the example inputs (see the module docstring). `per_channel=False`: one polynomial per
    layer; `channel_dim`: the channel dim for every layer instead of the rule (1 for 4-d, else
    the last); `min_rows`: fewer values per channel on the example inputs and the layer's
    channels share one polynomial fitted on all its values (`PolyReLU.fit_to`); `only` limits it
    (module type, name or prefix, regex)."""

    def plan(rw, n, recorded):
        if why := observed_inplace(n):
            return why
        x = None if isinstance(recorded, str) else recorded[n][0]
        shape = tuple(x.shape) if x is not None else tensor_shape(n) or tensor_shape(swapped_input(n, "self"))
        try:
            channels, dim = _layout(shape, per_channel, channel_dim)
        except IndexError:
            return f"channel_dim={channel_dim} is not a dim of its {len(shape)}-d input"
        mod = PolyReLU(channels, dim)
        where = f"dim {dim + len(shape)}" if channels > 1 else "one polynomial for the layer"
        if x is None:
            return SwapPlan(mod, f"PolyReLU over {channels} channel(s) ({where}), not fitted ({recorded}): "
                                 f"the standard-normal fit a = c = 0.1995, b = 0.5", reference=nn.ReLU())
        note = mod.fit_to(x, torch.relu(x), min_rows=min_rows)
        with torch.no_grad():  # in the model's dtype, as the layer will run
            err = relative_error(mod.to(x.dtype)(x), torch.relu(x))
        return SwapPlan(mod, f"PolyReLU over {channels} channel(s) ({where}); fit error on the recorded "
                             f"inputs (relative) {err:.4g}; {note}", reference=nn.ReLU())

    return _measured("relu_to_poly", [ops.relu], plan, "poly", only, __doc__, kept_inplace_relu)


RELUFICATION = relufy()
RELU_TO_POLY = relu_to_poly()
