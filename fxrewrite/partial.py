"""Optimize the parts of a model that capture whole, when the model itself does not (or when asked).

Detection and segmentation models die in capture on data-dependent post-processing (box
decoding, NMS, loops over proposals) while their backbone, where nearly all the compute is,
captures fine. So the model is run once on the example inputs, recording what each child of the
root receives; each child is captured and optimized with the inputs it received, by the same
pipeline as a whole model, and checked on every call it got (a detection head is called once per
FPN level, at other shapes: those are captured with every axis dynamic). A child that cannot be
captured is descended into: its own children are recorded on the next run, and so on down. The
result is a copy of the user's model in which the optimized submodules are replaced by their
GraphModules; the rest runs as it was, and the module tree (names, `state_dict` keys of what was
not folded) stays the user's.

Per-block optimization (`optimize(..., partial=LlamaDecoderLayer)`, or a predicate `(name,
module) -> bool`) names the submodules instead: every match not nested in another is captured
with the inputs it received, each on its own, with every input axis dynamic (a block receives
activations whose sequence axis changes, not the token ids that make it dynamic by default), and
nothing is descended into. This keeps one module per transformer block, which is what
per-block wrappers need: FSDP2's `fully_shard(block)`, activation checkpointing, pipeline stages.

Each optimized part is checked on every call it got: against the submodule for exact passes;
with approximate ones (swaps: DyT for a norm) only that it runs and returns the submodule's
output structure, shapes and dtypes, since the values differ by design.

The report lists what was optimized, what was left and why (the capture error, with the
model's line), and how much of the parameters and multiply-adds the optimized parts hold.
"""
from __future__ import annotations

import inspect
from typing import Callable

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from .rewrite.capture import CaptureError, as_args, disable_cache
from .rewrite.clone import clone_inputs, copy_model, preserved_state
from .rewrite.report import Report
from .rewrite.rewriter import Derivation
from .rewrite.verify import flatten_outputs, verify

_MAX_CALLS = 8  # calls recorded per submodule (a detection head: one per FPN level)


def optimize_parts(model: nn.Module, example_inputs, optimize_whole: Callable, report: Report,
                   capture_error: CaptureError | None = None, select=None, exact: bool = True) -> nn.Module:
    """A copy of `model` whose largest capturable submodules are optimized by `optimize_whole(module,
    example_inputs, dynamic)` (the whole-model pipeline); records go to `report`. After a failed
    whole capture (`capture_error`), when no submodule captures either, that error is raised
    again: a copy with nothing optimized would only hide it. `select` (a module class, a tuple
    of them, or a predicate `(qualified_name, module) -> bool`) names the submodules to optimize
    instead: the outermost matches, each on its own; a ValueError if none matches. `exact=False`
    (the pipeline has approximate passes) checks the parts by their output shapes only."""
    why_whole_failed = _capture_reason(capture_error) if capture_error is not None else None
    work = copy_model(model)
    disable_cache(work, report)  # a KV cache object passed to the parts would not match their capture
    args, kwargs = as_args(example_inputs)
    if why_whole_failed:
        report.note("partial", type(model).__name__, f"the model does not capture whole ({why_whole_failed}); "
                    "optimizing the submodules that do")
    if select is not None:
        frontier = _matching(work, _predicate(select))
        if not frontier:
            raise ValueError(f"partial={_describe(select)} matches no submodule of {type(model).__name__}: "
                             "nothing to optimize")
        report.note("partial", type(model).__name__, f"optimizing each of the {len(frontier)} submodule(s) "
                    f"partial={_describe(select)} matches on its own ({_names(frontier)})")
    else:
        frontier = [name for name, _ in work.named_children()]
    done, left, derivations = [], [], []
    while frontier:
        calls = _record_calls(work, frontier, args, kwargs)
        next_frontier = []
        for name in frontier:
            outcome = _optimize_one(work, name, calls.get(name, []), optimize_whole, report, derivations,
                                    dynamic=True if select is not None else None, exact=exact)
            if outcome == "descend" and select is not None:
                outcome = "left"  # a named block stays whole: its children are not what was asked for
            if outcome == "optimized":
                done.append(name)
            elif outcome == "descend":
                next_frontier += [f"{name}.{c}" for c, _ in work.get_submodule(name).named_children()]
            else:
                left.append(name)
        frontier = next_frontier
    captured = [r for r in report.records if r.pass_name == "partial" and (
        r.action == "rewrote" or "no pass rewrote" in r.detail or "optimized graph" in r.detail)]
    if capture_error is not None and not captured:
        raise CaptureError(f"{capture_error}\n  no submodule of it captures either") from None
    _report_coverage(model, work, done, left, args, kwargs, report)
    work.report, work.derivations = report, derivations
    return work


