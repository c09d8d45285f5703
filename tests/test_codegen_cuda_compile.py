"""Every kind of generated kernel compiles for NVIDIA GPUs, on a machine without one.

The interpreter (TRITON_INTERPRET=1) runs kernels as NumPy: it checks their numbers, not that
Triton's compiler accepts them (loop-carried values, layouts, types) nor the `cuda` target's
source (libdevice calls). Triton compiles ahead of time for a `GPUTarget` without a driver, down
to the cubin with the ptxas its wheel ships, so each launch the lowering plans for CUDA (forward:
`runtime._plan_launch`; backward: `backward._plan`) is compiled here with the signature its
arguments give: the single-pass, looped and tiled templates, every region kind, four dtypes.
What runs on a GPU (timings, the launch itself) is `test_gpu.py`'s.

Triton's language library is built for the interpreter in a process that imported triton with
TRITON_INTERPRET=1 (as the test suite runs): there, one test runs this module again in a child
process without it.
"""
from __future__ import annotations

import importlib.util
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from fxrewrite import optimize
from fxrewrite.codegen import aot, backward, ir, runtime
from fxrewrite.codegen.reference import run_reference

from test_codegen import AddELNGelu, AddRMS2, BNRelu, CastNorm, DyTSmeLU, LNGelu, PRMSSiLU, RMSAct
from test_codegen_glu import GLU, FusedGateUp

triton = pytest.importorskip("triton")
if importlib.util.find_spec("triton.backends.nvidia") is None:
    pytest.skip("this Triton has no NVIDIA backend", allow_module_level=True)

from triton.backends.compiler import GPUTarget  # noqa: E402

H100 = GPUTarget("cuda", 90, 32)
A100 = GPUTarget("cuda", 80, 32)
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
compiles = pytest.mark.skipif(INTERPRETED, reason="the interpreter's process: run in a child without it")
if not INTERPRETED and aot.unavailable():
    pytest.skip(aot.unavailable(), allow_module_level=True)


def compile_for(kernel, args: list, consts: dict, target=H100):
    """`aot.compile_launch` for a target: the kernel as Triton's JIT would compile this launch."""
    return aot.compile_launch(kernel, args, consts, target.arch)


def region_calls(model: nn.Module, xs, monkeypatch) -> list:
    """(spec, inputs) of each region call of the lowered model, recorded from one run that
    computes through the eager reference (no kernel launched)."""
    fast = optimize(model.eval(), xs, lower="triton")
    seen = []

    def record(spec, inputs):
        seen.append((spec, list(inputs)))
        return runtime.fresh_outputs(run_reference(ir.loads(spec), inputs), inputs)

    monkeypatch.setattr(runtime, "run", record)
    with torch.no_grad():
        fast(*xs)
    monkeypatch.undo()
    assert seen, type(model).__name__
    return seen


def _x(*shape, dtype=torch.float32):
    torch.manual_seed(0)
    return torch.randn(*shape).to(dtype)


WIDE = 8200  # wider than one block in float32 (8192): the looped forward, the looped or tiled backward

