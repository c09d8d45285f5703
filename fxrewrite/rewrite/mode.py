"""`.train()` / `.eval()` on an optimized model, and when one of them must be refused.

torch.export's module raises NotImplementedError for both; a graph whose exact folds removed
dropout or folded BatchNorm cannot go back to training. So every result gets a `train` that
works, and raises `ModeError` (saying why and what to do) for a mode its graph cannot follow;
the report says which modules still follow the mode and what stays fixed.
"""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn

from .effects import updates_running_stats
from .report import Report


class ModeError(RuntimeError):
    """`.train()` or `.eval()` asked of an optimized model whose graph is fixed in the other mode."""


def _reads_training(mod: nn.Module) -> bool:
    """Whether `mod.forward` reads `self.training` (a dropout of p=0 does the same in both modes)."""
    code = getattr(type(mod).forward, "__code__", None)
    return code is not None and "training" in code.co_names and not (
        isinstance(mod, nn.modules.dropout._DropoutNd) and mod.p == 0)


def traced_mode_facts(work: nn.Module, gm: fx.GraphModule) -> dict:
    """For symbolic_trace: the traced modules whose forward reads `self.training` (read once, at
    trace time: a constant now), and the leaf modules that read it (they follow `.train()` as
    long as the canonicaliser or a pass does not turn them into ops)."""
    leaves = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    baked, live = [], []
    for name, mod in work.named_modules():
        if not _reads_training(mod):
            continue
        parts = name.split(".")
        if name in leaves:
            live.append(name)
        elif not any(".".join(parts[:i]) in leaves for i in range(1, len(parts))):
            baked.append(name or type(mod).__name__)
    return {"route": "symbolic_trace", "training": work.training, "baked": baked, "live": live}


def training_ops(gm: fx.GraphModule) -> dict:
    """Dropouts that drop and batch norms that use batch statistics in an exported graph."""
    def arg(n, i, key, default):
        return n.args[i] if len(n.args) > i else n.kwargs.get(key, default)
    calls = [n for n in gm.graph.nodes if n.op == "call_function"]
    return {"dropout": sum(1 for n in calls if "dropout" in str(n.target) and arg(n, 2, "train", True)
                           and arg(n, 1, "p", 0.5) > 0),
            "batch norm": sum(1 for n in calls if updates_running_stats(n))}


# ---------------------------------------------------------------- one graph for both modes

class FollowMode(nn.Module):
    """One op of an exported graph whose argument `key` (a position or a keyword) was
    `train_value` when torch.export traced the model in training mode and `eval_value` when it
    traced it in eval mode (a dropout's `train`, a batch norm's `training`, an attention's
    `dropout_p`): the value follows this module's `.training` instead. With `eval_value` None
    the op runs in training mode only and returns its first argument in eval mode (the
    `num_batches_tracked += 1` of a training BatchNorm)."""

    def __init__(self, op: torch._ops.OpOverload, key, train_value, eval_value=None):
        super().__init__()
        self.op_name = str(op)  # "aten.dropout.default": resolved per call, so the module pickles
        self.key, self.train_value, self.eval_value = key, train_value, eval_value

    def forward(self, *args, **kwargs):
        op = _resolve(self.op_name)
        if self.eval_value is None and self.key is None:
            return op(*args, **kwargs) if self.training else args[0]
        value = self.train_value if self.training else self.eval_value
        if isinstance(self.key, int):
            args = args[:self.key] + (value,) + args[self.key + 1:]
        else:
            kwargs = {**kwargs, self.key: value}
        return op(*args, **kwargs)

    def extra_repr(self):
        if self.key is None:
            return f"{self.op_name}, training only"
        return f"{self.op_name}, {self.key}: {self.train_value!r} (train) / {self.eval_value!r} (eval)"


def _resolve(name: str):
    namespace, op, overload = name.split(".")
    return getattr(getattr(getattr(torch.ops, namespace), op), overload)


MODE_MODULES: tuple[type, ...] = (FollowMode,)


def _positional(node: fx.Node, other: fx.Node):
    """The arguments of two calls of one target, side by side: [(key, value here, value there)];
    positional arguments one call leaves out are its schema's defaults."""
    n = max(len(node.args), len(other.args))
    here, there = _padded(node, n), _padded(other, n)
    diffs = [(i, a, b) for i, (a, b) in enumerate(zip(here, there))]
    for k in set(node.kwargs) | set(other.kwargs):
        diffs.append((k, node.kwargs.get(k, _MISSING), other.kwargs.get(k, _MISSING)))
    return diffs


