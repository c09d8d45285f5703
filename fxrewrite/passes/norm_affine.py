"""Move the affine parts of normalisation layers where they cost nothing: into the linears that
read the norm (`fold_norm_affine`), or from a per-channel scale and shift into the norm
(`fold_scale_shift`). Both exact: the same function, up to float rounding; the derived weights
are computed in float64 and cast back, as pure functions of the old tensors.

**fold_norm_affine** (opt-in; RepQ-ViT's re-parameterisation, the step quantisation tool-chains
perform before rotating weights). With n(x) the affine-free LayerNorm / RMSNorm over the last
axis and g, b its weight and bias, every Linear reading the norm computes

    Linear(n(x) * g + b) = n(x) @ (W diag(g))^T + (W b + c)

so W' = W * g (per input column) and c' = c + W b, and the norm keeps no affine (an RMSNorm
has no b). Legal only if every reader of the norm's output is an `aten.linear` taking it as its
input, directly or through ops that leave the last axis alone (slices and selects of other axes,
views keeping the last size, clones): transformers' final norm reaches `lm_head` through such
slices. Otherwise the norm is skipped with the reader that stops it.

The same fold applies when the weight multiplies after a cast, as in transformers' RMSNorm in
bfloat16 / float16 (`weight * n(x.float()).to(bf16)`, which `lift_norms` lifts as an affine-free
norm followed by the cast and the product): Linear(c(n) * g) = c(n) @ (W diag(g))^T with c the
cast, so the product goes, and the linears read the cast. In float32 and float64 the two sides
are equal up to rounding; in a 16-bit dtype each side rounds once at that dtype's precision
(the product c(n) * g there, W' = W * g here, computed in float64).

A linear whose weight is
tied (its storage shared with another tensor of the module, e.g. `lm_head` and the embedding,
or read elsewhere in the graph) now reads a derived copy, which the report notes: that weight is
no longer tied. One rewrite per norm, naming the linears it went into.

**fold_scale_shift** (SSF: a learned per-channel scale and shift after a norm). With constant
gamma, beta that vary only along the normalised axes (shape (C,) or (1, ..., 1, C); for an
eval-mode BatchNorm, along the channel axis 1: (C, 1, 1)):

    norm(x; w, b) * gamma = norm(x; w gamma, b gamma)        (w = 1 when absent)
    norm(x; w, b) + beta  = norm(x; w, b + beta)             (b = 0 when absent)

for LayerNorm and BatchNorm (whose running statistics are untouched). aten.rms_norm has no bias,
so only the scale folds into it; a shift after an RMSNorm stays, with that reason. A constant
that varies along another axis (a per-token scale) is skipped with the axis it varies along.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ..rewrite import ops
from ..rewrite.attrs import fetch_attr, storage_id
from ..rewrite.passmanager import Pass, Rule
from ..rewrite.pattern import Op, Param
from ..rewrite.rewriter import Rewriter
from ..rewrite.shapes import tensor_dtype, tensor_shape

aten = torch.ops.aten
_NORMS = (ops.layer_norm, ops.rms_norm)


# ================================================================ fold_norm_affine: the math

_CHUNK_BYTES = 32 << 20  # of float64 products at a time


def fold_linear_weight(w, g):
    """W' = W * g, g scaling W's input columns: each element computed in float64 and cast back
    to W's dtype, a block of rows at a time, so that folding a vocabulary-sized lm_head (while a
    checkpoint is rewritten, `fxrewrite.checkpoint`) needs the result and one block, not a
    float64 copy of the whole weight (the same values: the product is elementwise)."""
    out = torch.empty_like(w, memory_format=torch.contiguous_format)  # a linear's weight: [out, in]
    g64 = g.double()
    rows = max(1, _CHUNK_BYTES // (8 * max(1, w.shape[1])))
    for i in range(0, w.shape[0], rows):
        out[i:i + rows] = (w[i:i + rows].double() * g64).to(w.dtype)
    return out


def fold_linear_bias(w, b, c):
    """c' = c + W b (computed in float64; the dtype of c, or of W when the linear had no bias)."""
    out = w.double() @ b.double()
    if c is not None:
        out = out + c.double()
    return out.to(c.dtype if c is not None else w.dtype)


# ================================================================ fold_norm_affine: the analysis

