"""Reuse buffers for eager execution: make activations and residual adds in-place where safe.

Canonical graphs are functional, which costs eager mode an allocation per activation (measured
on ResNet-50, 1 thread: `clamp_min` out-of-place 3.5 ms vs in-place 2.1 ms). This last step
turns `relu(y)` into `relu_(y)` and `add(y, r)` into `y.add_(r)` when `y` is a fresh tensor made
by a canonical op of this graph (not an input, a parameter or a view) and nothing else reads it,
and the add does not broadcast `y` to a larger shape or another dtype. The function is unchanged.
It runs after every pass and lowering, so passes only ever see functional graphs.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ..rewrite import ops
from ..rewrite.passmanager import Pass
from ..rewrite.rewriter import Rewriter
from ..rewrite.shapes import tensor_dtype, tensor_shape

aten = torch.ops.aten

_INPLACE = {ops.relu: aten.relu_.default, ops.silu: aten.silu_.default, ops.hardswish: aten.hardswish_.default,
            ops.add: aten.add_.Tensor}
_FRESH = {ops.conv, ops.batch_norm, ops.linear, ops.add, ops.mul, ops.layer_norm, aten.add_.Tensor}


def _reusable(node: fx.Node, by: fx.Node) -> bool:
    return (isinstance(node, fx.Node) and node.op == "call_function" and node.target in _FRESH
            and len(node.users) == 1 and next(iter(node.users)) is by)


def make_inplace(rw: Rewriter) -> int:
    """Rewrite safe activations/adds to their in-place forms; returns how many."""
    changed = 0
    for node in rw.graph.nodes:
        if node.op != "call_function" or node.target not in _INPLACE:
            continue
        src = node.args[0]
        if not _reusable(src, node):
            continue
        if node.target is ops.add:
            other = node.args[1]
            same = tensor_shape(node) is not None and tensor_shape(node) == tensor_shape(src)
            if not (same and tensor_dtype(node) == tensor_dtype(src) and isinstance(other, fx.Node) and other is not src):
                continue
        rw.retarget(node, _INPLACE[node.target])
        changed += 1
    return changed


INPLACE = Pass("inplace", "exact", analysis=make_inplace, doc=__doc__)
