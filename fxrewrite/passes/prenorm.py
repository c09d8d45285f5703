"""Exact LayerNorm -> RMSNorm for pre-LN transformers, by keeping the residual stream zero-mean
("Pre-RMSNorm and Pre-CRMSNorm Transformers", Jiang et al. 2023).

Math. LN(x) = (x - mean(x)) / sqrt(var(x) + eps) * w + b over the hidden dim of size D. If
mean(x) = 0 then var(x) = mean(x^2) and LN(x) = x / sqrt(mean(x^2) + eps) * w + b, which is
RMSNorm(x; w, eps) + b. In a pre-LN transformer the residual stream h is a sum of terms, each
written by a layer whose output is affine in its weights: embeddings E[i], a patch-embedding
conv, a position/class-token constant, and each block's output projection W z + c. Replacing
each such weight by its centred version along the hidden dim (W' = W - mean_rows W,
c' = c - mean(c), E' = E - mean_cols E, constants likewise) removes exactly the mean of each
term, so h' = h - mean(h), every LayerNorm that reads h sees the same normalised value, and all
those LayerNorms become RMSNorm + bias with the same output. Exact in real arithmetic; proven in
float64 on GPT-2 and a pre-LN ViT (tests/test_swaps_prenorm.py).

When it applies (checked on the graph, per connected residual stream):
- every value flowing into the stream comes, through adds/subs, scalar mul/div, dropout/identity,
  casts, concatenation along another axis and reshapes that keep the hidden axis, from a linear,
  addmm (GPT-2's Conv1D), embedding, ungrouped conv, or a parameter, whose weights are module
  constants (get_attr) that can be centred along the hidden axis;
- every reader of the stream is a LayerNorm over exactly the hidden dim, another stream op, or
  reads only its shape. Anything else that sees the stream (a returned hidden state, a per-channel
  layer scale, a post-LN block where the stream *is* a LayerNorm output, the raw model input)
  would see the shifted values, so the stream is left alone and the report says which op stops it.

The new LayerNorms are canonical `aten.rms_norm` (+ `aten.add` of the old bias) reading the old
weight, so later passes and the Triton lowering see an ordinary RMSNorm. A tied weight (GPT-2's
wte, shared with the LM head) gets a centred copy for the stream; the other reader keeps the
original. Opt-in even though exact: it changes weights all over the model.

The second pass here, `prenorm_crmsnorm` (Pre-CRMSNorm, same paper), shares this stream analysis
and goes one step further: the zero-mean stream is stored in d-1 features (the last one is minus
the sum of the others) and each LayerNorm reading it becomes a CRMSNorm; see its docstring.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.fx as fx

from ..rewrite import ops
from ..rewrite.shapes import tensor_shape
from ..rewrite.passmanager import Pass
from ..rewrite.verify import deviation

from .swap_common import fmt_dev, module_path, op_name, run_recording

NAME = "prenorm_rmsnorm"

# value-preserving ops the zero-mean stream may pass through; no dropout (a dropout still in the
# graph is a training-mode one, and dropout(centred) is not zero-mean)
_PASS_THROUGH = {"alias", "clone", "contiguous", "to", "_to_copy", "type_as", "float"}
_RESHAPE = {"view", "reshape", "_unsafe_view", "flatten", "unsqueeze", "squeeze"}
_METADATA = {"getattr", "size", "sym_size", "_assert_tensor_metadata", "dim"}


class _NotApplicable(Exception):
    pass


def _where(n: fx.Node) -> str:
    path = module_path(n)
    return f"{n.name} ({op_name(n)}{', in ' + path if path else ''})"


def _axis_through_reshape(out_shape, in_shape, axis: int) -> int:
    """The input axis that becomes output axis `axis` of a view-like op, if that axis is kept whole."""
    prefix = math.prod(out_shape[:axis])
    acc = 1
    for i, s in enumerate(in_shape):
        if acc == prefix and s == out_shape[axis]:
            return i
        acc *= s
    raise _NotApplicable("a reshape merges or splits the hidden axis")


class _Stream:
    """Backward exploration from LayerNorm inputs: stream nodes (with their hidden axis), writers
    to re-centre, and why not, grouped into connected streams by union-find."""

    def __init__(self, d: int, shape_of):
        self.d, self.shape_of = d, shape_of
        self.axis: dict[fx.Node, int] = {}  # stream node -> hidden axis of its value
        self.writers: dict[fx.Node, dict[fx.Node, tuple]] = {}  # user -> {get_attr: (kind, axis)}
        self.parent: dict[fx.Node, fx.Node] = {}
        self.failures: list[tuple[fx.Node, str]] = []

    def find(self, n):
        while self.parent.get(n, n) is not n:
            n = self.parent[n]
        return n

    def union(self, a, b):
        ra, rb = self.find(a), self.find(b)
        if ra is not rb:
            self.parent[ra] = rb

    def visit(self, n: fx.Node, axis: int, via: fx.Node | None):
        if via is not None:
            self.union(n, via)
        if n in self.axis:
            if self.axis[n] != axis:
                self.failures.append((n, f"{_where(n)} is reached with two different hidden axes"))
            return
        self.axis[n] = axis
        self.parent.setdefault(n, n)
        try:
            self._explore(n, axis)
        except _NotApplicable as e:
            self.failures.append((n, f"the residual stream at {_where(n)}: {e}"))

    def _constant(self, user: fx.Node, g: fx.Node, axis: int, kind: str = "constant"):
        shape = self.shape_of(g)
        if not shape or axis < 0 or axis >= len(shape) or shape[axis] != self.d:
            raise _NotApplicable(f"{g.target} is broadcast along the hidden axis; it cannot be re-centred")
        self.writers.setdefault(user, {})[g] = (kind, axis)

    def _explore(self, n: fx.Node, axis: int):
        shape = tensor_shape(n)
        if shape is None:
            raise _NotApplicable("its shape is unknown")
        if n.op == "placeholder":
            raise _NotApplicable("it is a model input; re-centring it would change what the caller passes")
        if n.op == "get_attr":
            raise _NotApplicable("a parameter read directly")
        name = op_name(n)
        x = n.args[0] if n.args else None
        if name in _PASS_THROUGH or (name in ("mul", "div") and len(n.args) == 2
                                      and isinstance(n.args[1], (int, float))):
            return self._operand(n, x, axis)
        if name in ("add", "sub"):
            for a in n.args[:2]:
                if not isinstance(a, fx.Node):
                    raise _NotApplicable(f"adds the constant {a!r}, which has a mean")
                a_shape = tensor_shape(a) or ()
                self._operand(n, a, axis - (len(shape) - len(a_shape)), a_shape)
            return
        if name in _RESHAPE:
            return self._operand(n, x, _axis_through_reshape(shape, tensor_shape(x), axis))
        if name == "transpose":
            d0, d1 = (a % len(shape) for a in n.args[1:3])
            return self._operand(n, x, d1 if axis == d0 else d0 if axis == d1 else axis)
        if name == "permute":
            dims = n.args[1] if isinstance(n.args[1], (list, tuple)) else n.args[1:]
            return self._operand(n, x, dims[axis] % len(shape))
        if name == "expand":
            return self._operand(n, x, axis - (len(shape) - len(tensor_shape(x) or shape)))
        if name == "cat":
            dim = (n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)) % len(shape)
            if dim == axis:
                raise _NotApplicable("concatenates along the hidden axis")
            for a in n.args[0]:
                self._operand(n, a, axis)
            return
        if name == "linear" and axis == len(shape) - 1:
            return self._weights(n, ops.arg(n, "weight"), 0, ops.arg(n, "bias"))
        if name == "addmm" and axis == 1:
            return self._weights(n, n.args[2], 1, n.args[0])
        if name == "embedding" and axis == len(shape) - 1:
            return self._weights(n, n.args[0], 1, None)
        if name == "convolution" and axis == 1:
            if ops.arg(n, "transposed") or ops.arg(n, "groups") != 1:
                raise _NotApplicable("a grouped or transposed convolution writes it; centring its output "
                                     "channels would mix groups")
            return self._weights(n, ops.arg(n, "weight"), 0, ops.arg(n, "bias"))
        what = "a LayerNorm's output (a post-LN block: the stream is normalised, not a sum of layer outputs)" \
            if name in ("layer_norm", "rms_norm") else f"{name}, whose output cannot be re-centred"
        raise _NotApplicable(f"it is produced by {what}")

    def _operand(self, user, a, axis, a_shape=None):
        if not isinstance(a, fx.Node):
            raise _NotApplicable(f"{_where(user)} reads a non-tensor {a!r}")
        if a.op == "get_attr":
            return self._constant(user, a, axis)
        if axis < 0:
            raise _NotApplicable(f"{a.name} is broadcast along the hidden axis")
        self.visit(a, axis, user)

    def _weights(self, n, w, w_axis, b):
        if not (isinstance(w, fx.Node) and w.op == "get_attr"):
            raise _NotApplicable(f"{op_name(n)} writes it with a computed weight")
        self.writers.setdefault(n, {})[w] = ("weight", w_axis)
        if b is not None:
            if not (isinstance(b, fx.Node) and b.op == "get_attr"):
                raise _NotApplicable(f"{op_name(n)} writes it with a computed bias")
            self.writers[n][b] = ("bias", -1)


def _centre(t: torch.Tensor, axis: int) -> torch.Tensor:
    """t minus its mean along `axis`, computed in float64."""
    t64 = t.double()
    return (t64 - t64.mean(dim=axis, keepdim=True)).to(t.dtype)


def _check_readers(stream: _Stream, lns: dict[fx.Node, int]):
    """Every reader of a stream node must be in the stream, a LayerNorm over the hidden axis, or
    read only metadata."""
    for s, axis in stream.axis.items():
        for u in s.users:
            if u in stream.axis or op_name(u) in _METADATA:
                continue
            if u in lns and ops.arg(u, "input") is s and axis == len(tensor_shape(s)) - 1:
                continue
            if u.op == "output":
                stream.failures.append((s, f"the residual stream at {_where(s)} is returned by the model, "
                                           f"which would see it re-centred"))
            else:
                stream.failures.append((s, f"the residual stream at {_where(s)} is also read by {_where(u)}, "
                                           f"which would see it re-centred"))


def _layer_norms(rw) -> dict[fx.Node, int]:
    """The LayerNorms over one trailing dim, with that dim's size (the others are skipped)."""
    lns = {}
    for n in rw.gm.graph.nodes:
        if n.op == "call_function" and n.target is ops.layer_norm and n.users:
            shape = list(ops.arg(n, "normalized_shape"))
            if len(shape) != 1:
                rw.skip(n.name, f"normalises over {len(shape)} dims {shape}; only a norm over the "
                                f"hidden dim reads a residual stream")
                continue
            lns[n] = shape[0]
    return lns


