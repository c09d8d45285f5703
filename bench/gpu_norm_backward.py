"""Benchmark the generated backward kernels of norm regions against eager autograd and torch.compile.

    python bench/gpu_norm_backward.py                        # CUDA: M in {1, 64, 4096, 32768}, N in {1024, 4096}, bf16
    TRITON_INTERPRET=1 python bench/gpu_norm_backward.py --smoke     # CPU interpreter, tiny sizes, checks only

For each region (RMSNorm, add+RMSNorm with the residual as a second output, LayerNorm) the region is
written as a small nn.Module, lowered with `optimize(..., lower="triton")`, and every input and
parameter needs a gradient; random output gradients are fixed. Arms, backward only:

  ours       `codegen.backward.run_backward` on the fused call's inputs (one kernel + the host's
             `.sum(0)` of the weight partials)
  eager      autograd of the module as written (PyTorch eager), on a retained graph
  compile    autograd of torch.compile of the module (Inductor's backward), on a retained graph

and forward + backward:

  ours_fb    the lowered module, forward then `torch.autograd.grad`: whatever backward the runtime
             has wired (`wired` says whether it called `run_backward`; if not it is autograd of
             the eager reference on a recomputed forward)
  kern_fb    our forward kernel (`runtime.run_triton`) then `run_backward`: the fused pair
  eager_fb   the module as written
  compile_fb torch.compile of the module

Before timing, every arm's gradients are checked against eager's (scaled error <= 3e-2 in bf16).
Times are medians of `triton.testing.do_bench_cudagraph` (CUDA-graph replay: device time without
the Python launch cost), falling back to plain `do_bench` for an arm that cannot be captured
(marked `*`: on an H200 with torch 2.11 every eager and compile arm, whose autograd replay could not
be captured; `ours+launch` is ours by plain `do_bench` too, the fair comparison with them, which at
M <= 4096 is launch-bound for all). Effective bandwidth = bytes that must move / time:
backward reads the region's inputs and the output gradients and writes the distinct input
gradients (one for both operands of the residual add); forward + backward adds the forward's reads
of the inputs and writes of the outputs. The ceiling is the best
device-to-device copy, by `Tensor.copy_` or a plain Triton copy kernel (as in `gpu_norm.py`).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fxrewrite import optimize  # noqa: E402
from fxrewrite.codegen import backward, runtime  # noqa: E402
from gpu_norm import AddRMS, RMS, copy_bandwidth, fused_call, triton_copy  # noqa: E402


class LN(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.norm = nn.LayerNorm(n)

    def forward(self, x):
        return self.norm(x)


REGIONS = {"rmsnorm": (RMS, 1), "add_rmsnorm": (AddRMS, 2), "layernorm": (LN, 1)}
TOL = {torch.bfloat16: 3e-2, torch.float16: 5e-3, torch.float32: 1e-4}


def _flat(out):
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _nbytes(ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


class Case:
    """One region at one size: the eager module, the lowered one, inputs, fixed output gradients,
    and the fused call's (spec, inputs) with which input of the module each of those is."""

    def __init__(self, name, M, N, dtype, device):
        # random numbers from the CPU generator, moved: a CUDA-graph capture that fails (an arm
        # timed without graphs) can leave the CUDA generator unusable
        cls, n_in = REGIONS[name]
        torch.manual_seed(0)
        m = cls(N)
        with torch.no_grad():
            for p in m.parameters():
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if p.dim() else 0.5))
        self.m = m.to(device=device, dtype=dtype).eval()
        self.xs = [torch.randn(M, N).to(device=device, dtype=dtype) for _ in range(n_in)]
        self.fast = optimize(self.m, tuple(self.xs), lower="triton")
        if self.fast.report.count("lower_triton") != 1:
            raise RuntimeError(f"{name}: expected one lowered region:\n{self.fast.report}")
        self.params = [p for p in self.m.parameters()]
        with torch.no_grad():
            outs = _flat(self.m(*self.xs))
        self.gouts = [torch.randn(o.shape).to(o) for o in outs]
        self.spec, self.ins = fused_call(self.fast, self.xs)
        self.ins = [t.detach() for t in self.ins]
        self.dtype = dtype
        self.fwd_bytes = _nbytes(self.xs) + _nbytes(self.params) + _nbytes(outs)
        # backward: read the inputs and output gradients, write each distinct input gradient once
        # (eager, Inductor and ours return one tensor for both operands of a residual add)
        distinct = {id(g): g for g in self.module_grads(self.m, self.leaves())}
        self.bwd_bytes = _nbytes(self.xs) + _nbytes(self.params) + _nbytes(self.gouts) + _nbytes(distinct.values())

    def leaves(self):
        return [x.clone().requires_grad_() for x in self.xs]

    def module_grads(self, mod, xs):
        """Gradients (inputs, then the eager module's parameters in order) through `mod`."""
        outs = _flat(mod(*xs))
        params = [p for p in mod.parameters()] if mod is not self.fast else self._fast_params()
        return list(torch.autograd.grad(outs, xs + params, self.gouts))

    def _fast_params(self):
        named = dict(self.fast.named_parameters())
        return [named[n] for n, _ in self.m.named_parameters()]

    def ours_grads(self):
        """run_backward's gradients, mapped to (inputs, parameters) like module_grads."""
        got = backward.run_backward(self.spec, self.ins, self.gouts, [True] * len(self.ins))
        if got is None:
            raise RuntimeError(f"run_backward has no kernel for {self.spec}")
        return self._map(got)

    def _map(self, got):
        by_ptr = {t.data_ptr(): g for t, g in zip(self.ins, got)}
        return [by_ptr[t.data_ptr()] for t in self.xs + self._fast_params()]


