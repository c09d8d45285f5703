"""Generated Triton kernels for fused norm + elementwise regions, checked against eager.

The kernels run in Triton's interpreter on CPU: run with TRITON_INTERPRET=1 set before Python
starts (triton reads it at import). Without it, on a CPU-only machine, the kernel tests are
skipped and the op's eager fallback is what is tested; with a GPU and no interpreter they run
on CUDA. A spy on `runtime.run_triton` proves that a kernel (not the fallback) produced each
result.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fxrewrite.codegen import emit, ir, regions, runtime
from fxrewrite.codegen.reference import run_reference
from fxrewrite import optimize
from fxrewrite.rewrite.nn import ELN, DyT, PartialRMSNorm, SmeLU

aten = torch.ops.aten
OP = runtime.OP
INTERP = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERP else "cuda" if torch.cuda.is_available() else None
needs_kernel = pytest.mark.skipif(DEVICE is None, reason="no Triton target: set TRITON_INTERPRET=1 or use a GPU")

# |got - eager| <= atol + rtol |eager|. float64/float32: summation order only (measured <= 3e-16
# and <= 2.3e-7 scaled error). float16/bfloat16: 4 units in the last place (fp16 ulp 2^-11,
# bf16 2^-8, relative): the kernel keeps norm intermediates unrounded where eager rounds them, so
# a rounding step can differ (measured <= 6.7e-4 for fp16, <= 5.1e-3 for bf16, DyT the worst).
TOL = {torch.float64: (1e-12, 1e-12), torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3),
       torch.bfloat16: (1.6e-2, 1.6e-2)}


def close(got, want, dtype):
    rtol, atol = TOL[dtype]
    assert got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got.double(), want.double(), rtol=rtol, atol=atol)


def flat(out):
    return list(out) if isinstance(out, (tuple, list)) else [out]


def randomise(m: nn.Module) -> nn.Module:
    """Non-trivial weights (fresh norms have weight 1, bias 0, which hide mistakes)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in list(m.named_parameters()) + list(m.named_buffers()):
            if p.is_floating_point():
                if "var" in name:
                    p.uniform_(0.5, 2.0)
                elif p.numel() == 1:  # a scalar of a formula (DyT alpha, SmeLU beta)
                    p.fill_(0.7)
                else:
                    p.copy_(torch.randn_like(p) * 0.3 + (1.0 if "weight" in name else 0.0))
    return m


def fused_calls(gm):
    return [n for n in gm.graph.nodes if runtime.is_region_call(n)]


def lower(model, *xs, dtype=torch.float32):
    model = randomise(model).to(dtype=dtype, device=DEVICE or "cpu").eval()
    fast = optimize(model, xs, lower="triton")
    return model, fast


def check_against_eager(model, fast, *xs):
    dtype = xs[0].dtype
    with torch.no_grad():
        want, got = flat(model(*xs)), flat(fast(*xs))
    assert len(got) == len(want)
    for g, w in zip(got, want):
        close(g, w, w.dtype if w.dtype in TOL else dtype)


# ---------------------------------------------------------------- region kinds

class RMSAct(nn.Module):
    """residual add + bias add + scale (prologue) -> RMSNorm -> SiLU * gate (epilogue)."""

    def __init__(self, n):
        super().__init__()
        self.norm = nn.RMSNorm(n, eps=1e-6)
        self.bias = nn.Parameter(torch.zeros(n))

    def forward(self, x, r):
        h = (x + r + self.bias) * 0.5
        return F.silu(self.norm(h)) * r


class AddRMS2(nn.Module):
    """Pre-norm transformer step: the updated residual stream and its norm both leave the region."""

    def __init__(self, n):
        super().__init__()
        self.norm = nn.RMSNorm(n, eps=1e-6)

    def forward(self, x, r):
        h = x + r
        return h, self.norm(h)


class LNGelu(nn.Module):
    def __init__(self, n, approximate="none"):
        super().__init__()
        self.norm = nn.LayerNorm(n)
        self.approximate = approximate

    def forward(self, x, r):
        return F.gelu(self.norm(x), approximate=self.approximate) + r  # residual add epilogue


