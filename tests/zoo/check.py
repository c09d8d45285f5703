"""One zoo model through capture -> exact optimize -> verify -> ONNX export -> onnxruntime check.

Each step either passes or records the reason it failed; later steps that need it are marked
"n/a". Shared by the zoo tests and `bench/zoo_coverage.py` (which writes COVERAGE.md).
"""
from __future__ import annotations

import functools
import os
import re
import tempfile
import time
import traceback

import torch
import torch.fx as fx
from torchvision.ops import FrozenBatchNorm2d

from fxrewrite import CaptureError, optimize, verify
from fxrewrite.rewrite import ops

from .models import ZooModel, randomize_bn

NORMS = (ops.batch_norm, ops.layer_norm, ops.rms_norm)
NORM_MODULES = (torch.nn.modules.batchnorm._BatchNorm, FrozenBatchNorm2d, torch.nn.LayerNorm, torch.nn.RMSNorm)
_PARTIAL = re.compile(r"holding ([\d.]+)% of the parameters and ([\d.]+)% of the multiply-adds")


def op_counts(model, frozen: bool = False) -> dict:
    """Convolutions and norms in `model`: a GraphModule's graph (its call_module targets walked
    too), or, for a partially optimized model, its module tree with the GraphModules in it.
    `frozen`: the model has FrozenBatchNorm2d, which a capture turns into a per-channel
    mul + add of constants: those count as norms in graphs (they are what folds into the conv)."""
    counts = {"convs": 0, "norms": 0}

    def walk(m):
        if isinstance(m, fx.GraphModule):
            for n in m.graph.nodes:
                if n.target is ops.conv:
                    counts["convs"] += 1
                elif n.target in NORMS or (frozen and _frozen_affine(m, n)):
                    counts["norms"] += 1
                elif n.op == "call_module":
                    walk(m.get_submodule(n.target))
        elif isinstance(m, torch.nn.modules.conv._ConvNd):
            counts["convs"] += 1
        elif isinstance(m, NORM_MODULES):
            counts["norms"] += 1
        else:
            for c in m.children():
                walk(c)
    walk(model)
    return counts


def _frozen_affine(gm, node) -> bool:
    """`node` is mul(x, c1) whose only user is add(., c2), c1 and c2 [1, C, 1, 1] constants: a
    captured FrozenBatchNorm2d."""
    def const(a):
        if isinstance(a, fx.Node) and a.op == "get_attr":
            t = functools.reduce(getattr, a.target.split("."), gm)
            return isinstance(t, torch.Tensor) and t.dim() == 4 and t.shape[0] == 1 and t.shape[2:] == (1, 1)
        return False
    if node.target is not ops.mul or not any(const(a) for a in node.args) or len(node.users) != 1:
        return False
    user = next(iter(node.users))
    return user.target is ops.add and any(const(a) for a in user.args if a is not node)


def partial_coverage(report) -> tuple[float, float] | None:
    """(% parameters, % multiply-adds) optimized, from a partial capture's note; None if whole."""
    for r in report.records:
        if r.pass_name == "partial" and r.action == "note":
            m = _PARTIAL.search(r.detail)
            if m:
                return float(m.group(1)), float(m.group(2))
    return None


def _reason(e: BaseException) -> str:
    line = (re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip().splitlines() or [""])[0]  # no terminal colours
    return f"{type(e).__name__}: {line[:160]}"


def _fresh(inputs):
    """Inputs of the same structure, with fresh random floating tensors (integer ones kept)."""
    return _map_floating(inputs, torch.randn_like)


