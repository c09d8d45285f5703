"""Structural re-parameterization found in the graph: linear regions become one conv / linear.

A *linear region* is a set of nodes that together compute an affine function of one input x:
convolutions and linears with constant weights, eval BatchNorm, per-channel (per-feature) scale
and shift by constants, avg-pool, zero padding, identity, and sums/differences of such values.
Every train-time re-parameterizable block is one: RepVGG (kxk + 1x1 + identity BN), ACNet (1xk +
kx1 + kxk), Diverse Branch Block (1x1 -> kxk, avg-pool, 1x1), MobileOne (k kxk branches + 1x1
scale + BN-only), RepMixer / RepCPE (FastViT), RepVggDw (RepViT), layer-scale after a conv,
Linear -> Linear, LoRA's `x @ A @ B` added to a Linear, a BatchNorm1d in front of a Linear.
No pattern is written per architecture: regions are found with dominators (`rewrite.graphview`).

**Finding regions.** For each linear node r (last first), walk up its dominator chain
x0 = idom(r), x1 = idom(x0), ...; every path from the inputs to r passes through each x_k, so
`between(x_k, r) + {r}` is a function of x_k alone. It is a candidate region when every node in
it is linear and none of its values is read outside the region. The largest candidate that is
exact and does not cost more is rewritten; smaller ones are tried when a larger one is not.

**Merging.** The region is compiled into a plan (a list of steps with literal geometry and
constant expressions) and evaluated on `reparam_math` maps: sums merge kernels, sequences compose
them, affine steps scale rows. The plan is the derivation: the new weight and bias are
registered with `rw.param(...)` as functions of the old tensors.

**Exactness: exact** (the same function; the merged weights are computed in float64 and cast to
the weights' dtype, so outputs agree up to float rounding). When a merge would not be exact
(strides, dilations or window alignments differ, a padded conv after a biased one, a strided
conv before a wide one, avg-pool without `count_include_pad`, ...), or would cost more
multiply-adds than the ops it replaces (a depthwise conv followed by a pointwise one), the region
is skipped and the report says why. Legality that depends on values (a zero bias) is checked on
the current weights.

Also: **conv -> flatten -> Linear** on a known input size is folded into the Linear (RepMLP):
W' = W . M with M the conv's matrix, computed as the conv's adjoint applied to W's rows.
"""
from __future__ import annotations

import contextlib
import math
import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn

from ..rewrite import ops
from ..rewrite.graphview import DominatorView
from ..rewrite.passmanager import Pass
from ..rewrite.attrs import fetch_attr
from ..rewrite.shapes import tensor_dtype, tensor_shape

from . import reparam_math as rm
from .reparam_math import NotMergeable

aten = torch.ops.aten

# ------------------------------------------------------------------ constant expressions
# A constant operand (a weight, `gamma.view(1, -1, 1, 1)`, a Python number) is kept as a small
# expression over get_attr targets, so that the merge can be replayed on other tensors.

_PURE_METHODS = {"view", "reshape", "unsqueeze", "squeeze", "flatten", "permute", "transpose", "t", "expand",
                 "contiguous", "clone", "to", "float", "double", "half", "bfloat16", "exp", "neg", "reciprocal",
                 "sqrt", "rsqrt", "abs", "sigmoid", "tanh", "add", "sub", "mul", "div", "pow", "mean", "sum",
                 "squeeze", "detach"}
_PURE_FUNCTIONS = {operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.pow,
                   torch.exp, torch.sigmoid, torch.tanh, torch.sqrt, torch.rsqrt, torch.reshape, torch.flatten,
                   torch.unsqueeze, torch.squeeze, torch.transpose, torch.permute, torch.abs} | ops.ELEMENTWISE_BINARY \
    | ops.ELEMENTWISE_UNARY | {aten.view.default, aten.reshape.default, aten.unsqueeze.default,
                               aten.squeeze.dim, aten.t.default, aten.transpose.int, aten.permute.default,
                               aten.exp.default, aten.neg.default, aten.reciprocal.default, aten.sqrt.default,
                               aten.rsqrt.default, aten.expand.default, aten.clone.default, aten.detach.default,
                               ops.pow, ops.mean, ops.cast}


