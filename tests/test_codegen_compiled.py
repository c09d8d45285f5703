"""Lowered regions inside `torch.compile`: no Python call per region is left in the compiled code.

Under AOTAutograd the `fxrewrite::fused_region` op decomposes (`codegen.compiled`): on CPU into
its eager reference (Inductor fuses it), on CUDA into a `wrap_triton` launch of the generated
kernel. The CUDA trace is checked here on fake CUDA tensors (no GPU needed: nothing runs);
`tests/test_gpu.py` runs it for real. `torch.export` and FXREWRITE_COMPILED_REGIONS=opaque keep
the op whole.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd

from fxrewrite import optimize
from fxrewrite.codegen import compiled, emit, ir, runtime

OP = runtime.OP


class AddRMS(nn.Module):
    """Residual add + RMSNorm + SiLU, two outputs (the residual stream and the normed one)."""

    def __init__(self, n=32):
        super().__init__()
        self.norm = nn.RMSNorm(n, eps=1e-6)
        self.lin = nn.Linear(n, n)

    def forward(self, x, r):
        h = x + r
        return h, self.lin(F.silu(self.norm(h)))


def _lowered(n=32, shape=(4, 6)):
    torch.manual_seed(0)
    model = AddRMS(n)
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 1.5)
    xs = (torch.randn(*shape, n), torch.randn(*shape, n))
    fast = optimize(model, xs, lower="triton")
    assert sum(map(runtime.is_region_call, fast.graph.nodes)) == 1, fast.report
    return model, fast, xs


def _recording_backend(graphs):
    def fw(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)
    return aot_autograd(fw_compiler=fw, bw_compiler=fw)


def _region_ops(gm) -> int:
    return sum(n.target is OP for n in gm.graph.nodes)


def test_compile_decomposes_the_region_on_cpu():
    """The forward and backward graphs AOTAutograd hands the compiler hold ATen ops, not the
    region op; values and gradients are eager's."""
    model, fast, xs = _lowered()
    graphs = []
    fn = torch.compile(fast, fullgraph=True, backend=_recording_backend(graphs))
    leaves = [x.clone().requires_grad_() for x in xs]
    got = fn(*leaves)
    sum(o.sum() for o in got).backward()
    assert graphs and all(_region_ops(g) == 0 for g in graphs)
    assert any(n.target is torch.ops.aten.rsqrt.default for g in graphs for n in g.graph.nodes)
    ref_leaves = [x.clone().requires_grad_() for x in xs]
    want = model(*ref_leaves)
    sum(o.sum() for o in want).backward()
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    for a, b in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5)


def test_opaque_mode_and_export_keep_the_op(monkeypatch):
    """FXREWRITE_COMPILED_REGIONS=opaque and torch.export keep one region op (so the decomposition
    test above is not passing for a graph that never had the op)."""
    model, fast, xs = _lowered()
    monkeypatch.setenv("FXREWRITE_COMPILED_REGIONS", "opaque")
    graphs = []
    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(fast, fullgraph=True, backend=_recording_backend(graphs))(*xs)
        want = model(*xs)
    assert [_region_ops(g) for g in graphs] == [1]
    [call] = [n for g in graphs for n in g.graph.nodes if n.target is OP]
    assert compiled.build_tag() in call.args + tuple(call.kwargs.values())
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    monkeypatch.delenv("FXREWRITE_COMPILED_REGIONS")
    ep = torch.export.export(fast, xs)
    assert _region_ops(ep.graph_module) == 1
    torch._dynamo.reset()


def test_decomposed_outputs_never_alias_the_inputs():
    """A region whose outputs include an input (identity) and the same value twice: traced as
    AOTAutograd traces it, every output is a fresh tensor, so an in-place write to one cannot
    reach the caller's input or another output."""
    from torch._subclasses.functional_tensor import dispatch_functionalize
    from torch.fx.experimental.proxy_tensor import make_fx
    b = ir.SpecBuilder()
    x, w = b.input("x", torch.float32), b.input("w", torch.float32)
    same = b.node("identity", [x], {}, torch.float32)
    normed = b.node("rms_norm", [same, w], {"eps": 1e-6, "eps_arg": 1e-6, "reduce_ndim": 1}, torch.float32)
    spec = ir.dumps(b.build([same[1], normed[1], same[1]], normed[1]))
    seen = {}

    def fn(x, y):
        outs = compiled.traced_reference(spec, [x, y])
        seen["aliased"] = [torch._C._is_alias_of(o, t) for o in outs for t in (x, y)]
        seen["among"] = [torch._C._is_alias_of(outs[0], outs[2])]
        return outs
    make_fx(dispatch_functionalize(fn), tracing_mode="fake")(torch.randn(3, 4), torch.randn(4))
    assert seen["aliased"] == [False] * 6 and seen["among"] == [False]