REGIONS = {  # name: (model and example inputs, the forward template, the backward's or None)
    "rms_prologue_epilogue": (lambda: (RMSAct(48), (_x(2, 5, 48), _x(2, 5, 48))), "single", "single"),
    "add_rms_two_outputs_bf16": (lambda: (AddRMS2(48).bfloat16(), (_x(3, 48, dtype=torch.bfloat16),) * 2),
                                 "single", "single"),
    "layernorm_gelu_broadcast_residual": (lambda: (LNGelu(48), (_x(2, 5, 48), _x(1, 5, 48))), "single", "single"),
    "dyt_smelu_fp16": (lambda: (DyTSmeLU(48).half(), (_x(4, 48, dtype=torch.float16),)), "single", "single"),
    "prms_silu": (lambda: (PRMSSiLU(48, 0.5), (_x(4, 48),)), "single", "single"),
    "add_eln_gelu": (lambda: (AddELNGelu(48), (_x(4, 48), _x(4, 48))), "single", "single"),
    "prms_silu_wide": (lambda: (PRMSSiLU(WIDE, 0.5), (_x(2, WIDE),)), "loop", "looped"),
    "batchnorm_relu": (lambda: (BNRelu(6), (_x(2, 6, 4, 4), _x(2, 6, 4, 4))), "single", "single"),
    "cast_norm_bf16": (lambda: (CastNorm(48, torch.bfloat16), (_x(2, 48, dtype=torch.bfloat16),)), "single", "single"),
    "glu_fused_gate_up": (lambda: (FusedGateUp(16, 20), (_x(3, 4, 16),)), "single", "single"),
    "glu_transposed": (lambda: (GLU(), (_x(48, 6).t(), _x(6, 48))), "single", "single"),
    "rms_prologue_epilogue_wide": (lambda: (RMSAct(WIDE), (_x(2, WIDE), _x(2, WIDE))), "loop", "looped"),
    "add_rms_wide_bf16": (lambda: (AddRMS2(WIDE).bfloat16(), (_x(2, WIDE, dtype=torch.bfloat16),) * 2),
                          "loop", "looped"),
    "layernorm_gelu_wide_fp64": (lambda: (LNGelu(4100).double(), (_x(2, 4100, dtype=torch.float64),) * 2),
                                 "loop", "looped"),
    "dyt_smelu_wide": (lambda: (DyTSmeLU(WIDE), (_x(2, WIDE),)), "tiled", "tiled"),
    "glu_wide": (lambda: (GLU(), (_x(2, WIDE), _x(2, WIDE))), "tiled", "tiled"),
}


def test_the_regions_reach_every_template():
    assert {fwd for _, fwd, _ in REGIONS.values()} == {"single", "loop", "tiled"}
    assert {bwd for _, _, bwd in REGIONS.values()} == {"single", "looped", "tiled"}


def _layout(kernel) -> str:
    """How the kernel walks a row's columns: "loop" (chunks in turn), "tiled" (a chunk per
    program on grid axis 1) or "single" (the whole row at once); the backward's loop is "looped"."""
    src = inspect.getsource(getattr(kernel, "fn", kernel))
    return "loop" if "for start in range(0, N, BLOCK_N)" in src else "tiled" if "tl.program_id(1)" in src else "single"


@compiles
@pytest.mark.parametrize("name", list(REGIONS))
def test_forward_kernels_compile_for_cuda(name, monkeypatch):
    make, template, _ = REGIONS[name]
    model, xs = make()
    for spec, inputs in region_calls(model, xs, monkeypatch):
        plan = runtime._plan_launch(spec, inputs, None, "cuda")
        kernel, grid, args, consts, _ = runtime.bind(plan, inputs)
        assert _layout(kernel) == template, name
        assert len(grid) == (2 if template == "tiled" else 1), grid
        src = inspect.getsource(getattr(kernel, "fn", kernel))
        assert "libdevice" in src or "tanh" not in src  # the cuda target's source
        assert compile_for(kernel, list(args), consts).asm["cubin"], name


def _programs_as_interpreter(device, target, *rest, **kw):
    """Programs along the rows as for the interpreter (CUDA asks the device for its SM count)."""
    return _PROGRAMS(device, "interpreter", *rest, **kw)


_PROGRAMS = backward._programs


@compiles
@pytest.mark.parametrize("name", [n for n, (_, _, bwd) in REGIONS.items() if bwd])
def test_backward_kernels_compile_for_cuda(name, monkeypatch):
    """Every region with a backward kernel: all inputs' gradients wanted, every output seeded."""
    make, _, template = REGIONS[name]
    model, xs = make()
    for spec, inputs in region_calls(model, xs, monkeypatch):
        assert backward.unsupported(ir.loads(spec)) is None, name
        monkeypatch.setattr(backward, "_programs", _programs_as_interpreter)
        grads = [torch.randn_like(o) for o in run_reference(ir.loads(spec), inputs)]
        # as `run_backward` plans them: a BatchNorm vector (C,) as (C, 1, ..., 1)
        inputs = [ir.with_channel_view(t, m["channel_view"]) for t, m in zip(inputs, ir.loads(spec)["inputs"])]
        plan = backward._plan(spec, inputs, grads, [True] * len(inputs), "cuda")
        assert plan != "unsupported", name
        layout = {"loop": "looped"}.get(_layout(plan.kernel), _layout(plan.kernel))
        assert layout == template and len(plan.grid) == (2 if layout == "tiled" else 1), name
        args, _ = backward.launch_args(plan, inputs, grads)
        assert compile_for(plan.kernel, args, plan.consts).asm["cubin"], name


