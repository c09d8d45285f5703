"""Benchmark the generated GLU-region kernels against eager PyTorch and torch.compile.

    python bench/gpu_glu.py                       # CUDA: M in {1, 16, 64, 4096, 32768}, N in {2816, 11008}, bf16
    TRITON_INTERPRET=1 python bench/gpu_glu.py --smoke     # CPU interpreter, tiny sizes, checks only

The gated product of a GLU MLP (N is the intermediate size: 2816 is Qwen1.5-0.5B's, 11008
LLaMA-7B's; M the tokens: 1 to 64 decode, 4096 and 32768 prefill), written as a small nn.Module, lowered with
`optimize(..., lower="triton")` (one GLU region: activation and product in one kernel; the
projections are not part of it), checked against eager, then timed:

  swiglu        silu(gate) * up, gate and up two [M, N] tensors (LLaMA: gate_proj, up_proj)
  swiglu_fused  silu(g) * u with g, u = h.chunk(2, dim=-1), h one [M, 2N] tensor (a fused
                gate_up projection, Phi-3 style): the kernel reads both halves of h in place
  geglu_tanh    gelu(gate, approximate="tanh") * up (Gemma)
  geglu_erf     gelu(gate) * up (not in the default set)

Arms, as in bench/gpu_norm.py:

  ours      the lowered module's fused kernel, launched through the fused-region call
  eager     the module as written (PyTorch eager: two kernels, the activation's result written
            and read back)
  compile   torch.compile of the same module (Inductor, default mode, static shapes)

Every arm is checked against eager before it is timed (bfloat16: within a rounding step), and
`ours` must have run the generated kernel. Times are medians of
`triton.testing.do_bench_cudagraph` (CUDA-graph replays: device time without the Python launch
cost, the same for all three), plus `ours_launch`, the median of plain `do_bench` on the lowered
module (what a user sees without CUDA graphs; at M = 1 it is nearly all launch cost). Effective
bandwidth = bytes that must move (each input read once, the output written once) / time; the
ceiling is the best measured device-to-device copy (`gpu_norm.copy_bandwidth`). The default set
(3 regions x 5 M x 2 N) runs in about two minutes on an H100; no network, torch and triton only.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fxrewrite import optimize  # noqa: E402
from gpu_norm import _bytes, _flat, copy_bandwidth  # noqa: E402  (the same byte count and ceiling)


class SwiGLU(nn.Module):
    def forward(self, gate, up):
        return F.silu(gate) * up


class SwiGLUFused(nn.Module):
    def forward(self, h):
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up


class GeGLUTanh(nn.Module):
    def forward(self, gate, up):
        return F.gelu(gate, approximate="tanh") * up


class GeGLUErf(nn.Module):
    def forward(self, gate, up):
        return F.gelu(gate) * up


REGIONS = {"swiglu": SwiGLU, "swiglu_fused": SwiGLUFused, "geglu_tanh": GeGLUTanh, "geglu_erf": GeGLUErf}
DEFAULT_REGIONS = ["swiglu", "swiglu_fused", "geglu_tanh"]
TOL = {torch.bfloat16: 1.6e-2, torch.float16: 2e-3, torch.float32: 1e-5}  # scaled error, see check()


def inputs(name, M, N, dtype, device):
    torch.manual_seed(0)
    if name == "swiglu_fused":
        return (torch.randn(M, 2 * N, device=device, dtype=dtype) * 2,)
    return (torch.randn(M, N, device=device, dtype=dtype) * 2, torch.randn(M, N, device=device, dtype=dtype))


def build(name, M, N, dtype, device):
    """(eager module, lowered module, inputs); the lowering must have made exactly one region."""
    m = REGIONS[name]().to(device).eval()
    xs = inputs(name, M, N, dtype, device)
    fast = optimize(m, xs, lower="triton")
    lowered = fast.report.count("lower_triton")
    if lowered != 1:
        raise RuntimeError(f"{name}: expected one lowered GLU region, got {lowered}:\n{fast.report}")
    return m, fast, xs


def check(fn, m, xs, dtype, label):
    """Max |got - eager| / (1 + |eager|) of `fn`'s outputs; AssertionError past the dtype's tolerance."""
    with torch.no_grad():
        ref = _flat(m(*xs))
        got = _flat(fn(*xs))
    if len(got) != len(ref):
        raise AssertionError(f"{label}: {len(got)} outputs, eager has {len(ref)}")
    worst = 0.0
    for r, g in zip(ref, got):
        if g.shape != r.shape or g.dtype != r.dtype:
            raise AssertionError(f"{label}: output {tuple(g.shape)} {g.dtype}, eager {tuple(r.shape)} {r.dtype}")
        err = ((g.float() - r.float()).abs() / (1 + r.float().abs())).max().item()
        worst = max(worst, err)
    if not worst <= TOL[dtype]:
        raise AssertionError(f"{label}: mismatch against eager, scaled error {worst} > {TOL[dtype]}")
    return worst


def ran_kernel(fast, xs) -> bool:
    """Whether a call of the lowered module launched the generated kernel (not the eager fallback)."""
    from fxrewrite.codegen import runtime
    real = getattr(runtime, "run_triton", None)
    if real is None:  # the runtime no longer has this entry point: nothing to spy on
        return True
    calls = []

    def spy(*a, **k):
        outs = real(*a, **k)
        if outs is not None:  # None: the inputs took the eager reference
            calls.append(1)
        return outs

    runtime.run_triton = spy
    try:
        with torch.no_grad():
            fast(*xs)
    finally:
        runtime.run_triton = real
    return bool(calls)


def bench_one(name, M, N, dtype, rep, ceiling) -> dict:
    """Build, check (every arm against eager) and time one region at one shape."""
    import triton.testing as tt
    m, fast, xs = build(name, M, N, dtype, "cuda")
    if not ran_kernel(fast, xs):
        raise RuntimeError(f"{name} M={M} N={N}: the lowered module did not launch its kernel")
    comp = torch.compile(m, dynamic=False)
    res = {"region": name, "M": M, "N": N,
           "err": check(fast, m, xs, dtype, f"{name} M={M} N={N} ours"),
           "compile_err": check(comp, m, xs, dtype, f"{name} M={M} N={N} compile")}
    with torch.no_grad():
        outs = _flat(m(*xs))
    nbytes = res["bytes"] = _bytes(xs, outs, [])
    with torch.no_grad():
        for label, fn in (("ours", fast), ("eager", m), ("compile", comp)):
            res[label] = tt.do_bench_cudagraph(lambda: fn(*xs), rep=rep)
        res["ours_launch"] = tt.do_bench(lambda: fast(*xs), warmup=25, rep=rep, return_mode="median")
    for label in ("ours", "eager", "compile", "ours_launch"):
        res[label + "_tbs"] = nbytes / (res[label] * 1e-3) / 1e12
    res["ours_pct_copy"] = 100 * nbytes / (res["ours"] * 1e-3) / ceiling
    return res


def run_gpu(args):
    import triton
    torch._dynamo.config.cache_size_limit = 256
    device, dtype = "cuda", torch.bfloat16
    t0 = time.perf_counter()
    copies = copy_bandwidth(device)
    ceiling = max(copies.values())
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    for what, bw in copies.items():
        print(f"copy bandwidth ({what}, device-to-device, read+write): {bw / 1e12:.3f} TB/s")
    rows = []
    for name in args.regions:
        for N in args.N:
            for M in args.M:
                res = bench_one(name, M, N, dtype, args.rep, ceiling)
                rows.append(res)
                print(json.dumps(res), flush=True)
                torch.cuda.empty_cache()
    print()
    print(f"bf16, median device time (CUDA-graph replay), effective TB/s; copy ceiling {ceiling / 1e12:.2f} TB/s")
    head = (f"{'region':<15}{'M':>6}{'N':>6} | {'ours us':>8}{'TB/s':>6}{'%copy':>6} | {'eager us':>8}{'TB/s':>6}"
            f" | {'compile us':>10}{'TB/s':>6} | {'vs compile':>10} | {'ours+launch us':>14}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['region']:<15}{r['M']:>6}{r['N']:>6} | {r['ours'] * 1e3:>8.1f}{r['ours_tbs']:>6.2f}"
              f"{r['ours_pct_copy']:>6.0f} | {r['eager'] * 1e3:>8.1f}{r['eager_tbs']:>6.2f} | "
              f"{r['compile'] * 1e3:>10.1f}{r['compile_tbs']:>6.2f} | {r['compile'] / r['ours']:>9.2f}x |"
              f" {r['ours_launch'] * 1e3:>14.1f}")
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"ceiling": ceiling, "copies": copies, "rows": rows}, indent=1))


def run_smoke(args):
    """CPU, Triton interpreter, tiny sizes: every region lowers, runs its kernel and matches eager."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        print("--smoke on CPU needs TRITON_INTERPRET=1 (set before Python starts)", file=sys.stderr)
        sys.exit(2)
    for name in REGIONS:
        for M, N in ((3, 7), (4, 64)):
            for dtype in (torch.float32, torch.bfloat16):
                m, fast, xs = build(name, M, N, dtype, "cpu")
                if not ran_kernel(fast, xs):
                    raise RuntimeError(f"{name}: the lowered module did not launch its kernel")
                err = check(fast, m, xs, dtype, name)
                print(f"{name:<15} M={M:<3} N={N:<4} {str(dtype):<15} ok (max scaled error {err:.2e})")
    print("smoke ok")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU interpreter smoke test at tiny sizes")
    ap.add_argument("--regions", nargs="*", default=DEFAULT_REGIONS, choices=list(REGIONS))
    ap.add_argument("--M", nargs="*", type=int, default=[1, 16, 64, 4096, 32768])
    ap.add_argument("--N", nargs="*", type=int, default=[2816, 11008])
    ap.add_argument("--rep", type=int, default=100, help="do_bench repetition time, ms")
    ap.add_argument("--json", help="write all numbers here")
    args = ap.parse_args()
    if args.smoke:
        run_smoke(args)
    elif not torch.cuda.is_available():
        print("no CUDA device: this benchmark times GPU kernels (on CPU: --smoke under TRITON_INTERPRET=1)",
              file=sys.stderr)
        sys.exit(2)
    else:
        run_gpu(args)


if __name__ == "__main__":
    main()
