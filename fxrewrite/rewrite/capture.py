"""Capture a model as an FX graph: `symbolic_trace` first, `torch.export` when that fails.

The user's model is deep-copied, never mutated. The captured graph carries tensor metadata
(shape propagation on the example inputs, or export's own), which canonicalisation and the
passes read.
"""
from __future__ import annotations

import bisect
import contextlib
import dis
import inspect
import io
import logging
import sys
import traceback

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx._lazy_graph_module import _LazyGraphModule

from .clone import clone_inputs, copy_model, preserved_state
from .dynamic import dynamic_shapes, guard_sizes, report_axes, sizes_of_two
from .computed_weights import LEGACY_WEIGHT_HOOKS, computation_node, computed_tensors
from .effects import hooks_of, is_view, mutated_args, mutations
from .mode import MODE_MODULES, follow_mode, merge_modes, traced_mode_facts, training_ops
from .report import Report
from .shapes import propagate_shapes
from .values import has_values


class _Tracer(fx.Tracer):
    """symbolic_trace, keeping this library's own modules (DyT, SmeLU, ...) as single nodes.

    Two shortcuts make tracing graphs of thousands of nodes about twice as fast, with the same
    graph as a result: a Proxy, a constant or a plain tuple/list argument is turned into a graph
    argument without the Parameter/Tensor/Module checks `fx.Tracer.create_arg` makes first (`isinstance(x, nn.Parameter)` goes through a
    Python-level `__instancecheck__`), and tuple unpacking (`q, k, v = x.chunk(3)`,
    `b, c, h, w = x.shape`) disassembles each calling function once, not once per unpacking.
    """

    # Buffers are traced as graph values, as parameters are: fx's default reads them as plain
    # tensors, so a computation on them (torchvision's FrozenBatchNorm2d: w * (rv + eps).rsqrt())
    # ran once at trace time into an anonymous `_tensor_constant` that no derivation explains: not
    # replayable in float64, and a meta tensor when the model was planned on the meta device.
    proxy_buffer_attributes = True

    def __init__(self):
        super().__init__()
        self.instructions: dict = {}  # code object -> (instructions, their offsets)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        """A module with hooks stays one call too: tracing through its `forward` would drop them
        (they run only in `__call__`), which plain `symbolic_trace` does silently."""
        from .nn import LEAF_MODULES
        return isinstance(m, LEAF_MODULES + MODE_MODULES) or bool(hooks_of(m)) or super().is_leaf_module(m, qualname)

    def create_arg(self, a):
        kind = type(a)
        if kind is _Proxy:
            return a.node
        if kind in _CONSTANTS:
            return a
        if kind is tuple or kind is list:
            return kind(self.create_arg(v) for v in a)
        return super().create_arg(a)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _Proxy(node, self)

    def unpack_length(self, frame) -> int | None:
        """How many values the instruction `frame` is at unpacks, or None if it unpacks none
        (the question `fx.Proxy.__iter__` asks, answered from a per-code-object cache)."""
        code = frame.f_code
        cached = self.instructions.get(code)
        if cached is None:
            instructions = list(dis.get_instructions(code))
            cached = self.instructions[code] = (instructions, [i.offset for i in instructions])
        instructions, offsets = cached
        inst = instructions[bisect.bisect_left(offsets, frame.f_lasti)]
        return inst.argval if inst.opname == "UNPACK_SEQUENCE" else None


_CONSTANTS = frozenset({int, float, bool, str, type(None)})


class _Unpacking:
    """`a, b = proxy` as `fx.Proxy.__iter__` traces it (one getitem per value)."""

    def __iter__(self):
        n = self.tracer.unpack_length(sys._getframe(1))
        if n is None:
            return self.tracer.iter(self)
        return (self[i] for i in range(n))


class _Proxy(_Unpacking, fx.Proxy):
    def __getattr__(self, name):
        return _Attribute(self, name)


class _Attribute(_Unpacking, fx.proxy.Attribute):
    pass


class CaptureError(RuntimeError):
    """Neither symbolic_trace nor torch.export could capture the model."""


class InputError(ValueError):
    """The model itself fails on the example inputs (wrong dtype, shape, ...)."""


def as_args(example_inputs) -> tuple[tuple, dict]:
    """Normalise example inputs: a tensor, a tuple/list of positionals, or a dict of keywords."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise TypeError(f"example_inputs must be a tensor, a tuple of inputs or a dict of keyword inputs, "
                    f"not {type(example_inputs).__name__}")