@compiles
def test_looped_backward_with_a_per_row_input_compiles_for_ampere_too(monkeypatch):
    """The looped backward's rarest parts: a per-row input's gradient summed over the column
    chunks, a per-column one added to the program's partial sums, a scalar's; sm_80 as well."""
    b = ir.SpecBuilder()
    x, r, s, w = (b.input(k, torch.float32) for k in "xrsw")
    v0 = b.node("div", [x, r], {}, torch.float32)
    v1 = b.node("rms_norm", [v0, w], {"eps": 1e-5, "eps_arg": 1e-5, "reduce_ndim": 1}, torch.float32)
    b.node("smelu", [v1, s], {}, torch.float32)
    spec = ir.dumps(b.build([2], 1))  # output: the SmeLU; the norm: node 1
    ins = [_x(3, WIDE), _x(3, 1).abs() + 0.5, torch.tensor(0.5), _x(WIDE)]
    grads = [_x(3, WIDE)]
    monkeypatch.setattr(backward, "_programs", _programs_as_interpreter)
    plan = backward._plan(spec, ins, grads, [True] * 4, "cuda")
    assert plan.classes == ("full", "row", "scalar", "col")
    args, _ = backward.launch_args(plan, ins, grads)
    for target in (H100, A100):
        assert compile_for(plan.kernel, args, plan.consts, target).asm["cubin"]


@compiles
def test_register_use_is_read_from_ptxas(monkeypatch):
    """`aot.resources` reads ptxas's report: the looped backward of add+RMSNorm over 16384
    bfloat16 columns (`WIDE_CONFIG`) spills nothing on sm_90."""
    xs = (_x(2, 16384, dtype=torch.bfloat16),) * 2
    (spec, inputs), = region_calls(AddRMS2(16384).bfloat16(), xs, monkeypatch)
    monkeypatch.setattr(backward, "_programs", _programs_as_interpreter)
    grads = [torch.randn_like(o) for o in run_reference(ir.loads(spec), inputs)]
    plan = backward._plan(spec, inputs, grads, [True] * 3, "cuda")
    args, _ = backward.launch_args(plan, inputs, grads)
    used = aot.resources(compile_for(plan.kernel, args, plan.consts))
    assert (plan.consts["ROWS"], plan.consts["num_warps"]) == backward.WIDE_CONFIG
    assert 0 < used["registers"] <= 255 and used["spill_stores"] == 0, used


@compiles
def test_a_kernel_that_cannot_compile_fails_here():
    """The check can fail: a kernel whose loop-carried value changes type is rejected by the
    compiler (the interpreter would run it)."""
    src = ("import triton\nimport triton.language as tl\n\n\n@triton.jit\ndef bad(x, N, BLOCK: tl.constexpr):\n"
           "    acc = tl.zeros([BLOCK], dtype=tl.float32)\n    for i in range(0, N, BLOCK):\n"
           "        acc = tl.zeros([2 * BLOCK], dtype=tl.float32)\n    tl.store(x + tl.arange(0, BLOCK), acc)\n")
    from fxrewrite.codegen.kernel_cache import KernelCache
    bad = KernelCache(2).load("test_bad_kernel", "bad", src)
    with pytest.raises(Exception):
        compile_for(bad, [torch.empty(4), 4], {"BLOCK": 4, "num_warps": 1})


N_COMPILING = len(REGIONS) + sum(1 for _, _, bwd in REGIONS.values() if bwd) + 4  # the @compiles tests


@pytest.mark.skipif(not INTERPRETED, reason="this process compiles directly")
def test_compiles_in_a_process_without_the_interpreter():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", __file__],
                          cwd=Path(__file__).resolve().parent.parent, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    summary = proc.stdout.strip().splitlines()[-1]
    assert re.search(rf"\b{N_COMPILING} passed, 1 skipped\b", summary), summary
