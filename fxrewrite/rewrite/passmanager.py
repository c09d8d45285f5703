"""Rules, passes, and the driver that applies them.

A pass is written one of two ways, and both change the graph only through the `Rewriter`:

* **rules**: a pattern, a legality check and a rewrite (MLIR's split, tinygrad's brevity),

      Rule("fold_bn_into_conv", pattern, rewrite=fold, check=can_fold)

  `check(**captures)` returns None when the rewrite is legal, or the reason it is not (reported
  as a skip). `rewrite(rw, **captures)` builds the replacement through the Rewriter and returns
  the node that replaces the root (or None when it already rewired the graph itself). The
  driver visits nodes in order, tries the rules whose root op matches (indexed by op), checks
  that the replacement moves no read past an in-place write (`Rewriter.moved_read`), repeats
  until nothing changes, and reports each near miss with the reason it missed.
* **an analysis**: `analysis(rw)` finds its own sites (regions by dominators, a residual
  stream, fusable neighbourhoods) and rewrites them through `rw`, recording as it goes.

A pass states its exactness and what it needs from the capture route (`needs`: "example_inputs"
for a pass that runs the model to measure, "shapes" for one that reasons on tensor shapes); where
a route lacks it, the pass is skipped with that reason. Dead nodes are removed after each pass; the GraphModule is recompiled once, by the
caller.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal

import torch
import torch.fx as fx

from . import ops
from .pattern import Match, NoMatch, Op, match
from .report import Report
from .rewriter import Derivation, Rewriter

Exactness = Literal["exact", "rounding", "approximate"]


@dataclass
class Rule:
    name: str
    pattern: Op
    rewrite: Callable[..., fx.Node | None]
    check: Callable[..., str | None] | None = None


@dataclass
class Pass:
    """A named transformation: `rules` or an `analysis` (see the module docstring).

    `exactness`: "exact" (the same function, up to float rounding order), "rounding" (the same
    function in real arithmetic, rounded differently), "approximate" (the function changes;
    opt-in only). `needs`: what the route must provide (see `ROUTE_FACTS`)."""

    name: str
    exactness: Exactness
    rules: list[Rule] = field(default_factory=list)
    analysis: Callable[[Rewriter], None] | None = None
    needs: tuple[str, ...] = ()
    doc: str = ""
    max_rounds: int = 100
    miss_note: str = ""  # appended to every near-miss reason: what happens to an unmatched root

    @property
    def approximate(self) -> bool:
        return self.exactness == "approximate"


# what a pass may need, and how to tell whether a graph has it
ROUTE_FACTS: dict[str, Callable[[fx.GraphModule], bool]] = {
    "example_inputs": lambda gm: gm.meta.get("example_inputs") is not None,
    # every capture route records shapes (shape propagation, export's `val`, Dynamo's
    # `example_value`); a graph built by hand may not, and a pass that reasons on shapes says so
    "shapes": lambda gm: any(k in n.meta for n in gm.graph.nodes for k in ("tensor_meta", "val", "example_value")),
}


def run_pass(gm: fx.GraphModule, p: Pass, report: Report, derivations: list[Derivation]) -> int:
    """Apply one pass (rules to a fixed point, or its analysis); returns the number of rewrites."""
    missing = [need for need in p.needs if not ROUTE_FACTS[need](gm)]
    if missing:
        report.skip(p.name, "graph", f"not run: it needs {', '.join(missing)}, which this route does not provide")
        return 0
    rw = Rewriter(gm, report, derivations)
    rw.pass_name = p.name
    if p.analysis is not None:
        before = len(report.records)
        p.analysis(rw)
        rw.sweep()
        return sum(1 for r in report.records[before:] if r.action == "rewrote")
    by_target: dict = {}
    for rule in p.rules:
        for t in rule.pattern.targets:
            by_target.setdefault(t, []).append(rule)
    near_misses: dict[str, str] = {}
    total = 0
    for _ in range(p.max_rounds):
        changed = 0
        for node in list(gm.graph.nodes):
            if node.graph is None or node.op != "call_function" or not node.users:
                continue
            for rule in by_target.get(node.target, ()):
                m = _try(rule, node, near_misses, rw)
                if m is None:
                    continue
                new = rule.rewrite(rw.at(node), **m.captures)
                if new is not None:
                    rw.replace(node, new, _describe(rule, m, new))
                near_misses.pop(node.name, None)
                changed += 1
                break
        rw.sweep()
        total += changed
        if not changed:
            break
    for node_name, reason in near_misses.items():
        report.skip(p.name, node_name, f"{reason}{'; ' + p.miss_note if p.miss_note else ''}")
    return total


def _try(rule: Rule, node: fx.Node, near_misses: dict, rw: Rewriter) -> Match | None:
    try:
        m = match(rule.pattern, node)
    except NoMatch as e:
        if e.depth > 0:
            near_misses.setdefault(node.name, f"{rule.name}: {e.reason}")
        return None
    reason = rule.check(**m.captures) if rule.check is not None else None
    reason = reason or rw.moved_read(m.nodes, node)  # the replacement is computed at the root
    if reason:
        near_misses[node.name] = f"{rule.name}: {reason}"
        return None
    return m


def _describe(rule: Rule, m: Match, new: fx.Node) -> str:
    matched = " <- ".join(n.name for n in m.nodes)
    return f"{rule.name}: [{matched}] -> {describe_node(new)}"


def describe_node(n: fx.Node) -> str:
    """`aten.convolution(weight=conv1_bn_weight)`: the op and the constants it reads, for reports
    (a new node's own name, `convolution_default_53`, says nothing)."""
    if n.op != "call_function" or not isinstance(n.target, torch._ops.OpOverload):
        return n.name
    consts = [f"{a.name}={v.target}" for a, v in zip(n.target._schema.arguments, n.args)
              if isinstance(v, fx.Node) and v.op == "get_attr"]
    return f"{ops.short_name(n.target)}({', '.join(consts)})"
