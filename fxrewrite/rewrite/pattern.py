"""Declarative patterns over canonical ops, and the matcher.

A pattern is a small tree of data:

    Op(ops.batch_norm, input=Op(ops.conv, weight=Param("w"), bias=Param("b", optional=True), name="conv"),
       weight=Param("gamma", optional=True), training=Lit(False), name="bn")

`Op` matches a `call_function` node of one of its targets and recurses into the operands named
(by schema name; operands not named match anything). `Any`, `Param` and `Lit` capture values.
Every `name=` is a capture; a rule's rewrite function receives the captures as keyword arguments.

Interior nodes (every matched `Op` but the root) must have a single user, so that rewriting the
root cannot leave another reader of an interior value with a stale or missing value; an `Op`
marked `shared=True` opts out (its value is read, not replaced).

Matching never changes the graph. A failed match says why (`NoMatch.reason`), which the driver
reports for near misses: the root matched but a deeper operand or a legality check did not.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any as _AnyT, Callable

import torch.fx as fx

from . import ops


class NoMatch(Exception):
    """A pattern did not match; `reason` says where."""

    def __init__(self, reason: str, depth: int = 0):
        super().__init__(reason)
        self.reason = reason
        self.depth = depth  # 0: the root op itself did not match; >0: a near miss


@dataclass
class Match:
    root: fx.Node
    captures: dict[str, _AnyT] = field(default_factory=dict)
    nodes: list[fx.Node] = field(default_factory=list)  # matched op nodes, root first


class Pattern:
    name: str | None = None

    def match(self, value, m: Match, depth: int) -> None:
        raise NotImplementedError

    def _capture(self, value, m: Match):
        if self.name is not None:
            if self.name in m.captures and m.captures[self.name] is not value:
                raise NoMatch(f"{self.name!r} bound to two different values", depth=1)
            m.captures[self.name] = value


class Op(Pattern):
    def __init__(self, /, *targets, name: str | None = None, where: Callable[[fx.Node], bool] | None = None,
                 shared: bool = False, **operands: Pattern):
        self.targets = set(targets)
        self.name, self.where, self.shared, self.operands = name, where, shared, operands
        self.label = "root"  # how failure messages name the matched value: its operand name in the parent
        for operand, sub in operands.items():
            if isinstance(sub, Op):
                sub.label = operand

    def match(self, value, m: Match, depth: int = 0) -> None:
        if not (isinstance(value, fx.Node) and value.op == "call_function" and value.target in self.targets):
            got = f"{value.name} ({ops.short_name(value.target)})" if isinstance(value, fx.Node) else repr(value)
            want = "/".join(ops.short_name(t) for t in self.targets)
            raise NoMatch(f"{self.label} is {got}, not {want}", depth)
        if depth > 0 and not self.shared and len(value.users) != 1:
            raise NoMatch(f"{value.name} has {len(value.users)} users; its value is needed elsewhere", depth)
        if self.where is not None and not self.where(value):
            raise NoMatch(f"{value.name} fails the condition of the pattern", depth)
        self._capture(value, m)
        m.nodes.append(value)
        for operand, sub in self.operands.items():
            sub.match(ops.arg(value, operand), m, depth + 1)


class Any(Pattern):
    """Any value (a node or a literal); captured under `name`."""

    def __init__(self, name: str | None = None):
        self.name = name

    def match(self, value, m: Match, depth: int = 0) -> None:
        self._capture(value, m)


class Param(Pattern):
    """A constant tensor held by the module (a `get_attr` node), or None when `optional`."""

    def __init__(self, name: str | None = None, optional: bool = False):
        self.name, self.optional = name, optional

    def match(self, value, m: Match, depth: int = 0) -> None:
        if value is None and self.optional:
            self._capture(None, m)
            return
        if not (isinstance(value, fx.Node) and value.op == "get_attr"):
            what = value.name if isinstance(value, fx.Node) else repr(value)
            raise NoMatch(f"{self.name or 'operand'} is {what}, not a constant parameter", depth)
        self._capture(value, m)


class Lit(Pattern):
    """A literal argument equal to `value`, or satisfying `where`."""

    _UNSET = object()

    def __init__(self, value=_UNSET, name: str | None = None, where: Callable | None = None,
                 what: str | None = None):
        self.value, self.name, self.where = value, name, where
        self.what = what or name or "argument"  # how failure messages call it

    def match(self, value, m: Match, depth: int = 0) -> None:
        if isinstance(value, fx.Node):
            raise NoMatch(f"{self.what} is computed ({value.name}), not a literal", depth)
        if self.value is not Lit._UNSET and value != self.value:
            raise NoMatch(f"{self.what} is {value!r}, not {self.value!r}", depth)
        if self.where is not None and not self.where(value):
            raise NoMatch(f"{self.what} {value!r} fails the condition", depth)
        self._capture(value, m)


def match(pattern: Op, node: fx.Node) -> Match:
    """Match `pattern` rooted at `node`; raises NoMatch with a reason."""
    m = Match(root=node)
    pattern.match(node, m, 0)
    return m
