"""What in a graph is a constant, and the computation of a constant as a function of the tensors it reads.

A value is the same on every call when it reads only tensors nothing writes (parameters,
buffers) and literals, through pure ops (`effects.is_pure_value`). Such a value's computation,
cut out of the graph as a small GraphModule over the tensors it reads, is the function a
derived weight records (`Rewriter.param`), so it replays on other storage.
"""
from __future__ import annotations

import torch.fx as fx
import torch.nn as nn

from .effects import AliasMap, is_pure_value, written_values


def constant_nodes(graph: fx.Graph) -> set[fx.Node]:
    """The nodes whose value is the same on every call: reads of tensors nothing writes, and
    pure nodes whose inputs are all such."""
    aliases = AliasMap(graph)
    written = written_values(graph, aliases)
    const: set[fx.Node] = set()
    for node in graph.nodes:
        if aliases.root(node) in written:
            continue
        if node.op == "get_attr" or (is_pure_value(node) and all(i in const for i in node.all_input_nodes)):
            const.add(node)
    return const


def computation(root: fx.Node, order: dict[fx.Node, int]) -> tuple[list[fx.Node], list[fx.Node]]:
    """(the computed nodes constant `root` needs, in graph `order`; the get_attr leaves they read)."""
    seen, stack = set(), [root]
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack += [i for i in n.all_input_nodes if i not in seen]
    nodes = sorted(seen, key=lambda n: order.get(n, -1))  # (-1: a constant made since `order`)
    return [n for n in nodes if n.op != "get_attr"], [n for n in nodes if n.op == "get_attr"]


def as_function(nodes: list[fx.Node], leaves: list[fx.Node], root: fx.Node) -> fx.GraphModule:
    """The computation of `root` from its `leaves` as a GraphModule taking the leaves' values."""
    g = fx.Graph()
    env = {leaf: g.placeholder(f"c{i}") for i, leaf in enumerate(leaves)}
    for n in nodes:
        env[n] = g.node_copy(n, env.__getitem__)
    g.output(env[root])
    return fx.GraphModule(nn.Module(), g, "folded_constant")
