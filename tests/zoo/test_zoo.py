"""Every zoo model through optimize -> verify -> ONNX; the fast subset runs by default, the rest
are marked slow (`pytest tests/zoo -m slow`, or `python bench/zoo_coverage.py` for the COVERAGE.md table)."""
from __future__ import annotations

import pytest
import torch

from .check import STEPS, passed, run_one
from .models import ZOO


@pytest.mark.parametrize("entry", [pytest.param(m, id=m.name, marks=() if m.fast else pytest.mark.slow)
                                   for m in ZOO])
def test_zoo_model(entry):
    row = run_one(entry)
    assert passed(row), {s: row.get(s) for s in STEPS} | {"trace": row.get("trace", "")[-2000:]}
    assert row["after"]["norms"] <= row["before"]["norms"]
    assert row["after"]["convs"] <= row["before"]["convs"]


class _TinyDetector(torch.nn.Module):
    """A backbone with FrozenBatchNorm2d and data-dependent control flow after it: captures only in part."""

    def __init__(self):
        super().__init__()
        from torchvision.ops import FrozenBatchNorm2d
        self.backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), FrozenBatchNorm2d(4), torch.nn.ReLU())

    def forward(self, images):
        y = self.backbone(torch.stack(images))
        if y.sum() > 0:  # data-dependent: neither fx nor torch.export captures it
            return [{"boxes": y.flatten(1)[:, :4], "scores": y.mean((1, 2, 3))}]
        return [{"boxes": y.new_zeros(0, 4), "scores": y.new_zeros(0)}]


def test_partial_row_reports_coverage_and_counts_frozen_bn():
    from .models import ZooModel
    entry = ZooModel("tiny/detector", "test", _TinyDetector, lambda: ([torch.rand(3, 16, 16)],))
    row = run_one(entry, onnx=False)
    assert passed(row, onnx=False), row
    assert row["captured by"] == "partial (100% params, 100% MACs)", row["captured by"]
    assert row["before"] == {"convs": 1, "norms": 1} and row["after"] == {"convs": 1, "norms": 0}, row


def test_no_rewrite_on_foldable_structure_is_a_failure():
    from .models import ZooModel
    entry = ZooModel("tiny/bn", "test", lambda: torch.nn.Sequential(torch.nn.BatchNorm2d(3)),
                     lambda: torch.randn(2, 3, 4, 4))
    row = run_one(entry, onnx=False)
    # a lone BatchNorm has nothing to fold into: no rewrite, so the row fails by the zoo's rule
    assert row["optimize"].startswith("FAIL no rewrite on a model with foldable structure"), row
