"""Weights without values: planning a rewrite on the meta device.

A model too large for memory is built on the meta device (shapes and dtypes, no data) and
`optimize` plans its rewrite there; the derivations it records are then applied shard by shard
to the real checkpoint (`fxrewrite.checkpoint`). Nearly every decision a pass makes depends on
shapes only. The few that read weight values (a bias that must be zero, a measured deviation)
cannot be decided on meta: the pass skips that rewrite with `NEEDS_VALUES` as its reason, or
leaves the measurement out, instead of guessing.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

NEEDS_VALUES = "needs weight values (the model is on the meta device)"


def has_values(*tensors) -> bool:
    """Whether every tensor among `tensors` holds data (None and non-tensors are ignored)."""
    return not any(isinstance(t, torch.Tensor) and t.is_meta for t in tensors)


def on_meta(module: nn.Module) -> bool:
    """Whether `module`'s weights are on the meta device (the first tensor decides)."""
    for t in module.parameters():
        return t.is_meta
    for t in module.buffers():
        return t.is_meta
    return False


def creating_like(module: nn.Module):
    """New tensors made without a device (`torch.zeros(n)`, a new `nn.Module`'s parameters) go
    to the meta device while this is active if `module` is on meta; otherwise nothing changes
    (passes put new modules on the graph's device themselves)."""
    return torch.device("meta") if on_meta(module) else contextlib.nullcontext()
