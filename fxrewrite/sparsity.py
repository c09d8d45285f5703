"""Activation sparsity: the fraction of exact zeros each activation layer outputs.

    stats = activation_sparsity(model, batches)
    print(stats)                      # per layer: zeros of the activation (and of act(gate) * up)
    stats["layers.0.mlp.act_fn"].sparsity

What is counted. For every activation a forward runs, the number of elements of its output that
are exactly 0 (not "small": a sparse kernel skips only true zeros) over all `batches`. The
activations are the modules of `ACTIVATION_MODULES` (their output, whatever their forward does
inside) and the functional ReLU / GELU / SiLU calls made outside them (`F.relu`, `torch.relu_`,
`x.relu()`, `aten.gelu`, ... in an eager model or in a graph). For a gated FFN
(`act(gate) * up`, LLaMA's MLP, GeGLU / SwiGLU), the product is what the down projection reads
and what a sparse kernel exploits, so the first elementwise product of an activation's output
with a tensor of the same size is counted too (`product_sparsity`): it has at least the zeros
of the activation, plus any of `up`.

Names. For an eager model, the qualified name of the innermost module running when the
activation is computed (the activation module itself, or e.g. the MLP that calls F.gelu); for a
`torch.fx.GraphModule` (what `optimize` returns), the module each graph node came from
(`passes.swap_common.module_path`), else the node's name. A second activation under the same
name in one forward gets `#2`, and so on.

The model is run as it is (its train/eval mode is not changed), under `torch.no_grad()`.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from .passes.swap_common import flat_inputs, module_path
from .rewrite.activations import PolyReLU, ShiftedReLU, ThresholdReLU
from .rewrite.capture import as_args
from .rewrite.nn import GeneralizedSmeLU, SmeLU

ACTIVATION_MODULES: tuple[type, ...] = (nn.ReLU, nn.GELU, nn.SiLU, nn.ReLU6, nn.LeakyReLU, ShiftedReLU,
                                        ThresholdReLU, PolyReLU, SmeLU, GeneralizedSmeLU)
_FUNCTIONS = {"relu", "relu_", "gelu", "gelu_", "silu", "silu_"}  # by bare name: F.*, torch.*, methods, aten
_KINDS = {"relu": "ReLU", "gelu": "GELU", "silu": "SiLU"}
_PRODUCTS = {"mul", "mul_", "__mul__", "__rmul__", "__imul__"}


@dataclass
class LayerSparsity:
    name: str
    kind: str  # "ReLU", "GELU", "SiLU" (functional), or the activation module's class name
    zeros: int = 0
    total: int = 0
    product_zeros: int = 0  # of act(gate) * up, for a gated FFN
    product_total: int = 0

    @property
    def sparsity(self) -> float:
        """Fraction of exact zeros of the activation's output."""
        return self.zeros / self.total if self.total else 0.0

    @property
    def product_sparsity(self) -> float | None:
        """Fraction of exact zeros of act(gate) * up (None: the output was not gated)."""
        return self.product_zeros / self.product_total if self.product_total else None


class SparsityReport:
    """Per-layer `LayerSparsity` in the order the layers first ran; indexable by name."""

    def __init__(self, layers: list[LayerSparsity]):
        self.layers = layers

    def __getitem__(self, name: str) -> LayerSparsity:
        for r in self.layers:
            if r.name == name:
                return r
        raise KeyError(f"no activation named {name!r}; known: {[r.name for r in self.layers]}")

    def __iter__(self):
        return iter(self.layers)

    def __len__(self):
        return len(self.layers)

    def mean(self) -> float:
        """Zeros over all activation outputs (element-weighted)."""
        total = sum(r.total for r in self.layers)
        return sum(r.zeros for r in self.layers) / total if total else 0.0

    def __str__(self):
        w = max([5] + [len(r.name) for r in self.layers])
        lines = [f"{'layer':<{w}} {'kind':<12} {'zeros':>7} {'gated product zeros':>20}"]
        for r in self.layers:
            p = r.product_sparsity
            lines.append(f"{r.name:<{w}} {r.kind:<12} {r.sparsity:7.2%} {'-' if p is None else f'{p:.2%}':>20}")
        lines.append(f"{'all':<{w}} {'':<12} {self.mean():7.2%}")
        return "\n".join(lines)


