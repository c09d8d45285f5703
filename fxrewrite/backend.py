"""`torch.compile(model, backend="rewrite")`: this library's passes inside torch.compile.

Dynamo hands a backend an FX graph whose parameters and buffers are graph inputs and whose
calls are functional (`torch.conv2d`, `F.batch_norm`, `operator.iadd`). For inference graphs
the parameters become constants first (`fxrewrite.rewrite.freeze`, what Inductor's freezing does, on a
copy of the graph); then the same pipeline as `optimize` runs (`fxrewrite.api.build_pipeline`,
`fxrewrite.rewrite.pipeline.run_pipeline`), and the result goes to the final compiler (Inductor by
default).

When it freezes, and when it does not (the graph then passes through unchanged):
  * grad enabled and some input requires grad: a training graph; folding would detach the
    weights from autograd, so nothing is rewritten;
  * a batch norm in training mode: it updates its running statistics, nothing is folded;
  * a parameter/buffer the graph mutates in place is never frozen.

If the pipeline raises on a graph, that graph is compiled unchanged, with a warning: an
optimisation bug must not stop the user's model from compiling.

Frozen weights are assumed not to change (Inductor's freezing assumes the same). A cheap guard
checks it on every call: if a frozen tensor was modified in place since compile time (its
`_version` moved: `optimizer.step()`, `load_state_dict`), the call runs Dynamo's original graph
eagerly instead, with a warning, so results are never stale. Dynamo shares one compiled graph
between instances of a module class (two copies of a model, or layers compiled one by one with
`layer.compile(backend="rewrite")`): a call with another instance's tensors is not stale but
needs its own folded weights, so the graph is frozen and optimised again for that instance (a
variant; at most `max_variants` alive per graph, 8 by default; past that, such calls run Dynamo's
graph eagerly, with a warning). A graph compiled for dynamic shapes gets no variants (one built
at a call would be compiled for that call's sizes): other instances run Dynamo's graph.

Options, through `torch.compile(model, backend="rewrite", options={...})`:
    passes    pass names / presets / Pass objects (default `passes.DEFAULT`, exact passes)
    lower     None or "triton" (generated Triton kernels for fused regions, `codegen`)
    layout    None or "channels_last" (checked on Dynamo's example inputs, as in `optimize`)
    inplace   False (default: the final compiler plans buffers) or True
    compiler  "inductor" (default), "eager", "aot_eager" (AOTAutograd's graphs run eagerly:
              what Inductor is handed, without Inductor; lowered regions decompose there as
              under Inductor, `codegen.compiled`), or a callable `(gm, example_inputs) -> callable`
    verbose   print each graph's report table to stderr
    max_variants  how many instances' weights one graph is optimised for (8; see below)
The report of every compiled graph is kept in `REPORTS` (most recent last; `last_report()`).

Registered with Dynamo through the `torch_dynamo_backends` entry point (no import needed) and,
when that entry point is not installed, on import of this module.
"""
from __future__ import annotations

import sys
import warnings
import weakref
from typing import Callable

import torch
import torch.fx as fx

from .api import build_pipeline
from .rewrite.freeze import freeze_parameters, why_not_freeze
from .rewrite.pipeline import run_pipeline
from .rewrite.report import Report

OPTIONS = ("passes", "lower", "layout", "inplace", "compiler", "verbose", "max_variants")
MAX_VARIANTS = 8  # default: per compiled graph, the module instances whose weights it is frozen for
REPORTS: list[Report] = []
_MAX_REPORTS = 64


def last_report() -> Report | None:
    """The report of the most recently compiled graph (None before any)."""
    return REPORTS[-1] if REPORTS else None


