"""GLU regions: `silu(gate) * up` (SwiGLU) and `gelu(gate) * up` (GeGLU, both approximations)
become one generated kernel, seeded by the gated product (no norm), also when gate and up are
the two halves of one projection's output (read in place through the views' strides/offsets).

The kernels run in Triton's interpreter on CPU (TRITON_INTERPRET=1 set before Python starts) or
on a GPU; otherwise the kernel tests are skipped and only region finding is tested. A spy on
`runtime.run_triton` proves that a kernel (not the eager fallback) produced each result.
"""
from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fxrewrite import optimize
from fxrewrite.codegen import emit, ir, regions, runtime
from fxrewrite.codegen.reference import run_reference

warnings.filterwarnings("ignore", message=".*specialized.*")
INTERP = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERP else "cuda" if torch.cuda.is_available() else None
needs_kernel = pytest.mark.skipif(DEVICE is None, reason="no Triton target: set TRITON_INTERPRET=1 or use a GPU")

# |got - eager| <= atol + rtol |eager|. No reduction in a GLU: float32/float64 differ only by the
# exp/erf/tanh spellings (a few ulps); float16/bfloat16 results are rounded where eager rounds
# them, so at most a rounding step apart (fp16 ulp 2^-11, bf16 2^-8, relative).
TOL = {torch.float64: (1e-12, 1e-12), torch.float32: (1e-5, 1e-6), torch.float16: (2e-3, 2e-3),
       torch.bfloat16: (1.6e-2, 1.6e-2)}


def close(got, want, dtype=None):
    rtol, atol = TOL[dtype or want.dtype]
    assert got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got.double(), want.double(), rtol=rtol, atol=atol)


def region_calls(gm):
    return [n for n in gm.graph.nodes if runtime.is_region_call(n)]


def records(report, action="rewrote"):
    return [r for r in report.records if r.pass_name == "lower_triton" and r.action == action]


def ops_of(record) -> list[str]:
    """The region's ops, from its report line (`silu:silu -> mul:mul => kernel ...`)."""
    return [step.rsplit(":", 1)[1] for step in record.detail.split(" => ")[0].split(" -> ")]


def lower(model, *xs, dtype=torch.float32):
    torch.manual_seed(1)
    model = model.to(dtype=dtype, device=DEVICE or "cpu").eval()
    return model, optimize(model, xs, lower="triton")


def check_against_eager(model, fast, *xs):
    with torch.no_grad():
        want, got = model(*xs), fast(*xs)
    want, got = (list(v) if isinstance(v, (tuple, list)) else [v] for v in (want, got))
    assert len(got) == len(want)
    for g, w in zip(got, want):
        close(g, w)


# ---------------------------------------------------------------- modules

class SwiGLUMLP(nn.Module):
    """LLaMA's MLP: down(silu(gate(x)) * up(x))."""

    def __init__(self, d, i):
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(d, i, bias=False), nn.Linear(d, i, bias=False), nn.Linear(i, d)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class GeGLUMLP(SwiGLUMLP):
    def __init__(self, d, i, approximate="none"):
        super().__init__(d, i)
        self.approximate = approximate

    def forward(self, x):
        return self.down(F.gelu(self.gate(x), approximate=self.approximate) * self.up(x))


class FusedGateUp(nn.Module):
    """One projection makes gate and up together; they are split along the last dim."""

    def __init__(self, d, i, how="chunk", act="silu"):
        super().__init__()
        self.gate_up, self.down = nn.Linear(d, 2 * i), nn.Linear(i, d)
        self.i, self.how, self.act = i, how, act

    def forward(self, x):
        h = self.gate_up(x)
        if self.how == "chunk":
            gate, up = h.chunk(2, dim=-1)
        elif self.how == "split":
            gate, up = torch.split(h, self.i, dim=-1)
        else:
            gate, up = h[..., :self.i], h[..., self.i:]
        a = F.silu(gate) if self.act == "silu" else F.gelu(gate, approximate=self.act.split("_")[1])
        return self.down(up * a)  # up first: either operand order is a gated product


