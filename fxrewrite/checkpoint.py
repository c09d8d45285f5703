"""Rewrite a safetensors checkpoint too large for memory, a few tensors at a time.

A 70B model does not fit in memory, but its rewrite does not need it to: `optimize` plans the
rewrite on the meta device (shapes only), and the plan says how every tensor of the rewritten
module follows from the original's (`gm.derivations`: `target = fn(*sources)`). So
`rewrite_checkpoint` builds the model on meta, optimizes it there, and computes each tensor of
the result from the few source tensors it needs, read lazily from the checkpoint and dropped
as soon as their group is written. Tensors that share a source (q, k and v folding the same
norm weight) form one group, so each source is read once and peak memory is about the largest
group, not the model (`bench/checkpoint_memory.py`). `load_rewritten` rebuilds the same plan
on meta and assigns the written tensors to it.

    from fxrewrite.checkpoint import rewrite_checkpoint, load_rewritten
    rewrite_checkpoint(factory, {"input_ids": torch.zeros(2, 8, dtype=torch.long)},
                       "llama-70b/", "llama-70b-rewritten/", passes=["quantize_prep"])
    fast = load_rewritten(factory, "llama-70b-rewritten/", device="cuda")

Output format (OUT_DIR):

* The tensors of the rewritten GraphModule, every parameter and buffer (non-persistent ones
  too, e.g. rotary `inv_freq`, which checkpoints leave out) and tensor constant, under their
  attribute names in it: original dotted names for the tensors the rewrite kept
  (`model.layers.0.self_attn.o_proj.weight`), flat names for derived ones
  (`model_layers_0_self_attn_q_proj_norm_folded_weight`). A tensor the module holds under two
  names is written once (the other name is in the manifest's `aliases`).
* In the source's layout: `model-0000i-of-0000n.safetensors` shards and
  `model.safetensors.index.json` (`{"metadata": {"total_size": bytes}, "weight_map":
  {key: shard}}`) for a sharded source, else one `model.safetensors`. Shards hold about as
  many bytes as the source's largest (`max_shard_bytes`). Each is a plain safetensors file
  (8-byte little-endian header length, JSON header of dtype/shape/data_offsets, metadata
  `{"format": "pt"}`, raw bytes), written header first and streamed, never held whole.
* `fxrewrite_manifest.json`, written last (its presence means the output is complete): the
  library and torch versions, the passes, the example inputs' names, shapes and dtypes (what
  `load_rewritten` re-plans with), the derivations (target, pass, sources, function), the
  source directory and the source tensors read, the aliases, the keys of each output shard,
  and the seconds the reading and writing took.
* Dtypes are the model's: a source tensor stored in another dtype is cast to its parameter's
  dtype first, as `load_state_dict` would copy it, so derivations see what they would in memory.

OUT_DIR must be new, empty, or an earlier output of this function (whose files are replaced).

It is not a checkpoint `from_pretrained` can load: its keys are the rewritten module's.
"""
from __future__ import annotations

import gc
import json
import os
import struct
import sys
import time
from contextlib import contextmanager
from importlib import metadata

import torch
import torch.fx as fx
import torch.nn as nn

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
MANIFEST = "fxrewrite_manifest.json"

_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
          torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64", torch.bool: "BOOL",
          torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}  # safetensors' dtype names
_SMALL = 1 << 20  # sources up to this size are kept for the whole run instead of joining groups


class CheckpointError(ValueError):
    """The checkpoint cannot give the rewrite what it needs (missing keys, wrong shapes), or
    an output directory does not hold a rewritten checkpoint."""


# ---------------------------------------------------------------- the public functions

