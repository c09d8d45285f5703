"""What every architecture swap shares: choosing which ops to swap (`only=`), putting a new
module into the graph, and measuring how far the swap moved the values.

Selection. `only` is None (everything), a module class (matches the module the op came from,
subclasses included), a string (that module's qualified name, or a dotted prefix of it:
"blocks.0" selects everything inside block 0), a compiled regex (searched in the name), or a
list of these (any may match). The module an op came from is `node.meta["source_module"]` for
nodes canonicalised from a `call_module`, else the innermost entry of `nn_module_stack` (which
symbolic_trace and torch.export both record).

Measurement. When the graph carries its example inputs (`gm.meta["example_inputs"]`, set by
capture), the swap runs the graph once before rewriting (an `fx.Interpreter` that keeps the
input and output of every op to be swapped), then reports for each swap the deviation of the
replacement from the original op *on that op's own input in the original model*, and after all
swaps the deviation of the model's outputs: `rewrite.verify.deviation`, max|new - old| (abs) and
that divided by max|old| (rel), the metric `verify` itself reports.
"""
from __future__ import annotations

import pydoc
import re
from typing import Iterable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
import torch.utils._pytree as pytree

from ..rewrite import ops
from ..rewrite.clone import clone_inputs, preserved_state
from ..rewrite.effects import observers
from ..rewrite.values import NEEDS_VALUES, has_values, on_meta


# ---------------------------------------------------------------- where an op came from

def module_path(node: fx.Node) -> str | None:
    """Qualified name of the module `node` came from (None for top-level functional code)."""
    src = node.meta.get("source_module")
    if src:
        return src
    if node.op == "call_module":
        return node.target
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        return path or None
    return None


def module_class(node: fx.Node) -> type | None:
    """The class of the module `node` came from, where it can be known."""
    if node.op == "call_module" and node.graph.owning_module is not None:
        return type(node.graph.owning_module.get_submodule(node.target))
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    cls = list(stack.values())[-1][1]
    if isinstance(cls, str):  # torch.export records the class's qualified name
        cls = pydoc.locate(cls)
    return cls if isinstance(cls, type) else None


def op_name(node: fx.Node) -> str:
    """The bare name of what `node` computes, to match against sets of op names and for reports:
    "linear" for `aten.linear.default` or `F.linear`, the method for a `call_method`, else the
    node's kind ("call_module", "placeholder", ...)."""
    if node.op == "call_method":
        return node.target
    if node.op == "call_function":
        return ops.short_name(node.target).removeprefix("aten.")
    return node.op


class Selector:
    """Which ops a swap applies to (see the module docstring)."""

    def __init__(self, only=None):
        items = [] if only is None else list(only) if isinstance(only, (list, tuple, set)) else [only]
        for it in items:
            if not isinstance(it, (type, str, re.Pattern)):
                raise TypeError(f"only= takes module classes, names or compiled regexes, not {it!r}")
        self.items = items

    def __call__(self, node: fx.Node) -> bool:
        if not self.items:
            return True
        path, cls = module_path(node), module_class(node)
        for it in self.items:
            if isinstance(it, type) and cls is not None and issubclass(cls, it):
                return True
            if isinstance(it, str) and path is not None and (path == it or path.startswith(it + ".")):
                return True
            if isinstance(it, re.Pattern) and path is not None and it.search(path):
                return True
        return False

    def __str__(self):
        return ", ".join(it.__name__ if isinstance(it, type) else f"/{it.pattern}/" if isinstance(it, re.Pattern)
                         else repr(it) for it in self.items) or "everything"


# ---------------------------------------------------------------- measuring

class _Recorder(fx.Interpreter):
    """Keeps the value of one chosen input and the output of each wanted node."""

    def __init__(self, gm, wanted: dict[fx.Node, object]):
        super().__init__(gm, garbage_collect_values=True)
        self.wanted, self.seen = wanted, {}

    def run_node(self, n):
        if n in self.wanted:  # the input is kept before the op runs: an in-place op changes it
            a = self.wanted[n]
            kept = _detach(self.env[a] if isinstance(a, fx.Node) else a)
        out = super().run_node(n)
        if n in self.wanted:
            self.seen[n] = (kept, _detach(out))
        return out


