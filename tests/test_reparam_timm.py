"""Structural re-parameterization on real timm families, against timm's own deploy conversion.

timm merges each block by calling the block's hand-written `reparameterize()` / `fuse()`
(`timm.utils.model.reparameterize_model`). `optimize` finds the same merges in the graph with no
per-architecture code. For each family (random weights, random BN statistics) we check:

- the optimized graph computes the same function as the train-time model (float32, 1e-5
  relative to the output's magnitude), and agrees with timm's deployed model as well;
- it has exactly as many convolutions as timm's deployed model, counted the same way on both
  sides: one per convolution call site of a traced graph (our `aten.convolution` nodes vs the
  `nn.Conv*` modules and `F.conv2d` calls in an FX trace of timm's deployed model). A higher
  count means a merge was missed; a lower one would mean we merged something timm keeps apart,
  which the error check would then have to justify;
- no BatchNorm is left where timm's deployed model has none.
"""
from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from fxrewrite import optimize, verify
from fxrewrite.rewrite import ops

from conftest import count, randomize_bn

timm = pytest.importorskip("timm")
from timm.utils.model import reparameterize_model  # noqa: E402  (timm 1.0.x location)

_CONV_FUNCTIONS = {F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d}


def fx_counts(module: nn.Module) -> dict[str, int]:
    """Convolution and BatchNorm call sites in an FX trace of an eager model."""
    gm = fx.symbolic_trace(module)
    convs = bns = 0
    for node in gm.graph.nodes:
        if node.op == "call_module":
            mod = gm.get_submodule(node.target)
            convs += isinstance(mod, nn.modules.conv._ConvNd)
            bns += isinstance(mod, nn.modules.batchnorm._BatchNorm)
        elif node.op == "call_function":
            convs += node.target in _CONV_FUNCTIONS
            bns += node.target is F.batch_norm
    return {"conv": convs, "bn": bns}


def build(name: str) -> nn.Module:
    return randomize_bn(timm.create_model(name, pretrained=False, num_classes=10)).eval()


FAMILIES = [
    pytest.param("repvgg_a0", id="repvgg"),
    pytest.param("mobileone_s0", id="mobileone"),
    pytest.param("repvit_m0_9", id="repvit"),
    pytest.param("fastvit_t8", id="fastvit", marks=pytest.mark.slow),  # ~3 s idle, 12 s loaded
]


@pytest.mark.parametrize("name", FAMILIES)
def test_merge_matches_timm_reparameterize(name):
    model = build(name)
    x = torch.randn(1, 3, 64, 64)
    deployed = reparameterize_model(model)  # a deep copy; `model` keeps its train-time branches
    gm = optimize(model, x)

    verify(model, gm, x, rtol=1e-5)
    verify(deployed, gm, x, rtol=1e-5)

    train, timm_deploy = fx_counts(model), fx_counts(deployed)
    ours = {"conv": count(gm, ops.conv), "bn": count(gm, ops.batch_norm)}
    assert timm_deploy["conv"] < train["conv"], "timm merged nothing: the test would prove nothing"
    assert ours["conv"] == timm_deploy["conv"], (
        f"{name}: {ours['conv']} convolutions after optimize vs {timm_deploy['conv']} in timm's deployed "
        f"model (train-time: {train['conv']}); skipped merges: "
        f"{[r.detail for r in gm.report.skipped('merge_branches')]}")
    assert ours["bn"] <= timm_deploy["bn"]
    assert gm.report.count("merge_branches") > 0


def test_repvgg_merge_is_exact_in_float64():
    """The float32 check above allows rounding; in float64 the merged model must agree to ~1e-12,
    which no approximate merge would."""
    model = build("repvgg_a0")
    x = torch.randn(1, 3, 64, 64)
    gm = optimize(model.double(), x.double())
    result = verify(model, gm, x.double(), rtol=1e-11)
    assert result.max_rel < 1e-11


def test_deployed_graph_holds_no_more_weights_than_timm():
    model = build("repvgg_a0")
    gm = optimize(model, torch.randn(1, 3, 32, 32))
    deployed = reparameterize_model(model)
    numel = lambda m: sum(t.numel() for t in m.state_dict().values())  # noqa: E731
    assert numel(gm) <= numel(deployed)
