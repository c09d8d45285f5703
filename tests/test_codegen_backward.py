"""Generated backward kernels (`codegen.backward`) against eager autograd of the region's reference.

Every input gradient the kernel returns is compared with `torch.autograd.grad` of
`reference.run_reference` on the same inputs and output gradients, within per-dtype tolerances
scaled by the gradient's largest magnitude (weight gradients are sums over rows: an element can
cancel to near zero, where only an absolute error relative to the scale means anything).

The kernels run in Triton's interpreter on CPU (TRITON_INTERPRET=1 set before Python starts), or
on CUDA without it; otherwise the kernel tests are skipped.
"""
from __future__ import annotations

import importlib.util

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fxrewrite import optimize
from fxrewrite.codegen import backward, ir, runtime
from fxrewrite.codegen.reference import run_reference
from fxrewrite.rewrite.attrs import fetch_attr
from fxrewrite.rewrite.nn import DyT, SmeLU

from test_codegen import AddELNGelu, PRMSSiLU

# the interpreter evaluates masked-off lanes too (an exp that overflows, a 0/0): never stored
pytestmark = [pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning")]

INTERP = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERP else "cuda" if torch.cuda.is_available() else None
needs_kernel = pytest.mark.skipif(DEVICE is None, reason="no Triton target: set TRITON_INTERPRET=1 or use a GPU")

# |got - eager| <= rtol |eager| + atol max|eager|. Measured scaled errors (max |got - eager| /
# max |eager|), interpreter: float32 <= 2.2e-5 (DyT + tanh: the interpreter's portable tanh; the
# rest <= 1e-6), float64 <= 1.1e-15, float16 <= 5.9e-4, bfloat16 <= 3.1e-2 (DyT + SmeLU: eager
# rounds each op's value and gradient to bfloat16, the kernel keeps float32; against float64
# gradients the kernel is 6.3e-3 off, eager 2.6e-2). Half precision is also checked against
# float64 gradients: the kernel must be about as close as eager or closer; where it is further
# from eager than the tolerance, the float64 gradient decides (ELN's scalar beta in bfloat16, a
# sum over 700 elements: eager 5.9% off the float64 gradient, the kernel 0.47%).
TOL = {torch.float64: (1e-10, 1e-12), torch.float32: (2e-5, 2e-6), torch.float16: (4e-3, 4e-3),
       torch.bfloat16: (3e-2, 2e-2)}
WORST: dict = {}  # dtype -> worst scaled error seen (printed with -s)


def close(got, want, dtype, what=""):
    assert got is not None, f"{what}: no gradient"
    assert got.shape == want.shape and got.dtype == want.dtype, (what, got.shape, want.shape, got.dtype, want.dtype)
    rtol, atol = TOL[dtype]
    scale = want.double().abs().max().item() or 1.0
    err = (got.double() - want.double()).abs().max().item() / scale
    WORST[dtype] = max(WORST.get(dtype, 0.0), err)
    torch.testing.assert_close(got.double(), want.double(), rtol=rtol, atol=atol * scale, msg=lambda m: f"{what}: {m}")


@pytest.fixture(autouse=True, scope="module")
def _report_worst():
    yield
    print("\nworst scaled gradient error per dtype:", {str(k): f"{v:.2e}" for k, v in WORST.items()})


def randomise(m: nn.Module) -> nn.Module:
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.numel() == 1:  # a scalar of a formula (DyT alpha, SmeLU beta)
                p.fill_(0.7)
            else:
                p.copy_(torch.randn_like(p) * 0.3 + (1.0 if "weight" in name else 0.0))
    return m


def region(model: nn.Module, *xs, dtype=torch.float32):
    """(spec text, the fused call's input tensors) of the one region `optimize` lowers `model` to."""
    model = randomise(model).to(dtype=dtype, device=DEVICE).eval()
    xs = [x.to(DEVICE) for x in xs]
    fast = optimize(model, tuple(xs), lower="triton")
    (node,) = [n for n in fast.graph.nodes if runtime.is_region_call(n)]
    env = dict(zip([n for n in fast.graph.nodes if n.op == "placeholder"], xs))
    ins = [env[a] if a.op == "placeholder" else fetch_attr(fast, a.target) for a in node.args[1]]
    return node.args[0], [t.detach() for t in ins]


def eager_grads(spec_text, ins, grads, needs):
    leaves = [t.detach().clone().requires_grad_(n) for t, n in zip(ins, needs)]
    outs = run_reference(ir.loads(spec_text), leaves)
    pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
    wrt = [x for x, n in zip(leaves, needs) if n]
    got = iter(torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs], allow_unused=True))
    return [next(got) if n else None for n in needs]


