"""`.train()` / `.eval()` on an optimized model, and when one of them must be refused.

torch.export's module raises NotImplementedError for both; a graph whose exact folds removed
dropout or folded BatchNorm cannot go back to training. So every result gets a `train` that
works, and raises `ModeError` (saying why and what to do) for a mode its graph cannot follow;
the report says which modules still follow the mode and what stays fixed.
"""
from __future__ import annotations

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


def follow_mode(gm: fx.GraphModule, facts: dict):
    """Make `.train()` / `.eval()` work on `gm` (export's module raises NotImplementedError for
    both) and refuse a mode its graph cannot follow (`settle_mode` decides). The method
    goes on `gm`'s class, which GraphModule makes for each instance: a bound method in the
    instance's `__dict__`, as export puts there, makes `torch.save(gm)` recurse forever."""
    gm.__dict__.pop("train", None)
    gm.__dict__.pop("eval", None)  # nn.Module.eval calls self.train(False)
    type(gm).train = _train
    gm.meta["capture_mode"] = facts
    if facts["route"] == "torch.export":
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
