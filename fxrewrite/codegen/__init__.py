"""Generated Triton kernels for fused norm + elementwise regions.

    fast = optimize(model, x, lower="triton")     # or run the pass LOWER_TRITON on a canonical graph

Every row-wise norm (LayerNorm, RMSNorm, DyT, eval BatchNorm left unfolded) is grown into a
region over its elementwise neighbours (`regions`), described as plain data (`ir`), and replaced
in the graph by one call of `torch.ops.fxrewrite.fused_region(spec, inputs)` (through
`runtime.call_region`, which skips the dispatcher on plain eager calls) whose outputs are the
region's values read outside it. At run time the op emits Triton source for the region
(`emit`), caches, compiles and launches it (`runtime`); on CPU without TRITON_INTERPRET=1 it runs
the region's eager reference (`reference`), which also defines the backward.

Exactness: "rounding". The fused kernel computes in float32 (float64 for float64 regions) and
rounds each node to its dtype where eager does, but its reductions sum in a different order and
it keeps norm intermediates unrounded, so results match eager up to floating-point rounding, not
bitwise. Modules: `regions` (FX only, no triton), `ir`, `emit`, `runtime`, `reference`.
"""
from __future__ import annotations

import operator

import torch.fx as fx

from ..rewrite.passmanager import Pass
from ..rewrite.rewriter import Rewriter

from .emit import kernel_name
from .ir import dumps, region_kind, spec_hash
from .regions import NotFusable, Region, find_regions, grow_regions, is_meta_check, positions

__all__ = ["LOWER_TRITON", "find_regions", "Region", "fused_region_op", "region_call"]


def fused_region_op():
    """The `fxrewrite::fused_region` op (importing the runtime registers it; no triton import)."""
    from .runtime import OP
    return OP


def region_call():
    """What lowered graphs call: `runtime.call_region`, the op minus its dispatch cost on plain
    eager calls (the op itself under compile, export, tracing, modes and autograd)."""
    from .runtime import call_region
    return call_region


def lower_regions(rw: Rewriter) -> list[Region]:
    """Replace every fusable norm region of the graph by one fused-region op call.

    Each region is reported as rewrote (its ops and the kernel it becomes, with the spec's
    structural hash); each norm that could not be fused as skipped, with the reason. Written-out
    RMSNorms must be lifted first (the pipeline runs `lift_norms` before this pass), or no
    region would ever match the norms of exported language models. Each region is grown on the
    graph as the regions before it left it (their nodes are gone by then), so none is claimed.
    """
    gm, op, lowered = rw.gm, region_call(), []
    order = positions(gm.graph)  # one numbering for all regions (renumbering per region is quadratic)
    any_norm = False
    for node, found in grow_regions(gm, order, claimed=set()):
        any_norm = True
        if isinstance(found, NotFusable):
            rw.skip(node.name, f"not lowered: {found}")
            continue
        moved = rw.moved_read(found.nodes, _anchor(found, order))
        if moved:
            rw.skip(node.name, f"not lowered: {moved}")
            continue
        _replace(rw, found, op, order)
        rw.rewrote(node.name, _lowering_message(found))
        lowered.append(found)
    if not any_norm:
        rw.note("graph", "no LayerNorm/RMSNorm/DyT/BatchNorm to lower")
    return lowered


def _lowering_message(region: Region) -> str:
    """The report line of a lowered region: its nodes and ops, the kernel and spec hash, its outputs."""
    steps = " -> ".join(f"{n.name}:{o}" for n, o in zip(region.nodes, region.ops))
    outs = ", ".join(o.name for o in region.outputs)
    return (f"{region_kind(region.spec)} region: {steps} => fxrewrite.fused_region kernel "
            f"{kernel_name(region.spec)} [spec {spec_hash(dumps(region.spec))}], outputs {outs}")


LOWER_TRITON = Pass("lower_triton", "rounding", analysis=lower_regions, needs=("shapes",), doc=__doc__)


def _number_inserted(order: dict[fx.Node, float], anchor: fx.Node):
    """Positions for the nodes just inserted before `anchor`: evenly between the nearest
    numbered node before them and `anchor`."""
    new = []
    n = anchor.prev
    while n not in order and n.op != "root":
        new.append(n)
        n = n.prev
    low = order.get(n, -1.0)
    high = order[anchor]
    for k, node in enumerate(reversed(new), start=1):
        order[node] = low + (high - low) * k / (len(new) + 1)


def _anchor(region: Region, order: dict[fx.Node, float]) -> fx.Node:
    """Where the fused call goes: before the region's first node that comes after all its inputs."""
    node_inputs = [k[1] for k in region.input_keys if k[0] == "node"]
    last = max((order[n] for n in node_inputs), default=-1)
    return min((n for n in region.nodes if order[n] > last), key=order.get)


def _replace(rw: Rewriter, region: Region, op, order: dict[fx.Node, float]):
    """Insert the fused call (and one getitem per output) before the region's first node that
    comes after all its inputs, rewire readers, erase the region. The new nodes get positions
    between their neighbours' in `order`, so it stays valid for the regions still to come."""
    members = set(region.nodes)
    anchor = _anchor(region, order)
    rw.at(anchor)
    args = [key[1] if key[0] == "node" else rw.get_attr(key[1]) for key in region.input_keys]
    call = rw.call_function(op, (dumps(region.spec), args))
    call.meta["fused_region"] = {"ops": region.ops, "nodes": [n.name for n in region.nodes]}
    if all("val" in o.meta for o in region.outputs):
        call.meta["val"] = [o.meta["val"] for o in region.outputs]
    for i, out in enumerate(region.outputs):
        getter = rw.call_function(operator.getitem, (call, i))
        rw.redirect(out, getter, where=lambda user: user not in members and not is_meta_check(user))
    _number_inserted(order, anchor)
    for n in sorted(region.nodes, key=order.get, reverse=True):
        for check in [u for u in n.users if is_meta_check(u)]:
            rw.erase(check)
        rw.erase(n)
    call._rename(f"fused_{region.norm.name}")
