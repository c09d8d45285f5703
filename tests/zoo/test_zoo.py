"""Every zoo model through optimize -> verify -> ONNX; the fast subset runs by default, the rest
are marked slow (`pytest tests/zoo -m slow`, or `python bench/zoo_coverage.py` for the COVERAGE.md table)."""
from __future__ import annotations

import pytest

from .check import STEPS, passed, run_one
from .models import ZOO


@pytest.mark.parametrize("entry", [pytest.param(m, id=m.name, marks=() if m.fast else pytest.mark.slow)
                                   for m in ZOO])
def test_zoo_model(entry):
    row = run_one(entry)
    assert passed(row), {s: row.get(s) for s in STEPS} | {"trace": row.get("trace", "")[-2000:]}
    assert row["after"]["norms"] <= row["before"]["norms"]
    assert row["after"]["convs"] <= row["before"]["convs"]