class GLU(nn.Module):
    """The gated product alone, on given gate and up (shapes, dtypes and layouts are free)."""

    def __init__(self, act="silu"):
        super().__init__()
        self.act = act

    def forward(self, gate, up):
        a = F.silu(gate) if self.act == "silu" else F.gelu(gate, approximate=self.act.split("_")[1])
        return a * up


ACTS = ["silu", "gelu_none", "gelu_tanh"]

# ---------------------------------------------------------------- the region is found and lowered

MLPS = {  # name: (module, op of the activation)
    "swiglu": (lambda: SwiGLUMLP(16, 24), "silu"),
    "geglu_erf": (lambda: GeGLUMLP(16, 24, "none"), "gelu"),
    "geglu_tanh": (lambda: GeGLUMLP(16, 24, "tanh"), "gelu"),
    "fused_chunk_silu": (lambda: FusedGateUp(16, 24, "chunk"), "silu"),
    "fused_split_gelu": (lambda: FusedGateUp(16, 24, "split", "gelu_none"), "gelu"),
    "fused_slice_gelu_tanh": (lambda: FusedGateUp(16, 24, "slice", "gelu_tanh"), "gelu"),
}


@needs_kernel
@pytest.mark.parametrize("name", MLPS)
def test_glu_mlp_is_one_region(name, launches):
    make, act = MLPS[name]
    x = torch.randn(2, 5, 16, device=DEVICE)
    model, fast = lower(make(), x)
    (call,) = region_calls(fast)
    assert call.meta["fused_region"]["ops"] == [act, "mul"]  # the down projection stays out
    (rec,) = records(fast.report)
    assert ops_of(rec) == [act, "mul"] and not records(fast.report, "skipped"), fast.report
    assert f"kernel _{act}_mul_fwd_kernel [spec " in rec.detail and rec.detail.startswith("glu region: ")
    spec = ir.loads(call.args[0])
    assert spec["norm"] is None and spec["nodes"][spec["glu"]]["op"] == "mul"
    if act == "gelu":
        assert spec["nodes"][0]["attrs"]["approximate"] == ("tanh" if "tanh" in name else "none")
    check_against_eager(model, fast, x)
    assert len(launches) == 1


@needs_kernel
@pytest.mark.parametrize("how", ["chunk", "split", "slice"])
def test_fused_gate_up_halves_are_read_in_place(how, monkeypatch):
    """The fused call gets the two halves as views of the one projection output: same storage,
    the row stride of the whole, up at offset I, nothing materialised by the launch."""
    seen = []
    real = runtime.run_triton

    def spy(spec, inputs, config=None):
        seen.append((spec, list(inputs)))
        return real(spec, inputs, config)

    monkeypatch.setattr(runtime, "run_triton", spy)
    I = 20  # noqa: E741
    x = torch.randn(3, 4, 16, device=DEVICE)
    model, fast = lower(FusedGateUp(16, I, how), x)
    check_against_eager(model, fast, x)
    ((spec, ins),) = seen
    assert len(ins) == 2
    gate, up = sorted(ins, key=lambda t: t.storage_offset())
    assert gate.untyped_storage().data_ptr() == up.untyped_storage().data_ptr()
    assert up.storage_offset() - gate.storage_offset() == I
    assert gate.stride() == up.stride() == (4 * 2 * I, 2 * I, 1)
    assert runtime.plan(ir.loads(spec), ins)[-1] == []  # no input was copied to be walked


# ---------------------------------------------------------------- odd shapes, dtypes, layouts

SHAPES = [(5, 7), (33, 100), (2, 3, 50), (1, 1), (2, 8200)]  # rows off the block, N not 2^k, 3-D, loop mode


@needs_kernel
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("act", ACTS)
def test_shapes_float32(act, shape, launches):
    g, u = torch.randn(shape, device=DEVICE) * 3, torch.randn(shape, device=DEVICE)
    model, fast = lower(GLU(act), g, u)
    assert len(region_calls(fast)) == 1
    check_against_eager(model, fast, g, u)
    assert len(launches) == 1


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("act", ACTS)
def test_dtypes(act, dtype, launches):
    g, u = (torch.randn(3, 2, 37, device=DEVICE) * 3).to(dtype), torch.randn(3, 2, 37, device=DEVICE).to(dtype)
    model, fast = lower(GLU(act), g, u, dtype=dtype)
    spec = ir.loads(region_calls(fast)[0].args[0])
    assert {n["dtype"] for n in spec["nodes"]} == {ir.dtype_name(dtype)}
    check_against_eager(model, fast, g, u)
    assert len(launches) == 1


