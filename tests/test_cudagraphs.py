"""`fxrewrite.cudagraphs` off CUDA: every call goes to the module itself (graphs need CUDA
tensors); the CUDA behaviour is tested in tests/test_gpu.py."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from fxrewrite import optimize
from fxrewrite.cudagraphs import _signature, cuda_graphs
from torch.utils import _pytree as pytree


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(16)

    def forward(self, x, scale: float = 1.0):
        return torch.relu(self.norm(x)) * scale


def test_cpu_calls_run_the_module_unchanged():
    model = Block().eval()
    x = torch.randn(3, 16)
    fast = optimize(model, (x,))
    graphed = cuda_graphs(fast)
    with torch.no_grad():
        for scale in (1.0, 2.0):
            assert torch.equal(graphed(x, scale), fast(x, scale))
    assert graphed.captures == 0 and len(graphed._graphs) == 0


def test_signature_keys_shapes_and_values_and_refuses_what_cannot_be_a_key():
    x = torch.randn(2, 3)
    flat, spec = pytree.tree_flatten(((x, 2.0), {}))
    assert _signature(flat, spec) is None  # a CPU tensor: no graph
    flat, spec = pytree.tree_flatten(((3, [1, 2]), {}))
    assert _signature(flat, spec) is None  # no tensor at all


def test_bad_arguments():
    with pytest.raises(ValueError, match="max_graphs"):
        cuda_graphs(Block(), max_graphs=0)
