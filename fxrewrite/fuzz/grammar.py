"""Random model programs: plain data, so a failing one can be printed, rebuilt and shrunk.

A program is a dict: the input (shape, dtype, channels-last), model-wide extras (train mode,
hooks, weight norm) and a list of blocks (`blocks.BUILD` / `blocks.APPLY`). The generator tracks
the tensor's shape block by block so that every model it draws runs eagerly on its inputs:
ops that would not fit the current shape are not drawn, and branches of a multi-branch block
are kept only when their output size matches the first branch's. Sizes stay tiny (batch 2, a few
channels, spatial 5-10) so that a case costs milliseconds, not seconds.
"""
from __future__ import annotations

import random

ACT_NAMES = ["relu", "gelu", "silu", "hardswish", "tanh"]


def conv_size(n: int, k: int, s: int = 1, p: int = 0, d: int = 1) -> int:
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


def tconv_size(n: int, k: int, s: int, p: int, d: int, op: int) -> int:
    return (n - 1) * s - 2 * p + d * (k - 1) + op + 1


def _act(r: random.Random, spec: dict, p: float = 0.5) -> dict:
    if r.random() < p:
        spec["act"] = r.choice(ACT_NAMES)
        spec["act_how"] = r.choice(["function", "function", "method", "module"])
    return spec


def _channels(r: random.Random) -> int:
    return r.randint(2, 8)


def _groups(r: random.Random, cin: int, cout: int):
    """1, "dw" (depthwise: cout == cin) or a common divisor > 1; returns (groups, cout)."""
    roll = r.random()
    if roll < 0.2:
        return "dw", cin
    common = [g for g in range(2, cin + 1) if cin % g == 0 and cout % g == 0]
    if roll < 0.4 and common:
        return r.choice(common), cout
    return 1, cout


def _conv_padding(r: random.Random, k: int, dil: int, stride: int):
    roll = r.random()
    if stride == 1 and roll < 0.15:
        return "same"
    if roll < 0.25:
        return "valid"
    aligned = dil * (k - 1) // 2
    return r.choice([aligned, aligned, aligned, 0, aligned + 1])


def gen_conv(r: random.Random, shape: list, flags: dict):
    dim, cin, spatial = len(shape) - 2, shape[1], shape[2:]
    k = r.choice([1, 3] if dim == 3 else [1, 2, 3, 3, 5])
    dil = 2 if r.random() < 0.15 and min(spatial) > 2 * (k - 1) + 1 else 1
    stride = 2 if min(spatial) >= 6 and r.random() < 0.2 else 1
    pad = _conv_padding(r, k, dil, stride)
    groups, cout = _groups(r, cin, _channels(r))
    spec = {"op": "conv", "cout": cout, "k": k, "stride": stride, "pad": pad, "dil": dil, "groups": groups,
            "bias": r.random() < 0.7, "bn": r.random() < 0.7}
    p = 0 if pad == "valid" else (dil * (k - 1) + 1) // 2 if pad == "same" else pad
    if r.random() < 0.35 and max(p, dil * (k - 1)) < min(spatial):
        spec["mode"] = r.choice(["reflect", "replicate", "circular"])
    if r.random() < 0.2:
        spec["scale"] = r.choice(["layerscale", "affine"])
        spec["scale_inplace"] = r.random() < 0.3
    _act(r, spec)
    if pad == "same":
        out = list(spatial)
    else:
        out = [conv_size(n, k, stride, 0 if pad == "valid" else pad, dil) for n in spatial]
    return (spec, [shape[0], cout] + out) if min(out) >= 1 else None


