"""Benchmark the generated norm-region kernels against eager PyTorch and torch.compile.

    python bench/gpu_norm.py                      # CUDA: M in {4096, 32768}, N in {1024, 4096, 8192}, bf16
    python bench/gpu_norm.py --M 1 16 64 --N 4096 # decode shapes: a few rows, where the launch dominates
    TRITON_INTERPRET=1 python bench/gpu_norm.py --smoke     # CPU interpreter, tiny sizes, checks only

For each region (RMSNorm, add+RMSNorm with the residual as a second output, RMSNorm+SiLU,
LayerNorm+GELU, DyT, DyT+SmeLU, pRMSNorm with p = 6.25%) the region is written as a small
nn.Module, lowered with `optimize(..., lower="triton")`, checked against eager, then timed:

  ours      the lowered module's fused kernel (the graph calls `runtime.call_region`)
  eager     the module as written (PyTorch eager)
  compile   torch.compile of the same module (Inductor, default mode)

Times are medians of `triton.testing.do_bench_cudagraph` (CUDA-graph replays: device time with
the Python launch cost removed, the same treatment for all three). "wall" times are what a user
sees without CUDA graphs, launch included: per round, each arm runs `--wall-calls` calls back to
back between two synchronisations and the wall time is divided by the calls (so it is the larger
of host time and device time per call, as in a decode loop); the arms alternate round-robin in a
rotated order and the median over `--wall-rounds` rounds is reported; "graphs" is the lowered module behind
`fxrewrite.cudagraphs.cuda_graphs` (one CUDA-graph replay per call, outputs cloned), timed the same
way. Effective bandwidth = bytes that must move (each input read once, each
output written once) / time. The ceiling is the best measured device-to-device copy (bytes read +
written / time) of 256 MiB and 1 GiB buffers, by `Tensor.copy_` or by a plain Triton copy kernel.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fxrewrite import optimize  # noqa: E402
from fxrewrite.cudagraphs import cuda_graphs  # noqa: E402
from fxrewrite.rewrite.nn import DyT, PartialRMSNorm, SmeLU  # noqa: E402


class RMS(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.norm = nn.RMSNorm(n, eps=1e-6)

    def forward(self, x):
        return self.norm(x)


class AddRMS(nn.Module):
    """h = x + r; returns (h, rms_norm(h)): the residual stream is a second output."""

    def __init__(self, n):
        super().__init__()
        self.norm = nn.RMSNorm(n, eps=1e-6)

    def forward(self, x, r):
        h = x + r
        return h, self.norm(h)


class RMSSiLU(RMS):
    def forward(self, x):
        return F.silu(self.norm(x))


class LNGELU(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.norm = nn.LayerNorm(n)

    def forward(self, x):
        return F.gelu(self.norm(x))


class DyTOnly(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.norm = DyT(n)

    def forward(self, x):
        return self.norm(x)


class DyTSmeLU(DyTOnly):
    def __init__(self, n):
        super().__init__(n)
        self.act = SmeLU(0.5)

    def forward(self, x):
        return self.act(self.norm(x))


class PRMS(nn.Module):
    """pRMSNorm, p = 6.25%: the statistic reads a sixteenth of each row, the output all of it."""

    def __init__(self, n):
        super().__init__()
        self.norm = PartialRMSNorm(n, p=0.0625, eps=1e-6)

    def forward(self, x):
        return self.norm(x)


REGIONS = {"rmsnorm": (RMS, 1), "add_rmsnorm": (AddRMS, 2), "rmsnorm_silu": (RMSSiLU, 1),
           "layernorm_gelu": (LNGELU, 1), "dyt": (DyTOnly, 1), "dyt_smelu": (DyTSmeLU, 1),
           "prmsnorm": (PRMS, 1)}


def _randomise(m: nn.Module):
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if p.dim() else 0.5))


def _bytes(inputs, outputs, params) -> int:
    return sum(t.numel() * t.element_size() for t in list(inputs) + list(outputs) + list(params))


def _flat(out):
    return list(out) if isinstance(out, (tuple, list)) else [out]


def build(name, M, N, dtype, device):
    cls, n_in = REGIONS[name]
    torch.manual_seed(0)
    m = cls(N)
    _randomise(m)
    m = m.to(device=device, dtype=dtype).eval()
    xs = tuple(torch.randn(M, N, device=device, dtype=dtype) for _ in range(n_in))
    fast = optimize(m, xs, lower="triton")
    lowered = fast.report.count("lower_triton")
    if lowered != 1:
        raise RuntimeError(f"{name}: expected one lowered region, got {lowered}:\n{fast.report}")
    return m, fast, xs


def check(m, fast, xs, dtype):
    with torch.no_grad():
        ref = _flat(m(*xs))
        got = _flat(fast(*xs))
    tol = {torch.bfloat16: 3e-2, torch.float16: 5e-3, torch.float32: 1e-4}[dtype]
    worst = 0.0
    for r, g in zip(ref, got):
        err = ((g.float() - r.float()).abs() / (1 + r.float().abs())).max().item()
        worst = max(worst, err)
        if not err <= tol:
            raise AssertionError(f"mismatch: {err} > {tol}")
    return worst


def _triton_copy_kernel():
    """A plain Triton copy (one block of elements per program): a second ceiling, since
    `Tensor.copy_` alone measured below our own kernels on the H100 (2.44 vs 3.0 TB/s)."""
    import triton
    import triton.language as tl

    @triton.jit
    def copy_kernel(src, dst, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        tl.store(dst + offs, tl.load(src + offs, mask=mask), mask=mask)

    return copy_kernel


def triton_copy(src: torch.Tensor, dst: torch.Tensor, block: int = 8192, warps: int = 8):
    n = src.numel()
    _COPY[0] = _COPY[0] or _triton_copy_kernel()
    _COPY[0][(-(-n // block),)](src, dst, n, BLOCK=block, num_warps=warps)


_COPY = [None]


def copy_bandwidth(device) -> dict[str, float]:
    """Read+write bytes per second of device-to-device copies of 256 MiB and 1 GiB (the sizes
    our regions move): `Tensor.copy_` and the Triton copy at a few block sizes. The ceiling is
    the best of them."""
    import triton.testing as tt
    found = {}
    for mib in (256, 1024):
        src = torch.randn(mib * 1024 * 1024 // 2, device=device, dtype=torch.bfloat16)
        dst = torch.empty_like(src)
        nbytes = 2 * src.numel() * src.element_size()
        found[f"copy_ {mib} MiB"] = nbytes / (tt.do_bench_cudagraph(lambda: dst.copy_(src), rep=200) * 1e-3)
        for block, warps in ((4096, 4), (8192, 8), (16384, 8)):
            triton_copy(src, dst, block, warps)
            assert torch.equal(src, dst), "the Triton copy kernel copied wrongly"
            ms = tt.do_bench_cudagraph(lambda: triton_copy(src, dst, block, warps), rep=200)
            found[f"triton {mib} MiB BLOCK={block} warps={warps}"] = nbytes / (ms * 1e-3)
        del src, dst
    return found


def wall_times(fns: dict, calls: int, rounds: int) -> dict[str, float]:
    """Median over rounds of the wall time per call (ms) of `calls` back-to-back calls of each
    arm between synchronisations; the arms alternate round-robin, rotated each round."""
    import statistics
    import time
    names = list(fns)
    times = {n: [] for n in names}
    with torch.no_grad():
        for n in names:  # warm-up
            for _ in range(3):
                fns[n]()
        torch.cuda.synchronize()
        for r in range(rounds):
            for n in names[r % len(names):] + names[:r % len(names)]:
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(calls):
                    fns[n]()
                torch.cuda.synchronize()
                times[n].append((time.perf_counter() - t0) * 1e3 / calls)
    return {n: statistics.median(t) for n, t in times.items()}


def run_gpu(args):
    import triton
    import triton.testing as tt
    torch._dynamo.config.cache_size_limit = 256
    device = "cuda"
    dtype = torch.bfloat16
    copies = copy_bandwidth(device)
    ceiling = max(copies.values())
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    for what, bw in copies.items():
        print(f"copy bandwidth ({what}, device-to-device, read+write): {bw / 1e12:.3f} TB/s")
    rows = []
    for name in args.regions:
        for M in args.M:
            for N in args.N:
                m, fast, xs = build(name, M, N, dtype, device)
                err = check(m, fast, xs, dtype)
                comp = torch.compile(m)
                with torch.no_grad():
                    comp(*xs)
                    outs = _flat(m(*xs))
                nbytes = _bytes(xs, outs, m.parameters())
                res = {"region": name, "M": M, "N": N, "err": err, "bytes": nbytes}
                arms = {"ours": lambda: fast(*xs), "eager": lambda: m(*xs), "compile": lambda: comp(*xs)}
                with torch.no_grad():
                    for label, fn in arms.items():
                        res[label] = tt.do_bench_cudagraph(fn, rep=args.rep)
                graphed = cuda_graphs(fast)  # the lowered module replayed as a CUDA graph (clones its outputs)
                with torch.no_grad():
                    for g, w in zip(_flat(graphed(*xs)), _flat(fast(*xs))):
                        assert torch.equal(g, w), "the CUDA graph replay differs from the lowered module"
                wall_arms = {**arms, "graphs": lambda: graphed(*xs)}
                for label, ms in wall_times(wall_arms, args.wall_calls, args.wall_rounds).items():
                    res[label + "_wall"] = ms
                for label in ("ours", "eager", "compile"):
                    res[label + "_tbs"] = nbytes / (res[label] * 1e-3) / 1e12
                res["ours_pct_copy"] = 100 * nbytes / (res["ours"] * 1e-3) / ceiling
                rows.append(res)
                print(json.dumps(res), flush=True)
                del m, fast, xs, comp, graphed
                torch.cuda.empty_cache()
    print()
    print(f"bf16, median device time (CUDA-graph replay), effective TB/s; copy ceiling {ceiling / 1e12:.2f} TB/s")
    head = (f"{'region':<15}{'M':>6}{'N':>6} | {'ours us':>8}{'TB/s':>6}{'%copy':>6} | {'eager us':>8}{'TB/s':>6}"
            f" | {'compile us':>10}{'TB/s':>6} | {'vs compile':>10} | {'wall us: ours':>13}{'eager':>7}{'compile':>8}"
            f"{'graphs':>7} | {'wall vs eager':>13}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['region']:<15}{r['M']:>6}{r['N']:>6} | {r['ours'] * 1e3:>8.1f}{r['ours_tbs']:>6.2f}"
              f"{r['ours_pct_copy']:>6.0f} | {r['eager'] * 1e3:>8.1f}{r['eager_tbs']:>6.2f} | "
              f"{r['compile'] * 1e3:>10.1f}{r['compile_tbs']:>6.2f} | {r['compile'] / r['ours']:>9.2f}x |"
              f" {r['ours_wall'] * 1e3:>13.1f}{r['eager_wall'] * 1e3:>7.1f}{r['compile_wall'] * 1e3:>8.1f}"
              f"{r['graphs_wall'] * 1e3:>7.1f}"
              f" | {r['eager_wall'] / r['ours_wall']:>12.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"ceiling": ceiling, "copies": copies, "rows": rows}, indent=1))


def fused_call(fast, xs):
    """(spec text, input tensors) of the one fused-region call in a lowered module."""
    from fxrewrite.codegen.runtime import is_region_call
    from fxrewrite.rewrite.attrs import fetch_attr
    node = next(n for n in fast.graph.nodes if is_region_call(n))
    ph = [n for n in fast.graph.nodes if n.op == "placeholder"]
    env = dict(zip(ph, xs))
    return node.args[0], [env[a] if a.op == "placeholder" else fetch_attr(fast, a.target) for a in node.args[1]]


def run_sweep(args):
    """Time launch configurations (ROWS, num_warps) to tune `runtime.choose_config`."""
    import triton.testing as tt
    from fxrewrite.codegen import runtime
    for name in args.regions:
        for M in args.M:
            for N in args.N:
                m, fast, xs = build(name, M, N, torch.bfloat16, "cuda")
                check(m, fast, xs, torch.bfloat16)
                spec, ins = fused_call(fast, xs)
                outs = runtime.run_triton(spec, ins)
                nbytes = _bytes(ins, outs, [])
                block = 1 << (N - 1).bit_length()
                best = []
                for rows in (1, 2, 4, 8, 16):
                    if rows * block > 16384:
                        continue
                    for warps in (2, 4, 8, 16, 32):
                        cfg = ("single", block, rows, warps)
                        try:
                            ms = tt.do_bench_cudagraph(lambda: runtime.run_triton(spec, ins, config=cfg), rep=50)
                        except Exception as e:  # a config the compiler refuses
                            print(f"  {cfg}: {type(e).__name__}")
                            continue
                        best.append((ms, rows, warps))
                best.sort()
                default = runtime.choose_config(M, N, "float32", True)
                print(f"{name} M={M} N={N} default={default[2:]} " + " ".join(
                    f"r{r}w{w}:{nbytes / (ms * 1e-3) / 1e12:.2f}" for ms, r, w in best[:6]), flush=True)


def run_smoke(args):
    """CPU, Triton interpreter, tiny sizes: every region lowers, runs its kernel and matches eager."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        print("--smoke on CPU needs TRITON_INTERPRET=1 (set before Python starts)", file=sys.stderr)
        sys.exit(2)
    for name in REGIONS:
        for M, N in ((3, 7), (4, 64)):
            for dtype in (torch.float32, torch.bfloat16):
                m, fast, xs = build(name, M, N, dtype, "cpu")
                err = check(m, fast, xs, dtype)
                print(f"{name:<15} M={M:<3} N={N:<4} {str(dtype):<15} ok (max scaled error {err:.2e})")
    src = torch.randn(10_000, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    triton_copy(src, dst, block=1024, warps=4)
    assert torch.equal(src, dst), "the Triton copy kernel copied wrongly"
    print("triton copy kernel ok")
    print("smoke ok")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU interpreter smoke test at tiny sizes")
    ap.add_argument("--regions", nargs="*", default=list(REGIONS))
    ap.add_argument("--M", nargs="*", type=int, default=[4096, 32768])
    ap.add_argument("--N", nargs="*", type=int, default=[1024, 4096, 8192])
    ap.add_argument("--rep", type=int, default=200, help="do_bench repetition time, ms")
    ap.add_argument("--wall-calls", type=int, default=50, help="back-to-back calls per wall-time measurement")
    ap.add_argument("--wall-rounds", type=int, default=21, help="round-robin rounds of wall-time measurement")
    ap.add_argument("--json", help="write all numbers here")
    ap.add_argument("--sweep", action="store_true", help="time (ROWS, num_warps) choices (CUDA)")
    args = ap.parse_args()
    if args.smoke:
        run_smoke(args)
    elif not torch.cuda.is_available():
        print("no CUDA device: run with --smoke under TRITON_INTERPRET=1 on CPU", file=sys.stderr)
        sys.exit(2)
    elif args.sweep:
        run_sweep(args)
    else:
        run_gpu(args)


if __name__ == "__main__":
    main()