def _profiled_ops(fn, *xs) -> list[str]:
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn(*xs)
    return [e.key for e in prof.key_averages()]


def test_inductor_calls_no_region_op_per_forward(monkeypatch):
    """The profiler sees `fxrewrite::fused_region` in the compiled forward only when the op is
    kept opaque; decomposed, Inductor's own code runs the region. The opaque compilation comes
    first, with Inductor's caches on: the second must not be served the first's artifact (both
    capture the same graph but for the op's `build` argument). Dynamic sizes: another sequence
    length reuses the graph and is still right."""
    model, fast, xs = _lowered()
    monkeypatch.setenv("FXREWRITE_COMPILED_REGIONS", "opaque")
    torch._dynamo.reset()
    opaque = torch.compile(copy.deepcopy(fast), dynamic=True)
    with torch.no_grad():
        opaque(*xs)
        names = _profiled_ops(opaque, *xs)
    assert any("fxrewrite::fused_region" in n for n in names), names

    monkeypatch.delenv("FXREWRITE_COMPILED_REGIONS")
    torch._dynamo.reset()
    fn = torch.compile(fast, dynamic=True)
    with torch.no_grad():
        fn(*xs)
        names = _profiled_ops(fn, *xs)
        assert not any("fused_region" in n for n in names), names
        longer = (torch.randn(4, 9, 32), torch.randn(4, 9, 32))
        for g, w in zip(fn(*longer), model(*longer)):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


# ---------------------------------------------------------------- the CUDA trace, on fake tensors

def _fake_cuda(shapes, dynamic):
    """Fake CUDA tensors (no GPU needed) with the leading dims symbolic when `dynamic`."""
    from torch._dynamo.source import LocalSource
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

    mode = FakeTensorMode(shape_env=ShapeEnv(), static_shapes=False)
    fakes = []
    for i, shape in enumerate(shapes):  # the last (the row's) dim stays static, as models have it
        dims = [DimDynamic.DYNAMIC if dynamic and d < len(shape) - 1 else DimDynamic.STATIC
                for d in range(len(shape))]
        fakes.append(mode.from_tensor(torch.empty(shape), source=LocalSource(f"x{i}"),
                                      symbolic_context=StatelessSymbolicContext(dynamic_sizes=dims)))
    with mode:
        return [t.to("cuda") for t in fakes]


def _trace_functional(fn, inputs):
    """What AOTAutograd does to the op: trace it under FunctionalTensorMode."""
    from torch._subclasses.functional_tensor import dispatch_functionalize
    from torch.fx.experimental.proxy_tensor import make_fx
    return make_fx(dispatch_functionalize(fn), tracing_mode="fake")(*inputs)


@pytest.mark.parametrize("dynamic", [False, True])
def test_cuda_region_traces_to_its_kernel(monkeypatch, dynamic):
    """On CUDA the traced graph launches the generated kernel itself (a `wrap_triton` node, no
    region op), with the launch the eager path plans for the same shapes: same kernel, grid and
    integer arguments (symbolic where the sizes are)."""
    pytest.importorskip("triton")
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("FXREWRITE_CODEGEN", raising=False)
    model, _, xs = _lowered()
    [(spec, inputs)] = _region_calls(model, xs, monkeypatch)
    shapes = [tuple(t.shape) for t in inputs]
    gm = _trace_functional(lambda *t: OP(spec, list(t)), _fake_cuda(shapes, dynamic))
    assert _region_ops(gm) == 0
    [launch] = [n for n in gm.graph.nodes if "triton_kernel_wrapper" in str(n.target)]
    kernel = kernel_side_table.get_kernel(launch.kwargs["kernel_idx"])
    while not hasattr(kernel, "src"):  # num_warps travels as a one-config autotuner
        kernel = kernel.fn
    assert kernel.fn.__name__ == emit.kernel_name(ir.loads(spec))

    real = [torch.randn(s) for s in shapes]  # the eager plan for these shapes, targeting CUDA
    _, grid, ints, *_, consts, _, _ = runtime._plan_launch(spec, real, None, "cuda")
    kwargs = launch.kwargs["kwargs"]
    names = [k for k in kwargs if not k.startswith(("in", "out")) and k not in consts]
    assert len(names) == len(ints)
    for name, want in zip(names, ints):
        got = kwargs[name]
        if isinstance(got, torch.fx.Node):  # symbolic: the traced expression, at these sizes
            assert dynamic and name == "M"
        else:
            assert got == want, (name, got, want)
    assert isinstance(kwargs["M"], torch.fx.Node) == dynamic
    assert kwargs["BLOCK_N"] == consts["BLOCK_N"]
    assert (kwargs["ROWS"] == 64) if dynamic else (kwargs["ROWS"] == consts["ROWS"])
    if not dynamic:
        assert tuple(launch.kwargs["grid"][0])[:1] == grid


