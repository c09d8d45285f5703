"""The canonical vocabulary: the one spelling of each operation that passes match.

Graphs arrive from `symbolic_trace` (modules, `F.*`, `operator.*`), Dynamo (`torch.*`,
in-place `iadd`) and `torch.export` (`aten.conv2d`, `aten.batch_norm`, ...). Canonicalisation
(`rewrite.canonicalize`) turns every known spelling into the ATen overloads below, with all
schema arguments filled in, so that a pass is written once. ATen overloads are a good
vocabulary: they are documented by their schemas, they run eagerly as they are, and
`torch.export`/ONNX export understand them.

Argument access is by schema name (`arg(node, "weight")`), never by position.
"""
from __future__ import annotations

import functools
from typing import Any

import torch
import torch.fx as fx

aten = torch.ops.aten

conv = aten.convolution.default  # input, weight, bias, stride, padding, dilation, transposed, output_padding, groups
batch_norm = aten.batch_norm.default  # input, weight, bias, running_mean, running_var, training, momentum, eps, cudnn_enabled
linear = aten.linear.default  # input, weight, bias
layer_norm = aten.layer_norm.default  # input, normalized_shape, weight, bias, eps, cudnn_enable
rms_norm = aten.rms_norm.default  # input, normalized_shape, weight, eps
add = aten.add.Tensor  # self, other, *, alpha
sub = aten.sub.Tensor  # self, other, *, alpha
mul = aten.mul.Tensor  # self, other
div = aten.div.Tensor  # self, other
relu = aten.relu.default
gelu = aten.gelu.default  # self, *, approximate
silu = aten.silu.default
sigmoid = aten.sigmoid.default
tanh = aten.tanh.default
hardswish = aten.hardswish.default
hardsigmoid = aten.hardsigmoid.default
relu6 = aten.hardtanh.default  # relu6 is hardtanh(0, 6)
avg_pool2d = aten.avg_pool2d.default
pad = aten.pad.default  # self, pad, mode, value
to_dtype = aten._to_copy.default  # self, *, dtype, ...  (always a copy)
cast = aten.to.dtype  # self, dtype, non_blocking, copy, memory_format  (x.to(dtype): may return x itself)
pow = aten.pow.Tensor_Scalar  # self, exponent  (a tensor to a number's power)
mean = aten.mean.dim  # self, dim, keepdim, *, dtype
rsqrt = aten.rsqrt.default  # self

# written-out norms (x.pow(2).mean(-1, keepdim=True), torch.rsqrt, x.to(torch.float32)) arrive in
# these spellings on every capture route, so `lift_norms` is written once
CANONICAL = {
    conv, batch_norm, linear, layer_norm, rms_norm, add, sub, mul, div, relu, gelu, silu,
    sigmoid, tanh, hardswish, hardsigmoid, relu6, avg_pool2d, pad, to_dtype, cast, pow, mean, rsqrt,
}
ALIASING = {cast}  # canonical ops whose result can be their input itself

ELEMENTWISE_UNARY = {relu, gelu, silu, sigmoid, tanh, hardswish, hardsigmoid, relu6}
ELEMENTWISE_BINARY = {add, sub, mul, div}


@functools.cache
def _schema_args(op) -> tuple:
    """The schema's arguments (cached: passes ask for them on every node they look at)."""
    return tuple(op._schema.arguments)


@functools.cache
def _arg_table(op) -> dict:
    """name -> (position, kwarg-only, default or None) for each schema argument of `op`."""
    return {a.name: (i, a.kwarg_only, a.default_value if a.has_default_value() else None)
            for i, a in enumerate(_schema_args(op))}


def arg_names(op) -> list[str]:
    return [a.name for a in _schema_args(op)]


def arg(node: fx.Node, name: str) -> Any:
    """The value of schema argument `name` of a canonical node (a Node or a literal)."""
    entry = _arg_table(node.target).get(name)
    if entry is None:
        raise KeyError(f"{node.target} has no argument {name!r}")
    i, kwarg_only, default = entry
    if not kwarg_only and i < len(node.args):
        return node.args[i]
    return node.kwargs.get(name, default)


def normalize(op, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Fill an ATen call's arguments to the full schema: positionals as args, kwarg-only as kwargs."""
    out_args, out_kwargs = [], {}
    for i, a in enumerate(_schema_args(op)):
        if a.kwarg_only:
            if a.name in kwargs:
                out_kwargs[a.name] = kwargs[a.name]
            continue
        if i < len(args):
            out_args.append(args[i])
        elif a.name in kwargs:
            out_args.append(kwargs[a.name])
        elif a.has_default_value():
            out_args.append(a.default_value)
        else:
            raise TypeError(f"{op}: missing argument {a.name!r}")
    return tuple(out_args), out_kwargs


def call(op, /, **named) -> tuple[tuple, dict]:
    """Build (args, kwargs) for a canonical op from schema names; unnamed arguments take defaults."""
    positional = {a.name for a in _schema_args(op) if not a.kwarg_only}
    args_in = [named.pop(a.name) if a.name in named else _MISSING for a in _schema_args(op) if a.name in positional]
    # trailing defaults: let normalize fill them
    while args_in and args_in[-1] is _MISSING:
        args_in.pop()
    if _MISSING in args_in:
        names = [a.name for a in _schema_args(op) if a.name in positional]
        raise TypeError(f"{op}: argument {names[args_in.index(_MISSING)]!r} must be given")
    return normalize(op, tuple(args_in), named)


class _Missing:
    def __repr__(self):
        return "<missing>"


_MISSING = _Missing()


def is_call(node, op) -> bool:
    """Whether `node` is a graph node calling the canonical `op`."""
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is op


def short_name(target) -> str:
    """A readable name for an op target, for reports."""
    if isinstance(target, torch._ops.OpOverload):
        return f"aten.{target.overloadpacket.__name__}"
    return getattr(target, "__name__", str(target))