def _detach(v):
    return v.detach().clone() if isinstance(v, torch.Tensor) else v


def flat_inputs(gm: fx.GraphModule, args, kwargs) -> list:
    """The graph's placeholder values for a call with `args`, `kwargs` (through its input spec
    when torch.export made it)."""
    spec = getattr(gm, "_in_spec", None)
    if spec is not None:
        import torch.fx._pytree as fx_pytree
        return list(fx_pytree.tree_flatten_spec((tuple(args), dict(kwargs)), spec))
    if kwargs:
        raise ValueError("keyword inputs for a graph without an input spec")
    return list(args)


def run_recording(gm: fx.GraphModule, wanted: dict[fx.Node, object]):
    """Run `gm` on its example inputs; `wanted` maps a node to the input (a node) to keep.
    Returns (flat outputs, {node: (input value, output value)})
    or (None, reason) when the graph has no example inputs or fails to run."""
    example = getattr(gm, "meta", {}).get("example_inputs")
    if example is None:
        return None, "not measured: the graph carries no example inputs"
    args, kwargs = example
    if on_meta(gm) or not has_values(*pytree.tree_leaves((args, kwargs))):
        return None, f"not measured: {NEEDS_VALUES}"
    rec = _Recorder(gm, wanted)
    try:
        with torch.no_grad(), preserved_state(gm):
            out = rec.run(*flat_inputs(gm, clone_inputs(args), clone_inputs(kwargs)))
    except Exception as e:  # measuring is a report, never a reason to fail the swap
        return None, f"not measured: running the graph failed ({type(e).__name__}: {str(e)[:120]})"
    return pytree.tree_leaves(out), rec.seen


def fmt_dev(d: tuple[float, float]) -> str:
    """A `rewrite.verify.deviation` for a report line."""
    return f"max abs {d[0]:.3g}, max rel {d[1]:.3g}"


def nodes_with(gm: fx.GraphModule, targets: Iterable, other_forms=None) -> list[fx.Node]:
    """Live canonical nodes of `targets`, and the nodes `other_forms(node)` accepts (with or
    without users: an in-place op acts through the value it mutates)."""
    targets = set(targets)
    return [n for n in gm.graph.nodes if (n.op == "call_function" and n.target in targets and n.users)
            or (other_forms is not None and other_forms(n))]


# ---------------------------------------------------------------- what a swapped op reads

def swapped_input(n: fx.Node, input_arg: str):
    """The tensor a swapped op reads: its schema argument if canonical, else its first argument."""
    if n.op == "call_function" and n.target in ops.CANONICAL:
        return ops.arg(n, input_arg)
    return n.args[0] if n.args else n.kwargs.get("input")


_INPLACE_RELU_FUNCTIONS = {torch.relu_, torch.ops.aten.relu_.default, F.relu}


def kept_inplace_relu(n: fx.Node) -> bool:
    """A ReLU that canonicalisation kept in place (its input is not a fresh value of the graph,
    e.g. timm's `drop_block` Identity -> alias -> ReLU(inplace=True))."""
    if n.op == "call_module":
        mod = n.graph.owning_module.get_submodule(n.target)
        return type(mod).forward is nn.ReLU.forward
    if n.op == "call_method":
        return n.target in ("relu", "relu_")
    return n.op == "call_function" and n.target in _INPLACE_RELU_FUNCTIONS


def observed_inplace(n: fx.Node) -> str | None:
    """Why `n`, when it is a ReLU kept in place, may not become an out-of-place module (that
    would change what someone sees), or None: nothing else may read the value it mutates or a
    value that may alias it (`effects.observers`), and none of those may be a model input or
    parameter."""
    v = swapped_input(n, "self") if kept_inplace_relu(n) else None
    if not isinstance(v, fx.Node):
        return None
    exposed, readers = observers(n, v)
    why = "an in-place ReLU whose mutation is observed: it works in place on"
    if readers:
        return (f"{why} {v.name}, which {len(readers)} other op(s) also read (directly or through a view): "
                f"{', '.join(r.name for r in readers[:3])}{', ...' if len(readers) > 3 else ''}")
    if exposed:
        return f"{why} {exposed[0].op} {exposed[0].target} (a model input or parameter)"
    return None