def rewrite_checkpoint(factory, example_inputs, src_dir, out_dir, passes=None, progress: bool = True,
                       max_shard_bytes: int | None = None) -> dict:
    """Write the tensors of `optimize(factory(), example_inputs, passes)`, with the weights of
    the safetensors checkpoint in `src_dir`, to `out_dir` (format: the module docstring), without
    holding the model in memory. Returns the manifest.

    `factory()` builds the model (called under the meta device; and, if the plan needs
    non-persistent buffers, once more with parameters on meta, `params_on_meta`, for their
    values); it may return `(model, example_inputs)`, then `example_inputs` may be None. The
    model is put in eval mode. `example_inputs` (a tensor, tuple or dict of keyword inputs, on
    any device) give only shapes and dtypes. `progress` shows a bar on stderr. Raises
    `CheckpointError` naming every tensor the plan needs that the checkpoint lacks, before
    anything is written; `src_dir` is only read."""
    src_dir, out_dir = os.path.abspath(src_dir), os.path.abspath(out_dir)
    if os.path.realpath(src_dir) == os.path.realpath(out_dir):
        raise CheckpointError(f"the output directory is the source directory {src_dir}: choose another one")
    source = _Source(src_dir)
    model, inputs, gm = _plan(factory, example_inputs, passes)
    plan = _Plan(factory, model, gm, source)
    groups = plan.groups()
    order = [name for group in groups for name in group]
    limit = max_shard_bytes or max(source.file_bytes.values())
    names = _shard_names(_split(order, plan.outputs, limit), sharded=not source.single)
    manifest = _manifest(passes, inputs, gm, plan, names)
    del model, gm  # the plan keeps what it needs (the derivations, meta tensors): not the graph
    gc.collect()

    _clear(out_dir)
    total = sum(_nbytes(plan.outputs[k]) for k in order)
    start = time.perf_counter()
    with _Writer(out_dir, names, plan.outputs) as writer, _bar(total, len(names), progress) as bar:
        for group in groups:
            for name, value in plan.compute(group):
                shard = writer.write(name, value)
                bar.set_description(f"shard {shard + 1}/{len(names)}")
                bar.update(_nbytes(value))
                del value  # not held while the next group's sources are read
    if len(names) > 1 or not source.single:  # as transformers: an index once there are shards
        weight_map = {key: file for file, keys in names.items() for key in keys}
        _dump(os.path.join(out_dir, INDEX), {"metadata": {"total_size": total}, "weight_map": weight_map})
    manifest["seconds"] = round(time.perf_counter() - start, 3)
    _dump(os.path.join(out_dir, MANIFEST), manifest)
    return manifest


