"""A read-only analysis view of an FX graph as a networkx DiGraph, and a DOT rendering.

Passes that reason about *sets* of nodes (all branches between a fork and a join, a value that
only depends on one input) use graph theory here rather than one pattern per architecture:

- the **data-flow graph** has an edge producer -> user for every value read. Constants
  (`get_attr` nodes and anything computed only from constants) are not reachable from the
  graph's inputs, so they never take part in dominance: a weight is not a "branch";
- a node `x` **dominates** `y` when every path from the graph's inputs to `y` passes through
  `x`. The immediate dominator of a sum of branches is the fork the branches start from:
  everything strictly between them (`between(fork, join)`) is the branch set;
- `to_dot` renders the graph (optionally highlighting nodes) for `--draw`-style inspection.

Nothing here changes the graph; after a rewrite, build a new view.
"""
from __future__ import annotations

import networkx as nx
import torch.fx as fx

from . import ops

SOURCE = "__inputs__"  # the virtual node that feeds every placeholder


def to_networkx(graph: fx.Graph) -> nx.DiGraph:
    """Nodes are the fx.Nodes themselves (attribute `index`: position in the graph's order);
    one edge producer -> user per distinct value read."""
    g = nx.DiGraph()
    for i, node in enumerate(graph.nodes):
        g.add_node(node, index=i)
    for node in graph.nodes:
        for producer in node.all_input_nodes:
            g.add_edge(producer, node)
    return g


class DominatorView:
    """Immediate dominators of the data-flow graph, rooted at a virtual source feeding every
    placeholder. Nodes reachable only from constants have no dominator (they are constants)."""

    def __init__(self, graph: fx.Graph):
        self.graph = graph
        self.index = {n: i for i, n in enumerate(graph.nodes)}
        # constants (`get_attr`, a third of a canonical graph) can never be reached from the
        # inputs, so they are left out of the graph whose dominators are computed
        self.g = nx.DiGraph()
        self.g.add_node(SOURCE)
        for node in graph.nodes:
            if node.op == "get_attr":
                continue
            self.g.add_node(node)
            if node.op == "placeholder":
                self.g.add_edge(SOURCE, node)
            for producer in node.all_input_nodes:
                if producer.op != "get_attr":
                    self.g.add_edge(producer, node)
        self.idom = nx.immediate_dominators(self.g, SOURCE)

    def is_variable(self, node) -> bool:
        """Whether `node` depends on a graph input (else it is a constant or dead-from-input)."""
        return isinstance(node, fx.Node) and node in self.idom

    def dominator_chain(self, node: fx.Node):
        """The strict dominators of `node`, nearest first, up to (not including) the source."""
        cur = self.idom.get(node)
        while cur is not None and cur is not SOURCE and cur is not node:
            yield cur
            nxt = self.idom.get(cur)
            if nxt is cur:
                break
            cur = nxt

    def between(self, fork: fx.Node, join: fx.Node) -> set[fx.Node]:
        """Variable nodes on some path fork -> join, endpoints excluded (the branch set).

        Walks backward from `join` and never goes above `fork`'s position; when `fork`
        dominates `join` every variable ancestor of `join` found this way is a descendant of `fork`.
        """
        stop = self.index[fork]
        seen: set[fx.Node] = set()
        stack = [join]
        while stack:
            n = stack.pop()
            for p in n.all_input_nodes:
                if p is fork or p in seen or not self.is_variable(p) or self.index[p] <= stop:
                    continue
                seen.add(p)
                stack.append(p)
        return seen


def _label(node: fx.Node) -> str:
    if node.op == "call_function":
        what = ops.short_name(node.target)
    elif node.op in ("call_module", "call_method", "get_attr"):
        what = f"{node.op}:{node.target}"
    else:
        what = node.op
    shape = node.meta.get("tensor_meta")
    shape = getattr(shape, "shape", None)
    text = f"{node.name}\\n{what}" + (f"\\n{list(shape)}" if shape is not None else "")
    return text.replace('"', '\\"')


def to_dot(graph: fx.Graph, highlight=(), include_constants: bool = False) -> str:
    """Graphviz DOT text of `graph`. Constants (`get_attr`) are left out unless asked for;
    nodes in `highlight` are filled."""
    highlight = set(highlight)
    names = {n: f"n{i}" for i, n in enumerate(graph.nodes)}
    lines = ["digraph fx {", "  rankdir=TB;", '  node [shape=box, fontname="monospace", fontsize=10];']
    shown = set()
    for node in graph.nodes:
        if node.op == "get_attr" and not include_constants:
            continue
        shown.add(node)
        style = ', style=filled, fillcolor="#ffd27f"' if node in highlight else ""
        if node.op in ("placeholder", "output"):
            style += ", shape=ellipse"
        lines.append(f'  {names[node]} [label="{_label(node)}"{style}];')
    for node in graph.nodes:
        if node not in shown:
            continue
        for p in node.all_input_nodes:
            if p in shown:
                lines.append(f"  {names[p]} -> {names[node]};")
    lines.append("}")
    return "\n".join(lines) + "\n"