def _bare_name(func) -> str:
    return getattr(func, "__name__", "").split(".")[0]


class _Counter(TorchFunctionMode):
    """Counts zeros of activation outputs and of the gated products made from them."""

    def __init__(self, products: bool):
        super().__init__()
        self.products = products
        self.layers: dict[str, LayerSparsity] = {}
        self.where = ["<model>"]  # innermost module (eager) or graph node (fx) being run
        self.inside = 0  # > 0 while an activation module runs: its inner calls are not counted again
        self.seen: dict[str, int] = {}  # per forward: how many activations under each name so far
        self.outputs: dict[int, tuple] = {}  # id(activation output) -> (weakref to it, entry)

    def new_forward(self):
        self.seen.clear()
        self.outputs.clear()

    def record(self, name: str, kind: str, out):
        if not isinstance(out, torch.Tensor):
            return
        k = self.seen[name] = self.seen.get(name, 0) + 1
        key = name if k == 1 else f"{name}#{k}"
        entry = self.layers.setdefault(key, LayerSparsity(key, kind))
        entry.zeros += int((out == 0).sum())
        entry.total += out.numel()
        if self.products:
            self.outputs[id(out)] = (weakref.ref(out), entry)

    def _activation_of(self, v):
        if not isinstance(v, torch.Tensor):
            return None
        hit = self.outputs.get(id(v))
        return hit[1] if hit is not None and hit[0]() is v else None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = _bare_name(func)
        if name in _FUNCTIONS and self.inside == 0:
            self.record(self.where[-1], _KINDS[name.rstrip("_")], out)
        elif name in _PRODUCTS and self.products and len(args) == 2 and isinstance(out, torch.Tensor):
            for mine, other in (args, args[::-1]):
                entry = self._activation_of(mine)
                if entry is not None and isinstance(other, torch.Tensor) and other.numel() == out.numel():
                    entry.product_zeros += int((out == 0).sum())
                    entry.product_total += out.numel()
                    del self.outputs[id(mine)]  # only the first product counts
                    break
        return out


class _Interpreter(fx.Interpreter):
    def __init__(self, gm, counter: _Counter):
        super().__init__(gm)
        self.counter = counter

    def run_node(self, n):
        self.counter.where.append(module_path(n) or n.name)
        try:
            return super().run_node(n)
        finally:
            self.counter.where.pop()


def activation_sparsity(model: nn.Module, batches, *, products: bool = True) -> SparsityReport:
    """Per activation layer, the fraction of exact zeros of its output over `batches` (a list of
    model inputs: tensors, tuples of positionals, or dicts of keywords), and with `products`
    that of the gated product act(gate) * up (see the module docstring)."""
    batches = list(batches)
    if not batches:
        raise ValueError("activation_sparsity needs at least one batch of inputs")
    counter = _Counter(products)
    handles = []
    graph = isinstance(model, fx.GraphModule)

    def enter(name, is_act):
        def pre(mod, args):
            if not graph:
                counter.where.append(name)
            counter.inside += is_act
        return pre

    def leave(name, is_act):
        def post(mod, args, out):
            counter.inside -= is_act
            if not graph:
                counter.where.pop()
            if is_act and counter.inside == 0:
                counter.record(counter.where[-1] if graph else name, type(mod).__name__, out)
        return post

    for name, mod in model.named_modules():
        if graph and mod is model:
            continue
        is_act = isinstance(mod, ACTIVATION_MODULES)
        if graph and not is_act:
            continue  # in a graph, names come from the nodes
        handles.append(mod.register_forward_pre_hook(enter(name or "<model>", is_act)))
        handles.append(mod.register_forward_hook(leave(name or "<model>", is_act)))
    try:
        with torch.no_grad():
            for b in batches:
                args, kwargs = as_args(b)
                counter.new_forward()
                with counter:
                    if graph:
                        _Interpreter(model, counter).run(*flat_inputs(model, args, kwargs))
                    else:
                        model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
        counter.new_forward()
    return SparsityReport(list(counter.layers.values()))