def _map_floating(value, fn):
    """`value` (tensors in dicts, lists, tuples) with `fn` applied to each floating tensor."""
    if isinstance(value, torch.Tensor):
        return fn(value) if value.is_floating_point() else value
    if isinstance(value, dict):
        return type(value)((k, _map_floating(v, fn)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return type(value)(_map_floating(v, fn) for v in value)
    return value


def run_one(entry: ZooModel, onnx: bool = True) -> dict:
    row = {"model": entry.name, "family": entry.family}
    t0 = time.perf_counter()
    torch.manual_seed(0)
    try:
        model = randomize_bn(entry.build()).eval()
        frozen = any(isinstance(m, FrozenBatchNorm2d) for m in model.modules())
        bns = sum(isinstance(m, (torch.nn.modules.batchnorm._BatchNorm, FrozenBatchNorm2d)) for m in model.modules())
        x = entry.inputs()
        try:
            before = optimize(model, x, passes=[], inplace=False, partial=False)
            row["captured by"] = "export" if any(r.detail.startswith("torch.export:")
                                                 for r in before.report.records) else "fx"
            row["before"] = op_counts(before, frozen)
        except CaptureError:  # not whole: optimize() falls back to partial capture
            row["captured by"] = "partial"
            row["before"] = op_counts(model, frozen)
        row["capture"] = "pass"
    except Exception as e:
        row["capture"] = f"FAIL {_reason(e)}"
        row["trace"] = traceback.format_exc()
        row["seconds"] = time.perf_counter() - t0
        return row
    try:
        fast = optimize(model, x)
        row["after"] = op_counts(fast, frozen)
        row["rewrites"] = sum(1 for r in fast.report.records if r.action == "rewrote")
        coverage = partial_coverage(fast.report)
        if coverage:
            row["captured by"] = f"partial ({coverage[0]:.0f}% params, {coverage[1]:.0f}% MACs)"
        row["optimize"] = "pass" if row["rewrites"] or not bns else \
            f"FAIL no rewrite on a model with foldable structure ({bns} BatchNorm)"
    except Exception as e:
        row["optimize"] = f"FAIL {_reason(e)}"
        row["trace"] = traceback.format_exc()
        row["seconds"] = time.perf_counter() - t0
        return row
    x1, x2 = _fresh(x), _fresh(x)
    try:
        result = verify(model, fast, x1, rtol=entry.rtol, raise_on_fail=False)
        row["max_rel"] = result.max_rel
        row["verify"] = "pass" if result.passed else f"FAIL max rel {result.max_rel:.2e} > {entry.rtol:g}"
        if not result.passed and result.parts:
            row["verify"] += _conditioning(model, x1, result, float64=False)
    except Exception as e:
        row["verify"] = f"FAIL {_reason(e)}"
    try:  # the rewrite's own error, apart from float32 rounding: derived weights replayed in float64.
        # Reported, not a step: a graph can fix float32 where the model follows its input's dtype
        # (export's casts; constants a capture computed in float32), which float64 cannot undo
        result = verify(model, fast, x2, float64=True, raise_on_fail=False)
        row["max_rel64"] = result.max_rel
        row["float64"] = "pass" if result.passed else f"FAIL max rel {result.max_rel:.2e} > 1e-10"
        if result.parts:  # partial: the optimized parts' own outputs, apart from what the model does after
            worst = max(result.parts.values())
            row["float64"] += f"; optimized parts {worst:.1e}" + ("" if worst <= 1e-10 else " > 1e-10")
            if not result.passed:
                row["float64"] += _conditioning(model, x2, result, float64=True)
    except Exception as e:
        row["float64"] = f"FAIL {_reason(e)}"
    if onnx:
        from fxrewrite import check_onnx, export_onnx
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "model.onnx")
            try:
                export_onnx(fast, x, path)
                row["onnx export"] = "pass"
            except Exception as e:
                row["onnx export"] = f"FAIL {_reason(e)}"
                if coverage and not _exports(model, x, os.path.join(d, "original.onnx")):
                    row["onnx export"] = row["onnx check"] = NA_PARTIAL  # the original does not export either
            if row["onnx export"] == "pass":
                try:
                    res = check_onnx(model, path, x)
                    row["onnx check"] = "pass" if res.passed else f"FAIL max rel {res.max_rel:.2e}"
                except Exception as e:
                    row["onnx check"] = f"FAIL {_reason(e)}"
    row["seconds"] = time.perf_counter() - t0
    return row


def _conditioning(model, inputs, result, float64: bool) -> str:
    """Why a partially optimized model's final output moved although its optimized parts did
    not (beyond rounding): how far the reference itself moves under noise of the parts' size."""
    size = max(result.parts.values())
    moved = reference_sensitivity(model, inputs, list(result.parts), size, float64)
    return f"; the reference itself moves {moved:.1e} under {size:.0e} relative noise at those parts' outputs"


def reference_sensitivity(model, inputs, parts: list[str], rel: float, float64: bool, draws: int = 3) -> float:
    """The largest relative deviation (as `verify` measures it) of the reference's own final
    output when the outputs of its submodules `parts` are multiplied by 1 + rel * N(0, 1), over
    `draws` noise draws. Post-processing that sorts, thresholds and suppresses (top-k, NMS) can
    turn a change in the last bits into other detections whoever makes the change: this says
    how much of a partially optimized model's final deviation the reference shows by itself."""
    from fxrewrite.rewrite.capture import as_args
    from fxrewrite.rewrite.clone import clone_inputs
    from fxrewrite.rewrite.verify import compare, copy_model
    ref = copy_model(model).double() if float64 else model
    args, kwargs = as_args(clone_inputs(inputs, double=float64))
    g = torch.Generator().manual_seed(0)

    def noisy(module, args, out):
        return _map_floating(out, lambda t: t * (1 + rel * torch.randn(t.shape, generator=g, dtype=torch.float64)
                                                 .to(t.dtype)))
    worst = 0.0
    with torch.no_grad():
        clean = ref(*args, **kwargs)
        for _ in range(draws):
            hooks = [ref.get_submodule(p).register_forward_hook(noisy) for p in parts]
            try:
                out = ref(*args, **kwargs)
            finally:
                for h in hooks:
                    h.remove()
            worst = max(worst, compare(clean, out, rtol=1e-10).max_rel)
    return worst


def _exports(model, x, path) -> bool:
    from fxrewrite import export_onnx
    try:
        export_onnx(model, x, path)
        return True
    except Exception:  # noqa: BLE001
        return False


STEPS = ["capture", "optimize", "verify", "onnx export", "onnx check"]
NA_PARTIAL = "n/a (partial)"  # partially optimized, and the original model does not export to ONNX either


def passed(row: dict, onnx: bool = True) -> bool:
    steps = STEPS if onnx else STEPS[:3]
    return all(row.get(s) == "pass" or (s.startswith("onnx") and row.get(s) == NA_PARTIAL) for s in steps)