def check(spec_text, ins, grad_mask=None, needs=None, dtype=None, grads=None):
    """Run the kernel and compare each input's gradient with eager's; returns the kernel's."""
    spec = ir.loads(spec_text)
    dtype = dtype or ins[0].dtype
    needs = needs if needs is not None else [True] * len(ins)
    if grads is None:
        domain = torch.broadcast_shapes(*[t.shape for t in ins])
        grad_mask = grad_mask or [True] * len(spec["outputs"])
        grads = [torch.randn(domain, device=ins[0].device).to(ir.DTYPES[spec["nodes"][j]["dtype"]]) if m else None
                 for j, m in zip(spec["outputs"], grad_mask)]
    want = eager_grads(spec_text, ins, grads, needs)
    got = backward.run_backward(spec_text, ins, grads, needs)
    assert got is not None, backward.unsupported(spec)
    assert len(got) == len(ins)
    half = dtype in (torch.bfloat16, torch.float16)
    exact = float64_grads(spec_text, ins, grads, needs) if half else want
    for i, (g, w, x) in enumerate(zip(got, want, exact)):
        what = f"input {i} ({tuple(ins[i].shape)}, {ins[i].dtype})"
        if w is None:
            assert g is None or not g.any(), f"input {i}: a gradient eager does not have"
            continue
        try:
            close(g, w, dtype, what)
        except AssertionError:
            if not half:
                raise
            # eager rounds every op's gradient to half precision: a sum over many elements (a
            # scalar's gradient) can drift further from the truth than the tolerance, so the
            # float64 gradient decides (and below, the kernel must be no further from it)
            close(g, x.to(w.dtype), dtype, what + " against float64")
    if half:
        no_less_accurate_than_eager(got, want, exact)
    return got


def as_float64(spec_text: str) -> str:
    """The region with every node (and cast) in float64: the exact gradients' stand-in."""
    spec = ir.loads(spec_text)
    nodes = [dict(n, dtype="float64", attrs=dict(n["attrs"], dtype="float64") if n["op"] == "cast" else n["attrs"])
             for n in spec["nodes"]]
    return ir.dumps(dict(spec, nodes=nodes, inputs=[dict(i, dtype="float64") for i in spec["inputs"]]))


def float64_grads(spec_text, ins, grads, needs) -> list:
    """The region's gradients computed in float64 throughout: the exact gradients' stand-in."""
    return eager_grads(as_float64(spec_text), [t.double() for t in ins],
                       [None if g is None else g.double() for g in grads], needs)


def no_less_accurate_than_eager(got, want, exact):
    """In half precision, compare with float64 gradients: the kernel (float32 adjoints) must be
    about as close to them as eager (which rounds every op's gradient) or closer."""
    for i, (g, w, x) in enumerate(zip(got, want, exact)):
        if x is None:
            continue
        scale = x.abs().max().item() or 1.0
        ours, theirs = ((g.double() - x).abs().max().item() / scale, (w.double() - x).abs().max().item() / scale)
        assert ours <= 1.5 * theirs + 4e-3, f"input {i}: kernel error {ours:.2e} vs eager's {theirs:.2e} (float64 truth)"


class RMS(nn.Module):
    def __init__(self, n, affine=True):
        super().__init__()
        self.norm = nn.RMSNorm(n, eps=1e-6, elementwise_affine=affine)

    def forward(self, x):
        return self.norm(x)


class AddRMS2(nn.Module):
    """Pre-norm step: the updated residual stream and its norm both leave the region."""

    def __init__(self, n):
        super().__init__()
        self.norm = nn.RMSNorm(n, eps=1e-6)

    def forward(self, x, r):
        h = x + r
        return h, self.norm(h)