class DyTSmeLU(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.norm = DyT(n)
        self.act = SmeLU(0.5)

    def forward(self, x):
        return self.act(self.norm(x))


class AddELNGelu(nn.Module):
    """Residual add, ELN (the elementwise counterpart of LayerNorm: a norm seed without statistics), GELU."""

    def __init__(self, n):
        super().__init__()
        self.norm = ELN(n, beta_init=3.0)

    def forward(self, x, r):
        return F.gelu(self.norm(x + r))


class PRMSSiLU(nn.Module):
    """pRMSNorm (the statistic over the first k of the columns only), then SiLU."""

    def __init__(self, n, p):
        super().__init__()
        self.norm = PartialRMSNorm(n, p=p, eps=1e-6)

    def forward(self, x):
        return F.silu(self.norm(x))


class BNRelu(nn.Module):
    """An eval BatchNorm on a sum (no conv to fold it into) + ReLU: the per-channel kind."""

    def __init__(self, c):
        super().__init__()
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x, r):
        return F.relu(self.bn(x + r))


class CastNorm(nn.Module):
    """A half-precision stream normalised in float32 and cast back (LLaMA style)."""

    def __init__(self, n, dtype):
        super().__init__()
        self.norm = nn.LayerNorm(n)
        self.out_dtype = dtype

    def forward(self, x):
        return F.silu(self.norm(x.float()).to(self.out_dtype))


KINDS = {  # name: (module, inputs' shapes, ops of the region in order)
    "rms_prologue_silu_mul": (lambda: RMSAct(48), [(3, 48), (3, 48)],
                              ["add", "add", "mul", "rms_norm", "silu", "mul"]),
    "add_rms_two_outputs": (lambda: AddRMS2(48), [(3, 48), (3, 48)], ["add", "rms_norm"]),
    "layernorm_gelu_erf_residual": (lambda: LNGelu(40), [(2, 3, 40), (2, 3, 40)], ["layer_norm", "gelu", "add"]),
    "layernorm_gelu_tanh_residual": (lambda: LNGelu(40, "tanh"), [(2, 3, 40), (2, 3, 40)],
                                     ["layer_norm", "gelu", "add"]),
    "dyt_smelu": (lambda: DyTSmeLU(33), [(4, 33)], ["dyt", "smelu"]),
    "add_eln_gelu": (lambda: AddELNGelu(37), [(5, 37), (5, 37)], ["add", "eln", "gelu"]),
    "prms_norm_silu": (lambda: PRMSSiLU(48, 0.25), [(2, 3, 48)], ["prms_norm", "silu"]),
    "prms_norm_whole_row": (lambda: PRMSSiLU(20, 1.0), [(7, 20)], ["prms_norm", "silu"]),
    "batchnorm_eval_relu": (lambda: BNRelu(4), [(2, 4, 5, 3), (2, 4, 5, 3)], ["add", "batch_norm", "relu"]),
}


@needs_kernel
@pytest.mark.parametrize("kind", KINDS)
def test_region_kinds_match_eager(kind, launches):
    make, shapes, expected_ops = KINDS[kind]
    xs = [torch.randn(s, device=DEVICE) for s in shapes]
    model, fast = lower(make(), *xs)
    calls = fused_calls(fast)
    assert len(calls) == 1 and fast.report.count("lower_triton") == 1, fast.report
    assert calls[0].meta["fused_region"]["ops"] == expected_ops
    check_against_eager(model, fast, *xs)
    assert len(launches) == 1


@needs_kernel
def test_two_output_region_returns_residual_and_norm(launches):
    xs = [torch.randn(5, 64, device=DEVICE) for _ in range(2)]
    model, fast = lower(AddRMS2(64), *xs)
    spec = ir.loads(fused_calls(fast)[0].args[0])
    assert len(spec["outputs"]) == 2
    assert [spec["nodes"][j]["op"] for j in spec["outputs"]] == ["add", "rms_norm"]
    check_against_eager(model, fast, *xs)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cast_prologue_and_epilogue(dtype, launches):
    x = torch.randn(3, 2, 50, device=DEVICE, dtype=dtype)
    model, fast = lower(CastNorm(50, dtype), x)  # float32 norm parameters, as in LLaMA
    (call,) = fused_calls(fast)
    assert call.meta["fused_region"]["ops"] == ["cast", "layer_norm", "cast", "silu"]
    spec = ir.loads(call.args[0])
    assert [n["dtype"] for n in spec["nodes"]] == ["float32", "float32", ir.dtype_name(dtype), ir.dtype_name(dtype)]
    check_against_eager(model, fast, x)


