"""Shared test helpers: real BN statistics, op counts."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from fxrewrite.rewrite import ops


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def randomize_bn(model: nn.Module) -> nn.Module:
    """Non-trivial BN statistics and affine parameters, so folding is really tested (fresh
    models have mean 0, var 1, weight 1, bias 0, which hide most folding mistakes)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                if m.running_mean is not None:
                    m.running_mean.uniform_(-0.5, 0.5)
                    m.running_var.uniform_(0.5, 2.0)
                if m.weight is not None:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.5, 0.5)
    return model


def count(gm, target) -> int:
    """How many call_function nodes of `target` the graph has."""
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is target)


def count_bn_after_producer(gm) -> int:
    """BatchNorms whose input is a conv or linear: after folding there must be none."""
    return sum(1 for n in gm.graph.nodes if n.target is ops.batch_norm
               and getattr(n.args[0], "target", None) in (ops.conv, ops.linear))


@pytest.fixture
def launches(monkeypatch):
    """Count generated-kernel launches (calls of codegen.runtime.run_triton through the op)."""
    from fxrewrite.codegen import runtime
    calls = []
    real = runtime.run_triton

    def spy(spec, inputs, config=None):
        calls.append(spec)
        return real(spec, inputs, config)

    monkeypatch.setattr(runtime, "run_triton", spy)
    return calls