def _first_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}"


def _user_frame(e: BaseException) -> str:
    """The innermost frame of the failure that is not inside torch: where the model's code broke."""
    frames = [f for f in traceback.extract_tb(e.__traceback__) if "/torch/" not in f.filename]
    if not frames:
        return ""
    f = frames[-1]
    return f" at {f.filename.rsplit('/', 1)[-1]}:{f.lineno} ({f.line})"


def disable_cache(model: nn.Module, report: Report):
    """transformers models return a DynamicCache by default, which export refuses."""
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "use_cache", False):
        config.use_cache = False
        report.note("capture", "model", "config.use_cache set to False on the copy (a KV cache cannot be exported)")


def _check_arity(model: nn.Module, args, kwargs):
    """Example inputs that `forward` does not take are an error, not something to drop silently
    (a trace reads only as many inputs as `forward` has)."""
    try:
        signature = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return  # a forward without a readable signature: let the capture decide
    try:
        signature.bind(*args, **kwargs)
    except TypeError as e:
        raise InputError(f"{type(model).__name__}.forward{signature} does not take the example inputs "
                         f"({len(args)} positional, keywords {sorted(kwargs)}): {e}") from None


def _check_model_runs(model: nn.Module, args, kwargs):
    """Tell a model that cannot run on its inputs apart from one that cannot be captured."""
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            copy_model(model)(*clone_inputs(args), **clone_inputs(kwargs))
    except Exception as e:
        dtypes = sorted({str(a.dtype).replace("torch.", "") for a in list(args) + list(kwargs.values())
                         if isinstance(a, torch.Tensor)})
        raise InputError(f"{type(model).__name__} fails on the example inputs (dtypes {dtypes}): "
                         f"{_first_line(e)}") from e


def graph_module(root: nn.Module, graph: fx.Graph, name: str) -> fx.GraphModule:
    """A GraphModule whose Python code is generated on first use rather than now: the pipeline
    rewrites the graph and generates the code once, at the end (`recompile`). Generating it for
    the captured graph too cost a quarter of a second at 5k nodes. torch's own lazy GraphModule
    (what Inductor uses for the same reason) is a GraphModule in every other respect."""
    return _LazyGraphModule(root, graph, name)


def recompile(gm: fx.GraphModule) -> None:
    """Generate `gm`'s code now, lazy GraphModule or not."""
    gm.recompile()
    if isinstance(gm, _LazyGraphModule):
        gm.real_recompile()


def _keep_root_hooks(root: nn.Module, gm: fx.GraphModule, report: Report):
    """`symbolic_trace` traces the root's `forward`, not its `__call__`, so hooks registered on
    the model itself would be lost: they move to the GraphModule, which runs them the same way
    (the `module` they receive is then the GraphModule)."""
    inlined = _inline_root_weight_hooks(root, gm, report)
    moved = []
    for name in ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                 "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks"):
        hooks = {k: h for k, h in getattr(root, name, {}).items() if h not in inlined}
        if hooks:
            getattr(gm, name).update(hooks)
            moved.append(name.strip("_").replace("_", " "))
    if moved:
        report.note("capture", "model", f"the model's own hooks are kept on the result ({', '.join(moved)})")


def _inline_root_weight_hooks(root: nn.Module, gm: fx.GraphModule, report: Report) -> list:
    """The root's own hook-based weight_norm / spectral_norm: its traced forward read the weight
    the hook last computed, as a plain tensor. That read becomes the computation of the weight
    from its sources (`computed_weights`), which move onto the GraphModule, so the hook is no
    longer needed there (it would look for sources under names the result does not have)."""
    computed = computed_tensors(root)
    hooks = [h for h in root._forward_pre_hooks.values() if isinstance(h, LEGACY_WEIGHT_HOOKS)]
    if isinstance(computed, str) or not hooks:
        return []
    for hook in hooks:
        how = computed[hook.name]
        for source in how.sources:
            setattr(gm, source, getattr(root, source))
        for node in [n for n in gm.graph.nodes if n.op == "get_attr" and n.target == hook.name]:
            with gm.graph.inserting_before(node):
                value = computation_node(gm.graph, "", how)
            node.replace_all_uses_with(value)
            gm.graph.erase_node(node)
        delattr(gm, hook.name)
    report.note("capture", "model", f"the model's own {', '.join(type(h).__name__ for h in hooks)} hook: "
                "its weight is computed in the graph")
    return hooks