def _streams(rw, lns: dict, check=None, why: str = "not a zero-mean residual stream: "):
    """For each hidden size d: (stream, its LayerNorms, bad roots). The stream analysis shared by
    both passes; `check(stream, d)` adds a pass's own reasons to refuse a stream. Each LayerNorm
    of a refused stream is skipped with the reasons, prefixed by `why`."""
    for d in sorted(set(lns.values())):
        stream = _Stream(d, lambda g: tuple(tensor_shape(g) or rw.value(g).shape))
        mine = {n: d for n, dd in lns.items() if dd == d}
        for ln in mine:
            x = ops.arg(ln, "input")
            shape = tensor_shape(x)
            if not isinstance(x, fx.Node) or shape is None:
                stream.failures.append((ln, f"{_where(ln)}: its input's shape is unknown"))
                continue
            stream.parent.setdefault(ln, ln)
            stream.visit(x, len(shape) - 1, None)
            stream.union(ln, x)
        _check_readers(stream, mine)
        if check is not None:
            check(stream, d)
        bad: dict[fx.Node, list[str]] = {}
        for node, reason in stream.failures:
            bad.setdefault(stream.find(node), []).append(reason)
        for ln in mine:
            root = stream.find(ln)
            if root in bad:
                reasons = list(dict.fromkeys(bad[root]))
                more = f" (and {len(reasons) - 2} more)" if len(reasons) > 2 else ""
                rw.skip(ln.name, why + "; ".join(reasons[:2]) + more)
        yield stream, mine, bad


