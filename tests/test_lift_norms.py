"""lift_norms (rewrite/lift_norms.py): a written-out RMSNorm, as transformers writes it and
torch.export records it, becomes one exact `aten.rms_norm`; what it leaves decomposed, and why."""
import warnings

import pytest
import torch

from fxrewrite import optimize, verify
from fxrewrite.rewrite import ops

from conftest import RMSNormBlock, count, ids, notes, rewrote, tiny_llama

warnings.filterwarnings("ignore", message=".*specialized.*")
rsqrt = torch.ops.aten.rsqrt.default


def lifted(dtype=torch.float32, **kw):
    """(model, input, the model captured by torch.export and optimized with lift_norms)."""
    model, x = RMSNormBlock(**kw).eval().to(dtype), torch.randn(2, 3, 8, dtype=dtype)
    gm = optimize(torch.export.export(model, (x,)).module(), x, passes=["lift_norms"])
    return model, x, gm


# ---------------------------------------------------------------- lifted

def test_float32_norm_is_lifted_with_its_weight():
    model, x, gm = lifted()
    assert gm.report.count("lift_norms") == 1
    [r] = rewrote(gm, "lift_norms")
    assert r.detail == "decomposed RMSNorm over 8 (eps=1e-06) -> aten.rms_norm, with its weight"
    assert count(gm, ops.rms_norm) == 1 and count(gm, rsqrt) == 0
    verify(model, gm, x, rtol=0, atol=0)


def test_bfloat16_norm_keeps_its_casts_and_weight_multiply():
    """Computed in float32 and cast back: only the normalisation is lifted, so the rounding
    steps are those of the model."""
    model, x, gm = lifted(torch.bfloat16)
    assert gm.report.count("lift_norms") == 1
    [r] = rewrote(gm, "lift_norms")
    assert r.detail.endswith("normalisation only (casts/weight kept)")
    assert count(gm, ops.rms_norm) == 1 and count(gm, rsqrt) == 0
    verify(model, gm, x, rtol=0, atol=0)


def test_llama_lift_norms_is_exact():
    torch.manual_seed(0)
    model = tiny_llama()
    gm = optimize(model, ids(), passes=["lift_norms"])
    assert gm.report.count("lift_norms") == 5
    assert sum(n.target is ops.rms_norm for n in gm.graph.nodes) == 5
    assert not any(n.target is torch.ops.aten.rsqrt.default for n in gm.graph.nodes)
    verify(model, gm, ids(), rtol=0, atol=0)


# ---------------------------------------------------------------- left as written

def test_gemma_one_plus_weight_scale_is_left():
    """(1 + w) is not a weight: the normalisation is lifted, the scale stays as written."""
    model, x, gm = lifted(gemma=True)
    assert gm.report.count("lift_norms") == 1
    [r] = rewrote(gm, "lift_norms")
    assert r.detail.endswith("normalisation only (casts/weight kept)")
    [norm] = [n for n in gm.graph.nodes if n.target is ops.rms_norm]
    assert norm.kwargs.get("weight", norm.args[2] if len(norm.args) > 2 else None) is None
    assert any(n.target is ops.add and any(getattr(a, "op", None) == "get_attr" for a in n.args)
               for n in gm.graph.nodes)  # 1 + weight, still computed
    verify(model, gm, x, rtol=0, atol=0)


@pytest.mark.parametrize("kw", [dict(leak=True), dict(dims=(-2, -1))], ids=["intermediate-read-elsewhere", "two-dims"])
def test_norm_that_does_not_match_is_left_decomposed_and_says_so(kw):
    model, x, gm = lifted(**kw)
    assert gm.report.count("lift_norms") == 0 and not gm.report.skipped("lift_norms")
    assert notes(gm, "lift_norms") == ["no decomposed RMSNorm found"]
    assert count(gm, ops.rms_norm) == 0 and count(gm, rsqrt) == 1
    verify(model, gm, x, rtol=0, atol=0)


# ---------------------------------------------------------------- every capture route, every spelling