# ---------------------------------------------------------------- sizes, dtypes, layouts

class RMSSilu(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.norm = nn.RMSNorm(n, eps=1e-6)

    def forward(self, x):
        return F.silu(self.norm(x))


class LNRelu(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.norm = nn.LayerNorm(n)

    def forward(self, x):
        return F.relu(self.norm(x))


class DyTTanh(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.norm = DyT(n)

    def forward(self, x):
        return torch.tanh(self.norm(x))


SIZE_MODELS = {"rms_silu": RMSSilu, "ln_relu": LNRelu, "dyt": DyTTanh}


@needs_kernel
@pytest.mark.parametrize("N", [1, 7, 128, 1000, 4096, 12288])
@pytest.mark.parametrize("name", SIZE_MODELS)
def test_sizes_float32(name, N, launches):
    M = 3 if N <= 1000 else 2  # the interpreter is slow: few rows for large N
    # LayerNorm gets a mean far from 0 (var 1, mean 100): only an exactly centred variance
    # (not E[x^2] - mean^2, not a slightly wrong mean) stays within float32 rounding of eager
    # (x - mean itself carries the inputs' rounding, ~eps32 * 100 absolute, in eager as here;
    # a mean off by 0.1% would be 0.1 off)
    shift = 100.0 if name == "ln_relu" else 1.0
    x = torch.randn(M, N, device=DEVICE) + shift
    model, fast = lower(SIZE_MODELS[name](N), x)
    assert len(fused_calls(fast)) == 1
    with torch.no_grad():
        got, want = fast(x), model(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * shift)
    assert launches


@needs_kernel
@pytest.mark.parametrize("N", [7, 1000, 12288])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", SIZE_MODELS)
def test_dtypes(name, dtype, N, launches):
    x = (torch.randn(2, N, device=DEVICE) * 2 + 0.5).to(dtype)
    model, fast = lower(SIZE_MODELS[name](N), x, dtype=dtype)
    spec = ir.loads(fused_calls(fast)[0].args[0])
    assert {n["dtype"] for n in spec["nodes"]} == {ir.dtype_name(dtype)}
    check_against_eager(model, fast, x)
    assert launches


@needs_kernel
@pytest.mark.parametrize("N", [7, 1000, 12288])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_residual_stream_is_rounded_like_eager(dtype, N, launches):
    """The kernel rounds each node to its dtype where eager does: the bf16/fp16 residual stream
    it returns is bitwise eager's (round to nearest even, also in the interpreter)."""
    xs = [torch.randn(2, N, device=DEVICE, dtype=dtype) * 4 for _ in range(2)]
    model, fast = lower(AddRMS2(N), *xs, dtype=dtype)
    with torch.no_grad():
        (h, y), (h_want, y_want) = fast(*xs), model(*xs)
    assert torch.equal(h, h_want)
    close(y, y_want, dtype)
    assert len(launches) == 1


@needs_kernel
def test_wide_rows_without_statistics_are_tiled(monkeypatch):
    """Rows wider than a block in a region without row statistics (DyT, BatchNorm over a wide
    spatial size) put their column blocks on a second grid axis: 3 rows of 12288 are 3 x 3
    programs, not 3 each looping over 3 chunks; transposed inputs and per-channel (per-row)
    BatchNorm vectors are read right across the blocks."""
    grids, real = [], runtime.launch_args

    def spy(spec, inputs, config=None):
        launch = real(spec, inputs, config)
        grids.append(launch[1])
        return launch
    monkeypatch.setattr(runtime, "launch_args", spy)
    x = torch.randn(3, 12288, device=DEVICE)
    model, fast = lower(DyTTanh(12288), x)
    check_against_eager(model, fast, x)
    check_against_eager(model, fast, torch.randn(12288, 3, device=DEVICE).t())
    bn_x = torch.randn(2, 3, 2, 8200, device=DEVICE)
    model, fast = lower(BNRelu(3), bn_x, torch.randn_like(bn_x))
    check_against_eager(model, fast, bn_x, torch.randn_like(bn_x))
    # BatchNorm: a row per (n, c); H folds into the columns (no reduction): 16400, 5 blocks
    assert grids == [(3, 3), (3, 3), (2 * 3, 5)], grids


def _layouts(M, N):
    """(description, tensor) pairs of the same values laid out differently."""
    return [
        ("transposed", torch.randn(N, M, device=DEVICE).t()),
        ("sliced columns", torch.randn(M, 2 * N, device=DEVICE)[:, ::2]),
        ("sliced rows", torch.randn(2 * M, N, device=DEVICE)[1::2]),
        ("3-D contiguous", torch.randn(2, M, N, device=DEVICE)),
        ("3-D permuted", torch.randn(M, 2, N, device=DEVICE).transpose(0, 1)),
        ("3-D batch-broadcast residual", torch.randn(1, M, N, device=DEVICE).expand(2, M, N)),
    ]


@needs_kernel
@pytest.mark.parametrize("N", [7, 300])
def test_non_contiguous_and_3d_inputs(N, launches):
    M = 3
    for what, x in _layouts(M, N):
        r = torch.randn(x.shape, device=DEVICE)
        model, fast = lower(RMSAct(N), x.contiguous(), r)
        check_against_eager(model, fast, x, r)  # captured contiguous, run on this layout
        check_against_eager(model, fast, r, x)  # the layout as the second operand too
    assert len(launches) == 2 * len(_layouts(M, N))


@needs_kernel
def test_non_contiguous_batchnorm_and_dyt(launches):
    x = torch.randn(2, 5, 4, 3, device=DEVICE).permute(0, 2, 3, 1)  # NHWC memory, NCHW shape
    r = torch.randn(2, 4, 3, 5, device=DEVICE)
    model, fast = lower(BNRelu(4), x.contiguous(), r)
    check_against_eager(model, fast, x, r)
    y = torch.randn(40, 6, device=DEVICE).t()[:, ::3]
    model, fast = lower(DyTSmeLU(y.shape[-1]), y.contiguous())
    check_against_eager(model, fast, y)
    assert len(launches) == 2


# ---------------------------------------------------------------- backward

@needs_kernel
@pytest.mark.parametrize("kind", ["rms_prologue_silu_mul", "add_rms_two_outputs", "layernorm_gelu_erf_residual",
                                  "dyt_smelu", "batchnorm_eval_relu"])
def test_gradients_match_eager(kind, launches):
    make, shapes, _ = KINDS[kind]
    xs = [torch.randn(s, device=DEVICE) for s in shapes]
    model, fast = lower(make(), *xs)

    def grads(m):
        ins = [x.clone().requires_grad_() for x in xs]
        outs = flat(m(*ins))
        loss = sum((o * torch.linspace(-1, 2, o.numel(), device=o.device).view_as(o)).sum() for o in outs)
        params = [p for p in m.parameters() if p.requires_grad]
        return torch.autograd.grad(loss, ins + params, allow_unused=True), [n for n, _ in m.named_parameters()]

    want, want_names = grads(model)
    got, got_names = grads(fast)
    assert len(launches) == 1
    for g, w in zip(got[:len(xs)], want[:len(xs)]):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    wp = dict(zip(want_names, want[len(xs):]))
    gp = dict(zip(got_names, got[len(xs):]))
    assert gp and set(gp) <= set(wp)  # the lowered module keeps the original parameter names
    for name, g in gp.items():
        torch.testing.assert_close(g, wp[name], rtol=1e-5, atol=1e-5)


def _small_spec():
    """add -> layer_norm(w, b) -> gelu(tanh) * gate, outputs (residual, result)."""
    b = ir.SpecBuilder()
    x, r, w, bias, gate = (b.input(k, torch.float64) for k in ("x", "r", "w", "b", "g"))
    h = b.node("add", [x, r], {}, torch.float64)
    n = b.node("layer_norm", [h, w, bias], {"eps": 1e-5, "reduce_ndim": 1}, torch.float64)
    a = b.node("gelu", [n], {"approximate": "tanh"}, torch.float64)
    y = b.node("mul", [a, gate], {}, torch.float64)
    return ir.dumps(b.build([h[1], y[1]], n[1]))


@needs_kernel
def test_gradcheck_float64(launches):
    spec = _small_spec()
    M, N = 3, 6
    args = [torch.randn(s, device=DEVICE, dtype=torch.float64, requires_grad=True)
            for s in ((M, N), (M, N), (N,), (N,), (M, N))]
    fn = lambda *t: tuple(OP(spec, list(t)))  # noqa: E731
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-5)
    assert launches  # the forward that gradcheck differentiated numerically ran the kernel
    ref = run_reference(ir.loads(spec), args)
    for g, w in zip(fn(*args), ref):
        close(g, w, torch.float64)


# ---------------------------------------------------------------- torch.compile and torch.export

@needs_kernel
def test_torch_compile_sees_the_op(launches):
    xs = [torch.randn(4, 32, device=DEVICE) for _ in range(2)]
    model, fast = lower(AddRMS2(32), *xs)
    graphs = []

    def recording(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    got = flat(torch.compile(fast, fullgraph=True, backend=recording)(*xs))
    assert sum(n.target is OP for g in graphs for n in g.graph.nodes) == 1
    with torch.no_grad():
        want = flat(model(*xs))
    for g, w in zip(got, want):
        close(g, w, torch.float32)
    torch._dynamo.reset()
    compiled = torch.compile(fast, fullgraph=True, backend="aot_eager")  # fake impl + autograd traced
    got = flat(compiled(*xs))
    for g, w in zip(got, want):
        close(g, w, torch.float32)
    torch._dynamo.reset()
    assert launches


@needs_kernel
def test_torch_export_keeps_the_op(launches):
    xs = [torch.randn(3, 2, 40, device=DEVICE) for _ in range(2)]
    model, fast = lower(LNGelu(40), *xs)
    ep = torch.export.export(fast, tuple(xs))
    assert sum(n.target is OP for n in ep.graph.nodes) == 1
    assert "fxrewrite.fused_region" in str(ep.graph)
    with torch.no_grad():
        want = model(*xs)
    launches.clear()
    close(ep.module()(*xs), want, torch.float32)
    assert len(launches) == 1


# ---------------------------------------------------------------- extending the vocabulary

class LNEpilogue(nn.Module):
    def __init__(self, n, act):
        super().__init__()
        self.norm = nn.LayerNorm(n)
        self.act = act

    def forward(self, x):
        return self.act(self.norm(x))


@needs_kernel
@pytest.mark.parametrize("act,op", [(torch.sigmoid, "sigmoid"), (F.hardswish, "hardswish"),
                                    (F.relu6, "hardtanh"), (torch.tanh, "tanh")])
def test_vocabulary_epilogues_are_fused(act, op, launches):
    x = torch.randn(3, 24, device=DEVICE) * 3
    model, fast = lower(LNEpilogue(24, act), x)
    assert fused_calls(fast)[0].meta["fused_region"]["ops"] == ["layer_norm", op]
    check_against_eager(model, fast, x)


@needs_kernel
def test_new_op_needs_no_kernel_code(monkeypatch, launches):
    """A new elementwise op is one IR entry plus what FX op it comes from: the templates never
    name an operation, so the generated kernel computes it with no other change."""
    softsign = ir.OpDef("softsign", lambda a, at: aten.div.Tensor(a[0], aten.add.Tensor(aten.abs.default(a[0]), 1)),
                        lambda a, at, t: f"({a[0]} / (1.0 + tl.abs({a[0]})))")
    monkeypatch.setitem(ir.OPS, "softsign", softsign)
    monkeypatch.setitem(regions._UNARY, aten.softshrink.default, "softsign")  # any FX target works

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.RMSNorm(20)

        def forward(self, x):
            return aten.softshrink.default(self.norm(x))

    x = torch.randn(4, 20, device=DEVICE) * 2
    model, fast = lower(M(), x)
    call = fused_calls(fast)[0]
    assert call.meta["fused_region"]["ops"] == ["rms_norm", "softsign"]
    launch = emit.Launch(1, (("full", True), ("col", True)), ("float32", "float32"), "single", "interpreter")
    src = emit.generate(ir.loads(call.args[0]), launch)
    assert "tl.abs(" in src and "softsign" in src  # the kernel's name and body, from the one IR entry
    with torch.no_grad():
        got = fast(x)
        want = F.softsign(model.norm(x))  # what the region now means
    close(got, want, torch.float32)
    assert len(launches) == 1


# ---------------------------------------------------------------- report

class Mixed(nn.Module):
    """Two fusable norms and two that cannot be: GroupNorm (no template) and a batch-statistics
    batch_norm (training=True)."""

    def __init__(self):
        super().__init__()
        self.ln = nn.LayerNorm(5)
        self.rms = nn.RMSNorm(5)
        self.gn = nn.GroupNorm(2, 4)

    def forward(self, x):
        a = F.gelu(self.ln(x))
        b = torch.sigmoid(self.rms(x + 1.0))
        c = self.gn(x)
        d = F.batch_norm(x, torch.zeros(4), torch.ones(4), training=True)
        return a, b, c, d


def test_report_lists_regions_and_skips():
    x = torch.randn(2, 4, 3, 5)
    fast = optimize(randomise(Mixed()).eval(), (x,), lower="triton")
    rep = fast.report
    done = [r for r in rep.records if r.pass_name == "lower_triton" and r.action == "rewrote"]
    skipped = rep.skipped("lower_triton")
    assert len(done) == 2 == len(fused_calls(fast))
    assert "layer_norm" in done[0].detail and "gelu" in done[0].detail
    assert done[0].detail.startswith("layer_norm region: ") and done[1].detail.startswith("rms_norm region: ")
    assert "add" in done[1].detail and "rms_norm" in done[1].detail and "sigmoid" in done[1].detail
    for r in done:
        assert "fxrewrite.fused_region kernel _" in r.detail and "_fwd_kernel [spec " in r.detail
    reasons = {r.node: r.detail for r in skipped}
    assert len(reasons) == 2, rep
    assert any("GroupNorm" in d for d in reasons.values())
    assert any("training mode" in d for d in reasons.values())
    assert "lower_triton" in str(rep)


def test_regions_are_found_without_triton():
    """Region finding is FX only: it works (and reports) on any machine."""
    from fxrewrite.rewrite.capture import capture
    from fxrewrite.rewrite.canonicalize import canonicalize
    from fxrewrite.rewrite.report import Report
    rep = Report()
    gm = capture(randomise(RMSAct(16)).eval(), (torch.randn(2, 16), torch.randn(2, 16)), rep)
    canonicalize(gm, rep)
    found = regions.find_regions(gm)
    assert len(found) == 1
    region = found[0][1]
    assert region.ops == ["add", "add", "mul", "rms_norm", "silu", "mul"]
    assert region.name == "add_add_mul_rms_norm_silu_mul"


# ---------------------------------------------------------------- fallback and bench

def test_eager_fallback_without_interpreter(monkeypatch, launches):
    """CPU tensors without TRITON_INTERPRET=1 (or FXREWRITE_CODEGEN=reference): the eager
    reference runs, so a lowered model works everywhere."""
    xs = [torch.randn(3, 48) for _ in range(2)]
    model = randomise(AddRMS2(48)).eval()
    fast = optimize(model, xs, lower="triton")
    assert len(fused_calls(fast)) == 1
    for env in ({"TRITON_INTERPRET": None}, {"TRITON_INTERPRET": "1", "FXREWRITE_CODEGEN": "reference"}):
        for k, v in env.items():
            monkeypatch.delenv(k, raising=False) if v is None else monkeypatch.setenv(k, v)
        assert runtime.backend_for(xs) == "reference"
        with torch.no_grad():
            got, want = fast(*xs), model(*xs)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=0, atol=0)  # the same ATen calls: bitwise
    assert launches == []
    # the fallback's outputs never alias the inputs (a custom op's contract)
    spec = ir.loads(fused_calls(fast)[0].args[0])
    out = OP(ir.dumps(spec), [xs[0], xs[1], fast.get_parameter("norm.weight")])
    assert all(o.data_ptr() not in (xs[0].data_ptr(), xs[1].data_ptr()) for o in out)


@needs_kernel
def test_the_cached_backend_choice_follows_dtypes_and_the_environment(monkeypatch, launches):
    """The backend choice is cached with the launch plan: a call with an input of a dtype no
    kernel takes, after kernel calls with the same shapes, takes the reference, and so does a
    call after FXREWRITE_CODEGEN=reference is set; unset again, the kernel runs again."""
    xs = [torch.randn(3, 48, device=DEVICE) for _ in range(2)]
    model = randomise(AddRMS2(48)).to(DEVICE).eval()
    fast = optimize(model, xs, lower="triton")
    with torch.no_grad():
        fast(*xs)
        assert len(launches) == 1
        ints = [torch.randint(-3, 3, (3, 48), device=DEVICE) for _ in range(2)]  # int64: no kernel
        [call] = fused_calls(fast)
        spec = call.args[0]
        weight = fast.get_parameter("norm.weight")
        assert runtime.run_triton(spec, [ints[0], xs[1], weight]) is None
        runtime.call_region(spec, [ints[0], xs[1], weight])
        assert len(launches) == 1
        monkeypatch.setenv("FXREWRITE_CODEGEN", "reference")
        got = fast(*xs)
        assert len(launches) == 1
        monkeypatch.delenv("FXREWRITE_CODEGEN")
        again = fast(*xs)
        assert len(launches) == 2
    for g, w in zip(flat(got), flat(again)):
        close(g, w, torch.float32)


def test_bad_spec_is_rejected_clearly():
    spec = ir.loads(_small_spec())
    bad = dict(spec, nodes=[dict(spec["nodes"][0], op="nope")] + spec["nodes"][1:])
    with pytest.raises(ValueError, match="unknown op 'nope'"):
        ir.loads(ir.dumps(bad))
    with pytest.raises(ValueError, match="expects 5 inputs, got 1"):
        run_reference(spec, [torch.zeros(2)])


def test_bench_smoke_runs_in_the_interpreter():
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, str(root / "bench" / "gpu_norm.py"), "--smoke"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count(" ok (max scaled error") == 28  # 7 regions x 2 sizes x 2 dtypes
    assert "triton copy kernel ok" in proc.stdout  # the copy ceiling's kernel copies correctly
    assert proc.stdout.strip().endswith("smoke ok")


def test_dyt_inlined_by_dynamo_is_lowered_as_one_region():
    """Dynamo inlines a DyT module into `tanh(alpha * x) * weight + bias`; the lowering finds it
    by its one-element `alpha` parameter and fuses the whole of it, as for the module."""
    import torch._dynamo
    from fxrewrite import backend
    from fxrewrite.rewrite.nn import DyT
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), DyT(8), nn.GELU()).eval()
    with torch.no_grad():
        model[1].weight.normal_()
        model[1].bias.normal_()
    x = torch.randn(2, 3, 8)
    fast = torch.compile(model, backend="rewrite", options={"passes": [], "lower": "triton", "compiler": "eager"})
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-5, atol=1e-5)
    [r] = [r for r in backend.last_report().records if r.pass_name == "lower_triton" and r.action == "rewrote"]
    assert ":dyt" in r.detail and ":gelu" in r.detail and ":mul" in r.detail and ":add" in r.detail, r.detail