def _run(rw, apply, check=None, why: str = "not a zero-mean residual stream: "):
    """Find the streams, `apply(rw, stream, lns, bad)` to each, and report the model's deviation."""
    gm = rw.gm
    lns = _layer_norms(rw)
    if not lns:
        rw.note("model", "nothing to do: no LayerNorm in the graph")
        return
    outputs, why_not = run_recording(gm, {})
    applied = 0
    for stream, mine, bad in _streams(rw, lns, check, why):
        applied += apply(rw, stream, mine, bad)
    if applied and outputs is None:
        rw.note("model", f"model output deviation on the example inputs: {why_not}")
    if applied and outputs is not None:
        rw.sweep()
        after, _ = run_recording(gm, {})
        if after is not None:
            rw.note("model", f"model output deviation on the example inputs: "
                             f"{fmt_dev(deviation(outputs, after))} (exact up to rounding)")


def prenorm_rmsnorm(rw):
    """Find residual streams read only by LayerNorms, re-centre their writers, and turn those
    LayerNorms into RMSNorm + bias (see the module docstring)."""
    _run(rw, _apply)


def _apply(rw, stream: _Stream, lns: dict, bad: dict) -> int:
    ok = lambda n: stream.find(n) not in bad  # noqa: E731
    count = 0
    for user, consts in stream.writers.items():
        if not ok(user):
            continue
        subst = {}
        for g, (kind, axis) in consts.items():
            rw.at(user)
            subst[g] = rw.param(f"{g.target}_centred", lambda t, axis=axis: _centre(t, axis), g)
        new = rw.at(user).copy(user, lambda a: subst.get(a, a))
        names = ", ".join(f"{g.target} along dim {axis % rw.value(g).dim()}"
                          for g, (_, axis) in consts.items())
        rw.replace(user, new, f"re-centred {names} so that {_where(user)} writes a zero-mean value into the stream")
    for ln, d in lns.items():
        if not ok(ln):
            continue
        rw.at(ln)
        out = rw.call(ops.rms_norm, input=ops.arg(ln, "input"), normalized_shape=[d],
                      weight=ops.arg(ln, "weight"), eps=ops.arg(ln, "eps"))
        bias = ops.arg(ln, "bias")
        if bias is not None:
            out = rw.call(ops.add, self=out, other=bias)
        rw.replace(ln, out, f"LayerNorm{' of ' + module_path(ln) if module_path(ln) else ''} -> RMSNorm"
                            f"{' + bias' if bias is not None else ''}: its input stream has zero mean")
        count += 1
    return count


