"""Capture a model as an FX graph: `symbolic_trace` first, `torch.export` when that fails.

The user's model is deep-copied, never mutated. The captured graph carries tensor metadata
(shape propagation on the example inputs, or export's own), which canonicalisation and the
passes read.
"""
from __future__ import annotations

import copy
import traceback

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.shape_prop import ShapeProp

from .report import Report


class _Tracer(fx.Tracer):
    """symbolic_trace, keeping this library's own modules (DyT, SmeLU, ...) as single nodes."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        from .nn import LEAF_MODULES
        return isinstance(m, LEAF_MODULES) or super().is_leaf_module(m, qualname)


class CaptureError(RuntimeError):
    """Neither symbolic_trace nor torch.export could capture the model."""


class InputError(ValueError):
    """The model itself fails on the example inputs (wrong dtype, shape, ...)."""


def as_args(example_inputs) -> tuple[tuple, dict]:
    """Normalise example inputs: a tensor, a tuple/list of positionals, or a dict of keywords."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise TypeError(f"example_inputs must be a tensor, a tuple of inputs or a dict of keyword inputs, "
                    f"not {type(example_inputs).__name__}")


def _first_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}"


def _user_frame(e: BaseException) -> str:
    """The innermost frame of the failure that is not inside torch: where the model's code broke."""
    frames = [f for f in traceback.extract_tb(e.__traceback__) if "/torch/" not in f.filename]
    if not frames:
        return ""
    f = frames[-1]
    return f" at {f.filename.rsplit('/', 1)[-1]}:{f.lineno} ({f.line})"


def _disable_cache(model: nn.Module, report: Report):
    """transformers models return a DynamicCache by default, which export refuses."""
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "use_cache", False):
        config.use_cache = False
        report.note("capture", "model", "config.use_cache set to False on the copy (a KV cache cannot be exported)")


def _check_model_runs(model: nn.Module, args, kwargs):
    """Tell a model that cannot run on its inputs apart from one that cannot be captured."""
    try:
        with torch.no_grad():
            copy.deepcopy(model)(*args, **kwargs)
    except Exception as e:
        dtypes = sorted({str(a.dtype).replace("torch.", "") for a in list(args) + list(kwargs.values())
                         if isinstance(a, torch.Tensor)})
        raise InputError(f"{type(model).__name__} fails on the example inputs (dtypes {dtypes}): "
                         f"{_first_line(e)}") from e


def _dynamic_batch(args, kwargs):
    """Let export keep the batch axis dynamic where it can (a batch of 1 is still specialised)."""
    def spec(a):
        return {0: torch.export.Dim.AUTO} if isinstance(a, torch.Tensor) and a.dim() > 0 else None
    if kwargs:
        return {**{f"args_{i}": spec(a) for i, a in enumerate(args)}, **{k: spec(v) for k, v in kwargs.items()}} \
            if args else {k: spec(v) for k, v in kwargs.items()}
    return tuple(spec(a) for a in args)


def capture(model: nn.Module, example_inputs, report: Report) -> fx.GraphModule:
    """A GraphModule equivalent to `model` on inputs like `example_inputs` (model untouched)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"optimize expects an nn.Module, got {type(model).__name__}")
    args, kwargs = as_args(example_inputs)
    work = copy.deepcopy(model)
    failures = []
    if not kwargs:
        try:
            gm = fx.GraphModule(work, _Tracer().trace(work), type(work).__name__)
        except Exception as e:  # untraceable Python (control flow on values, HF models, ...)
            failures.append(f"symbolic_trace failed: {_first_line(e)}{_user_frame(e)}")
            gm = None
        if gm is not None:
            gm.training = model.training
            try:
                ShapeProp(gm).propagate(*args)
                report.note("capture", "model", f"symbolic_trace: {len(gm.graph.nodes)} nodes")
                gm.meta["example_inputs"] = (args, kwargs)  # for passes that measure what they change
                return gm
            except Exception as e:
                _check_model_runs(model, args, kwargs)
                failures.append(f"symbolic_trace graph failed on the inputs: {_first_line(e)}")
        work = copy.deepcopy(model)
    _disable_cache(work, report)
    try:
        ep = torch.export.export(work, args, kwargs, strict=False, dynamic_shapes=_dynamic_batch(args, kwargs))
        gm = ep.module()
        gm.training = model.training
        report.note("capture", "model", f"torch.export: {len(gm.graph.nodes)} nodes"
                    + (f" ({failures[0]})" if failures else ""))
        gm.meta["example_inputs"] = (args, kwargs)  # for passes that measure what they change
        return gm
    except Exception as e:
        _check_model_runs(model, args, kwargs)
        failures.append(f"torch.export failed: {_first_line(e)}{_user_frame(e)}")
    raise CaptureError(f"could not capture {type(model).__name__}:\n  " + "\n  ".join(failures))
