"""Snapshot of the Triton source emitted for one region (add + RMSNorm + SiLU, two outputs).

A change to the emitter shows up here as a diff to review, not only as a numeric drift. After an
intended change: `UPDATE_GOLDEN=1 python -m pytest tests/test_codegen_snapshot.py`, then review and
commit the new file."""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from fxrewrite.codegen import emit, ir, runtime
from fxrewrite import optimize

GOLDEN = Path(__file__).parent / "golden" / "add_rmsnorm_silu_kernel.py.txt"


class AddRMSSiLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.RMSNorm(64, eps=1e-6)

    def forward(self, x, r):
        h = x + r
        return h, F.silu(self.norm(h))


def emitted_source() -> str:
    x = torch.randn(4, 64)
    fast = optimize(AddRMSSiLU().eval(), (x, torch.randn_like(x)), lower="triton")
    calls = [n for n in fast.graph.nodes if runtime.is_region_call(n)]
    assert len(calls) == 1
    spec = ir.loads(calls[0].args[0])
    assert len(spec["inputs"]) == 3  # x, r (whole rows) and the norm's weight (one value per column)
    launch = emit.Launch(1, (("full", True), ("full", True), ("col", True)), ("float32",) * 3, "single", "cuda")
    return emit.generate(spec, launch)


def test_emitted_source_matches_snapshot():
    src = emitted_source()
    if os.environ.get("UPDATE_GOLDEN") == "1":
        GOLDEN.write_text(src)
    assert GOLDEN.exists(), f"{GOLDEN.name} is missing: run with UPDATE_GOLDEN=1 once and commit it"
    assert src == GOLDEN.read_text(), "emitted Triton source changed; see the module docstring"
    compile(src, str(GOLDEN), "exec")  # and it is valid Python