PRENORM_RMSNORM = Pass(NAME, "exact", analysis=prenorm_rmsnorm, needs=("shapes",), doc=__doc__)


# ---------------------------------------------------------------- Pre-CRMSNorm

CRMS_NAME = "prenorm_crmsnorm"

_RESIZE = {"view", "reshape", "_unsafe_view", "expand"}  # ops that spell out the hidden size
_SHAPE_ATTRS = {"shape"}
_HARMLESS_ATTRS = {"dtype", "device", "ndim", "layout", "is_cuda", "requires_grad"}
_SUM = torch.ops.aten.sum.dim_IntList
_NEG = torch.ops.aten.neg.default
_CAT = torch.ops.aten.cat.default


def _sizes(n: fx.Node) -> list | None:
    """The size list a view/reshape/expand spells out (varargs or one list), or None."""
    if n.op == "call_method":
        rest = n.args[1:]
        if n.kwargs:
            return None
        return list(rest[0]) if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else list(rest)
    if len(n.args) == 2 and isinstance(n.args[1], (list, tuple)):  # (kwargs, e.g. `implicit`, are kept)
        return list(n.args[1])
    return None


def _with_sizes(n: fx.Node, args: tuple, sizes: list) -> tuple:
    """`args` (n's, remapped) with the size list replaced by `sizes`, in n's own spelling."""
    if n.op == "call_method" and not (len(n.args) == 2 and isinstance(n.args[1], (list, tuple))):
        return (args[0], *sizes)
    return (args[0], type(n.args[1])(sizes))


def _check_compressible(stream: _Stream, d: int):
    """What stops a zero-mean stream from being stored in d-1 features: a hidden size that is
    spelt out other than as d or -1, a reader of the hidden size (it would see d-1), d < 3 (a
    size-1 axis would broadcast or squeeze)."""
    if d < 3:  # every connected stream of this width
        stream.failures += [(n, f"the hidden size is {d}; a {d - 1}-wide stream would broadcast")
                            for n in stream.axis]
        return
    for n, axis in stream.axis.items():
        shape = tensor_shape(n)
        if shape is None or len(shape) <= axis or shape[axis] != d:
            stream.failures.append((n, f"the residual stream at {_where(n)} has size "
                                       f"{None if shape is None else shape[axis]} on the hidden axis, not {d}"))
            continue
        if op_name(n) in _RESIZE:
            sizes = _sizes(n)
            entry = sizes[axis] if sizes is not None and len(sizes) == len(shape) else None
            if not (isinstance(entry, int) and entry in (d, -1)):
                stream.failures.append((n, f"{_where(n)} spells the hidden size of the residual stream as "
                                           f"{entry!r}, which cannot be made {d - 1}"))
        for u in n.users:
            why = _hidden_size_read(u, axis, len(shape))
            if why:
                stream.failures.append((n, f"{_where(u)} {why} of the residual stream at {_where(n)}; "
                                           f"it would see {d - 1}, not {d}"))