def _padded(node: fx.Node, n: int) -> list:
    args = list(node.args)
    schema = getattr(node.target, "_schema", None)
    for i in range(len(args), n):
        arg = schema.arguments[i] if schema is not None and i < len(schema.arguments) else None
        args.append(arg.default_value if arg is not None and arg.has_default_value() else _MISSING)
    return args


_MISSING = object()
_MODE_ARGS = {"dropout": {2, "train"}, "feature_dropout": {2, "train"}, "alpha_dropout": {2, "train"},
              "feature_alpha_dropout": {2, "train"}, "batch_norm": {5, "training"},
              "scaled_dot_product_attention": {4, "dropout_p"}}


def _is_batch_counter(n: fx.Node) -> bool:
    """`num_batches_tracked.add_(1)`: a training BatchNorm's step counter (no eval counterpart)."""
    return (n.op == "call_function" and n.target is torch.ops.aten.add_.Tensor and isinstance(n.args[0], fx.Node)
            and n.args[0].op == "get_attr" and n.args[0].target.endswith("num_batches_tracked"))


_SAME_VALUE = {"contiguous", "clone", "alias"}  # ops a mode may add or leave out without changing a value


def _same_value(n: fx.Node) -> bool:
    return n.op == "call_function" and getattr(n.target, "_opname", None) in _SAME_VALUE and not n.kwargs.get(
        "memory_format")


def merge_modes(train_gm: fx.GraphModule, eval_gm: fx.GraphModule) -> str | None:
    """Make `train_gm` (torch.export's graph of a model in training mode) follow `.train()` /
    `.eval()`, given `eval_gm`, the same model exported in eval mode. Both graphs must be the
    same program except for the mode arguments of dropouts, batch norms and attention dropout,
    the batch norms' step counters (training only), and value-preserving copies one mode makes
    and the other does not (`contiguous`, `clone`); each mode-dependent op becomes a
    `FollowMode` call. Returns None when done, or why the graphs differ (`train_gm` untouched)."""
    tn = [n for n in train_gm.graph.nodes if not _is_batch_counter(n)]
    en = list(eval_gm.graph.nodes)
    pair: dict[fx.Node, fx.Node] = {}  # eval node -> the train node with its value
    same: dict[fx.Node, fx.Node] = {}  # train copy -> the train node it copies
    changes, i, j = [], 0, 0
    while i < len(tn) and j < len(en):
        t, e = tn[i], en[j]
        if (t.op, t.target) != (e.op, e.target) and not (t.op == e.op == "get_attr"):
            if _same_value(t):
                same[t] = _root(t.args[0], same)
                i += 1
                continue
            if _same_value(e):
                pair[e] = pair.get(e.args[0])
                j += 1
                continue
            return f"the two modes trace to different programs at {t.name} ({t.target} vs {e.target})"
        pair[e] = t
        name = getattr(t.target, "_opname", None) if t.op == "call_function" else None
        for key, a, b in _positional(t, e):
            if _has_node(a) or _has_node(b):
                if _mapped(a, lambda v: _root(v, same)) != _mapped(b, lambda v: _root(pair.get(v), same)):
                    return f"the two modes trace to different programs at {t.name}"
            elif a != b:
                if key not in _MODE_ARGS.get(name, ()):
                    return f"{t.name} ({t.target}) takes {key}={a!r} in training mode and {b!r} in eval mode"
                changes.append((t, key, a, b))
        i, j = i + 1, j + 1
    if i < len(tn) or j < len(en):
        return "the two modes trace to graphs of different lengths"
    for t, key, a, b in changes:
        _replace_with_module(train_gm, t, FollowMode(t.target, key, a, b))
    for n in [n for n in train_gm.graph.nodes if _is_batch_counter(n)]:
        _replace_with_module(train_gm, n, FollowMode(n.target, None, None))
    train_gm.recompile()
    return None


def _root(v, same):
    while v in same:
        v = same[v]
    return v


def _has_node(v) -> bool:
    if isinstance(v, (list, tuple)):
        return any(isinstance(x, fx.Node) or _has_node(x) for x in v)
    return isinstance(v, fx.Node)


def _mapped(v, f):
    """`v` with `f` applied to every node in it (nested lists and tuples)."""
    if isinstance(v, fx.Node):
        return f(v)
    if isinstance(v, (list, tuple)):
        return type(v)(_mapped(x, f) for x in v)
    return v


def _replace_with_module(gm: fx.GraphModule, node: fx.Node, module: nn.Module) -> None:
    base = f"{node.name}_follow_mode"
    name, i = base, 1
    while hasattr(gm, name):
        name, i = f"{base}_{i}", i + 1
    gm.add_module(name, module)
    with gm.graph.inserting_before(node):
        new = gm.graph.call_module(name, node.args, dict(node.kwargs))
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)


