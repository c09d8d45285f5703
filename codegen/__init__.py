"""Generated Triton kernels for fused norm + elementwise regions.

    fast = optimize(model, x, lower="triton")     # or lower_to_triton(gm, report) on a canonical graph

Every row-wise norm (LayerNorm, RMSNorm, DyT, eval BatchNorm left unfolded) is grown into a
region over its elementwise neighbours (`regions`), described as plain data (`ir`), and replaced
in the graph by one call of `torch.ops.fxrewrite.fused_region(spec, inputs)` whose outputs are
the region's values read outside it. At run time the op emits Triton source for the region
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

from rewrite.effects import moved_read
from rewrite.lift_norms import lift_decomposed_norms
from rewrite.report import Report

from .ir import dumps, spec_hash
from .regions import NotFusable, Region, describe_norm, find_regions, grow, is_meta_check, positions

PASS_NAME = "lower_triton"

__all__ = ["lower_to_triton", "find_regions", "Region", "fused_region_op"]


def fused_region_op():
    """The `fxrewrite::fused_region` op (importing the runtime registers it; no triton import)."""
    from .runtime import OP
    return OP


def lower_to_triton(gm: fx.GraphModule, report: Report) -> list[Region]:
    """Replace every fusable norm region of `gm` (in place) by one fused-region op call.

    Each region is reported as rewrote (its ops and the kernel it becomes, with the spec's
    structural hash); each norm that could not be fused as skipped, with the reason.
    """
    op = fused_region_op()
    lowered = []
    # exported LLMs write RMSNorm out as pow/mean/rsqrt/mul: lift it first (exact), or no
    # region would ever match them; a graph already lifted has nothing left to lift
    lift_decomposed_norms(gm, report)
    norm_nodes = [n for n in gm.graph.nodes if _is_norm(gm, n)]
    order = positions(gm.graph)  # one numbering for all regions (renumbering per region is quadratic)
    for node in norm_nodes:
        try:
            d = describe_norm(gm, node)
            region = grow(gm, node, d, claimed=set(), order=order)
        except NotFusable as e:
            report.skip(PASS_NAME, node.name, f"not lowered: {e}")
            continue
        moved = moved_read(region.nodes, _anchor(region, order))
        if moved:
            report.skip(PASS_NAME, node.name, f"not lowered: {moved}")
            continue
        _replace(gm, region, op, order)
        text = dumps(region.spec)
        outs = ", ".join(o.name for o in region.outputs)
        report.rewrote(PASS_NAME, node.name,
                       f"{' -> '.join(f'{n.name}:{o}' for n, o in zip(region.nodes, region.ops))} => "
                       f"fxrewrite.fused_region kernel _{region.name}_fwd_kernel [spec {spec_hash(text)}], "
                       f"outputs {outs}")
        lowered.append(region)
    if not norm_nodes:
        report.note(PASS_NAME, "graph", "no LayerNorm/RMSNorm/DyT/BatchNorm to lower")
    gm.graph.lint()
    gm.recompile()
    return lowered


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


def _is_norm(gm, node) -> bool:
    try:
        return describe_norm(gm, node) is not None
    except NotFusable:
        return True


def _anchor(region: Region, order: dict[fx.Node, float]) -> fx.Node:
    """Where the fused call goes: before the region's first node that comes after all its inputs."""
    node_inputs = [k[1] for k in region.input_keys if k[0] == "node"]
    last = max((order[n] for n in node_inputs), default=-1)
    return min((n for n in region.nodes if order[n] > last), key=order.get)


def _replace(gm: fx.GraphModule, region: Region, op, order: dict[fx.Node, float]):
    """Insert the fused call (and one getitem per output) before the region's first node that
    comes after all its inputs, rewire readers, erase the region. The new nodes get positions
    between their neighbours' in `order`, so it stays valid for the regions still to come."""
    graph = gm.graph
    members = set(region.nodes)
    anchor = _anchor(region, order)
    with graph.inserting_before(anchor):
        args = [key[1] if key[0] == "node" else graph.get_attr(key[1]) for key in region.input_keys]
        call = graph.call_function(op, (dumps(region.spec), args))
        call.meta["fused_region"] = {"ops": region.ops, "nodes": [n.name for n in region.nodes]}
        if all("val" in o.meta for o in region.outputs):
            call.meta["val"] = [o.meta["val"] for o in region.outputs]
        getters = []
        for i, out in enumerate(region.outputs):
            g = graph.call_function(operator.getitem, (call, i))
            for key in ("val", "tensor_meta", "stack_trace", "nn_module_stack"):
                if key in out.meta:
                    g.meta[key] = out.meta[key]
            getters.append(g)
    for out, g in zip(region.outputs, getters):
        for user in list(out.users):
            if user not in members and not is_meta_check(user):
                user.replace_input_with(out, g)
    _number_inserted(order, anchor)
    for n in sorted(region.nodes, key=order.get, reverse=True):
        for check in [u for u in n.users if is_meta_check(u)]:
            graph.erase_node(check)
        graph.erase_node(n)
    call._rename(f"fused_{region.norm.name}")
