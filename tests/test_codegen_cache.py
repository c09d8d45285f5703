"""The launch-plan and kernel caches of `codegen.runtime`: a cached launch must hold no tensor
(every call runs on its own inputs), and both caches stay bounded however many shapes a model
sees.

Like tests/test_codegen.py, the kernels run in Triton's interpreter on CPU when TRITON_INTERPRET=1
is set before Python starts, on CUDA with a GPU, and are skipped otherwise; the `launches` spy
proves that the kernel (not the eager fallback) produced each result.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fxrewrite.codegen import ir, runtime
from fxrewrite import optimize

OP = runtime.OP
INTERP = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERP else "cuda" if torch.cuda.is_available() else None
pytestmark = pytest.mark.skipif(DEVICE is None, reason="no Triton target: set TRITON_INTERPRET=1 or use a GPU")


def holds_tensor(obj) -> bool:
    if isinstance(obj, torch.Tensor):
        return True
    if isinstance(obj, (list, tuple)):
        return any(holds_tensor(o) for o in obj)
    if isinstance(obj, dict):
        return any(holds_tensor(o) for o in obj.values())
    return False


def assert_plans_hold_no_tensors():
    assert not any(holds_tensor(p) for p in runtime._LAUNCHES.values())


def assert_repeats_match_eager(model, fast, make_input, calls=5):
    """`calls` calls on fresh random inputs of one shape and layout, each against eager."""
    for _ in range(calls):
        x = make_input()
        with torch.no_grad():
            got, want = fast(x), model(x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


class BiasLayerNorm(nn.Module):
    """The reported model: a (5,) bias broadcast over a (4, 5) LayerNorm's rows must be
    materialised, as its inner dims (strides 0, 1) do not collapse to one stride."""

    def __init__(self):
        super().__init__()
        self.ln = nn.LayerNorm([4, 5])
        self.bias = nn.Parameter(torch.randn(5))

    def forward(self, x):
        return self.ln(x + self.bias)


class LN2Relu(nn.Module):
    def __init__(self, shape):
        super().__init__()
        self.norm = nn.LayerNorm(shape)

    def forward(self, x):
        return F.relu(self.norm(x))


def lowered(model, x):
    model = model.to(DEVICE).eval()
    fast = optimize(model, x, lower="triton")
    assert fast.report.count("lower_triton") == 1, fast.report
    return model, fast


def test_materialised_bias_is_not_stale_across_calls(launches):
    """The reported bug: the first call's copies were cached with the plan, so every later call
    normalised the first call's input (error ~1)."""
    model, fast = lowered(BiasLayerNorm(), torch.randn(3, 4, 5, device=DEVICE))
    assert_repeats_match_eager(model, fast, lambda: torch.randn(3, 4, 5, device=DEVICE))
    assert len(launches) == 5
    assert_plans_hold_no_tensors()


def test_repeated_calls_with_and_without_materialised_inputs(launches):
    """A transposed input to a two-dim LayerNorm must be copied on every call; a contiguous one
    to a one-dim LayerNorm needs no copy. Both launch plans are cached and reused."""
    runtime._LAUNCHES.clear()
    # copy needed: inner dims (4, 5) with strides (1, 4)
    model, fast = lowered(LN2Relu([4, 5]), torch.randn(3, 5, 4, device=DEVICE).transpose(1, 2))
    assert_repeats_match_eager(model, fast, lambda: torch.randn(3, 5, 4, device=DEVICE).transpose(1, 2))
    # no copy: rows of 5 contiguous values
    model, fast = lowered(LN2Relu(5), torch.randn(3, 4, 5, device=DEVICE))
    assert_repeats_match_eager(model, fast, lambda: torch.randn(3, 4, 5, device=DEVICE))
    assert len(launches) == 10
    assert len(runtime._LAUNCHES) == 2  # one plan per region, each reused for its 5 calls
    assert_plans_hold_no_tensors()


def test_caches_stay_bounded_over_many_shapes(monkeypatch, launches):
    """60 row counts over 20 regions (LayerNorms that differ in eps, so in kernel): never more
    than the bound in either cache, and evicted entries are rebuilt correctly."""
    bound = 8
    monkeypatch.setattr(runtime._LAUNCHES, "maxsize", bound)
    monkeypatch.setattr(runtime._KERNELS, "maxsize", bound)
    _, fast = lowered(LN2Relu(16), torch.randn(2, 16, device=DEVICE))
    spec = ir.loads(next(n for n in fast.graph.nodes if runtime.is_region_call(n)).args[0])
    (ln,) = [n for n in spec["nodes"] if n["op"] == "layer_norm"]
    w, b = torch.randn(16, device=DEVICE), torch.randn(16, device=DEVICE)
    for i in list(range(60)) + [0]:  # the last call needs the first, long evicted, plan and kernel
        eps = 1e-5 * (1 + i % 20)
        ln["attrs"]["eps"] = eps
        x = torch.randn(i + 1, 16, device=DEVICE)
        (got,) = OP(ir.dumps(spec), [x, w, b])
        torch.testing.assert_close(got, F.relu(F.layer_norm(x, (16,), w, b, eps)), rtol=1e-5, atol=1e-5)
        assert len(runtime._LAUNCHES) <= bound and len(runtime._KERNELS) <= bound
    assert len(launches) == 61
    assert len(runtime._KERNELS) == bound  # 20 kernels were built: the bound really evicted
    loaded = [name for name in sys.modules if name.startswith("fxrewrite_kernels.") and "_bwd_kernel_" not in name]
    assert len(loaded) <= bound, loaded  # evicted kernels' modules are unloaded too (backward kernels: their own cache)


def test_language_model_over_50_sequence_lengths_keeps_caches_bounded(monkeypatch, launches):
    """A decoder optimized once with a dynamic sequence axis and lowered, then run at 50
    sequence lengths: every call matches eager and launches its fused kernels, and the launch
    and kernel caches never pass their bound."""
    from conftest import tiny_llama
    bound = 8
    monkeypatch.setattr(runtime._LAUNCHES, "maxsize", bound)
    monkeypatch.setattr(runtime._KERNELS, "maxsize", bound)
    torch.manual_seed(0)
    model = tiny_llama().to(DEVICE)
    fast = optimize(model, {"input_ids": torch.randint(0, 100, (2, 8), device=DEVICE)}, lower="triton")
    assert fast.report.count("lower_triton") == 7, fast.report  # 5 norm regions, one GLU region per layer
    for seq in range(3, 53):
        ids = torch.randint(0, 100, (2, seq), device=DEVICE)
        with torch.no_grad():
            got, want = fast(input_ids=ids).last_hidden_state, model(input_ids=ids).last_hidden_state
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        assert len(runtime._LAUNCHES) <= bound and len(runtime._KERNELS) <= bound
    assert len(launches) == 7 * 50
