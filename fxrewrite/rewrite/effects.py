"""What a node writes, which values may share memory, and which rewrites would reorder them.

A captured graph is a program with an order. Canonicalisation makes in-place ops functional
where that is provably the same, but a mutation of a model input, a parameter or a view stays
as written (`x.relu_()` on an input, `v.add_(1)` on a view). Around such a mutation the order
of reads matters: a value read before `x.relu_()` is not the value read after it.

A rewrite computes its replacement at one place (the matched root, or the first node after a
region's inputs), so every read of the match moves there. This module answers whether that
moves a read across a mutation of what it reads (`moved_read`), and is the one place that
knows which nodes mutate (`mutated_args`), which may have effects a dead-code pass must keep
(`may_have_effects`), which values may alias (`AliasMap`), who could see an in-place write
(`observers`) and which modules carry hooks (`hooks_of`).
"""
from __future__ import annotations

import functools
import operator

import torch
import torch.fx as fx
import torch.nn as nn

from .computed_weights import PURE_HELPERS

_DECLARED_PURE: set = set()  # functions a layer above declared pure (`declare_pure`)


def declare_pure(fn):
    """Declare `fn` a pure function of its arguments for graph analyses (no writes, no random
    draws): layers above the engine (e.g. codegen's region call) register their functions here,
    since this module may not import them. Returns `fn` (usable as a decorator)."""
    _DECLARED_PURE.add(fn)
    return fn

_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.setitem,
                      operator.ifloordiv, operator.imod, operator.ipow, operator.iand, operator.ior,
                      operator.ixor, operator.ilshift, operator.irshift, operator.imatmul}
_PURE_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.LayerNorm, nn.ReLU, nn.GELU, nn.SiLU,
                 nn.Identity, nn.Dropout, nn.Flatten, nn.AdaptiveAvgPool2d, nn.MaxPool2d, nn.AvgPool2d)

# ---------------------------------------------------------------- writes


def _inplace_flag(node: fx.Node) -> bool:
    """`F.relu(x, inplace=True)` or `F.relu(x, True)`: the `inplace` parameter, by name or position."""
    if node.kwargs.get("inplace") is True:
        return True
    code = getattr(node.target, "__code__", None)
    if code is not None and "inplace" in code.co_varnames[:code.co_argcount]:
        i = code.co_varnames.index("inplace")
        return len(node.args) > i and node.args[i] is True
    return False


@functools.cache
def _written_arguments(op) -> tuple:
    """(position, name, keyword-only) of each argument an ATen overload's schema marks as
    written (`Tensor(a!)`); cached, since it depends on the op alone."""
    return tuple((i, a.name, a.kwarg_only) for i, a in enumerate(op._schema.arguments)
                 if a.alias_info is not None and a.alias_info.is_write)


def _schema_writes(node: fx.Node) -> list:
    """The argument values an ATen overload call writes."""
    return [node.args[i] if not kw and i < len(node.args) else node.kwargs.get(name)
            for i, name, kw in _written_arguments(node.target)]


def mutated_args(node: fx.Node, module: nn.Module | None = None) -> list[fx.Node]:
    """The graph values `node` writes in place (empty for a functional node)."""
    written: list = []
    first = node.args[0] if node.args else None
    if node.op == "call_function":
        t = node.target
        if isinstance(t, torch._ops.OpOverload):
            written = _schema_writes(node)
        elif t in _INPLACE_OPERATORS or _inplace_flag(node) or (
                getattr(t, "__name__", "").endswith("_") and not getattr(t, "__name__", "").startswith("__")):
            written = [first]
        elif is_unknown_function(t):  # a user's `torch.fx.wrap`ped function: it may write any input
            written = [a for a in node.args if isinstance(a, fx.Node)]
        if node.kwargs.get("out") is not None:
            written.append(node.kwargs["out"])
    elif node.op == "call_method":
        t = node.target
        if (t.endswith("_") and not t.startswith("__")) or t.startswith("__i") or t == "__setitem__":
            written = [first]
    elif node.op == "call_module":
        mod = module if module is not None else node.graph.owning_module.get_submodule(node.target)
        if getattr(mod, "inplace", False) is True:
            written = [first]
    return [v for v in written if isinstance(v, fx.Node)]


def is_unknown_function(t) -> bool:
    """A called function this module knows nothing of: not an ATen overload, not torch's, Python's
    or the library's own. `torch.fx.wrap` keeps such functions as one call (torchvision's MViT
    adds its shortcut in place inside one, and uses nothing it returns), so whatever it does to
    its inputs, it must be kept and not moved across."""
    if isinstance(t, torch._ops.OpOverload) or t in PURE_HELPERS or t in _DECLARED_PURE:
        return False
    return getattr(t, "__module__", None) not in _TORCH_MODULES + ("builtins", "math")


