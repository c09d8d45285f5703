"""The kernel IR: a fused region as plain data, and the table of operations it may contain.

A region spec is a JSON-serialisable dict, the only thing the runtime, the emitter and the eager
reference read (the FX graph is gone by then):

    {"version": 1,
     "inputs":  [{"dtype": "bfloat16", "channel_view": 0}, ...],   # tensors passed at run time
     "nodes":   [{"op": "add", "args": [["in", 0], ["in", 1]], "attrs": {}, "dtype": "bfloat16"},
                 {"op": "rms_norm", "args": [["v", 0], ["in", 2]], "attrs": {"eps": 1e-6,
                  "reduce_ndim": 1}, "dtype": "bfloat16"},
                 {"op": "silu", "args": [["v", 1]], "attrs": {}, "dtype": "bfloat16"}],
     "outputs": [0, 2],          # node indices whose values leave the region
     "norm": 1}                  # the one row-wise norm of the region

A region grown from a gated product instead of a norm (a GLU: `silu(gate) * up`, `gelu(gate) *
up`) has no norm and names its seed instead: `"norm": null, "glu": j`, node j a `mul` one of
whose arguments is the value of a `silu` or `gelu` node. Such a region has no row statistics:
its kernel is one elementwise pass over rows of the domain's last dim. Norm specs have no "glu"
key, so their text, hash and kernels are what they were.

An argument is `["in", i]` (run-time input i), `["v", j]` (the value of node j, j < this node),
`["lit", x]` (a Python number) or `null` (an absent optional tensor). All values have the
region's *domain* shape (the norm input's shape; a GLU region's: its product's) or broadcast to
it; `channel_view = k > 0` marks a per-channel BatchNorm vector that is viewed as `(C, 1, ..., 1)`
(k ones) before broadcasting.

Every operation is one `OpDef` in `OPS`: its eager meaning (the ATen call the FX graph made, or
for a `rewrite.nn` module the function its forward calls; used by `reference` as the CPU
fallback and test oracle) and its Triton expression (text, used by `emit`). The kernel templates
never name an operation: adding an elementwise op is one entry here and no kernel code. Norms
carry the row statistics they need (`stats`) and an expression that applies them.

The structural hash of a spec (`spec_hash`) keys the kernel cache: two regions with the same
ops, dtypes and literals share a kernel whatever their tensors' names or sizes.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..rewrite.nn import dyt, eln, partial_rms_norm, smelu

aten = torch.ops.aten

VERSION = 1

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
          "float64": torch.float64}
TL_DTYPES = {"float16": "tl.float16", "bfloat16": "tl.bfloat16", "float32": "tl.float32",
             "float64": "tl.float64"}


def with_channel_view(t: torch.Tensor, channel_view: int) -> torch.Tensor:
    """`t` with its `channel_view` trailing unit dims (a per-channel input seen as (C, 1, 1))."""
    return t.reshape(tuple(t.shape) + (1,) * channel_view) if channel_view else t


def dtype_name(dtype: torch.dtype) -> str:
    """The spec's name of a torch dtype: torch.bfloat16 -> "bfloat16"."""
    return str(dtype).replace("torch.", "")


@dataclass(frozen=True)
class OpDef:
    """One operation of the IR.

    eager(args, attrs) -> Tensor: the exact eager computation (ATen, as the graph had it, or
        the `rewrite.nn` function a module's forward calls).
    triton(args, attrs, target) -> str: a Triton expression over argument expressions (strings
        of compute-dtype values); `target` is "cuda" or "interpreter" (the interpreter lacks
        libdevice, so a few special functions have a portable spelling there).
    stats: for norms, the row statistics the template must reduce before `triton` is applied:
        "mean_rstd" (LayerNorm), "rms_rstd" (RMSNorm) or "prms_rstd" (pRMSNorm: the mean
        square of the first attrs["k"] columns); "" for elementwise ops.
    """

    name: str
    eager: Callable
    triton: Callable
    stats: str = ""
    is_norm: bool = False


def _lit(v) -> str:
    v = float(v)
    if not math.isfinite(v):
        raise ValueError(f"non-finite literal {v} cannot be emitted")
    return repr(v)


def arg_expr(a) -> str | None:
    """The Triton expression for a node argument of a spec: input i is `a{i}`, node j's value
    `v{j}`, a literal its float; None stays None (an absent weight or bias)."""
    if a is None:
        return None
    kind, v = a
    return {"in": f"a{v}", "v": f"v{v}"}.get(kind) or repr(float(v))