def _describe_reader(n: fx.Node) -> str:
    return f"{n.name} ({ops.short_name(n.target) if n.op == 'call_function' else n.op})"


def _last_axis_kept(n: fx.Node, src: fx.Node) -> bool:
    """Whether `n`, reading `src`, only moves, drops or copies whole rows of the last axis (so a
    per-feature affine of `src` is the same per-feature affine of `n`)."""
    if n.op != "call_function" or not isinstance(n.target, torch._ops.OpOverload):
        return False
    if not n.args or n.args[0] is not src or any(a is src for a in n.args[1:]) or \
            any(v is src for v in n.kwargs.values()):
        return False
    shape, out = tensor_shape(src), tensor_shape(n)
    if shape is None or out is None or not shape:
        return False
    rank = len(shape)
    packet = n.target.overloadpacket
    if packet in (aten.slice, aten.select):
        dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
        return isinstance(dim, int) and dim % rank != rank - 1
    if packet in (aten.view, aten.reshape, aten._unsafe_view):  # row-major: the last index is kept
        return len(out) > 0 and isinstance(out[-1], int) and out[-1] == shape[-1]
    return packet in (aten.clone, aten.alias, aten.detach, aten.contiguous)


def _linear_readers(norm: fx.Node) -> tuple[list[tuple[fx.Node, fx.Node]], str | None]:
    """(linear, the value it reads) for every linear fed by `norm`, or the reason some other
    reader stops the fold."""
    linears, others, todo, seen = [], [], [norm], set()
    while todo:
        v = todo.pop(0)
        for u in v.users:
            if u in seen or ops.is_call(u, aten._assert_tensor_metadata.default):
                continue
            seen.add(u)
            if ops.is_call(u, ops.linear) and ops.arg(u, "input") is v and ops.arg(u, "weight") is not v \
                    and ops.arg(u, "bias") is not v:
                linears.append((u, v))
            elif _last_axis_kept(u, v):
                todo.append(u)
            else:
                others.append(u)
    if others:
        also = "also " if linears else ""
        return [], (f"the norm's output is {also}read by {', '.join(_describe_reader(u) for u in others)}: "
                    f"its affine cannot move into the linears")
    if not linears:
        return [], "the norm's output is read by no linear"
    return linears, None


def _tied(gm: fx.GraphModule, storage: dict, reads: dict, wnode: fx.Node, lin: fx.Node) -> list[str]:
    """What else holds or reads the linear's weight: tensors sharing its storage, other readers."""
    target = wnode.target
    t = fetch_attr(gm, target)
    why = [f"shares its storage with {name}" for name in storage.get(storage_id(t), ()) if name != target]
    readers = [u for n in reads.get(target, ()) if n.graph is not None for u in n.users if u is not lin]
    if readers:
        why.append(f"is also read by {', '.join(_describe_reader(u) for u in readers)}")
    return why


def _module_name(target: str) -> str:
    return target[:-len(".weight")] if target.endswith(".weight") else target


def fold_norm_affine(rw: Rewriter) -> None:
    gm = rw.gm
    storage: dict[int, list[str]] = {}
    for name, t in [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]:
        if t.numel():
            storage.setdefault(storage_id(t), []).append(name)
    reads: dict[str, list[fx.Node]] = {}  # get_attr nodes by target, as the graph was
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            reads.setdefault(n.target, []).append(n)
    candidates = 0
    for norm in list(gm.graph.nodes):
        if norm.graph is None or norm.op != "call_function" or norm.target not in _NORMS or not norm.users:
            continue
        g = ops.arg(norm, "weight")
        b = ops.arg(norm, "bias") if norm.target is ops.layer_norm else None
        scaled = None
        if g is None and b is None:
            scaled = _scale_after_cast(norm)
            if scaled is None:
                continue  # affine-free
            g = scaled[2]
        candidates += 1
        _fold_norm(rw, storage, reads, norm, g, b, scaled)
    if not candidates:
        rw.note("model", "no LayerNorm or RMSNorm with an affine weight or bias found")