def _region_calls(model, xs, monkeypatch):
    """(spec, inputs) of every region call one eager run of the lowered model makes."""
    fast = optimize(model.eval(), xs, lower="triton")
    seen, run = [], runtime.run
    monkeypatch.setattr(runtime, "run", lambda spec, inputs: seen.append((spec, list(inputs))) or run(spec, inputs))
    with torch.no_grad():
        fast(*xs)
    monkeypatch.setattr(runtime, "run", run)
    return seen


def _kinds():
    """Region kinds of the codegen tests: prologue and epilogue, two outputs, LayerNorm, DyT +
    SmeLU, per-channel BatchNorm, a half-precision cast, a GLU on the two halves of one
    projection (strided views), a broadcast residual, a transposed (materialised) input."""
    from test_codegen import AddRMS2, BNRelu, CastNorm, DyTSmeLU, LNGelu, RMSAct
    from test_codegen_glu import GLU, FusedGateUp
    x = torch.randn(2, 5, 48)
    return {
        "rms_prologue_epilogue": (RMSAct(48), (x, torch.randn(2, 5, 48))),
        "add_rms_two_outputs": (AddRMS2(48), (x, torch.randn(2, 5, 48))),
        "layernorm_gelu_broadcast_residual": (LNGelu(48), (x, torch.randn(1, 5, 48))),
        "dyt_smelu": (DyTSmeLU(48), (x,)),
        "batchnorm_relu": (BNRelu(6), (torch.randn(2, 6, 4, 4), torch.randn(2, 6, 4, 4))),
        "cast_norm_bf16": (CastNorm(48, torch.bfloat16), (x.bfloat16(),)),
        "glu_fused_gate_up": (FusedGateUp(16, 20), (torch.randn(3, 4, 16),)),
        "glu_transposed": (GLU(), (torch.randn(48, 6).t(), torch.randn(6, 48))),
    }


@pytest.mark.parametrize("kind", list(_kinds()))
def test_every_region_kind_traces_to_its_kernel_on_cuda(monkeypatch, kind):
    """Each kind of region traces, on fake CUDA tensors of the eager call's shapes, strides and
    dtypes, to one launch of its generated kernel with the eager plan's integer arguments."""
    pytest.importorskip("triton")
    from torch._subclasses.fake_tensor import FakeTensorMode
    model, xs = _kinds()[kind]
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("FXREWRITE_CODEGEN", raising=False)
    calls = _region_calls(model, xs, monkeypatch)
    assert calls, kind
    for spec, inputs in calls:
        with FakeTensorMode():
            fakes = [torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="cuda") for t in inputs]
        gm = _trace_functional(lambda *t: OP(spec, list(t)), fakes)
        assert _region_ops(gm) == 0
        [launch] = [n for n in gm.graph.nodes if "triton_kernel_wrapper" in str(n.target)]
        _, grid, ints, *_ = runtime._plan_launch(spec, inputs, None, "cuda")
        kwargs = launch.kwargs["kwargs"]
        traced = [v for k, v in kwargs.items() if not k.startswith(("in", "out")) and k not in ("ROWS", "BLOCK_N")]
        assert traced == list(ints), (kind, traced, ints)
        assert tuple(launch.kwargs["grid"][0])[:1] == grid
