"""Registers and spills of the generated kernels for an NVIDIA GPU, measured without one.

    python bench/kernel_registers.py                       # sm_90, bfloat16, N = 4096 and 16384
    python bench/kernel_registers.py --arch 80 --N 8192 --dtype float32

For each region of `gpu_norm.py` and `gpu_glu.py` (lowered as there, on CPU tensors of M = 64 rows) the forward
launch and the backward launch that the lowering plans for CUDA, at the chosen launch
configuration and at a few others, are compiled ahead of time (`fxrewrite.codegen.aot`: Triton's
compiler with the JIT's own specialisation, down to the cubin) and `ptxas -v` says how many
registers a thread uses and how many bytes it spills. A kernel that spills reads and writes
local memory where it meant to keep values in registers; this is what the looped backward's
configuration for wide rows (`backward.WIDE_CONFIG`) was chosen by. It says nothing of speed: that is
`gpu_norm.py`'s and `gpu_norm_backward.py`'s, on a GPU. Run without TRITON_INTERPRET=1.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fxrewrite.codegen import aot, backward, ir, runtime  # noqa: E402
from fxrewrite.codegen.reference import run_reference  # noqa: E402
import gpu_glu  # noqa: E402
import gpu_norm  # noqa: E402

BUILD = {**{name: gpu_norm.build for name in gpu_norm.REGIONS}, **{name: gpu_glu.build for name in gpu_glu.REGIONS}}

BACKWARD_CONFIGS = [(1, 4), (1, 8), (2, 4), (2, 8)]  # (ROWS, num_warps) tried besides the chosen one


def _programs_without_a_device(device, target, *rest, **kw):
    """Programs along the rows as planned without a device (CUDA would ask it for its SM count)."""
    return _PROGRAMS(device, "interpreter", *rest, **kw)


_PROGRAMS = backward._programs


def rows_for(name: str, N: int, dtype: torch.dtype, arch: int) -> list[tuple]:
    """[(pass, ROWS, BLOCK_N, num_warps, chosen, registers, spill stores)] for one region and width."""
    _, fast, xs = BUILD[name](name, 64, N, dtype, "cpu")
    spec, inputs = gpu_norm.fused_call(fast, xs)
    out = []
    kernel, _, args, consts, _ = runtime.bind(runtime._plan_launch(spec, inputs, None, "cuda"), inputs)
    used = aot.resources(aot.compile_launch(kernel, list(args), consts, arch), arch)
    out.append(("forward", consts["ROWS"], consts["BLOCK_N"], consts["num_warps"], True, used["registers"],
                used["spill_stores"]))
    if backward.unsupported(ir.loads(spec)):
        return out
    backward._programs = _programs_without_a_device
    grads = [torch.randn_like(o) for o in run_reference(ir.loads(spec), inputs)]
    chosen = backward._plan(spec, inputs, grads, [True] * len(inputs), "cuda")
    configs = [None] + [c for c in BACKWARD_CONFIGS if c != (chosen.consts["ROWS"], chosen.consts["num_warps"])]
    for config in configs:
        plan = chosen if config is None else backward._plan(spec, inputs, grads, [True] * len(inputs), "cuda",
                                                            (*config, None))
        args, _ = backward.launch_args(plan, inputs, grads)
        used = aot.resources(aot.compile_launch(plan.kernel, args, plan.consts, arch), arch)
        c = plan.consts
        out.append(("backward", c["ROWS"], c["BLOCK_N"], c["num_warps"], config is None, used["registers"],
                    used["spill_stores"]))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--regions", nargs="*", default=["add_rmsnorm", "rmsnorm_silu", "layernorm_gelu", "dyt_smelu",
                                                     "swiglu", "geglu_tanh"])
    ap.add_argument("--N", nargs="*", type=int, default=[4096, 16384])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--arch", type=int, default=90, help="compute capability x10: 80 (A100), 90 (H100/H200)")
    args = ap.parse_args()
    import triton
    dtype = getattr(torch, args.dtype)
    print(f"sm_{args.arch}, {args.dtype}, M = 64; torch {torch.__version__}, triton {triton.__version__}")
    print("| region | N | pass | ROWS | BLOCK_N | warps | chosen | registers | spill stores (bytes) |")
    print("|---|---:|---|---:|---:|---:|:---:|---:|---:|")
    for name in args.regions:
        if name not in BUILD:
            raise SystemExit(f"unknown region {name!r}; one of {sorted(BUILD)}")
        for N in args.N:
            for p, rows, block, warps, chosen, regs, spills in rows_for(name, N, dtype, args.arch):
                print(f"| {name} | {N} | {p} | {rows} | {block} | {warps} | {'yes' if chosen else ''} | {regs} | {spills} |",
                      flush=True)


if __name__ == "__main__":
    main()