class LNGelu(nn.Module):
    def __init__(self, n, approximate="none", affine=True):
        super().__init__()
        self.norm = nn.LayerNorm(n, elementwise_affine=affine)
        self.approximate = approximate

    def forward(self, x, r):
        return F.gelu(self.norm(x), approximate=self.approximate) + r


class LN(nn.Module):
    def __init__(self, n, affine=True):
        super().__init__()
        self.norm = nn.LayerNorm(n, elementwise_affine=affine)

    def forward(self, x):
        return self.norm(x)


class RMSSilu(RMS):
    def forward(self, x):
        return F.silu(self.norm(x))


class RMSAct(nn.Module):
    """residual add + bias add + scale (prologue) -> RMSNorm -> SiLU * gate (epilogue)."""

    def __init__(self, n):
        super().__init__()
        self.norm = nn.RMSNorm(n, eps=1e-6)
        self.bias = nn.Parameter(torch.zeros(n))

    def forward(self, x, r):
        h = (x + r + self.bias) * 0.5
        return F.silu(self.norm(h)) * r


class DyTSmeLU(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.norm = DyT(n)
        self.act = SmeLU(0.5)

    def forward(self, x):
        return self.act(self.norm(x))


class DyTTanh(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.norm = DyT(n)

    def forward(self, x):
        return torch.tanh(self.norm(x))


class RMSBiasAct(nn.Module):
    """RMSNorm, then a bias add and an activation (an MLP-style epilogue)."""

    def __init__(self, n, act):
        super().__init__()
        self.norm = nn.RMSNorm(n, eps=1e-6)
        self.bias = nn.Parameter(torch.zeros(n))
        self.act = act

    def forward(self, x):
        return self.act(self.norm(x) + self.bias)


class CastLN(nn.Module):
    """A half-precision stream normalised in float32 and cast back (LLaMA style)."""

    def __init__(self, n, dtype):
        super().__init__()
        self.norm = nn.LayerNorm(n)
        self.out_dtype = dtype

    def forward(self, x, r):
        return F.silu(self.norm(x.float()).to(self.out_dtype)) + r


SHAPES = [(5, 40), (3, 100), (2, 3, 40), (1, 7)]  # rows not a multiple of ROWS, N not a power of 2

KINDS = {  # name: (module factory of N, number of inputs, ops)
    "rmsnorm": (RMS, 1, ["rms_norm"]),
    "rmsnorm_no_affine": (lambda n: RMS(n, affine=False), 1, ["rms_norm"]),
    "add_rmsnorm": (AddRMS2, 2, ["add", "rms_norm"]),
    "layernorm": (LN, 1, ["layer_norm"]),
    "layernorm_no_affine": (lambda n: LN(n, affine=False), 1, ["layer_norm"]),
    "layernorm_gelu_erf": (LNGelu, 2, ["layer_norm", "gelu", "add"]),
    "layernorm_gelu_tanh": (lambda n: LNGelu(n, "tanh"), 2, ["layer_norm", "gelu", "add"]),
    "layernorm_no_affine_gelu": (lambda n: LNGelu(n, affine=False), 2, ["layer_norm", "gelu", "add"]),
    "rmsnorm_silu": (RMSSilu, 1, ["rms_norm", "silu"]),
    "prologue_rmsnorm_silu_mul": (RMSAct, 2, ["add", "add", "mul", "rms_norm", "silu", "mul"]),
    "dyt_smelu": (DyTSmeLU, 1, ["dyt", "smelu"]),
    "dyt_tanh": (DyTTanh, 1, ["dyt", "tanh"]),
    "bias_relu": (lambda n: RMSBiasAct(n, F.relu), 1, ["rms_norm", "add", "relu"]),
    "bias_hardswish": (lambda n: RMSBiasAct(n, F.hardswish), 1, ["rms_norm", "add", "hardswish"]),
    "bias_relu6": (lambda n: RMSBiasAct(n, F.relu6), 1, ["rms_norm", "add", "hardtanh"]),
    "bias_hardsigmoid": (lambda n: RMSBiasAct(n, F.hardsigmoid), 1, ["rms_norm", "add", "hardsigmoid"]),
    "bias_sigmoid": (lambda n: RMSBiasAct(n, torch.sigmoid), 1, ["rms_norm", "add", "sigmoid"]),
    "prms_silu": (lambda n: PRMSSiLU(n, 0.3), 1, ["prms_norm", "silu"]),
    "add_eln_gelu": (AddELNGelu, 2, ["add", "eln", "gelu"]),
}


def _inputs(shape, n_in, dtype=torch.float32):
    torch.manual_seed(0)
    return [(torch.randn(shape) * 2).to(dtype) for _ in range(n_in)]


@needs_kernel
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kind", KINDS)
def test_gradients_float32(kind, shape):
    make, n_in, ops = KINDS[kind]
    spec, ins = region(make(shape[-1]), *_inputs(shape, n_in))
    assert [n["op"] for n in ir.loads(spec)["nodes"]] == ops
    check(spec, ins)


@needs_kernel
@pytest.mark.parametrize("mask", [(True, True), (True, False), (False, True)], ids=["both", "h_only", "y_only"])
def test_two_outputs_with_gradients_on_both_or_one(mask):
    spec, ins = region(AddRMS2(100), *_inputs((2, 5, 100), 2))
    got = check(spec, ins, grad_mask=list(mask))
    assert got[0] is got[1]  # the residual add's operands share one gradient tensor, written once, as in eager


@needs_kernel
@pytest.mark.parametrize("which", range(3))
def test_only_some_inputs_need_gradients(which):
    """Frozen weights, or a frozen activation: only the needed gradients are computed."""
    spec, ins = region(AddRMS2(40), *_inputs((6, 40), 2))
    needs = [i == which for i in range(3)]
    got = check(spec, ins, needs=needs)
    assert [g is not None for g in got] == needs


@needs_kernel
@pytest.mark.parametrize("alpha_shape", [(1,), ()])
def test_dyt_alpha_and_smelu_beta_gradients(alpha_shape):
    """DyT's alpha is a (1,) parameter (FSDP2 shards no 0-d one); a hand-written 0-d one works too."""
    model = DyTSmeLU(33)
    model.norm.alpha = nn.Parameter(torch.full(alpha_shape, 0.5))
    spec, ins = region(model, *_inputs((9, 33), 1))
    assert [t.dim() for t in ins] == [2, len(alpha_shape), 1, 1, 0]  # x, alpha, weight, bias, beta
    got = check(spec, ins)
    assert got[1].shape == alpha_shape and got[1].abs().item() > 0  # the scalar alpha's gradient: a sum over all


@needs_kernel
@pytest.mark.parametrize("kind", ["rmsnorm", "add_rmsnorm", "layernorm_gelu_tanh", "dyt_smelu", "bias_hardswish",
                                  "prms_silu", "add_eln_gelu"])
def test_gradients_float64(kind):
    make, n_in, _ = KINDS[kind]
    spec, ins = region(make(40), *_inputs((5, 40), n_in, torch.float64), dtype=torch.float64)
    check(spec, ins, dtype=torch.float64)


@needs_kernel
@pytest.mark.parametrize("kind", ["rmsnorm", "add_rmsnorm", "layernorm_gelu_erf", "rmsnorm_silu", "dyt_smelu",
                                  "prms_silu", "add_eln_gelu"])
def test_gradients_bfloat16(kind):
    make, n_in, _ = KINDS[kind]
    spec, ins = region(make(100), *_inputs((7, 100), n_in, torch.bfloat16), dtype=torch.bfloat16)
    assert {n["dtype"] for n in ir.loads(spec)["nodes"]} == {"bfloat16"}
    check(spec, ins, dtype=torch.bfloat16)


@needs_kernel
@pytest.mark.parametrize("kind", ["add_rmsnorm", "layernorm_gelu_tanh"])
def test_gradients_float16(kind):
    make, n_in, _ = KINDS[kind]
    spec, ins = region(make(100), *_inputs((7, 100), n_in, torch.float16), dtype=torch.float16)
    check(spec, ins, dtype=torch.float16)


@needs_kernel
def test_bfloat16_stream_normalised_in_float32_with_casts():
    xs = _inputs((2, 3, 40), 2, torch.bfloat16)
    model = CastLN(40, torch.bfloat16)  # float32 norm parameters, as in LLaMA
    spec, ins = region(model.to(DEVICE), *xs, dtype=torch.float32)
    nodes = ir.loads(spec)["nodes"]
    assert [n["op"] for n in nodes] == ["cast", "layer_norm", "cast", "silu", "add"]
    assert [n["dtype"] for n in nodes] == ["float32", "float32", "bfloat16", "bfloat16", "bfloat16"]
    got = check(spec, ins, dtype=torch.bfloat16)
    assert [g.dtype for g in got] == [torch.bfloat16, torch.float32, torch.float32, torch.bfloat16]


# ---------------------------------------------------------------- layouts and broadcasting

@needs_kernel
def test_non_contiguous_inputs_and_expanded_output_gradients():
    spec, (_, w, b, _) = region(LNGelu(40), *_inputs((6, 40), 2))
    x = torch.randn(40, 6, device=DEVICE).t()            # transposed
    r = torch.randn(6, 80, device=DEVICE)[:, ::2]        # strided columns
    check(spec, [x, w, b, r])
    g = torch.ones((), device=DEVICE).expand(6, 40)      # what `.sum().backward()` sends: stride 0
    check(spec, [x, w, b, r], grads=[g])


@needs_kernel
def test_broadcast_residual_and_weight_shapes():
    """A residual broadcast over the batch (1, T, N) gets its gradient summed over the batch, one
    of shape (T, N) too; a user-expanded one (stride 0, logical shape (B, T, N)) a gradient per
    position, as autograd gives it."""
    spec, (x, r, w) = region(AddRMS2(40), *_inputs((3, 5, 40), 2))
    for r1 in (torch.randn(1, 5, 40, device=DEVICE), torch.randn(5, 40, device=DEVICE)):
        got = check(spec, [x, r1, w])
        assert got[1].shape == r1.shape
    got = check(spec, [x, torch.randn(5, 40, device=DEVICE).expand(3, 5, 40), w])
    assert got[1].shape == (3, 5, 40)


def _spec(nodes, inputs, outputs, norm, dtype=torch.float32):
    """A hand-built spec: nodes as (op, args, attrs); inputs as keys."""
    b = ir.SpecBuilder()
    ins = {k: b.input(k, dtype) for k in inputs}
    vals = []
    for op, args, attrs in nodes:
        a = [ins[x] if isinstance(x, str) else vals[x[1]] if isinstance(x, tuple) else ["lit", x] if x is not None
             else None for x in args]
        vals.append(b.node(op, a, attrs, dtype))
    return ir.dumps(b.build(outputs, norm))


@needs_kernel
def test_hand_built_sub_div_and_row_broadcast():
    """sub with alpha, div by a per-row scale (a (M, 1) input: the `row` class), mul by a
    per-column vector, hardtanh: every binary rule and every broadcast class of gradient."""
    spec = _spec([("sub", ["x", "r"], {"alpha": 0.5}),                          # 0
                  ("div", [("v", 0), "s"], {}),                                 # 1
                  ("rms_norm", [("v", 1), "w"], {"eps": 1e-5, "eps_arg": 1e-5, "reduce_ndim": 1}),  # 2
                  ("mul", [("v", 2), "c"], {}),                                 # 3
                  ("hardtanh", [("v", 3)], {"min": -1.0, "max": 2.0}),          # 4
                  ("sub", [("v", 4), ("v", 0)], {})],                           # 5
                 ["x", "r", "s", "w", "c"], [1, 5], 2)
    M, N = 11, 24
    ins = [torch.randn(M, N), torch.randn(M, N), torch.rand(M, 1) + 0.5, torch.randn(N), torch.randn(1, N)]
    got = check(spec, [t.to(DEVICE) for t in ins])
    assert [tuple(g.shape) for g in got] == [(M, N), (M, N), (M, 1), (N,), (1, N)]


@needs_kernel
def test_norm_over_two_trailing_dims():
    """LayerNorm over (H, W): rows of N = H * W, weights of shape (H, W)."""
    spec = _spec([("layer_norm", ["x", "w", "b"], {"eps": 1e-5, "reduce_ndim": 2}), ("gelu", [("v", 0)], {})],
                 ["x", "w", "b"], [1], 0)
    ins = [torch.randn(3, 4, 5, device=DEVICE), torch.randn(4, 5, device=DEVICE), torch.randn(4, 5, device=DEVICE)]
    check(spec, ins)


@needs_kernel
def test_many_rows_use_few_programs():
    """More row blocks than programs: each program loops over several, its partial weight sums
    accumulate across them."""
    spec, ins = region(AddRMS2(8), *_inputs((300, 8), 2))
    check(spec, ins)


# ---------------------------------------------------------------- what falls back

class BNAct(nn.Module):
    """Inference BatchNorm (not folded: no conv before it) and an activation."""

    def __init__(self, bn: nn.Module):
        super().__init__()
        self.bn = bn

    def forward(self, x):
        return F.silu(self.bn(x))


def _bn(bn):
    bn = randomise(bn)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2.0)
    return bn


@needs_kernel
@pytest.mark.parametrize("case", ["bn2d", "bn2d_no_affine", "bn1d_3d", "bn1d_2d", "bn3d_dtype_f64"])
def test_batchnorm_regions(case):
    """Inference BatchNorm's gradients for x, weight, bias and (were they to require it) the
    running statistics: its per-channel vectors are per-row inputs of the (N * C * H, W) rows
    (per-column for a BatchNorm1d on (N, C)), summed over the columns and the batch."""
    torch.manual_seed(0)
    bn, shape = {"bn2d": (nn.BatchNorm2d(4), (2, 4, 5, 3)), "bn2d_no_affine": (nn.BatchNorm2d(4, affine=False), (2, 4, 5, 3)),
                 "bn1d_3d": (nn.BatchNorm1d(6), (3, 6, 7)), "bn1d_2d": (nn.BatchNorm1d(6), (5, 6)),
                 "bn3d_dtype_f64": (nn.BatchNorm3d(3), (2, 3, 2, 3, 4))}[case]
    dtype = torch.float64 if "f64" in case else torch.float32
    model = BNAct(_bn(bn)).eval().to(dtype)
    torch.manual_seed(1)
    xs = [torch.randn(shape, dtype=dtype)]
    fast = optimize(model, tuple(xs), lower="triton")
    (node,) = [n for n in fast.graph.nodes if runtime.is_region_call(n)]
    assert "batch_norm" in [n["op"] for n in ir.loads(node.args[0])["nodes"]]
    env = {n: xs[0] for n in fast.graph.nodes if n.op == "placeholder"}
    ins = [env[a] if a.op == "placeholder" else fetch_attr(fast, a.target).detach() for a in node.args[1]]
    ins = [t.to(DEVICE) for t in ins]
    params = dict(fast.named_parameters())
    needs = [a.op == "placeholder" or a.target in params for a in node.args[1]]  # not the running statistics
    dy = torch.randn(shape, dtype=dtype, device=DEVICE)
    got = check(node.args[0], ins, needs=needs, grads=[dy])
    assert [g is not None for g in got] == needs
    assert [g.shape for g in got if g is not None] == [t.shape for t, n in zip(ins, needs) if n]
    if case == "bn2d":  # the statistics' gradients (no eager autograd for them): the formula's
        got = backward.run_backward(node.args[0], ins, [dy], [True] * 5)
        leaves = [t.detach().clone().requires_grad_() for t in ins]
        lx, lw, lb, lm, lv = (leaves[0],) + tuple(t.view(4, 1, 1) for t in leaves[1:])
        y = F.silu((lx - lm) * torch.rsqrt(lv + bn.eps) * lw + lb)
        for g, want in zip(got, torch.autograd.grad(y, leaves, dy)):
            close(g, want, dtype)


def test_an_op_without_a_rule_has_no_kernel(monkeypatch):
    """A region with an op the backward has no rule for returns None (the caller differentiates
    the eager reference)."""
    spec = _spec([("rms_norm", ["x", "w"], {"eps": 1e-6, "eps_arg": 1e-6, "reduce_ndim": 1}), ("relu", [("v", 0)], {})],
                 ["x", "w"], [1], 0)
    monkeypatch.delitem(backward.RULES, "relu")
    monkeypatch.setattr(backward, "_UNSUPPORTED", backward.LRU(8))
    assert "no derivative rule for 'relu'" == backward.unsupported(ir.loads(spec))
    x, w = torch.randn(3, 8), torch.randn(8)
    assert backward.run_backward(spec, [x, w], [torch.ones_like(x)], [True, True]) is None


@pytest.mark.skipif(not INTERP, reason="runs the kernel in Triton's interpreter")
def test_glu_region_has_a_backward_kernel():
    """A GLU region (no norm) gets the elementwise part of the same kernel."""
    glu = ir.dumps({"version": 1, "inputs": [{"dtype": "float32", "channel_view": 0}] * 2,
                    "nodes": [{"op": "silu", "args": [["in", 0]], "attrs": {}, "dtype": "float32"},
                              {"op": "mul", "args": [["v", 0], ["in", 1]], "attrs": {}, "dtype": "float32"}],
                    "outputs": [1], "norm": None, "glu": 1})
    assert backward.unsupported(ir.loads(glu)) is None
    g, u, dy = torch.randn(3, 37), torch.randn(3, 37), torch.randn(3, 37)
    got = backward.run_backward(glu, [g, u], [dy], [True, True])
    leaves = [g.clone().requires_grad_(), u.clone().requires_grad_()]
    want = torch.autograd.grad(F.silu(leaves[0]) * leaves[1], leaves, dy)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


_GLU = ir.dumps({"version": 1, "inputs": [{"dtype": "float32", "channel_view": 0}] * 2,  # silu(gate) * up
                 "nodes": [{"op": "silu", "args": [["in", 0]], "attrs": {}, "dtype": "float32"},
                           {"op": "mul", "args": [["v", 0], ["in", 1]], "attrs": {}, "dtype": "float32"}],
                 "outputs": [1], "norm": None, "glu": 1})


@needs_kernel
@pytest.mark.parametrize("up_shape", [(3, 8200), (8200,)])
def test_wide_glu_rows_are_tiled(up_shape):
    """A GLU row wider than one block (LLaMA's intermediate sizes are wider than 8192) is split
    over column blocks: the kernel's gradients are eager's, `up` per element or per column."""
    check(_GLU, [torch.randn(3, 8200, device=DEVICE), torch.randn(up_shape, device=DEVICE)])


@needs_kernel
def test_wide_dyt_rows_are_tiled():
    """DyT (no row statistics) + SmeLU on rows of 8200: alpha's and beta's gradients are sums over
    every program and column block, weight's and bias's over the rows."""
    spec, ins = region(DyTSmeLU(8200), *_inputs((3, 8200), 1))
    got = check(spec, ins)
    assert got[1].abs().item() > 0


@needs_kernel
@pytest.mark.parametrize("kind", ["rmsnorm", "add_rmsnorm", "layernorm_gelu_erf", "prologue_rmsnorm_silu_mul",
                                  "layernorm_no_affine", "prms_silu"])
def test_wide_norm_rows_loop_over_column_chunks(kind):
    """RMSNorm/LayerNorm rows wider than one block: the statistics, then the backward's row
    means, then the gradients, each a pass over column chunks. 9 rows (a row per block) on 4
    programs (with weights): a program adds several row blocks into its weight-gradient
    partial sums."""
    make, n_in, _ = KINDS[kind]
    spec, ins = region(make(8200), *_inputs((9, 8200), n_in))
    plan = backward._plan(spec, ins, [torch.randn(9, 8200)] * len(ir.loads(spec)["outputs"]), [True] * len(ins),
                          "interpreter")
    reduces = "col" in plan.classes  # weights: 4 programs share the 9 row blocks; else one per block
    assert plan.grid == ((4,) if reduces else (9,)) and plan.consts["BLOCK_N"] == 4096 and plan.consts["ROWS"] == 1
    check(spec, ins)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_wide_norm_rows_other_dtypes(dtype):
    """float64 blocks are half as wide (rows of 4100 loop); bfloat16 computes in float32."""
    n = 4100 if dtype == torch.float64 else 8200
    spec, ins = region(AddRMS2(n), *_inputs((3, n), 2, dtype), dtype=dtype)
    check(spec, ins, dtype=dtype)


@needs_kernel
def test_wide_rows_with_a_per_row_input():
    """A looped region's per-row gradient is summed over the column chunks; with sub, div by
    the per-row scale, a per-column scale after the norm, hardtanh and a second output."""
    spec = _spec([("sub", ["x", "r"], {"alpha": 0.5}),
                  ("div", [("v", 0), "s"], {}),
                  ("layer_norm", [("v", 1), "w", None], {"eps": 1e-5, "reduce_ndim": 1}),
                  ("mul", [("v", 2), "c"], {}),
                  ("hardtanh", [("v", 3)], {"min": -1.0, "max": 2.0}),
                  ("sub", [("v", 4), ("v", 0)], {})],
                 ["x", "r", "s", "w", "c"], [1, 5], 2)
    M, N = 5, 8200
    ins = [torch.randn(M, N), torch.randn(M, N), torch.rand(M, 1) + 0.5, torch.randn(N), torch.randn(1, N)]
    got = check(spec, [t.to(DEVICE) for t in ins])
    assert [tuple(g.shape) for g in got] == [(M, N), (M, N), (M, 1), (N,), (1, N)]


def test_a_tiled_regions_per_row_gradient_is_not_planned():
    """A region without row statistics tiles wide rows over a second grid axis; a per-row
    input's gradient would sum over the column blocks (programs of their own), so it is not
    planned; the same shapes without it are (the planner itself is asked)."""
    x, dy, per_row = torch.randn(2, 8200), torch.ones(2, 8200), torch.randn(2, 1)
    assert backward._plan(_GLU, [x, per_row], [dy], [True, True], "interpreter") == "unsupported"
    if importlib.util.find_spec("triton") is not None:  # (planning loads the kernel module)
        plan = backward._plan(_GLU, [x, per_row], [dy], [True, False], "interpreter")
        assert plan != "unsupported" and plan.grid[1] == 3  # 8200 columns in blocks of 4096


def test_calls_autograd_must_see_return_none():
    """A double backward (gradients that require grad) and calls without a Triton target."""
    spec = _spec([("rms_norm", ["x", "w"], {"eps": 1e-6, "eps_arg": 1e-6, "reduce_ndim": 1})], ["x", "w"], [0], 0)
    x, w = torch.randn(3, 8), torch.randn(8)
    g = torch.ones(3, 8, requires_grad=True)
    assert backward.run_backward(spec, [x, w], [g], [True, True]) is None
    if not INTERP:
        assert backward.run_backward(spec, [x, w], [torch.ones(3, 8)], [True, True]) is None


@needs_kernel
def test_kernels_are_cached_and_named():
    spec, ins = region(AddRMS2(40), *_inputs((4, 40), 2))
    grads = [torch.randn(4, 40, device=DEVICE)] * 2
    backward.run_backward(spec, ins, grads, [True] * 3)
    n_kernels = len(backward._KERNELS._d)
    backward.run_backward(spec, [t.clone() for t in ins], grads, [True] * 3)
    assert len(backward._KERNELS._d) == n_kernels
    src = backward.generate(ir.loads(spec), backward.BwdLaunch(
        ("full", "full", "col"), ("float32",) * 3, ("float32", "float32"), (True, True, True),
        ("float32", "float32", "float32"), "interpreter"))
    assert "def _add_rms_norm_bwd_kernel(" in src
    assert "acc2 += tl.sum(" in src  # the weight's gradient: per-program partial sums


# ---------------------------------------------------------------- the benchmark's smoke mode

def test_bench_smoke_runs_in_the_interpreter():
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, str(root / "bench" / "gpu_norm_backward.py"), "--smoke"], cwd=root,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count(" ok (max scaled error") == 18  # 3 regions x 3 shapes (one looped) x 2 dtypes
    assert proc.stdout.strip().endswith("smoke ok")
