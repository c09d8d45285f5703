"""Triton source text for a region: an expression emitter inside a row-reduction template.

The domain (the norm input's shape) is seen as `M` rows of `N` elements, N the product of the
reduced trailing dims (or the last dim for DyT/BatchNorm, which do not reduce). Rows are indexed
through up to `k` leading dims (sizes D0..D{k-1}), so any input strides work: an input's element
(row r, column c) sits at  sum_d i_d(r) * s_d + c * s_n,  with broadcast dims at stride 0.
Each input is specialised by how it varies, decided at launch (`Launch.classes`):

    full    varies along rows and columns: a [ROWS, BLOCK_N] load
    col     a per-column vector (norm weight): one [BLOCK_N] load per program, broadcast on rows
    row     a per-row scalar (BatchNorm statistics with N = spatial size): a [ROWS] load
    scalar  one value (DyT alpha, SmeLU beta)

and, for full/col, whether its column stride is 1 (then no multiply: vectorised loads).

One program handles ROWS rows (several for small N, one for large N). Two template shapes:

    single  BLOCK_N >= N: load once, reduce in registers, apply the epilogue, store (one pass
            over memory: read each input once, write each output once);
    loop    BLOCK_N < N: loop over column chunks, first accumulating the statistics (LayerNorm:
            a sum pass then a centred sum-of-squares pass, so the variance is computed exactly
            as E[(x - mean)^2], never as E[x^2] - mean^2), then a final pass that recomputes the
            prologue, applies the norm and the epilogue and stores.
    tiled   BLOCK_N < N without statistics (GLU, DyT, BatchNorm): each program takes one column
            block of its rows, the block index on grid axis 1 (`runtime.choose_config`).

Masks (`cols < N`, `rows < M`) make any N and M valid; masked lanes are excluded from every
reduction. Arithmetic runs in float32 (float64 if anything in the region is float64); after each
node its value is rounded to that node's dtype, so a bfloat16 residual stream is rounded where
eager rounds it. The statistics are

    LayerNorm: mean = sum(x)/N, var = sum((x - mean)^2)/N, rstd = 1/sqrt(var + eps)
    RMSNorm:   rstd = 1/sqrt(sum(x^2)/N + eps)

and every op's own expression comes from `ir.OPS`; nothing here knows which ops a region has.

A GLU region (no norm, `ir`'s `"glu"` seed) has no statistics: like DyT and BatchNorm it is the
elementwise pass, over rows of its last dim (`ir.reduce_ndim`). Its gate and up are often the two
halves of one tensor (a fused gate_up projection split along the last dim); they arrive as two
views of it, each a `full` input with its own base pointer (the view's offset) and row stride,
so the kernel reads the halves in place.
"""
from __future__ import annotations

from dataclasses import dataclass

from .ir import OPS, TL_DTYPES, arg_expr, compute_dtype, region_name

TEMPLATE_VERSION = "2"


def row_statistics(w, ind: int, stats: str, x: str, eps: float, mask: str = "mask", count: str = "N"):
    """Write the single-pass reduction of a whole row held in registers: `mean` and `rstd`
    (LayerNorm, "mean_rstd") or `rstd` alone (RMS norms, over the `mask`ed `count` columns), each
    as a column [ROWS, 1]. The forward kernels and the backward's recomputation share it, so both
    compute the statistics with the same expressions."""
    if stats == "mean_rstd":
        w(ind, f"mean = tl.sum(tl.where(mask, {x}, 0.0), axis=1) / N")
        w(ind, f"xc = tl.where(mask, {x} - mean[:, None], 0.0)")
        w(ind, f"rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / N + {eps!r})")
        w(ind, "mean = mean[:, None]")
    else:
        w(ind, f"xs = tl.where({mask}, {x}, 0.0)")
        w(ind, f"rstd = 1.0 / tl.sqrt(tl.sum(xs * xs, axis=1) / {count} + {eps!r})")
    w(ind, "rstd = rstd[:, None]")


@dataclass(frozen=True)
class Launch:
    """What the source depends on besides the spec: decided from the actual tensors at launch."""

    k: int                      # leading dims after coalescing (>= 1)
    classes: tuple              # per input: (kind in full/col/row/scalar, column stride is 1)
    input_dtypes: tuple         # per input: dtype name
    mode: str                   # "single", "loop" or "tiled" (no statistics: columns on grid axis 1)
    target: str                 # "cuda" or "interpreter"

    def key(self) -> str:
        return f"{TEMPLATE_VERSION}|{self.k}|{self.classes}|{self.input_dtypes}|{self.mode}|{self.target}"


