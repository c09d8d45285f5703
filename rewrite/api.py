"""The public entry point: `optimize(model, example_inputs)`."""
from __future__ import annotations

import contextlib
import gc
import threading

import torch.fx as fx
import torch.nn as nn

from .canonicalize import canonicalize
from .capture import capture, recompile
from .inplace import make_inplace
from .passmanager import Pass, run_pass
from .report import Report
from .rewriter import Derivation
from .verify import verify


def optimize(model: nn.Module, example_inputs, passes=None, check: bool = False,
             rtol: float | None = None, atol: float | None = None, lower: str | None = None,
             inplace: bool = True, layout: str | None = None) -> fx.GraphModule:
    """Capture `model`, canonicalise it, apply `passes` and return a new GraphModule.

    `model` is never modified. `passes`: pass names, preset names or Pass objects; by default
    the exact passes only (`passes.DEFAULT`). The result carries `.report` (what matched, what
    it became, what was skipped and why) and `.derivations` (how each new weight was computed
    from old ones). `check=True` also runs `verify` on `example_inputs` and stores the error in
    the report (raising if it is past tolerance). `lower="triton"` then replaces fused
    norm + activation regions with generated Triton kernels (`codegen`). `inplace=True` makes
    safe activations and residual adds in-place at the end, for eager speed (`rewrite.inplace`).
    `layout="channels_last"` stores 2-D conv weights channels-last (faster convolutions with
    oneDNN; checked on `example_inputs`, put back with a reason if the model needs NCHW).
    """
    import passes as catalogue  # the registry lives beside the engine, not inside it

    selected: list[Pass] = catalogue.resolve(catalogue.DEFAULT if passes is None else passes)
    report = Report()
    with no_full_collections():
        with report.timed("capture"):
            gm = capture(model, example_inputs, report)
        derivations = run_pipeline(gm, selected, report, lower=lower, inplace=inplace)
    if layout is not None:
        if layout != "channels_last":
            raise ValueError(f"unknown layout {layout!r}; supported: 'channels_last'")
        from .layout import to_channels_last
        with report.timed("layout"):
            to_channels_last(gm, example_inputs, report)
    gm.report = report
    gm.derivations = derivations
    if check:
        result = verify(model, gm, example_inputs, rtol=rtol, atol=atol, raise_on_fail=False)
        report.error = result.as_dict()  # max abs/rel error and the tolerance that applied, per output
        for note in result.notes:  # e.g. no float64 run of the model: a fixed rtol instead
            report.note("check", "model", note)
        if not result.passed:
            from .verify import VerificationError
            raise VerificationError(f"optimized model differs from the original:\n{result}\n{report}")
    return gm


@contextlib.contextmanager
def no_full_collections():
    """Keep Python's garbage collector to young objects while a graph is built and rewritten.

    Capture and rewriting allocate about ten objects per node and keep nearly all of them
    alive until the end, so each full collection (triggered every so many allocations) frees
    nothing but walks the whole heap: the model, torch, and the growing graph. That made the
    cost of `optimize` grow faster than the graph (1.66 vs 1.31 s at 9k nodes:
    `bench/rewrite_cost.py --gc-default`). Young collections still run, less often, so short-lived
    cycles are still freed. The thresholds are process-wide: the first of overlapping calls
    (threads) raises them, the last to leave puts back what was there before; automatic
    collection switched off by the user (threshold 0) stays off."""
    global _collections_held
    with _collections_lock:
        if _collections_held == 0:
            _collections_saved[:] = gc.get_threshold()
            if _collections_saved[0] > 0:
                gc.set_threshold(max(_collections_saved[0], 50_000), _collections_saved[1],
                                 max(_collections_saved[2], 1_000_000))
        _collections_held += 1
    try:
        yield
    finally:
        with _collections_lock:
            _collections_held -= 1
            if _collections_held == 0:
                gc.set_threshold(*_collections_saved)


_collections_lock = threading.Lock()
_collections_held = 0
_collections_saved: list[int] = []


def run_pipeline(gm: fx.GraphModule, selected: list[Pass], report: Report,
                 lower: str | None = None, inplace: bool = False) -> list[Derivation]:
    """Canonicalise `gm` in place, apply the passes `selected`, optionally lower, drop tensors no
    longer read, and recompile once. Shared by `optimize` and the torch.compile backend
    (`rewrite.backend`), so both run exactly the same pipeline. Returns the derivations."""
    with report.timed("canonicalize"):
        canonicalize(gm, report)
    derivations: list[Derivation] = []
    before = _tensor_names(gm)
    for p in selected:
        with report.timed(p.name):
            run_pass(gm, p, report, derivations)
    if lower is not None:
        if lower != "triton":
            raise ValueError(f"unknown lowering {lower!r}; supported: 'triton'")
        from codegen import lower_to_triton
        with report.timed("lower_triton"):
            lower_to_triton(gm, report)
    with report.timed("finish"):
        _drop_unused_tensors(gm, report, before, derivations)
        if inplace:
            make_inplace(gm)
        gm.graph.lint()
    with report.timed("recompile"):
        recompile(gm)
    return derivations


def _tensor_names(gm: nn.Module) -> set[str]:
    return {n for n, _ in gm.named_parameters(remove_duplicate=False)} | {n for n, _ in gm.named_buffers(
        remove_duplicate=False)}


def _drop_unused_tensors(gm: fx.GraphModule, report: Report, before: set[str], derivations: list[Derivation]):
    """Delete parameters/buffers no node reads any more, and say where each went."""
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and not node.users:
            gm.graph.erase_node(node)
            used.discard(node.target)
    used_modules = {n.target for n in gm.graph.nodes if n.op == "call_module"}

    def needed(name: str) -> bool:
        return name in used or any(name.startswith(m + ".") for m in used_modules)

    absorbed: dict[str, list[str]] = {}
    for d in derivations:
        for src in d.sources:
            if isinstance(src, str):
                absorbed.setdefault(src, []).append(d.target)
    # intermediates a pass derived and a later pass absorbed (BN-folded weights merged into one
    # conv): ours, not the user's, so they go without a record of their own
    for d in derivations:
        if d.target not in before and not needed(d.target) and hasattr(gm, d.target):
            delattr(gm, d.target)
    gone: dict[str, list[str]] = {}  # owner module -> attributes removed
    for name in sorted(before):
        if needed(name):
            continue
        owner, _, attr = name.rpartition(".")
        mod = gm.get_submodule(owner) if owner else gm
        if attr in mod._parameters:
            del mod._parameters[attr]
        elif attr in mod._buffers:
            del mod._buffers[attr]
        gone.setdefault(owner, []).append(attr)
    for owner, attrs in gone.items():
        into = sorted({t for a in attrs for t in absorbed.get(f"{owner}.{a}" if owner else a, [])})
        where = f"absorbed into {', '.join(into)}" if into else "no longer read by the graph"
        report.removed("cleanup", owner or "<root>", f"{', '.join(attrs)}: {where}")
    gm.delete_all_unused_submodules()
