"""Move a captured graph to another device: its tensors *and* the devices written into it.

torch.export writes the capture's device into the graph as constants (`arange(..., device=cpu)`,
`_assert_tensor_metadata(x, device=cpu)`, `to(x, device=cpu)`), so `gm.to("cuda")` moves the
weights but leaves those ops creating tensors on the old device, and the first mixed op fails. A
plan made on the meta device (a model too large to hold: `fxrewrite.checkpoint`) has `meta`
written there instead, and must run on the device its weights are loaded to.
"""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn


def to_device(module: nn.Module, device) -> nn.Module:
    """`module.to(device)`, with every device constant in its graphs (the module's own and those
    of its GraphModule children and sub-graphs) that names another device replaced by `device`.
    In place, like `nn.Module.to`; returns `module`."""
    device = torch.device(device)
    for gm in [m for m in module.modules() if isinstance(m, fx.GraphModule)]:
        if retarget_graph(gm.graph, device):
            gm.recompile()
    tensors_on_meta = any(t.is_meta for t in _tensors(module)) and device.type != "meta"
    if tensors_on_meta:  # meta tensors hold no values: only loading gives them some
        raise ValueError(f"{type(module).__name__} still has tensors on the meta device; load its weights "
                         f"(e.g. fxrewrite.checkpoint.load_rewritten) before moving it to {device}")
    return module.to(device)


def retarget_graph(graph: fx.Graph, device: torch.device) -> int:
    """Replace the device constants in `graph`'s node arguments that differ from `device`; the
    number replaced."""
    changed = 0

    def swap(value):
        nonlocal changed
        if isinstance(value, torch.device) and value != device:
            changed += 1
            return device
        return value
    for node in graph.nodes:
        if node.op not in ("call_function", "call_method"):
            continue
        if "device" in node.kwargs:
            node.kwargs = {**node.kwargs, "device": swap(node.kwargs["device"])}
        node.args = tuple(swap(a) for a in node.args)
    return changed


def _tensors(module: nn.Module):
    yield from module.parameters()
    yield from module.buffers()