def _clear(out_dir: str):
    """Make `out_dir` an empty directory: it may hold only an earlier output of ours (its
    manifest names the files to remove), nothing of the user's."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, MANIFEST)
    if os.path.exists(path):
        with open(path) as f:
            ours = [*json.load(f).get("shards", {}), INDEX, MANIFEST]
        for file in ours:
            if os.path.exists(os.path.join(out_dir, file)):
                os.remove(os.path.join(out_dir, file))
    if os.listdir(out_dir):
        raise CheckpointError(f"the output directory {out_dir} is not empty (and holds no complete rewritten "
                              "checkpoint to replace): choose an empty or new one")


def load_rewritten(factory, out_dir, device="cpu") -> fx.GraphModule:
    """The module `rewrite_checkpoint` wrote to `out_dir`, on `device`: the plan is made again
    on meta (`factory`, the manifest's passes and example input shapes), then every tensor is
    assigned from the shards (memory-mapped: on CPU nothing is copied until used). Its outputs
    are those of `optimize(factory(), example_inputs, passes)` on the source weights."""
    path = os.path.join(out_dir, MANIFEST)
    if not os.path.exists(path):
        raise CheckpointError(f"{out_dir} has no {MANIFEST}: not a (complete) rewritten checkpoint")
    with open(path) as f:
        manifest = json.load(f)
    _, _, gm = _plan(factory, _meta_inputs(manifest["example_inputs"]), manifest["passes"])
    tensors, aliases = _tensors(gm)
    written = {key for keys in manifest["shards"].values() for key in keys}
    if written != set(tensors):
        raise CheckpointError(f"the plan made now differs from the one written to {out_dir} (another library "
                              f"version or factory?): not written {sorted(set(tensors) - written)[:5]}, "
                              f"not in the plan {sorted(written - set(tensors))[:5]}")
    from safetensors import safe_open
    loaded = {}
    for file, keys in manifest["shards"].items():
        with safe_open(os.path.join(out_dir, file), framework="pt") as f:
            for key in keys:
                loaded[key] = f.get_tensor(key)
    for name, value in loaded.items():
        if value.shape != tensors[name].shape or value.dtype != tensors[name].dtype:
            raise CheckpointError(f"{name} in {out_dir} is {value.dtype} {list(value.shape)}, the plan made now has "
                                  f"{tensors[name].dtype} {list(tensors[name].shape)} (another factory?)")
        _assign(gm, name, value)
    for alias, name in aliases.items():
        _assign(gm, alias, loaded[name])
    from .rewrite.devices import to_device
    return to_device(gm, device)


@contextmanager
def params_on_meta():
    """Build modules with their parameters on the meta device but buffers real, like
    accelerate's `init_empty_weights(include_buffers=False)`: non-persistent buffers (rotary
    `inv_freq`) are computed in `__init__` and absent from checkpoints, so this is where their
    values come from, without allocating the weights. (A parameter's CPU tensor is made, but
    moved to meta when registered, before initialisation touches its pages.)"""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        param = module._parameters.get(name)
        if param is not None and not param.is_meta:
            module._parameters[name] = type(param)(param.to("meta"), **{"requires_grad": param.requires_grad,
                                                                        **param.__dict__})
    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


# ---------------------------------------------------------------- planning

def _plan(factory, example_inputs, passes):
    """The model built on meta, the example inputs on meta, and `optimize`'s result there."""
    from .api import optimize
    with torch.device("meta"):
        model, examples = _model_of(factory())
    if example_inputs is None:
        example_inputs = examples
    if example_inputs is None:
        raise ValueError("example_inputs is None and the factory returned no (model, example_inputs)")
    inputs = _structure(example_inputs, lambda t: torch.empty(t.shape, dtype=t.dtype, device="meta"))
    return model.eval(), inputs, optimize(model, inputs, passes=passes)


def _model_of(built):
    if isinstance(built, tuple) and len(built) == 2 and isinstance(built[0], nn.Module):
        return built
    return built, None


def _structure(inputs, fn):
    if isinstance(inputs, torch.Tensor):
        return (fn(inputs),)
    if isinstance(inputs, dict):
        return {k: fn(v) for k, v in inputs.items()}
    return tuple(fn(v) for v in inputs)


def _tensors(gm: fx.GraphModule) -> tuple[dict, dict]:
    """Every tensor of `gm` by name (parameters, buffers, tensor constants that get_attr reads,
    in sub-graphs too), each under its first name, and {other name: first name} for tensors held
    under several."""
    found, aliases, first = {}, {}, {}

    def add(name, t):
        if id(t) in first:
            aliases[name] = first[id(t)]
        else:
            first[id(t)] = name
            found[name] = t
    for name, t in gm.named_parameters(remove_duplicate=False):
        add(name, t)
    for name, t in gm.named_buffers(remove_duplicate=False):
        add(name, t)
    for prefix, sub in gm.named_modules(remove_duplicate=False):
        if isinstance(sub, fx.GraphModule):
            for node in sub.graph.nodes:
                if node.op == "get_attr":
                    value = _get(sub, node.target)
                    name = f"{prefix}.{node.target}" if prefix else node.target
                    if isinstance(value, torch.Tensor) and name not in found and name not in aliases:
                        add(name, value)
    return found, aliases


def _get(module, target: str):
    for part in target.split("."):
        module = getattr(module, part, None)
    return module


def _assign(gm: nn.Module, name: str, value: torch.Tensor):
    """Put `value` in place of gm's tensor `name`, as the same kind (parameter, buffer or plain
    attribute): `load_state_dict(assign=True)` would skip non-persistent buffers and constants."""
    prefix, _, attr = name.rpartition(".")
    module = gm.get_submodule(prefix)
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(value, requires_grad=module._parameters[attr].requires_grad)
    elif attr in module._buffers:
        module._buffers[attr] = value
    else:
        setattr(module, attr, value)


