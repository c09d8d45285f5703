"""`torch.compile(model, backend="rewrite")`: this library's passes inside torch.compile.

Dynamo hands a backend an FX graph whose parameters and buffers are *graph inputs*
(placeholders such as `L_self_modules_conv1_parameters_weight_`, with the real tensors among
`example_inputs`) and whose calls are functional (`torch.conv2d`, `F.batch_norm`,
`operator.iadd`). A BN-folding pass needs the weights as constants, so for inference graphs
this backend does what Inductor's freezing does: on a *copy* of the graph, each parameter /
buffer placeholder becomes a `get_attr` constant holding that tensor. Then the same pipeline
as `optimize` runs (`rewrite.api.run_pipeline`: canonicalise, passes, optional Triton lowering,
drop unused tensors), and the result goes to the final compiler (Inductor by default).

When it freezes, and when it does not (the graph then passes through unchanged):
  * grad enabled and some input requires grad: a training graph; folding would detach the
    weights from autograd, so nothing is rewritten;
  * a batch norm in training mode: it updates its running statistics, nothing is folded;
  * a parameter/buffer the graph mutates in place is never frozen.

If the pipeline raises on a graph, that graph is compiled unchanged, with a warning: an
optimisation bug must not stop the user's model from compiling.

Frozen weights are assumed not to change (Inductor's freezing assumes the same). A cheap guard
checks it on every call: if any frozen tensor was replaced or modified in place since compile
time (its `_version` moved: `optimizer.step()`, `load_state_dict`), the call runs Dynamo's
original graph eagerly instead, with a warning, so results are never stale.

Options, through `torch.compile(model, backend="rewrite", options={...})`:
    passes    pass names / presets / Pass objects (default `passes.DEFAULT`, exact passes)
    lower     None or "triton" (generated Triton kernels for fused regions, `codegen`)
    compiler  "inductor" (default), "eager", or a callable `(gm, example_inputs) -> callable`
    verbose   print each graph's report table to stderr
The report of every compiled graph is kept in `REPORTS` (most recent last; `last_report()`).

Registered with Dynamo through the `torch_dynamo_backends` entry point (no import needed) and,
when that entry point is not installed, on import of this module.
"""
from __future__ import annotations

import re
import sys
import warnings
from typing import Callable

import torch
import torch.fx as fx
import torch.nn.functional as F

from .capture import graph_module
from .effects import AliasMap, mutated_args, mutations
from .report import Report
from .shapes import tensor_metadata

OPTIONS = ("passes", "lower", "compiler", "verbose")
REPORTS: list[Report] = []
_MAX_REPORTS = 64


def last_report() -> Report | None:
    """The report of the most recently compiled graph (None before any)."""
    return REPORTS[-1] if REPORTS else None


def rewrite_backend(gm: fx.GraphModule, example_inputs, **kwargs) -> Callable:
    """A Dynamo backend: freeze weights (inference only), run the rewrite pipeline, compile."""
    options = dict(kwargs.pop("options", None) or {})
    mode = kwargs.pop("mode", None)
    if kwargs:
        raise TypeError(f"rewrite backend: unexpected arguments {sorted(kwargs)}")
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"rewrite backend: unknown option(s) {unknown}; known: {list(OPTIONS)}")
    compiler = _final_compiler(options.get("compiler", "inductor"), mode)

    import passes as catalogue
    from .api import run_pipeline

    selected = catalogue.resolve(catalogue.DEFAULT if options.get("passes") is None else options["passes"])
    report = Report()
    _remember(report)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    reason = _why_not_freeze(gm, placeholders, example_inputs)
    if reason is not None:
        report.note("backend", "graph", f"passed through unchanged: {reason}")
        _print(options, report)
        return compiler(gm, list(example_inputs))

    work, frozen = freeze_parameters(gm, placeholders, example_inputs, report)
    try:
        run_pipeline(work, selected, report, lower=options.get("lower"))
    except Exception as e:  # an optimisation bug must not break the user's compile: run Dynamo's graph
        detail = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        report.note("backend", "graph", f"passed through unchanged: the pipeline failed ({detail})")
        warnings.warn(f"rewrite backend: the rewrite pipeline failed on a graph ({detail}); compiling it unchanged")
        _print(options, report)
        return compiler(gm, list(example_inputs))
    _print(options, report)
    kept = [x for i, x in enumerate(example_inputs) if i not in frozen]
    compiled = compiler(work, kept)
    return _Guarded(compiled, frozen, {i: example_inputs[i] for i in frozen}, gm)


# ---------------------------------------------------------------- freezing

_MUTATING_BN = (F.batch_norm, torch.batch_norm, torch.ops.aten.batch_norm.default)


def _is_param_or_buffer(node: fx.Node) -> bool:
    """A placeholder Dynamo created for a module parameter or buffer (not a user input)."""
    grapharg = node.meta.get("grapharg")
    source = getattr(grapharg, "source", None)
    name = source.name if source is not None else ""
    name = name() if callable(name) else name
    return "_parameters" in name or "_buffers" in name


def _bn_training(node: fx.Node) -> bool:
    if node.op != "call_function" or node.target not in _MUTATING_BN:
        return False
    training = node.kwargs.get("training", node.args[5] if len(node.args) > 5 else False)
    return bool(training)


def _written(graph: fx.Graph) -> Callable[[fx.Node], bool]:
    """Whether the graph writes a placeholder in place, directly or through a view
    (`rewrite.effects`), or updates it as a training-mode batch norm's running statistics."""
    aliases = AliasMap(graph)
    roots = {aliases.root(v) for w in mutations(graph) for v in mutated_args(w)}
    stats = {v for n in graph.nodes if _bn_training(n) for v in n.all_input_nodes}
    return lambda node: aliases.root(node) in roots or node in stats