def _predicate(select) -> Callable[[str, nn.Module], bool]:
    if isinstance(select, type) or (isinstance(select, tuple) and all(isinstance(c, type) for c in select)):
        return lambda name, module: isinstance(module, select)
    if callable(select):
        return select
    raise TypeError(f"partial must be a bool, a module class, a tuple of classes or a predicate "
                    f"(name, module) -> bool, not {type(select).__name__}")


def _describe(select) -> str:
    classes = select if isinstance(select, tuple) else (select,)
    if all(isinstance(c, type) for c in classes):
        return "(" + ", ".join(c.__name__ for c in classes) + ")" if isinstance(select, tuple) else select.__name__
    return getattr(select, "__name__", "a predicate")


def _matching(work: nn.Module, predicate) -> list[str]:
    """The qualified names of the submodules `predicate` accepts that no accepted module holds
    (`named_modules` lists a parent before its children; the root is not a submodule)."""
    names: list[str] = []
    for name, module in work.named_modules():
        if name and not any(name.startswith(f"{n}.") for n in names) and predicate(name, module):
            names.append(name)
    return names


def _record_calls(work: nn.Module, names: list[str], args, kwargs) -> dict[str, list]:
    """The (args, kwargs) each of the submodules `names` receives when `work` runs once on the
    example inputs (copies, at most `_MAX_CALLS` per submodule; state and RNG put back)."""
    calls: dict[str, list] = {}
    handles = []
    for name in names:
        def record(mod, a, kw, name=name):
            seen = calls.setdefault(name, [])
            if len(seen) < _MAX_CALLS:
                seen.append(clone_inputs((a, kw)))
        handles.append(work.get_submodule(name).register_forward_pre_hook(record, with_kwargs=True))
    try:
        with torch.no_grad(), preserved_state(work):
            work(*clone_inputs(args), **clone_inputs(kwargs))
    finally:
        for h in handles:
            h.remove()
    return calls


def _optimize_one(work: nn.Module, name: str, calls: list, optimize_whole: Callable, report: Report,
                  derivations: list, dynamic=None, exact: bool = True) -> str:
    """Optimize submodule `name` of `work` in place: "optimized", "descend" (it did not capture:
    try its children) or "left" (the reason is in the report). `dynamic`: its capture's dynamic
    axes (True: all) when it was called at one shape; at several, every axis is dynamic."""
    sub = work.get_submodule(name)
    why = _why_skip(sub, calls)
    if why:
        report.note("partial", name, f"left as it is: {why}")
        return "left"
    examples = [_as_example(sub, a, kw) for a, kw in calls]
    if any(e is None for e in examples):
        report.note("partial", name, "left as it is: called with keyword arguments its forward cannot name")
        return "left"
    shapes = {repr(_shapes(e)) for e in examples}
    try:
        gm = optimize_whole(sub, examples[0], dynamic if len(shapes) == 1 else True)
    except Exception as e:  # noqa: BLE001 - a capture error: its children may capture
        report.note("partial", name, f"does not capture whole: {_first_lines(e)}")
        return "descend" if any(True for _ in sub.children()) else "left"
    failed = _first_failing_call(sub, gm, examples, exact)
    if failed:
        report.note("partial", name, f"left as it is: its optimized graph {failed}")
        return "left"
    if not any(r.action == "rewrote" for r in gm.report.records):
        report.note("partial", name, "captured whole, but no pass rewrote anything in it: kept as it is")
        return "left"
    if isinstance(examples[0], dict):
        gm.register_forward_pre_hook(_ByName(sub, list(examples[0])), with_kwargs=True, prepend=True)
    _adopt(work, name, gm, report, derivations)
    return "optimized"


def _why_skip(sub: nn.Module, calls: list) -> str | None:
    if not calls:
        return "not called on the example inputs"
    if not any(True for _ in sub.parameters()) and not any(True for _ in sub.buffers()):
        return "it holds no weights: nothing to fold"
    return None


def _as_example(sub: nn.Module, args, kwargs):
    """The call as `optimize`'s example inputs: positionals, or every argument by name."""
    if not kwargs:
        return tuple(args)
    try:
        bound = inspect.signature(sub.forward).bind(*args, **kwargs)
    except TypeError:
        return None
    params = inspect.signature(sub.forward).parameters
    if any(params[p].kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD) for p in bound.arguments):
        return None
    return dict(bound.arguments)


class _ByName:
    """A forward pre-hook for the capture of a submodule that was called with keywords: that
    capture takes every argument by name, as in its example (export checks its inputs against
    it), while callers pass some positionally (`layer(hidden_states, attention_mask=...)`) and
    may leave defaults out. Calls that pass anything else are left for export's check to name."""

    def __init__(self, sub: nn.Module, names: list[str]):
        self.signature, self.names = inspect.signature(sub.forward), names

    def __call__(self, module, args, kwargs):
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError:
            return None
        if not set(bound.arguments) <= set(self.names):
            return None
        bound.apply_defaults()
        return (), {k: bound.arguments[k] for k in self.names}


