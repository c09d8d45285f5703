"""One zoo model through capture -> exact optimize -> verify -> ONNX export -> onnxruntime check.

Each step either passes or records the reason it failed; later steps that need it are marked
"n/a". Shared by the zoo tests and `bench/zoo_coverage.py` (which writes COVERAGE.md).
"""
from __future__ import annotations

import os
import tempfile
import time
import traceback

import torch

from fxrewrite import optimize, verify
from fxrewrite.rewrite import ops

from .models import ZooModel, randomize_bn

NORMS = (ops.batch_norm, ops.layer_norm, ops.rms_norm)


def op_counts(gm) -> dict:
    convs = sum(1 for n in gm.graph.nodes if n.target is ops.conv)
    norms = sum(1 for n in gm.graph.nodes if n.target in NORMS)
    norms += sum(1 for n in gm.graph.nodes if n.op == "call_module"
                 and isinstance(gm.get_submodule(n.target), torch.nn.modules.batchnorm._BatchNorm))
    return {"convs": convs, "norms": norms}


def _reason(e: BaseException) -> str:
    line = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {line[:160]}"


def _fresh(inputs):
    if isinstance(inputs, torch.Tensor):
        return torch.randn_like(inputs)
    if isinstance(inputs, dict):
        return {k: (torch.randn_like(v) if v.is_floating_point() else v) for k, v in inputs.items()}
    return inputs


def run_one(entry: ZooModel, onnx: bool = True) -> dict:
    row = {"model": entry.name, "family": entry.family}
    t0 = time.perf_counter()
    torch.manual_seed(0)
    try:
        model = randomize_bn(entry.build()).eval()
        x = entry.inputs()
        before = optimize(model, x, passes=[], inplace=False)
        row["capture"] = "pass"
        row["captured by"] = "export" if any(r.detail.startswith("torch.export:") for r in before.report.records) \
            else "fx"
        row["before"] = op_counts(before)
    except Exception as e:
        row["capture"] = f"FAIL {_reason(e)}"
        row["trace"] = traceback.format_exc()
        row["seconds"] = time.perf_counter() - t0
        return row
    try:
        fast = optimize(model, x)
        row["optimize"] = "pass"
        row["after"] = op_counts(fast)
        row["rewrites"] = sum(1 for r in fast.report.records if r.action == "rewrote")
    except Exception as e:
        row["optimize"] = f"FAIL {_reason(e)}"
        row["trace"] = traceback.format_exc()
        row["seconds"] = time.perf_counter() - t0
        return row
    try:
        result = verify(model, fast, _fresh(x), rtol=entry.rtol, raise_on_fail=False)
        row["max_rel"] = result.max_rel
        row["verify"] = "pass" if result.passed else f"FAIL max rel {result.max_rel:.2e} > {entry.rtol:g}"
    except Exception as e:
        row["verify"] = f"FAIL {_reason(e)}"
    if onnx:
        from fxrewrite import check_onnx, export_onnx
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "model.onnx")
            try:
                export_onnx(fast, x, path)
                row["onnx export"] = "pass"
            except Exception as e:
                row["onnx export"] = f"FAIL {_reason(e)}"
            if row["onnx export"] == "pass":
                try:
                    res = check_onnx(model, path, x)
                    row["onnx check"] = "pass" if res.passed else f"FAIL max rel {res.max_rel:.2e}"
                except Exception as e:
                    row["onnx check"] = f"FAIL {_reason(e)}"
    row["seconds"] = time.perf_counter() - t0
    return row


STEPS = ["capture", "optimize", "verify", "onnx export", "onnx check"]


def passed(row: dict, onnx: bool = True) -> bool:
    steps = STEPS if onnx else STEPS[:3]
    return all(row.get(s) == "pass" for s in steps)