def capture(model: nn.Module, example_inputs, report: Report, dynamic=None, follow_modes: bool = False) -> fx.GraphModule:
    """A GraphModule equivalent to `model` on inputs like `example_inputs` (model untouched).
    `dynamic`: which input axes a torch.export capture keeps dynamic (`dynamic_shapes`); a
    symbolic_trace graph is shape-generic whatever it says. `follow_modes`: a torch.export
    capture also traces the other mode and, if the two differ only in mode arguments (dropout,
    batch norm, attention dropout), returns one graph whose ops follow `.train()` / `.eval()`
    (`mode.merge_modes`); otherwise, and by default, the graph is fixed in the traced mode."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"optimize expects an nn.Module, got {type(model).__name__}")
    args, kwargs = as_args(example_inputs)
    _check_arity(model, args, kwargs)
    spec = dynamic_shapes(args, kwargs, dynamic)  # a mistake in `dynamic` fails before any tracing
    failures = []
    if not kwargs:
        gm = _trace(model, args, report, failures)
        if gm is not None:
            return gm
    work = copy_model(model)
    disable_cache(work, report)
    gm, (t_args, t_kwargs, spec), static_why = _export(model, work, args, kwargs, spec, report, failures)
    ones = size_one_paths(gm, work, args, kwargs) if spec is not None else {}
    both = follow_modes and _both_modes(work, model.training, gm, (t_args, t_kwargs, spec), report)
    if both:
        gm = both
    gm.training = model.training
    report.note("capture", "model", f"torch.export: {len(gm.graph.nodes)} nodes"
                + (f" ({failures[0]})" if failures else ""))
    report_axes(gm, model, t_args, t_kwargs, spec, report, static_why)
    if ones:
        # export assumes a dynamic size is never 1 and drops guards like `seq != 1`, and its module
        # does not check input sizes: an axis whose size 1 takes another path in the model gets an
        # explicit check, so a call at size 1 is refused instead of silently computing the rest
        where = [(name, ax) for axes in ones.values() for name, ax in axes]
        guard_sizes(gm, where, "size 1 takes another path in the model")
        report.note("capture", "shapes", "at size 1 the model takes another path than the traced graph on "
                    + "; ".join(f"{', '.join(f'{k} axis {ax}' for k, ax in axes)} ({ones.why[sym]})"
                                for sym, axes in ones.items())
                    + " (checked at capture on the example narrowed to 1): the graph serves sizes >= 2 there "
                    "and refuses size 1 with an error")
    gm.meta["example_inputs"] = clone_inputs((args, kwargs))  # for passes that measure
    follow_mode(gm, {"route": "torch.export", "training": model.training, "ops": training_ops(gm),
                     "both_modes": bool(both)})
    return gm


def _export(model, work, args, kwargs, spec, report: Report, failures: list):
    """torch.export of `work` (a copy of `model`): (its module, the (args, kwargs, dynamic spec)
    it was traced with, why it has no dynamic axis if so). A dynamic axis of size 1 is traced at
    size 2 (`sizes_of_two`) and checked at size 1; raises CaptureError when export fails."""
    traced = sizes_of_two(work, args, kwargs, spec) if spec else None
    if traced is not None:
        report.note("capture", "shapes", f"traced at size 2 on {traced[2]} (the example's size 1 repeated): "
                    "export would fix a size of 1")
    t_args, t_kwargs = traced[:2] if traced else (args, kwargs)
    try:
        with _quiet_export():
            ep = torch.export.export(work, t_args, t_kwargs, strict=False, dynamic_shapes=spec)
    except Exception as e:
        _check_model_runs(model, args, kwargs)
        failures.append(f"torch.export failed: {_first_line(e)}{_user_frame(e)}")
        raise CaptureError(f"could not capture {type(model).__name__}:\n  " + "\n  ".join(failures)) from None
    gm = ep.module()
    static_why = None if spec is not None else "not asked for: dynamic=False"
    if traced is not None and (why := _wrong_at(gm, work, args, kwargs)):
        # the size-2 trace rejects the user's own size of 1 (a guard `batch != 1`), or computes
        # something else there (code that branches on `batch == 1`, which export's size-1
        # assumptions let through unguarded): export at that size, every axis static, rather than
        # hand back a graph that cannot run it or silently differs on it
        report.note("capture", "shapes", f"the size-2 trace {why} at the example's size 1 ({traced[2]}): "
                    "exported at the example's sizes, static, instead")
        t_args, t_kwargs, spec = args, kwargs, None
        static_why = "the size-2 trace differs at size 1, see above"
        with _quiet_export():
            gm = torch.export.export(work, t_args, t_kwargs, strict=False).module()
    return gm, (t_args, t_kwargs, spec), static_why


def _wrong_at(gm: fx.GraphModule, work: nn.Module, args, kwargs) -> str | None:
    """How the exported `gm` fails inputs that `work` (the model) runs: it raises, or its outputs
    differ from the model's (both runs from one RNG state, state left as it was); None when it
    computes what the model computes, or when the model itself fails on them."""
    from .verify import flatten_outputs  # verify imports this module
    try:  # each run on its own copy of the inputs: a model may write into its inputs
        a, k = clone_inputs((args, kwargs))
        with torch.no_grad(), preserved_state(work), torch.random.fork_rng():
            torch.manual_seed(0)
            want = flatten_outputs(work(*a, **k))
    except Exception:
        return None
    try:
        a, k = clone_inputs((args, kwargs))
        with torch.no_grad(), preserved_state(gm), torch.random.fork_rng():
            torch.manual_seed(0)
            got = flatten_outputs(gm(*a, **k))
    except Exception as e:
        return f"fails ({_first_line(e)})"
    for name, w in want.items():
        g = got.get(name)
        if g is not None and g.shape == w.shape and not has_values(g, w):  # meta: shapes are all there is
            continue
        if g is None or g.shape != w.shape or (w.is_floating_point() and not torch.allclose(
                g, w, rtol=1e-4, atol=1e-5, equal_nan=True)) or (not w.is_floating_point() and not torch.equal(g, w)):
            return f"computes another {name}"
    return None


class _SizeOnePaths(dict):
    """{symbol: [(input name, axis), ...]} of the dynamic axes whose size 1 misbehaves, with
    `why[symbol]`: how the graph failed there."""

    def __init__(self):
        super().__init__()
        self.why: dict[str, str] = {}


def size_one_paths(gm: fx.GraphModule, work: nn.Module, args, kwargs) -> _SizeOnePaths:
    """The dynamic axes of the exported `gm` (grouped by their size symbol) at whose size 1 the
    graph and the model disagree: for each symbol whose example size is not 1, every input axis
    carrying it is narrowed to 1 and both are run (`_wrong_at`)."""
    try:
        named = inspect.signature(work.forward).bind(*args, **kwargs).arguments
    except (TypeError, ValueError):
        named = dict(kwargs)
    axes: dict[str, list] = {}
    for node in gm.graph.find_nodes(op="placeholder"):
        val, example = node.meta.get("val"), named.get(node.target)
        if not isinstance(val, torch.Tensor) or not isinstance(example, torch.Tensor) or val.dim() != example.dim():
            continue
        for ax, size in enumerate(val.shape):
            if isinstance(size, torch.SymInt) and size.node.maybe_as_int() is None and example.shape[ax] != 1:
                axes.setdefault(str(size), []).append((node.target, ax))
    found = _SizeOnePaths()
    for sym, where in axes.items():
        probe = dict(named)
        for name, ax in where:
            probe[name] = probe[name].narrow(ax, 0, 1)
        p_args = tuple(probe[k] for k in list(named)[:len(args)])
        p_kwargs = {k: probe[k] for k in list(named)[len(args):]}
        why = _wrong_at(gm, work, p_args, p_kwargs)
        if why:
            found[sym], found.why[sym] = where, why
    return found


def _both_modes(work: nn.Module, training: bool, gm: fx.GraphModule, traced, report: Report):
    """The training-mode graph made to follow the mode (`mode.merge_modes`), from `gm` (traced in
    mode `training`) and a second export of `work` in the other mode; None, with the reason in
    the report, when the second export fails or the two programs differ beyond mode arguments."""
    t_args, t_kwargs, spec = traced
    work.train(not training)
    try:
        with _quiet_export():
            other = torch.export.export(work, t_args, t_kwargs, strict=False, dynamic_shapes=spec).module()
    except Exception as e:
        report.note("capture", "mode", f"the {'eval' if training else 'training'}-mode export failed "
                    f"({_first_line(e)}): the graph stays fixed in the traced mode")
        return None
    finally:
        work.train(training)
    train_gm, eval_gm = (gm, other) if training else (other, gm)
    why = merge_modes(train_gm, eval_gm)
    if why is not None:
        report.note("capture", "mode", f"not made to follow .train()/.eval(): {why}")
        return None
    for m in train_gm.modules():  # the new FollowMode modules start in the model's mode
        m.training = training
    return train_gm


QUIET_EXPORT = True  # the CLI's --verbose sets it False: torch's own output then goes through


@contextlib.contextmanager
def _quiet_export():
    """Keep what torch.export prints on failure out of the user's way: on a data-dependent guard
    it prints the whole partial graph to stderr, and logs a warning, while the reason that
    matters is in our CaptureError (or the partial-capture report). On success what it wrote
    goes through."""
    if not QUIET_EXPORT:
        yield
        return
    log = logging.getLogger("torch.fx.experimental.symbolic_shapes")
    level, buffer = log.level, io.StringIO()
    log.setLevel(max(level, logging.ERROR))
    try:
        with contextlib.redirect_stderr(buffer):
            yield
        sys.stderr.write(buffer.getvalue())
    finally:
        log.setLevel(level)


def _versions(model: nn.Module) -> dict[str, int | None]:
    """Each parameter's and buffer's version counter (it counts in-place writes); None for one
    that tracing replaced by a traced value (`self.buf += 1` assigns the Proxy)."""
    tensors = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    return {name: t._version if isinstance(t, torch.Tensor) else None for name, t in tensors}


def _written_attributes(graph: fx.Graph) -> list[str]:
    """The attributes (buffers, parameters) that `graph` writes in place, directly or through a
    view of them."""
    written = set()
    for writer in mutations(graph):
        for v in mutated_args(writer):
            while v.op != "get_attr" and is_view(v) and v.args and isinstance(v.args[0], fx.Node):
                v = v.args[0]
            if v.op == "get_attr":
                written.add(v.target)
    return sorted(written)


def _trace(model: nn.Module, args, report: Report, failures: list) -> fx.GraphModule | None:
    """The symbolic_trace capture, or None (with the reason in `failures`) when it fails."""
    work = copy_model(model)
    versions = _versions(work)
    try:
        gm = graph_module(work, _Tracer().trace(work), type(work).__name__)
    except Exception as e:  # untraceable Python (control flow on values, HF models, ...)
        failures.append(f"symbolic_trace failed: {_first_line(e)}{_user_frame(e)}")
        return None
    written = [name for name, version in _versions(work).items() if versions.get(name) != version]
    if written:  # a write fx did not trace (a tensor reached other than as an attribute): it ran once, and is gone
        failures.append(f"symbolic_trace wrote {', '.join(written[:3])} while tracing (a write the graph would "
                        "neither make nor see)")
        return None
    written = _written_attributes(gm.graph)
    if written:  # the passes take a graph's attributes for constants; torch.export tracks such state
        failures.append(f"symbolic_trace graph writes {', '.join(written[:3])} in place (state the model "
                        "updates as it runs)")
        return None
    gm.training = model.training
    _keep_root_hooks(work, gm, report)
    try:
        with preserved_state(gm):
            propagate_shapes(gm, *clone_inputs(args))
    except Exception as e:
        _check_model_runs(model, args, {})
        failures.append(f"symbolic_trace graph failed on the inputs: {_first_line(e)}")
        return None
    report.note("capture", "model", f"symbolic_trace: {len(gm.graph.nodes)} nodes, shape-generic (no input axis "
                "is specialised; `dynamic=` only steers torch.export)")
    gm.meta["example_inputs"] = clone_inputs((args, {}))  # for passes that measure
    follow_mode(gm, traced_mode_facts(work, gm))
    return gm
