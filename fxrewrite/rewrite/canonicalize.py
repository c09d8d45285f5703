"""Turn any captured graph into the canonical vocabulary of `rewrite.ops`.

Every spelling of a known operation becomes one ATen overload with its schema filled in:

    nn.Conv2d module / F.conv2d / torch.conv2d / aten.conv2d  ->  aten.convolution (+ aten.pad
                                                                   for non-zero padding modes)
    nn.BatchNorm2d / F.batch_norm / aten._native_batch_norm_legit_no_training  ->  aten.batch_norm
    operator.iadd / x.add_ / aten.add_  ->  aten.add (functionalised, see below)

Module parameters become `get_attr` nodes, so a pass sees weights the same way whatever the
source. Anything not in the vocabulary is left exactly as it was: passes simply do not match it.

In-place ops are functionalised only when that is provably the same: the mutated tensor must be
a fresh value made by a canonical op in this graph (not a graph input, a parameter or a view),
and every later reader of it is pointed at the functional result.
"""
from __future__ import annotations

import operator
from typing import Callable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

from . import ops
from .attrs import fetch_attr
from .computed_weights import Computed, computation_node, computed_tensors, parametrization_call
from .dce import eliminate_dead_code
from .effects import hooks_of, mutated_args
from .report import Report
from .shapes import infer_tensor_meta, is_tensor, tensor_dtype, tensor_metadata, tensor_shape

aten = torch.ops.aten

# ---------------------------------------------------------------- helpers


