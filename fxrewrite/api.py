"""The public entry point: `optimize(model, example_inputs)`."""
from __future__ import annotations

import contextlib
import gc
import threading

import torch.fx as fx
import torch.nn as nn

from . import codegen
from . import passes as catalogue
from .partial import optimize_parts
from .rewrite.capture import CaptureError, capture
from .rewrite.mode import settle_mode
from .rewrite.passmanager import Pass
from .rewrite.pipeline import run_pipeline
from .rewrite.report import Report
from .rewrite.verify import VerificationError, verify


def optimize(model: nn.Module, example_inputs, passes=None, check: bool = False,
             rtol: float | None = None, atol: float | None = None, lower: str | None = None,
             inplace: bool = True, layout: str | None = None, dynamic=None, partial=None) -> nn.Module:
    """Capture `model`, canonicalise it, apply `passes` and return a new GraphModule.

    `model` is never modified. `passes`: pass names, preset names or Pass objects; by default
    the exact passes only (`passes.DEFAULT`). The result carries `.report` (what matched, what
    it became, what was skipped and why) and `.derivations` (how each new weight was computed
    from old ones). `check=True` also runs `verify` on `example_inputs` and stores the error in
    the report (raising if it is past tolerance). `lower="triton"` then replaces fused
    norm + activation regions with generated Triton kernels (`codegen`). `inplace=True` makes
    safe activations and residual adds in-place at the end, for eager speed (`passes.inplace`).
    `layout="channels_last"` stores 2-D conv weights channels-last (faster convolutions with
    oneDNN; checked on `example_inputs`, put back with a reason if the model needs NCHW).
    `dynamic`: the input axes a torch.export capture keeps dynamic, so that the result runs on
    other shapes: by default the batch axis, and the sequence axis of integer inputs (token ids,
    masks); `False` none, `True` all, or `{"input_ids": {0: "batch", 1: "seq"}}` (positions for
    positional inputs; a list of axes keeps them where export can). The report says which axes
    stayed dynamic and why others were specialised. `.train()` / `.eval()` work on the result,
    and raise where its graph is fixed in one mode (folded BatchNorm, removed dropout).
    `partial`: a model that does not capture whole (data-dependent detection heads) is optimized
    in parts by default: a copy of it whose largest capturable submodules are optimized
    (`fxrewrite.partial`), the rest left as it was, and the report says which and why. `True`
    optimizes in parts even a model that captures whole (its module tree stays the user's);
    `False` raises the `CaptureError` instead. A module class, a tuple of classes or a predicate
    `(qualified_name, module) -> bool` optimizes exactly the submodules it names, each on its own
    (per-block: `partial=LlamaDecoderLayer`), captured with the inputs they receive from
    `example_inputs` and every axis dynamic, in a copy of the model whose other modules stay as
    they are; so a block stays one module for `fully_shard(block)` or checkpointing. The report
    says which were optimized and which were left and why; a ValueError if none matches.
    """
    steps = build_pipeline(passes, lower=lower, inplace=inplace, layout=layout)

    def whole(module, inputs, dynamic_axes=dynamic):
        return _optimize_whole(module, inputs, steps, dynamic_axes)
    exact = not any(p.approximate for p in steps)  # parts of an approximate pipeline are checked by shape
    if partial is not None and partial is not False:
        result = optimize_parts(model, example_inputs, whole, Report(), select=None if partial is True else partial,
                                exact=exact)
    else:
        try:
            result = whole(model, example_inputs)
        except CaptureError as e:
            if partial is False:
                raise
            result = optimize_parts(model, example_inputs, whole, Report(), capture_error=e, exact=exact)
    if check:
        _check(model, result, example_inputs, rtol, atol)
    return result


def _optimize_whole(model: nn.Module, example_inputs, steps: list[Pass], dynamic) -> fx.GraphModule:
    report = Report()
    with no_full_collections():
        folds = {p.name for p in steps if p.exactness == "exact"} - _MODE_FREE
        with report.timed("capture"):  # without folds the result may train: an export capture follows both modes
            gm = capture(model, example_inputs, report, dynamic=dynamic, follow_modes=not folds)
        derivations = run_pipeline(gm, steps, report)
        settle_mode(gm, report, folds=folds)
    gm.report = report
    gm.derivations = derivations
    return gm


def _check(model: nn.Module, result: nn.Module, example_inputs, rtol, atol):
    report = result.report
    verdict = verify(model, result, example_inputs, rtol=rtol, atol=atol, raise_on_fail=False)
    report.error = verdict.as_dict()  # max abs/rel error and the tolerance that applied, per output
    for note in verdict.notes:  # e.g. no float64 run of the model: a fixed rtol instead
        report.note("check", "model", note)
    if not verdict.passed:
        raise VerificationError(f"optimized model differs from the original:\n{verdict}\n{report}")


# exact passes whose rewrites are the same in training and eval mode: they leave `.train()` allowed
_MODE_FREE = {catalogue.INPLACE.name, catalogue.CHANNELS_LAST.name, catalogue.LIFT_NORMS.name}


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


def build_pipeline(passes=None, lower: str | None = None, inplace: bool = True,
                   layout: str | None = None) -> list[Pass]:
    """The passes `optimize` and the compile backend run, in order: the selected ones (the exact
    default when None), then the Triton lowering (after lifting written-out RMSNorms), the
    in-place finishing step and the layout change, each when asked for."""
    if lower not in (None, "triton"):
        raise ValueError(f"unknown lowering {lower!r}; supported: 'triton'")
    if layout not in (None, "channels_last"):
        raise ValueError(f"unknown layout {layout!r}; supported: 'channels_last'")
    steps = catalogue.resolve(catalogue.DEFAULT if passes is None else passes)
    if lower == "triton":
        steps += [catalogue.LIFT_NORMS, codegen.LOWER_TRITON]
    if inplace:
        steps.append(catalogue.INPLACE)
    if layout == "channels_last":
        steps.append(catalogue.CHANNELS_LAST)
    return steps
