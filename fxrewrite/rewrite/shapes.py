"""Shape propagation: run a captured graph once on the example inputs and record, on each node
that produces tensors, `node.meta["tensor_meta"]` (the `TensorMetadata` of torch.fx's
`ShapeProp`: shape, dtype, stride, ...); and the one way passes read a node's shape and dtype,
whichever capture wrote them (`is_tensor`, `tensor_shape`, `tensor_dtype`).

Why not `ShapeProp` itself: it goes through `fx.Interpreter`'s per-node machinery and asks each
output for its memory format (several contiguity checks per tensor), which makes it about three
times slower than this loop on graphs of thousands of nodes, while the passes read only shapes
and dtypes. Values are freed after their last reader, as the Interpreter does, so peak memory
stays that of running the model.
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch.fx.node import map_aggregate, map_arg
from torch.fx.passes.shape_prop import TensorMetadata

from .attrs import fetch_attr


def _meta_value(node: fx.Node):
    """export writes `val`, Dynamo (torch.compile) writes `example_value`: both a (fake) tensor."""
    val = node.meta.get("val")
    return node.meta.get("example_value") if val is None else val


def is_tensor(node) -> bool:
    """Whether an FX value is known (from shape propagation, export's `val` or Dynamo's
    `example_value` metadata) to be a tensor."""
    if not isinstance(node, fx.Node):
        return False
    val = _meta_value(node)
    if val is not None:
        return isinstance(val, torch.Tensor)
    return "tensor_meta" in node.meta and hasattr(node.meta["tensor_meta"], "shape")


def tensor_shape(node) -> tuple | None:
    """The shape of a node's tensor value, or None when it is unknown or not one tensor."""
    if not isinstance(node, fx.Node):
        return None
    val = _meta_value(node)
    if isinstance(val, torch.Tensor):
        return tuple(val.shape)
    tm = node.meta.get("tensor_meta")
    return tuple(tm.shape) if tm is not None and hasattr(tm, "shape") else None


def tensor_dtype(node) -> torch.dtype | None:
    """The dtype of a node's tensor value, or None when it is unknown or not one tensor."""
    if not isinstance(node, fx.Node):
        return None
    val = _meta_value(node)
    if isinstance(val, torch.Tensor):
        return val.dtype
    return getattr(node.meta.get("tensor_meta"), "dtype", None)


class ShapePropagationError(RuntimeError):
    """A node of the graph failed when run on the example inputs."""


def tensor_metadata(t: torch.Tensor) -> TensorMetadata:
    """Shape, dtype, strides: what passes read. The memory format is left unset (None), as in
    the metadata made from Dynamo's fake values; nothing here needs it."""
    return TensorMetadata(shape=t.shape, dtype=t.dtype, requires_grad=t.requires_grad, stride=tuple(t.stride()),
                          memory_format=None, is_quantized=t.is_quantized, qparams={})


def propagate_shapes(gm: fx.GraphModule, *args) -> None:
    """Run `gm`'s graph on `args` node by node, recording `tensor_meta` and `type` on each node."""
    modules = dict(gm.named_modules())
    env: dict[fx.Node, object] = {}
    free_after = _last_uses(gm.graph)
    inputs = iter(args)
    for node in gm.graph.nodes:
        try:
            value = _run(node, env, modules, gm, inputs, args)
        except Exception as e:
            raise ShapePropagationError(f"{node.format_node()} failed: {type(e).__name__}: {e}") from e
        if node.users:
            env[node] = value
        found = False

        def meta(v):
            nonlocal found
            if isinstance(v, torch.Tensor):
                found = True
                return tensor_metadata(v)
            return v

        node.meta["type"] = type(value)
        summary = map_aggregate(value, meta)
        if found:
            node.meta["tensor_meta"] = summary
        for dead in free_after.get(node, ()):
            env.pop(dead, None)
        if node.op == "output":
            return


def _run(node: fx.Node, env: dict, modules: dict, gm: fx.GraphModule, inputs, args):
    if node.op == "placeholder":
        if node.target.startswith("*"):
            return tuple(inputs)
        value = next(inputs, _MISSING)
        if value is _MISSING:
            if not node.args:
                raise TypeError(f"the graph takes more inputs than the {len(args)} given")
            return node.args[0]  # the forward's default value
        return value
    if node.op == "get_attr":
        return fetch_attr(gm, node.target)
    load = env.__getitem__
    a = map_arg(node.args, load)
    kw = map_arg(node.kwargs, load)
    if node.op == "call_function":
        return node.target(*a, **kw)
    if node.op == "call_method":
        return getattr(a[0], node.target)(*a[1:], **kw)
    if node.op == "call_module":
        return modules[node.target](*a, **kw)
    if node.op == "output":
        return a[0]
    raise ValueError(f"unknown node kind {node.op!r}")


_MISSING = object()


def _last_uses(graph: fx.Graph) -> dict[fx.Node, list[fx.Node]]:
    """For each node, the values no later node reads (freed once it has run)."""
    seen: set[fx.Node] = set()
    free_after: dict[fx.Node, list[fx.Node]] = {}
    for node in reversed(graph.nodes):
        for used in node.all_input_nodes:
            if used not in seen:
                seen.add(used)
                free_after.setdefault(node, []).append(used)
    return free_after


def infer_tensor_meta(node: fx.Node) -> None:
    """Give a node a pass inserted its `tensor_meta`, by running its op on meta tensors shaped
    like its inputs (no data is touched). Without it, what comes after the node would have an
    unknown input shape and rewrites that need one would be skipped (a `pad` that
    canonicalisation inserts for `padding="same"` hid the conv after it from branch merging).
    Left unknown when an input's shape is unknown or symbolic, or the op fails on meta."""
    if node.op != "call_function" or is_tensor(node):
        return
    missing = []

    def as_meta(v):
        shape, dtype = tensor_shape(v), tensor_dtype(v)
        if shape is None or dtype is None or not all(isinstance(d, int) for d in shape):
            missing.append(v)
            return None
        return torch.empty(shape, dtype=dtype, device="meta")

    args = map_arg(node.args, as_meta)
    kwargs = map_arg(node.kwargs, as_meta)
    if missing:
        return
    try:
        value = node.target(*args, **kwargs)
    except Exception:  # an op without a meta kernel: the shape stays unknown, as before
        return
    if isinstance(value, torch.Tensor):
        node.meta["tensor_meta"] = tensor_metadata(value)


def row_major_strides(shape) -> tuple:
    """The strides of a fresh tensor of `shape`. `is_contiguous()` also accepts other strides
    where a dim has size 1 (a 1x1 conv weight's (16, 1, 16, 16)), which oneDNN and torch.export
    read as channels-last."""
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))