def gen_convT(r: random.Random, shape: list, flags: dict):
    cin, spatial = shape[1], shape[2:]
    k = r.choice([1, 2, 3])
    stride = 2 if max(spatial) <= 6 and r.random() < 0.4 else 1
    dil = 2 if r.random() < 0.15 else 1
    pad = r.randint(0, dil * (k - 1) // 2)
    outpad = r.randint(0, max(stride, dil) - 1)
    groups, cout = _groups(r, cin, _channels(r))
    spec = {"op": "convT", "cout": cout, "k": k, "stride": stride, "pad": pad, "outpad": outpad, "dil": dil,
            "groups": groups, "bias": r.random() < 0.6, "bn": r.random() < 0.8}
    out = [tconv_size(n, k, stride, pad, dil, outpad) for n in spatial]
    if min(out) < 1 or max(out) > 14:
        return None
    return _act(r, spec, 0.3), [shape[0], cout] + out


def gen_chain(r: random.Random, shape: list, flags: dict):
    k = r.choice([1, 3, 3])
    pad = r.choice([0, k // 2, k // 2])
    out = [conv_size(n, k, 1, pad) for n in shape[2:]]
    if min(out) < 1:
        return None
    spec = {"op": "chain", "mid": _channels(r), "cout": _channels(r), "k": k, "pad": pad,
            "bias1": r.random() < 0.5, "bias2": r.random() < 0.7, "bn": r.random() < 0.5}
    return _act(r, spec, 0.3), [shape[0], spec["cout"]] + out


def gen_residual(r: random.Random, shape: list, flags: dict):
    spec = {"op": "residual", "k": r.choice([1, 3]), "bn": r.random() < 0.7,
            "add": r.choice(["plus", "iadd", "add_", "x_add_"])}
    return spec, list(shape)


def gen_cat(r: random.Random, shape: list, flags: dict):
    if shape[1] > 8:
        return None
    spec = {"op": "cat", "c1": _channels(r), "c2": _channels(r), "with_input": r.random() < 0.5}
    extra = shape[1] if spec["with_input"] else spec["c2"]
    return spec, [shape[0], spec["c1"] + extra] + shape[2:]


def gen_shared(r: random.Random, shape: list, flags: dict):
    return {"op": "shared", "k": r.choice([1, 3])}, list(shape)


def gen_tied(r: random.Random, shape: list, flags: dict):
    spec = {"op": "tied", "cout": _channels(r), "k": r.choice([1, 3])}
    return spec, [shape[0], spec["cout"]] + shape[2:]


def gen_readtwice(r: random.Random, shape: list, flags: dict):
    spec = {"op": "readtwice", "cout": _channels(r)}
    return spec, [shape[0], spec["cout"]] + shape[2:]


def gen_mutate(r: random.Random, shape: list, flags: dict):
    if shape[1] > 8:
        return None
    spec = {"op": "mutate", "cout": _channels(r), "k": r.choice([1, 3]),
            "how": r.choice(["relu_", "add_", "iadd", "mul_", "module"]), "when": r.choice(["after", "after", "before"])}
    return spec, [shape[0], spec["cout"] + shape[1]] + shape[2:]


def gen_flatten_fc(r: random.Random, shape: list, flags: dict):
    if len(shape) != 4 or shape[2] * shape[3] > 100:
        return None
    pad = r.choice([0, 1, 1]) if min(shape[2:]) >= 3 else 1
    spec = {"op": "flatten_fc", "cout": r.randint(2, 6), "pad": pad, "out": _channels(r)}
    return spec, [shape[0], spec["out"]]


def gen_view(r: random.Random, shape: list, flags: dict):
    how = r.choice(["reshape", "flatten"] if flags.get("channels_last") else ["view", "reshape", "flatten"])
    return {"op": "view", "how": how}, list(shape)


def gen_to_vec(r: random.Random, shape: list, flags: dict):
    return {"op": "to_vec", "how": r.choice(["mean", "pool"])}, shape[:2]


def gen_to_seq(r: random.Random, shape: list, flags: dict):
    if len(shape) != 4 or shape[2] * shape[3] > 64:
        return None
    return {"op": "to_seq"}, [shape[0], shape[2] * shape[3], shape[1]]


def gen_bn_only(r: random.Random, shape: list, flags: dict):
    return _act(r, {"op": "bn_only", "ssf": r.random() < 0.4}, 0.7), list(shape)


def gen_ws_conv(r: random.Random, shape: list, flags: dict):
    """A conv whose weight its forward computes: BiT's weight standardisation, NF-Nets' scaled
    WS with a gain, or a LoRA update merged into the kernel."""
    k = r.choice([1, 3])
    spec = {"op": "ws_conv", "cout": _channels(r), "k": k, "how": r.choice(["std", "scaled", "lora"]),
            "bias": r.random() < 0.5, "bn": r.random() < 0.4}
    return _act(r, spec, 0.3), [shape[0], spec["cout"]] + list(shape[2:])


def gen_bn_view(r: random.Random, shape: list, flags: dict):
    """A conv, its output flattened to (N, C, L), a BatchNorm1d, and the shape put back (LeViT
    style BN behind a view)."""
    spec = {"op": "bn_view", "cout": _channels(r)}
    return spec, [shape[0], spec["cout"]] + list(shape[2:])


def gen_lin_prep_bn(r: random.Random, shape: list, flags: dict):
    """(N, L, F): BatchNorm1d over the features behind a transpose, read by what follows (PRepBN /
    SLAB-style transformers train BatchNorm in place of LayerNorm)."""
    return ({"op": "lin_prep_bn"}, list(shape)) if len(shape) == 3 else None


def gen_lin_bn_view(r: random.Random, shape: list, flags: dict):
    """(N, L, F) linear, then BatchNorm1d over the features behind `flatten(0, 1)` or a transpose."""
    if len(shape) != 3:
        return None
    spec = {"op": "lin_bn_view", "out": _channels(r), "how": r.choice(["flatten", "transpose"])}
    return spec, shape[:-1] + [spec["out"]]


def gen_affine(r: random.Random, shape: list, flags: dict):
    spec = {"op": "affine", "kind": r.choice(["layerscale", "affine"]), "inplace": r.random() < 0.25}
    return spec, list(shape)


def gen_act(r: random.Random, shape: list, flags: dict):
    return _act(r, {"op": "act"}, 1.0), list(shape)


def gen_control(r: random.Random, shape: list, flags: dict):
    return {"op": "control", "thresh": r.choice([3, 4, 6, 100])}, list(shape)


def gen_stateful(r: random.Random, shape: list, flags: dict, linear: bool = False):
    """A conv (images) or linear whose output a buffer the block writes each call scales or shifts."""
    spec = {"op": "stateful", "how": r.choice(["add_", "iadd", "view", "ema"]), "out": _channels(r),
            "bn": r.random() < 0.6, "linear": linear}
    return spec, shape[:-1] + [spec["out"]] if linear else [shape[0], spec["out"]] + list(shape[2:])


def gen_lin_stateful(r: random.Random, shape: list, flags: dict):
    return gen_stateful(r, shape, flags, linear=True)


# ------------------------------------------------------------------ multi-branch blocks (2-D)

def _branch_geometry(r: random.Random, kind: str, stride: int, aligned: bool):
    """Kernel, padding, dilation of a conv branch; aligned ones merge exactly (RepVGG/ACNet)."""
    k = {"1x1": 1, "1xk": 3, "kx1": 3}.get(kind, r.choice([3, 3, 5, 1, 2]))
    kh, kw = (1, k) if kind == "1xk" else (k, 1) if kind == "kx1" else (k, k)
    dil = 1 if aligned or r.random() < 0.5 else 2
    ph, pw = (dil * (kh - 1) // 2, dil * (kw - 1) // 2)
    if not aligned:
        ph, pw = ph + r.choice([0, 1]), pw + r.choice([0, 1])
        stride = r.choice([1, 2]) if r.random() < 0.3 else stride
    return {"k": [kh, kw], "pad": [ph, pw], "stride": stride, "dil": dil}


def _branch_size(b: dict, hw: list) -> list:
    if b["kind"] in ("identity", "bn"):
        return list(hw)
    if b["kind"] == "avgpool":
        return [conv_size(n, b["k"], b["stride"], b["pad"]) for n in hw]
    k, p = b["k"], b["pad"]
    return [conv_size(n, k[i], b["stride"], p[i], b["dil"]) for i, n in enumerate(hw)]


def _propose_branch(r: random.Random, kind: str, stride: int, cin: int, cout: int, aligned: bool) -> dict:
    if kind in ("identity", "bn"):
        return {"kind": kind}
    if kind == "avgpool":
        k, pad = (3, 1) if aligned else r.choice([(2, 0), (3, 0), (3, 1)])
        return {"kind": "avgpool", "k": k, "stride": stride, "pad": pad, "cip": r.random() < 0.5,
                "bn": r.random() < 0.7}
    b = {"kind": "seq" if kind == "1x1_kxk" else "conv", **_branch_geometry(r, kind, stride, aligned),
         "bias": r.random() < 0.3, "bn": r.random() < 0.8}
    if kind == "1x1_kxk":
        b.update(mid=_channels(r), bias1=r.random() < 0.3, bn1=r.random() < 0.5)
    elif kind == "dw":
        b["groups"] = "dw"
    elif kind == "grouped":
        common = [g for g in range(2, cin + 1) if cin % g == 0 and cout % g == 0]
        b["groups"] = r.choice(common) if common else 1
    return b


def gen_branches(r: random.Random, shape: list, flags: dict):
    """A sum of branches over one input: kxk, 1x1, 1xk/kx1, identity, BN, avg-pool, 1x1->kxk,
    grouped, depthwise; about one branch in five has geometry that must not merge."""
    if len(shape) != 4:
        return None
    cin, hw = shape[1], shape[2:]
    same = r.random() < 0.75
    cout = cin if same else _channels(r)
    stride = 2 if min(hw) >= 6 and r.random() < 0.25 else 1
    # weights chosen so that each kind is merged at least 500 times in 10,000 cases (RELIABILITY.md)
    kinds = ["kxk", "1x1"] + ["1x1_kxk"] * 3 + ["1xk", "kx1"] * 2 + ["grouped"] * 3 + (
        ["identity"] * 5 + ["bn"] * 7 + ["dw"] * 4 + ["avgpool"] * 4 if same else [])
    main = _propose_branch(r, "kxk", stride, cin, cout, r.random() < 0.85)
    target = _branch_size(main, hw)
    if min(target) < 1:
        return None
    branches = [main]
    for _ in range(r.randint(2, 4)):
        kind = r.choice(kinds)
        for _attempt in range(6):
            b = _propose_branch(r, kind, stride, cin, cout, r.random() < 0.8)
            if _branch_size(b, hw) == target:
                branches.append(b)
                break
    spec = _act(r, {"op": "branches", "cout": cout, "branches": branches}, 0.5)
    return spec, [shape[0], cout] + target


# ------------------------------------------------------------------ linear blocks (N, F) / (N, L, F)

def gen_linear(r: random.Random, shape: list, flags: dict):
    spec = {"op": "linear", "out": _channels(r), "bias": r.random() < 0.7, "bn": r.random() < 0.6}
    if r.random() < 0.2:
        spec["scale"] = r.choice(["layerscale", "affine"])
    return _act(r, spec, 0.4), shape[:-1] + [spec["out"]]


def gen_linchain(r: random.Random, shape: list, flags: dict):
    spec = {"op": "linchain", "mid": _channels(r), "out": _channels(r), "bias1": r.random() < 0.5,
            "bias2": r.random() < 0.7}
    return spec, shape[:-1] + [spec["out"]]


def gen_lora(r: random.Random, shape: list, flags: dict):
    spec = {"op": "lora", "out": _channels(r), "rank": r.randint(1, 3), "s": r.choice([0.5, 2.0]),
            "merged": r.random() < 0.4}  # merged: W + B A s computed in forward
    return spec, shape[:-1] + [spec["out"]]


def gen_layernorm(r: random.Random, shape: list, flags: dict):
    if shape[-1] < 4:  # a norm over 2-3 features amplifies rounding without bound (seed 98's (a-b)/|a-b|)
        return gen_linear(r, shape, flags)
    spec = {"op": "layernorm", "ssf": r.random() < 0.4, "rms": r.random() < 0.4, "cast": r.random() < 0.3,
            "fanout": r.random() < 0.4}
    # the swaps' norms, which lower to regions (and backward kernels) of their own
    spec["swapped"] = r.choices([None, "prms", "eln", "dyt"], weights=[7, 1, 1, 1])[0]
    return _act(r, spec, 0.6), list(shape)


def gen_lin_residual(r: random.Random, shape: list, flags: dict):
    return {"op": "residual", "linear": True, "add": r.choice(["plus", "plus", "iadd", "add_"])}, list(shape)


def gen_lin_affine(r: random.Random, shape: list, flags: dict):
    spec, out = gen_affine(r, shape, flags)
    return {**spec, "axis": -1}, out


# op tables per domain: (generator, weight)
# (weights chosen so that 10,000 cases draw every construct 200+ times and apply every rewrite
# kind 500+ times: RELIABILITY.md)
IMAGE_OPS = [(gen_conv, 6), (gen_convT, 3.5), (gen_branches, 15), (gen_chain, 2), (gen_residual, 2), (gen_cat, 2),
             (gen_shared, 1), (gen_tied, 1), (gen_readtwice, 1), (gen_mutate, 3.5), (gen_flatten_fc, 3.5),
             (gen_view, 2), (gen_to_vec, 1), (gen_to_seq, 1.5), (gen_bn_only, 1), (gen_affine, 3), (gen_act, 1),
             (gen_control, 0.5), (gen_ws_conv, 2), (gen_bn_view, 1.5), (gen_stateful, 1)]
LINEAR_OPS = [(gen_linear, 5), (gen_linchain, 2), (gen_lora, 2), (gen_layernorm, 4), (gen_lin_residual, 1),
              (gen_lin_affine, 2), (gen_act, 1), (gen_control, 0.5), (gen_lin_bn_view, 1.5),
              (gen_lin_prep_bn, 1.5), (gen_lin_stateful, 1)]


def _input(r: random.Random) -> tuple[str, list]:
    domain = r.choices(["2d", "1d", "3d", "vec", "seq"], weights=[55, 12, 12, 12, 13])[0]
    c = r.randint(2, 6)
    if domain == "2d":
        return "image", [2, c, r.randint(5, 10), r.randint(5, 10)]
    if domain == "1d":
        return "image", [2, c, r.randint(6, 12)]
    if domain == "3d":
        return "image", [2, c] + [r.randint(4, 6) for _ in range(3)]
    if domain == "vec":
        return "linear", [2, r.randint(3, 8)]
    return "linear", [2, r.randint(3, 6), r.randint(3, 8)]


def _blocks(r: random.Random, domain: str, shape: list, flags: dict, n: int) -> list[dict]:
    blocks = []
    while len(blocks) < n:
        table = IMAGE_OPS if domain == "image" else LINEAR_OPS
        for _try in range(20):
            gen = r.choices([g for g, _ in table], weights=[w for _, w in table])[0]
            drawn = gen(r, shape, flags)
            if drawn is not None:
                break
        else:
            return blocks
        spec, shape = drawn
        blocks.append(spec)
        if domain == "image" and len(shape) in (2, 3) and spec["op"] in ("flatten_fc", "to_vec", "to_seq"):
            domain = "linear"
    return blocks


def _extras(r: random.Random, program: dict):
    if r.random() < 0.07:
        program["train"] = True
    if r.random() < 0.08:
        program["train_bn"] = [{"bn": r.randint(0, 7)}]
    if r.random() < 0.12:
        program["hooks"] = [{"kind": r.choice(["forward", "pre"]), "leaf": r.randint(0, 15)}]
    if r.random() < 0.1:
        program["weight_norm"] = [{"conv": r.randint(0, 7), "legacy": r.random() < 0.5}]


def generate(seed: int) -> dict:
    """The program for `seed` (the same seed always gives the same program)."""
    r = random.Random(seed)
    domain, shape = _input(r)
    program = {"seed": seed, "dtype": r.choices(["float32", "float64", "bfloat16"], weights=[60, 25, 15])[0],
               "input": shape, "channels_last": len(shape) in (4, 5) and r.random() < 0.2}
    program["blocks"] = _blocks(r, domain, list(shape), program, r.randint(1, 5))
    _extras(r, program)
    return program