class Spelled(torch.nn.Module):
    """One RMSNorm written in the spellings hand-written code, timm and transformers use."""

    def __init__(self, spelling):
        super().__init__()
        self.fc, self.weight, self.spelling = torch.nn.Linear(8, 8), torch.nn.Parameter(torch.randn(8) + 1), spelling

    def forward(self, x):
        x = self.fc(x)
        if self.spelling == "operators":      # x ** 2, torch.mean(..., dim=...), rsqrt method
            var = torch.mean(x ** 2, dim=-1, keepdim=True)
            return self.weight * (x * (var + 1e-5).rsqrt())
        if self.spelling == "square":         # x.square(), eps first, torch.mul
            var = x.square().mean(dim=[-1], keepdim=True)
            return torch.mul(x * torch.rsqrt(1e-5 + var), self.weight)
        if self.spelling == "t5":             # T5LayerNorm: squares a float32 copy, scales x itself
            var = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
            return self.weight * (x * torch.rsqrt(var + 1e-5))
        raise ValueError(self.spelling)


@pytest.mark.parametrize("spelling", ["operators", "square", "t5"])
def test_every_spelling_is_lifted_under_symbolic_trace(spelling):
    model, x = Spelled(spelling).eval(), torch.randn(2, 3, 8)
    gm = optimize(model, x, passes=["lift_norms"])
    assert gm.report.count("lift_norms") == 1
    assert count(gm, ops.rms_norm) == 1 and count(gm, rsqrt) == 0
    verify(model, gm, x, rtol=0, atol=1e-6)


def test_norm_captured_by_symbolic_trace_is_lifted_too():
    """The transformers spelling (x.to(float32), x.pow(2).mean(-1, keepdim=True), torch.rsqrt,
    .to(x.dtype) through a traced `x.dtype`) is lifted as on the torch.export route."""
    model, x = RMSNormBlock().eval(), torch.randn(2, 3, 8)
    gm = optimize(model, x, passes=["lift_norms"])
    assert gm.report.count("lift_norms") == 1
    [r] = rewrote(gm, "lift_norms")
    assert r.detail.endswith("with its weight")
    assert count(gm, rsqrt) == 0 and count(gm, ops.cast) == 0  # the float32 no-op casts are gone
    verify(model, gm, x, rtol=0, atol=0)


def test_bfloat16_norm_under_symbolic_trace_keeps_its_casts():
    model, x = RMSNormBlock().eval().to(torch.bfloat16), torch.randn(2, 3, 8, dtype=torch.bfloat16)
    gm = optimize(model, x, passes=["lift_norms"])
    [r] = rewrote(gm, "lift_norms")
    assert r.detail.endswith("normalisation only (casts/weight kept)")
    assert count(gm, ops.cast) == 2  # to float32 before, back to bfloat16 after
    verify(model, gm, x, rtol=0, atol=0)


def test_t5_spelling_with_a_real_cast_is_left():
    """In bfloat16 T5 squares a float32 copy but scales the bfloat16 tensor: not one norm op."""
    model, x = Spelled("t5").eval().to(torch.bfloat16), torch.randn(2, 3, 8, dtype=torch.bfloat16)
    gm = optimize(model, x, passes=["lift_norms"])
    assert gm.report.count("lift_norms") == 0 and count(gm, rsqrt) == 1
    verify(model, gm, x, rtol=0, atol=0)


def test_norm_under_torch_compile_is_lifted_and_lowered():
    """Dynamo's spelling (call_method pow/mean/to, torch.rsqrt, weights as graph inputs) is the
    same canonical graph after freezing: one fused region per norm."""
    from fxrewrite import backend
    torch._dynamo.reset()
    model, x = RMSNormBlock().eval(), torch.randn(2, 3, 8)
    fast = torch.compile(model, backend="rewrite", options={"lower": "triton", "compiler": "eager"})
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-5, atol=1e-5)
    report = backend.last_report()
    assert report.count("lift_norms") == 1 and report.count("lower_triton") == 1