def _scale_after_cast(norm: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node] | None:
    """(the product, the cast, g) for `g * cast(norm)` (either order) when the affine-free `norm`'s only reader is a
    cast whose only reader multiplies it by a constant `g` of shape (d,), in the cast's dtype."""
    if len(norm.users) != 1:
        return None
    cast = next(iter(norm.users))
    if not (ops.is_call(cast, ops.cast) or ops.is_call(cast, ops.to_dtype)) or cast.args[0] is not norm \
            or len(cast.users) != 1:
        return None
    mul = next(iter(cast.users))
    if not ops.is_call(mul, aten.mul.Tensor) or len(mul.args) != 2 or cast not in mul.args:
        return None
    g = mul.args[1] if mul.args[0] is cast else mul.args[0]
    shape = ops.arg(norm, "normalized_shape")
    if not (isinstance(g, fx.Node) and g.op == "get_attr") or len(shape) != 1:
        return None
    gt = fetch_attr(g.graph.owning_module, g.target)
    if list(gt.shape) != [shape[0]] or tensor_dtype(mul) is None or tensor_dtype(mul) != tensor_dtype(cast):
        return None
    return mul, cast, g


def _fold_norm(rw: Rewriter, storage, reads, norm: fx.Node, g, b, scaled=None) -> None:
    """Fold g (and b) into the linears reading `norm`, or, with `scaled` = (product, cast, g)
    from `_scale_after_cast`, reading the product, which then goes: its readers read the cast."""
    gm, kind = rw.gm, _kind(norm)
    anchor = scaled[0] if scaled else norm  # what the linears read
    reason = _norm_affine_reason(norm, g, b)
    linears = []
    if reason is None:
        linears, reason = _linear_readers(anchor)
    if reason is None:
        reason = _linears_reason(anchor, ops.arg(norm, "normalized_shape")[0], linears, rw)
    if reason is not None:
        rw.skip(norm.name, f"{kind} affine left in place: {reason}")
        return

    if scaled:
        replacement = scaled[1]
    else:
        named = {a: ops.arg(norm, a) for a in ops.arg_names(norm.target)}
        named.update(weight=None, **({"bias": None} if norm.target is ops.layer_norm else {}))
        replacement = rw.at(norm).call(norm.target, **named)
    into, tied = [], []
    for lin, source in linears:
        w, c = ops.arg(lin, "weight"), ops.arg(lin, "bias")
        stem = _module_name(w.target).replace(".", "_")
        rw.at(lin)
        w2 = rw.param(f"{stem}_norm_folded_weight", fold_linear_weight, w, g) if g is not None else w
        c2 = rw.param(f"{stem}_norm_folded_bias", fold_linear_bias, w, b, c) if b is not None else c
        new_lin = rw.call(ops.linear, input=source, weight=w2, bias=c2)
        rw.redirect(lin, new_lin)
        into.append(_module_name(w.target))
        why = _tied(gm, storage, reads, w, lin) if g is not None else []
        if why:
            tied.append((w.target, why))
    rw.redirect(anchor, replacement)
    what = " and ".join(p for p, v in (("weight", g), ("bias", b)) if v is not None)
    if scaled:
        what += f" (applied after a cast, {anchor.name})"
    rw.rewrote(norm.name, f"{kind} {what} folded into {len(into)} linear(s): {', '.join(into)}; "
                          f"the norm keeps no affine")
    for target, why in tied:
        rw.note(norm.name, f"{target} {' and '.join(why)}: the linear now reads a derived copy, "
                           f"so this weight is no longer tied")


def _norm_affine_reason(norm: fx.Node, g, b) -> str | None:
    for what, v in (("weight", g), ("bias", b)):
        if v is not None and not (isinstance(v, fx.Node) and v.op == "get_attr"):
            return f"its {what} is computed ({getattr(v, 'name', v)}), not a constant"
    shape = ops.arg(norm, "normalized_shape")
    if len(shape) != 1:
        return f"it normalises {len(shape)} axes {list(shape)}; a linear contracts only the last"
    return None


def _linears_reason(norm: fx.Node, d: int, linears, rw: Rewriter) -> str | None:
    for lin, _ in linears:
        w, c = ops.arg(lin, "weight"), ops.arg(lin, "bias")
        if not (isinstance(w, fx.Node) and w.op == "get_attr"):
            return f"{lin.name} reads a computed weight ({getattr(w, 'name', w)}), not a constant"
        if c is not None and not (isinstance(c, fx.Node) and c.op == "get_attr"):
            return f"{lin.name} reads a computed bias ({getattr(c, 'name', c)}), not a constant"
        t = rw.value(w)
        if t.dim() != 2 or t.shape[1] != d:
            return f"{lin.name}'s weight has shape {list(t.shape)}, not (out, {d})"
        moved = rw.moved_read([norm], lin)  # the norm's affine is now read where the linear is
        if moved:
            return moved
    return None