def tanh_expr(x: str, target: str) -> str:
    """tanh: libdevice on GPU; in the interpreter (no libdevice) sign(x)(1 - e)/(1 + e) with
    e = exp(-2|x|), accurate to a few ulps of 1 in absolute terms."""
    if target == "cuda":
        return f"libdevice.tanh({x})"
    return f"_tanh_portable({x})"


def _sigmoid(x):
    return f"(1.0 / (1.0 + tl.exp(-({x}))))"


def _gelu(a, attrs, target):
    x = a[0]
    if attrs.get("approximate", "none") == "tanh":
        inner = f"0.7978845608028654 * ({x} + 0.044715 * {x} * {x} * {x})"
        return f"(0.5 * {x} * (1.0 + {tanh_expr(inner, target)}))"
    return f"(0.5 * {x} * (1.0 + tl.erf({x} * 0.7071067811865476)))"


def _alpha(attrs):
    return attrs.get("alpha", 1)


def _add_expr(a, attrs, target):
    al = _alpha(attrs)
    return f"({a[0]} + {a[1]})" if al == 1 else f"({a[0]} + {_lit(al)} * {a[1]})"


def _sub_expr(a, attrs, target):
    al = _alpha(attrs)
    return f"({a[0]} - {a[1]})" if al == 1 else f"({a[0]} - {_lit(al)} * {a[1]})"


def _smelu_eager(args, attrs):
    return smelu(*args)


def _smelu_expr(a, attrs, target):
    x, b = a
    return (f"tl.where({x} >= {b}, {x}, tl.where({x} <= -{b}, 0.0, "
            f"({x} + {b}) * ({x} + {b}) / (4.0 * {b})))")


def _cast_eager(args, attrs):
    return args[0].to(DTYPES[attrs["dtype"]])


def _dyt_eager(args, attrs):
    return dyt(*args)


def _dyt_expr(a, attrs, target):
    x, alpha, w, b = a
    y = f"{tanh_expr(f'{alpha} * {x}', target)} * {w}"
    return f"({y} + {b})" if b is not None else f"({y})"


def _eln_eager(args, attrs):
    return eln(*args, attrs["channels"])


def _eln_expr(a, attrs, target):
    x, beta, w, b = a
    y = f"{x} * (1.0 / tl.sqrt({beta} + {x} * {x})) * ({_lit(math.sqrt(attrs['channels'] - 1))} * {w})"
    return f"({y} + {b})" if b is not None else f"({y})"


def _layer_norm_eager(args, attrs):
    x, w, b = args
    return aten.layer_norm.default(x, list(x.shape[x.dim() - attrs["reduce_ndim"]:]), w, b, attrs["eps"])


def _affine_expr(y: str, w: str | None, b: str | None) -> str:
    """`(y * w + b)`, leaving out an absent weight or bias: the optional affine step that
    LayerNorm and BatchNorm share."""
    if w is not None:
        y = f"{y} * {w}"
    if b is not None:
        y = f"{y} + {b}"
    return f"({y})"


def _layer_norm_expr(a, attrs, target):
    x, w, b = a
    return _affine_expr(f"({x} - mean) * rstd", w, b)


def _rms_norm_eager(args, attrs):
    x, w = args
    return aten.rms_norm.default(x, list(x.shape[x.dim() - attrs["reduce_ndim"]:]), w, attrs["eps_arg"])


def _rms_norm_expr(a, attrs, target):
    x, w = a
    return f"({x} * rstd * {w})" if w is not None else f"({x} * rstd)"


def _prms_norm_eager(args, attrs):
    x, w = args
    return partial_rms_norm(x, attrs["k"], w, attrs["eps_arg"])


def _batch_norm_eager(args, attrs):
    x, w, b, mean, var = args
    return aten.batch_norm.default(x, w, b, mean, var, False, 0.0, attrs["eps"], True)


def _batch_norm_expr(a, attrs, target):
    x, w, b, mean, var = a
    return _affine_expr(f"({x} - {mean}) * (1.0 / tl.sqrt({var} + {_lit(attrs['eps'])}))", w, b)


def _unary(eager_op, expr):
    return dict(eager=lambda args, attrs: eager_op(args[0]), triton=lambda a, attrs, t: expr(a[0], t))


