"""Fold what depends on weights alone: every subgraph whose inputs are constants is evaluated once.

Math (exact). A node whose inputs are all constants (parameters, buffers, literals) and whose
value depends on nothing else (no model input, no random draw, no state, nothing written in
place: `effects.is_pure_value`) computes the same tensor on every call. Computing it once and
storing it is the same function: the same ops on the same tensors, so the stored tensor is
bit for bit what each call computed.

This one pass covers the deploy-time folds that re-parameterisation papers describe per model:
weight standardisation (BiT's `StdConv2d`), NF-Nets' scaled weight standardisation with gain
(`ScaledStdConv2d`), `torch.nn.utils.parametrize` (weight_norm, orthogonal, spectral_norm in
eval, any user parametrization) and the hook-based weight_norm / spectral_norm (written as
nodes by `rewrite.computed_weights`), LoRA merged in forward (`W + B @ A * s`), and the
difference kernels of DEA-Net's difference convolutions added to a vanilla kernel.

Each folded tensor is recorded as a derivation whose function is the subgraph itself (a small
GraphModule over the constants it reads), so it replays on other storage like every derived
weight. Left alone, with the reason in the report:
- a view of one weight (a reshape, a transpose): nothing is computed, and a stored copy would
  only duplicate the weight (no report line);
- a broadcast to a result larger than all the tensors it reads (an `expand`, a tensor factory
  like `ones(4096, 4096)`, a bias added to a larger zero tensor):
  storing it costs more memory and bandwidth than making it on each call; what it is computed
  from is folded instead;
- in a model captured in training mode, a value computed from trainable parameters: training
  must send the gradient through the parametrization, not to a stored copy.
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx
import torch.nn as nn

from ..rewrite import ops
from ..rewrite.constants import as_function, computation, constant_nodes
from ..rewrite.effects import is_view
from ..rewrite.passmanager import Pass
from ..rewrite.rewriter import Rewriter
from ..rewrite.shapes import tensor_shape

_SMALL = 1024  # a broadcast to at most this many elements is folded all the same
_SPREADING = {"expand", "expand_as", "repeat", "broadcast_to", "tile", "repeat_interleave"}


def fold_constants(rw: Rewriter) -> None:
    graph = rw.graph
    const = constant_nodes(graph)
    training = (rw.gm.meta.get("capture_mode") or {}).get("training", False)
    work = [n for n in graph.nodes if n in const and n.op != "get_attr" and any(u not in const for u in n.users)]
    done: set[fx.Node] = set()
    order = {n: i for i, n in enumerate(graph.nodes)}
    while work:
        root = work.pop(0)
        if root in done or root.graph is None:
            continue
        done.add(root)
        nodes, leaves = computation(root, order)
        if all(is_view(n) for n in nodes) and len(leaves) <= 1:
            continue  # a view of one weight
        fn = as_function(nodes, leaves, root)
        values = [rw.value(leaf) for leaf in leaves]
        with torch.no_grad():
            result = fn(*values)
        why = _why_not(nodes, result, values, training)
        if why is not None:
            rw.skip(root.name, why)
            if "broadcasts" in why:  # fold what it is computed from instead
                work += [i for i in root.all_input_nodes if i in const and i.op != "get_attr"]
            continue
        hint = f"{leaves[0].target if leaves else root.name}_folded".replace(".", "_")
        new = rw.at(root).param(hint, fn, *leaves, value=result)
        rw.replace(root, new, f"computed once from {', '.join(str(l.target) for l in leaves) or 'literals'} "
                              f"({_ops_summary(nodes)})")


def _why_not(nodes: list[fx.Node], result, values, training: bool) -> str | None:
    if not isinstance(result, torch.Tensor):
        return "its value is not a tensor"
    read = sum(v.numel() for v in values if isinstance(v, torch.Tensor))
    spreading = next((n for n in nodes if _spreads(n)), None)
    if result.numel() > max(read, _SMALL) and spreading is not None:
        return (f"{spreading.name} broadcasts: {read:,} elements read make {result.numel():,}, cheaper "
                f"to make on each call than to store (what it is computed from is folded instead)")
    if training and any(isinstance(v, nn.Parameter) and v.requires_grad for v in values):
        return ("captured in training mode and computed from trainable parameters: a stored copy "
                "would take the gradient that belongs to them (optimize model.eval() to fold it)")
    return None


def _spreads(node: fx.Node) -> bool:
    """An expand / repeat, a tensor factory (`ones`, `full`: nothing read), or an elementwise op
    whose result is larger than one of its tensor inputs. A gather is none of these: its result
    is as costly to make on each call as to read from memory, so it is worth storing."""
    t = node.target
    if ops.short_name(t).split(".")[-1] in _SPREADING or t in _SPREADING:
        return True
    if not node.all_input_nodes:
        return True
    if isinstance(t, torch._ops.OpOverload) and torch.Tag.pointwise in t.tags:
        out, ins = tensor_shape(node), [tensor_shape(i) for i in node.all_input_nodes]
        return out is not None and any(s is not None and math.prod(s) < math.prod(out) for s in ins)
    return False


def _ops_summary(nodes: list[fx.Node]) -> str:
    names = [ops.short_name(n.target) if n.op == "call_function" else str(n.target) for n in nodes]
    shown = ", ".join(dict.fromkeys(names))
    return f"{len(nodes)} op{'s' if len(nodes) != 1 else ''}: {shown}"


FOLD_CONSTANTS = Pass("fold_constants", "exact", analysis=fold_constants, doc=__doc__)