def check(want, got, dtype, what):
    worst = 0.0
    for w, g in zip(want, got):
        scale = w.float().abs().max().item() or 1.0
        err = (g.float() - w.float()).abs().max().item() / scale
        worst = max(worst, err)
    if not worst <= TOL[dtype]:
        raise AssertionError(f"{what}: gradients differ from eager's, scaled error {worst:.2e} > {TOL[dtype]}")
    return worst


def arms(case: Case, comp):
    """name -> (callable, backward only?) for every arm, after checking each one's gradients."""
    xs_e, xs_c, xs_f = case.leaves(), case.leaves(), case.leaves()
    outs_e, outs_c = _flat(case.m(*xs_e)), _flat(comp(*xs_c))
    p = case.params
    eager_bwd = lambda: torch.autograd.grad(outs_e, xs_e + p, case.gouts, retain_graph=True)  # noqa: E731
    compile_bwd = lambda: torch.autograd.grad(outs_c, xs_c + p, case.gouts, retain_graph=True)  # noqa: E731
    ours_bwd = lambda: backward.run_backward(case.spec, case.ins, case.gouts, [True] * len(case.ins))  # noqa: E731
    fp = case._fast_params()

    def ours_fb():
        return torch.autograd.grad(_flat(case.fast(*xs_f)), xs_f + fp, case.gouts)

    def kern_fb():
        runtime.run_triton(case.spec, case.ins)
        return backward.run_backward(case.spec, case.ins, case.gouts, [True] * len(case.ins))

    eager_fb = lambda: torch.autograd.grad(_flat(case.m(*xs_e)), xs_e + p, case.gouts)  # noqa: E731
    compile_fb = lambda: torch.autograd.grad(_flat(comp(*xs_c)), xs_c + p, case.gouts)  # noqa: E731
    want = list(eager_bwd())
    errs = {"ours": check(want, case.ours_grads(), case.dtype, "ours"),
            "compile": check(want, list(compile_bwd()), case.dtype, "compile")}
    backward._PLANS._d.clear()  # did the lowered module's backward go through run_backward?
    errs["ours_fb"] = check(want, list(ours_fb()), case.dtype, "ours_fb")
    wired = len(backward._PLANS._d) > 0
    errs["kern_fb"] = check(want, case._map(kern_fb()), case.dtype, "kern_fb")
    errs["compile_fb"] = check(want, list(compile_fb()), case.dtype, "compile_fb")
    fns = {"ours": (ours_bwd, True), "eager": (eager_bwd, True), "compile": (compile_bwd, True),
           "ours_fb": (ours_fb, False), "kern_fb": (kern_fb, False), "eager_fb": (eager_fb, False),
           "compile_fb": (compile_fb, False)}
    return fns, errs, wired


def _time(fn, rep):
    import triton.testing as tt
    try:
        return tt.do_bench_cudagraph(fn, rep=rep), ""
    except Exception:  # an arm CUDA graphs cannot capture (autograd of a compiled module, say)
        torch.cuda.synchronize()
        return tt.do_bench(fn, warmup=10, rep=rep, return_mode="median"), "*"