def may_have_effects(node: fx.Node) -> bool:
    """Whether erasing `node` (when nothing reads its result) could change the program: it writes
    in place, is impure, or is a module call not known to be pure."""
    if node.op in ("placeholder", "output"):
        return True
    if node.op == "call_module":
        mod = node.graph.owning_module.get_submodule(node.target)
        return not (isinstance(mod, _PURE_MODULES) and not getattr(mod, "inplace", False) and not hooks_of(mod))
    if node.op in ("call_function", "call_method"):
        if mutated_args(node):
            return True
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
            return node.target._schema.is_mutable or node.is_impure()
        return node.op == "call_function" and (node.is_impure() or is_unknown_function(node.target))
    return False


_RANDOM_NAMES = ("dropout", "rand", "bernoulli", "normal", "multinomial", "poisson", "rrelu", "gumbel",
                 "uniform", "exponential", "geometric", "cauchy", "log_normal")


def is_pure_value(node: fx.Node) -> bool:
    """Whether `node`'s value is a function of its inputs alone, the same on every call: no write,
    no random draw, no module state. Known functions only (ATen overloads by their schema's
    tags; torch, operator and `computed_weights`' helpers by name); a module call never is."""
    if node.op not in ("call_function", "call_method") or mutated_args(node):
        return False
    t = node.target
    if node.op == "call_method":
        return not any(r in t for r in _RANDOM_NAMES)
    if t in PURE_HELPERS or t in _DECLARED_PURE:
        return True
    if isinstance(t, torch._ops.OpOverload):
        return torch.Tag.nondeterministic_seeded not in t.tags and not t._schema.is_mutable
    name = getattr(t, "__name__", "")
    return getattr(t, "__module__", None) in _TORCH_MODULES and not any(r in name for r in _RANDOM_NAMES)


# ---------------------------------------------------------------- aliasing

_VIEW_METHODS = {"view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "transpose", "permute",
                 "t", "expand", "expand_as", "unsqueeze", "squeeze", "narrow", "select", "chunk", "split",
                 "unbind", "as_strided", "diagonal", "movedim", "swapaxes", "detach", "contiguous", "to",
                 "type", "type_as", "float", "double", "half", "bfloat16", "__getitem__", "real", "imag",
                 "view_as_real", "view_as_complex", "unfold", "split_with_sizes", "tensor_split"}
_FRESH_METHODS = {"add", "sub", "mul", "div", "matmul", "sum", "mean", "softmax", "log_softmax", "relu",
                  "sigmoid", "tanh", "exp", "log", "pow", "sqrt", "rsqrt", "neg", "abs", "clone", "norm",
                  "max", "min", "amax", "amin", "var", "std", "cumsum", "__add__", "__sub__", "__mul__",
                  "__truediv__", "__radd__", "__rsub__", "__rmul__", "__rtruediv__", "__neg__", "__matmul__",
                  "size", "dim", "numel"}


_CAST_METHODS = {"to", "type", "type_as", "float", "double", "half", "bfloat16"}


def is_view(node: fx.Node) -> bool:
    """Whether `node` only makes a view of its input (a reshape, a transpose, an index): it
    computes nothing. A cast is not one (`.to(dtype)` copies whenever the dtype changes)."""
    t = node.target
    if node.op == "call_method":
        return t in _VIEW_METHODS and t not in _CAST_METHODS
    if isinstance(t, torch._ops.OpOverload):
        rets = t._schema.returns
        return t is not torch.ops.aten.to.dtype and len(rets) == 1 and rets[0].alias_info is not None
    return t is operator.getitem


_TORCH_MODULES = ("torch", "torch.nn.functional", "torch._C._nn", "torch.functional", "_operator", "operator")


def _may_alias_input(node: fx.Node) -> bool:
    """Whether `node`'s result may share memory with one of its tensor inputs. Unknown calls
    are assumed to (a module may return its input, `nn.Identity`); canonical ATen ops say in
    their schema."""
    if node.op == "call_function":
        t = node.target
        if isinstance(t, torch._ops.OpOverload):
            return any(r.alias_info is not None for r in t._schema.returns)
        if t is operator.getitem or mutated_args(node):
            return True
        name = getattr(t, "__name__", "")
        if name in _VIEW_METHODS:
            return True
        return getattr(t, "__module__", None) not in _TORCH_MODULES and name not in _FRESH_METHODS
    if node.op == "call_method":
        return node.target not in _FRESH_METHODS or bool(mutated_args(node))
    return node.op == "call_module"


