"""Dead-code elimination that never drops a mutation.

FX's own `eliminate_dead_code` treats `x.add_(1)` (a call_method) or an in-place `operator.iadd`
whose result is unused as dead and deletes it, which silently changes the model. Here a node is
kept when it may mutate or have effects (`rewrite.effects.may_have_effects`): in-place functions
and methods, mutable ATen schemas, and every module call except those known to be pure.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from .effects import may_have_effects


def eliminate_dead_code(graph: fx.Graph) -> bool:
    """Erase unused nodes without effects, last to first (so chains go in one sweep)."""
    changed = False
    for node in reversed(graph.nodes):
        if not node.users and not _has_effects(node):
            graph.erase_node(node)
            changed = True
    return changed


def erase_dead_inputs(node: fx.Node) -> None:
    """Erase `node` if nothing reads it and it has no effects, then each of its inputs that
    this leaves unread, and so on up: what a rewrite at `node` made dead, in time proportional
    to that (a whole-graph sweep after each of many rewrites would make a pass quadratic)."""
    work, erased = [node], set()
    while work:
        n = work.pop()
        if n in erased or n.users or _has_effects(n):
            continue  # (an input read twice, `y + bn(y)`, is pushed twice)
        inputs = n.all_input_nodes
        n.graph.erase_node(n)
        erased.add(n)
        work.extend(inputs)


_EFFECTS_BY_OVERLOAD: dict = {}


def _has_effects(node: fx.Node) -> bool:
    """`may_have_effects`, memoised for ATen overloads (whose answer depends only on the op)."""
    t = node.target
    if node.op == "call_function" and isinstance(t, torch._ops.OpOverload) and not node.kwargs.get("out"):
        hit = _EFFECTS_BY_OVERLOAD.get(t)
        if hit is None:
            hit = _EFFECTS_BY_OVERLOAD[t] = may_have_effects(node)
        return hit
    return may_have_effects(node)
