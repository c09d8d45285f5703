"""Which input axes a torch.export capture keeps dynamic, and what the report says of them.

A language model is called at other batch sizes and sequence lengths than the example it was
captured with, so by default the batch axis of every input and the sequence axis of integer
inputs (token ids, masks, positions) stay symbolic. `optimize(..., dynamic=...)` overrides it.
export may still specialise an axis (sizes 0 and 1 always; others when the model needs a fixed
size): the report then names the axis and the reason, read from the exported placeholders.
A symbolic_trace graph is shape-generic, so none of this applies to it.
"""
from __future__ import annotations

import inspect

import torch
import torch.fx as fx
import torch.nn as nn

from .clone import preserved_state
from .effects import declare_pure
from .report import Report


@declare_pure
def require_size(x: torch.Tensor, axis: int, low: int, what: str) -> torch.Tensor:
    """`x`, after checking that its `axis` has at least `low` elements (`torch._check`: a clear
    RuntimeError in eager, a runtime assertion when the graph is traced again). Guards an axis
    whose small sizes take another path in the model than the traced graph (`guard_sizes`)."""
    torch._check(x.shape[axis] >= low, lambda: f"{what}: this optimized graph was traced for sizes >= {low} of "
                 f"axis {axis}, and got {x.shape[axis]}; at that size the model takes another path (see the report)")
    return x


def guard_sizes(gm: fx.GraphModule, where: list, why: str) -> None:
    """Route every reader of the placeholders in `where` ([(placeholder name, axis)]) through
    `require_size(x, axis, 2, ...)`: torch.export's module does not check its inputs' size ranges,
    and assumes a dynamic size is never 1."""
    placeholders = {n.target: n for n in gm.graph.find_nodes(op="placeholder")}
    for name, axis in where:
        ph = placeholders.get(name)
        if ph is None:
            continue
        users = list(ph.users)
        with gm.graph.inserting_after(ph):
            check = gm.graph.call_function(require_size, (ph, axis, 2, f"input {name} ({why})"))
        check.meta = dict(ph.meta)
        for u in users:
            u.replace_input_with(ph, check)
    gm.recompile()


def dynamic_shapes(args, kwargs, dynamic=None):
    """export's `dynamic_shapes` for the example inputs, one spec per input.

    `dynamic=None`: the batch axis of every tensor, and the sequence axis (1) of every integer
    tensor of rank >= 2 too (token ids, masks, positions: what changes between calls of a
    language model). `True`: every axis. `False`: none. A dict names inputs (keyword names, or
    positions for positional inputs): `{axis: "name"}` makes those axes dynamic with one shared
    symbol per name (export fails, saying why, if the model needs a fixed size), a list of axes
    makes them dynamic where export can keep them; inputs not named are static. Dim.AUTO (not a
    named Dim) by default, because export then specialises what it must instead of failing."""
    if dynamic is False:
        return None
    if not (dynamic is None or dynamic is True or isinstance(dynamic, dict)):
        raise TypeError(f"dynamic must be None, True, False or a dict of inputs, not {type(dynamic).__name__}")
    inputs = dict(enumerate(args)) | kwargs  # as_args gives positionals or keywords, never both
    specs = _declared_specs(inputs, dynamic) if isinstance(dynamic, dict) else \
        {k: _default_spec(a, dynamic) for k, a in inputs.items()}
    return {k: specs[k] for k in kwargs} if kwargs else tuple(specs[i] for i in range(len(args)))


def _default_spec(a, dynamic):
    if isinstance(a, (list, tuple)):  # export wants the inputs' structure: a spec per element
        return type(a)(_default_spec(e, dynamic) for e in a)
    if isinstance(a, dict):
        return {k: _default_spec(e, dynamic) for k, e in a.items()}
    if not isinstance(a, torch.Tensor) or a.dim() == 0:
        return None
    n = a.dim() if dynamic is True else 2 if is_token_tensor(a) else 1
    return {i: torch.export.Dim.AUTO for i in range(n)}


def is_token_tensor(t: torch.Tensor) -> bool:
    """Integer or boolean, rank >= 2: token ids, masks, positions, whose axis 1 is the sequence."""
    return t.dim() >= 2 and not (t.is_floating_point() or t.is_complex())


