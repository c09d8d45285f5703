"""Ahead-of-time compilation of a planned kernel launch for an NVIDIA GPU, on a machine without one.

    compiled = compile_launch(kernel, args, consts, arch=90)   # Triton's compiler, down to the cubin
    resources(compiled)        # {"registers": 122, "spill_stores": 0, "spill_loads": 0} (ptxas -v)

Triton compiles for a `GPUTarget` without a driver, with the ptxas its wheel ships. The launch is
specialised as Triton's JIT would specialise it on a GPU (`kernel[grid](*args, **consts)`):
pointer dtypes, integers as i32/i64, an integer 1 as a constant, 16-byte divisibility of pointers
and integers as attributes; CPU tensors stand in for CUDA ones (both allocators align to at least
16 bytes). So the generated kernels are checked against the compiler, and their register use
read, where tests and benchmarks run (`tests/test_codegen_cuda_compile.py`,
`bench/kernel_registers.py`); how fast they run needs the GPU.

Needs a process where triton was imported without TRITON_INTERPRET=1: under it Triton's language
library is built for the interpreter and does not compile.
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile


def unavailable() -> str | None:
    """Why this process cannot compile ahead of time (None: it can): no triton, no NVIDIA
    backend, a Triton whose JIT internals differ from those this module calls (written against
    triton 3.8), or TRITON_INTERPRET=1."""
    import importlib.util
    if importlib.util.find_spec("triton") is None or importlib.util.find_spec("triton.backends.nvidia") is None:
        return "no Triton with an NVIDIA backend"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "TRITON_INTERPRET=1: Triton's language library is the interpreter's in this process"
    import triton
    from triton.runtime import jit
    if not hasattr(jit, "create_function_from_signature") or not hasattr(triton.runtime.JITFunction, "_pack_args"):
        return f"triton {triton.__version__}'s JIT internals differ from those this module calls"
    return None


def _check_process():
    why = unavailable()
    if why:
        raise RuntimeError(f"ahead-of-time compilation is not available here: {why}")


def compile_launch(kernel, args: list, consts: dict, arch: int = 90):
    """`kernel` (a `triton.jit` function) compiled for sm_`arch` as a launch with positional `args`
    and keyword `consts` (constexprs and `num_warps`) would compile it; raises the compiler's
    error."""
    _check_process()
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = dict(consts, debug=False)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)


def resources(compiled, arch: int = 90) -> dict:
    """Registers per thread and spill bytes of a compiled kernel, as `ptxas -v` reports them."""
    from triton.backends.nvidia.compiler import get_ptxas
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "kernel.ptx")
        with open(src, "w") as f:
            f.write(compiled.asm["ptx"])
        suffix = "a" if arch >= 90 else ""
        log = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name=sm_{arch}{suffix}", src, "-o",
                              os.path.join(d, "kernel.cubin")], capture_output=True, text=True, check=True).stderr
    found = {"registers": r"Used (\d+) registers", "spill_stores": r"(\d+) bytes spill stores",
             "spill_loads": r"(\d+) bytes spill loads"}
    return {k: int(re.search(p, log).group(1)) for k, p in found.items()}