class _NotLinear(Exception):
    """The node is not an affine op of one variable input (not part of any region)."""


@dataclass
class Const:
    """`fn` of get_attr tensors: ("src", target) | ("lit", v) | ("call", f, args) | ("method", name, args)."""

    expr: tuple

    def eval(self, env: dict):
        return _eval(self.expr, env)


def _eval(e, env):
    kind = e[0]
    if kind == "lit":
        return e[1]
    if kind == "src":
        return env[e[1]]
    if kind == "seq":
        return type(e[1])(_eval(x, env) for x in e[1])
    args = [_eval(a, env) for a in e[2]]
    kwargs = {k: _eval(v, env) for k, v in e[3].items()}
    if kind == "call":
        return e[1](*args, **kwargs)
    return getattr(args[0], e[1])(*args[1:], **kwargs)


class _Context:
    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.view = DominatorView(gm.graph)
        self.sources: dict[str, fx.Node] = {}  # get_attr target -> node, for the current region
        self.not_linear: dict[fx.Node, tuple] = {}  # node -> (exception type, args), see `classify`

    def variable(self, v) -> bool:
        return self.view.is_variable(v)

    def const(self, v) -> Const:
        return Const(self._expr(v))

    def _expr(self, v):
        if isinstance(v, (list, tuple)):
            return ("seq", type(v)(self._expr(x) for x in v))
        if not isinstance(v, fx.Node):
            return ("lit", v)
        if self.variable(v):
            raise _NotLinear(f"{v.name} depends on the input")
        if v.op == "get_attr":
            self.sources.setdefault(v.target, v)
            return ("src", v.target)
        args = tuple(self._expr(a) for a in v.args)
        kwargs = {k: self._expr(a) for k, a in v.kwargs.items()}
        if v.op == "call_function" and v.target in _PURE_FUNCTIONS:
            return ("call", v.target, args, kwargs)
        if v.op == "call_method" and v.target in _PURE_METHODS:
            return ("method", v.target, args, kwargs)
        raise _NotLinear(f"constant {v.name} is computed by {v.target}, which is not known to be pure")

    def value(self, c: Const):
        with torch.no_grad():
            return c.eval(_Attributes(self.gm))


