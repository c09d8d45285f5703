"""What a lowered region's call adds on top of calling its Triton kernel directly.

    TRITON_INTERPRET=1 python bench/host_overhead.py          # CPU: Triton's interpreter, 4 x 64 float32
    python bench/host_overhead.py                             # CUDA when available: bf16, a few sizes
    python bench/host_overhead.py --profile                   # also: where the op's time goes (cProfile)

For each region kind (RMSNorm; add + RMSNorm with the residual as a second output; LayerNorm +
GELU) a tiny module is lowered with `optimize(model, x, lower="triton")`, and the fused call's
spec and input tensors are read off the lowered graph (an `fx.Interpreter` records the
arguments of the one fused-region call). Four arms are then timed round-robin
(every round runs each arm once, in a rotated order, so a slow spell of a shared machine hits
all of them), under `torch.no_grad()` (inference), each timed call alone:

  call      `runtime.call_region(spec, inputs)`: the call the lowered graph makes; on a plain
            eager call (real tensors, no gradient to record, no compiler, tracer or mode) it
            runs the launcher directly (launch-plan cache, which also holds the backend choice, output allocation,
            launch)
  op        `torch.ops.fxrewrite.fused_region.default(spec, inputs)`: the custom op, which
            compile, export, dispatch modes and autograd go through (dispatcher, custom-op
            wrappers, then the same launcher)
  launcher  `runtime.run_triton(spec, inputs)`: the launcher the op's implementation calls
  kernel    `kernel[grid](*args, **kwargs)`: the same Triton kernel object with the exact
            arguments the launcher passes (`runtime.launch_args`), outputs allocated once

Reported per region: the median of each arm (µs) and the medians of the per-round differences
call − kernel, op − kernel and launcher − kernel (the wrapper's cost, measured in one run).

Two tables. "kernel" runs the real kernel; in Triton's interpreter it takes milliseconds, so
its jitter (tens of µs) is larger than the wrapper. "wrapper" replaces the kernel, for the
time of that table, by a no-op with the same `kernel[grid](*args, **kwargs)` protocol
(`runtime.get_kernel` is patched while the launch is planned): the differences there are the
wrapper alone, measured to a fraction of a µs. On CUDA each timed call starts on an idle
device (synchronised outside the timed region), so the times are host time, not device time.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_norm import AddRMS  # noqa: E402  (h = x + r; returns (h, rms_norm(h)))


# ---------------------------------------------------------------- region kinds

class RMS(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.norm = nn.RMSNorm(n, eps=1e-6)

    def forward(self, x, r):
        return self.norm(x)


class LNGELU(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.norm = nn.LayerNorm(n)

    def forward(self, x, r):
        return F.gelu(self.norm(x))


REGIONS = {"rmsnorm": RMS, "add_rmsnorm": AddRMS, "layernorm_gelu": LNGELU}


@dataclass
class Case:
    """One lowered region on one input: its spec text and the op's input tensors."""

    region: str
    shape: tuple
    dtype: torch.dtype
    device: str
    spec: str
    inputs: list = field(default_factory=list)


def fused_call_args(gm: fx.GraphModule, *xs):
    """(spec, inputs) of the lowered graph's one fused-region call, recorded while it runs."""
    from fxrewrite.codegen.runtime import OP, call_region
    calls = []

    class Recorder(fx.Interpreter):
        def call_function(self, target, args, kwargs):
            if target is OP or target is call_region:
                calls.append(args)
            return super().call_function(target, args, kwargs)

    with torch.no_grad():
        Recorder(gm).run(*xs)
    if len(calls) != 1:
        raise RuntimeError(f"expected one fused region in the lowered graph, found {len(calls)}")
    spec, inputs = calls[0]
    return spec, list(inputs)


def build_case(region: str, shape=(4, 64), dtype=torch.float32, device="cpu") -> Case:
    from fxrewrite import optimize
    torch.manual_seed(0)
    model = REGIONS[region](shape[-1])
    with torch.no_grad():  # non-trivial affine parameters
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3 + 1.0)
    model = model.to(device=device, dtype=dtype).eval()
    xs = [torch.randn(shape, device=device, dtype=dtype) for _ in range(2)]
    fast = optimize(model, tuple(xs), lower="triton")
    spec, inputs = fused_call_args(fast, *xs)
    return Case(region, tuple(shape), dtype, device, spec, inputs)


# ---------------------------------------------------------------- the three arms

def arms(case: Case) -> dict:
    """name -> zero-argument callable returning the outputs: call, op, launcher, kernel."""
    from fxrewrite.codegen import runtime
    spec, inputs = case.spec, case.inputs
    kernel, grid, args, kwargs, outs = runtime.launch_args(spec, inputs)
    if kernel is None:
        raise RuntimeError("empty domain: nothing to launch")

    def direct():
        kernel[grid](*args, **kwargs)
        return outs

    return {"call": lambda: runtime.call_region(spec, inputs),
            "op": lambda: runtime.OP(spec, inputs),
            "launcher": lambda: runtime.run_triton(spec, inputs),
            "kernel": direct}


class NullKernel:
    """A stand-in for a Triton kernel: `k[grid](*args, **kwargs)` does nothing."""

    def __getitem__(self, grid):
        return self._launch

    @staticmethod
    def _launch(*args, **kwargs):
        return None