class _Source:
    """The checkpoint in `src_dir`: which file holds each key, with its size in bytes, shape and
    place, from the headers alone."""

    def __init__(self, src_dir: str):
        if not os.path.isdir(src_dir):
            raise CheckpointError(f"source checkpoint directory {src_dir} does not exist")
        index = os.path.join(src_dir, INDEX)
        if os.path.exists(index):
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
            self.single = False
        elif os.path.exists(os.path.join(src_dir, SINGLE)):
            files, self.single = [SINGLE], True
        else:
            raise CheckpointError(f"{src_dir} has neither {INDEX} nor {SINGLE}")
        self.dir, self.files, self.entries, self.file_bytes = src_dir, files, {}, {}
        for i, file in enumerate(files):
            path = os.path.join(src_dir, file)
            if not os.path.exists(path):
                raise CheckpointError(f"{INDEX} in {src_dir} names {file}, which does not exist")
            header = _header(path)
            self.file_bytes[file] = os.path.getsize(path)
            for key, entry in header.items():
                if key != "__metadata__":
                    begin, end = entry["data_offsets"]
                    self.entries[key] = (file, end - begin, tuple(entry["shape"]), (i, begin))

    def read(self, keys: list[str]) -> dict:
        """The tensors `keys`, each file opened once and closed again (the tensors stay mapped
        only while they are referenced)."""
        from safetensors import safe_open
        out = {}
        for file in sorted({self.entries[k][0] for k in keys}, key=self.files.index):
            with safe_open(os.path.join(self.dir, file), framework="pt") as f:
                for key in keys:
                    if self.entries[key][0] == file:
                        out[key] = f.get_tensor(key)
        return out