class _Attributes(dict):
    """target -> tensor of `gm`, fetched when an expression first reads it."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__()
        self.gm = gm

    def __missing__(self, target: str):
        value = self[target] = fetch_attr(self.gm, target)
        return value


# ------------------------------------------------------------------ steps: each linear op of a region

@dataclass
class Step:
    """One op of a region. `inputs` are step indices (-1: the region input x)."""

    kind: str  # conv, bn, axpy, pool, pad, linear
    node: str
    inputs: tuple = ()
    consts: dict = field(default_factory=dict)
    lits: dict = field(default_factory=dict)
    domain: str | None = None  # "conv" (NCHW channels), "linear" (last axis), None: either
    macs: int = 0  # multiply-adds of the original op, for the cost rule

    def describe(self) -> str:
        if self.kind == "conv":
            kh, kw = self.lits["kernel"]
            return f"conv{kh}x{kw}" + (f"/g{self.lits['groups']}" if self.lits["groups"] > 1 else "")
        if self.kind == "pool":
            return "avgpool{}x{}".format(*self.lits["kernel"])
        return {"axpy": "add" if len(self.inputs) > 1 else "affine"}.get(self.kind, self.kind)


_MATMULS = {operator.matmul, torch.matmul, aten.matmul.default, aten.mm.default}


def _numel(node) -> int:
    """Elements of a node's value, for the cost rule; a symbolic size (a dynamic batch from
    torch.export or Dynamo) counts at the size it had on the example inputs."""
    shape = tensor_shape(node)
    return math.prod(_hint(d) for d in shape) if shape is not None else 0


def _hint(d) -> int:
    if isinstance(d, int):
        return d
    hint = getattr(getattr(d, "node", None), "hint", None)
    return int(hint) if hint is not None else 1


def _pair(v):
    return tuple(v) * (2 // len(v)) if isinstance(v, (list, tuple)) else (v, v)


def classify(node: fx.Node, ctx: _Context) -> tuple[Step, list[fx.Node]]:
    """The step computed by `node` and its variable operands; raises _NotLinear otherwise.
    A node found not linear is remembered for the rest of this view of the graph: every root
    below it asks again while growing its region."""
    known = ctx.not_linear.get(node)
    if known is not None:
        raise known[0](*known[1])
    try:
        return _classify(node, ctx)
    except (_NotLinear, NotMergeable) as e:
        ctx.not_linear[node] = (type(e), e.args)
        raise


def _classify(node: fx.Node, ctx: _Context) -> tuple[Step, list[fx.Node]]:
    if node.op != "call_function":
        raise _NotLinear("not a function call")
    classifier = _CLASSIFIERS.get(node.target)
    if classifier is None:
        raise _NotLinear(f"{ops.short_name(node.target)} is not linear")
    return classifier(node, ctx, _numel(node))


# One classifier per kind of linear op: (node, context, elements of its output) -> (step, variable
# operands), or _NotLinear / NotMergeable with the reason.

def _conv_step(node, ctx, out):
    var = ctx.variable
    x, w = ops.arg(node, "input"), ops.arg(node, "weight")
    if not var(x) or var(w) or var(ops.arg(node, "bias")) or ops.arg(node, "transposed"):
        raise _NotLinear("conv with a computed weight, or transposed")
    wv = ctx.value(ctx.const(w))
    if wv.dim() != 4:
        raise _NotLinear("only 2-D convolutions are merged")
    step = Step("conv", node.name, consts=dict(weight=ctx.const(w), bias=ctx.const(ops.arg(node, "bias"))),
                lits=dict(stride=_pair(ops.arg(node, "stride")), padding=_pair(ops.arg(node, "padding")),
                          dilation=_pair(ops.arg(node, "dilation")), groups=ops.arg(node, "groups"),
                          kernel=tuple(wv.shape[2:])),
                domain="conv", macs=out * wv.shape[1] * wv.shape[2] * wv.shape[3])
    return step, [x]


def _batch_norm_step(node, ctx, out):
    var = ctx.variable
    x = ops.arg(node, "input")
    if ops.arg(node, "training") is not False or not var(x):
        raise _NotLinear("batch norm in training mode")
    names = ("weight", "bias", "running_mean", "running_var")
    if any(var(ops.arg(node, n)) for n in names) or ops.arg(node, "running_mean") is None:
        raise _NotLinear("batch norm without constant statistics")
    if isinstance(ops.arg(node, "eps"), fx.Node):  # torch.compile(dynamic=True) passes float attributes in
        raise _NotLinear("batch norm with a computed eps")
    rank = len(tensor_shape(x) or ())
    domain = {4: "conv", 2: "linear"}.get(rank)
    if domain is None:
        raise _NotLinear(f"batch norm over a rank-{rank} tensor")
    return Step("bn", node.name, consts={n: ctx.const(ops.arg(node, n)) for n in names},
                lits=dict(eps=float(ops.arg(node, "eps"))), domain=domain, macs=out), [x]


def _sum_step(node, ctx, out):
    """a + alpha b, a - alpha b: a weighted sum of the variable terms plus the constant ones."""
    a, b = ops.arg(node, "self"), ops.arg(node, "other")
    alpha = ops.arg(node, "alpha")
    if isinstance(alpha, fx.Node):
        raise _NotLinear("computed alpha")
    terms = [(a, 1), (b, alpha if node.target is ops.add else -alpha)]
    variables = [(v, c) for v, c in terms if ctx.variable(v)]
    consts = [(v, c) for v, c in terms if not ctx.variable(v)]
    if not variables:
        raise _NotLinear("constant")
    step = Step("axpy", node.name, lits=dict(coefs=tuple(c for _, c in variables),
                                             const_coefs=tuple(c for _, c in consts)),
                consts={f"c{i}": ctx.const(v) for i, (v, _) in enumerate(consts)}, macs=out)
    return step, [v for v, _ in variables]


def _scale_step(node, ctx, out):
    """x * c, c * x, x / c with a constant c."""
    var = ctx.variable
    a, b = ops.arg(node, "self"), ops.arg(node, "other")
    if node.target is ops.mul and var(a) != var(b):
        x, c = (a, b) if var(a) else (b, a)
        return Step("axpy", node.name, lits=dict(coefs=("scale",), const_coefs=()),
                    consts=dict(scale=ctx.const(c)), macs=out), [x]
    if node.target is ops.div and var(a) and not var(b):
        return Step("axpy", node.name, lits=dict(coefs=("inv_scale",), const_coefs=()),
                    consts=dict(scale=ctx.const(b)), macs=out), [a]
    raise _NotLinear("product or quotient of two variables")


def _avg_pool_step(node, ctx, out):
    x = ops.arg(node, "self")
    k = _pair(ops.arg(node, "kernel_size"))
    s = ops.arg(node, "stride")
    s = _pair(s) if s else k
    p = _pair(ops.arg(node, "padding"))
    if not ctx.variable(x) or (any(p) and not ops.arg(node, "count_include_pad")):
        raise _NotLinear("avg_pool2d without count_include_pad averages fewer pixels at the border")
    if ops.arg(node, "ceil_mode"):
        raise _NotLinear("avg_pool2d with ceil_mode")
    return Step("pool", node.name, lits=dict(kernel=k, stride=s, padding=p,
                                             divisor=ops.arg(node, "divisor_override")),
                domain="conv", macs=out * k[0] * k[1]), [x]


def _pad_step(node, ctx, out):
    x, pad = ops.arg(node, "self"), ops.arg(node, "pad")
    value = ops.arg(node, "value")
    if not ctx.variable(x) or ops.arg(node, "mode") != "constant" or value not in (None, 0, 0.0) or len(pad) != 4:
        raise _NotLinear("padding that is not zero padding of H and W")
    if pad[0] != pad[1] or pad[2] != pad[3] or min(pad) < 0:
        raise NotMergeable(f"asymmetric zero padding {list(pad)} (as padding='same' with an even kernel "
                           f"inserts) has no equivalent in a convolution's symmetric padding")
    return Step("pad", node.name, lits=dict(padding=(pad[2], pad[0])), domain="conv", macs=0), [x]


def _alias_step(node, ctx, out):
    x = ops.arg(node, "self")
    if not ctx.variable(x):
        raise _NotLinear(f"{ops.short_name(node.target)} is not linear")
    return Step("axpy", node.name, lits=dict(coefs=(1,), const_coefs=()), macs=0), [x]


def _linear_step(node, ctx, out):
    var = ctx.variable
    x, w, b = ops.arg(node, "input"), ops.arg(node, "weight"), ops.arg(node, "bias")
    if not var(x) or var(w) or var(b):
        raise _NotLinear("linear with a computed weight")
    wv = ctx.value(ctx.const(w))
    return Step("linear", node.name, consts=dict(weight=ctx.const(w), bias=ctx.const(b)), domain="linear",
                macs=out * wv.shape[1]), [x]


def _matmul_step(node, ctx, out):
    if len(node.args) == 2 and not node.kwargs:
        x, w = node.args
        if ctx.variable(x) and not ctx.variable(w):
            wv = ctx.value(ctx.const(w))
            if isinstance(wv, torch.Tensor) and wv.dim() == 2:
                return Step("linear", node.name, consts=dict(weight_t=ctx.const(w)), domain="linear",
                            macs=out * wv.shape[0]), [x]
    raise _NotLinear("matmul that is not input @ constant matrix")


_CLASSIFIERS = {ops.conv: _conv_step, ops.batch_norm: _batch_norm_step, ops.add: _sum_step, ops.sub: _sum_step,
                ops.mul: _scale_step, ops.div: _scale_step, ops.avg_pool2d: _avg_pool_step, ops.pad: _pad_step,
                aten.alias.default: _alias_step, ops.linear: _linear_step} | dict.fromkeys(_MATMULS, _matmul_step)


# ------------------------------------------------------------------ plans

@dataclass
class Plan:
    """A region compiled to steps (topological order; the last one is the root)."""

    steps: list[Step]
    domain: str
    channels: int  # of the region input
    rank: int
    macs: int

    def describe(self) -> str:
        kinds = [s.describe() for s in self.steps]
        return ", ".join(f"{k}" + (f" x{kinds.count(k)}" if kinds.count(k) > 1 else "")
                         for k in dict.fromkeys(kinds))

    def evaluate(self, env: dict):
        """The region's map, from the get_attr tensors in `env` (target -> tensor). The maps it
        builds itself (identities, pooling kernels, zero biases) are made on the weights' device,
        so that a plan evaluates on CUDA or meta weights as on CPU ones."""
        device = next((t.device for t in env.values() if isinstance(t, torch.Tensor)), torch.device("cpu"))
        with device if device.type != "cpu" else contextlib.nullcontext():  # (a device mode slows every op)
            ident = rm.identity_conv(self.channels) if self.domain == "conv" else rm.identity_linear(self.channels)
            vals = {-1: ident}
            for i, st in enumerate(self.steps):
                vals[i] = _apply(st, [vals[j] for j in st.inputs], env, self.domain, self.rank)
        return vals[len(self.steps) - 1]


def _per_channel(v, n: int, rank: int, domain: str, what: str) -> torch.Tensor:
    """A constant broadcast against the value as an [n] vector along the channel (conv) or the
    last (linear) axis; raises NotMergeable if it varies along any other axis."""
    if not isinstance(v, torch.Tensor):
        v = torch.tensor(float(v), dtype=torch.float64)  # (float32 would round the literal)
    axis = 1 if domain == "conv" else rank - 1
    if v.dim() > rank:
        raise NotMergeable(f"{what} has more dimensions than the value")
    shape = (1,) * (rank - v.dim()) + tuple(v.shape)
    if any(s != 1 for i, s in enumerate(shape) if i != axis) or shape[axis] not in (1, n):
        raise NotMergeable(f"{what} of shape {list(v.shape)} is not per-channel")
    return v.double().reshape(-1).expand(n).clone()


def _apply(st: Step, inputs: list, env: dict, domain: str, rank: int):
    c = {k: v.eval(env) for k, v in st.consts.items()}
    if st.kind == "conv":
        L = st.lits
        return rm.compose(inputs[0], rm.conv_map(c["weight"], c["bias"], L["stride"], L["padding"], L["dilation"],
                                                 L["groups"]))
    if st.kind == "linear":
        w = c["weight"] if "weight" in c else c["weight_t"].t()
        return rm.compose(inputs[0], rm.linear_map(w, c.get("bias")))
    if st.kind == "bn":
        n = inputs[0].cout
        var = c["running_var"].double()
        scale = torch.rsqrt(var + st.lits["eps"])
        if c["weight"] is not None:
            scale = scale * c["weight"].double()
        shift = -c["running_mean"].double() * scale
        if c["bias"] is not None:
            shift = shift + c["bias"].double()
        if scale.numel() != n:
            raise NotMergeable(f"batch norm over {scale.numel()} channels applied to {n}")
        return rm.affine(inputs[0], scale.reshape(-1), shift.reshape(-1))
    if st.kind == "pool":
        L = st.lits
        n = inputs[0].cout
        return rm.compose(inputs[0], rm.avg_pool_conv(n, L["kernel"], L["stride"], L["padding"], L["divisor"]))
    if st.kind == "pad":
        return rm.compose(inputs[0], rm.identity_conv(inputs[0].cout, st.lits["padding"]))
    # axpy: sum of coef * input + sum of coef * const
    n = inputs[0].cout
    total = None
    for m, coef in zip(inputs, st.lits["coefs"]):
        if coef == "scale":
            m = rm.affine(m, _per_channel(c["scale"], n, rank, domain, "scale"))
        elif coef == "inv_scale":
            m = rm.affine(m, 1.0 / _per_channel(c["scale"], n, rank, domain, "divisor"))
        elif coef != 1:
            m = rm.affine(m, torch.full((n,), float(coef), dtype=torch.float64))
        total = m if total is None else rm.add(total, m)
    for i, coef in enumerate(st.lits["const_coefs"]):
        total = rm.affine(total, shift=float(coef) * _per_channel(c[f"c{i}"], n, rank, domain, "constant term"))
    return total


def build_plan(region: list[fx.Node], x: fx.Node, ctx: _Context) -> Plan:
    """Compile a region (topologically ordered, root last) reading only `x`."""
    index = {n: i for i, n in enumerate(region)}
    steps, domains = [], set()
    for node in region:
        st, operands = classify(node, ctx)
        refs = []
        for v in operands:
            if v is x:
                refs.append(-1)
            elif v in index:
                refs.append(index[v])
            else:
                raise _NotLinear(f"{node.name} reads {v.name}, outside the region")
        st.inputs = tuple(refs)
        steps.append(st)
        if st.domain:
            domains.add(st.domain)
    if len(domains) != 1:
        raise _NotLinear("no conv/linear op" if not domains else "mixes convolutions and linear layers")
    domain = domains.pop()
    shape = tensor_shape(x)
    if shape is None:
        raise NotMergeable(f"the shape of the input {x.name} is unknown")
    if domain == "conv" and len(shape) != 4:
        raise NotMergeable(f"input {x.name} has rank {len(shape)}, not NCHW")
    channels = shape[1] if domain == "conv" else shape[-1]
    return Plan(steps, domain, channels, len(shape), sum(s.macs for s in steps))


# ------------------------------------------------------------------ the pass

def _candidates(root: fx.Node, ctx: _Context) -> tuple[list[tuple[fx.Node, list[fx.Node]]], str | None]:
    """(input x, region in graph order) for each dominator x of root whose region is linear and
    private, nearest first; and why the growth stopped when it stopped at a linear op that
    cannot be merged (a near miss worth reporting), else None."""
    out = []
    order = ctx.view.index
    for x in ctx.view.dominator_chain(root):
        inner = ctx.view.between(x, root)
        region = inner | {root}
        if any(not set(n.users) <= region for n in inner):
            break
        try:
            for n in inner:
                classify(n, ctx)
        except NotMergeable as e:
            return out, f"{n.name}: {e}"
        except _NotLinear:
            break
        out.append((x, sorted(region, key=order.__getitem__)))
    return out, None


def _worthwhile(plan: Plan) -> bool:
    real = [s for s in plan.steps if s.macs > 0]
    return any(s.kind in ("conv", "linear") for s in plan.steps) and len(real) >= 2


class _Memo:
    """Evaluate a plan once for both the weight and the bias derivations."""

    def __init__(self, plan: Plan, targets: list[str]):
        self.plan, self.targets, self._key, self._map = plan, targets, None, None

    def __call__(self, *tensors):
        # the same tensor objects at the same version (an in-place update bumps `_version`);
        # holding them keeps their ids from being reused by other tensors
        key = tuple((t, getattr(t, "_version", None)) for t in tensors)
        if self._key is None or len(key) != len(self._key) or any(
                a is not b or va != vb for (a, va), (b, vb) in zip(key, self._key)):
            self._key, self._map = key, self.plan.evaluate(dict(zip(self.targets, tensors)))
        return self._map


def _try_root(root: fx.Node, ctx: _Context, rw) -> bool:
    ctx.sources = {}
    try:
        classify(root, ctx)
    except (_NotLinear, NotMergeable):
        return False
    candidates, stop = _candidates(root, ctx)
    reasons = [stop] if stop else []
    for x, region in reversed(candidates):  # largest first
        if len(region) < 2:
            continue  # one op alone is never worth rewriting (see `_worthwhile`)
        ctx.sources = {}
        try:
            plan = build_plan(region, x, ctx)
        except _NotLinear:
            continue
        except NotMergeable as e:
            reasons.append(str(e))
            continue
        if not _worthwhile(plan):
            continue
        try:
            merged = plan.evaluate({t: fetch_attr(ctx.gm, t) for t in ctx.sources})
        except NotMergeable as e:
            reasons.append(f"{plan.describe()}: {e}")
            continue
        new_macs = _numel(root) * merged.macs_per_output()
        if new_macs > plan.macs:
            reasons.append(f"{plan.describe()} -> {merged.describe()} would cost {new_macs:,} multiply-adds "
                           f"instead of {plan.macs:,}")
            continue
        moved = rw.moved_read(region, root)
        if moved:
            reasons.append(f"{plan.describe()}: {moved}")
            continue
        _rewrite(root, x, plan, merged, ctx, rw)
        return True
    if reasons:  # the smallest region's reason: the block itself, not what surrounds it
        rw.skip(root.name, reasons[-1])
    return False


def _rewrite(root, x, plan: Plan, merged, ctx: _Context, rw):
    targets = list(ctx.sources)
    sources = [ctx.sources[t] for t in targets]
    memo = _Memo(plan, targets)
    dtype = tensor_dtype(root) or torch.float32

    # the source that has the output's dtype: casting to *its* dtype at call time gives the same
    # result here and keeps a replay on float64 tensors in float64 (`verify(float64=True)`)
    like = next((i for i, s in enumerate(sources) if rw.value(s).dtype == dtype), None)

    def weight_of(*tensors):
        merged = memo(*tensors)
        w = merged.weight if merged.weight is not None else torch.eye(plan.channels, dtype=torch.float64,
                                                                         device=merged.bias.device)
        return w.to(tensors[like].dtype if like is not None else dtype)

    def bias_of(*tensors):
        return memo(*tensors).bias.to(tensors[like].dtype if like is not None else dtype)

    rw.at(root)
    w = rw.param(f"{root.name}_reparam_weight", weight_of, *sources)
    b = rw.param(f"{root.name}_reparam_bias", bias_of, *sources)
    if plan.domain == "conv":
        new = rw.call(ops.conv, input=x, weight=w, bias=b, stride=list(merged.stride), padding=list(merged.padding),
                      dilation=list(merged.dilation), transposed=False, output_padding=[0, 0], groups=merged.groups)
    else:
        new = rw.call(ops.linear, input=x, weight=w, bias=b)
    n_ops = len(plan.steps)
    rw.replace(root, new, f"merged {n_ops} ops [{plan.describe()}] reading {x.name} -> {merged.describe()}")


def merge_linear_regions(rw) -> int:
    """Rewrite every mergeable linear region (see the module docstring); returns the count."""
    count = 0
    ctx = _Context(rw.gm)
    for root in reversed(list(rw.graph.nodes)):
        if root.graph is None or root.op != "call_function" or root not in ctx.view.index:
            continue
        if not root.users or root.target not in _CLASSIFIERS:  # only a linear op can be a root
            continue
        if _try_root(root, ctx, rw):
            count += 1
            # the merged region is dead now. The view stays valid for the roots still to
            # visit: they come earlier in the graph, and the dominators of a node depend only
            # on the paths that reach it, which the rewrite (below them) did not touch.
            rw.erase_dead(root)
    return count


# ------------------------------------------------------------------ RepMLP: conv -> flatten -> linear

def _flatten_input(node: fx.Node, gm) -> fx.Node | None:
    """x when `node` is flatten(x, 1, -1) in one of its spellings."""
    if node.op == "call_function" and node.target in (torch.flatten, aten.flatten.using_ints):
        args = list(node.args) + [None] * 3
        start = node.kwargs.get("start_dim", args[1] if args[1] is not None else 0)
        end = node.kwargs.get("end_dim", args[2] if args[2] is not None else -1)
    elif node.op == "call_method" and node.target == "flatten":
        args = list(node.args) + [None] * 3
        start = node.kwargs.get("start_dim", args[1] if args[1] is not None else 0)
        end = node.kwargs.get("end_dim", args[2] if args[2] is not None else -1)
    elif node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.Flatten):
        mod = gm.get_submodule(node.target)
        start, end = mod.start_dim, mod.end_dim
    else:
        return None
    return node.args[0] if (start, end) == (1, -1) else None


_MAX_FC_WEIGHT = 1 << 26  # elements of a merged FC weight (512 MiB in float64) beyond which we skip


def merge_conv_into_fc(rw) -> int:
    """linear(flatten(conv(x))) -> linear'(flatten(x)) when x's shape is known (RepMLP)."""
    count = 0
    for fc in list(rw.graph.nodes):
        if fc.op != "call_function" or fc.target is not ops.linear or fc.graph is None:
            continue
        flat = ops.arg(fc, "input")
        if not isinstance(flat, fx.Node) or len(flat.users) != 1:
            continue
        conv = _flatten_input(flat, rw.gm)
        if not (isinstance(conv, fx.Node) and conv.op == "call_function" and conv.target is ops.conv):
            continue
        w, b = ops.arg(fc, "weight"), ops.arg(fc, "bias")
        cw, cb = ops.arg(conv, "weight"), ops.arg(conv, "bias")
        if any(not (v is None or (isinstance(v, fx.Node) and v.op == "get_attr")) for v in (w, b, cb)) or \
                not (isinstance(cw, fx.Node) and cw.op == "get_attr") or ops.arg(conv, "transposed"):
            continue
        x = ops.arg(conv, "input")
        shape = tensor_shape(x)
        if len(conv.users) != 1:
            continue
        moved = rw.moved_read([conv, flat, fc], fc)
        if moved:
            rw.skip(fc.name, f"conv -> flatten -> linear: {moved}")
            continue
        if shape is None or len(shape) != 4:
            rw.skip(fc.name, "conv -> flatten -> linear: the conv input's shape is unknown")
            continue
        d = rw.value(w).shape[0]
        in_features = math.prod(shape[1:])
        cwv = rw.value(cw)
        conv_macs = _numel(conv) * math.prod(cwv.shape[1:])
        fc_macs = _numel(fc) * rw.value(w).shape[1]
        new_macs = _numel(fc) * in_features
        if d * in_features > _MAX_FC_WEIGHT:
            rw.skip(fc.name, f"conv -> flatten -> linear: the merged FC weight would hold "
                           f"{d * in_features:,} elements, over the limit of {_MAX_FC_WEIGHT:,}")
            continue
        if new_macs > conv_macs + fc_macs:
            rw.skip(fc.name, f"conv -> flatten -> linear: the merged FC would need "
                           f"{new_macs:,} multiply-adds instead of {conv_macs + fc_macs:,}")
            continue
        geometry = dict(stride=_pair(ops.arg(conv, "stride")), padding=_pair(ops.arg(conv, "padding")),
                        dilation=_pair(ops.arg(conv, "dilation")), groups=ops.arg(conv, "groups"))

        def fold(fw, fb, cw_, cb_, part, in_shape=tuple(shape[1:]), g=geometry):
            m = rm.conv_map(cw_, cb_, g["stride"], g["padding"], g["dilation"], g["groups"])
            return rm.conv_into_linear(m, in_shape, fw, fb)[part].to(fw.dtype)

        rw.at(fc)
        nw = rw.param(f"{fc.name}_reparam_weight", lambda *t, f=fold: f(*t, 0), w, b, cw, cb)
        nb = rw.param(f"{fc.name}_reparam_bias", lambda *t, f=fold: f(*t, 1), w, b, cw, cb)
        flat_x = rw.infer_meta(rw.call(aten.flatten.using_ints, self=x, start_dim=1, end_dim=-1))
        new = rw.call(ops.linear, input=flat_x, weight=nw, bias=nb)
        rw.replace(fc, new, f"merged conv {conv.name} into the FC on a {list(shape[1:])} input (RepMLP) -> "
                            f"linear {in_features}->{d}; the merged model accepts only this input size")
        count += 1
    rw.sweep()
    return count


def _reparameterize(rw) -> None:
    merge_linear_regions(rw)
    if merge_conv_into_fc(rw):
        merge_linear_regions(rw)


STRUCTURAL_REPARAM = Pass("merge_branches", "exact", analysis=_reparameterize, needs=("shapes",), doc=__doc__)