_TABLE = [
    # elementwise, binary
    OpDef("add", lambda a, at: aten.add.Tensor(a[0], a[1], alpha=at.get("alpha", 1)), _add_expr),
    OpDef("sub", lambda a, at: aten.sub.Tensor(a[0], a[1], alpha=at.get("alpha", 1)), _sub_expr),
    OpDef("mul", lambda a, at: aten.mul.Tensor(a[0], a[1]), lambda a, at, t: f"({a[0]} * {a[1]})"),
    OpDef("div", lambda a, at: aten.div.Tensor(a[0], a[1]), lambda a, at, t: f"({a[0]} / {a[1]})"),
    # elementwise, unary
    OpDef("identity", lambda a, at: a[0], lambda a, at, t: a[0]),
    OpDef("cast", _cast_eager, lambda a, at, t: a[0]),  # the rounding to at["dtype"] is the node's own
    OpDef("relu", **_unary(aten.relu.default, lambda x, t: f"tl.where({x} < 0.0, 0.0, {x})")),
    OpDef("silu", **_unary(aten.silu.default, lambda x, t: f"({x} * {_sigmoid(x)})")),
    OpDef("sigmoid", **_unary(aten.sigmoid.default, lambda x, t: _sigmoid(x))),
    OpDef("tanh", **_unary(aten.tanh.default, lambda x, t: tanh_expr(x, t))),
    OpDef("hardsigmoid", **_unary(aten.hardsigmoid.default,
                                  lambda x, t: f"tl.minimum(tl.maximum({x} / 6.0 + 0.5, 0.0), 1.0)")),
    OpDef("hardswish", **_unary(aten.hardswish.default,
                                lambda x, t: f"({x} * tl.minimum(tl.maximum({x} + 3.0, 0.0), 6.0) / 6.0)")),
    OpDef("hardtanh", lambda a, at: aten.hardtanh.default(a[0], at["min"], at["max"]),
          lambda a, at, t: f"tl.minimum(tl.maximum({a[0]}, {_lit(at['min'])}), {_lit(at['max'])})"),
    OpDef("gelu", lambda a, at: aten.gelu.default(a[0], approximate=at.get("approximate", "none")), _gelu),
    OpDef("smelu", _smelu_eager, _smelu_expr),
    # norms (one per region)
    OpDef("layer_norm", _layer_norm_eager, _layer_norm_expr, stats="mean_rstd", is_norm=True),
    OpDef("rms_norm", _rms_norm_eager, _rms_norm_expr, stats="rms_rstd", is_norm=True),
    # pRMSNorm: the mean square of the first attrs["k"] columns only (`emit` masks the statistic)
    OpDef("prms_norm", _prms_norm_eager, _rms_norm_expr, stats="prms_rstd", is_norm=True),
    OpDef("dyt", _dyt_eager, _dyt_expr, is_norm=True),
    OpDef("eln", _eln_eager, _eln_expr, is_norm=True),
    OpDef("batch_norm", _batch_norm_eager, _batch_norm_expr, is_norm=True),
]
OPS: dict[str, OpDef] = {o.name: o for o in _TABLE}


@dataclass
class SpecBuilder:
    """Builds a spec node by node (used by `regions`); inputs are deduplicated by key."""

    inputs: list[dict] = field(default_factory=list)
    nodes: list[dict] = field(default_factory=list)
    _input_keys: dict = field(default_factory=dict)

    def input(self, key, dtype: torch.dtype, channel_view: int = 0) -> list:
        k = (key, channel_view)
        if k not in self._input_keys:
            self._input_keys[k] = len(self.inputs)
            self.inputs.append({"dtype": dtype_name(dtype), "channel_view": channel_view})
        return ["in", self._input_keys[k]]

    def node(self, op: str, args: list, attrs: dict, dtype: torch.dtype) -> list:
        if op not in OPS:
            raise KeyError(f"no IR op {op!r}")
        self.nodes.append({"op": op, "args": args, "attrs": attrs, "dtype": dtype_name(dtype)})
        return ["v", len(self.nodes) - 1]

    def input_keys(self) -> list:
        return [k for k, _ in sorted(self._input_keys.items(), key=lambda kv: kv[1])]

    def build(self, outputs: list[int], norm: int | None, glu: int | None = None) -> dict:
        """The spec; `norm` the norm node's index, or None and `glu` the gated product's."""
        spec = {"version": VERSION, "inputs": self.inputs, "nodes": self.nodes, "outputs": outputs, "norm": norm}
        if glu is not None:
            spec["glu"] = glu
        return spec