class _Plan:
    """Where each tensor of the rewritten `gm` comes from: a derivation, a checkpoint key (the
    tensor's own, or a tied one's), a non-persistent buffer of the model, or a value the plan
    already holds (a constant made while planning)."""

    def __init__(self, factory, model: nn.Module, gm: fx.GraphModule, source: _Source):
        self.factory, self.source = factory, source
        self.outputs, self.aliases = _tensors(gm)
        self.derived = {d.target: d for d in gm.derivations}
        self.meta = dict(model.named_parameters(remove_duplicate=False))
        self.meta.update(model.named_buffers(remove_duplicate=False))
        self.non_persistent = {f"{prefix}.{b}" if prefix else b for prefix, m in model.named_modules()
                               for b in m._non_persistent_buffers_set}
        tied: dict[int, list[str]] = {}
        for name, t in self.meta.items():
            tied.setdefault(id(t), []).append(name)
        self.keys = {}  # leaf name -> checkpoint key
        for names in tied.values():
            present = [n for n in names if n in source.entries]
            for n in names:
                if present:
                    self.keys[n] = n if n in present else present[0]
        self.leaves = {name: self._leaves(name) for name in self.outputs}
        self._check()
        self.buffers = None  # non-persistent buffer values, from a params-on-meta build when needed
        self.kept: dict[str, torch.Tensor] = {}  # small sources shared by groups
        self.read: list[str] = []

    def _leaves(self, name: str) -> set[str]:
        """The non-derived names `name` is computed from (itself, if not derived)."""
        if name not in self.derived:
            return {name}
        return set().union(*[self._leaves(s) for s in self.derived[name].sources if isinstance(s, str)] or [set()])

    def _check(self):
        missing, wrong = [], []
        for leaf in sorted(set().union(*self.leaves.values()) if self.leaves else ()):
            if leaf in self.keys:
                shape = self.source.entries[self.keys[leaf]][2]
                if shape != tuple(self.meta[leaf].shape):
                    wrong.append(f"{self.keys[leaf]} {list(shape)} (the model's is {list(self.meta[leaf].shape)})")
            elif leaf not in self.non_persistent and self._planned(leaf) is None:
                missing.append(leaf)
        if missing:
            shown = ", ".join(missing[:20]) + (f" and {len(missing) - 20} more" if len(missing) > 20 else "")
            raise CheckpointError(f"the checkpoint in {self.source.dir} lacks {len(missing)} tensor(s) the "
                                  f"rewritten model needs: {shown}")
        if wrong:
            raise CheckpointError(f"checkpoint tensors of another shape than the model's: {', '.join(wrong[:10])}")

    def _planned(self, leaf: str):
        """The value the plan holds for `leaf` if it is a real one (not meta), else None."""
        t = self.outputs.get(leaf)
        if t is None and leaf in self.aliases:
            t = self.outputs[self.aliases[leaf]]
        return t if t is not None and not t.is_meta else None

    def groups(self) -> list[list[str]]:
        """The output names in groups that share large sources (union-find), each group in gm's
        order, the groups in the order of their first source in the checkpoint."""
        parent = {name: name for name in self.outputs}

        def root(x):
            while parent[x] != x:
                parent[x] = parent[parent[x]]
                x = parent[x]
            return x
        owner: dict[str, str] = {}
        for name, leaves in self.leaves.items():
            for leaf in leaves:
                if self._small(leaf):
                    continue
                if leaf in owner:
                    parent[root(name)] = root(owner[leaf])
                else:
                    owner[leaf] = name
        groups: dict[str, list[str]] = {}
        for name in self.outputs:
            groups.setdefault(root(name), []).append(name)

        def place(group):
            spots = [self.source.entries[self.keys[l]][3] for n in group for l in self.leaves[n] if l in self.keys]
            return min(spots) if spots else (len(self.source.files), 0)
        return sorted(groups.values(), key=place)

    def _small(self, leaf: str) -> bool:
        if leaf not in self.keys:
            return True  # buffers and planned constants: already in memory
        return self.source.entries[self.keys[leaf]][1] <= _SMALL

    def compute(self, group: list[str]):
        """(name, value) for each output of `group`, its sources read together and dropped after."""
        leaves = set().union(*[self.leaves[n] for n in group])
        to_read = [l for l in leaves if l in self.keys and l not in self.kept]
        values = {}
        for key, t in self.source.read(sorted({self.keys[l] for l in to_read})).items():
            self.read.append(key)
            for l in to_read:
                if self.keys[l] == key:
                    values[l] = t.to(self.meta[l].dtype)  # as load_state_dict copies into the model's dtype
                    if self._small(l):  # a copy: a view would keep the whole shard's mapping alive
                        self.kept[l] = values[l] = values[l].clone()
        values.update({l: self.kept[l] for l in leaves if l in self.kept})
        for l in leaves - set(values):
            values[l] = self._buffer(l) if l in self.non_persistent and self._planned(l) is None else self._planned(l)
        needed = set().union(*[self._deps(n) for n in group])  # inputs of other members: kept till the end
        with torch.no_grad():
            for name in group:
                value = self._value(name, values)
                if name not in needed:
                    del values[name]  # written next, then free
                want = self.outputs[name]
                if value.shape != want.shape or value.dtype != want.dtype:
                    raise RuntimeError(f"{name}: computed {value.dtype} {list(value.shape)}, the plan has "
                                       f"{want.dtype} {list(want.shape)}")
                yield name, value

    def _deps(self, name: str) -> set[str]:
        """Every name `name` is computed from, through chains of derivations."""
        d = self.derived.get(name)
        sources = [s for s in d.sources if isinstance(s, str)] if d else []
        return set(sources).union(*[self._deps(s) for s in sources])

    def _value(self, name: str, values: dict):
        if name not in values:  # derived: chains resolve through `values`, which caches them
            d = self.derived[name]
            values[name] = d.fn(*[self._value(s, values) if isinstance(s, str) else s for s in d.sources])
        return values[name]

    def _buffer(self, name: str) -> torch.Tensor:
        if self.buffers is None:
            with params_on_meta():
                model, _ = _model_of(self.factory())
            self.buffers = dict(model.named_buffers(remove_duplicate=False))
        value = self.buffers.get(name)
        if value is None or value.is_meta:
            raise CheckpointError(f"no value for the non-persistent buffer {name}: the factory builds it on meta")
        return value


# ---------------------------------------------------------------- writing

