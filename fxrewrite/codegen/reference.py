"""The eager meaning of a region: run its nodes one by one with the ATen calls the graph made.

This is both the test oracle for the generated kernels and the fallback that runs when no
Triton kernel can (CPU tensors without TRITON_INTERPRET=1). It is also what the backward is
derived from: `runtime` differentiates this function with autograd (recomputing the forward),
so gradients through a fused region are eager's gradients by construction.
"""
from __future__ import annotations

import torch

from .ir import OPS


def run_reference(spec: dict, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Evaluate `spec` on `inputs`: the values of its outputs (an output may alias an input)."""
    if len(inputs) != len(spec["inputs"]):
        raise ValueError(f"region expects {len(spec['inputs'])} inputs, got {len(inputs)}")
    values: list = []

    def get(a):
        if a is None:
            return None
        kind, v = a
        if kind == "in":
            return inputs[v]
        if kind == "v":
            return values[v]
        return v  # a literal number: ATen wraps it as eager would

    for node in spec["nodes"]:
        values.append(OPS[node["op"]].eager([get(a) for a in node["args"]], node["attrs"]))
    return [values[j] for j in spec["outputs"]]


def fresh_outputs(outs: list[torch.Tensor], inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """A custom op's outputs may not alias its inputs or each other (an identity region would):
    clone any output that shares storage with an input or an earlier output."""
    seen: set = {t.untyped_storage().data_ptr() for t in inputs if t.numel()}
    fresh = []
    for t in outs:
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and ptr in seen:
            t = t.clone()
            ptr = t.untyped_storage().data_ptr()
        seen.add(ptr)
        fresh.append(t)
    return fresh
