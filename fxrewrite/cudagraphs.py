"""Replay an optimized module as CUDA graphs, one per input signature, for eager inference.

    fast = optimize(model, x, lower="triton")
    graphed = cuda_graphs(fast, max_graphs=8)     # same calls, same results
    with torch.no_grad():
        y = graphed(x)

Why. At decode shapes (a few rows per norm) a lowered region's kernel takes a few µs and its
launch from Python takes longer; a CUDA graph replays every kernel of the forward with one
launch. `torch.compile(mode="reduce-overhead")` does this too, for a compiled module; this is
for the eager path (`optimize` without compiling), where shapes are static per call.

How. The first call with a new signature (per tensor argument: shape, strides, dtype, device;
every other argument by value) warms the module up on a side stream (Triton compiles its
kernels there), then captures one forward into a graph with static input buffers. Later calls
with that signature copy their tensors into the static inputs, replay, and return the outputs
(cloned unless `clone_outputs=False`: the graph writes the same buffers on every replay).
At most `max_graphs` graphs are kept; the least recently used one is dropped first (each holds
its own memory pool), so a model fed many shapes stays bounded.

Falls back to calling the module directly (and says nothing) when the call cannot be a graph:
gradients enabled, an input not on CUDA, an argument that cannot be part of a key (unhashable).
Graphs assume the module's weights stay where they are: after `.to()`, loading a state_dict
into new tensors or replacing parameters, call `reset()`.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn
from torch.utils import _pytree as pytree


class CUDAGraphed(nn.Module):
    """`module` behind a bounded per-signature cache of CUDA graphs (see the module docstring)."""

    def __init__(self, module: nn.Module, max_graphs: int = 8, warmup: int = 2, clone_outputs: bool = True):
        super().__init__()
        if max_graphs < 1:
            raise ValueError(f"max_graphs must be at least 1, got {max_graphs}")
        self.module = module
        self.max_graphs, self.warmup, self.clone_outputs = max_graphs, warmup, clone_outputs
        self._graphs: OrderedDict = OrderedDict()
        self.captures = 0  # graphs captured so far (evicted ones included)

    def reset(self) -> None:
        """Drop every graph (and its memory pool)."""
        self._graphs.clear()

    def forward(self, *args, **kwargs):
        flat, spec = pytree.tree_flatten((args, kwargs))
        key = _signature(flat, spec)
        if key is None or torch.is_grad_enabled():
            return self.module(*args, **kwargs)
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._capture(flat, spec)
            self._graphs[key] = entry
            while len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)
        else:
            self._graphs.move_to_end(key)
        static_in, graph, static_out = entry
        for buf, t in zip(static_in, (v for v in flat if isinstance(v, torch.Tensor))):
            buf.copy_(t)
        graph.replay()
        if not self.clone_outputs:
            return static_out
        return pytree.tree_map_only(torch.Tensor, torch.Tensor.clone, static_out)

    def _capture(self, flat, spec):
        static_in = [v.clone() for v in flat if isinstance(v, torch.Tensor)]
        it = iter(static_in)
        args, kwargs = pytree.tree_unflatten([next(it) if isinstance(v, torch.Tensor) else v for v in flat], spec)
        device = static_in[0].device
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.module(*args, **kwargs)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = self.module(*args, **kwargs)
        self.captures += 1
        return static_in, graph, static_out


def _signature(flat, spec):
    """A hashable key for one call, or None when it cannot be graphed (no tensor, a tensor not
    on CUDA, an unhashable argument)."""
    parts, tensors = [], 0
    for v in flat:
        if isinstance(v, torch.Tensor):
            if not v.is_cuda or v.requires_grad and torch.is_grad_enabled():
                return None
            parts.append((tuple(v.shape), v.stride(), v.dtype, v.device))
            tensors += 1
        else:
            try:
                hash(v)
            except TypeError:
                return None
            parts.append(("value", type(v), v))
    if not tensors:
        return None
    return (str(spec), tuple(parts))


def cuda_graphs(module: nn.Module, max_graphs: int = 8, warmup: int = 2, clone_outputs: bool = True) -> CUDAGraphed:
    """Wrap `module` (usually `optimize(...)`'s result) to replay CUDA graphs per input signature;
    see the module docstring. The module is not copied: the wrapper calls it."""
    return CUDAGraphed(module, max_graphs, warmup, clone_outputs)