def _split(order: list[str], outputs: dict, limit: int) -> list[list[str]]:
    """`order` cut into consecutive shards of at most `limit` bytes (a larger tensor alone)."""
    shards, size = [[]], 0
    for name in order:
        n = _nbytes(outputs[name])
        if shards[-1] and size + n > limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def _shard_names(shards: list[list[str]], sharded: bool) -> dict[str, list[str]]:
    if not sharded and len(shards) == 1:
        return {SINGLE: shards[0]}
    return {f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors": keys for i, keys in enumerate(shards)}


class _Writer:
    """Writes the shards in order, each header first (every output's dtype and shape is known
    from the plan) and then each tensor's bytes as it is computed, so no shard is held whole."""

    def __init__(self, out_dir: str, shards: dict[str, list[str]], outputs: dict):
        self.out_dir, self.outputs = out_dir, outputs
        self.shards = list(shards.items())
        self.current, self.file, self.pending = -1, None, []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.file is not None:
            self.file.close()
        if exc[0] is None and (self.pending or self.current < len(self.shards) - 1):
            raise RuntimeError("not every planned tensor was written")

    def write(self, name: str, value: torch.Tensor) -> int:
        if not self.pending:
            self._next()
        if name != self.pending[0]:
            raise RuntimeError(f"wrote {name} where {self.pending[0]} was planned")
        self.pending.pop(0)
        value = value.detach().contiguous()
        if value.numel():
            self.file.write(value.reshape(-1).view(torch.uint8).numpy())
        return self.current

    def _next(self):
        if self.file is not None:
            self.file.close()
        self.current += 1
        file, keys = self.shards[self.current]
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for key in keys:
            t = self.outputs[key]
            header[key] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape),
                           "data_offsets": [offset, offset + _nbytes(t)]}
            offset += _nbytes(t)
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        self.file = open(os.path.join(self.out_dir, file), "wb")
        self.file.write(struct.pack("<Q", len(text)) + text)
        self.pending = list(keys)


def _header(path: str) -> dict:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@contextmanager
def _bar(total: int, shards: int, progress: bool):
    from tqdm import tqdm
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"shard 1/{shards}",
              file=sys.stderr, disable=not progress) as bar:
        yield bar


# ---------------------------------------------------------------- the manifest

def _manifest(passes, inputs, gm, plan: _Plan, shards: dict) -> dict:
    if isinstance(passes, str):
        passes = [passes]
    names = None if passes is None else [p if isinstance(p, str) else p.name for p in passes]
    return {
        "fxrewrite_version": _version(),
        "torch_version": torch.__version__,
        "passes": names,
        "example_inputs": _input_specs(inputs),
        "source_dir": plan.source.dir,
        "derivations": [{"target": d.target, "pass_name": d.pass_name, "sources": [_jsonable(s) for s in d.sources],
                         "fn": _qualname(d.fn)} for d in gm.derivations],
        "sources_read": plan.read,  # filled in while writing: the manifest is dumped last
        "aliases": plan.aliases,
        "shards": shards,
    }


def _input_specs(inputs) -> dict:
    def spec(t):
        return {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
    if isinstance(inputs, dict):
        return {"kind": "kwargs", "inputs": [{"name": k, **spec(v)} for k, v in inputs.items()]}
    return {"kind": "args", "inputs": [spec(v) for v in inputs]}


def _meta_inputs(specs: dict):
    def make(s):
        return torch.empty(s["shape"], dtype=getattr(torch, s["dtype"]), device="meta")
    if specs["kind"] == "kwargs":
        return {s["name"]: make(s) for s in specs["inputs"]}
    return tuple(make(s) for s in specs["inputs"])


def _qualname(fn) -> str:
    fn = getattr(fn, "__wrapped__", fn)
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def _jsonable(value):
    return value if value is None or isinstance(value, (str, int, float, bool)) else repr(value)


def _version() -> str:
    try:
        return metadata.version("fx-rewrite")
    except metadata.PackageNotFoundError:
        return "unknown"


def _dump(path: str, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
