"""Run a region: the PyTorch op, its launcher, the kernel cache and the derived backward.

`torch.ops.fxrewrite.fused_region(spec: str, inputs: Tensor[]) -> Tensor[]` is one custom op for
every region: the region is described by its spec text (`ir.dumps`), so a lowered graph is self
contained, `torch.compile` and `torch.export` see an ordinary op with a fake implementation (the
output shapes are the broadcast of the inputs' shapes), and nothing has to be registered per
model.

Where it runs:
  * CUDA tensors: the generated Triton kernel;
  * CPU tensors with TRITON_INTERPRET=1 in the environment: the same kernel in Triton's
    interpreter (tests);
  * otherwise (CPU without the interpreter, or FXREWRITE_CODEGEN=reference): the region's eager
    reference (`reference.run_reference`), so an optimised model runs everywhere.

Backward (`register_autograd`): where a region has one, a generated Triton backward kernel
(`backward.run_backward`: per row, the forward recomputed, then reverse mode over the region's
nodes; per-column and scalar input gradients reduced per program, then summed); otherwise
(an op without a derivative rule, a per-row gradient of a row wider than a block, and under
torch.compile) the gradient of the eager reference, by autograd on a recomputation of the
forward.

Kernel cache (`kernel_cache`, shared with the backward kernels): the source is a function of (spec text, launch specialisation); its structural
hash names a file `<kernel>_<hash>.py` under $FXREWRITE_CACHE_DIR (default
~/.cache/fx-rewrite/kernels), written atomically and imported once per process. Triton keeps
its own cache of the compiled binaries. The in-process kernel and launch-plan caches are LRUs
of at most CACHE_SIZE entries each: they are keyed by shapes, and a model fed many shapes
(dynamic batch, varying sequence lengths) must not grow them without end.
"""
from __future__ import annotations

import math
import os

import torch

from ..rewrite.effects import declare_pure
from . import emit
from .backward import run_backward
from .kernel_cache import CACHE_SIZE, LRU, KernelCache
from .ir import DTYPES, OPS, compute_dtype, dtype_name, loads, reduce_ndim, spec_hash, with_channel_view
from .reference import fresh_outputs, run_reference

# ---------------------------------------------------------------- where it runs


_ENV_DATA = getattr(os.environ, "_data", None)  # CPython's backing dict of os.environ (encoded keys)


def _env(name: str) -> str | None:
    """os.environ.get(name), read on every region call. `os.environ.get` of an unset variable
    goes through a KeyError inside Mapping.get (~2 µs, a tenth of a decode-shape call); the
    backing dict answers in ~0.1 µs and is what `os.environ` itself writes to."""
    if _ENV_DATA is None:
        return os.environ.get(name)
    key = _ENV_KEYS.get(name)
    if key is None:
        key = _ENV_KEYS[name] = os.environ.encodekey(name)
    v = _ENV_DATA.get(key)
    return None if v is None else os.environ.decodevalue(v)


_ENV_KEYS: dict[str, object] = {}  # name -> os.environ's encoding of it


def use_interpreter() -> bool:
    return _env("TRITON_INTERPRET") == "1"


_TRITON_IMPORTED = False  # set once `import triton` has succeeded (a failure is retried each call)


def triton_available() -> bool:
    global _TRITON_IMPORTED
    if _TRITON_IMPORTED:
        return True
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    _TRITON_IMPORTED = True
    return True


_KERNEL_DTYPES = frozenset(DTYPES.values())  # the torch dtypes a kernel takes (the spec's DTYPES)


def backend_for(inputs: list[torch.Tensor]) -> str:
    """'triton' or 'reference' for these tensors (see the module docstring): 'triton' when they
    all sit on one device a kernel runs on and have dtypes a kernel takes. The environment is
    read on every call (tests and users may change it between calls). A region call does not
    call this: `run` reads FXREWRITE_CODEGEN and `launch_args` TRITON_INTERPRET per call, and
    `launch_args` caches `kernel_takes`'s verdict with the launch plan, whose key holds
    everything that verdict reads."""
    if not inputs or _env("FXREWRITE_CODEGEN") == "reference":
        return "reference"
    first = inputs[0]
    if not first.is_cuda and not (first.is_cpu and use_interpreter()):
        return "reference"
    return "triton" if kernel_takes(inputs) else "reference"