def _hidden_size_read(u: fx.Node, axis: int, ndim: int) -> str | None:
    """How a metadata reader `u` reads the hidden size (None when it does not)."""
    name = op_name(u)
    if name in ("size", "sym_size"):
        dim = u.args[1] if len(u.args) > 1 else u.kwargs.get("dim")
        if dim is None:
            return _shape_read(u, axis, ndim)
        return "reads the hidden size" if not isinstance(dim, int) or dim % ndim == axis else None
    if name == "getattr":
        attr = u.args[1] if len(u.args) > 1 else None
        if attr in _SHAPE_ATTRS:
            return _shape_read(u, axis, ndim)
        return None if attr in _HARMLESS_ATTRS else f"reads .{attr}"
    if name == "_assert_tensor_metadata":
        if len(u.args) > 1 or any(u.kwargs.get(k) is not None for k in ("size", "stride")):
            return "asserts the size"
    return None


def _shape_read(shape_node: fx.Node, axis: int, ndim: int) -> str | None:
    for w in shape_node.users:
        i = w.args[1] if op_name(w) == "getitem" and len(w.args) > 1 else None
        if not isinstance(i, int) or i % ndim == axis:
            return "reads the hidden size"
    return None


def _resized_meta(node: fx.Node, axis: int, size: int) -> dict:
    """`node`'s shape metadata with `size` on `axis` (same dtype, same order of strides)."""
    out = {}
    for key in ("val", "example_value"):
        v = node.meta.get(key)
        if isinstance(v, torch.Tensor):
            shape = list(v.shape)
            shape[axis] = size
            try:
                order = list(v.dim_order())
            except Exception:  # symbolic strides that cannot be ordered: a fresh layout
                order = list(range(v.dim()))
            with getattr(v, "fake_mode", None) or contextlib.nullcontext():
                out[key] = torch.empty_permuted(shape, order, dtype=v.dtype, device=v.device)
    tm = node.meta.get("tensor_meta")
    if tm is not None and hasattr(tm, "shape"):
        shape = list(tm.shape)
        shape[axis] = size
        order = sorted(range(len(shape)), key=lambda i: -tm.stride[i]) if tm.stride else range(len(shape))
        stride, step = [0] * len(shape), 1
        for i in reversed(list(order)):
            stride[i] = step
            step *= max(shape[i], 1)
        out["tensor_meta"] = tm._replace(shape=torch.Size(shape), stride=tuple(stride))
    return out


def _narrowed(t: torch.Tensor, axis: int, d: int) -> torch.Tensor:
    """t centred along `axis` (in float64), keeping the first d-1 entries of that axis."""
    return _centre(t, axis).narrow(axis, 0, d - 1)