FOLD_NORM_AFFINE = Pass(
    "fold_norm_affine", "exact", analysis=fold_norm_affine,
    doc="Fold LayerNorm / RMSNorm weight and bias into every Linear that reads the norm (W' = W g, "
        "c' = c + W b), leaving affine-free norms (RepQ-ViT; before weight rotation). See this module.")


# ================================================================ fold_scale_shift

def _affine_axes(norm: fx.Node, rank: int) -> set[int]:
    """The axes of the norm's output along which its affine varies."""
    if norm.target is ops.batch_norm:
        return {1}
    return set(range(rank - len(ops.arg(norm, "normalized_shape")), rank))


def _affine_shape(norm: fx.Node) -> list[int]:
    if norm.target is ops.batch_norm:
        return [int(fetch_attr(norm.graph.owning_module, ops.arg(norm, "running_mean").target).numel())]
    return list(ops.arg(norm, "normalized_shape"))


def _as_affine(t: torch.Tensor, norm_target, k: int) -> torch.Tensor:
    """A constant that broadcasts along the affine axes only, as a tensor broadcasting against
    the norm's weight: its trailing k axes (the rest are 1), or flattened for a BatchNorm."""
    t = t.double()
    if norm_target is ops.batch_norm:
        return t.reshape(-1)
    return t.reshape(tuple(t.shape)[max(0, t.dim() - k):])


def scale_weight(w, gamma, norm_target, shape):
    """w' = w * gamma (w = 1 when absent), in float64, cast back."""
    g = _as_affine(gamma, norm_target, len(shape))
    base = w.double() if w is not None else torch.ones(shape, dtype=torch.float64, device=g.device)
    return (base * g).expand(shape).to(w.dtype if w is not None else gamma.dtype)


def scale_bias(b, gamma, norm_target, shape):
    """b' = b * gamma."""
    g = _as_affine(gamma, norm_target, len(shape))
    return (b.double() * g).expand(shape).to(b.dtype)


def shift_bias(b, beta, norm_target, shape):
    """b' = b + beta (b = 0 when absent)."""
    s = _as_affine(beta, norm_target, len(shape))
    base = b.double() if b is not None else torch.zeros(shape, dtype=torch.float64, device=s.device)
    return (base + s).expand(shape).to(b.dtype if b is not None else beta.dtype)


def _one_norm_one_const(order: str, norm_first: bool):
    def where(n: fx.Node) -> bool:
        a, b = ops.arg(n, "self"), ops.arg(n, "other")
        norm, const = (a, b) if norm_first else (b, a)
        return (isinstance(norm, fx.Node) and norm.op == "call_function" and norm.target in _SSF_NORMS
                and isinstance(const, fx.Node) and const.op == "get_attr")
    where.__name__ = f"{order}_reads_norm_and_constant"
    return where


_SSF_NORMS = (ops.layer_norm, ops.rms_norm, ops.batch_norm)


def _ssf(op, norm_first: bool) -> Op:
    norm = Op(*_SSF_NORMS, name="norm")
    const = Param("c")
    operands = dict(self=norm, other=const) if norm_first else dict(self=const, other=norm)
    return Op(op, name="op", where=_one_norm_one_const(ops.short_name(op), norm_first), **operands)


def _kind(norm: fx.Node) -> str:
    return {ops.layer_norm: "LayerNorm", ops.rms_norm: "RMSNorm", ops.batch_norm: "BatchNorm"}[norm.target]


