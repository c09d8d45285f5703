"""Generated Triton backward kernels for norm regions: one kernel per region, reverse mode per row.

    grads_in = run_backward(spec_text, inputs, grads_out, needs)   # None: use the eager recomputation

The domain is seen as `M` rows of `N` elements, N the product of the norm's reduced trailing dims
(the last dim for DyT, which reduces nothing). Each program walks a strided set of row blocks
(`ROWS` rows of `BLOCK_N >= N` columns, a row in registers; for wider rows see "tiled" below)
and for each:

  1. recomputes the forward in the compute dtype (float32; float64 for float64 regions) with the
     forward kernel's per-node rounding and its row statistics (the same expressions, `ir.OPS`);
  2. seeds the adjoints of the output nodes with the output gradients (one or two outputs; an
     absent gradient is zero) and runs reverse mode over the nodes, last to first, with the
     derivative rule of each op (`RULES`, keyed by op name, below): only the nodes on a path from
     an input that needs a gradient to an output that has one are differentiated;
  3. writes each input's gradient by its broadcast class:

        full    (varies along rows and columns): written directly, one [ROWS, BLOCK_N] store
        col     (per-column vector, a norm weight/bias): summed over the program's rows into a
                [BLOCK_N] register accumulator, stored once per program into a (P, N) buffer
        row     (per-row scalar): summed over the columns, one value per row
        scalar  (DyT's alpha, SmeLU's beta): summed into the accumulator, one value per program

     and the host sums the (P, N) / (P,) partials with one `.sum(0)` (as Liger-Kernel does): no
     (M, N) temporary for a broadcast input. P is the number of programs along the rows: one
     per row block when nothing is reduced over rows, else about 32 resident warps' worth per
     multiprocessor (a tiled launch has that many per column block, and P x column blocks
     scalar partials; whether that count suits a GPU is not measured).
     Two full inputs with the same gradient (a residual add's operands) share one tensor,
     written once, as eager autograd returns one tensor for both.

A full input that is broadcast along some leading dim (a residual of shape (1, T, N) added to
(B, T, N)) is read through a materialised copy and its gradient written whole in the compute
dtype, then summed over the broadcast dims on the host (the rare case: one (M, N) temporary).

The norms' row reductions (x_hat the normalised row, g = dy * w the gradient at x_hat; means over
the N columns of the row, masked lanes excluded):

    RMSNorm    y = x * rstd * w          dx = rstd * (g - x_hat * mean(g * x_hat)),  dw += dy * x_hat
    pRMSNorm   as RMSNorm, rstd from the first k columns: dx = rstd * (g - [j < k] x_hat * sum(g * x_hat) / k)
    LayerNorm  y = (x - mean) * rstd * w + b
               dx = rstd * (g - mean(g) - x_hat * mean(g * x_hat)),  dw += dy * x_hat,  db += dy
    DyT        y = tanh(alpha * x) * w + b
               du = dy * w * (1 - t^2),  dx = du * alpha,  dalpha += du * x,  dw += dy * t,  db += dy
    ELN        y = c * x * s * w + b,  s = (beta + x^2)^-1/2,  c = sqrt(C - 1)
               du = dy * c * w,  dx = du * beta * s^3,  dbeta += -du * x * s^3 / 2,  dw += dy * c * x * s
    BatchNorm  y = (x - mean) * s * w + b,  s = (var + eps)^-1/2  (inference; all but x per channel)
               dx = dy * w * s,  dw += dy * (x - mean) * s,  db += dy,  dmean += -dy * w * s,
               dvar += -dy * w * (x - mean) * s^3 / 2
    (a per-channel vector (C,) is seen as (C, 1, ..., 1), a per-row input of the (N * C * ..., W)
    rows, its gradient summed over the columns in the kernel and over the batch on the host)

A GLU region (`silu(gate) * up`, `gelu(gate) * up`; no norm) is the same kernel without the row
statistics: the elementwise rules alone, gate's and up's gradients written per element (or
reduced per column when `up` broadcasts).

Elementwise rules follow ATen's backward formulas (the same boundaries for relu, hardtanh,
hardsigmoid, hardswish; gelu's erf and tanh forms). Adjoints stay in the compute dtype (eager
rounds each op's gradient to the op's dtype: a bfloat16 region's gradients match eager's to
bfloat16 rounding, not bitwise, and are as close or closer to float64 gradients than eager's).
LayerNorm's two backward row means are one `tl.reduce` over a pair (one round through shared
memory): on an H200 that moved LayerNorm's backward from 2.14 to 2.40 TB/s at M = 32768, N = 4096.

Rows wider than one block (N > 8192 in float32, 4096 in float64) are split into column chunks
of 4096 (2048):

  tiled   a region without row statistics (a GLU: LLaMA's intermediate sizes are 11008-28672;
          DyT, ELN): a second grid axis takes the chunks, each program one chunk of its rows; a
          scalar input's partial sums are kept per program and chunk.
  looped  a region with row statistics (RMSNorm, pRMSNorm, LayerNorm: wide models' hidden sizes,
          8192-16384 and more): each program walks its rows' chunks three times, as the looped
          forward kernel does for the statistics (`emit.chunked_statistics`), then for the
          norm's backward row means (the reverse pass down to the norm), then for the whole
          reverse pass and the stores. A per-column gradient's partial sums live in the
          program's row of the zeroed (P, N) buffer, added to chunk by chunk (a barrier after
          each store: the next row block's load of those columns may be another thread's); a
          per-row one is summed over the chunks. One row per block on 8 warps (`WIDE_CONFIG`).
          Three reads of the inputs where a row in registers takes one: its GPU speed is not
          measured.

Not supported (`run_backward` returns None, the caller falls back to autograd of the eager
reference): an op without a rule (every op of `ir.OPS` has one today), a per-row input's
gradient in a tiled region (a BatchNorm over a spatial size wider than 8192), empty domains, and calls that autograd must see through (a tensor subclass such as a fake or
functional tensor, a dispatch mode, torch.compile tracing, a double backward: gradients that
require grad).

Kernels are cached as the forward's are (`kernel_cache`): the source is a function of the spec
text and the launch specialisation (`BwdLaunch`). This module does not import `runtime` (runtime calls it), nor triton
(the generated modules do).
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass

import torch

from .emit import chunked_statistics, needed_for, row_statistics
from .kernel_cache import CACHE_SIZE, LRU, KernelCache
from .ir import (DTYPES, OPS, TL_DTYPES, arg_expr, compute_dtype, dtype_name, loads, reduce_ndim, region_name,
                 spec_hash, tanh_expr, with_channel_view)

TEMPLATE_VERSION = "1"
MAX_SINGLE = {"float32": 8192, "float64": 4096}  # widest row one program holds in registers
WARPS_PER_SM = 32  # CUDA: resident warps aimed at per multiprocessor when gradients are reduced over rows
# (ROWS, num_warps) for rows wider than a block (looped and tiled kernels). Not timed (no GPU
# yet); chosen by what ptxas makes of it for sm_90 (`bench/kernel_registers.py`, bfloat16,
# N = 16384): 1 row on 8 warps spills nothing on add+RMSNorm, RMSNorm+SiLU, LayerNorm+GELU and
# DyT+SmeLU, where the single-pass kernels' 2 rows on 4 warps spills 968 bytes on LayerNorm+GELU
# and 5320 on DyT+SmeLU.
WIDE_CONFIG = (1, 8)


# ---------------------------------------------------------------- derivative rules
#
# A rule gets the expressions of its node's arguments (`a`, None for an absent optional tensor),
# the node's attrs, the name of the node's value `v`, of its adjoint `d`, a prefix `t` for its own
# temporaries and the target; it returns (lines to write first, {argument index: contribution to
# that argument's adjoint}[, a norm's row means]). The generator writes only the contributions
# that are needed: the lines of an unneeded one are dead code (the compiler drops them).

def _lit(v) -> str:
    v = float(v)
    if not math.isfinite(v):
        raise ValueError(f"non-finite literal {v} cannot be emitted")
    return repr(v)


def _add(a, at, v, d, t, target):
    al = at.get("alpha", 1)
    return [], {0: d, 1: d if al == 1 else f"{_lit(al)} * {d}"}


def _sub(a, at, v, d, t, target):
    al = at.get("alpha", 1)
    return [], {0: d, 1: f"-{d}" if al == 1 else f"{_lit(-al)} * {d}"}


def _mul(a, at, v, d, t, target):
    return [], {0: f"{d} * {a[1]}", 1: f"{d} * {a[0]}"}


def _div(a, at, v, d, t, target):
    # ATen: grad / other, -grad * self / (other * other)
    return [], {0: f"{d} / {a[1]}", 1: f"-{d} * {a[0]} / ({a[1]} * {a[1]})"}


def _pass(a, at, v, d, t, target):  # identity, cast: the gradient passes (eager rounds it to the input's dtype)
    return [], {0: d}


def _relu(a, at, v, d, t, target):  # threshold_backward on the result
    return [], {0: f"tl.where({v} <= 0.0, 0.0, {d})"}


def _sigmoid(x):
    return f"(1.0 / (1.0 + tl.exp(-({x}))))"


def _silu(a, at, v, d, t, target):
    x = a[0]
    return [f"{t}s = {_sigmoid(x)}"], {0: f"{d} * {t}s * (1.0 + {x} * (1.0 - {t}s))"}


def _sigmoid_rule(a, at, v, d, t, target):  # on the (rounded) result, as ATen
    return [], {0: f"{d} * (1.0 - {v}) * {v}"}


def _tanh(a, at, v, d, t, target):
    return [], {0: f"{d} * (1.0 - {v} * {v})"}


def _gelu(a, at, v, d, t, target):
    x = a[0]
    if at.get("approximate", "none") == "tanh":
        beta, kappa = "0.7978845608028654", "0.044715"
        inner = f"{beta} * ({x} + {kappa} * {x} * {x} * {x})"
        return ([f"{t}th = {tanh_expr(inner, target)}"],
                {0: f"{d} * (0.5 * (1.0 + {t}th) + 0.5 * {x} * (1.0 - {t}th * {t}th)"
                    f" * {beta} * (1.0 + 3.0 * {kappa} * {x} * {x}))"})
    cdf = f"0.5 * (1.0 + tl.erf({x} * 0.7071067811865476))"
    pdf = f"0.3989422804014327 * tl.exp(-0.5 * {x} * {x})"
    return [], {0: f"{d} * ({cdf} + {x} * {pdf})"}


def _hardtanh(a, at, v, d, t, target):
    x = a[0]
    return [], {0: f"tl.where(({x} <= {_lit(at['min'])}) | ({x} >= {_lit(at['max'])}), 0.0, {d})"}


def _hardsigmoid(a, at, v, d, t, target):
    x = a[0]
    return [], {0: f"tl.where(({x} > -3.0) & ({x} < 3.0), {d} / 6.0, 0.0)"}


def _hardswish(a, at, v, d, t, target):
    x = a[0]
    return [], {0: f"tl.where({x} < -3.0, 0.0, tl.where({x} <= 3.0, {d} * ({x} / 3.0 + 0.5), {d}))"}


def _smelu(a, at, v, d, t, target):
    # y = x (x >= b), 0 (x <= -b), (x + b)^2 / (4b) between: dy/dx = (x + b) / (2b),
    # dy/db = (x + b) / (2b) - (x + b)^2 / (4b^2) between, 0 elsewhere
    x, b = a
    lines = [f"{t}mid = ({x} < {b}) & ({x} > -{b})", f"{t}q = ({x} + {b}) / (2.0 * {b})"]
    return lines, {0: f"tl.where({x} >= {b}, {d}, tl.where({t}mid, {d} * {t}q, 0.0))",
                   1: f"tl.where({t}mid, {d} * ({t}q - {t}q * {t}q), 0.0)"}


# The norms' rules also return their row means, [(name, expression, count)]: each name is the
# sum of its expression over the row's N columns divided by count (N, or pRMSNorm's k), known
# before the contributions are computed. Where a
# row fits in a block the generator reduces in registers (`_mean_lines`); wider rows accumulate
# the means over column chunks in a pass of their own (see `_Source.body_looped`).

def _rms_norm(a, at, v, d, t, target):
    x, w = a
    g = f"{d} * {w}" if w is not None else d
    lines = [f"{t}xh = {x} * rstd", f"{t}g = {g}"]
    return lines, {0: f"rstd * ({t}g - {t}xh * {t}c)", 1: f"{d} * {t}xh"}, [(f"{t}c", f"{t}g * {t}xh", "N")]


def _prms_norm(a, at, v, d, t, target):
    # rstd reads the first k columns only: every column's output depends on it, so the row's
    # sum of g * x_hat (over all N) divided by k reaches the first k columns' gradients alone
    x, w = a
    g = f"{d} * {w}" if w is not None else d
    k = int(at["k"])
    lines = [f"{t}xh = {x} * rstd", f"{t}g = {g}"]
    return (lines, {0: f"rstd * ({t}g - tl.where((cols < {k})[None, :], {t}xh, 0.0) * {t}c)", 1: f"{d} * {t}xh"},
            [(f"{t}c", f"{t}g * {t}xh", str(k))])


def _layer_norm(a, at, v, d, t, target):
    x, w, b = a
    g = f"{d} * {w}" if w is not None else d
    lines = [f"{t}xh = ({x} - mean) * rstd", f"{t}g = {g}"]
    return (lines, {0: f"rstd * ({t}g - {t}c1 - {t}xh * {t}c2)", 1: f"{d} * {t}xh", 2: d},
            [(f"{t}c1", f"{t}g", "N"), (f"{t}c2", f"{t}g * {t}xh", "N")])


def _mean_lines(means) -> list[str]:
    """Row means of [ROWS, BLOCK_N] expressions (masked lanes excluded), reduced in registers;
    two means in one reduction (one round through shared memory, not two)."""
    if len(means) == 1:
        (name, e, count), = means
        return [f"{name} = (tl.sum(tl.where(mask, {e}, 0.0), axis=1) / {count})[:, None]"]
    (n1, e1, c1), (n2, e2, c2) = means
    return [f"{n1}, {n2} = tl.reduce((tl.where(mask, {e1}, 0.0), tl.where(mask, {e2}, 0.0)), 1, _sum2)",
            f"{n1} = ({n1} / {c1})[:, None]", f"{n2} = ({n2} / {c2})[:, None]"]


def _eln(a, at, v, d, t, target):
    # y = c x s w + b with s = (beta + x^2)^-1/2, c = sqrt(C - 1): dy/dx = c w beta s^3,
    # dy/dbeta = -c w x s^3 / 2
    x, beta, w, b = a
    c = _lit(math.sqrt(at["channels"] - 1))
    lines = [f"{t}s = 1.0 / tl.sqrt({beta} + {x} * {x})", f"{t}s3 = {t}s * {t}s * {t}s",
             f"{t}du = {d} * ({c} * {w if w is not None else '1.0'})"]
    return lines, {0: f"{t}du * {beta} * {t}s3", 1: f"-0.5 * {t}du * {x} * {t}s3", 2: f"{d} * {x} * {t}s * {c}", 3: d}


def _batch_norm(a, at, v, d, t, target):
    # inference BatchNorm: y = (x - mean) * s * w + b, s = (var + eps)^-1/2, all but x per channel
    x, w, b, mean, var = a
    lines = [f"{t}s = 1.0 / tl.sqrt({var} + {_lit(at['eps'])})", f"{t}ws = {t}s * {w}" if w is not None else f"{t}ws = {t}s",
             f"{t}xc = {x} - {mean}"]
    return lines, {0: f"{d} * {t}ws", 1: f"{d} * {t}xc * {t}s", 2: d, 3: f"-{d} * {t}ws",
                   4: f"-0.5 * {d} * {t}ws * {t}xc * {t}s * {t}s"}


def _dyt(a, at, v, d, t, target):
    x, alpha, w, b = a
    lines = [f"{t}t = {tanh_expr(f'{alpha} * {x}', target)}",
             f"{t}du = {d} * {w if w is not None else '1.0'} * (1.0 - {t}t * {t}t)"]
    return lines, {0: f"{t}du * {alpha}", 1: f"{t}du * {x}", 2: f"{d} * {t}t", 3: d}


RULES = {
    "add": _add, "sub": _sub, "mul": _mul, "div": _div, "identity": _pass, "cast": _pass,
    "relu": _relu, "silu": _silu, "sigmoid": _sigmoid_rule, "tanh": _tanh, "gelu": _gelu,
    "hardtanh": _hardtanh, "hardsigmoid": _hardsigmoid, "hardswish": _hardswish, "smelu": _smelu,
    "rms_norm": _rms_norm, "prms_norm": _prms_norm, "layer_norm": _layer_norm, "dyt": _dyt, "eln": _eln,
    "batch_norm": _batch_norm,
}


def unsupported(spec: dict) -> str | None:
    """Why this region has no generated backward (None: it has one)."""
    for n in spec["nodes"]:
        if n["op"] not in RULES:
            return f"no derivative rule for {n['op']!r}"
    return None


# ---------------------------------------------------------------- which nodes are differentiated

def _args(node):
    return [a for a in node["args"] if a is not None]


def active_nodes(spec: dict, needs, seeded_outputs) -> tuple[set[int], list[bool]]:
    """(nodes to differentiate, per input: whether its gradient is computed): the nodes that
    depend on an input with `needs` and feed an output in `seeded_outputs` (node indices)."""
    nodes = spec["nodes"]
    reach = set()
    for j, n in enumerate(nodes):
        if any(k == "in" and needs[v] or k == "v" and v in reach for k, v in _args(n)):
            reach.add(j)
    live = set()
    for j in range(len(nodes) - 1, -1, -1):
        if j in seeded_outputs or any(j == v for m in live for k, v in _args(nodes[m]) if k == "v"):
            live.add(j)
    active = reach & live
    wanted = [False] * len(spec["inputs"])
    for j in active:
        for k, v in _args(nodes[j]):
            if k == "in" and needs[v]:
                wanted[v] = True
    return active, wanted


# ---------------------------------------------------------------- the kernel source

@dataclass(frozen=True)
class BwdLaunch:
    """What the source depends on besides the spec."""

    classes: tuple        # per input: "full", "col", "row" or "scalar"
    input_dtypes: tuple   # per input: dtype name
    grad_dtypes: tuple    # per output: the gradient's dtype name, None when absent
    wanted: tuple         # per input: its gradient is computed
    out_dtypes: tuple     # per input: the dtype its gradient is written in (None when not wanted)
    target: str           # "cuda" or "interpreter"
    alias: tuple = ()     # per input: the earlier input whose gradient it shares (not written), or None
    tiled: bool = False   # columns split over a second grid axis (rows wider than a block, no row statistics)
    looped: bool = False  # each program loops over column chunks (rows wider than a block, row statistics)

    def __post_init__(self):
        if not self.alias:
            object.__setattr__(self, "alias", (None,) * len(self.classes))

    def key(self) -> str:
        return (f"bwd{TEMPLATE_VERSION}|{self.classes}|{self.input_dtypes}|{self.grad_dtypes}|{self.wanted}|"
                f"{self.out_dtypes}|{self.target}|{self.alias}" + ("|tiled" if self.tiled else "") + ("|looped" if self.looped else ""))


def kernel_name(spec: dict) -> str:
    return f"_{region_name(spec)}_bwd_kernel"


def generate(spec: dict, launch: BwdLaunch) -> str:
    """The Python/Triton source of the region's backward kernel."""
    return _Source(spec, launch).text()


