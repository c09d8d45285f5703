"""Running `optimize` again on its own result changes no output and rewrites nothing more of the
same kind: the swaps, lift_norms and the Triton lowering. (The exact default passes:
test_batchnorm.py; the Pre-LN pass: test_swaps_prenorm.py.)"""
import warnings

import pytest
import torch
import torch.nn as nn

from fxrewrite import optimize
from fxrewrite.codegen import runtime
from fxrewrite.rewrite import ops
from fxrewrite.rewrite.nn import DyT, SmeLU

from conftest import RMSNormBlock, count, notes, randomise_norms

warnings.filterwarnings("ignore", message=".*specialized.*")


def mlp():
    return randomise_norms(nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 16),
                                         nn.RMSNorm(16), nn.GELU(), nn.Linear(16, 4)).eval(), key="")


def twice(model, x, **kw):
    once = optimize(model, x, **kw)
    again = optimize(once, x, **kw)
    torch.testing.assert_close(again(x), once(x), rtol=0, atol=0)
    return once, again


@pytest.mark.parametrize("swap,new,n,nothing", [
    ("relu_to_smelu", SmeLU, 1, "nothing to swap"),
    ("layernorm_to_rmsnorm", nn.RMSNorm, 1, "nothing to swap: the graph has no aten.layer_norm"),
    ("norm_to_dyt", DyT, 2, "nothing to swap: the graph has no aten.layer_norm/aten.rms_norm")])
def test_swap_twice(swap, new, n, nothing):
    model, x = mlp(), torch.randn(4, 8)
    once, again = twice(model, x, passes=[swap])
    assert once.report.count(swap) == n and again.report.count(swap) == 0
    assert not again.report.skipped(swap)
    [note] = notes(again, swap)
    assert note.startswith(nothing)
    assert any(isinstance(m, new) for m in again.modules())  # the swapped-in module is still there


def test_lift_norms_twice():
    model, x = RMSNormBlock().eval(), torch.randn(2, 3, 8)
    once, again = twice(torch.export.export(model, (x,)).module(), x, passes=["lift_norms"])
    assert once.report.count("lift_norms") == 1 and again.report.count("lift_norms") == 0
    assert notes(again, "lift_norms") == ["no decomposed RMSNorm found"]
    assert count(again, ops.rms_norm) == 1


def test_triton_lowering_twice(launches):
    model, x = mlp(), torch.randn(4, 8)
    once, again = twice(model, x, lower="triton")  # runs each twice: 2 kernels a run
    assert once.report.count("lower_triton") == 2 and again.report.count("lower_triton") == 0
    assert notes(again, "lower_triton") == ["no LayerNorm/RMSNorm/DyT/BatchNorm to lower"]
    regions = lambda gm: sum(map(runtime.is_region_call, gm.graph.nodes))  # noqa: E731
    assert regions(once) == regions(again) == 2
    assert len(launches) >= 4 and len(launches) % 2 == 0
