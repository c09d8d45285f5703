"""Reading a module's tensors by their qualified name (`layer1.0.conv1.weight`), as `get_attr`
nodes name them."""
from __future__ import annotations

import torch.nn as nn


def fetch_attr(module: nn.Module, target: str):
    """The attribute `target` (a dotted path) of `module`."""
    obj = module
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def storage_id(t) -> int:
    """Identifies `t`'s storage: equal for tensors that share memory (tied weights, views), also on
    the meta device, where every `data_ptr()` is 0."""
    return t.untyped_storage()._cdata