def kernel_name(spec: dict) -> str:
    """The generated kernel's function name, also named in the lowering's report: _add_rms_norm_silu_fwd_kernel."""
    return f"_{region_name(spec)}_fwd_kernel"


def needed_for(spec: dict, j: int) -> set[int]:
    """Node indices node j depends on, itself included."""
    out, stack = set(), [j]
    while stack:
        n = stack.pop()
        if n in out:
            continue
        out.add(n)
        stack += [a[1] for a in spec["nodes"][n]["args"] if a is not None and a[0] == "v"]
    return out


def _inputs_of(spec: dict, nodes: set[int]) -> list[int]:
    """The run-time inputs that `nodes` read, in input order."""
    used = {a[1] for n in nodes for a in spec["nodes"][n]["args"] if a is not None and a[0] == "in"}
    return sorted(used)


class _Writer:
    """Collects source lines; `w(indent, text)` appends one line, indented by 4 spaces per level."""

    def __init__(self):
        self.lines: list[str] = []

    def __call__(self, indent: int, text: str):
        self.lines.append("    " * indent + text)


def generate(spec: dict, launch: Launch) -> str:
    """The Python/Triton source of the region's forward kernel, ready to write to a file."""
    kernel = _KernelSource(spec, launch)
    kernel.write_module_header()
    kernel.write_signature_and_rows()
    if not kernel.stats:
        kernel.write_elementwise_pass(launch.mode)
    elif launch.mode == "single":
        ind = kernel.open_columns(looped=False)
        kernel.write_prologue(ind)
        kernel.write_statistics_in_registers(ind)
        kernel.write_norm_and_epilogue(ind)
    else:
        kernel.write_statistics_by_chunks()
        ind = kernel.open_columns(looped=True)
        kernel.write_prologue(ind)
        kernel.write_norm_and_epilogue(ind)
    return "\n".join(kernel.w.lines) + "\n"