def kernel_takes(inputs: list[torch.Tensor]) -> bool:
    """The part of `backend_for` that reads no environment: every input on the first one's
    device (one CUDA device, or the CPU), with a dtype a kernel takes, and Triton importable."""
    first = inputs[0]
    if first.is_cuda:
        index = first.get_device()
        for t in inputs:
            if t.dtype not in _KERNEL_DTYPES or not t.is_cuda or t.get_device() != index:
                return False
    elif first.is_cpu:
        for t in inputs:
            if t.dtype not in _KERNEL_DTYPES or not t.is_cpu:
                return False
    else:
        return False
    return triton_available()


# ---------------------------------------------------------------- launch planning

def _collapse_inner(sizes, strides):
    """The single stride of dims `sizes` seen as one flat dim, or None if they do not collapse."""
    dims = [(n, s) for n, s in zip(sizes, strides) if n != 1]
    if not dims:
        return 0
    for (n0, s0), (n1, s1) in zip(dims, dims[1:]):
        if s0 != s1 * n1:
            return None
    return dims[-1][1]


def materialise(t: torch.Tensor, channel_view: int, domain) -> torch.Tensor:
    """A contiguous copy of `t` broadcast to `domain`, for an input whose inner dims cannot be
    walked with one stride. Its strides depend only on `domain`, so a cached launch stays valid
    when the copy is redone for each call's tensor."""
    return with_channel_view(t, channel_view).expand(domain).contiguous()


def plan(spec: dict, inputs: list[torch.Tensor]):
    """Views of the inputs as rows x columns: (domain, M, N, lead sizes, per input (tensor, lead
    strides, column stride), indices of the inputs that had to be materialised). Broadcast dims
    get stride 0; leading dims are coalesced where every input allows it, so the usual
    contiguous case has one leading dim."""
    ts = [with_channel_view(t, meta["channel_view"]) for t, meta in zip(inputs, spec["inputs"])]
    domain = tuple(torch.broadcast_shapes(*[t.shape for t in ts]))
    if not domain:
        domain = (1,)
    nd = len(domain)
    inner = min(max(reduce_ndim(spec), 1), nd)
    lead, cols = list(domain[:nd - inner]), domain[nd - inner:]
    N = math.prod(cols)
    views, copied = [], []
    for i, (t, meta) in enumerate(zip(inputs, spec["inputs"])):
        e = ts[i].expand(domain)
        s_n = _collapse_inner(cols, e.stride()[nd - inner:])
        if s_n is None:  # inner dims not expressible with one stride: materialise this input
            e = materialise(t, meta["channel_view"], domain)
            s_n = _collapse_inner(cols, e.stride()[nd - inner:])
            copied.append(i)
        views.append([e, list(e.stride()[:nd - inner]), s_n])
    # drop size-1 leading dims, then merge neighbours that every input lets us merge
    keep = [d for d, n in enumerate(lead) if n != 1]
    lead = [lead[d] for d in keep]
    for v in views:
        v[1] = [v[1][d] for d in keep]
    d = len(lead) - 2
    while d >= 0:
        if all(v[1][d] == v[1][d + 1] * lead[d + 1] for v in views):
            lead[d] *= lead[d + 1]
            del lead[d + 1]
            for v in views:
                v[1][d] = v[1][d + 1]  # the merged dim steps like its inner part
                del v[1][d + 1]
        d -= 1
    if reduce_ndim(spec) == 0:  # no reduction: columns can absorb trailing leading dims too
        while lead and all(v[1][-1] == v[2] * N for v in views):
            N *= lead.pop()
            for v in views:
                v[1].pop()
    if not lead:
        lead = [1]
        for v in views:
            v[1] = [0]
    M = math.prod(lead)
    return domain, M, N, lead, views, copied