def _why_not_freeze(gm: fx.GraphModule, placeholders, example_inputs) -> str | None:
    if len(placeholders) != len(example_inputs):
        return f"{len(placeholders)} graph inputs but {len(example_inputs)} example inputs"
    if torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in example_inputs):
        return "grad is enabled and inputs require grad (a training graph): weights are not constants"
    for node in gm.graph.nodes:
        if _bn_training(node):
            return f"{node.name} is a batch norm in training mode (it updates its running statistics)"
    if not any(_is_param_or_buffer(p) for p in placeholders):
        return "no parameter or buffer among the graph inputs"
    return None


def _attr_name(placeholder: str, taken: set[str]) -> str:
    """`l_self_modules_layer1_modules_0_parameters_weight_` -> `layer1_0_weight` (for reports)."""
    name = re.sub(r"^l_(self|fn|mod|model)_", "", placeholder.lower())
    name = re.sub(r"(modules|parameters|buffers)_", "", name).strip("_") or "w"
    base, i = name, 1
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    taken.add(name)
    return name


def _export_style_meta(node: fx.Node):
    """Dynamo's fake value is `example_value`; the passes (and the Rewriter, which carries
    metadata over to replacement nodes) read export's `val` and `symbolic_trace` + ShapeProp's
    `tensor_meta`, so give the node both. The shape may hold SymInts (dynamic batch);
    nothing here asks a symbolic question (no contiguity check), so no shape guard is added."""
    val = node.meta.get("example_value") if node.meta.get("val") is None else node.meta["val"]
    if val is None:
        return
    node.meta["val"] = val
    if isinstance(val, torch.Tensor) and "tensor_meta" not in node.meta:
        node.meta["tensor_meta"] = tensor_metadata(val)


def freeze_parameters(gm: fx.GraphModule, placeholders, example_inputs, report: Report):
    """A copy of `gm` where each parameter/buffer placeholder not mutated by the graph is a
    `get_attr` buffer holding the real tensor (detached: same storage, no autograd). Returns
    (copy, indices of the frozen inputs). `gm` itself is left as it was."""
    graph = fx.Graph()
    remap: dict[fx.Node, fx.Node] = {}
    graph.output(graph.graph_copy(gm.graph, remap))
    for node in graph.nodes:
        _export_style_meta(node)
    work = graph_module(gm, graph, "RewriteFrozen")  # its code is generated once, after the passes
    frozen: list[int] = []
    taken = set(dict(work.named_children())) | {n for n, _ in work.named_buffers()} | {
        n for n, _ in work.named_parameters()}
    first = next((n for n in graph.nodes if n.op != "placeholder"), None)
    written = _written(gm.graph)
    for i, old in enumerate(placeholders):
        value = example_inputs[i]
        if not (isinstance(value, torch.Tensor) and _is_param_or_buffer(old)) or written(old):
            continue
        node = remap[old]
        name = _attr_name(node.name, taken)
        work.register_buffer(name, value.detach())
        with graph.inserting_before(first):
            attr = graph.get_attr(name)
        attr.meta.update(node.meta)
        node.replace_all_uses_with(attr)
        graph.erase_node(node)
        frozen.append(i)
    report.note("backend", "graph", f"froze {len(frozen)} of {len(placeholders)} graph inputs "
                                    f"(parameters/buffers) as constants")
    graph.lint()
    work.recompile()
    return work, set(frozen)


class _Guarded:
    """Calls the compiled graph with the frozen inputs removed, after checking they are still
    the tensors (same object, same in-place version) that were frozen. Dynamo calls a backend's
    result with positional inputs, and so does this (Inductor's result takes them that way
    too, whatever its copied `_boxed_call` attribute says)."""

    def __init__(self, compiled, frozen: set[int], tensors: dict, original: fx.GraphModule):
        self.compiled = compiled
        self.frozen = frozen
        self.keys = [(i, t, t._version) for i, t in tensors.items()]
        self.original = original
        self.stale = False

    def __call__(self, *args):
        if not self.stale:
            for i, t, version in self.keys:
                a = args[i]
                if a is not t or a._version != version:
                    self.stale = True
                    warnings.warn("rewrite backend: a frozen weight changed after compilation; running the "
                                  "unoptimised graph from now on (call torch._dynamo.reset() to re-fold)")
                    break
            else:
                return self.compiled(*[a for j, a in enumerate(args) if j not in self.frozen])
        return self.original(*args)


# ---------------------------------------------------------------- final compilers

def _final_compiler(choice, mode):
    if callable(choice):
        return choice
    if choice == "eager":
        return lambda gm, inputs: gm.forward
    if choice == "inductor":
        def inductor(gm, inputs):
            from torch._inductor.compile_fx import compile_fx
            patches = torch._inductor.list_mode_options(mode) if mode else None
            return compile_fx(gm, inputs, config_patches=patches) if patches else compile_fx(gm, inputs)
        return inductor
    raise ValueError(f"rewrite backend: compiler must be 'inductor', 'eager' or a callable, not {choice!r}")


def _remember(report: Report):
    REPORTS.append(report)
    del REPORTS[:-_MAX_REPORTS]


def _print(options, report: Report):
    if options.get("verbose"):
        print(report.table(), file=sys.stderr)


def _register():
    """Register on import unless the installed entry point already provides the name (loading
    it would then register a second time, which Dynamo refuses)."""
    from importlib.metadata import entry_points

    from torch._dynamo.backends import registry
    if "rewrite" in registry._COMPILER_FNS:
        return
    if any(ep.name == "rewrite" for ep in entry_points(group="torch_dynamo_backends")):
        return  # lookup_backend("rewrite") loads it from there
    registry.register_backend(rewrite_backend, name="rewrite")


_register()
