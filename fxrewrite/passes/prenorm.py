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
"""
from __future__ import annotations

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


def prenorm_rmsnorm(rw):
    """Find residual streams read only by LayerNorms, re-centre their writers, and turn those
    LayerNorms into RMSNorm + bias (see the module docstring)."""
    gm, lns = rw.gm, {}
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target is ops.layer_norm and n.users:
            shape = list(ops.arg(n, "normalized_shape"))
            if len(shape) != 1:
                rw.skip(n.name, f"normalises over {len(shape)} dims {shape}; only a norm over the "
                                f"hidden dim reads a residual stream")
                continue
            lns[n] = shape[0]
    if not lns:
        rw.note("model", "nothing to do: no LayerNorm in the graph")
        return
    outputs, _ = run_recording(gm, {})
    applied = 0
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
        bad: dict[fx.Node, list[str]] = {}
        for node, reason in stream.failures:
            bad.setdefault(stream.find(node), []).append(reason)
        for ln in mine:
            root = stream.find(ln)
            if root in bad:
                reasons = list(dict.fromkeys(bad[root]))
                more = f" (and {len(reasons) - 2} more)" if len(reasons) > 2 else ""
                rw.skip(ln.name, "not a zero-mean residual stream: " + "; ".join(reasons[:2]) + more)
        applied += _apply(rw, stream, mine, bad)
    if applied and outputs is not None:
        rw.sweep()
        after, _ = run_recording(gm, {})
        if after is not None:
            rw.note("model", f"model output deviation on the example inputs: "
                             f"{fmt_dev(deviation(outputs, after))} (exact up to rounding)")


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
