"""Fold an eval-mode BatchNorm into the linear ops that READ it (`fold_bn_forward`). Exact.

`fold_batchnorm` folds a BatchNorm into the conv / linear *before* it; this pass takes the
BatchNorms that have none, but whose readers are linear: PRepBN / SLAB-style transformers write
x (B, N, C) -> transpose(1, 2) -> BatchNorm1d(C) -> transpose(1, 2) -> q, k, v Linears.

Math. An eval BatchNorm is a per-channel affine map of axis 1 of its input,

    y = x * s + t,   s = gamma / sqrt(running_var + eps),   t = beta - running_mean * s

(gamma = 1, beta = 0 when absent). Views (transpose, reshape, ...) and padding that copies input
values (reflect / replicate / circular) only move elements, so a reader's input z = V(y) holds,
at feature j of the reader's contracted axis, elements of one BN channel c(j) (found concretely,
as `batchnorm.channel_order` does: an integer tensor of y's shape holding each element's channel
index is run through the views; each slice along the contracted axis must hold one index; a
dynamic size is taken as 2 when the views only transpose / permute, which move the channel axis
the same way whatever the sizes, and refused otherwise):

    Linear (contracts the last axis):  z W^T + b = V(x) (W diag(s_c))^T + (b + W t_c)
        so W' = W * s[c(j)] per input column j and b' = b + W t[c]
    Conv (contracts axis 1, the input channels, per group), with no zero padding:
        W'[o, j, k] = W[o, j, k] s[c(j)],   b'[o] = b[o] + sum_{j, k} W[o, j, k] t[c(j)]

since every output of an unpadded conv sums over a whole window of (shifted) inputs. With zero
padding the border sees 0, not t, so such a conv is skipped with that reason; so is a transposed
conv (its border outputs receive fewer taps of t than its inner ones).

Every value reader of y (through the views) must be such a linear or conv taking it as its input;
otherwise the whole BatchNorm is skipped, naming the reader. Then the BatchNorm goes, the readers
read its input through the same views, with W', b' (one rewrite per BatchNorm, naming them all).
The new weights are computed in float64 and cast back, as recorded pure functions of the old
tensors (`rw.param`). Exact: the same function up to float rounding.

`merge_branches` already merges a BatchNorm1d -> Linear on 2-D input and BN -> conv without
padding when the BN has that one reader; this pass runs after it and takes what it leaves (several
readers, views in between, reflect padding).
"""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..rewrite import ops
from ..rewrite.passmanager import Pass, describe_node
from ..rewrite.rewriter import Rewriter
from ..rewrite.shapes import tensor_shape
from .batchnorm import REORDERING, run_view, shape_problem, bn_scale, is_rearrangement, value_readers
from .norm_affine import fold_linear_bias, fold_linear_weight

aten = torch.ops.aten
ZERO_PADDING = "zero padding: the border would see the shift t where the input is padded with 0"
_COPYING_PADS = ("reflect", "replicate", "circular")


# ---------------------------------------------------------------- the math (float64, pure)

def bn_affine(gamma, beta, mean, var, eps):
    """(s, t) of an eval BatchNorm in float64: s = gamma / sqrt(var + eps), t = beta - mean s."""
    s = bn_scale(gamma, var, eps)
    t = -mean.double() * s
    return s, (t + beta.double() if beta is not None else t)


def _mapped(v: torch.Tensor, cmap) -> torch.Tensor:
    """v[c(j)] for each feature j of the reader (cmap[j] = c(j))."""
    return v[torch.as_tensor(cmap, device=v.device)]