def dumps(spec: dict) -> str:
    """Canonical text of a spec (sorted keys, no spaces): the op's string argument."""
    return json.dumps(spec, sort_keys=True, separators=(",", ":"))


_PARSED: dict[str, dict] = {}


def loads(text: str) -> dict:
    spec = _PARSED.get(text)
    if spec is None:
        spec = json.loads(text)
        validate(spec)
        _PARSED[text] = spec
    return spec


def validate(spec: dict):
    """Reject malformed specs with a clear message (specs can come from saved graphs)."""
    if spec.get("version") != VERSION:
        raise ValueError(f"region spec version {spec.get('version')!r}, this library reads {VERSION}")
    n_in = len(spec["inputs"])
    for j, node in enumerate(spec["nodes"]):
        if node["op"] not in OPS:
            raise ValueError(f"region spec node {j}: unknown op {node['op']!r}")
        if node["dtype"] not in DTYPES:
            raise ValueError(f"region spec node {j}: unsupported dtype {node['dtype']!r}")
        for a in node["args"]:
            if a is None:
                continue
            kind, v = a
            if kind == "in" and not 0 <= v < n_in or kind == "v" and not 0 <= v < j or kind not in ("in", "v", "lit"):
                raise ValueError(f"region spec node {j}: bad argument {a!r}")
    norm = spec["norm"]
    if norm is None:
        _validate_glu(spec)
    elif "glu" in spec or not (0 <= norm < len(spec["nodes"]) and OPS[spec["nodes"][norm]["op"]].is_norm):
        raise ValueError("region spec: 'norm' must name a norm node (and a norm region has no 'glu')")
    if not spec["outputs"] or any(not 0 <= o < len(spec["nodes"]) for o in spec["outputs"]):
        raise ValueError("region spec: bad outputs")


GLU_ACTS = ("silu", "gelu")  # the activations of a gated product that seeds a region


def _validate_glu(spec: dict):
    """A region without a norm must name its gated product: a mul of an activation's value."""
    nodes, j = spec["nodes"], spec.get("glu")
    if any(OPS[n["op"]].is_norm for n in nodes):
        raise ValueError("region spec: a norm node in a region without a 'norm'")
    if not (isinstance(j, int) and 0 <= j < len(nodes) and nodes[j]["op"] == "mul"):
        raise ValueError("region spec: without a 'norm', 'glu' must name the gated product (a mul node)")
    acts = [a for a in nodes[j]["args"] if a is not None and a[0] == "v" and nodes[a[1]]["op"] in GLU_ACTS]
    if not acts:
        raise ValueError(f"region spec: the gated product's arguments include no {' or '.join(GLU_ACTS)} value")


def spec_hash(text: str, extra: str = "") -> str:
    return hashlib.sha256((text + "|" + extra).encode()).hexdigest()[:16]


def region_name(spec: dict) -> str:
    """A readable kernel stem from the ops: add_rms_norm_silu. Identities and casts are omitted."""
    parts = [n["op"] for n in spec["nodes"] if n["op"] not in ("identity", "cast")]
    name = "_".join(parts)
    return name[:60].rstrip("_") or "region"


def region_kind(spec: dict) -> str:
    """What a region is built around: its norm's op ("rms_norm", "dyt", ...) or "glu" (a gated
    product with no norm), the first word of its report line."""
    return "glu" if spec["norm"] is None else spec["nodes"][spec["norm"]]["op"]


def reduce_ndim(spec: dict) -> int:
    """How many trailing dims the norm reduces over (0 for DyT and BatchNorm: no reduction).

    The runtime reads it as how many trailing dims make a row of the launch: with 0 it may fold
    leading dims into the columns. A GLU region reduces nothing but answers 1: one row per
    last-dim vector (a GLU's inputs are often all whole rows, which would fold into a single
    row, so a single program; kept as rows the launch grid spans them)."""
    if spec["norm"] is None:
        return 1
    node = spec["nodes"][spec["norm"]]
    return node["attrs"].get("reduce_ndim", 0) if OPS[node["op"]].stats else 0


def compute_dtype(spec: dict, input_dtypes) -> str:
    """float64 if anything in the region is float64, else float32."""
    names = set(input_dtypes) | {n["dtype"] for n in spec["nodes"]}
    return "float64" if "float64" in names else "float32"