def _classes(views, N):
    out = []
    for _, lead_strides, s_n in views:
        rows = any(s != 0 for s in lead_strides)
        cols = s_n != 0 and N > 1
        kind = "full" if rows and cols else "col" if cols else "row" if rows else "scalar"
        out.append((kind, s_n == 1))
    return tuple(out)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def choose_config(M, N, ct: str, has_stats: bool):
    """(mode, BLOCK_N, ROWS, num_warps). One pass over memory when a row fits in registers
    (N <= 8192 in float32, 4096 in float64); several rows per program for small N. Wider rows:
    a region with row statistics loops over column chunks in each program ("loop"); one without
    (GLU, DyT, BatchNorm) puts the chunks on a second grid axis ("tiled"), so a few rows (decode:
    LLaMA's 11008-wide SwiGLU on 1-64 rows) still spread over several programs, where a loop ran
    each row's chunks one after another in one program. M and N are ints, or SymInts when
    `compiled` traces a launch."""
    max_single = 8192 if ct == "float32" else 4096
    N = int(N)  # a symbolic row width (traced for torch.compile) is specialised: it picks the kernel
    if N <= max_single:
        mode, block = "single", _next_pow2(N)
    else:
        mode, block = "loop" if has_stats else "tiled", max_single // 2
    # ROWS is a tuning choice, not a correctness one (rows past M are masked): a symbolic M
    # (dynamic batch or sequence length) gets the large-M choice rather than a guard on its value
    rows = max(1, min(64, 2048 // block, _next_pow2(M) if isinstance(M, int) else 64))
    warps = min(16, max(1, rows * block // 512))
    return mode, block, rows, warps


# ---------------------------------------------------------------- kernel cache

_KERNELS = KernelCache(CACHE_SIZE)


def kernel_source(spec_text: str, launch: emit.Launch) -> tuple[str, str, str]:
    """(kernel name, structural hash, source) for a region and a launch specialisation."""
    spec = loads(spec_text)
    return emit.kernel_name(spec), spec_hash(spec_text, launch.key()), emit.generate(spec, launch)


def get_kernel(spec_text: str, launch: emit.Launch):
    fn = _KERNELS.get(spec_hash(spec_text, launch.key()))
    if fn is None:
        name, key, src = kernel_source(spec_text, launch)
        fn = _KERNELS.load(key, name, src)
    return fn


# ---------------------------------------------------------------- forward

_LAUNCHES = LRU(CACHE_SIZE)


def run_triton(spec_text: str, inputs: list[torch.Tensor], config=None) -> list[torch.Tensor] | None:
    """Launch the generated kernel; None, launching nothing, when these inputs cannot run one
    (`launch_args`). `config` overrides (mode, BLOCK_N, ROWS, num_warps).

    The launch (kernel, grid, integer arguments) is a function of the spec and the inputs'
    shapes, strides, dtypes and the target only, so it is planned once and cached: a repeated
    call costs the cache look-up, the output allocation and Triton's own launch (`launch_args`)."""
    launch = launch_args(spec_text, inputs, config)
    if launch is None:
        return None
    kernel, grid, args, consts, outs = launch
    if kernel is not None:
        first = inputs[0]
        if first.is_cuda and first.get_device() != torch.cuda.current_device():
            with torch.cuda.device(first.device):  # Triton launches on the current device
                kernel[grid](*args, **consts)
        else:
            kernel[grid](*args, **consts)
    return outs


_NO_KERNEL = "no kernel"  # a cached plan for inputs no kernel takes (`kernel_takes`): the reference runs


def launch_args(spec_text: str, inputs: list[torch.Tensor], config=None):
    """(kernel, grid, args, kwargs, outputs): the launch `run_triton` makes for these inputs,
    `kernel[grid](*args, **kwargs)`, which writes `outputs` (freshly allocated here, and the
    last of `args` before the integer arguments). kernel is None (nothing to launch) for an empty
    domain; the whole answer is None when these inputs cannot run a kernel (`kernel_takes`, or
    CPU tensors without TRITON_INTERPRET=1). FXREWRITE_CODEGEN is not read here (`run` reads it).

    The plan is cached by (spec text, config, target, per input: shape, strides, dtype, device
    index or CPU-ness). It holds no tensors and nothing device-specific (Triton keeps its
    binaries per device): inputs that must be materialised are listed as (index, channel_view)
    and copied again from each call's tensors (a cached copy would be the first call's values).
    `kernel_takes`'s verdict is a function of that key, so it is cached with the plan instead of
    being re-checked per call (~0.4 µs of a decode-shape call). CPU tensors can only run in
    Triton's interpreter, so only CUDA tensors read TRITON_INTERPRET to pick the target."""
    first = inputs[0]
    if first.is_cuda:
        target = "interpreter" if use_interpreter() else "cuda"
        key = [spec_text, config, target]
        for t in inputs:  # (a flat key: ~0.2 µs less than a tuple per input)
            key += (t.shape, t.stride(), t.dtype, t.get_device())
    elif first.is_cpu and use_interpreter():
        target = "interpreter"
        key = [spec_text, config, target]
        for t in inputs:
            key += (t.shape, t.stride(), t.dtype, t.is_cpu)
    else:
        return None
    if not (_TRITON_IMPORTED or triton_available()):
        return None
    key = tuple(key)
    hit = _LAUNCHES.get(key)
    if hit is None:
        hit = _plan_launch(spec_text, inputs, config, target) if kernel_takes(inputs) else _NO_KERNEL
        _LAUNCHES.put(key, hit)
    if hit is _NO_KERNEL:
        return None
    return bind(hit, inputs)


def bind(plan, inputs: list[torch.Tensor]):
    """(kernel, grid, args, kwargs, outputs) of a launch plan (`_plan_launch`) for these inputs:
    the outputs allocated, the inputs that need it materialised."""
    kernel, grid, ints, domain, out_dtypes, consts, copies, likes = plan
    outs = [torch.empty(domain, dtype=dt, device=inputs[0].device) if i is None else torch.empty_like(inputs[i])
            for i, dt in zip(likes, out_dtypes)]
    if kernel is None:
        return None, None, (), {}, outs
    if copies:
        inputs = list(inputs)
        for i, channel_view in copies:
            inputs[i] = materialise(inputs[i], channel_view, domain)
    return kernel, grid, (*inputs, *outs, *ints), consts, outs


def _plan_launch(spec_text, inputs, config, target):
    """(kernel, grid, integer args, domain, output dtypes, constexprs, copies, likes): everything
    a launch needs but the tensors; `copies` is ((input index, channel_view), ...) to materialise;
    `likes` per output the index of a contiguous input of the output's shape and dtype, whose
    `torch.empty_like` allocates it in half the time of `torch.empty(shape, dtype, device)`
    (~2 µs a call, a fifth of a decode-shape region's host time), else None."""
    spec = loads(spec_text)
    domain, M, N, lead, views, copied = plan(spec, inputs)
    out_dtypes = [DTYPES[spec["nodes"][j]["dtype"]] for j in spec["outputs"]]
    copies = tuple((i, spec["inputs"][i]["channel_view"]) for i in copied)
    likes = tuple(next((i for i, t in enumerate(inputs) if tuple(t.shape) == domain and t.dtype == dt
                        and t.is_contiguous()), None) for dt in out_dtypes)
    if M * N == 0:
        return None, None, (), domain, out_dtypes, {}, copies, likes
    in_dtypes = tuple(dtype_name(t.dtype) for t in inputs)
    ct = compute_dtype(spec, in_dtypes)
    has_stats = spec["norm"] is not None and bool(OPS[spec["nodes"][spec["norm"]]["op"]].stats)
    mode, block, rows, warps = config or choose_config(M, N, ct, has_stats)
    launch = emit.Launch(len(lead), _classes(views, N), in_dtypes, mode, target)
    kernel = get_kernel(spec_text, launch)
    ints = [M, N] + list(lead[1:])
    for (kind, contig), (_, lead_strides, s_n) in zip(launch.classes, views):
        if kind in ("full", "row"):
            ints += lead_strides
        if kind in ("full", "col") and not contig:
            ints.append(s_n)
    consts = {"ROWS": rows, "BLOCK_N": block, "num_warps": warps}
    grid = (triton_cdiv(M, rows), triton_cdiv(N, block)) if mode == "tiled" else (triton_cdiv(M, rows),)
    return kernel, grid, tuple(ints), domain, out_dtypes, consts, copies, likes


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def run(spec_text: str, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """The op's implementation: Triton where it can run (`backend_for`, decided with the cached
    launch plan), the eager reference elsewhere. The spec text is parsed only for the
    reference: a kernel's launch plan is cached by it."""
    if inputs and _env("FXREWRITE_CODEGEN") != "reference":
        outs = run_triton(spec_text, inputs)
        if outs is not None:
            return outs
    return fresh_outputs(run_reference(loads(spec_text), inputs), inputs)


# ---------------------------------------------------------------- the op

@torch.library.custom_op("fxrewrite::fused_region", mutates_args=())
def fused_region(spec: str, inputs: list[torch.Tensor], build: str = "") -> list[torch.Tensor]:
    """A fused norm + elementwise region (see `codegen`); `spec` is the region's IR as JSON.
    `build` does not change the result: under torch.compile it names what the op compiles to
    (`compiled.build_tag`), so that compile caches keyed by the captured graph tell builds apart."""
    return run(spec, list(inputs))


@fused_region.register_fake
def _fused_region_fake(spec: str, inputs: list[torch.Tensor], build: str = "") -> list[torch.Tensor]:
    s = loads(spec)
    shapes = []
    for t, meta in zip(inputs, s["inputs"]):
        shapes.append(tuple(t.shape) + (1,) * meta["channel_view"] if meta["channel_view"] else tuple(t.shape))
    domain = torch.broadcast_shapes(*shapes)
    return [inputs[0].new_empty(domain, dtype=DTYPES[s["nodes"][j]["dtype"]]) for j in s["outputs"]]


def _setup_context(ctx, inputs, output):
    spec, tensors = inputs[:2]
    ctx.spec = spec
    ctx.needs = [t.requires_grad and t.is_floating_point() for t in tensors]
    ctx.save_for_backward(*tensors)


def _backward(ctx, grads):
    """The generated backward kernel (`backward.run_backward`) where the region has one, else the
    vjp of the eager reference on a recomputed forward."""
    tensors = ctx.saved_tensors
    if backend_for(list(tensors)) == "triton":
        got = run_backward(ctx.spec, list(tensors), list(grads), ctx.needs)
        if got is not None:
            return None, got, None
    spec = loads(ctx.spec)
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(n) for t, n in zip(tensors, ctx.needs)]
        outs = run_reference(spec, leaves)
        pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
        wrt = [x for x, n in zip(leaves, ctx.needs) if n]
        if not pairs or not wrt:
            return None, [None] * len(tensors), None
        got = iter(torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs], allow_unused=True))
    return None, [next(got) if n else None for n in ctx.needs], None


fused_region.register_autograd(_backward, setup_context=_setup_context)

OP = torch.ops.fxrewrite.fused_region.default


# ---------------------------------------------------------------- what a lowered graph calls

_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


@declare_pure
def call_region(spec: str, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """What a lowered graph calls: `OP(spec, inputs)`, without the dispatcher when nothing needs it.

    Going through the custom op costs ~15-20 µs per call on top of the launch (its autograd
    layer, the dispatcher's redispatch, the alias checks): more than a decode-shape kernel
    takes. So a plain eager call (real tensors, no gradient to record, no tracer, mode or
    compiler watching) runs the implementation directly; any other call goes through the op,
    which is what `torch.compile`, `torch.export`, `make_fx`, `jit.trace`, dispatch modes
    (FlopCounterMode, profilers' modes) and autograd need to see. Both run the same `run`."""
    if _direct_ok(inputs):
        return run(spec, inputs)
    if _is_compiling() and not _is_exporting():
        return OP(spec, inputs, compiled.build_tag())
    return OP(spec, inputs)


_grad_enabled, _is_compiling, _is_exporting = torch.is_grad_enabled, torch.compiler.is_compiling, torch.compiler.is_exporting
_tracing_state, _dispatch_modes = torch._C._get_tracing_state, torch._C._len_torch_dispatch_stack
_function_modes = torch._C._is_torch_function_mode_enabled


def _direct_ok(inputs) -> bool:
    """True when calling the op would only add dispatch: every input a real tensor (no fake,
    functional or subclass tensor, no fx Proxy), no gradient to record, and no compiler, tracer
    or Python mode active. (The checks are bound once: the module attribute look-ups cost ~0.15 µs
    of the ~0.85 µs this takes for two inputs.)"""
    grad = _grad_enabled()
    for t in inputs:
        if type(t) not in _PLAIN_TENSORS or (grad and t.requires_grad):
            return False
    return not (_is_compiling() or _tracing_state() is not None or _dispatch_modes() or _function_modes())


def is_region_call(node) -> bool:
    """An FX node that runs a fused region: `call_region` (lowering's output) or the op itself
    (what a re-trace of a lowered graph, torch.export or Dynamo records)."""
    return node.op == "call_function" and (node.target is call_region or node.target is OP)


from . import compiled  # noqa: E402,F401  (registers how the op decomposes under torch.compile)