def _shapes(value):
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if isinstance(value, (list, tuple)):
        return [_shapes(v) for v in value]
    if isinstance(value, dict):
        return {k: _shapes(v) for k, v in value.items()}
    return None


def _first_failing_call(sub: nn.Module, gm: nn.Module, examples: list, exact: bool = True) -> str | None:
    for i, example in enumerate(examples):
        where = f"on call {i + 1} of {len(examples)}"
        try:
            difference = (_value_difference if exact else _shape_difference)(sub, gm, example)
        except Exception as e:  # noqa: BLE001 - e.g. a shape the capture fixed
            return f"fails {where}: {_first_lines(e)}"
        if difference:
            return f"differs from the submodule {where}: {difference}"
    return None


def _value_difference(sub: nn.Module, gm: nn.Module, example) -> str | None:
    result = verify(sub, gm, example, raise_on_fail=False)
    return None if result.passed else str(result).splitlines()[1].strip()


def _shape_difference(sub: nn.Module, gm: nn.Module, example) -> str | None:
    """Where `gm`'s outputs differ from `sub`'s in structure, shape or dtype on `example` (None
    if nowhere): all an approximate rewrite can be checked for without a reference."""
    args, kwargs = as_args(example)
    outs = []
    for m in (sub, gm):
        with torch.no_grad(), preserved_state(m):
            outs.append(flatten_outputs(m(*clone_inputs(args), **clone_inputs(kwargs))))
    ref, cand = outs
    if ref.keys() != cand.keys():
        return f"outputs {sorted(cand)} instead of {sorted(ref)}"
    for k, r in ref.items():
        if (r.shape, r.dtype) != (cand[k].shape, cand[k].dtype):
            return f"{k}: {tuple(cand[k].shape)} {cand[k].dtype} instead of {tuple(r.shape)} {r.dtype}"
    return None


def _adopt(work: nn.Module, name: str, gm: nn.Module, report: Report, derivations: list):
    """Put `gm` in place of submodule `name`; its report and derivations join the model's,
    named from the model's root."""
    parent_name, _, leaf = name.rpartition(".")
    setattr(work.get_submodule(parent_name) if parent_name else work, leaf, gm)
    for r in gm.report.records:
        report.records.append(type(r)(r.pass_name, f"{name}.{r.node}", r.action, r.detail))
    for d in getattr(gm, "derivations", []):
        derivations.append(Derivation(f"{name}.{d.target}", d.fn, tuple(
            f"{name}.{s}" if isinstance(s, str) else s for s in d.sources), d.pass_name))
    report.rewrote("partial", name, f"optimized as a whole ({gm.report.summary()})")


def _report_coverage(model, work, done, left, args, kwargs, report: Report):
    """The share of parameters and of multiply-adds (torch's FLOP counter, one run) in the
    optimized submodules."""
    total = sum(p.numel() for p in model.parameters()) or 1  # (each shared tensor once)
    shared = {id(p): p for n in done for p in model.get_submodule(n).parameters()}
    covered = sum(p.numel() for p in shared.values())
    flops = _flops_by_module(model, args, kwargs)
    root = type(model).__name__
    all_flops = flops.get(root, 0) or 1
    done_flops = sum(flops.get(f"{root}.{n}", 0) for n in done)
    report.note("partial", root, f"optimized {len(done)} submodule(s) ({_names(done)}) holding "
                f"{100 * covered / total:.1f}% of the parameters and {100 * done_flops / all_flops:.1f}% of the "
                f"multiply-adds; left as they are: {len(left)} ({_names(left)})")


def _flops_by_module(model: nn.Module, args, kwargs) -> dict[str, int]:
    counter = FlopCounterMode(display=False)
    try:
        with torch.no_grad(), preserved_state(model), counter:
            model(*clone_inputs(args), **clone_inputs(kwargs))
    except Exception:  # noqa: BLE001 - an op the counter cannot follow: coverage by parameters only
        return {}
    return {name: sum(counts.values()) for name, counts in counter.get_flop_counts().items()}


def _capture_reason(e: CaptureError) -> str:
    """The last route's reason (torch.export's, which names the data-dependent line), from a
    CaptureError's message (one line per route)."""
    lines = [ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()]
    return lines[-1][:300] if lines else str(e)[:300]


def _names(names: list[str], shown: int = 4) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "") or "none"


def _first_lines(e: BaseException, n: int = 2) -> str:
    return " ".join(str(e).strip().splitlines()[:n])[:400]