class _KernelSource:
    """The source of one kernel being written, with what every part of it needs to know.

    The nodes split in two: the prologue (`pre`: the nodes the norm's input is computed from,
    which a looped kernel recomputes in every pass) and the rest (the norm and the epilogue,
    computed once the row statistics are known)."""

    def __init__(self, spec: dict, launch: Launch):
        self.spec, self.launch = spec, launch
        self.w = _Writer()
        self.ct = compute_dtype(spec, launch.input_dtypes)
        self.CT = TL_DTYPES[self.ct]
        self.nodes = spec["nodes"]
        if spec["norm"] is None:  # a GLU region: no statistics, one elementwise pass
            self.stats, self.eps, self.x_arg = "", 0.0, None
        else:
            norm_node = self.nodes[spec["norm"]]
            self.stats = OPS[norm_node["op"]].stats
            self.eps = norm_node["attrs"].get("eps", 0.0)
            self.k = norm_node["attrs"].get("k")  # pRMSNorm: the columns its statistic reads
            self.x_arg = norm_node["args"][0]
        x_kind = self.x_arg[0] if self.x_arg is not None else None
        self.pre = needed_for(spec, self.x_arg[1]) if x_kind == "v" else set()
        self.all_nodes = set(range(len(self.nodes)))
        x_input = [self.x_arg[1]] if x_kind == "in" else []
        self.pre_inputs = sorted(set(_inputs_of(spec, self.pre)) | set(x_input))

    def _params(self) -> list[str]:
        """The kernel's parameters: tensors, sizes, the strides each input's class needs, constexprs."""
        k, n_in, n_out = self.launch.k, len(self.spec["inputs"]), len(self.spec["outputs"])
        params = [f"in{i}" for i in range(n_in)] + [f"out{o}" for o in range(n_out)] + ["M", "N"]
        params += [f"D{d}" for d in range(1, k)]
        for i, (kind, contig) in enumerate(self.launch.classes):
            if kind in ("full", "row"):
                params += [f"s{i}_{d}" for d in range(k)]
            if kind in ("full", "col") and not contig:
                params.append(f"s{i}_n")
        return params + ["ROWS: tl.constexpr", "BLOCK_N: tl.constexpr"]

    def write_module_header(self):
        """Docstring, imports and the two helper functions every kernel may call."""
        w = self.w
        w(0, f'"""Generated by fx-rewrite codegen (template {TEMPLATE_VERSION}, {self.launch.mode}, '
             f'{self.launch.target}).')
        w(0, "")
        w(0, "Region: " + " -> ".join(n["op"] for n in self.nodes) + '"""')
        w(0, "import triton")
        w(0, "import triton.language as tl")
        if self.launch.target == "cuda":
            w(0, "from triton.language.extra import libdevice")
        w(0, "")
        w(0, "")
        w(0, "@triton.jit")
        w(0, "def _tanh_portable(x):")
        w(1, "e = tl.exp(-2.0 * tl.abs(x))")
        w(1, "t = (1.0 - e) / (1.0 + e)")
        w(1, "return tl.where(x < 0.0, -t, t)")
        w(0, "")
        w(0, "")
        w(0, "@triton.jit")
        w(0, "def _rne_bf16(x):")
        w(1, "# float32 -> the nearest bfloat16 (ties to even), kept in float32. The interpreter's own")
        w(1, "# float32 -> bfloat16 cast truncates; the GPU's rounds to nearest even like this.")
        w(1, "b = x.to(tl.uint32, bitcast=True)")
        w(1, "b = (b + (((b >> 16) & 1) + 0x7FFF)) & 0xFFFF0000")
        w(1, "return b.to(tl.float32, bitcast=True)")
        w(0, "")
        w(0, "")

    def write_signature_and_rows(self):
        """The kernel's `def` and its row indexing: this program's rows, their leading-dim
        indices i0..i{k-1}, the output row offsets and each row-varying input's row offsets."""
        w, k = self.w, self.launch.k
        w(0, "@triton.jit")
        w(0, f"def {kernel_name(self.spec)}({', '.join(self._params())}):")
        w(1, "pid = tl.program_id(0)")
        w(1, "rows = pid * ROWS + tl.arange(0, ROWS)")
        w(1, "rmask = rows < M")
        w(1, "r = rows.to(tl.int64)")
        for d in range(k - 1, 0, -1):
            w(1, f"i{d} = r % D{d}")
            w(1, "r = r // D" + str(d))
        w(1, "i0 = r")
        w(1, "obase = rows.to(tl.int64) * N")
        for i, (kind, _) in enumerate(self.launch.classes):
            if kind in ("full", "row"):
                w(1, f"ro{i} = " + " + ".join(f"i{d} * s{i}_{d}" for d in range(k)))

    def open_columns(self, looped: bool, tiled: bool = False) -> int:
        """Start a pass over the columns (all at once, a loop over BLOCK_N chunks, or the block
        of grid axis 1) with its masks; returns the indent of the pass's body."""
        if looped:
            self.w(1, "for start in range(0, N, BLOCK_N):")
        ind, start = (2, "start + ") if looped else (1, "tl.program_id(1) * BLOCK_N + " if tiled else "")
        self.w(ind, f"cols = {start}tl.arange(0, BLOCK_N)")
        self.w(ind, "cmask = cols < N")
        self.w(ind, "mask = rmask[:, None] & cmask[None, :]")
        return ind

    def _load(self, i: int, ind: int):
        """Load input i as `a{i}` in the compute dtype, shaped by its class to broadcast."""
        kind, contig = self.launch.classes[i]
        colterm = "cols" if contig else f"cols.to(tl.int64) * s{i}_n"
        CT = self.CT
        if kind == "full":
            self.w(ind, f"a{i} = tl.load(in{i} + ro{i}[:, None] + {colterm}[None, :], mask=mask, other=0.0).to({CT})")
        elif kind == "col":
            self.w(ind, f"a{i} = tl.load(in{i} + {colterm}, mask=cmask, other=0.0).to({CT})[None, :]")
        elif kind == "row":
            self.w(ind, f"a{i} = tl.load(in{i} + ro{i}, mask=rmask, other=0.0).to({CT})[:, None]")
        else:
            self.w(ind, f"a{i} = tl.load(in{i}).to({CT})")

    def _compute(self, j: int, ind: int):
        """Node j's value as `v{j}`, rounded to the node's dtype where eager rounds it."""
        node, CT, target = self.nodes[j], self.CT, self.launch.target
        expr = OPS[node["op"]].triton([arg_expr(a) for a in node["args"]], node["attrs"], target)
        self.w(ind, f"v{j} = ({expr}).to({CT})" if node["op"] in ("identity", "cast") else f"v{j} = {expr}")
        if node["dtype"] != self.ct:
            if node["dtype"] == "bfloat16" and target == "interpreter":
                self.w(ind, f"v{j} = _rne_bf16(v{j}.to(tl.float32)).to({CT})")
            else:
                self.w(ind, f"v{j} = v{j}.to({TL_DTYPES[node['dtype']]}).to({CT})")

    def write_elementwise_pass(self, mode: str):
        """A region without row statistics (DyT, BatchNorm, GLU): one pass computes every node,
        over the whole row, a loop over its chunks, or (tiled) the program's own column block."""
        ind = self.open_columns(mode == "loop", tiled=mode == "tiled")
        for i in _inputs_of(self.spec, self.all_nodes):
            self._load(i, ind)
        for j in sorted(self.all_nodes):
            self._compute(j, ind)
        _stores(self.w, self.spec, ind)

    def write_prologue(self, ind: int):
        """Load the prologue's inputs and compute the prologue: the norm's input `x` is then known."""
        for i in self.pre_inputs:
            self._load(i, ind)
        for j in sorted(self.pre):
            self._compute(j, ind)

    def write_norm_and_epilogue(self, ind: int):
        """With mean/rstd known: load the remaining inputs, compute the norm and the epilogue, store."""
        for i in _inputs_of(self.spec, self.all_nodes - self.pre):
            if i not in self.pre_inputs:
                self._load(i, ind)
        for j in sorted(self.all_nodes - self.pre):
            self._compute(j, ind)
        _stores(self.w, self.spec, ind)

    def write_statistics_in_registers(self, ind: int):
        """Single pass: the whole row is loaded, so reduce it directly."""
        row_statistics(self.w, ind, self.stats, arg_expr(self.x_arg), self.eps, self._stat_mask(), self._stat_count())

    def _stat_mask(self) -> str:
        """The elements the RMS statistic reads: the row, or for pRMSNorm its first k columns."""
        return f"mask & (cols < {self.k})[None, :]" if self.stats == "prms_rstd" else "mask"

    def _stat_count(self) -> str:
        return str(self.k) if self.stats == "prms_rstd" else "N"

    def write_statistics_by_chunks(self):
        """Loop mode: accumulate over column chunks, recomputing the prologue in each pass."""
        def open_pass() -> int:
            ind = self.open_columns(looped=True)
            self.write_prologue(ind)
            return ind
        chunked_statistics(self.w, 1, self.stats, arg_expr(self.x_arg), self.eps, self.CT, open_pass,
                           self._stat_mask(), self._stat_count())


