"""The Rewriter: the only way a pass changes a graph.

It inserts calls before an anchor (the matched root), derives new weights as *functions of old
weights* (recorded, so that the same transform can be replayed later on other tensors, e.g.
shard by shard for a model built on the meta device), replaces values, erases what a rewrite
made dead, and records every change in the report. Passes never touch `fx.Graph` themselves:
keeping every mutation here is what lets the engine guarantee metadata on new nodes, the
derivation record and the report for all of them alike.
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
from .dce import eliminate_dead_code, erase_dead_inputs
from .effects import moved_read, mutated_args, mutations
from .report import Report
from .shapes import infer_tensor_meta, row_major_strides


@dataclass
class Derivation:
    """`target = fn(*sources)`: how a derived weight was computed from the module's own tensors."""

    target: str
    fn: Callable
    sources: tuple  # get_attr targets (str), None, or literals, in fn's argument order
    pass_name: str


def _row_major(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride() == row_major_strides(t.shape) else t.clone(memory_format=torch.contiguous_format)


def _contiguous(fn: Callable) -> Callable:
    """`fn` whose result is made contiguous (the recorded derivation, so replays agree too)."""
    def derive(*values):
        return _row_major(fn(*values))
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

    # ---- legality
    def moved_read(self, matched, at: fx.Node) -> str | None:
        """`effects.moved_read` with the graph's in-place writes found once per graph (kept in
        `gm.meta["in_place_writes"]`): after canonicalisation every change to the graph goes
        through a Rewriter, which keeps that list up to date, instead of walking the graph for
        each candidate rewrite of each pass."""
        return moved_read(matched, at, self._writers())

    def _writers(self) -> list[fx.Node]:
        writers = self.gm.meta.get("in_place_writes")
        if writers is None:
            writers = self.gm.meta["in_place_writes"] = mutations(self.graph)
        return writers

    def _track(self, node: fx.Node) -> fx.Node:
        """Note a node this Rewriter added or changed, if it writes in place."""
        writers = self.gm.meta.get("in_place_writes")
        if writers is not None and node not in writers and mutated_args(node):
            writers.append(node)
        return node

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
        """A canonical op (`rewrite.ops`) called with schema-named arguments."""
        args, kwargs = ops.call(op, **named)
        return self.call_function(op, args, kwargs)

    def call_function(self, fn, args: tuple = (), kwargs: dict | None = None) -> fx.Node:
        """Any function (`operator.getitem`, a custom op) called with these arguments."""
        with self.graph.inserting_before(self._anchor):
            node = self.graph.call_function(fn, args, kwargs or {})
        return self._track(node)

    def infer_meta(self, node: fx.Node) -> fx.Node:
        """Give a new intermediate node its shape (`shapes.infer_tensor_meta`), for a pass that
        reads it before the pass ends; a node that replaces another takes that one's metadata in
        `replace`, so this is not done for every new node (running ops on meta tensors costs)."""
        infer_tensor_meta(node)
        return node

    def call_module(self, hint: str, module: nn.Module, args: tuple) -> fx.Node:
        """Register `module` under a fresh dotted name made from `hint` (`blocks.0.norm1_dyt`)
        and call it; the call takes the anchor's metadata (it computes the anchor's value)."""
        base = re.sub(r"[^0-9a-zA-Z_.]", "_", hint).strip(".")
        target, i = base, 1
        while _has_path(self.gm, target):
            i += 1
            target = f"{base}_{i}"
        self.gm.add_submodule(target, module)
        with self.graph.inserting_before(self._anchor):
            node = self._track(self.graph.call_module(target, args))
        for key in ("nn_module_stack", "stack_trace", "val", "tensor_meta"):
            if key in self._anchor.meta:
                node.meta[key] = self._anchor.meta[key]
        node.meta["source_module"] = target
        return node

    def call_method(self, name: str, args: tuple) -> fx.Node:
        """`args[0].name(*args[1:])`."""
        with self.graph.inserting_before(self._anchor):
            node = self.graph.call_method(name, args)
        return self._track(node)

    def get_attr(self, target: str) -> fx.Node:
        """A read of the module's tensor `target`."""
        with self.graph.inserting_before(self._anchor):
            return self.graph.get_attr(target)

    def copy(self, node: fx.Node, remap: Callable[[fx.Node], object]) -> fx.Node:
        """A copy of `node` whose inputs are mapped through `remap`."""
        with self.graph.inserting_before(self._anchor):
            return self._track(self.graph.node_copy(node, remap))

    def param(self, hint: str, fn: Callable, *sources, value: torch.Tensor | None = None) -> fx.Node:
        """A new constant `fn(*sources)`, where sources are get_attr nodes, None or literals;
        `value`: that result, when the pass has already computed it (to judge whether to fold).

        Registered as a Parameter if any source tensor is one (so it still trains), else a buffer.
        Always contiguous: a weight computed through an einsum or a convolution can come out
        channels-last, which would change the memory format of every activation after it.
        """
        fn = _contiguous(fn)
        values = [self.value(s) for s in sources]
        with torch.no_grad():
            result = fn(*values) if value is None else _row_major(value)
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
        self.redirect(old, new)
        self.report.rewrote(self.pass_name, old.name, detail)

    def redirect(self, old: fx.Node, new, where: Callable[[fx.Node], bool] | None = None):
        """Point the readers of `old` that `where` accepts (all by default) at `new`, a node
        (which takes `old`'s metadata) or a literal. Records nothing: part of a rewrite."""
        if isinstance(new, fx.Node):
            for key in ("val", "tensor_meta", "stack_trace", "nn_module_stack"):
                if key in old.meta and key not in new.meta:
                    new.meta[key] = old.meta[key]
        for user in list(old.users):
            if user is not new and (where is None or where(user)):
                user.args = fx.node.map_arg(user.args, lambda a: new if a is old else a)
                user.kwargs = fx.node.map_arg(user.kwargs, lambda a: new if a is old else a)

    def set_memory_format(self, target: str, memory_format: torch.memory_format) -> None:
        """Store the module's tensor `target` in another memory format (same values)."""
        t = fetch_attr(self.gm, target)
        t.data = t.data.contiguous(memory_format=memory_format)

    def retarget(self, node: fx.Node, target) -> None:
        """Call `target` in place of `node`'s function, same arguments (an in-place variant)."""
        node.target = target
        self._track(node)

    def erase(self, node: fx.Node) -> None:
        """Remove `node`, which nothing may read any more."""
        self.graph.erase_node(node)
        self._forget_erased()

    def erase_dead(self, node: fx.Node) -> None:
        """Remove `node` if nothing reads it and it has no effect, and so on up its inputs."""
        erase_dead_inputs(node)  # (a node with effects, a write among them, is never erased)

    def sweep(self) -> None:
        """Remove every value nothing reads and that has no effect."""
        eliminate_dead_code(self.graph)  # (writes have effects: the list of writes stays valid)

    def _forget_erased(self):
        writers = self.gm.meta.get("in_place_writes")
        if writers is not None:
            writers[:] = [w for w in writers if w.graph is not None]

    # ---- recording
    def rewrote(self, node: str, detail: str):
        self.report.rewrote(self.pass_name, node, detail)

    def skip(self, node: str, reason: str):
        self.report.skip(self.pass_name, node, reason)

    def note(self, node: str, detail: str):
        self.report.note(self.pass_name, node, detail)


def _has_path(root: nn.Module, target: str) -> bool:
    try:
        fetch_attr(root, target)
        return True
    except AttributeError:
        return False
