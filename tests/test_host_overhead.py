"""bench/host_overhead.py times three ways of running one lowered region (the op, its launcher,
the Triton kernel called directly with the launcher's arguments): they must compute the same
values, or the differences it reports would compare different work. No timing is asserted.

Like tests/test_codegen.py, the kernels run in Triton's interpreter on CPU when
TRITON_INTERPRET=1 is set before Python starts, on CUDA with a GPU, and are skipped otherwise.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

from fxrewrite.codegen import ir, runtime
from fxrewrite.codegen.reference import run_reference

INTERP = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERP else "cuda" if torch.cuda.is_available() else None
pytestmark = pytest.mark.skipif(DEVICE is None, reason="no Triton target: set TRITON_INTERPRET=1 or use a GPU")

BENCH = Path(__file__).resolve().parent.parent / "bench" / "host_overhead.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("host_overhead", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["host_overhead"] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("host_overhead", None)


@pytest.mark.parametrize("region", ["rmsnorm", "add_rmsnorm", "layernorm_gelu"])
def test_arms_compute_the_same_values(bench, region, launches):
    case = bench.build_case(region, (4, 64), torch.float32, DEVICE)
    outs = bench.check_arms(case)
    assert set(outs) == {"call", "op", "launcher", "kernel"}
    assert launches  # the op ran the generated kernel, not the eager fallback
    want = run_reference(ir.loads(case.spec), case.inputs)
    assert len(outs["kernel"]) == len(want) == (2 if region == "add_rmsnorm" else 1)
    for name in ("call", "op", "launcher"):
        for got, ref in zip(outs[name], outs["kernel"]):
            assert torch.equal(got, ref), name  # one kernel, the same arguments: bitwise
    for got, ref in zip(outs["kernel"], want):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_null_kernel_plans_do_not_outlive_the_bench(bench):
    case = bench.build_case("rmsnorm", (4, 64), torch.float32, DEVICE)
    with bench.null_kernels():
        kernel, *_ = runtime.launch_args(case.spec, case.inputs)
        assert isinstance(kernel, bench.NullKernel)
        bench.time_round_robin(bench.arms(case), rounds=2, warmup=1)
    kernel, *_ = runtime.launch_args(case.spec, case.inputs)
    assert not isinstance(kernel, bench.NullKernel)
    assert not any(isinstance(p[0], bench.NullKernel)
                                                      for p in runtime._LAUNCHES.values())