class AliasMap:
    """Which values of a graph may share memory: a union-find over "may alias an input" edges,
    so a mutation of a view is seen as a mutation of its base and of every other view."""

    def __init__(self, graph: fx.Graph):
        self.parent: dict[fx.Node, fx.Node] = {}
        for node in graph.nodes:
            if node.op in ("call_function", "call_method", "call_module") and _may_alias_input(node):
                for v in node.all_input_nodes:
                    self._union(node, v)

    def root(self, v: fx.Node) -> fx.Node:
        p = self.parent.get(v, v)
        if p is v:
            return v
        r = self.root(p)
        self.parent[v] = r
        return r

    def _union(self, a: fx.Node, b: fx.Node):
        ra, rb = self.root(a), self.root(b)
        if ra is not rb:
            self.parent[ra] = rb


def observers(writer: fx.Node, value: fx.Node, aliases: AliasMap | None = None) -> tuple[list, list]:
    """Who besides `writer` could see it write `value` in place: (the model inputs and parameters
    (placeholder / get_attr) that may share memory with `value`, the nodes that read a value that
    may share memory with it). Not counted: `writer` itself, what is computed from it (it reads
    the written value by design), and the ops that only make another alias of `value`. Both
    empty: the write is private, and `writer` may as well compute a fresh value instead."""
    aliases = aliases if aliases is not None else AliasMap(writer.graph)
    after, todo = {writer}, [writer]
    while todo:  # the writer and everything computed from it
        for u in todo.pop().users:
            if u not in after:
                after.add(u)
                todo.append(u)
    base = aliases.root(value)
    shared = [n for n in writer.graph.nodes if n not in after and aliases.root(n) is base]
    members = set(shared)
    exposed = [n for n in shared if n.op in ("placeholder", "get_attr")]
    readers = list(dict.fromkeys(u for n in shared for u in n.users if u is not writer and u not in members))
    return exposed, readers


# ---------------------------------------------------------------- reads moved past writes

_aten = torch.ops.aten
_BATCH_NORMS = {torch.nn.functional.batch_norm: (1, 2, 5), torch.batch_norm: (3, 4, 5),  # positions of
                _aten.batch_norm.default: (3, 4, 5), _aten.native_batch_norm.default: (3, 4, 5),  # running
                _aten._native_batch_norm_legit.default: (3, 4, 5),  # mean, var, training
                _aten._native_batch_norm_legit_functional.default: (3, 4, 5)}


def updates_running_stats(node: fx.Node) -> bool:
    """A batch norm in training mode with running statistics: it updates them on each call (its
    schema does not say so). Weight standardisation's `F.batch_norm(w, None, None,
    training=True)` has none to update: a function of its input like any other."""
    if node.op != "call_function" or node.target not in _BATCH_NORMS:
        return False
    i_mean, i_var, i_training = _BATCH_NORMS[node.target]

    def arg(i, name, default=None):
        return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)
    stats = arg(i_mean, "running_mean"), arg(i_var, "running_var")
    return bool(arg(i_training, "training", False)) and any(s is not None for s in stats)


def written_values(graph: fx.Graph, aliases: "AliasMap | None" = None) -> set[fx.Node]:
    """The values of `graph` (alias roots) that something writes in place, running statistics included."""
    aliases = aliases or AliasMap(graph)
    written = {aliases.root(v) for w in mutations(graph) for v in mutated_args(w)}
    return written | {aliases.root(v) for n in graph.nodes if updates_running_stats(n) for v in n.all_input_nodes[1:]}


def mutations(graph: fx.Graph) -> list[fx.Node]:
    """The nodes of `graph` that write a graph value in place."""
    return [n for n in graph.nodes if n.op in ("call_function", "call_method", "call_module") and mutated_args(n)]


def moved_read(matched, at: fx.Node, writers: list[fx.Node] | None = None) -> str | None:
    """Why computing the nodes `matched` at `at` (before it) instead of where they are would
    change what they read, or None when it would not: no value read by a matched node from
    outside the match is written in place (through any alias) between that node and `at`.
    `writers`: the graph's `mutations`, when the caller keeps them (the Rewriter does), since
    finding them walks the whole graph."""
    graph = at.graph
    writers = mutations(graph) if writers is None else writers
    if not writers:
        return None  # the usual canonical graph: nothing to reorder
    members = set(matched)
    position = {n: i for i, n in enumerate(graph.nodes)}
    aliases = AliasMap(graph)
    written = [(position[w], w, {aliases.root(v) for v in mutated_args(w)}) for w in writers]
    where = position[at]
    for node in matched:
        lo, hi = sorted((position[node], where))
        for v in node.all_input_nodes:
            if v in members:
                continue
            base = aliases.root(v)
            for pos, w, roots in written:
                if lo < pos < hi and w not in members and base in roots:
                    return (f"{node.name} reads {v.name}, which {w.name} writes in place in between; "
                            f"computing it at {at.name} would read another value")
    return None


# ---------------------------------------------------------------- hooks

_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def hooks_of(module: nn.Module) -> list[str]:
    """Names of the kinds of hooks registered on `module` itself (empty when none)."""
    return [d.strip("_").replace("_", " ") for d in _HOOK_DICTS if getattr(module, d, None)]
