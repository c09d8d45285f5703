"""Dynamo's parameter placeholders become constants: the canonical form of a `torch.compile` graph.

Dynamo hands a backend an FX graph whose parameters and buffers are *graph inputs*
(placeholders such as `L_self_modules_conv1_parameters_weight_`, with the real tensors among
the example inputs). A pass that folds weights needs them as constants, so for inference graphs
each parameter / buffer placeholder the graph does not write becomes a `get_attr` constant
holding that tensor, on a copy of the graph (what Inductor's freezing does). Training graphs
(grad enabled and inputs that require grad) and graphs with a training-mode batch norm are
left alone (`why_not_freeze`).
"""
from __future__ import annotations

import re
from typing import Callable

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensor

from .capture import graph_module
from .effects import AliasMap, updates_running_stats, written_values
from .report import Report
from .shapes import tensor_metadata


def _is_param_or_buffer(node: fx.Node) -> bool:
    """A placeholder Dynamo created for a module parameter or buffer (not a user input)."""
    grapharg = node.meta.get("grapharg")
    source = getattr(grapharg, "source", None)
    name = source.name if source is not None else ""
    name = name() if callable(name) else name
    return "_parameters" in name or "_buffers" in name


def _written(graph: fx.Graph) -> Callable[[fx.Node], bool]:
    """Whether the graph writes a placeholder in place, directly or through a view
    (`rewrite.effects`), or updates it as a training-mode batch norm's running statistics."""
    aliases = AliasMap(graph)
    written = written_values(graph, aliases)
    return lambda node: aliases.root(node) in written


def why_not_freeze(gm: fx.GraphModule, placeholders, example_inputs) -> str | None:
    if len(placeholders) != len(example_inputs):
        return f"{len(placeholders)} graph inputs but {len(example_inputs)} example inputs"
    if torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in example_inputs):
        return "grad is enabled and inputs require grad (a training graph): weights are not constants"
    for node in gm.graph.nodes:
        if updates_running_stats(node):
            return f"{node.name} is a batch norm in training mode (it updates its running statistics)"
    if not any(_is_param_or_buffer(p) for p in placeholders):
        return "no parameter or buffer among the graph inputs"
    return None


def _attr_name(placeholder: str, taken: set[str]) -> str:
    """`l_self_modules_layer1_modules_0_parameters_weight_` -> `layer1_0_weight` (for reports)."""
    name = re.sub(r"^l_(self|fn|mod|model)_", "", placeholder.lower())
    name = re.sub(r"(modules|parameters|buffers)_", "", name).strip("_") or "w"
    base, i = name, 1
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    taken.add(name)
    return name


def _export_style_meta(node: fx.Node):
    """Dynamo's fake value is `example_value`; the passes (and the Rewriter, which carries
    metadata over to replacement nodes) read export's `val` and `symbolic_trace` + ShapeProp's
    `tensor_meta`, so give the node both. The shape may hold SymInts (dynamic batch);
    nothing here asks a symbolic question (no contiguity check), so no shape guard is added."""
    val = node.meta.get("example_value") if node.meta.get("val") is None else node.meta["val"]
    if val is None:
        return
    node.meta["val"] = val
    if isinstance(val, torch.Tensor) and "tensor_meta" not in node.meta:
        node.meta["tensor_meta"] = tensor_metadata(val)


def freeze_parameters(gm: fx.GraphModule, placeholders, example_inputs, report: Report, indices=None):
    """A copy of `gm` where each parameter/buffer placeholder not mutated by the graph is a
    `get_attr` buffer holding the real tensor (detached: same storage, no autograd). Returns
    (copy, indices of the frozen inputs). `gm` itself is left as it was. `indices`: freeze these
    inputs instead of deciding (the backend freezing a graph again for other weights: Dynamo
    drops the placeholders' sources once the graph is compiled)."""
    graph = fx.Graph()
    remap: dict[fx.Node, fx.Node] = {}
    graph.output(graph.graph_copy(gm.graph, remap))
    for node in graph.nodes:
        _export_style_meta(node)
    work = graph_module(gm, graph, "RewriteFrozen")  # its code is generated once, after the passes
    frozen: list[int] = []
    taken = set(dict(work.named_children())) | {n for n, _ in work.named_buffers()} | {
        n for n, _ in work.named_parameters()}
    first = next((n for n in graph.nodes if n.op != "placeholder"), None)
    written = _written(gm.graph) if indices is None else None
    for i, old in enumerate(placeholders):
        value = example_inputs[i]
        if indices is not None:
            if i not in indices:
                continue
        elif not (isinstance(value, torch.Tensor) and _is_param_or_buffer(old)) or written(old):
            continue
        node = remap[old]
        name = _attr_name(node.name, taken)
        work.register_buffer(name, value.detach())
        with graph.inserting_before(first):
            attr = graph.get_attr(name)
        attr.meta.update(node.meta)
        node.replace_all_uses_with(attr)
        graph.erase_node(node)
        frozen.append(i)
    report.note("backend", "graph", f"froze {len(frozen)} of {len(placeholders)} graph inputs "
                                    f"(parameters/buffers) as constants")
    graph.lint()
    work.recompile()
    kept = [x for i, x in enumerate(example_inputs) if i not in frozen]
    if all(isinstance(x, torch.Tensor) and not isinstance(x, FakeTensor) for x in kept):
        work.meta["example_inputs"] = (tuple(kept), {})  # real values: passes that measure can run
    return work, set(frozen)