def _layouts(M, N):
    """(description, tensor) pairs of the same shape laid out differently."""
    return [
        ("transposed", torch.randn(N, M, device=DEVICE).t()),
        ("sliced columns", torch.randn(M, 2 * N, device=DEVICE)[:, ::2]),
        ("sliced rows", torch.randn(2 * M, N, device=DEVICE)[1::2]),
        ("expanded rows", torch.randn(1, N, device=DEVICE).expand(M, N)),
    ]


@needs_kernel
@pytest.mark.parametrize("N", [7, 300])
def test_non_contiguous_inputs(N, launches):
    M = 3
    model, fast = lower(GLU("silu"), torch.randn(M, N, device=DEVICE), torch.randn(M, N, device=DEVICE))
    for what, t in _layouts(M, N):
        other = torch.randn(M, N, device=DEVICE)
        check_against_eager(model, fast, t, other)  # captured contiguous, run on this layout
        check_against_eager(model, fast, other, t)  # the layout as up
    x3 = torch.randn(4, 2, N, device=DEVICE).transpose(0, 1)  # 3-D permuted
    model, fast = lower(GLU("gelu_tanh"), x3.contiguous(), x3.contiguous())
    check_against_eager(model, fast, x3, torch.randn(2, 4, N, device=DEVICE))
    assert len(launches) == 2 * len(_layouts(M, N)) + 1


# ---------------------------------------------------------------- gradients

WIDE = {  # intermediate sizes wider than one block (8192 in float32): forward loops, backward tiles
    "swiglu_wide": lambda: SwiGLUMLP(8, 8200),
    "fused_chunk_silu_wide": lambda: FusedGateUp(8, 8200, "chunk"),
}


@needs_kernel
@pytest.mark.parametrize("name", ["swiglu", "geglu_tanh", "fused_chunk_silu", *WIDE])
def test_gradients_match_eager(name, launches, monkeypatch):
    """Gradients through a lowered GLU come from its generated backward kernel
    (`backward.run_backward`) and equal eager autograd's, wide rows included."""
    backward_kernels = []
    real = runtime.run_backward

    def spy(*args):
        got = real(*args)
        backward_kernels.append(got is not None)
        return got

    monkeypatch.setattr(runtime, "run_backward", spy)
    make = WIDE[name] if name in WIDE else MLPS[name][0]
    x = torch.randn(2, 3, 8 if name in WIDE else 16, device=DEVICE)
    model, fast = lower(make(), x)

    def grads(m):
        xin = x.clone().requires_grad_()
        out = m(xin)
        loss = (out * torch.linspace(-1, 2, out.numel(), device=out.device).view_as(out)).sum()
        names, params = zip(*[(n, p) for n, p in m.named_parameters() if p.requires_grad])
        return dict(zip(("x",) + names, torch.autograd.grad(loss, (xin,) + params)))

    want, got = grads(model), grads(fast)
    assert len(launches) == 1 and backward_kernels == [True]  # forward and backward kernels
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)