def test_a_tanh_activation_is_not_taken_for_a_dyt():
    """tanh(c * x) with a literal or a per-channel multiplier is an activation, not a DyT."""
    from fxrewrite.codegen.regions import describe_norm

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.randn(8))

        def forward(self, x):
            return torch.tanh(0.5 * x) + torch.tanh(self.scale * x)

    gm = optimize(M(), torch.randn(2, 8), passes=[])
    tanhs = [n for n in gm.graph.nodes if n.target is torch.ops.aten.tanh.default]
    assert len(tanhs) == 2 and all(describe_norm(gm, n) is None for n in tanhs)


# ---------------------------------------------------------------- direct call vs the op

@pytest.fixture
def op_calls(monkeypatch):
    """Calls that went through the custom op (not `call_region`'s direct path)."""
    calls = []
    real = runtime.OP

    def spy(spec, inputs):
        calls.append(spec)
        return real(spec, inputs)

    monkeypatch.setattr(runtime, "OP", spy)
    return calls


def test_plain_eager_calls_skip_the_dispatcher_others_do_not(op_calls, launches):
    """`call_region` runs the implementation directly only when no one needs to see the op: a
    no-grad eager call. With gradients to record, under a dispatch mode (FlopCounterMode here)
    or with fake tensors, it goes through the op, and all give the same values."""
    from torch.utils.flop_counter import FlopCounterMode
    from torch._subclasses.fake_tensor import FakeTensorMode
    xs = [torch.randn(5, 24, device=DEVICE or "cpu") for _ in range(2)]
    model, fast = lower(AddRMS2(24), *xs)
    with torch.no_grad():
        want = flat(model(*xs))
        direct = flat(fast(*xs))
    assert op_calls == []
    grad_in = [x.clone().requires_grad_() for x in xs]
    through_op = flat(fast(*grad_in))
    assert len(op_calls) == 1
    with torch.no_grad(), FlopCounterMode(display=False):
        under_mode = flat(fast(*xs))
    assert len(op_calls) == 2
    with FakeTensorMode(allow_non_fake_inputs=True) as mode, torch.no_grad():  # the weights stay real
        fake = flat(fast(*[mode.from_tensor(x) for x in xs]))
    assert len(op_calls) == 3 and [tuple(f.shape) for f in fake] == [tuple(w.shape) for w in want]
    for got in (direct, through_op, under_mode):
        for g, w in zip(got, want):
            close(g.detach(), w, torch.float32)
    if DEVICE is not None:
        assert len(launches) == 3  # direct, with grad, under the mode: the kernel each time