def chunked_statistics(w, ind: int, stats: str, x: str, eps: float, CT: str, open_pass, mask: str = "mask",
                       count: str = "N"):
    """Write the statistics of rows wider than a block, as `row_statistics` names them: passes
    over column chunks, each opened by `open_pass()` (it writes the loop, its masks and the
    prologue that computes `x`, and returns the loop body's indent). LayerNorm takes a sum pass,
    then a centred sum-of-squares pass (the variance is exactly E[(x - mean)^2], never
    E[x^2] - mean^2); RMS norms one pass. The looped forward kernel and the looped backward's
    recomputation share it."""
    w(ind, f"acc = tl.zeros([ROWS, BLOCK_N], dtype={CT})")
    body = open_pass()
    if stats == "mean_rstd":
        w(body, f"acc += tl.where(mask, {x}, 0.0)")
        w(ind, "mean = (tl.sum(acc, axis=1) / N)[:, None]")
        w(ind, f"acc = tl.zeros([ROWS, BLOCK_N], dtype={CT})")
        body = open_pass()
        w(body, f"xc = tl.where(mask, {x} - mean, 0.0)")
        w(body, "acc += xc * xc")
    else:
        w(body, f"xs = tl.where({mask}, {x}, 0.0)")
        w(body, "acc += xs * xs")
    w(ind, f"rstd = (1.0 / tl.sqrt(tl.sum(acc, axis=1) / {count} + {eps!r}))[:, None]")


def _stores(w: _Writer, spec: dict, ind: int):
    """Store each output, cast to its tensor's dtype, at the row's output offsets."""
    for o, j in enumerate(spec["outputs"]):
        w(ind, f"tl.store(out{o} + obase[:, None] + cols[None, :], v{j}.to(out{o}.dtype.element_ty), mask=mask)")