def _tuple(v, n):
    if isinstance(v, (list, tuple)):
        return tuple(v) if len(v) == n else tuple(v) * (n // len(v))
    return (v,) * n


def _conv_padding(padding, weight_shape, dilation, nd):
    """Resolve string padding ('valid'/'same') to (symmetric ints, extra asymmetric F.pad or None)."""
    if not isinstance(padding, str):
        return _tuple(padding, nd), None
    if padding == "valid":
        return (0,) * nd, None
    # 'same': total = dilation * (k - 1); odd totals need one extra element on the right
    if weight_shape is None:
        return (0,) * nd, "unknown"  # the weight's shape is not known here
    ks = weight_shape[2:]
    sym, extra, asym = [], [], False
    for d, k in zip(_tuple(dilation, nd), ks):
        total = d * (k - 1)
        sym.append(total // 2)
        extra.append(total % 2)
        asym |= bool(total % 2)
    if not asym:
        return tuple(sym), None
    pad = []
    for e in reversed(extra):  # F.pad order: last dim first, (left, right)
        pad += [0, e]
    return tuple(sym), pad


class _Ctx:
    """What a converter needs: the graph module, the node being replaced, and a report."""

    def __init__(self, gm: fx.GraphModule, report: Report):
        self.gm = gm
        self.graph = gm.graph
        self.report = report
        self.computed: dict[str, tuple[str, Computed]] = {}  # tensors the module computes per call

    def attr(self, target: str | None):
        """A `get_attr` of a parameter the converter just read from its module (so it exists:
        `Graph.get_attr` would walk the module tree again to check); for a tensor the module
        computes on each call (`computed_weights`), the node that computes it."""
        if target is None:
            return None
        if target in self.computed:
            return self._computed(*self.computed[target])
        return self.graph.create_node("get_attr", target)

    def _computed(self, owner: str, how: Computed) -> fx.Node:
        node = computation_node(self.graph, owner, how)
        with torch.no_grad():
            value = how.fn(*(fetch_attr(self.gm, s.target) for s in node.args), **how.kwargs)
        node.meta["tensor_meta"] = tensor_metadata(value)
        return node

    def emit(self, op, /, **named):
        """A new node before the one being converted (e.g. the `aten.pad` of a padding mode)."""
        args, kwargs = ops.call(op, **named)
        node = self.graph.call_function(op, args, kwargs)
        infer_tensor_meta(node)
        return node

    @staticmethod
    def call(op, /, **named):
        """What the converted node itself becomes: `op` with these named arguments."""
        return op, named


# ---------------------------------------------------------------- module converters

def _param_target(node: fx.Node, mod: nn.Module, name: str):
    return f"{node.target}.{name}" if getattr(mod, name, None) is not None else None


def _conv_module(ctx: _Ctx, node, mod):
    nd = mod.weight.dim() - 2
    x = node.args[0]
    transposed = isinstance(mod, nn.modules.conv._ConvTransposeNd)
    if transposed and (len(node.args) > 1 or node.kwargs.get("output_size") is not None):
        return None  # output_size depends on the call; leave the module alone
    padding = mod.padding
    if mod.padding_mode != "zeros":
        mode = {"reflect": "reflect", "replicate": "replicate", "circular": "circular"}[mod.padding_mode]
        x = ctx.emit(ops.pad, self=x, pad=list(mod._reversed_padding_repeated_twice), mode=mode)
        padding = (0,) * nd
    else:
        padding, extra = _conv_padding(padding, mod.weight.shape, mod.dilation, nd)
        if extra is not None:
            x = ctx.emit(ops.pad, self=x, pad=extra, mode="constant", value=0.0)
    return ctx.call(
        ops.conv, input=x, weight=ctx.attr(f"{node.target}.weight"),
        bias=ctx.attr(_param_target(node, mod, "bias")), stride=list(_tuple(mod.stride, nd)),
        padding=list(padding), dilation=list(_tuple(mod.dilation, nd)), transposed=transposed,
        output_padding=list(_tuple(mod.output_padding, nd)), groups=mod.groups)


def _bn_module(ctx: _Ctx, node, mod):
    if mod.training or not mod.track_running_stats:
        why = "in training mode" if mod.training else "without running statistics"
        ctx.report.skip("canonicalize", node.name, f"{type(mod).__name__} {why}: kept as a module and never folded"
                        + ("; call model.eval() first" if mod.training else ""))
        return None
    return ctx.call(
        ops.batch_norm, input=node.args[0], weight=ctx.attr(_param_target(node, mod, "weight")),
        bias=ctx.attr(_param_target(node, mod, "bias")),
        running_mean=ctx.attr(f"{node.target}.running_mean"), running_var=ctx.attr(f"{node.target}.running_var"),
        training=False, momentum=0.0, eps=float(mod.eps), cudnn_enabled=True)


def _linear_module(ctx, node, mod):
    return ctx.call(ops.linear, input=node.args[0], weight=ctx.attr(f"{node.target}.weight"),
                    bias=ctx.attr(_param_target(node, mod, "bias")))


def _layer_norm_module(ctx, node, mod):
    return ctx.call(ops.layer_norm, input=node.args[0], normalized_shape=list(mod.normalized_shape),
                    weight=ctx.attr(_param_target(node, mod, "weight")),
                    bias=ctx.attr(_param_target(node, mod, "bias")), eps=float(mod.eps))


def _rms_norm_module(ctx, node, mod):
    return ctx.call(ops.rms_norm, input=node.args[0], normalized_shape=list(mod.normalized_shape),
                    weight=ctx.attr(_param_target(node, mod, "weight")), eps=mod.eps)


def _unary_module(op, **fixed):
    def convert(ctx, node, mod):
        return ctx.call(op, self=node.args[0], **fixed)
    return convert


def _gelu_module(ctx, node, mod):
    return ctx.call(ops.gelu, self=node.args[0], approximate=mod.approximate)


def _identity_module(ctx, node, mod):
    if isinstance(mod, nn.modules.dropout._DropoutNd) and mod.training and mod.p > 0:
        ctx.report.skip("canonicalize", node.name, f"{type(mod).__name__}(p={mod.p:g}) in training mode: kept (it "
                        f"drops values on every call); call model.eval() first to remove it")
        return None
    arg = node.args[0]
    known = isinstance(arg, fx.Node) and any(k in arg.meta for k in ("tensor_meta", "val", "example_value"))
    if not isinstance(arg, fx.Node) or (known and not is_tensor(arg)):  # over a list: not a tensor op
        return None
    return ctx.call(aten.alias.default, self=node.args[0])


def _avg_pool2d_module(ctx, node, mod):
    return ctx.call(ops.avg_pool2d, self=node.args[0], kernel_size=list(_tuple(mod.kernel_size, 2)),
                    stride=list(_tuple(mod.stride if mod.stride is not None else mod.kernel_size, 2)),
                    padding=list(_tuple(mod.padding, 2)), ceil_mode=mod.ceil_mode,
                    count_include_pad=mod.count_include_pad, divisor_override=mod.divisor_override)


MODULE_CONVERTERS: dict[type, Callable] = {
    nn.Conv1d: _conv_module, nn.Conv2d: _conv_module, nn.Conv3d: _conv_module,
    nn.ConvTranspose1d: _conv_module, nn.ConvTranspose2d: _conv_module, nn.ConvTranspose3d: _conv_module,
    nn.BatchNorm1d: _bn_module, nn.BatchNorm2d: _bn_module, nn.BatchNorm3d: _bn_module,
    nn.Linear: _linear_module, nn.LayerNorm: _layer_norm_module, nn.RMSNorm: _rms_norm_module,
    nn.ReLU: _unary_module(ops.relu), nn.ReLU6: _unary_module(ops.relu6, min_val=0.0, max_val=6.0),
    nn.GELU: _gelu_module, nn.SiLU: _unary_module(ops.silu), nn.Sigmoid: _unary_module(ops.sigmoid),
    nn.Tanh: _unary_module(ops.tanh), nn.Hardswish: _unary_module(ops.hardswish),
    nn.Hardsigmoid: _unary_module(ops.hardsigmoid),
    nn.Identity: _identity_module, nn.Dropout: _identity_module, nn.Dropout1d: _identity_module,
    nn.Dropout2d: _identity_module, nn.Dropout3d: _identity_module, nn.AvgPool2d: _avg_pool2d_module,
}


# ---------------------------------------------------------------- function converters
# Each takes the call's (args, kwargs) and returns (canonical op, named arguments) or None.

def _bind(names, defaults):
    """Bind a call's args/kwargs to parameter names, filling defaults."""
    def bind(args, kwargs):
        out = dict(defaults)
        out.update(zip(names, args))
        out.update(kwargs)
        missing = [n for n in names if n not in out]
        if missing:
            return None
        return out
    return bind


def _conv_fn(nd, transposed):
    if transposed:
        bind = _bind(["input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation"],
                     dict(bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1))
    else:
        bind = _bind(["input", "weight", "bias", "stride", "padding", "dilation", "groups"],
                     dict(bias=None, stride=1, padding=0, dilation=1, groups=1))

    def convert(args, kwargs):
        a = bind(args, kwargs)
        if a is None:
            return None
        padding, extra = _conv_padding(a["padding"], tensor_shape(a["weight"]), a["dilation"], nd)
        if extra is not None:
            return None  # asymmetric 'same' padding: leave the call as written
        return ops.conv, dict(input=a["input"], weight=a["weight"], bias=a["bias"],
                              stride=list(_tuple(a["stride"], nd)), padding=list(padding),
                              dilation=list(_tuple(a["dilation"], nd)), transposed=transposed,
                              output_padding=list(_tuple(a.get("output_padding", 0), nd)), groups=a["groups"])
    return convert


def _functional_bn(args, kwargs):
    a = _bind(["input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"],
              dict(weight=None, bias=None, training=False, momentum=0.1, eps=1e-5))(args, kwargs)
    if a is None:
        return None
    return ops.batch_norm, dict(input=a["input"], weight=a["weight"], bias=a["bias"], running_mean=a["running_mean"],
                                running_var=a["running_var"], training=a["training"], momentum=a["momentum"],
                                eps=a["eps"], cudnn_enabled=True)


def _aten_bn_no_training(args, kwargs):
    a = _bind(["input", "weight", "bias", "running_mean", "running_var", "momentum", "eps"], {})(args, kwargs)
    if a is None:
        return None
    return ops.batch_norm, dict(input=a["input"], weight=a["weight"], bias=a["bias"], running_mean=a["running_mean"],
                                running_var=a["running_var"], training=False, momentum=a["momentum"],
                                eps=a["eps"], cudnn_enabled=True)


def _named(op, names, defaults=None, **fixed):
    bind = _bind(names, defaults or {})

    def convert(args, kwargs):
        a = bind(args, kwargs)
        if a is None:
            return None
        a.pop("inplace", None)
        a.update(fixed)
        return op, a
    return convert


def _binary(op):
    def convert(args, kwargs):
        if len(args) != 2 or set(kwargs) - {"alpha", "out"} or kwargs.get("out") is not None:
            return None  # rounding_mode=..., out=...: not the plain op; leave the call as written
        a, b = args
        if not is_tensor(a):
            if op in (ops.add, ops.mul) and is_tensor(b) and isinstance(a, (int, float)):
                a, b = b, a  # commutative: put the tensor first
            else:
                return None
        if not (is_tensor(b) or isinstance(b, (int, float))):
            return None
        named = dict(self=a, other=b)
        if "alpha" in kwargs:
            named["alpha"] = kwargs["alpha"]
        return op, named
    return convert


def _unary(op, **fixed):
    def convert(args, kwargs):
        if not args or not is_tensor(args[0]):
            return None
        named = {"self": args[0], **fixed}
        if op is ops.gelu:
            named["approximate"] = kwargs.get("approximate", args[1] if len(args) > 1 else "none")
        return op, named
    return convert


def _dropout(args, kwargs):
    a = _bind(["input", "p", "training", "inplace"], dict(p=0.5, training=True, inplace=False))(args, kwargs)
    if a is None or (a["training"] and a["p"] > 0):
        return None
    return aten.alias.default, dict(self=a["input"])


_CONV_FNS = {F.conv1d: (1, False), F.conv2d: (2, False), F.conv3d: (3, False),
             F.conv_transpose1d: (1, True), F.conv_transpose2d: (2, True), F.conv_transpose3d: (3, True)}

FUNCTION_CONVERTERS: dict = {fn: _conv_fn(*spec) for fn, spec in _CONV_FNS.items()}
FUNCTION_CONVERTERS.update({
    torch.conv1d: _conv_fn(1, False), torch.conv2d: _conv_fn(2, False), torch.conv3d: _conv_fn(3, False),
    aten.conv1d.default: _conv_fn(1, False), aten.conv2d.default: _conv_fn(2, False),
    aten.conv3d.default: _conv_fn(3, False), aten.conv_transpose1d.default: _conv_fn(1, True),
    aten.conv_transpose2d.input: _conv_fn(2, True), aten.conv_transpose3d.input: _conv_fn(3, True),
    F.batch_norm: _functional_bn,
    torch.batch_norm: _named(ops.batch_norm, ops.arg_names(ops.batch_norm)),
    aten.batch_norm.default: _named(ops.batch_norm, ops.arg_names(ops.batch_norm)),
    aten._native_batch_norm_legit_no_training.default: _aten_bn_no_training,
    F.linear: _named(ops.linear, ["input", "weight", "bias"], dict(bias=None)),
    torch._C._nn.linear: _named(ops.linear, ["input", "weight", "bias"], dict(bias=None)),
    aten.linear.default: _named(ops.linear, ["input", "weight", "bias"], dict(bias=None)),
    F.layer_norm: _named(ops.layer_norm, ["input", "normalized_shape", "weight", "bias", "eps"],
                         dict(weight=None, bias=None, eps=1e-5)),
    torch.layer_norm: _named(ops.layer_norm, ["input", "normalized_shape", "weight", "bias", "eps"],
                             dict(weight=None, bias=None, eps=1e-5)),
    aten.layer_norm.default: _named(ops.layer_norm, ["input", "normalized_shape", "weight", "bias", "eps"],
                                    dict(weight=None, bias=None, eps=1e-5)),
    torch.rms_norm: _named(ops.rms_norm, ["input", "normalized_shape", "weight", "eps"], dict(weight=None, eps=None)),
    F.rms_norm: _named(ops.rms_norm, ["input", "normalized_shape", "weight", "eps"], dict(weight=None, eps=None)),
    aten.rms_norm.default: _named(ops.rms_norm, ["input", "normalized_shape", "weight", "eps"],
                                  dict(weight=None, eps=None)),
    F.dropout: _dropout, aten.dropout.default: _dropout,
})

def _pow(args, kwargs):
    """`x ** 2`, `x.pow(2)`, `torch.pow(x, 2)`: a tensor to a number's power."""
    a = _bind(["self", "exponent"], {})(args, {("self" if k == "input" else k): v for k, v in kwargs.items()})
    if a is None or set(a) != {"self", "exponent"} or not is_tensor(a["self"]):
        return None
    if isinstance(a["exponent"], bool) or not isinstance(a["exponent"], (int, float)):
        return None
    return ops.pow, a


def _square(args, kwargs):
    return _pow((args[0], 2), {}) if len(args) == 1 and not kwargs else None


def _mean(args, kwargs):
    """`x.mean(-1, keepdim=True)`, `torch.mean(x, dim=...)`; a mean over everything (no dim) is
    another overload and stays as written."""
    a = _bind(["self", "dim", "keepdim"], dict(keepdim=False))(
        args, {("self" if k == "input" else k): v for k, v in kwargs.items()})
    if a is None or set(a) - {"self", "dim", "keepdim", "dtype"} or not is_tensor(a["self"]):
        return None
    dim = a["dim"]
    if isinstance(dim, int) and not isinstance(dim, bool):
        dim = [dim]
    if not (isinstance(dim, (list, tuple)) and dim and all(isinstance(d, int) for d in dim)):
        return None
    return ops.mean, dict(a, dim=list(dim))


_METHOD_CASTS = {"float": torch.float32, "double": torch.float64, "half": torch.float16,
                 "bfloat16": torch.bfloat16}


def _cast(args, kwargs):
    """`x.to(dtype)` / `x.to(dtype=...)` with nothing else: `aten.to.dtype`, which (like the
    method) returns `x` itself when the dtype already matches, so aliasing is unchanged."""
    rest = list(args[1:]) + [v for k, v in kwargs.items() if k == "dtype"]
    if len(args) < 1 or not is_tensor(args[0]) or set(kwargs) - {"dtype"} or len(rest) != 1:
        return None
    if not isinstance(rest[0], torch.dtype):
        return None
    return ops.cast, dict(self=args[0], dtype=rest[0])


def _type_as(args, kwargs):
    """`x.type_as(y)` (Gemma's norm): a cast to `y`'s dtype, when the trace knows it."""
    if len(args) != 2 or kwargs or not is_tensor(args[1]) or tensor_dtype(args[1]) is None:
        return None
    return _cast((args[0], tensor_dtype(args[1])), {})


def _method_cast(dtype):
    def convert(args, kwargs):
        return _cast((args[0], dtype), {}) if len(args) == 1 and not kwargs else None
    return convert


_BINARY = {
    ops.add: [operator.add, operator.iadd, torch.add, aten.add.Tensor, aten.add_.Tensor],
    ops.sub: [operator.sub, operator.isub, torch.sub, aten.sub.Tensor, aten.sub_.Tensor],
    ops.mul: [operator.mul, operator.imul, torch.mul, aten.mul.Tensor, aten.mul_.Tensor],
    ops.div: [operator.truediv, operator.itruediv, torch.div, aten.div.Tensor, aten.div_.Tensor],
}
_UNARY = {
    ops.relu: [F.relu, torch.relu, torch.relu_, aten.relu.default, aten.relu_.default],
    ops.silu: [F.silu, aten.silu.default, aten.silu_.default],
    ops.gelu: [F.gelu, aten.gelu.default],
    ops.sigmoid: [torch.sigmoid, F.sigmoid, aten.sigmoid.default],
    ops.tanh: [torch.tanh, F.tanh, aten.tanh.default],
    ops.hardswish: [F.hardswish, aten.hardswish.default, aten.hardswish_.default],
    ops.hardsigmoid: [F.hardsigmoid, aten.hardsigmoid.default, aten.hardsigmoid_.default],
    ops.rsqrt: [torch.rsqrt, aten.rsqrt.default],
}
for _fn in (operator.pow, torch.pow, aten.pow.Tensor_Scalar):
    FUNCTION_CONVERTERS[_fn] = _pow
FUNCTION_CONVERTERS.update({torch.square: _square, aten.square.default: _square, torch.mean: _mean,
                            aten.mean.dim: _mean, aten.to.dtype: _cast})
for _op, _fns in _BINARY.items():
    for _fn in _fns:
        FUNCTION_CONVERTERS[_fn] = _binary(_op)
for _op, _fns in _UNARY.items():
    for _fn in _fns:
        FUNCTION_CONVERTERS[_fn] = _unary(_op)
FUNCTION_CONVERTERS[F.relu6] = _unary(ops.relu6, min_val=0.0, max_val=6.0)

METHOD_CONVERTERS = {
    "add": _binary(ops.add), "add_": _binary(ops.add), "__iadd__": _binary(ops.add),
    "mul": _binary(ops.mul), "mul_": _binary(ops.mul), "sub": _binary(ops.sub), "sub_": _binary(ops.sub),
    "div": _binary(ops.div), "div_": _binary(ops.div),
    "relu": _unary(ops.relu), "relu_": _unary(ops.relu), "sigmoid": _unary(ops.sigmoid),
    "sigmoid_": _unary(ops.sigmoid), "tanh": _unary(ops.tanh), "rsqrt": _unary(ops.rsqrt),
    "pow": _pow, "square": _square, "mean": _mean, "to": _cast, "type_as": _type_as,
    **{name: _method_cast(dtype) for name, dtype in _METHOD_CASTS.items()},
}

_FRESH = ops.CANONICAL - ops.ALIASING - {ops.to_dtype}


def _can_functionalize(node: fx.Node) -> bool:
    """In-place on a fresh value made by a canonical op of this graph, which nothing else can
    alias: every other reader is a canonical (functional, non-viewing) op. A view taken before
    the mutation (`v = y.view(-1); y.add_(1)`) would see it, so then the mutation stays."""
    target = node.args[0] if node.args else None
    if not (isinstance(target, fx.Node) and target.op == "call_function" and target.target in _FRESH):
        return False
    return all(u is node or (u.op == "call_function" and u.target in _FRESH) for u in target.users)


def _redirect_later_readers(mutated: fx.Node, new: fx.Node, order: dict[fx.Node, int]):
    """Readers of `mutated` after `new` (the functional form of the mutation) read `new`.
    `order`: positions of the graph's nodes before canonicalisation; the only nodes it lacks
    were inserted before nodes already converted, so they come before `new`."""
    for user in list(mutated.users):
        if user is not new and order.get(user, -1) > order[new]:
            user.replace_input_with(mutated, new)


# ---------------------------------------------------------------- driver

def canonicalize(gm: fx.GraphModule, report: Report) -> fx.GraphModule:
    """Rewrite `gm` in place into canonical ops; records what it could not canonicalise."""
    gm.meta.pop("in_place_writes", None)  # the Rewriter's list of writes is for the canonical graph
    ctx = _Ctx(gm, report)
    modules = dict(gm.named_modules())
    _fold_trace_constants(gm.graph)
    _expand_parametrization_calls(ctx, modules)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for node in list(gm.graph.nodes):
        mod = modules.get(node.target) if node.op == "call_module" else None
        written = mutated_args(node, mod)
        inplace = bool(written)
        if inplace and (written != [node.args[0]] or not _can_functionalize(node)):
            continue  # keep the mutation exactly as written
        with gm.graph.inserting_before(node):
            converted = _convert(ctx, node, mod)
        if converted is None:
            continue
        # the node itself becomes the canonical call: it keeps its name (the user's: conv1,
        # layer1_0_bn1, for reports), its users and its metadata
        op, named = converted
        mutated = node.args[0] if inplace else None
        if node.op == "call_module":
            node.meta["source_module"] = node.target  # the user's module name, for reports and filters
        node.op, node.target = "call_function", op
        node.args, node.kwargs = ops.call(op, **named)
        if inplace:
            _redirect_later_readers(mutated, node, order)
    _merge_getitem_bn(gm.graph)
    _drop_noop_casts(gm.graph)
    eliminate_dead_code(gm.graph)
    return gm


def _convert(ctx: _Ctx, node: fx.Node, mod):
    if node.op == "call_module":
        if _kept_as_module(ctx, node, mod):
            return None
        for cls in type(mod).__mro__:
            if cls in MODULE_CONVERTERS:
                if type(mod) is not cls and type(mod).forward is not cls.forward:
                    return None  # a subclass with its own forward is not what the base class computes
                return MODULE_CONVERTERS[cls](ctx, node, mod)
        return None
    if node.op == "call_function" and node.target in ops.CANONICAL:
        node.args, node.kwargs = ops.normalize(node.target, node.args, node.kwargs)
        return None
    if node.op == "call_function":
        conv = FUNCTION_CONVERTERS.get(node.target)
    elif node.op == "call_method":
        conv = METHOD_CONVERTERS.get(node.target)
    else:
        return None
    if conv is None:
        return None
    return conv(node.args, dict(node.kwargs))


def _kept_as_module(ctx: _Ctx, node: fx.Node, mod) -> bool:
    """A module whose call does more than its class's maths stays a module call, with the reason:
    hooks run only when the module is called. A weight the module computes on each call (a
    parametrization, the library's own weight_norm / spectral_norm hooks) becomes the nodes that
    compute it (`computed_weights`), read by the converter through `ctx.attr`."""
    why = None
    hooks = [h for h in hooks_of(mod) if h != "forward pre hooks"]  # pre hooks: `computed_tensors`
    computed = computed_tensors(mod)
    if hooks:
        why = f"it has {' and '.join(hooks)}, which run only when the module is called"
    elif isinstance(computed, str):
        why = computed
    if why is None:
        ctx.computed = {f"{node.target}.{name}": (node.target, how) for name, how in computed.items()}
        return False
    ctx.report.skip("canonicalize", node.name, f"{type(mod).__name__} kept as a module call: {why}")
    return True


def _expand_parametrization_calls(ctx: _Ctx, modules: dict):
    """`self.weight` of a parametrized root module traces to a call of its parametrization list:
    written as `computed_weights` does for the modules below the root."""
    for node in list(ctx.graph.nodes):
        plist = modules.get(node.target) if node.op == "call_module" else None
        if isinstance(plist, parametrize.ParametrizationList) and not node.args and not node.kwargs:
            with ctx.graph.inserting_before(node):
                value = ctx._computed(node.target, parametrization_call(plist))
            node.replace_all_uses_with(value)
            ctx.graph.erase_node(node)


def _merge_getitem_bn(graph: fx.Graph):
    """export's `_native_batch_norm_legit_no_training` returns a tuple; after conversion the
    `getitem(bn, 0)` that followed it is the BN output itself."""
    for node in list(graph.nodes):
        if (node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], fx.Node)
                and node.args[0].target is ops.batch_norm and node.args[1] == 0):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)


