"""Weights that a module computes on every call, written as graph nodes.

`torch.nn.utils.parametrize` (weight_norm, spectral_norm, orthogonal, any user parametrization)
and the older hook-based `weight_norm` / `spectral_norm` compute a module's weight from other
tensors each time the module is called. Kept as one opaque module call, such a conv or linear is
invisible to every pass. Here its weight becomes a node computed from the tensors it depends on
(`original`, `weight_g`, `weight_v`, ...), and the module the canonical op its class computes:
the same function, now visible. Exact: the same ops run on the same tensors, in the same order.

The constant folder (`passes.constants`) then evaluates that node once where the result is
inference-only; without it the graph computes the weight on each call as the module did.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
from torch.nn.utils import parametrize
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm


def parametrized_value(plist: nn.Module, *originals: torch.Tensor) -> torch.Tensor:
    """What `module.<name>` returns for a parametrization list `plist` (`module.parametrizations.
    <name>`), with its `original` tensors passed in: a function of them, so it can be replayed
    on other storage (a shard, a meta tensor). Under symbolic_trace (an optimized model optimized
    again) it stays one call, as it was in the graph."""
    proxy = next((o for o in originals if isinstance(o, torch.fx.Proxy)), None)
    if proxy is not None:
        return proxy.tracer.create_proxy("call_function", parametrized_value, (plist, *originals), {})
    names = _original_names(plist)
    return torch.func.functional_call(plist, dict(zip(names, originals)), ())


def legacy_spectral_weight(weight_orig: torch.Tensor, u: torch.Tensor, v: torch.Tensor, dim: int) -> torch.Tensor:
    """Hook-based spectral_norm in eval mode (no power iteration):
    W = W_orig / (u . (W_mat v)), W_mat = W_orig with axis `dim` first, reshaped to 2-D."""
    mat = weight_orig.movedim(dim, 0) if dim != 0 else weight_orig
    mat = mat.reshape(mat.shape[0], -1)
    return weight_orig / torch.dot(u, torch.mv(mat, v))


def _original_names(plist: nn.Module) -> list[str]:
    return ["original"] if hasattr(plist, "original") else [
        f"original{i}" for i in range(sum(1 for n, _ in plist.named_parameters(recurse=False)
                                          if n.startswith("original")))]


LEGACY_WEIGHT_HOOKS = (WeightNorm, SpectralNorm)

# functions of tensors only (no state, no randomness) that this module puts into graphs
PURE_HELPERS: tuple[Callable, ...] = (parametrized_value, legacy_spectral_weight)


class Computed:
    """How to compute a module's tensor `name`: `fn(*sources, **kwargs)`, sources being paths of
    tensors (or of a module) relative to the module that owns `name` ("": that module)."""

    def __init__(self, fn: Callable, sources: list[str], kwargs: dict | None = None):
        self.fn, self.sources, self.kwargs = fn, sources, kwargs or {}


def parametrization_call(plist: nn.Module) -> Computed:
    """A call of a parametrization list itself (what `module.weight` traces to when the
    parametrized module is the root), relative to the list."""
    return Computed(parametrized_value, [""] + _original_names(plist))


def computation_node(graph, owner: str, how: Computed):
    """The node computing `how` for the module at path `owner` ("" for the root), reading its
    sources by `get_attr`, at the graph's current insertion point."""
    sources = [graph.create_node("get_attr", f"{owner}.{s}".strip(".")) for s in how.sources]
    return graph.call_function(how.fn, tuple(sources), how.kwargs)


def computed_tensors(mod: nn.Module) -> dict[str, Computed] | str:
    """The tensors `mod` computes on each call, by name, or the reason they cannot be written as
    nodes (then the module stays one call). Empty when it computes none."""
    out: dict[str, Computed] = {}
    if parametrize.is_parametrized(mod):
        for name, plist in mod.parametrizations.items():
            prefix = f"parametrizations.{name}"
            out[name] = Computed(parametrized_value, [prefix] + [f"{prefix}.{o}" for o in _original_names(plist)])
    hooks = list(getattr(mod, "_forward_pre_hooks", {}).values())
    for hook in hooks:
        if isinstance(hook, WeightNorm):
            out[hook.name] = Computed(torch._weight_norm, [f"{hook.name}_v", f"{hook.name}_g"], {"dim": hook.dim})
        elif isinstance(hook, SpectralNorm) and not mod.training:
            out[hook.name] = Computed(legacy_spectral_weight, [f"{hook.name}_orig", f"{hook.name}_u",
                                                               f"{hook.name}_v"], {"dim": hook.dim})
        elif isinstance(hook, SpectralNorm):
            return "its spectral_norm hook runs a power iteration in training mode (it updates weight_u and weight_v)"
        else:
            return "it has forward pre hooks, which run only when the module is called"
    return out
