"""Lift written-out RMSNorms back into one canonical `aten.rms_norm`.

transformers' RMSNorm modules (LLaMA, Qwen2, Mistral, T5, Gemma, ...) and hand-written ones
are Python arithmetic, so every capture route records a chain of elementwise ops, which the
canonicaliser turns into one spelling whatever the route (`x.pow(2)`, `x ** 2`, `torch.pow`
-> `aten.pow`; `x.to(dtype)`, `x.float()` -> `aten.to.dtype`; ...):

    xf = x.to(float32)                                  (absent, or a no-op, for float32 models)
    r  = rsqrt(mean(pow(xf, 2), dim=[-1], keepdim=True) + eps)
    y  = weight * (xf * r).to(x.dtype)                  (either operand order; weight optional)

which is RMSNorm(xf; weight, eps) over the last dim. Lifting it into `aten.rms_norm` lets the
norm passes (DyT swap, kernel lowering) see it. Exactness: aten.rms_norm computes the same
x * rsqrt(mean(x^2) + eps) * weight; when the casts are real (a bf16 model computing the norm in
float32) the casts and the weight multiply are kept as they are and only the normalisation
`xf * r` becomes `rms_norm(xf, weight=None)`, so the rounding steps are unchanged. T5 squares a
float32 copy but multiplies the tensor itself (`x * rsqrt(mean(x.to(f32) ** 2) + eps)`): lifted
when that copy is a no-op (canonicalisation drops a cast to the dtype a value already has, so
both read `x`), left otherwise.

Partly handled: Gemma's `(1 + weight)` scale is not a weight the norm can take, so only the
normalisation is lifted and the scale stays as written (exact). Not handled (left decomposed,
nothing breaks): norms over several dims, a chain whose intermediate values are read elsewhere,
and `x / sqrt(...)` spellings (rsqrt rounds differently, so that lift would not be exact).

Run as the exact pass "lift_norms" (`LIFT_NORMS`), before the norm swaps and the Triton
lowering (the pipeline adds it before the lowering).
"""
from __future__ import annotations

import torch
import torch.fx as fx

from . import ops
from .shapes import tensor_dtype, tensor_shape
from .passmanager import Pass
from .rewriter import Rewriter

aten = torch.ops.aten
_CASTS = {ops.cast, ops.to_dtype}


def _is(n, target) -> bool:
    return isinstance(n, fx.Node) and n.op == "call_function" and n.target is target


def _value_users(n: fx.Node) -> list[fx.Node]:
    """Users other than export's metadata assertions."""
    return [u for u in n.users if not _is(u, aten._assert_tensor_metadata.default)]


def _other(mul: fx.Node, one) -> object:
    a, b = mul.args[0], mul.args[1]
    return b if a is one else a if b is one else None


def _match(r: fx.Node):
    """From an rsqrt node, the pieces of a decomposed RMSNorm, or None."""
    add = r.args[0]
    if not (_is(add, ops.add) and isinstance(add.args[1], (int, float)) and len(add.users) == 1
            and ops.arg(add, "alpha") in (None, 1)):
        return None
    mean = add.args[0]
    if not (_is(mean, ops.mean) and len(mean.users) == 1):
        return None
    dims, keep = ops.arg(mean, "dim"), ops.arg(mean, "keepdim")
    pw = ops.arg(mean, "self")
    if not (_is(pw, ops.pow) and ops.arg(pw, "exponent") == 2 and len(pw.users) == 1 and keep
            and ops.arg(mean, "dtype") is None):
        return None
    xf = ops.arg(pw, "self")
    shape = tensor_shape(xf)
    if shape is None or list(dims) not in ([-1], [len(shape) - 1]):
        return None
    users = _value_users(r)
    if len(users) != 1 or not _is(users[0], ops.mul) or _other(users[0], r) is not xf:
        return None
    norm = users[0]
    d = shape[-1]
    if isinstance(d, torch.SymInt):  # a capture with the feature axis asked dynamic, which export fixed
        d = d.node.maybe_as_int()
        if d is None:
            return None
    return xf, float(add.args[1]), norm, [pw, mean, add, r], d



def _weight_after(norm: fx.Node, d: int):
    """(optional cast node, weight-mul node, weight get_attr) following the normalisation."""
    out, cast = norm, None
    users = _value_users(out)
    if len(users) == 1 and users[0].target in _CASTS:
        cast = users[0]
        out = cast
        users = _value_users(out)
    if len(users) == 1 and _is(users[0], ops.mul):
        w = _other(users[0], out)
        if isinstance(w, fx.Node) and w.op == "get_attr" and list(tensor_shape(w) or ()) == [d]:
            return cast, users[0], w
    return cast, None, None


def lift_decomposed_norms(rw: Rewriter) -> int:
    """Replace decomposed RMSNorm chains by `aten.rms_norm`; returns how many were lifted."""
    graph, count = rw.graph, 0
    for r in list(graph.nodes):
        if not _is(r, ops.rsqrt) or r.graph is None:
            continue
        found = _match(r)
        if found is None:
            continue
        xf, eps, norm, chain, d = found
        cast, wmul, w = _weight_after(norm, d)
        same = cast is None or tensor_dtype(cast) == tensor_dtype(norm)
        if wmul is not None and same and tensor_dtype(w) == tensor_dtype(norm):
            root, weight = wmul, w
        else:
            root, weight = norm, None
        replaced = chain + [norm] + ([n for n in (cast, wmul) if n is not None] if root is wmul else [])
        moved = rw.moved_read(replaced, root)
        if moved:
            rw.skip(root.name, f"decomposed RMSNorm left as it is: {moved}")
            continue
        new = rw.at(root).call(ops.rms_norm, input=xf, normalized_shape=[d], weight=weight, eps=eps)
        new.meta.update(root.meta)
        for dead in chain + [norm] + ([cast] if cast is not None and root is not norm else []):
            for u in list(dead.users):  # export's metadata checks of values no longer computed
                if _is(u, aten._assert_tensor_metadata.default):
                    rw.erase(u)
        what = "with its weight" if weight is not None else "normalisation only (casts/weight kept)"
        rw.replace(root, new, f"decomposed RMSNorm over {d} (eps={eps:g}) -> aten.rms_norm, {what}")
        count += 1
    if count:
        rw.sweep()
    return count


def _lift(rw: Rewriter) -> None:
    if not lift_decomposed_norms(rw):
        rw.note("model", "no decomposed RMSNorm found")


LIFT_NORMS = Pass("lift_norms", "exact", analysis=_lift,
                  doc="Lift decomposed RMSNorms (pow/mean/add/rsqrt/mul, as exported from transformers) into "
                      "aten.rms_norm (see this module). Run before the norm swaps and the Triton lowering.")