class _Source:
    def __init__(self, spec: dict, launch: BwdLaunch):
        self.spec, self.launch = spec, launch
        self.nodes = spec["nodes"]
        self.ct = compute_dtype(spec, launch.input_dtypes)
        self.CT = TL_DTYPES[self.ct]
        self.lines: list[str] = []
        if spec["norm"] is None:  # a GLU region: elementwise, no row statistics
            self.norm, self.stats, self.eps = None, "", 0.0
        else:
            norm = self.nodes[spec["norm"]]
            self.norm, self.stats = spec["norm"], OPS[norm["op"]].stats
            self.eps = norm["attrs"].get("eps", 0.0)
            k = norm["attrs"].get("k")  # pRMSNorm: the statistic reads the first k columns (as `emit`)
            self.stat_mask = f"mask & (cols < {k})[None, :]" if self.stats == "prms_rstd" else "mask"
            self.stat_count = str(k) if self.stats == "prms_rstd" else "N"
        seeded = {j for j, g in zip(spec["outputs"], launch.grad_dtypes) if g is not None}
        self.active, _ = active_nodes(spec, launch.wanted, seeded)

    def w(self, ind: int, text: str):
        self.lines.append("    " * ind + text)

    def text(self) -> str:
        self.header()
        self.signature()
        self.body()
        return "\n".join(self.lines) + "\n"

    def header(self):
        w, L = self.w, self.launch
        w(0, f'"""Generated by fx-rewrite codegen (backward template {TEMPLATE_VERSION}, {L.target}).')
        w(0, "")
        w(0, "Region: " + " -> ".join(n["op"] for n in self.nodes) + '"""')
        w(0, "import triton")
        w(0, "import triton.language as tl")
        if L.target == "cuda":
            w(0, "from triton.language.extra import libdevice")
        for line in ("", "", "@triton.jit", "def _tanh_portable(x):", "    e = tl.exp(-2.0 * tl.abs(x))",
                     "    t = (1.0 - e) / (1.0 + e)", "    return tl.where(x < 0.0, -t, t)", "", "",
                     "@triton.jit", "def _rne_bf16(x):",
                     "    # float32 -> the nearest bfloat16 (ties to even), kept in float32 (the interpreter's",
                     "    # own cast truncates)",
                     "    b = x.to(tl.uint32, bitcast=True)",
                     "    b = (b + (((b >> 16) & 1) + 0x7FFF)) & 0xFFFF0000",
                     "    return b.to(tl.float32, bitcast=True)", "", "",
                     "@triton.jit", "def _sum2(a0, a1, b0, b1):", "    return a0 + b0, a1 + b1", "", ""):
            w(0, line)

    def _grads(self):
        return [o for o, g in enumerate(self.launch.grad_dtypes) if g is not None]

    def _wanted(self):
        return [i for i, x in enumerate(self.launch.wanted) if x]

    def _stored(self):
        """The needed inputs whose gradient the kernel writes (not those equal to another's)."""
        return [i for i in self._wanted() if self.launch.alias[i] is None]

    def signature(self):
        L = self.launch
        params = [f"in{i}" for i in range(len(L.classes))] + [f"g{o}" for o in self._grads()]
        params += [f"gin{i}" for i in self._stored()] + ["M", "N"]
        for i, kind in enumerate(L.classes):
            params += {"full": [f"s{i}_m", f"s{i}_n"], "col": [f"s{i}_n"], "row": [f"s{i}_m"]}.get(kind, [])
        for o in self._grads():
            params += [f"sg{o}_m", f"sg{o}_n"]
        params += ["ROWS: tl.constexpr", "BLOCK_N: tl.constexpr"]
        self.w(0, "@triton.jit")
        self.w(0, f"def {kernel_name(self.spec)}({', '.join(params)}):")

    def _used_inputs(self):
        return sorted({v for n in self.nodes for k, v in _args(n) if k == "in"})

    def _round(self, ind, name, dtype):
        """Round `name` (compute dtype) to `dtype` in place, as the forward kernel does."""
        if dtype == self.ct:
            return
        if dtype == "bfloat16" and self.launch.target == "interpreter":
            self.w(ind, f"{name} = _rne_bf16({name}.to(tl.float32)).to({self.CT})")
        else:
            self.w(ind, f"{name} = {name}.to({TL_DTYPES[dtype]}).to({self.CT})")

    def body(self):
        w, L = self.w, self.launch
        w(1, "pid = tl.program_id(0)")
        w(1, "nprog = tl.num_programs(0)")
        if not L.looped:
            w(1, "cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)" if L.tiled else "cols = tl.arange(0, BLOCK_N)")
            w(1, "cmask = cols < N")
        used = self._used_inputs()
        for i in used:  # loop-invariant loads: per-column (unless the columns are looped) and scalar inputs
            if L.classes[i] == "scalar" or L.classes[i] == "col" and not L.looped:
                self._load(1, i)
        for i in self._stored():
            if L.classes[i] == "scalar" or L.classes[i] == "col" and not L.looped:
                w(1, f"acc{i} = tl.zeros([BLOCK_N], dtype={self.CT})")
        w(1, "for rb in range(pid, tl.cdiv(M, ROWS), nprog):")
        w(2, "rows = rb * ROWS + tl.arange(0, ROWS)")
        w(2, "rmask = rows < M")
        w(2, "r64 = rows.to(tl.int64)")
        if L.looped:
            self.body_looped(2, used)
        else:
            w(2, "mask = rmask[:, None] & cmask[None, :]")
            for i in used:
                if L.classes[i] in ("full", "row"):
                    self._load(2, i)
            self.forward(2)
            self.reverse(2, self.steps())
            self.write_gradients(2)
        for i in self._stored():
            if L.classes[i] == "col" and not L.looped:
                w(1, f"tl.store(gin{i} + pid.to(tl.int64) * N + cols, acc{i}, mask=cmask)")
            elif L.classes[i] == "scalar":  # (one partial per program and column block when tiled)
                slot = "pid * tl.num_programs(1) + tl.program_id(1)" if L.tiled else "pid"
                w(1, f"tl.store(gin{i} + {slot}, tl.sum(acc{i}, axis=0))")

    def body_looped(self, ind, used):
        """One row block of rows wider than a block, in three passes over its column chunks
        (each recomputing what it needs of the forward): the row statistics (as the looped
        forward kernel computes them); the norm's backward row means (the reverse pass down to
        the norm); the whole reverse pass, writing the gradients chunk by chunk. A per-column
        gradient's partial sums live in the program's row of the (programs, N) buffer (zeroed
        on the host), added to chunk by chunk; a per-row one is summed over the chunks."""
        w, L, CT = self.w, self.launch, self.CT
        norm = self.nodes[self.norm]
        x_arg = norm["args"][0]
        pre = needed_for(self.spec, x_arg[1]) if x_arg[0] == "v" else set()
        pre_inputs = sorted({v for j in pre for k, v in _args(self.nodes[j]) if k == "in"} |
                            ({x_arg[1]} if x_arg[0] == "in" else set()))

        def open_pass(inputs, loads_all=True) -> int:
            w(ind, "for start in range(0, N, BLOCK_N):")
            w(ind + 1, "cols = start + tl.arange(0, BLOCK_N)")
            w(ind + 1, "cmask = cols < N")
            w(ind + 1, "mask = rmask[:, None] & cmask[None, :]")
            for i in inputs:
                if L.classes[i] != "scalar":
                    self._load(ind + 1, i)
            return ind + 1

        def statistics_pass() -> int:
            body = open_pass(pre_inputs)
            self.forward(body, sorted(pre))
            return body

        chunked_statistics(w, ind, self.stats, arg_expr(x_arg), self.eps, CT, statistics_pass, self.stat_mask,
                           self.stat_count)
        steps = self.steps()
        norm_step = [s for s in steps if s[0] == self.norm]
        if norm_step:  # the norm is differentiated: its row means first
            _, lines, means, _ = norm_step[0]
            for k in range(len(means)):
                w(ind, f"mean_acc{k} = tl.zeros([ROWS, BLOCK_N], dtype={CT})")
            body = open_pass(used)
            self.forward(body)
            upstream = [(j, ls, ms, [u for u in ups if not u[0].startswith("da")]) for j, ls, ms, ups in steps
                        if j > self.norm]  # (node adjoints only: the inputs' are the last pass's)
            self.reverse(body, upstream)
            for line in lines:
                w(body, line)
            for k, (_, e, _) in enumerate(means):
                w(body, f"mean_acc{k} += tl.where(mask, {e}, 0.0)")
            for k, (name, _, count) in enumerate(means):
                w(ind, f"{name} = (tl.sum(mean_acc{k}, axis=1) / {count})[:, None]")
        row_grads = [i for i in self._stored() if L.classes[i] == "row"]
        for i in row_grads:
            w(ind, f"racc{i} = tl.zeros([ROWS], dtype={CT})")
        body = open_pass(used)
        self.forward(body)
        self.reverse(body, steps, means_known=True)
        self.write_gradients(body)
        for i in row_grads:
            w(ind, f"tl.store(gin{i} + r64, racc{i}, mask=rmask)")

    def _load(self, ind, i):
        """Input i as `a{i}` in the compute dtype, shaped by its class to broadcast."""
        kind, CT = self.launch.classes[i], self.CT
        if kind == "full":
            self.w(ind, f"a{i} = tl.load(in{i} + r64[:, None] * s{i}_m + cols[None, :] * s{i}_n, mask=mask, "
                        f"other=0.0).to({CT})")
        elif kind == "col":
            self.w(ind, f"a{i} = tl.load(in{i} + cols * s{i}_n, mask=cmask, other=0.0).to({CT})[None, :]")
        elif kind == "row":
            self.w(ind, f"a{i} = tl.load(in{i} + r64 * s{i}_m, mask=rmask, other=0.0).to({CT})[:, None]")
        else:
            self.w(ind, f"a{i} = tl.load(in{i}).to({CT})")

    def forward(self, ind, nodes=None):
        """The forward recomputed: every node (or those in `nodes`), rounded to its dtype, and
        (unless the looped kernel computed them in passes of their own) the norm's row
        statistics, with the single-pass forward kernel's expressions."""
        w = self.w
        for j in range(len(self.nodes)) if nodes is None else nodes:
            node = self.nodes[j]
            if j == self.norm and self.stats and not self.launch.looped:
                row_statistics(w, ind, self.stats, arg_expr(node["args"][0]), self.eps, self.stat_mask,
                               self.stat_count)
            expr = OPS[node["op"]].triton([arg_expr(a) for a in node["args"]], node["attrs"], self.launch.target)
            w(ind, f"v{j} = ({expr}).to({self.CT})" if node["op"] in ("identity", "cast") else f"v{j} = {expr}")
            self._round(ind, f"v{j}", node["dtype"])

    def reverse(self, ind, steps, means_known=False):
        """Seed the outputs' adjoints, then apply `steps` (each active node's rule, last node
        first); a norm's row means are reduced here unless `means_known`."""
        w, CT, L = self.w, self.CT, self.launch
        for j in sorted(self.active):
            w(ind, f"d{j} = tl.zeros([ROWS, BLOCK_N], dtype={CT})")
        for i in self._wanted():
            w(ind, f"da{i} = tl.zeros([ROWS, BLOCK_N], dtype={CT})")
        for o, j in enumerate(self.spec["outputs"]):
            if L.grad_dtypes[o] is not None and j in self.active:
                w(ind, f"d{j} += tl.load(g{o} + r64[:, None] * sg{o}_m + cols[None, :] * sg{o}_n, mask=mask, "
                       f"other=0.0).to({CT})")
        for _, lines, means, updates in steps:
            for line in lines + ([] if means_known else _mean_lines(means) if means else []):
                w(ind, line)
            for name, expr in updates:
                w(ind, f"{name} += {expr}")

    def steps(self) -> list:
        """The reverse pass as data: per active node, last first, (its index, its rule's lines,
        its row means, [(adjoint name, contribution)]), only the contributions some needed
        gradient depends on."""
        out = []
        for j in sorted(self.active, reverse=True):
            node = self.nodes[j]
            args = [arg_expr(a) for a in node["args"]]
            lines, contrib, *means = RULES[node["op"]](args, node["attrs"], f"v{j}", f"d{j}", f"t{j}_",
                                                       self.launch.target)
            updates = []
            for k, a in enumerate(node["args"]):
                if a is None or k not in contrib:
                    continue
                if a[0] == "v" and a[1] in self.active:
                    updates.append((f"d{a[1]}", contrib[k]))
                elif a[0] == "in" and self.launch.wanted[a[1]]:
                    updates.append((f"da{a[1]}", contrib[k]))
            if updates:
                out.append((j, lines, means[0] if means else [], updates))
        return out

    def input_contributions(self) -> dict[int, list[str]]:
        """Per needed input, the contributions its adjoint sums: two inputs with the same list
        have the same gradient (both operands of a residual add)."""
        found: dict[int, list[str]] = {i: [] for i in self._wanted()}
        for _, _, _, updates in self.steps():
            for name, expr in updates:
                if name.startswith("da"):
                    found[int(name[2:])].append(expr)
        return found

    def write_gradients(self, ind):
        """Full inputs' gradients stored; broadcast inputs' summed into their accumulators (in
        a looped kernel, a per-column one into its partial-sum buffer, a per-row one over the
        chunks)."""
        w, L = self.w, self.launch
        for i in self._stored():
            kind = L.classes[i]
            val = f"tl.where(mask, da{i}, 0.0)"
            if kind == "full":
                w(ind, f"da{i} = {val}")
                self._round(ind, f"da{i}", L.out_dtypes[i])
                w(ind, f"tl.store(gin{i} + r64[:, None] * N + cols[None, :], da{i}.to(gin{i}.dtype.element_ty), "
                       "mask=mask)")
            elif kind == "row" and L.looped:
                w(ind, f"racc{i} += tl.sum({val}, axis=1)")
            elif kind == "row":
                w(ind, f"tl.store(gin{i} + r64, tl.sum({val}, axis=1), mask=rmask)")
            elif kind == "col" and L.looped:
                # read-modify-write of this program's partial sums; the barrier makes the
                # store visible to the threads that load the same columns for the next row block
                w(ind, f"part = gin{i} + pid.to(tl.int64) * N + cols")
                w(ind, f"tl.store(part, tl.load(part, mask=cmask, other=0.0) + tl.sum({val}, axis=0), mask=cmask)")
                w(ind, "tl.debug_barrier()")
            else:
                w(ind, f"acc{i} += tl.sum({val}, axis=0)")


