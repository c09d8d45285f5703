"""The Rewriter: the only way a pass changes a graph.

It inserts canonical calls before the matched root, derives new weights as *functions of old
weights* (recorded, so that the same transform can be replayed later on other tensors, e.g.
shard by shard for a model built on the meta device), replaces values and records every change.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch
import torch.fx as fx
import torch.nn as nn

from . import ops
from .attrs import fetch_attr
from .report import Report
from .shapes import infer_tensor_meta


@dataclass
class Derivation:
    """`target = fn(*sources)`: how a derived weight was computed from the module's own tensors."""

    target: str
    fn: Callable
    sources: tuple  # get_attr targets (str), None, or literals, in fn's argument order
    pass_name: str


def _contiguous(fn: Callable) -> Callable:
    """`fn` whose result is made contiguous (the recorded derivation, so replays agree too)."""
    def derive(*values):
        return fn(*values).contiguous()
    derive.__wrapped__ = fn
    return derive


class Rewriter:
    def __init__(self, gm: fx.GraphModule, report: Report, derivations: list[Derivation]):
        self.gm = gm
        self.graph = gm.graph
        self.report = report
        self.derivations = derivations
        self.pass_name = ""
        self._anchor: fx.Node | None = None

    # ---- reading
    def value(self, node):
        """The tensor behind a `get_attr` node (None stays None; literals pass through)."""
        if isinstance(node, fx.Node):
            if node.op != "get_attr":
                raise TypeError(f"{node.name} is not a constant")
            return fetch_attr(self.gm, node.target)
        return node

    # ---- building
    def at(self, anchor: fx.Node) -> "Rewriter":
        """New nodes go right before `anchor` (the matched root)."""
        self._anchor = anchor
        return self

    def call(self, op, /, **named) -> fx.Node:
        args, kwargs = ops.call(op, **named)
        with self.graph.inserting_before(self._anchor):
            node = self.graph.call_function(op, args, kwargs)
        infer_tensor_meta(node)
        return node

    def param(self, hint: str, fn: Callable, *sources) -> fx.Node:
        """A new constant `fn(*sources)`, where sources are get_attr nodes, None or literals.

        Registered as a Parameter if any source tensor is one (so it still trains), else a buffer.
        Always contiguous: a weight computed through an einsum or a convolution can come out
        channels-last, which would change the memory format of every activation after it.
        """
        fn = _contiguous(fn)
        values = [self.value(s) for s in sources]
        with torch.no_grad():
            result = fn(*values)
        is_param = any(isinstance(v, nn.Parameter) for v in values)
        name = self._fresh_name(hint)
        if is_param:
            self.gm.register_parameter(name, nn.Parameter(result.detach(), requires_grad=any(
                isinstance(v, nn.Parameter) and v.requires_grad for v in values)))
        else:
            self.gm.register_buffer(name, result.detach())
        self.derivations.append(Derivation(
            name, fn, tuple(s.target if isinstance(s, fx.Node) else s for s in sources), self.pass_name))
        with self.graph.inserting_before(self._anchor):
            return self.graph.get_attr(name)

    def _fresh_name(self, hint: str) -> str:
        base = re.sub(r"[^0-9a-zA-Z_]", "_", hint).strip("_") or "w"
        name, i = base, 1
        while hasattr(self.gm, name):
            i += 1
            name = f"{base}_{i}"
        return name

    # ---- changing
    def replace(self, old: fx.Node, new: fx.Node, detail: str):
        """Point every reader of `old` at `new`, keep `old`'s metadata, record the change."""
        for key in ("val", "tensor_meta", "stack_trace", "nn_module_stack"):
            if key in old.meta and key not in new.meta:
                new.meta[key] = old.meta[key]
        old.replace_all_uses_with(new)
        self.report.rewrote(self.pass_name, old.name, detail)