def _apply_crms(rw, stream: _Stream, lns: dict, bad: dict) -> int:
    ok = lambda n: stream.find(n) not in bad  # noqa: E731
    nodes = [n for n in rw.gm.graph.nodes if n in stream.axis and ok(n)]
    if not nodes:
        return 0
    d = stream.d
    narrowed = 0
    for n in nodes:  # in graph order: every stream input of n is already its d-1 copy
        axis, consts = stream.axis[n], stream.writers.get(n, {})
        subst = {}
        for g, (_, g_axis) in consts.items():
            rw.at(n)
            subst[g] = rw.param(f"{g.target}_crms", lambda t, a=g_axis: _narrowed(t, a, d), g)
        rw.at(n)
        if op_name(n) in _RESIZE:
            args = fx.node.map_arg(n.args, lambda a: subst.get(a, a))
            sizes = _sizes(n)
            if sizes[axis] == d:
                sizes[axis] = d - 1
            args = _with_sizes(n, args, sizes)
            new = rw.call_method(n.target, args) if n.op == "call_method" else \
                rw.call_function(n.target, args, dict(n.kwargs))
            new.meta.update({k: v for k, v in n.meta.items() if k not in new.meta})
        else:
            new = rw.copy(n, lambda a: subst.get(a, a))
        new.meta.update(_resized_meta(n, axis, d - 1))
        if consts:
            names = ", ".join(f"{g.target} along dim {a % rw.value(g).dim()}" for g, (_, a) in consts.items())
            rw.replace(n, new, f"re-centred {names} and kept its first {d - 1} of {d} features, so that "
                               f"{_where(n)} writes the zero-mean stream stored in {d - 1} dims")
            narrowed += 1
        else:
            rw.redirect(n, new)
    count = 0
    for ln in lns:
        if not ok(ln):
            continue
        x = ops.arg(ln, "input")  # the d-1 copy (redirected above)
        rw.at(ln)
        s = rw.call_function(_SUM, (x, [-1], True))
        neg = rw.call_function(_NEG, (s,))
        full = rw.call_function(_CAT, ([x, neg], -1))
        s.meta.update(_resized_meta(x, -1, 1))
        neg.meta.update(_resized_meta(x, -1, 1))
        full.meta.update(_resized_meta(x, -1, d))
        out = rw.call(ops.rms_norm, input=full, normalized_shape=[d], weight=ops.arg(ln, "weight"),
                      eps=ops.arg(ln, "eps"))
        out.meta.update({k: ln.meta[k] for k in ("val", "example_value", "tensor_meta") if k in ln.meta})
        bias = ops.arg(ln, "bias")
        if bias is not None:
            out = rw.call(ops.add, self=out, other=bias)
        rw.replace(ln, out, f"LayerNorm{' of ' + module_path(ln) if module_path(ln) else ''} -> CRMSNorm "
                            f"(rms_norm of cat(x, -sum(x)) over {d}{' + bias' if bias is not None else ''}): "
                            f"its input stream is zero-mean and stored in {d - 1} dims")
        count += 1
    if count:
        first = next(ln for ln in lns if ok(ln))
        rw.note(first.name, f"residual stream of {len(nodes)} ops ({count} LayerNorms) stored in {d - 1} "
                            f"features instead of {d}: {narrowed} writers re-centred and narrowed")
    return count


def prenorm_crmsnorm(rw):
    """Exact Pre-LN -> Pre-CRMSNorm (Jiang et al. 2023): store each zero-mean residual stream of a
    pre-LN transformer in d-1 features, and turn every LayerNorm reading it into CRMSNorm.

    Math. After `prenorm_rmsnorm`'s re-centring the stream h in R^d has sum(h) = 0, so its last
    coordinate is determined by the others: h_d = -sum_{i<d} h_i. Every writer keeps only its
    first d-1 output features (rows of a linear/conv weight and bias, columns of GPT-2's addmm
    weight and of an embedding, the hidden axis of a constant), all centred along the hidden dim
    first; adds, scalar scales, casts, reshapes and concatenations along other axes act per
    feature, so the stream ops compute exactly h' = h[..., :d-1]. A LayerNorm reading h
    (LN(h) = (h - mean h) / sqrt(var h + eps) * w + b, var biased) becomes, with s = sum(h'),

        CRMSNorm(h') = cat(h', -s) / sqrt((sum(h'^2) + s^2) / d + eps) * w + b,

    equal to LN(h) in real arithmetic: cat(h', -s) = h, mean(h) = 0 and var(h) = mean(h^2) =
    (sum(h'^2) + s^2) / d, with eps added to the variance exactly where LayerNorm adds it. It is
    written as canonical ops: `aten.sum` (keepdim), `aten.neg`, `aten.cat` and `aten.rms_norm`
    over d (mean(x^2) + eps under the square root, as above) on the rebuilt vector, plus
    `aten.add` of the old bias, so later passes and the Triton lowering see an ordinary RMSNorm
    region (the rebuilt input ends its prologue). Exact up to rounding; proven in float64 on
    GPT-2 and a pre-LN ViT (tests/test_swaps_precrms.py).

    Refused (per stream, with the reason) wherever `prenorm_rmsnorm` is, and also where the
    hidden size itself is read (`x.shape[-1]`, `size(-1)`) or spelt out other than as d or -1
    in a view/expand, or d < 3. A returned stream is refused rather than rebuilt: the rebuilt
    vector is the re-centred stream, not the model's. Parameters: every writer loses one output
    feature (a d x k weight and its bias lose k + 1); a tied weight (GPT-2's wte, shared with the
    LM head) gets a narrowed copy for the stream while the head keeps the original, so a tied
    LM-head model gains V x (d - 1) for the copy less what the other writers lose."""
    _run(rw, _apply_crms, _check_compressible, "not a zero-mean residual stream that can be stored in d-1 dims: ")


PRENORM_CRMSNORM = Pass(CRMS_NAME, "exact", analysis=prenorm_crmsnorm, needs=("shapes",),
                        doc=prenorm_crmsnorm.__doc__)