@needs_kernel
def test_gradcheck_float64(launches):
    b = ir.SpecBuilder()
    g, u = b.input("g", torch.float64), b.input("u", torch.float64)
    a = b.node("gelu", [g], {"approximate": "tanh"}, torch.float64)
    y = b.node("mul", [a, u], {}, torch.float64)
    spec = ir.dumps(b.build([a[1], y[1]], None, glu=y[1]))
    args = [torch.randn(3, 5, device=DEVICE, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    fn = lambda *t: tuple(runtime.OP(spec, list(t)))  # noqa: E731
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-5)
    assert launches
    for got, want in zip(fn(*args), run_reference(ir.loads(spec), args)):
        close(got, want)


@needs_kernel
def test_torch_compile_and_export_see_the_op_on_views(launches):
    """The halves reach the op as views under torch.compile (fake implementation, autograd) and
    torch.export too."""
    x = torch.randn(2, 3, 16, device=DEVICE)
    model, fast = lower(FusedGateUp(16, 12, "chunk"), x)
    with torch.no_grad():
        want = model(x)
    torch._dynamo.reset()
    close(torch.compile(fast, fullgraph=True, backend="aot_eager")(x), want)
    torch._dynamo.reset()
    ep = torch.export.export(fast, (x,))
    assert sum(n.target is runtime.OP for n in ep.graph.nodes) == 1
    close(ep.module()(x), want)
    assert launches


# ---------------------------------------------------------------- what joins, what is refused

class GLUCasts(nn.Module):
    """A half-precision GLU computed in float32 and cast back: casts join as prologue/epilogue."""

    def forward(self, gate, up):
        return (F.silu(gate.float()) * up.float()).to(gate.dtype)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_casts_join_the_region(dtype, launches):
    g, u = (torch.randn(4, 40, device=DEVICE) * 3).to(dtype), torch.randn(4, 40, device=DEVICE).to(dtype)
    model, fast = lower(GLUCasts(), g, u)
    (call,) = region_calls(fast)
    assert call.meta["fused_region"]["ops"] == ["cast", "silu", "cast", "mul", "cast"]
    check_against_eager(model, fast, g, u)
    assert len(launches) == 1


class ActReadElsewhere(nn.Module):
    """The activation is also returned: it leaves the region as a second output."""

    def forward(self, gate, up):
        a = F.silu(gate)
        return a * up, a


class SharedAct(nn.Module):
    """Two products of one activation: one region, both products its outputs."""

    def forward(self, gate, up, up2):
        a = F.gelu(gate)
        return a * up, up2 * a


@needs_kernel
def test_activation_read_elsewhere_is_an_output(launches):
    g, u = torch.randn(3, 10, device=DEVICE), torch.randn(3, 10, device=DEVICE)
    model, fast = lower(ActReadElsewhere(), g, u)
    (call,) = region_calls(fast)
    spec = ir.loads(call.args[0])
    assert [spec["nodes"][j]["op"] for j in spec["outputs"]] == ["silu", "mul"]
    check_against_eager(model, fast, g, u)
    model, fast = lower(SharedAct(), g, u, torch.randn(3, 10, device=DEVICE))
    (call,) = region_calls(fast)
    assert call.meta["fused_region"]["ops"] == ["gelu", "mul", "mul"]
    check_against_eager(model, fast, g, u, torch.randn(3, 10, device=DEVICE))
    assert len(launches) == 2


@needs_kernel
def test_broadcast_up_is_lowered_broadcast_gate_is_not(launches):
    """up may broadcast to the product (a per-column vector); a gate that broadcasts does not
    have the product's shape, so its activation is not of the region's domain: skipped."""
    g, u = torch.randn(3, 8, device=DEVICE), torch.randn(8, device=DEVICE)
    model, fast = lower(GLU("silu"), g, u)
    assert len(region_calls(fast)) == 1
    check_against_eager(model, fast, g, u)
    assert len(launches) == 1
    g, u = torch.randn(3, 1, device=DEVICE), torch.randn(3, 8, device=DEVICE)
    model, fast = lower(GLU("silu"), g, u)
    assert region_calls(fast) == [] and records(fast.report) == []
    (skip,) = records(fast.report, "skipped")
    assert "gate [3, 1] is not of the product's shape [3, 8]" in skip.detail, skip.detail
    check_against_eager(model, fast, g, u)


def test_a_product_in_a_norm_epilogue_seeds_nothing():
    """Norm regions are grown first, as before: silu(norm(x)) * up is the norm's region."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.RMSNorm(12)

        def forward(self, x, up):
            return F.silu(self.norm(x)) * up

    xs = (torch.randn(2, 12), torch.randn(2, 12))
    fast = optimize(M().eval(), xs, lower="triton")
    (rec,) = records(fast.report)
    assert ops_of(rec) == ["rms_norm", "silu", "mul"] and not records(fast.report, "skipped")


def test_regions_are_found_without_triton():
    """Region finding is FX only; a GLU region's spec has no norm and names its product."""
    from fxrewrite.rewrite.canonicalize import canonicalize
    from fxrewrite.rewrite.capture import capture
    from fxrewrite.rewrite.report import Report
    rep = Report()
    gm = capture(FusedGateUp(8, 6).eval(), (torch.randn(2, 8),), rep)
    canonicalize(gm, rep)
    ((seed, region),) = regions.find_regions(gm)
    assert isinstance(region, regions.Region) and region.kind == "glu" and region.seed is seed
    assert region.ops == ["silu", "mul"] and region.name == "silu_mul"
    assert region.spec["norm"] is None and "glu" in region.spec
    ir.validate(region.spec)


def test_glu_spec_validation_and_norm_specs_unchanged():
    b = ir.SpecBuilder()
    g, u = b.input("g", torch.float32), b.input("u", torch.float32)
    a = b.node("silu", [g], {}, torch.float32)
    y = b.node("mul", [a, u], {}, torch.float32)
    good = b.build([y[1]], None, glu=y[1])
    assert ir.loads(ir.dumps(good))["glu"] == 1 and ir.reduce_ndim(good) == 1
    with pytest.raises(ValueError, match="'glu' must name the gated product"):
        ir.validate(dict(good, glu=0))
    with pytest.raises(ValueError, match="include no silu or gelu"):
        ir.validate(dict(good, nodes=[dict(good["nodes"][0], op="relu"), good["nodes"][1]]))
    with pytest.raises(ValueError, match="norm region has no 'glu'"):
        ir.validate(dict(good, norm=1))
    b = ir.SpecBuilder()
    x = b.input("x", torch.float32)
    n = b.node("rms_norm", [x, None], {"eps": 1e-6, "eps_arg": 1e-6, "reduce_ndim": 1}, torch.float32)
    assert "glu" not in b.build([n[1]], n[1])  # norm specs (their text, hash, kernels) are as before


def test_emitted_glu_kernel_is_one_elementwise_pass():
    b = ir.SpecBuilder()
    g, u = b.input("g", torch.bfloat16), b.input("u", torch.bfloat16)
    a = b.node("silu", [g], {}, torch.bfloat16)
    y = b.node("mul", [a, u], {}, torch.bfloat16)
    spec = b.build([y[1]], None, glu=y[1])
    for mode in ("single", "loop", "tiled"):
        launch = emit.Launch(1, (("full", True), ("full", True)), ("bfloat16",) * 2, mode, "cuda")
        src = emit.generate(spec, launch)
        compile(src, "<glu>", "exec")
        assert "def _silu_mul_fwd_kernel(" in src and "rstd" not in src and "tl.sum" not in src
        assert src.count("tl.load(") == 2 and src.count("tl.store(") == 1


# ---------------------------------------------------------------- a language model

@needs_kernel
def test_llama_tiny_one_glu_region_per_mlp(launches):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=48, intermediate_size=96, num_attention_heads=2,
                                   num_key_value_heads=2, vocab_size=100, use_cache=False)
    model = transformers.LlamaModel(cfg).eval().to(DEVICE)
    with torch.no_grad():
        for layer in model.modules():
            if type(layer).__name__ == "LlamaRMSNorm":
                layer.weight.uniform_(0.5, 1.5)
    ids = {"input_ids": torch.randint(0, 100, (2, 7), device=DEVICE)}
    fast = optimize(model, ids, lower="triton")
    done = records(fast.report)
    assert not records(fast.report, "skipped"), fast.report
    glu = [r for r in done if ops_of(r) == ["silu", "mul"]]
    norms = [r for r in done if r not in glu]
    assert len(glu) == cfg.num_hidden_layers, fast.report
    assert all("kernel _silu_mul_fwd_kernel" in r.detail for r in glu)
    # the norm regions are what they were before GLU seeds existed
    assert [ops_of(r) for r in norms] == [["rms_norm"]] + [["add", "rms_norm"]] * 4
    assert len(done) == len(region_calls(fast)) == 7
    with torch.no_grad():
        want = model(**ids).last_hidden_state
        got = fast(**ids).last_hidden_state
    assert len(launches) == 7
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- bench

@needs_kernel
@pytest.mark.skipif(not INTERP, reason="the bench's smoke mode runs in the interpreter")
def test_bench_smoke_runs_in_the_interpreter():
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, str(root / "bench" / "gpu_glu.py"), "--smoke"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("smoke ok"), proc.stdout[-3000:]
