"""Generated Triton kernels on a real CUDA device (skipped where there is none).

The CPU suite runs the same kernels through Triton's interpreter; these tests prove that the
compiled kernels agree with eager on a GPU, forward and backward, in float32 and bfloat16, inside
`torch.compile(backend="rewrite")`, and on a transformers LLaMA-tiny.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                                 reason="needs a CUDA device and compiled (not interpreted) Triton")]

from fxrewrite import optimize  # noqa: E402
from fxrewrite.rewrite.nn import DyT, SmeLU  # noqa: E402


class AddRMSSiLU(nn.Module):
    """Prologue (residual add), norm, epilogue (SiLU), two outputs (the residual stream)."""

    def __init__(self, n):
        super().__init__()
        self.norm = nn.RMSNorm(n, eps=1e-6)

    def forward(self, x, r):
        h = x + r
        return h, F.silu(self.norm(h))


class LNGELU(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.norm = nn.LayerNorm(n)

    def forward(self, x):
        return F.gelu(self.norm(x), approximate="tanh")


class DyTSmeLU(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.norm = DyT(n)
        self.act = SmeLU(0.5)

    def forward(self, x):
        return self.act(self.norm(x))


def _random(m: nn.Module) -> nn.Module:
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.2 + 1.0)
    return m


def _fused(gm) -> int:
    from fxrewrite.codegen.runtime import is_region_call
    return sum(map(is_region_call, gm.graph.nodes))


def _inputs(cls, M, N, dtype):
    x = torch.randn(M, N, device="cuda", dtype=dtype)
    return (x, torch.randn_like(x)) if cls is AddRMSSiLU else (x,)


TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("cls", [AddRMSSiLU, LNGELU, DyTSmeLU])
@pytest.mark.parametrize("N", [7, 1000, 4096, 12288])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_region_matches_eager_on_cuda(cls, N, dtype):
    model = _random(cls(N)).cuda().to(dtype)
    xs = _inputs(cls, 64, N, dtype)
    fast = optimize(model, xs, lower="triton")
    assert _fused(fast) == 1, fast.report
    want, got = model(*xs), fast(*xs)
    want, got = (want if isinstance(want, tuple) else (want,)), (got if isinstance(got, tuple) else (got,))
    for w, g in zip(want, got):
        assert g.dtype == w.dtype and g.device == w.device
        err = (g.float() - w.float()).abs().max().item()
        assert err <= TOL[dtype] * max(1.0, w.float().abs().max().item()), (cls.__name__, N, dtype, err)


def test_non_contiguous_3d_input_on_cuda():
    model = _random(LNGELU(384)).cuda()
    x = torch.randn(384, 8, 16, device="cuda").permute(1, 2, 0)  # last dim strided
    fast = optimize(model, (x,), lower="triton")
    assert _fused(fast) == 1
    torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cls", [AddRMSSiLU, DyTSmeLU])
def test_backward_matches_eager_on_cuda(cls):
    model = _random(cls(768)).cuda()
    xs = _inputs(cls, 32, 768, torch.float32)
    fast = optimize(model, xs, lower="triton")
    assert _fused(fast) == 1
    grads = []
    for m in (model, fast):
        leaves = [x.clone().requires_grad_() for x in xs]
        out = m(*leaves)
        loss = sum((o * torch.linspace(-1, 1, o.shape[-1], device="cuda")).sum()
                   for o in (out if isinstance(out, tuple) else (out,)))
        loss.backward()
        grads.append([x.grad for x in leaves] + [p.grad for p in m.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1])
    for g_ref, g in zip(*grads):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-4)


def test_compile_backend_lowers_on_cuda():
    model = _random(AddRMSSiLU(1024)).cuda().eval()
    xs = _inputs(AddRMSSiLU, 128, 1024, torch.bfloat16)
    model = model.to(torch.bfloat16)
    from fxrewrite.backend import last_report
    compiled = torch.compile(model, backend="rewrite", options={"lower": "triton"})
    with torch.no_grad():
        got, want = compiled(*xs), model(*xs)
    report = last_report()
    assert report is not None and any(r.pass_name == "lower_triton" and r.action == "rewrote"
                                      for r in report.records), report
    for g, w in zip(got, want):
        torch.testing.assert_close(g.float(), w.float(), rtol=2e-2, atol=2e-2)


def test_llama_tiny_lowered_on_cuda():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).cuda().eval()
    ids = torch.randint(0, 128, (2, 16), device="cuda")
    fast = optimize(model, (ids,), lower="triton")
    assert _fused(fast) >= 4, fast.report  # 2 norms per layer + the final norm
    with torch.no_grad():
        want = model(ids).logits
        got = fast(ids)
    got = got.logits if hasattr(got, "logits") else (got["logits"] if isinstance(got, dict) else got[0])
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)


def test_cuda_graphs_replay_the_lowered_module_per_shape():
    """`cuda_graphs` gives the lowered module's values bit for bit (the same kernels, replayed),
    one graph per input shape, at most `max_graphs` kept, outputs not overwritten by the next call."""
    from fxrewrite.cudagraphs import cuda_graphs
    model = _random(AddRMSSiLU(512)).cuda().to(torch.bfloat16).eval()
    xs = _inputs(AddRMSSiLU, 4, 512, torch.bfloat16)
    fast = optimize(model, xs, lower="triton")
    graphed = cuda_graphs(fast, max_graphs=2)
    with torch.no_grad():
        for rows in (4, 1, 4, 7, 1):
            ins = _inputs(AddRMSSiLU, rows, 512, torch.bfloat16)
            got, want = graphed(*ins), fast(*ins)
            for g, w in zip(got, want):
                assert torch.equal(g, w), rows
        # 4: capture; 1: capture; 4: replay; 7: capture, evicts 1 (least recently used); 1: capture, evicts 4
        assert graphed.captures == 4 and len(graphed._graphs) == 2
        first = graphed(*xs)  # 4 rows again: capture 5
        kept = [t.clone() for t in first]
        graphed(*[torch.randn_like(x) for x in xs])
        assert all(torch.equal(a, b) for a, b in zip(first, kept))  # cloned outputs
    out = graphed(*[x.clone().requires_grad_() for x in xs])  # with gradients: eager, not a graph
    assert out[1].requires_grad and graphed.captures == 5


def test_torch_compile_launches_the_region_kernel_itself():
    """Under Inductor a lowered region is its generated kernel in the compiled code (the op
    decomposes to a `wrap_triton` launch, `codegen.compiled`): no `fxrewrite::fused_region` call
    in the profile, the kernel among the CUDA kernels, values as eager, for a second row count
    too (dynamic), and gradients through the compiled module as eager's."""
    from fxrewrite.codegen import emit, ir
    from fxrewrite.codegen.runtime import is_region_call
    model = _random(AddRMSSiLU(1024)).cuda().to(torch.bfloat16).eval()
    xs = _inputs(AddRMSSiLU, 128, 1024, torch.bfloat16)
    fast = optimize(model, xs, lower="triton")
    [call] = [n for n in fast.graph.nodes if is_region_call(n)]
    name = emit.kernel_name(ir.loads(call.args[0]))
    torch._dynamo.reset()
    fn = torch.compile(fast, dynamic=True)
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.no_grad():
        fn(*xs)
        with torch.profiler.profile(activities=acts) as prof:
            fn(*xs)
            torch.cuda.synchronize()
        names = [e.key for e in prof.key_averages()]
        assert not any("fxrewrite::fused_region" in n for n in names), names
        assert any(name in n for n in names), (name, names)
        for rows in (128, 37):
            ins = xs if rows == 128 else _inputs(AddRMSSiLU, rows, 1024, torch.bfloat16)
            for g, w in zip(fn(*ins), model(*ins)):
                torch.testing.assert_close(g.float(), w.float(), rtol=2e-2, atol=2e-2)
    model32 = _random(AddRMSSiLU(768)).cuda()
    xs32 = _inputs(AddRMSSiLU, 32, 768, torch.float32)
    fast32 = optimize(model32, xs32, lower="triton")
    torch._dynamo.reset()
    fn32 = torch.compile(fast32)
    grads = []
    for m in (model32, fn32):
        leaves = [x.clone().requires_grad_() for x in xs32]
        sum(o.float().sum() for o in m(*leaves)).backward()
        grads.append([x.grad for x in leaves])
    for g, w in zip(*grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
    torch._dynamo.reset()


def _compiled_kinds():
    from test_codegen_compiled import _kinds  # (tests/ is on the path, as for conftest's helpers)
    return _kinds()


@pytest.mark.parametrize("kind", ["rms_prologue_epilogue", "add_rms_two_outputs", "layernorm_gelu_broadcast_residual",
                                  "dyt_smelu", "batchnorm_relu", "cast_norm_bf16", "glu_fused_gate_up",
                                  "glu_transposed"])
def test_every_region_kind_compiles_to_its_kernel_on_cuda(kind):
    """Each region kind of `tests/test_codegen_compiled.py` (traced there on fake CUDA tensors)
    compiled by Inductor on the device: no region op called, values as the eager model's."""
    model, xs = _compiled_kinds()[kind]
    model = _random(model).cuda().eval()
    xs = tuple(x.cuda() for x in xs)
    fast = optimize(model, xs, lower="triton")
    assert _fused(fast) >= 1, fast.report
    torch._dynamo.reset()
    fn = torch.compile(fast)
    with torch.no_grad():
        want = model(*xs)
        fn(*xs)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            got = fn(*xs)
    assert not any("fxrewrite::fused_region" in e.key for e in prof.key_averages())
    want, got = (want if isinstance(want, tuple) else (want,)), (got if isinstance(got, tuple) else (got,))
    for g, w in zip(got, want):
        tol = 2e-2 if w.dtype == torch.bfloat16 else 1e-4
        torch.testing.assert_close(g.float(), w.float(), rtol=tol, atol=tol)
    torch._dynamo.reset()


def test_wide_glu_backward_is_tiled_on_cuda():
    """A SwiGLU product on LLaMA-7B's intermediate size (11008 > 8192): its backward runs the
    tiled kernel (not the eager recomputation), with eager's gradients."""
    from fxrewrite.codegen import backward, ir
    glu = {"version": 1, "inputs": [{"dtype": "bfloat16", "channel_view": 0}] * 2,
           "nodes": [{"op": "silu", "args": [["in", 0]], "attrs": {}, "dtype": "bfloat16"},
                     {"op": "mul", "args": [["v", 0], ["in", 1]], "attrs": {}, "dtype": "bfloat16"}],
           "outputs": [1], "norm": None, "glu": 1}
    spec = ir.dumps(glu)
    g, u = (torch.randn(64, 11008, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    dy = torch.randn_like(g)
    got = backward.run_backward(spec, [g, u], [dy], [True, True])
    assert got is not None
    leaves = [g.float().requires_grad_(), u.float().requires_grad_()]
    want = torch.autograd.grad(F.silu(leaves[0]) * leaves[1], leaves, dy.float())
    for a, b in zip(got, want):
        torch.testing.assert_close(a.float(), b, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("norm", ["rms", "layer"])
def test_wide_norm_backward_loops_on_cuda(norm):
    """RMSNorm/LayerNorm over 16384 features (wider than a block): the looped backward kernel,
    with several row blocks per program (the weight's partial sums added to across them), has
    the float32 autograd's gradients."""
    from fxrewrite.codegen import backward, ir
    n = 16384
    args = [["in", 0], ["in", 1]] + ([["in", 2]] if norm == "layer" else [])
    attrs = {"eps": 1e-6, "reduce_ndim": 1} | ({"eps_arg": 1e-6} if norm == "rms" else {})
    spec = ir.dumps({"version": 1, "inputs": [{"dtype": "bfloat16", "channel_view": 0}] * len(args),
                     "nodes": [{"op": f"{norm}_norm", "args": args, "attrs": attrs, "dtype": "bfloat16"}],
                     "outputs": [0], "norm": 0})
    x = torch.randn(4096, n, device="cuda", dtype=torch.bfloat16)
    params = [torch.randn(n, device="cuda", dtype=torch.bfloat16) for _ in args[1:]]
    dy = torch.randn_like(x)
    got = backward.run_backward(spec, [x, *params], [dy], [True] * len(args))
    assert got is not None
    leaves = [t.float().requires_grad_() for t in (x, *params)]
    y = (F.rms_norm(leaves[0], (n,), leaves[1], 1e-6) if norm == "rms"
         else F.layer_norm(leaves[0], (n,), leaves[1], leaves[2], 1e-6))
    want = torch.autograd.grad(y, leaves, dy.float())
    for a, b in zip(got, want):
        scale = b.abs().max().item()
        torch.testing.assert_close(a.float(), b, rtol=2e-2, atol=2e-2 * scale)