def test_region_call_is_pure_for_graph_analyses():
    from fxrewrite.rewrite import effects
    xs = [torch.randn(3, 16) for _ in range(2)]
    _, fast = lower(AddRMS2(16), *xs)
    (call,) = fused_calls(fast)
    assert call.target is runtime.call_region
    assert effects.is_pure_value(call) and not effects.may_have_effects(call)


@needs_kernel
@pytest.mark.parametrize("make, shapes", [(lambda: AddRMS2(40), [(6, 40), (6, 40)]),
                                          (lambda: LNGelu(24, "tanh"), [(2, 5, 24), (2, 5, 24)]),
                                          (lambda: DyTSmeLU(33), [(7, 33)])])
def test_lowered_backward_runs_the_generated_kernel_and_matches_eager(make, shapes, monkeypatch):
    """Gradients through a lowered region come from the generated backward kernel
    (`backward.run_backward`, not the eager recomputation) and equal eager autograd's."""
    kernels = []
    real = runtime.run_backward

    def spy(*args):
        got = real(*args)
        kernels.append(got is not None)
        return got

    monkeypatch.setattr(runtime, "run_backward", spy)
    xs = [torch.randn(s, device=DEVICE) for s in shapes]
    model, fast = lower(make(), *xs)
    grads = []
    for m in (model, fast):
        leaves = [x.clone().requires_grad_() for x in xs]
        outs = flat(m(*leaves))
        sum((o * torch.linspace(-1, 1, o.shape[-1], device=o.device)).sum() for o in outs).backward()
        grads.append([x.grad for x in leaves] + [p.grad for p in m.parameters() if p.grad is not None])
    assert kernels == [True]
    assert len(grads[0]) == len(grads[1])
    for want, got in zip(*grads):
        close(got, want, torch.float32)