# ---------------------------------------------------------------- kernel cache

_KERNELS = KernelCache(CACHE_SIZE)
_PLANS = LRU(CACHE_SIZE)


def get_kernel(spec_text: str, launch: BwdLaunch):
    """The compiled-on-first-launch backward kernel for a region and a launch specialisation."""
    key = spec_hash(spec_text, launch.key())
    fn = _KERNELS.get(key)
    if fn is None:
        spec = loads(spec_text)
        fn = _KERNELS.load(key, kernel_name(spec), generate(spec, launch))
    return fn


# ---------------------------------------------------------------- planning and launch

_PLAIN = (torch.Tensor, torch.nn.Parameter)
_SM_COUNT: dict = {}


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def choose_config(M: int, N: int, ct: str) -> tuple[int, int, int]:
    """(BLOCK_N, ROWS, num_warps) for a single-pass backward: at least 2048 elements per program
    (two rows up to N = 4096) on 4 warps, one row on 8 warps beyond. Measured on an H200 (bf16,
    M = 32768, `bench/gpu_norm_backward.py --sweep`): for N = 4096, 2 rows x 4 warps moved 3.6-3.7
    TB/s (add+RMSNorm) where 1 row x 8 warps moved 3.3; for N = 1024, 2 or 4 rows x 4 warps were
    within 3% of the best."""
    block = _next_pow2(N)
    rows = max(1, min(64, max(2048 // block, 2 if block <= 4096 else 1), _next_pow2(M)))
    warps = 4 if block <= 4096 else 8
    return block, rows, warps


def _programs(device: torch.device, target: str, n_blocks: int, reduces: bool, warps: int,
              per_sm: int | None = None) -> int:
    """How many programs along the rows: one per row block, unless broadcast inputs' gradients
    are reduced over rows; then about WARPS_PER_SM / num_warps per multiprocessor (`per_sm`
    overrides; 4 programs in the interpreter), each looping over its share of the row blocks, so
    the (programs, N) partial sums stay small. (A tiled launch multiplies this by its column
    blocks.)"""
    if not reduces:
        return n_blocks
    if target != "cuda":
        return min(n_blocks, 4)
    idx = device.index if device.index is not None else torch.cuda.current_device()
    sms = _SM_COUNT.get(idx)
    if sms is None:
        sms = _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return min(n_blocks, sms * (per_sm or max(1, WARPS_PER_SM // warps)))


def _aligned(shape, nd: int) -> tuple:
    return (1,) * (nd - len(shape)) + tuple(shape)


def _classify(shape: tuple, n_lead: int, domain: tuple) -> str:
    """An input's broadcast class by its logical shape (aligned to the domain): user-expanded
    tensors (stride 0, size > 1) are full tensors to autograd, so strides do not decide."""
    if shape == domain:  # a whole-domain input is full even when M or N is 1: written directly
        return "full"
    rows = any(n != 1 for n in shape[:n_lead])
    cols = any(n != 1 for n in shape[n_lead:])
    return "full" if rows and cols else "col" if cols else "row" if rows else "scalar"


def _skip(inputs, grads) -> bool:
    """True when autograd must see this backward (fake/functional tensors, modes, tracing, a
    double backward) or the tensors cannot run a kernel."""
    ts = list(inputs) + [g for g in grads if g is not None]
    if any(type(t) not in _PLAIN for t in ts):
        return True
    if torch.is_grad_enabled() and any(t.requires_grad for t in ts):
        return True
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() or \
            torch._C._is_torch_function_mode_enabled():
        return True
    dev = inputs[0].device
    if dev.type not in ("cuda", "cpu") or any(t.device != dev or t.dtype not in _DTYPE_SET for t in ts):
        return True
    return dev.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1"


_DTYPE_SET = frozenset(DTYPES.values())
_UNSUPPORTED = LRU(CACHE_SIZE)  # spec text -> (why it has no generated backward or "", its inputs' channel views)


def run_backward(spec_text: str, inputs: list[torch.Tensor], grads: list, needs: list[bool], config=None):
    """Gradients of the region's inputs (None where not needed or not reached) given its outputs'
    gradients (None for an output without one), by the generated kernel; None when this region
    or this call has no generated backward (the caller then differentiates the eager reference).
    `config` overrides (ROWS, num_warps, programs per multiprocessor) (benchmarks)."""
    known = _UNSUPPORTED.get(spec_text)
    if known is None:
        spec = loads(spec_text)
        known = (unsupported(spec) or "", tuple(i["channel_view"] for i in spec["inputs"]))
        _UNSUPPORTED.put(spec_text, known)
    why, channel_views = known
    if why or not inputs or _skip(inputs, grads):
        return None
    if not any(channel_views):
        return _run(spec_text, inputs, grads, needs, config)
    # a BatchNorm vector (C,) is seen as (C, 1, ..., 1) (a per-row input), its gradient given back as (C,)
    shapes = [t.shape for t in inputs]
    inputs = [with_channel_view(t, cv) for t, cv in zip(inputs, channel_views)]
    got = _run(spec_text, inputs, grads, needs, config)
    return None if got is None else [g if g is None or not cv else g.reshape(s)
                                     for g, cv, s in zip(got, channel_views, shapes)]


def _run(spec_text: str, inputs, grads, needs, config):
    target = "cuda" if inputs[0].is_cuda and os.environ.get("TRITON_INTERPRET") != "1" else "interpreter"
    key = (spec_text, tuple(needs), target, config, inputs[0].get_device(), *[(t.shape, t.stride(), t.dtype) for t in inputs],
           *[None if g is None else (g.shape, g.stride(), g.dtype) for g in grads])
    plan = _PLANS.get(key)
    if plan is None:
        plan = _plan(spec_text, inputs, grads, needs, target, config)
        _PLANS.put(key, plan)
    if plan == "unsupported":
        return None
    return _launch(plan, inputs, grads)


@dataclass(frozen=True)
class _Plan:
    """Everything a launch needs but the tensors, for one (spec, shapes, strides, dtypes) key."""

    kernel: object
    grid: tuple
    consts: dict          # ROWS, BLOCK_N, num_warps
    ints: tuple           # M, N, then the strides of the kernel's signature
    copies: tuple         # per input, then per present gradient: True if read through a copy (`_view`)
    classes: tuple
    domain: tuple
    n_lead: int
    outs: tuple           # per input: (shape, dtype, zeroed) of the tensor the kernel writes, or None
    finish: tuple         # per input: how its gradient is made from that tensor ("direct" or a reduction)
    alias: tuple          # per input: the input whose gradient tensor it shares, or None


def _view(t: torch.Tensor, kind: str, domain: tuple, n_lead: int) -> torch.Tensor:
    """What the kernel reads of input `t` of class `kind`: (M, N), (N,), (M,) or (1,); a view of
    `t` (same data pointer) unless its dims cannot be walked with one stride (then a copy)."""
    M, N = math.prod(domain[:n_lead]), math.prod(domain[n_lead:])
    e = t.expand(domain)
    if kind == "full":
        return e.reshape(M, N)
    if kind == "col":
        return e[(0,) * n_lead].reshape(N)
    if kind == "row":
        return e[(Ellipsis,) + (0,) * (len(domain) - n_lead)].reshape(M)
    return t.reshape(1)


def _is_view(v: torch.Tensor, t: torch.Tensor) -> bool:
    return v.data_ptr() == t.data_ptr() and v.untyped_storage().data_ptr() == t.untyped_storage().data_ptr()


def _plan(spec_text, inputs, grads, needs, target, config=None):
    spec = loads(spec_text)
    shapes = [tuple(t.shape) for t in inputs]
    domain = tuple(torch.broadcast_shapes(*shapes))
    nd = len(domain)
    if nd == 0 or len(grads) != len(spec["outputs"]) or any(g is not None and tuple(g.shape) != domain for g in grads):
        return "unsupported"
    inner = min(max(reduce_ndim(spec), 1), nd)
    n_lead = nd - inner
    M, N = math.prod(domain[:n_lead]), math.prod(domain[n_lead:])
    in_dtypes = tuple(dtype_name(t.dtype) for t in inputs)
    ct = compute_dtype(spec, in_dtypes)
    if M * N == 0:
        return "unsupported"
    wide = N > MAX_SINGLE[ct]  # a row wider than a block: with row statistics (RMSNorm, LayerNorm)
    looped = wide and spec["norm"] is not None and bool(OPS[spec["nodes"][spec["norm"]]["op"]].stats)
    tiled = wide and not looped  # each program loops over its rows' chunks, else the columns are split
    classes = tuple(_classify(_aligned(s, nd), n_lead, domain) for s in shapes)
    grad_dtypes = tuple(None if g is None else dtype_name(g.dtype) for g in grads)
    seeded = {j for j, g in zip(spec["outputs"], grads) if g is not None}
    _, wanted = active_nodes(spec, [bool(n) for n in needs], seeded)
    if tiled and any(w and c == "row" for w, c in zip(wanted, classes)):
        return "unsupported"  # a per-row gradient sums over all column blocks
    out_dtypes = []
    for t, s, c, want in zip(inputs, shapes, classes, wanted):
        if not want:
            out_dtypes.append(None)
        elif c == "full" and _aligned(s, nd) == domain:
            out_dtypes.append(dtype_name(t.dtype))  # written directly, in the input's dtype
        else:
            out_dtypes.append(ct)                   # partial sums, reduced on the host
    launch = BwdLaunch(classes, in_dtypes, grad_dtypes, tuple(wanted), tuple(out_dtypes), target, tiled=tiled,
                       looped=looped)
    launch = dataclasses.replace(launch, alias=_aliases(spec, launch, shapes, nd, domain))
    kernel = get_kernel(spec_text, launch)
    if wide:  # chunks of 4096 columns, one row on 8 warps (`WIDE_CONFIG`)
        block, rows, warps = MAX_SINGLE[ct] // 2, *WIDE_CONFIG
    else:
        block, rows, warps = choose_config(M, N, ct)
    n_col = -(-N // block) if tiled else 1
    per_sm = None
    if config is not None:
        rows, warps, per_sm = config
    n_blocks = -(-M // rows)
    reduces = any(w and c in ("col", "scalar") for w, c in zip(wanted, classes))
    programs = _programs(inputs[0].device, target, n_blocks, reduces, warps, per_sm)
    ints, copies = _stride_args(inputs, grads, classes, domain, n_lead, M, N)
    outs, finish = [], []
    for i, (t, kind) in enumerate(zip(inputs, classes)):
        if not wanted[i] or launch.alias[i] is not None:
            outs.append(None)
            finish.append(None)
            continue
        direct = kind == "full" and _aligned(shapes[i], nd) == domain
        shape = tuple(t.shape) if direct else {"full": (M, N), "col": (programs, N), "row": (M,),
                                               "scalar": (programs * n_col,)}[kind]
        outs.append((shape, DTYPES[out_dtypes[i]], looped and kind == "col"))  # (partials added to: zeroed)
        finish.append("direct" if direct else kind)
    return _Plan(kernel, (programs, n_col) if tiled else (programs,), {"ROWS": rows, "BLOCK_N": block,
                                                                      "num_warps": warps}, tuple(ints),
                 tuple(copies), classes, domain, n_lead, tuple(outs), tuple(finish), launch.alias)


def _stride_args(inputs, grads, classes, domain, n_lead, M, N) -> tuple[list, list]:
    """The kernel's integer arguments, M, N and the strides of what it reads (functions of the
    key's shapes and strides), and per tensor read whether it must be copied to be read as a
    view of (M, N)."""
    ints, copies = [M, N], []
    for t, kind in zip(inputs, classes):
        v = _view(t, kind, domain, n_lead)
        if kind == "full":
            ints += [v.stride(0), v.stride(1)]
        elif kind in ("col", "row"):
            ints.append(v.stride(0))
        copies.append(not _is_view(v, t))
    for g in grads:
        if g is not None:
            v = g.reshape(M, N)
            ints += [v.stride(0), v.stride(1)]
            copies.append(not _is_view(v, g))
    return ints, copies


def _aliases(spec, launch: BwdLaunch, shapes, nd, domain) -> tuple:
    """Per input, an earlier input with the same gradient (the same contributions, both written
    whole in the same dtype): its gradient tensor is returned for both, as eager autograd
    returns one tensor for both operands of an add, and written once (a residual add's two
    operands: a third less to write for add+RMSNorm)."""
    contribs = _Source(spec, launch).input_contributions()
    alias: list = [None] * len(shapes)
    for k in sorted(contribs):
        if launch.classes[k] != "full" or _aligned(shapes[k], nd) != domain:
            continue
        for i in sorted(contribs):
            if i >= k:
                break
            if (alias[i] is None and launch.classes[i] == "full" and _aligned(shapes[i], nd) == domain
                    and launch.out_dtypes[i] == launch.out_dtypes[k] and contribs[i] == contribs[k]):
                alias[k] = i
                break
    return tuple(alias)


def launch_args(p: _Plan, inputs, grads) -> tuple[list, dict]:
    """(the kernel's positional arguments, {input index: the buffer its gradient is written
    to}) of plan `p` for these tensors: inputs and gradients (views, or copies where the plan
    says), fresh buffers, then the integer arguments."""
    domain, n_lead = p.domain, p.n_lead
    args = []
    for t, kind, copy in zip(inputs, p.classes, p.copies):
        args.append(_view(t, kind, domain, n_lead) if copy else t)
    present = [g for g in grads if g is not None]
    for g, copy in zip(present, p.copies[len(inputs):]):
        args.append(g.reshape(p.ints[0], p.ints[1]) if copy else g)
    bufs = {i: (torch.zeros if o[2] else torch.empty)(o[0], dtype=o[1], device=inputs[0].device)
            for i, o in enumerate(p.outs) if o is not None}
    return args + list(bufs.values()) + list(p.ints), bufs


def _launch(p: _Plan, inputs, grads):
    dev = inputs[0].device
    domain, n_lead = p.domain, p.n_lead
    args, bufs = launch_args(p, inputs, grads)
    if dev.type == "cuda" and dev.index != torch.cuda.current_device():
        with torch.cuda.device(dev):
            p.kernel[p.grid](*args, **p.consts)
    else:
        p.kernel[p.grid](*args, **p.consts)
    result = [None] * len(inputs)
    nd = len(domain)
    for i, buf in bufs.items():
        t, how = inputs[i], p.finish[i]
        if how == "direct":
            result[i] = buf
            continue
        target_shape = _aligned(t.shape, nd)
        if how == "full":
            g = buf.view(domain).sum_to_size(target_shape)
        elif how == "col":
            g = buf.sum(0)
            if target_shape[n_lead:] != domain[n_lead:]:
                g = g.view(domain[n_lead:]).sum_to_size(target_shape[n_lead:])
        elif how == "row":
            g = buf.view(domain[:n_lead] + (1,) * (nd - n_lead)).sum_to_size(target_shape)
        else:
            g = buf.sum(0)
        result[i] = g.reshape(t.shape).to(t.dtype)
    for k, i in enumerate(p.alias):
        if i is not None:
            result[k] = result[i]
    return result