def _grouped(w: torch.Tensor, groups: int) -> torch.Tensor:
    """W (Cout, Cin/g, k...) as (g, Cout/g, Cin/g, k...) in float64."""
    return w.double().reshape(groups, w.shape[0] // groups, *w.shape[1:])


def _per_in_channel(v: torch.Tensor, w: torch.Tensor, groups: int) -> torch.Tensor:
    """v (Cin,) shaped to broadcast against `_grouped(w)`."""
    return v.reshape(groups, 1, w.shape[1], *([1] * (w.dim() - 2)))


def conv_in_weight(w, s, groups):
    """W'[o, j, k] = W[o, j, k] s[j], j the conv's input channel (per group); W's dtype."""
    return (_grouped(w, groups) * _per_in_channel(s, w, groups)).reshape(w.shape).to(w.dtype)


def conv_in_bias(w, b, t, groups):
    """b'[o] = b[o] + sum_{j, k} W[o, j, k] t[j] (b = 0 when absent); b's dtype, else W's."""
    wt = _grouped(w, groups) * _per_in_channel(t, w, groups)
    out = wt.sum(dim=tuple(range(2, wt.dim()))).reshape(w.shape[0])
    if b is not None:
        out = out + b.double()
    return out.to(b.dtype if b is not None else w.dtype)


# ---------------------------------------------------------------- finding the readers

def _name(n: fx.Node) -> str:
    what = ops.short_name(n.target) if n.op in ("call_function", "call_method") else n.op
    return f"{n.name} ({what})"


def _only_first_arg(u: fx.Node, v: fx.Node) -> bool:
    """Whether `u` reads `v` as its first argument and nowhere else."""
    rest = []
    fx.node.map_arg((u.args[1:], u.kwargs), rest.append)
    return bool(u.args) and u.args[0] is v and v not in rest


# the spellings of a pad that canonicalisation may leave: (argument names, defaults)
_PAD_SPELLINGS = {
    ops.pad: (("self", "pad", "mode", "value"), ("constant", None)),
    F.pad: (("input", "pad", "mode", "value"), ("constant", None)),
    torch.constant_pad_nd: (("input", "pad", "value"), (0,)),
    aten.constant_pad_nd.default: (("self", "pad", "value"), (0,)),
}


def pad_spec(n) -> tuple | None:
    """(pad amounts, mode, fill value) of a pad node in any spelling, else None."""
    if not (isinstance(n, fx.Node) and n.op == "call_function" and n.target in _PAD_SPELLINGS):
        return None
    names, defaults = _PAD_SPELLINGS[n.target]
    bound = dict(zip(names, list(n.args) + [None] * len(names)))
    bound.update({k: v for k, v in n.kwargs.items() if k in names})
    for name, default in zip(names[2:], defaults):
        bound[name] = default if bound.get(name) is None else bound[name]
    mode = bound.get("mode", "constant")
    return list(bound["pad"]), mode, bound["value"] or 0


def _pad_reason(pad: fx.Node) -> str | None:
    """None when `pad` moves elements only (copying modes, or no growth), else why not."""
    amounts, mode, value = pad_spec(pad)
    shape = tensor_shape(pad.args[0])
    if mode in _COPYING_PADS:
        if shape is not None and len(amounts) // 2 > len(shape) - 2:
            return f"{pad.name} pads the channel axis"
        return None
    if mode != "constant":
        return f"{pad.name} pads in mode {mode!r}"
    if all(isinstance(p, int) and p <= 0 for p in amounts):
        return None  # cropping only
    if value == 0:
        return f"{pad.name} (a constant pad with 0): {ZERO_PADDING}"
    return f"{pad.name} pads with the constant {value}: the border would see it, not the folded affine of it"


def _mover(u: fx.Node) -> bool:
    """A node that only moves elements of its first argument: a view or a `_pad_reason`-free pad."""
    return is_rearrangement(u) or (pad_spec(u) is not None and _pad_reason(u) is None)


def find_readers(bn: fx.Node):
    """[(reader, the value it reads, movers from the BN to that value)] for every linear or conv
    reading the BN's output through movers, or the reason some reader stops the fold."""
    found, todo = [], [(bn, [])]
    while todo:
        v, chain = todo.pop(0)
        for u in value_readers(v):
            if ops.is_call(u, aten._assert_tensor_metadata.default):
                continue  # a check of dtype and shape, which the fold keeps
            first = (u.op == "call_function" or is_rearrangement(u)) and _only_first_arg(u, v)
            if first and _mover(u):
                todo.append((u, chain + [u]))
            elif first and u.target in (ops.linear, ops.conv):
                found.append((u, v, chain))
            elif first and pad_spec(u) is not None:
                return [], _pad_reason(u)
            else:
                return [], (f"{_name(u)} reads {v.name}: not a linear or convolution taking it as its input, "
                            f"the affine cannot move into it")
    if not found:
        return [], "nothing reads the BatchNorm's output"
    return found, None


# ---------------------------------------------------------------- legality per reader

def _run_pad(pad: fx.Node, t: torch.Tensor) -> torch.Tensor:
    """`pad` applied to the channel-index tensor (its values are moved, never made up)."""
    amounts, mode, _ = pad_spec(pad)
    return F.pad(t.double(), amounts, mode=mode, value=None if mode in _COPYING_PADS else -1.0).long()


# views that keep the shape (and the order) of their input
_SAME_SHAPE = {"contiguous", aten.contiguous.default, aten.clone.default, aten.alias.default}


def _size_free(chain: list[fx.Node]) -> bool:
    """Whether the views only reorder axes (transpose, permute) or keep the shape: then where the
    channel axis goes does not depend on the sizes, so any sizes >= 2 decide it for all."""
    return all(n.target in REORDERING or n.target in _SAME_SHAPE for n in chain)


def _example_shape(bn: fx.Node, chain: list[fx.Node]):
    """The BN's output shape to run the views on, or the reason there is none: a symbolic size
    (a dynamic axis) becomes 2 where the views are `_size_free`."""
    shape = tensor_shape(bn)
    problem = shape_problem(bn, shape)
    if problem and shape is not None and isinstance(shape[1], int) and _size_free(chain):
        return tuple(d if isinstance(d, int) else 2 for d in shape)
    return problem or shape


def channel_map(bn: fx.Node, chain: list[fx.Node], axis: int):
    """c with feature j along `axis` of the reader's input = BN channel c[j], or the reason there
    is none (see the module docstring)."""
    shape = tensor_shape(bn)
    if shape is not None and not chain and axis % len(shape) == 1 and isinstance(shape[1], int):
        return list(range(shape[1]))  # the reader contracts the BN's own channel axis (any batch size)
    shape = _example_shape(bn, chain)
    if isinstance(shape, str):
        return shape
    t = torch.arange(shape[1]).reshape([-1 if i == 1 else 1 for i in range(len(shape))]).expand(shape)
    for node in chain:
        if node.target in _SAME_SHAPE:
            continue
        t = _run_pad(node, t) if pad_spec(node) is not None else run_view(node, t)
        if isinstance(t, str):
            return t
    axis = axis % t.dim()
    cols = t.movedim(axis, 0).reshape(t.shape[axis], -1)
    if cols.shape[1] > 0 and bool((cols == cols[:, :1]).all()) and bool((cols[:, 0] >= 0).all()):
        return cols[:, 0].tolist()
    through = f" through {', '.join(n.name for n in chain)}" if chain else ""
    return (f"the BatchNorm's channel axis (axis 1 of {list(shape)}) does not map{through} onto axis {axis} "
            f"of shape {list(t.shape)}, the axis the reader contracts: each of its slices mixes channels")


def _constant(n) -> bool:
    return isinstance(n, fx.Node) and n.op == "get_attr"


def reader_reason(rw: Rewriter, bn: fx.Node, reader: fx.Node, chain):
    """The channel map of one reader (list), or why it cannot take the BN's affine (str)."""
    w, b = ops.arg(reader, "weight"), ops.arg(reader, "bias")
    if not _constant(w) or not (b is None or _constant(b)):
        return f"{_name(reader)} reads a computed weight or bias, not a constant"
    conv = reader.target is ops.conv
    if conv and ops.arg(reader, "transposed"):
        return (f"{_name(reader)} is a transposed convolution: its border outputs receive fewer taps of "
                f"the shift t than its inner ones")
    if conv and any(p != 0 for p in ops.arg(reader, "padding")):
        return f"{_name(reader)} has padding {list(ops.arg(reader, 'padding'))}: {ZERO_PADDING}"
    cmap = channel_map(bn, chain, 1 if conv else -1)
    if isinstance(cmap, str):
        return f"{_name(reader)}: {cmap}"
    wv = rw.value(w)
    features = wv.shape[1] * ops.arg(reader, "groups") if conv else wv.shape[-1]
    if features != len(cmap):
        return f"{_name(reader)} contracts {features} features, the map has {len(cmap)}"
    for at in [reader] + [u for u in bn.users]:
        moved = rw.moved_read([bn], at)
        if moved:
            return moved
    return cmap


# ---------------------------------------------------------------- the rewrite

def _bn_reason(bn: fx.Node) -> str | None:
    if ops.arg(bn, "training") is not False:
        return "it uses batch statistics (training=True)"
    for name in ("weight", "bias", "running_mean", "running_var"):
        v = ops.arg(bn, name)
        if (v is None and name.startswith("running")) or (v is not None and not _constant(v)):
            return f"its {name} is {'missing' if v is None else 'computed'}, not a constant"
    if isinstance(ops.arg(bn, "eps"), fx.Node):  # torch.compile(dynamic=True) passes float attributes in
        return f"its eps is computed ({ops.arg(bn, 'eps').name}), not a literal"
    shape = tensor_shape(bn)
    return None if shape is None or len(shape) >= 2 else f"its input has rank {len(shape)}, no channel axis"


def _fold_into(rw: Rewriter, bn: fx.Node, reader: fx.Node, cmap) -> fx.Node:
    """The reader rebuilt with the BN's affine folded into its weight and bias (module docstring)."""
    gamma, beta, mean, var = (ops.arg(bn, n) for n in ("weight", "bias", "running_mean", "running_var"))
    eps = ops.arg(bn, "eps")
    kw = {name: ops.arg(reader, name) for name in ops.arg_names(reader.target)}
    w, b = kw["weight"], kw["bias"]
    groups = kw.get("groups", 1)
    conv = reader.target is ops.conv

    def weight(w_, g_, v_):
        s = _mapped(bn_scale(g_, v_, eps), cmap)
        return conv_in_weight(w_, s, groups) if conv else fold_linear_weight(w_, s)

    def bias(w_, b_, g_, be_, m_, v_):
        t = _mapped(bn_affine(g_, be_, m_, v_, eps)[1], cmap)
        return conv_in_bias(w_, b_, t, groups) if conv else fold_linear_bias(w_, t, b_)

    stem = w.target[:-len(".weight")] if w.target.endswith(".weight") else w.target
    rw.at(reader)
    kw["weight"] = rw.param(f"{stem}_bn_forward_weight", weight, w, gamma, var)
    kw["bias"] = rw.param(f"{stem}_bn_forward_bias", bias, w, b, gamma, beta, mean, var)
    new = rw.call(reader.target, **kw)
    rw.redirect(reader, new)
    return new


def fold_bn_forward(rw: Rewriter) -> None:
    """Every eval BatchNorm whose readers are all linears / unpadded convs (through views) goes
    into them (module docstring). Last BN first, so that a BN -> BN -> linear folds both."""
    for bn in reversed(list(rw.graph.nodes)):
        if bn.graph is None or not ops.is_call(bn, ops.batch_norm) or not bn.users:
            continue
        reason = _bn_reason(bn)
        readers, reason = ([], reason) if reason else find_readers(bn)
        maps = [] if reason else [reader_reason(rw, bn, r, chain) for r, _, chain in readers]
        reason = reason or next((m for m in maps if isinstance(m, str)), None)
        if reason:
            rw.skip(bn.name, f"{reason}; the BatchNorm stays as it is")
            continue
        new = [_fold_into(rw, bn, r, m) for (r, _, _), m in zip(readers, maps)]
        x = ops.arg(bn, "input")
        rw.redirect(bn, x)
        movers = sorted({n.name for _, _, chain in readers for n in chain})
        rw.rewrote(bn.name, f"fold_bn_forward: [{bn.name}] folded into {len(new)} reader(s): "
                            f"{', '.join(f'{r.name} -> {describe_node(n)}' for (r, _, _), n in zip(readers, new))}"
                            + (f"; they read {x.name} through {', '.join(movers)}" if movers else
                               f"; they read {x.name}"))


FOLD_BN_FORWARD = Pass(
    "fold_bn_forward", "exact", analysis=fold_bn_forward, needs=("shapes",),
    doc="Fold an eval BatchNorm into the Linears / unpadded convs that read it (through views): "
        "W' = W s (per input channel), b' = b + W t. Exact. See passes/batchnorm_forward.py.")