def rewrite_backend(gm: fx.GraphModule, example_inputs, **kwargs) -> Callable:
    """A Dynamo backend: freeze weights (inference only), run the rewrite pipeline, compile."""
    options = dict(kwargs.pop("options", None) or {})
    mode = kwargs.pop("mode", None)
    if kwargs:
        raise TypeError(f"rewrite backend: unexpected arguments {sorted(kwargs)}")
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"rewrite backend: unknown option(s) {unknown}; known: {list(OPTIONS)}")
    compiler = _final_compiler(options.get("compiler", "inductor"), mode)

    def steps():
        return build_pipeline(options.get("passes"), lower=options.get("lower"),
                              inplace=options.get("inplace", False), layout=options.get("layout"))

    first_steps = steps()  # (bad options raise here, whatever the graph)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    reason = why_not_freeze(gm, placeholders, example_inputs)
    if reason is not None:
        report = Report()
        _remember(report)
        report.note("backend", "graph", f"passed through unchanged: {reason}")
        _print(options, report)
        return compiler(gm, list(example_inputs))
    first = _optimise(gm, placeholders, example_inputs, first_steps, options, compiler, then="compiling it unchanged")
    if first is None:  # the pipeline failed (reported, with a warning): Dynamo's graph, compiled
        return compiler(gm, list(example_inputs))
    limit, why = options.get("max_variants", MAX_VARIANTS), "raise options={'max_variants': N}, or compile the whole model"
    if _symbolic(example_inputs):  # a later variant would be compiled for one call's sizes, and serve all
        limit, why = 1, "the graph was compiled for dynamic shapes: compile with dynamic=False, or the whole model"

    frozen = first.frozen  # (not `first` itself: a closure over it would keep its weights alive)

    def another_instance(inputs):  # the same inputs frozen (Dynamo's guards held: same grad mode)
        try:
            return _optimise(gm, placeholders, inputs, steps(), options, compiler, indices=frozen,
                             then="running it unoptimised for these weights")
        except Exception as e:  # noqa: BLE001  (freezing or the final compiler: never the user's call)
            warnings.warn(f"rewrite backend: optimising the graph for another instance's weights failed "
                          f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})")
            return None

    return _Guarded(first, gm, another_instance, limit, why)


def _symbolic(example_inputs) -> bool:
    """Whether Dynamo compiled the graph for symbolic sizes (dynamic shapes)."""
    return any(isinstance(x, torch.SymInt) or isinstance(x, torch.Tensor) and any(
        isinstance(d, torch.SymInt) for d in x.shape) for x in example_inputs)


def _optimise(gm: fx.GraphModule, placeholders, inputs, steps, options: dict, compiler, indices=None, then=""):
    """Freeze `gm`'s weights as found in `inputs` (those at `indices` if given), run the pipeline
    on the frozen copy, compile: a `_Variant`, or None when the pipeline raised (reported, with a
    warning: an optimisation bug must not break the user's compile)."""
    report = Report()
    _remember(report)
    work, frozen = freeze_parameters(gm, placeholders, inputs, report, indices)
    try:
        run_pipeline(work, steps, report)
    except Exception as e:  # noqa: BLE001
        detail = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        report.note("backend", "graph", f"passed through unchanged: the pipeline failed ({detail})")
        warnings.warn(f"rewrite backend: the rewrite pipeline failed on a graph ({detail}); {then}")
        _print(options, report)
        return None
    _print(options, report)
    compiled = compiler(work, [x for i, x in enumerate(inputs) if i not in frozen])
    return _Variant(compiled, frozen, {i: inputs[i] for i in frozen})