def _declared_specs(inputs: dict, dynamic: dict) -> dict:
    """`dynamic={input: {axis: name} | [axes]}` as export specs; a mistake is a ValueError now,
    not an export failure later."""
    unknown = [k for k in dynamic if k not in inputs]
    if unknown:
        raise ValueError(f"dynamic= names inputs {unknown} that are not among the example inputs {list(inputs)}")
    dims: dict[str, torch.export.Dim] = {}
    specs = {}
    for key, a in inputs.items():
        axes = dynamic.get(key)
        if axes is None:
            specs[key] = None
            continue
        rank = a.dim() if isinstance(a, torch.Tensor) else 0
        bad = [ax for ax in axes if not isinstance(ax, int) or not -rank <= ax < rank]
        if bad:
            raise ValueError(f"dynamic[{key!r}]: axes {bad} out of range for an input of rank {rank}")
        if isinstance(axes, dict):
            specs[key] = {ax % rank: dims.setdefault(name, torch.export.Dim(name)) for ax, name in axes.items()}
        else:
            specs[key] = {ax % rank: torch.export.Dim.AUTO for ax in axes}
    return specs


def _symbolic(size) -> bool:
    return isinstance(size, torch.SymInt) and size.node.maybe_as_int() is None


def _why_fixed(size: int) -> str:
    if size in (0, 1):
        return "export specialises sizes 0 and 1 (use an example of size 2 or more)"
    return "the model needs that size, or ties it to a static axis of another input"


def report_axes(gm: fx.GraphModule, model: nn.Module, args, kwargs, spec, report: Report,
                static_why: str | None = None):
    """Which input axes the exported graph keeps dynamic (a symbolic size in the placeholder's
    metadata) and which it specialised (an int), with why, one note per input. `static_why`: why
    the capture has no dynamic axis at all (`dynamic=False`, or a fallback to a static export)."""
    try:
        named = inspect.signature(model.forward).bind(*args, **kwargs).arguments
    except (TypeError, ValueError):
        named = dict(kwargs)
    asked = {name: (spec[i] if isinstance(spec, tuple) else spec.get(name)) if spec else None
             for i, name in enumerate(named)}
    for node in gm.graph.find_nodes(op="placeholder"):
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor) or val.dim() == 0:
            continue
        wanted = asked.get(node.target) or {}
        sizes = [d if _symbolic(d) else int(d) for d in val.shape]
        dynamic = [f"{i} ({d})" for i, d in enumerate(sizes) if _symbolic(d)]
        fixed = [(i, d) for i, d in enumerate(sizes) if i in wanted and not _symbolic(d)]
        static = [str(i) for i, d in enumerate(sizes) if i not in wanted and not _symbolic(d)]
        parts = [f"dynamic axes {', '.join(dynamic)}" if dynamic else "no dynamic axis"]
        parts += [f"axis {i} specialised to {d}: " + _why_fixed(d) for i, d in fixed]
        if static:
            parts.append(f"static axes {', '.join(static)} ("
                         + (f"{static_why})" if spec is None else "not asked for: dynamic= changes that)"))
        shape = ", ".join(str(d) for d in sizes)
        report.note("capture", "shapes", f"{node.target} [{shape}]: " + "; ".join(parts))


def sizes_of_two(model: nn.Module, args, kwargs, spec) -> tuple[tuple, dict, str] | None:
    """The examples with every dynamic axis of size 1 (in `spec`) repeated to size 2, when the
    model runs on them (checked on `model`, leaving its buffers and the RNG as they were), and
    which axes those were; else None. export specialises a size of 1 (a batch of 1, a decode
    step's single token), and at size 1 code like transformers' `if batch !=
    position_ids.shape[0]` would fix the size even if export did not; a graph traced at size 2
    with a symbolic size still runs at size 1 (capture checks that it computes the same there)."""
    inputs = dict(enumerate(args)) | kwargs
    specs = dict(enumerate(spec)) if isinstance(spec, tuple) else spec if isinstance(spec, dict) else {}
    ones = {k: [i for i in (specs.get(k) or {}) if isinstance(t, torch.Tensor) and i < t.dim() and t.shape[i] == 1]
            for k, t in inputs.items() if isinstance(specs.get(k), dict)}
    ones = {k: axes for k, axes in ones.items() if axes}
    if not ones:
        return None

    def two(k, v):
        for i in ones.get(k, ()):
            v = torch.cat([v, v], dim=i)
        return v
    args2 = tuple(two(i, a) for i, a in enumerate(args))
    kwargs2 = {k: two(k, v) for k, v in kwargs.items()}
    try:
        with torch.no_grad(), preserved_state(model):
            model(*args2, **kwargs2)
    except Exception:  # the model only runs at size 1: export it there
        return None
    names = "; ".join(f"{_input_name(k)} axes {', '.join(map(str, axes))}" if len(axes) > 1 else
                      f"{_input_name(k)} axis {axes[0]}" for k, axes in ones.items())
    return args2, kwargs2, names


def _input_name(key) -> str:
    return f"input {key}" if isinstance(key, int) else key