def follow_mode(gm: fx.GraphModule, facts: dict):
    """Make `.train()` / `.eval()` work on `gm` (export's module raises NotImplementedError for
    both) and refuse a mode its graph cannot follow (`settle_mode` decides). The method
    goes on `gm`'s class, which GraphModule makes for each instance: a bound method in the
    instance's `__dict__`, as export puts there, makes `torch.save(gm)` recurse forever."""
    gm.__dict__.pop("train", None)
    gm.__dict__.pop("eval", None)  # nn.Module.eval calls self.train(False)
    type(gm).train = _train
    gm.meta["capture_mode"] = facts
    if facts["route"] == "torch.export" and not facts.get("both_modes"):
        mode = "training" if facts["training"] else "eval"
        gm.meta["fixed_mode"] = (facts["training"], _fixed_message(facts, f"torch.export traced it in {mode} mode"))


def _train(self, mode: bool = True):
    """nn.Module.train, unless the graph is fixed in the other mode (then a ModeError that says why)."""
    fixed = self.meta.get("fixed_mode")
    if fixed is not None and bool(mode) != fixed[0]:
        raise ModeError(fixed[1])
    return nn.Module.train(self, mode)


def settle_mode(gm: fx.GraphModule, report: Report, folds: set[str]):
    """After the passes: whether `gm` can still change mode, said in the report. An exported graph
    is fixed in the mode export traced. A traced graph captured in eval mode is inference-only
    once one of the `folds` (exact passes that fold BatchNorm, remove dropout, merge branches)
    rewrote something; otherwise `.train()` stays allowed (fine-tuning swapped modules), and the
    note names what keeps its capture-mode behaviour whatever the mode says."""
    facts = gm.meta.pop("capture_mode", None)
    if facts is None:
        return
    mode = "training" if facts["training"] else "eval"
    other = "eval" if facts["training"] else "train"
    if facts["route"] == "torch.export" and facts.get("both_modes"):
        follow = [m for m in gm.modules() if isinstance(m, FollowMode)]
        counters = sum(m.key is None for m in follow)
        counted = f" and {counters} training-only BatchNorm step counter(s)" if counters else ""
        report.note("capture", "mode", f"captured in {mode} mode; torch.export traced both modes and they differ only "
                    f"in {len(follow) - counters} mode argument(s) (dropout, batch norm, attention dropout){counted}, "
                    f"which now follow .train()/.eval()" if follow else f"captured in {mode} mode; torch.export "
                    f"traced both modes to the same graph: .train()/.eval() change nothing in it")
        return
    if facts["route"] == "torch.export":
        ops_ = ", ".join(f"{n} {k}" for k, n in facts["ops"].items() if n)
        kept = f"; kept as training ops: {ops_}" if ops_ else ""
        report.note("capture", "mode", f"fixed in {mode} mode: torch.export traced that mode{kept}; .{other}() raises")
        return
    folded = sorted(name for name in folds if report.count(name))
    if folded and not facts["training"]:
        why = f"{', '.join(folded)} rewrote it in eval mode (BatchNorm folded, dropout removed, branches merged)"
        gm.meta["fixed_mode"] = (False, _fixed_message(facts, why))
        report.note("capture", "mode", f"fixed in eval mode: {why}; .train() raises")
        return
    modules = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    live = [n for n in facts["live"] if n in modules]
    stays = [f"{n} (became ops)" for n in facts["live"] if n not in modules]
    stays += [f"{n} (its forward reads self.training, traced once)" for n in facts["baked"]]
    if not live and not stays:
        return  # nothing depends on the mode: nothing to say
    switched = f"the modules that follow the mode: {_names(live)}" if live else "no module"
    report.note("capture", "mode", f"captured in {mode} mode; .train()/.eval() switch {switched}"
                + (f"; these keep {mode}-mode behaviour whatever the mode: {_names(stays)}" if stays else ""))


def _names(names: list[str], shown: int = 3) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def _fixed_message(facts: dict, why: str) -> str:
    if facts["training"]:
        return (f"this optimized model is fixed in training mode: {why}, so its dropout drops and its "
                f"BatchNorm uses batch statistics on every call. For inference, optimize model.eval() instead.")
    return (f"this optimized model is inference-only: {why}, so no training-mode dropout or BatchNorm "
            f"is left to switch back on. To train, train the original model, or optimize the "
            f"training-mode model (model.train()) with swap passes only and train that.")