def _drop_noop_casts(graph: fx.Graph):
    """`x.to(x.dtype)` is `x` itself (aten.to returns its input when nothing changes), so its
    readers read `x`: a float32 model's `x.to(torch.float32)` then hides nothing from a pass."""
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is ops.cast and not ops.arg(node, "copy"):
            x = ops.arg(node, "self")
            if ops.arg(node, "memory_format") is None and tensor_dtype(x) is not None \
                    and tensor_dtype(x) == ops.arg(node, "dtype"):
                node.replace_all_uses_with(x)
                graph.erase_node(node)


_COMPARISONS = {operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge}


def _replace_with_constant(node: fx.Node, value):
    for user in list(node.users):
        user.args = fx.node.map_arg(user.args, lambda a: value if a is node else a)
        user.kwargs = fx.node.map_arg(user.kwargs, lambda a: value if a is node else a)
    node.graph.erase_node(node)


def _fold_trace_constants(graph: fx.Graph):
    """`assert x.ndim == 4` (timm, torchvision) reads a tensor only for its rank, and
    `x.to(x.dtype)`-style code (transformers' norms) only for its dtype, which a trace fixes
    anyway (Dynamo and torch.export specialise both): folding them to constants frees the
    tensor's value for passes that need it single-use, and makes `x.to(dtype)` a known cast."""
    for node in list(graph.nodes):
        rank = None
        if node.op == "call_function" and node.target is getattr and node.args[1] == "dtype":
            dtype = tensor_dtype(node.args[0])
            if dtype is not None:
                _replace_with_constant(node, dtype)
            continue
        if node.op == "call_function" and node.target is getattr and node.args[1] == "ndim":
            rank = tensor_shape(node.args[0])
        elif node.op == "call_method" and node.target in ("dim", "ndimension") and len(node.args) == 1:
            rank = tensor_shape(node.args[0])
        if rank is not None:
            _replace_with_constant(node, len(rank))
        elif (node.op == "call_function" and node.target in _COMPARISONS
              and not any(isinstance(a, fx.Node) for a in node.args)):
            _replace_with_constant(node, node.target(*node.args))
        elif (node.op == "call_function" and getattr(node.target, "__name__", "") == "_assert"
              and node.args and node.args[0] is True):
            graph.erase_node(node)
