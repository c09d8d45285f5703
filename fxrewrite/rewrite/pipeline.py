"""The pipeline every front door runs on a captured graph: canonicalise, apply the passes in
order through the one driver, drop the tensors no node reads any more (and say where each
went), recompile once. `optimize` and the torch.compile backend build their list of passes
the same way (`fxrewrite.api.build_pipeline`) and hand it here."""
from __future__ import annotations

import torch.fx as fx
import torch.nn as nn

from .canonicalize import canonicalize
from .attrs import fetch_attr
from .capture import recompile
from .passmanager import Pass, run_pass
from .report import Report
from .rewriter import Derivation


def run_pipeline(gm: fx.GraphModule, steps: list[Pass], report: Report) -> list[Derivation]:
    """Canonicalise `gm` in place, run `steps`, drop unused tensors, recompile once. Returns
    the derivations of every weight the passes computed."""
    with report.timed("canonicalize"):
        canonicalize(gm, report)
    derivations: list[Derivation] = []
    before = _tensor_names(gm)
    for p in steps:
        with report.timed(p.name):
            run_pass(gm, p, report, derivations)
    with report.timed("finish"):
        gm.meta.pop("in_place_writes", None)  # the passes' bookkeeping (`Rewriter.moved_read`)
        _drop_unused_tensors(gm, report, before, derivations)
        gm.graph.lint()
    with report.timed("recompile"):
        recompile(gm)
    return derivations


def _tensor_names(gm: nn.Module) -> set[str]:
    return {n for n, _ in gm.named_parameters(remove_duplicate=False)} | {n for n, _ in gm.named_buffers(
        remove_duplicate=False)}


def _drop_unused_tensors(gm: fx.GraphModule, report: Report, before: set[str], derivations: list[Derivation]):
    """Delete parameters/buffers no node reads any more, and say where each went."""
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and not node.users:
            gm.graph.erase_node(node)
            used.discard(node.target)
    used_modules = {n.target for n in gm.graph.nodes if n.op == "call_module"} | {
        t for t in used if isinstance(fetch_attr(gm, t), nn.Module)}  # a parametrization read whole

    def needed(name: str) -> bool:
        return name in used or any(name.startswith(m + ".") for m in used_modules)

    absorbed: dict[str, list[str]] = {}
    for d in derivations:
        for src in d.sources:
            if isinstance(src, str):
                absorbed.setdefault(src, []).append(d.target)
    # intermediates a pass derived and a later pass absorbed (BN-folded weights merged into one
    # conv): ours, not the user's, so they go without a record of their own
    for d in derivations:
        if d.target not in before and not needed(d.target) and hasattr(gm, d.target):
            delattr(gm, d.target)
    gone: dict[str, list[str]] = {}  # owner module -> attributes removed
    for name in sorted(before):
        if needed(name):
            continue
        owner, _, attr = name.rpartition(".")
        mod = gm.get_submodule(owner) if owner else gm
        if attr in mod._parameters:
            del mod._parameters[attr]
        elif attr in mod._buffers:
            del mod._buffers[attr]
        gone.setdefault(owner, []).append(attr)
    for owner, attrs in gone.items():
        into = sorted({t for a in attrs for t in absorbed.get(f"{owner}.{a}" if owner else a, [])})
        where = f"absorbed into {', '.join(into)}" if into else "no longer read by the graph"
        report.removed("cleanup", owner or "<root>", f"{', '.join(attrs)}: {where}")
    _delete_unused_submodules(gm, used_modules)


def _delete_unused_submodules(gm: fx.GraphModule, used_modules: set[str]):
    """`GraphModule.delete_all_unused_submodules`, except that a module read by `get_attr` (a
    parametrization, `computed_weights`) keeps its children, as a called one does."""
    targets = {n.target for n in gm.graph.nodes if n.op in ("call_module", "get_attr")}
    keep = {".".join(t.split(".")[:i]) for t in targets for i in range(1, t.count(".") + 2)}
    keep |= {f"{m}.{child}" for m in used_modules for child, _ in gm.get_submodule(m).named_modules() if child}
    for name, _ in reversed(list(gm.named_modules())):
        if name and name not in keep:
            gm.delete_submodule(name)