class _Variant:
    """A compiled graph frozen for one set of weights, known by weak references to the tensors
    it was frozen from (their identity and in-place version; a dead one never matches, so a
    discarded model's variant is dropped, not mistaken for a new tensor at the same address).
    `compiled` None: these weights run Dynamo's graph (optimising for them failed)."""

    SAME, CHANGED, OTHER = "same", "changed", "other"

    def __init__(self, compiled, frozen: set[int], tensors: dict):
        self.compiled = compiled
        self.frozen = frozen
        self.keys = [(i, weakref.ref(t), t._version) for i, t in tensors.items()]
        self.stale = compiled is None  # (also set when one of its tensors is modified in place)

    def state(self, args) -> str:
        """SAME: these are its tensors, unchanged; CHANGED: its tensors, one modified in place
        since; OTHER: not all of them its tensors (another instance's)."""
        changed = False
        for i, ref, version in self.keys:
            a = args[i]
            if a is not ref():
                return self.OTHER
            if a._version != version:
                changed = True
        return self.CHANGED if changed else self.SAME

    def alive(self) -> bool:
        return all(ref() is not None for _, ref, _ in self.keys)

    def __call__(self, args):
        # Dynamo calls a backend's result with positional inputs, and so does this (Inductor's
        # result takes them that way too, whatever its copied `_boxed_call` attribute says)
        return self.compiled(*[a for j, a in enumerate(args) if j not in self.frozen])


class _Guarded:
    """What the backend returns for a frozen graph: the variant frozen for the call's weights;
    a new variant for another instance's weights (up to `limit` alive at once); Dynamo's
    original graph, run eagerly, when the weights were modified in place since freezing, when
    optimising for them failed, or past the limit."""

    def __init__(self, first: _Variant, original: fx.GraphModule, another_instance, limit: int, why: str):
        self.variants = [first]
        self.frozen = first.frozen  # the inputs every variant freezes (kept when `first` is dropped)
        self.original = original
        self.another_instance = another_instance
        self.limit, self.why = limit, why
        self.warned_limit = False

    def __call__(self, *args):
        for v in self.variants:
            state = v.state(args)
            if state == _Variant.OTHER:
                continue
            if state == _Variant.CHANGED and not v.stale:
                v.stale = True
                warnings.warn("rewrite backend: a frozen weight changed after compilation; running the "
                              "unoptimised graph for it from now on (call torch._dynamo.reset() to re-fold)")
            return self.original(*args) if v.stale else v(args)
        self.variants = [v for v in self.variants if v.alive()]  # discarded instances' variants go
        if len(self.variants) < self.limit:
            v = self.another_instance(args)
            if v is None:  # remembered: these weights run Dynamo's graph, not another attempt per call
                v = _Variant(None, self.frozen, {i: args[i] for i in self.frozen})
            self.variants.append(v)
            return self.original(*args) if v.stale else v(args)
        if not self.warned_limit:
            self.warned_limit = True
            warnings.warn(f"rewrite backend: one compiled graph met more than {self.limit} sets of weights "
                          f"(module instances); the others run the unoptimised graph eagerly ({self.why})")
        return self.original(*args)


# ---------------------------------------------------------------- final compilers

def _final_compiler(choice, mode):
    if callable(choice):
        return choice
    if choice == "eager":
        return lambda gm, inputs: gm.forward
    if choice == "aot_eager":
        return torch._dynamo.lookup_backend("aot_eager")
    if choice == "inductor":
        def inductor(gm, inputs):
            from torch._inductor.compile_fx import compile_fx
            patches = torch._inductor.list_mode_options(mode) if mode else None
            return compile_fx(gm, inputs, config_patches=patches) if patches else compile_fx(gm, inputs)
        return inductor
    raise ValueError(f"rewrite backend: compiler must be 'inductor', 'eager', 'aot_eager' or a callable, not {choice!r}")


def _remember(report: Report):
    REPORTS.append(report)
    del REPORTS[:-_MAX_REPORTS]


def _print(options, report: Report):
    if options.get("verbose"):
        print(report.table(), file=sys.stderr)


def _register():
    """Register on import unless the installed entry point already provides the name (loading
    it would then register a second time, which Dynamo refuses)."""
    from importlib.metadata import entry_points

    from torch._dynamo.backends import registry
    if "rewrite" in registry._COMPILER_FNS:
        return
    if any(ep.name == "rewrite" for ep in entry_points(group="torch_dynamo_backends")):
        return  # lookup_backend("rewrite") loads it from there
    registry.register_backend(rewrite_backend, name="rewrite")


_register()