@contextmanager
def null_kernels():
    """Plan launches with `NullKernel` instead of the generated kernel (the launch-plan cache is
    emptied on entry and exit, so no null kernel outlives the block)."""
    from fxrewrite.codegen import runtime
    real = runtime.get_kernel
    runtime._LAUNCHES.clear()
    runtime.get_kernel = lambda spec_text, launch: NullKernel()
    try:
        yield
    finally:
        runtime.get_kernel = real
        runtime._LAUNCHES.clear()


def time_round_robin(fns: dict, rounds: int, warmup: int = 3, sync=None) -> dict[str, list[float]]:
    """Per arm, the times (µs) of `rounds` calls; each round runs every arm once, rotated."""
    names = list(fns)
    times = {n: [] for n in names}
    with torch.no_grad():
        for n in names:
            for _ in range(warmup):
                fns[n]()
        if sync:
            sync()
        for r in range(rounds):
            for n in names[r % len(names):] + names[:r % len(names)]:
                if sync:
                    sync()
                t0 = time.perf_counter()
                fns[n]()
                times[n].append((time.perf_counter() - t0) * 1e6)
    return times


def summarise(times: dict[str, list[float]]) -> dict:
    med = {n: statistics.median(t) for n, t in times.items()}
    diff = {n: statistics.median([a - c for a, c in zip(times[n], times["kernel"])]) for n in ("call", "op", "launcher")}
    return {"call µs": med["call"], "op µs": med["op"], "launcher µs": med["launcher"], "kernel µs": med["kernel"],
            "call − kernel µs": diff["call"], "op − kernel µs": diff["op"], "launcher − kernel µs": diff["launcher"]}


def measure(case: Case, rounds: int, null_rounds: int) -> tuple[dict, dict]:
    sync = torch.cuda.synchronize if case.device == "cuda" else None
    real = summarise(time_round_robin(arms(case), rounds, sync=sync))
    with null_kernels():
        wrapper = summarise(time_round_robin(arms(case), null_rounds, sync=sync))
    return real, wrapper


def check_arms(case: Case) -> dict[str, list[torch.Tensor]]:
    """Each arm's outputs (copies) on the case's inputs: they must agree exactly."""
    with torch.no_grad():
        return {name: [o.clone() for o in fn()] for name, fn in arms(case).items()}


def profile(case: Case, calls: int = 5000, top: int = 25) -> None:
    """cProfile of `calls` lowered-graph calls (`call_region`) with the null kernel: where the
    wrapper's time goes."""
    import cProfile
    import pstats
    from fxrewrite.codegen import runtime
    with null_kernels(), torch.no_grad():
        runtime.call_region(case.spec, case.inputs)
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(calls):
            runtime.call_region(case.spec, case.inputs)
        prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(top)


# ---------------------------------------------------------------- main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--rounds", type=int, default=None, help="rounds with the real kernel")
    ap.add_argument("--null-rounds", type=int, default=5000, help="rounds with the no-op kernel")
    ap.add_argument("--regions", default=",".join(REGIONS))
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args(argv)

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        if "triton" in sys.modules:
            sys.exit("set TRITON_INTERPRET=1 before Python starts to run the kernels on CPU")
        os.environ["TRITON_INTERPRET"] = "1"  # read by triton at import, which has not happened yet

    from common import machine, table  # noqa: E402 (bench/common.py)

    if device == "cpu":
        sizes, dtype, rounds = [(4, 64)], torch.float32, args.rounds or 200
    else:
        sizes, dtype, rounds = [(4, 64), (4096, 1024), (32768, 4096)], torch.bfloat16, args.rounds or 2000
    regions = [r for r in args.regions.split(",") if r]

    real_rows, null_rows, cases = [], [], []
    for region in regions:
        for shape in sizes:
            case = build_case(region, shape, dtype, device)
            cases.append(case)
            outs = check_arms(case)
            same = all(torch.equal(a, b) for name in ("call", "op", "launcher")
                       for a, b in zip(outs[name], outs["kernel"]))
            real, wrapper = measure(case, rounds, args.null_rounds)
            head = {"region": region, "shape": "x".join(map(str, shape)), "dtype": str(dtype).replace("torch.", ""),
                    "same values": "yes" if same else "NO"}
            real_rows.append({**head, **{k: f"{v:.1f}" for k, v in real.items()}})
            null_rows.append({**head, **{k: f"{v:.1f}" for k, v in wrapper.items()}})
            print(f"{region} {shape}: real {real}, wrapper {wrapper}", file=sys.stderr, flush=True)

    import triton
    cols = ["region", "shape", "dtype", "same values", "call µs", "op µs", "launcher µs", "kernel µs",
            "call − kernel µs", "op − kernel µs", "launcher − kernel µs"]
    where = "Triton interpreter (TRITON_INTERPRET=1), CPU" if device == "cpu" else torch.cuda.get_device_name()
    print(f"Machine: {machine()}, triton {triton.__version__}; kernels on {where}; "
          f"torch.no_grad(); medians of round-robin timings, differences are medians of per-round differences.\n")
    print(f"Real kernel ({rounds} rounds):\n")
    print(table(real_rows, cols))
    print(f"\nWrapper alone: the kernel replaced by a no-op ({args.null_rounds} rounds):\n")
    print(table(null_rows, cols))
    if args.profile:
        print("\ncProfile of call_region with the no-op kernel (first case):\n")
        profile(cases[0])
    return 0 if all(r["same values"] == "yes" for r in real_rows) else 1


if __name__ == "__main__":
    sys.exit(main())
