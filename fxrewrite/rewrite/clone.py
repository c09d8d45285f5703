"""`copy.deepcopy` for module trees, about three times faster.

`optimize` copies the user's model before tracing it, so that nothing it does (tracing, shape
propagation, rewriting weights) can reach the original. For a model of a few thousand modules
`copy.deepcopy` spends most of its time in its generic machinery (`__reduce_ex__`, one
`_reconstruct` per module and per empty hook dictionary), not in copying tensors.

`copy_model` walks the plain parts of the tree itself (modules whose class keeps the default
pickling protocol, dicts, sets of names) and hands everything else to `copy.deepcopy` with the
same memo, so the result is the one `deepcopy` would give: tied weights stay tied, a module
registered twice is copied once, tensors keep their storage sharing, and a class with its own
`__deepcopy__` or `__getstate__` is copied its own way.
"""
from __future__ import annotations

import contextlib
import copy
import copyreg
from collections import OrderedDict

import torch
import torch.nn as nn

_ATOMIC = (type(None), bool, int, float, complex, str, bytes)
# copying methods `deepcopy` would also find on the instance itself
_OWN_PROTOCOL = frozenset({"__deepcopy__", "__reduce_ex__", "__reduce__", "__getstate__", "__setstate__"})


def copy_model(model: nn.Module) -> nn.Module:
    """An independent deep copy of `model` (same result as `copy.deepcopy(model)`, and also for
    modules holding a computed tensor, which `deepcopy` refuses: see `_computed_tensors`)."""
    return _copy(model, _computed_tensors(model))


def _computed_tensors(model: nn.Module) -> dict:
    """A deepcopy memo that copies each non-leaf tensor a module holds as a plain attribute as a
    detached tensor. The legacy `torch.nn.utils.weight_norm` keeps such a `weight`, recomputed
    by its pre-hook on every call, so the copy's value is replaced before it is ever read."""
    memo = {}
    for module in model.modules():
        for value in module.__dict__.values():
            if isinstance(value, torch.Tensor) and not value.is_leaf:
                memo[id(value)] = value.detach().clone()
    return memo


def _plain_module_class(cls: type) -> bool:
    """Whether `deepcopy` would copy instances of `cls` by reconstructing them from `__dict__`
    through `nn.Module.__getstate__` / `__setstate__`, which `_copy_module` does directly."""
    return (getattr(cls, "__deepcopy__", None) is None and cls not in copyreg.dispatch_table
            and cls.__reduce_ex__ is object.__reduce_ex__ and cls.__reduce__ is object.__reduce__
            and cls.__getstate__ is nn.Module.__getstate__ and cls.__setstate__ is nn.Module.__setstate__
            and cls.__new__ is object.__new__ and not copyreg._slotnames(cls))


def _copy(obj, memo: dict):
    cls = type(obj)
    if cls in _ATOMIC:
        return obj
    done = memo.get(id(obj))
    if done is not None:
        return done
    if cls is dict or cls is OrderedDict:
        new = cls()
        memo[id(obj)] = new
        for k, v in obj.items():
            new[_copy(k, memo)] = _copy(v, memo)
        return new
    if cls is set and all(type(v) is str for v in obj):
        new = set(obj)
        memo[id(obj)] = new
        return new
    if isinstance(obj, nn.Module) and _plain_module_class(cls) and not _OWN_PROTOCOL & obj.__dict__.keys():
        return _copy_module(obj, memo)
    return copy.deepcopy(obj, memo)


def _copy_module(module: nn.Module, memo: dict) -> nn.Module:
    new = object.__new__(type(module))
    memo[id(module)] = new
    state = {k: _copy(v, memo) for k, v in module.__dict__.items() if k != "_compiled_call_impl"}
    new.__setstate__(state)
    return new


def clone_inputs(value, double: bool = False):
    """A private copy of every tensor in nested inputs (tuples, namedtuples, lists, dicts), so
    that a model that writes into its input in place (`x.relu_()`) cannot reach the caller's
    tensors; floating tensors in float64 if `double`."""
    if isinstance(value, torch.Tensor):
        value = value.detach()
        return value.to(torch.float64, copy=True) if double and value.is_floating_point() else value.clone()
    if isinstance(value, (tuple, list)):
        items = [clone_inputs(v, double) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    if isinstance(value, dict):
        return type(value)((k, clone_inputs(v, double)) for k, v in value.items())
    return value


@contextlib.contextmanager
def preserved_state(module: nn.Module):
    """Run code on `module` and leave no trace of it: its buffers are put back afterwards (a
    train-mode BatchNorm updates its running statistics as it runs; a buffer reassigned rather
    than updated is put back too) and the global RNG is forked (dropout draws from it). A
    forward pass the library makes for itself (shape propagation, measuring, `verify`) must not
    change the model it runs or the caller's random stream."""
    saved = [(m, name, b, b.clone()) for m in module.modules() for name, b in m._buffers.items() if b is not None]
    try:
        with torch.random.fork_rng(devices=[]):
            yield module
    finally:
        with torch.no_grad():
            for m, name, b, value in saved:
                b.copy_(value)
                m._buffers[name] = b
