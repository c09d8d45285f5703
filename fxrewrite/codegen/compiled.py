"""What a fused region becomes inside a `torch.compile`d graph: its kernel, not a Python call.

`fxrewrite::fused_region` is an opaque custom op for eager use, `torch.export` and ONNX. Left
opaque under `torch.compile`, every region would cost a Python call per forward (the op's
dispatch and launch planning, ~10-30 µs), the overhead the kernels exist to remove. So, as
`torch.library.triton_op` does for its ops, the op decomposes when AOTAutograd traces it
(under `FunctionalTensorMode`):

  * CUDA tensors, Triton present, kernels allowed: the launch is planned at trace time from the
    traced shapes and strides and recorded through `torch.library.wrap_triton`, so the graph
    holds the generated kernel itself and Inductor launches it from its own wrapper code;
  * anything else (CPU, where no compiled kernel runs; FXREWRITE_CODEGEN=reference; dtypes a
    kernel does not take): the region's eager reference, which Inductor fuses like any other
    ATen ops.

`torch.export` keeps the op (the same switch `triton_op` reads: an exported program stays
high level and serialisable), and so does a compile without AOTAutograd (backend "eager").
The backward under compile is the traced reference's (Inductor generates its kernels).
FXREWRITE_COMPILED_REGIONS=opaque keeps the op opaque under compile too (the earlier
behaviour, for comparison and as an escape hatch). Like every choice made while tracing, the
environment is read when a graph is compiled, not per call.

Compile caches. AOTAutograd's cache is keyed by the graph Dynamo captured, where a region is
still the op, so a compilation made by another version of this library (other kernels, a fixed
bug) or under other settings would be served again. When Dynamo traces a lowered graph's
`runtime.call_region`, the op therefore gets a `build` argument (`build_tag`): a hash of this
package's code generation sources and of the settings read above. It changes nothing at run
time; it makes the cache key differ wherever what the op compiles to could. `torch.export`
records no tag (an exported program must not carry this machine's settings), so a graph that
calls the op itself (an exported program's module, a `make_fx` trace) is cached without one:
after upgrading this library or changing those settings, compile such graphs with a cleared
cache (`torch._inductor.utils.fresh_inductor_cache()`).
"""
from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import torch
from torch._subclasses.functional_tensor import FunctionalTensorMode

from .ir import loads
from .reference import run_reference
from .runtime import _env, _plan_launch, backend_for, bind, fused_region, use_interpreter

MODE_ENV = "FXREWRITE_COMPILED_REGIONS"


@functools.cache
def _source_hash() -> str:
    """The hash of codegen/*.py (read once per process)."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def build_tag() -> str:
    """What the region op compiles to, as a short string: the hash of the code generation sources
    and the settings `_decompose` reads. (A constant to Dynamo: read once per compilation.)"""
    settings = [_env(name) or "" for name in (MODE_ENV, "FXREWRITE_CODEGEN", "TRITON_INTERPRET")]
    return ":".join([_source_hash(), *settings])


# what torch.compiler.assume_constant_result(build_tag) does, without importing Dynamo (1.3 s)
# when this module loads: Dynamo calls the function and records its result as a constant
build_tag._dynamo_marked_constant = True


def _export_keeps_ops() -> bool:
    """True while `torch.export` traces (it keeps custom Triton ops whole), or when this torch
    cannot say (then the op is kept: an opaque op is always correct)."""
    try:
        from torch.export._trace import custom_triton_ops_decomposition_disabled
    except ImportError:
        return True
    return custom_triton_ops_decomposition_disabled()


def traced_kernel(spec_text: str, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """The region as one `wrap_triton` launch of its generated kernel, planned from the traced
    inputs (symbolic sizes stay symbolic in the grid and integer arguments)."""
    from torch.library import wrap_triton

    kernel, grid, args, consts, outs = bind(_plan_launch(spec_text, inputs, None, "cuda"), inputs)
    if kernel is not None:
        wrap_triton(kernel)[grid](*args, **consts)
    return outs


def traced_reference(spec_text: str, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """The region's eager reference, with any output that shares storage with an input or an
    earlier output copied (the op's outputs never alias its inputs). `_is_alias_of` compares
    storages, which also holds for the functional tensors AOTAutograd traces with (`_is_view`
    does not)."""
    outs, fresh = run_reference(loads(spec_text), inputs), []
    for t in outs:
        if any(torch._C._is_alias_of(t, u) for u in (*inputs, *fresh)):
            t = t.clone()
        fresh.append(t)
    return fresh


def _decompose(mode, op, types, args, kwargs):
    if _export_keeps_ops() or _env(MODE_ENV) == "opaque":
        return mode.__torch_dispatch__(op, types, args, kwargs)
    spec_text, inputs = args[:2]
    inputs = list(inputs)
    with mode:
        if inputs and inputs[0].is_cuda and not use_interpreter() and backend_for(inputs) == "triton":
            return traced_kernel(spec_text, inputs)
        return traced_reference(spec_text, inputs)


fused_region.register_torch_dispatch(FunctionalTensorMode, _decompose)