def _ssf_reason(op: fx.Node, norm: fx.Node, c: fx.Node, shift: bool) -> str | None:
    if shift and ops.arg(op, "alpha") not in (None, 1):
        return f"the shift is scaled by alpha={ops.arg(op, 'alpha')}"
    if shift and norm.target is ops.rms_norm:
        return "aten.rms_norm has no bias to take a shift"
    if norm.target is ops.batch_norm:
        if ops.arg(norm, "training") is not False:
            return "the BatchNorm uses batch statistics (training=True)"
        for what in ("running_mean", "running_var"):
            v = ops.arg(norm, what)
            if not (isinstance(v, fx.Node) and v.op == "get_attr"):
                return f"the BatchNorm's {what} is not a constant"
    for what in ("weight", "bias") if norm.target is not ops.rms_norm else ("weight",):
        v = ops.arg(norm, what)
        if v is not None and not (isinstance(v, fx.Node) and v.op == "get_attr"):
            return f"the {_kind(norm)}'s {what} is computed ({getattr(v, 'name', v)}), not a constant"
    shape = tensor_shape(norm)
    if shape is None:
        return "the norm's output shape is unknown"
    t = fetch_attr(norm.graph.owning_module, c.target)
    if not isinstance(t, torch.Tensor):
        return f"{c.target} is not a tensor"
    dt = tensor_dtype(norm)
    if t.dtype != dt or tensor_dtype(op) != dt:
        return f"{c.target} is {t.dtype} and the norm's output {dt}: the {'shift' if shift else 'scale'} " \
               f"changes the dtype"
    rank = len(shape)
    if t.dim() > rank:
        return f"{c.target} of shape {list(t.shape)} adds axes to the norm's output of rank {rank}"
    axes = _affine_axes(norm, rank)
    for i, size in enumerate(t.shape):
        axis = rank - t.dim() + i
        if size != 1 and axis not in axes:
            along = "the channel axis 1" if norm.target is ops.batch_norm else \
                f"the normalised axis {rank - 1}" if len(axes) == 1 else f"the normalised axes {sorted(axes)}"
            return (f"{c.target} of shape {list(t.shape)} varies along axis {axis} of the norm's output "
                    f"(rank {rank}), not only along {along}: it cannot become the norm's affine")
    return None


def _scale_check(op, norm, c):
    return _ssf_reason(op, norm, c, shift=False)


def _shift_check(op, norm, c):
    return _ssf_reason(op, norm, c, shift=True)


def _rebuilt(rw: Rewriter, norm: fx.Node, **changes) -> fx.Node:
    named = {a: ops.arg(norm, a) for a in ops.arg_names(norm.target)}
    named.update(changes)
    return rw.call(norm.target, **named)


def fold_scale_into_norm(rw, op, norm, c):
    """norm(x; w, b) * gamma = norm(x; w gamma, b gamma)."""
    t, shape = norm.target, _affine_shape(norm)
    w = ops.arg(norm, "weight")
    changes = {"weight": rw.param(f"{norm.name}_scaled_weight",
                                  lambda w_, g_: scale_weight(w_, g_, t, shape), w, c)}
    if t is not ops.rms_norm:
        b = ops.arg(norm, "bias")
        if b is not None:
            changes["bias"] = rw.param(f"{norm.name}_scaled_bias", lambda b_, g_: scale_bias(b_, g_, t, shape), b, c)
    return _rebuilt(rw, norm, **changes)


def fold_shift_into_norm(rw, op, norm, c):
    """norm(x; w, b) + beta = norm(x; w, b + beta)."""
    t, shape = norm.target, _affine_shape(norm)
    b = ops.arg(norm, "bias")
    return _rebuilt(rw, norm, bias=rw.param(f"{norm.name}_shifted_bias",
                                            lambda b_, s_: shift_bias(b_, s_, t, shape), b, c))


FOLD_SCALE_SHIFT = Pass(
    "fold_scale_shift", "exact",
    rules=[Rule("fold_scale_into_norm", _ssf(ops.mul, True), fold_scale_into_norm, check=_scale_check),
           Rule("fold_scale_into_norm", _ssf(ops.mul, False), fold_scale_into_norm, check=_scale_check),
           Rule("fold_shift_into_norm", _ssf(ops.add, True), fold_shift_into_norm, check=_shift_check),
           Rule("fold_shift_into_norm", _ssf(ops.add, False), fold_shift_into_norm, check=_shift_check)],
    doc="Fold a constant per-channel scale / shift after a LayerNorm, RMSNorm (scale only) or eval "
        "BatchNorm into the norm's weight and bias (SSF). See this module.",
    miss_note="the scale or shift stays after the norm",
)