def run_gpu(args):
    import triton
    import triton.testing as tt
    torch._dynamo.config.cache_size_limit = 256
    torch._functorch.config.donated_buffer = False  # the compiled backward is replayed on a retained graph
    device, dtype = "cuda", torch.bfloat16
    copies = copy_bandwidth(device) if not args.no_ceiling else {"none": float("nan")}
    ceiling = max(copies.values())
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    for what, bw in copies.items():
        print(f"copy bandwidth ({what}, device-to-device, read+write): {bw / 1e12:.3f} TB/s")
    rows = []
    for name in args.regions:
        comp = None
        for N in args.N:
            for M in args.M:
                case = Case(name, M, N, dtype, device)
                if comp is None or M == 1 or args.recompile:
                    torch._dynamo.reset()
                comp = torch.compile(case.m)
                fns, errs, wired = arms(case, comp)
                res = {"region": name, "M": M, "N": N, "wired": wired, "err": max(errs.values()),
                       "bwd_bytes": case.bwd_bytes, "fb_bytes": case.fwd_bytes + case.bwd_bytes}
                for label, (fn, bwd_only) in fns.items():
                    ms, how = _time(fn, args.rep)
                    nbytes = case.bwd_bytes if bwd_only else res["fb_bytes"]
                    res[label], res[label + "_how"] = ms, how
                    res[label + "_tbs"] = nbytes / (ms * 1e-3) / 1e12
                res["ours_launch"] = tt.do_bench(fns["ours"][0], warmup=10, rep=args.rep, return_mode="median")
                res["ours_pct_copy"] = 100 * case.bwd_bytes / (res["ours"] * 1e-3) / ceiling
                rows.append(res)
                print(json.dumps(res), flush=True)
                del case, fns
                torch.cuda.empty_cache()
    print()
    print(f"bf16, median device time (CUDA-graph replay; * plain do_bench), effective TB/s; copy ceiling "
          f"{ceiling / 1e12:.2f} TB/s")
    cols = ["ours", "eager", "compile", "ours_fb", "kern_fb", "eager_fb", "compile_fb"]
    head = f"{'region':<12}{'M':>6}{'N':>6} |" + "".join(f"{c + ' us':>14}{'TB/s':>6} |" for c in cols) + \
        f" {'%copy':>6} | {'vs compile':>10} | {'ours+launch us':>14} | wired"
    print(head)
    print("-" * len(head))
    for r in rows:
        line = f"{r['region']:<12}{r['M']:>6}{r['N']:>6} |"
        for c in cols:
            line += f"{r[c] * 1e3:>13.1f}{r[c + '_how'] or ' '}{r[c + '_tbs']:>6.2f} |"
        line += (f" {r['ours_pct_copy']:>6.0f} | {r['compile'] / r['ours']:>9.2f}x | {r['ours_launch'] * 1e3:>14.1f} |"
                 f" {r['wired']}")
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps({"ceiling": ceiling, "copies": copies, "rows": rows}, indent=1))


def run_sweep(args):
    """Time launch configurations (ROWS, num_warps, programs per SM) of `run_backward` (CUDA)."""
    import triton.testing as tt
    for name in args.regions:
        for N in args.N:
            for M in args.M:
                case = Case(name, M, N, torch.bfloat16, "cuda")
                want = case.module_grads(case.m, case.leaves())
                block = 1 << (N - 1).bit_length()
                default = backward.choose_config(M, N, "float32")

                def timed(cfg):
                    fn = lambda: backward.run_backward(case.spec, case.ins, case.gouts, [True] * len(case.ins),  # noqa: E731
                                                       config=cfg)
                    try:
                        check(want, case._map(fn()), torch.bfloat16, f"config {cfg}")
                        return tt.do_bench_cudagraph(fn, rep=args.rep)
                    except Exception as e:  # a config the compiler refuses
                        print(f"  {cfg}: {type(e).__name__}: {str(e)[:200]}")
                        return float("inf")

                found = {}
                for rows in (1, 2, 4, 8):
                    for warps in (4, 8, 16):
                        if rows * block <= 8192 and rows <= M:
                            found[(rows, warps, None)] = timed((rows, warps, None))
                rows, warps, _ = min(found, key=found.get)
                for per_sm in (1, 2, 4, 8, 16):
                    found[(rows, warps, per_sm)] = timed((rows, warps, per_sm))
                ranked = sorted(found.items(), key=lambda kv: kv[1])
                base = found.get((default[1], default[2], None), float("nan"))
                print(f"{name} M={M} N={N} default r{default[1]}w{default[2]}: {case.bwd_bytes / (base * 1e-3) / 1e12:.2f}"
                      " TB/s; best " + " ".join(f"r{r}w{w}p{p}:{case.bwd_bytes / (ms * 1e-3) / 1e12:.2f}"
                                              for (r, w, p), ms in ranked[:6]), flush=True)


def run_smoke(args):
    """CPU, Triton interpreter, tiny sizes: every region's backward kernel runs and matches eager."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        print("--smoke on CPU needs TRITON_INTERPRET=1 (set before Python starts)", file=sys.stderr)
        sys.exit(2)
    for name in REGIONS:
        for M, N in ((3, 7), (5, 40), (2, 8200)):  # (8200: wider than a block, the looped kernel)
            for dtype in (torch.float32, torch.bfloat16):
                case = Case(name, M, N, dtype, "cpu")
                xs = case.leaves()
                want = case.module_grads(case.m, xs)
                err = check(want, case.ours_grads(), dtype, "ours")
                print(f"{name:<12} M={M:<3} N={N:<4} {str(dtype):<15} ok (max scaled error {err:.2e})")
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
    ap.add_argument("--M", nargs="*", type=int, default=[1, 64, 4096, 32768])
    ap.add_argument("--N", nargs="*", type=int, default=[1024, 4096])
    ap.add_argument("--rep", type=int, default=50, help="do_bench repetition time, ms")
    ap.add_argument("--recompile", action="store_true", help="a fresh torch.compile for every size")
    ap.add_argument("--no-ceiling", action="store_true", help="skip the copy-bandwidth ceiling")
    ap.add_argument("--json", help="write all numbers here")
    ap.add_argument("--sweep", action="store_true", help="time (ROWS, num_warps, programs per SM) choices (CUDA)")
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
