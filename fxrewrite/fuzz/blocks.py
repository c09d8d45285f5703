"""What each block of a program builds (`BUILD`) and computes (`APPLY`).

A block is a dict with an "op" key and static attributes. `BUILD[op](spec, shape)` makes the
block's modules (an nn.ModuleDict) for an input of `shape`; input channels are read from that
shape, not stored in the spec, so a shrunk program whose blocks were dropped still builds.
`APPLY[op](mods, spec, x)` is the block's forward: plain Python over static data, which
`symbolic_trace` unrolls (the model adds the block's input shape as `spec["in_shape"]`, so
nothing asks a traced tensor for its rank). Names of modules say what they are (`conv`, `tconv`, `bn`, `b0_conv`),
because coverage maps the report's records back to constructs through them.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from fxrewrite.rewrite.nn import ELN, DyT, PartialRMSNorm

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
TCONV = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
ACTS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "hardswish": F.hardswish, "tanh": torch.tanh}
ACT_MODULES = {"relu": nn.ReLU, "silu": nn.SiLU, "hardswish": nn.Hardswish}  # those with inplace=True


class GrammarError(ValueError):
    """The program cannot be built for this input shape (a shrink candidate that broke shapes)."""


def randomize_bn(bn: nn.Module) -> nn.Module:
    """Non-trivial statistics: a fresh BN (mean 0, var 1, weight 1, bias 0) hides folding bugs."""
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return bn


def bn_for(dim: int, c: int) -> nn.Module:
    return randomize_bn(BN[dim](c))


class Affine(nn.Module):
    """Per-channel scale (layer-scale) and shift by constants, written the way models write it:
    `x * g.view(1, -1, 1, 1) + b.view(1, -1, 1, 1)` for channels at axis 1 (ConvNeXt), and
    `x * g + b` for channels last (timm's LayerScale on 2-D/3-D linear inputs)."""

    def __init__(self, c: int, shift: bool, inplace: bool, channel_axis: int, rank: int = 2):
        super().__init__()
        self.gamma = nn.Parameter(torch.empty(c).uniform_(0.5, 1.5))
        self.beta = nn.Parameter(torch.empty(c).uniform_(-0.5, 0.5)) if shift else None
        self.inplace = inplace
        self.shape = [1, -1] + [1] * (rank - 2) if channel_axis == 1 else [-1]  # static: traced as constants

    def forward(self, x):
        shape = self.shape
        g = self.gamma.view(shape) if shape != [-1] else self.gamma
        y = x.mul_(g) if self.inplace else x * g
        if self.beta is not None:
            y = y + (self.beta.view(shape) if shape != [-1] else self.beta)
        return y


def groups_of(spec: dict, cin: int, cout: int) -> int:
    g = cin if spec.get("groups") == "dw" else int(spec.get("groups", 1))
    if cin % g or cout % g:
        raise GrammarError(f"groups {g} do not divide {cin} -> {cout}")
    return g


def cout_of(spec: dict, cin: int) -> int:
    return cin if spec.get("cout") in (None, "same") else int(spec["cout"])


def act_modules(spec: dict, mods: dict):
    if spec.get("act") and spec.get("act_how") == "module" and spec["act"] in ACT_MODULES:
        mods["act"] = ACT_MODULES[spec["act"]](inplace=True)


def activate(mods, spec: dict, x):
    fn = spec.get("act")
    if not fn:
        return x
    how = spec.get("act_how", "function")
    if how == "module" and "act" in mods:
        return mods["act"](x)
    if how == "method" and fn in ("relu", "tanh"):
        return x.relu_() if fn == "relu" else x.tanh_()
    return ACTS[fn](x)


def conv_module(spec: dict, dim: int, cin: int, transposed: bool = False) -> nn.Module:
    cout = cout_of(spec, cin)
    g = groups_of(spec, cin, cout)
    kw = dict(stride=spec.get("stride", 1), dilation=spec.get("dil", 1), groups=g, bias=spec.get("bias", True))
    if transposed:
        return TCONV[dim](cin, cout, spec["k"], padding=spec.get("pad", 0),
                          output_padding=spec.get("outpad", 0), **kw)
    return CONV[dim](cin, cout, spec["k"], padding=spec.get("pad", 0),
                     padding_mode=spec.get("mode", "zeros"), **kw)


def post(mods, spec: dict, y):
    """Optional BN, per-channel affine and activation after a block's main op."""
    if "bn" in mods:
        y = mods["bn"](y)
    if "scale" in mods:
        y = mods["scale"](y)
    return activate(mods, spec, y)


def post_modules(spec: dict, mods: dict, dim: int, c: int):
    if spec.get("bn"):
        mods["bn"] = bn_for(dim, c)
    if spec.get("scale"):
        mods["scale"] = Affine(c, spec["scale"] == "affine", spec.get("scale_inplace", False), 1, dim + 2)
    act_modules(spec, mods)


# ------------------------------------------------------------------ image blocks (N, C, *spatial)

def build_conv(spec, shape):
    dim, mods = len(shape) - 2, {}
    mods["tconv" if spec["op"] == "convT" else "conv"] = conv_module(spec, dim, shape[1], spec["op"] == "convT")
    post_modules(spec, mods, dim, cout_of(spec, shape[1]))
    return nn.ModuleDict(mods)


def apply_conv(mods, spec, x):
    return post(mods, spec, mods["tconv" if spec["op"] == "convT" else "conv"](x))


def build_branches(spec, shape):
    cin, mods = shape[1], {}
    for i, b in enumerate(spec["branches"]):
        kind = b["kind"]
        cout = cout_of(spec, cin)
        if kind in ("identity", "bn", "avgpool") and cout != cin:
            raise GrammarError(f"{kind} branch needs cout == cin")
        if kind == "conv":
            mods[f"b{i}_conv"] = conv_module({**b, "cout": cout}, 2, cin)
        elif kind == "seq":
            mods[f"b{i}_conv1"] = nn.Conv2d(cin, b["mid"], 1, bias=b.get("bias1", False))
            if b.get("bn1"):
                mods[f"b{i}_bn1"] = bn_for(2, b["mid"])
            mods[f"b{i}_conv"] = conv_module({**b, "cout": cout, "groups": 1}, 2, b["mid"])
        elif kind == "avgpool":
            mods[f"b{i}_pool"] = nn.AvgPool2d(b["k"], b["stride"], b["pad"], count_include_pad=b["cip"])
        if b.get("bn") or kind == "bn":
            mods[f"b{i}_bn"] = bn_for(2, cout)
    act_modules(spec, mods)
    return nn.ModuleDict(mods)


def apply_branches(mods, spec, x):
    total = None
    for i, b in enumerate(spec["branches"]):
        y = x
        if b["kind"] == "seq":
            y = mods[f"b{i}_conv1"](y)
            y = mods[f"b{i}_bn1"](y) if f"b{i}_bn1" in mods else y
        for key in ("conv", "pool", "bn"):
            if f"b{i}_{key}" in mods:
                y = mods[f"b{i}_{key}"](y)
        total = y if total is None else total + y
    return activate(mods, spec, total)


def build_chain(spec, shape):
    dim, cin = len(shape) - 2, shape[1]
    mods = {"conv1": CONV[dim](cin, spec["mid"], 1, bias=spec["bias1"]),
            "conv2": CONV[dim](spec["mid"], cout_of(spec, cin), spec["k"], padding=spec["pad"], bias=spec["bias2"])}
    post_modules(spec, mods, dim, cout_of(spec, cin))
    return nn.ModuleDict(mods)


def apply_chain(mods, spec, x):
    return post(mods, spec, mods["conv2"](mods["conv1"](x)))


def build_residual(spec, shape):
    if len(shape) == 2 or spec.get("linear"):
        mods = {"linear": nn.Linear(shape[-1], shape[-1])}
    else:
        dim = len(shape) - 2
        mods = {"conv": CONV[dim](shape[1], shape[1], spec["k"], padding=spec["k"] // 2)}
        if spec.get("bn"):
            mods["bn"] = bn_for(dim, shape[1])
    return nn.ModuleDict(mods)


def apply_residual(mods, spec, x):
    y = mods["linear"](x) if "linear" in mods else mods["conv"](x)
    y = mods["bn"](y) if "bn" in mods else y
    how = spec["add"]
    if how == "iadd":
        y += x
        return y
    if how == "add_":
        return y.add_(x)
    if how == "x_add_":  # mutates the block's input after the conv read it
        return x.add_(y)
    return y + x


def build_cat(spec, shape):
    dim, cin = len(shape) - 2, shape[1]
    mods = {"conv_a": CONV[dim](cin, spec["c1"], 1)}
    if not spec["with_input"]:
        mods["conv_b"] = CONV[dim](cin, spec["c2"], 3, padding=1)
        mods["bn_b"] = bn_for(dim, spec["c2"])
    return nn.ModuleDict(mods)


def apply_cat(mods, spec, x):
    a = mods["conv_a"](x)
    b = x if spec["with_input"] else mods["bn_b"](mods["conv_b"](x))
    return torch.cat([a, b], dim=1)


def build_shared(spec, shape):
    dim, c = len(shape) - 2, shape[1]
    return nn.ModuleDict({"conv": CONV[dim](c, c, spec["k"], padding=spec["k"] // 2),
                          "bn1": bn_for(dim, c), "bn2": bn_for(dim, c)})


def apply_shared(mods, spec, x):
    y = F.relu(mods["bn1"](mods["conv"](x)))
    return mods["bn2"](mods["conv"](y))


def build_tied(spec, shape):
    dim, cin = len(shape) - 2, shape[1]
    a = CONV[dim](cin, spec["cout"], spec["k"], padding=spec["k"] // 2)
    b = CONV[dim](cin, spec["cout"], spec["k"], padding=spec["k"] // 2)
    b.weight = a.weight
    return nn.ModuleDict({"conv_a": a, "bn_a": bn_for(dim, spec["cout"]), "conv_b": b})


def apply_tied(mods, spec, x):
    return mods["bn_a"](mods["conv_a"](x)) + mods["conv_b"](x)


def build_readtwice(spec, shape):
    dim, cin = len(shape) - 2, shape[1]
    return nn.ModuleDict({"conv": CONV[dim](cin, spec["cout"], 1), "bn": bn_for(dim, spec["cout"])})


def apply_readtwice(mods, spec, x):
    y = mods["conv"](x)
    return mods["bn"](y) + y


def build_mutate(spec, shape):
    dim, cin = len(shape) - 2, shape[1]
    mods = {"conv": CONV[dim](cin, spec["cout"], spec["k"], padding=spec["k"] // 2), "bn": bn_for(dim, spec["cout"])}
    if spec["how"] == "module":
        mods["relu"] = nn.ReLU(inplace=True)
    return nn.ModuleDict(mods)


def mutate(mods, how: str, x):
    if how == "relu_":
        return x.relu_()
    if how == "add_":
        return x.add_(0.5)
    if how == "iadd":
        x += 0.5
        return x
    if how == "mul_":
        return x.mul_(2.0)
    return mods["relu"](x)


def apply_mutate(mods, spec, x):
    """`y = conv(x); x.relu_(); cat([bn(y), x])`: a read before (or after) an in-place write."""
    if spec["when"] == "before":
        x = mutate(mods, spec["how"], x)
        y = mods["conv"](x)
    else:
        y = mods["conv"](x)
        x = mutate(mods, spec["how"], x)
    return torch.cat([mods["bn"](y), x], dim=1)


def build_flatten_fc(spec, shape):
    cin = shape[1]
    conv = nn.Conv2d(cin, spec["cout"], 3, padding=spec["pad"])
    h, w = (s + 2 * spec["pad"] - 2 for s in shape[2:])
    return nn.ModuleDict({"conv": conv, "fc": nn.Linear(spec["cout"] * h * w, spec["out"])})


def apply_flatten_fc(mods, spec, x):
    return mods["fc"](torch.flatten(mods["conv"](x), 1))


def apply_view(mods, spec, x):
    how = spec["how"]
    if how == "view":
        return x.view(x.shape[0], x.shape[1], -1).view(x.shape)
    if how == "reshape":
        return x.reshape(x.shape[0], -1).reshape(x.shape)
    return torch.flatten(x, 2).reshape(x.shape)


def apply_to_vec(mods, spec, x):
    if spec["how"] == "mean":
        return x.mean(dim=tuple(range(2, len(spec["in_shape"]))))
    return torch.flatten(mods["pool"](x), 1)


def build_to_vec(spec, shape):
    pool = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}[len(shape) - 2](1)
    return nn.ModuleDict({"pool": pool} if spec["how"] == "pool" else {})


def apply_to_seq(mods, spec, x):
    return torch.flatten(x, 2).transpose(1, 2)


def build_bn_only(spec, shape):
    mods = {"bn": bn_for(len(shape) - 2, shape[1])}
    if spec.get("ssf"):  # SSF: a learned per-channel scale and shift after the norm
        mods["ssf"] = Affine(shape[1], True, False, 1, len(shape))
    return nn.ModuleDict(mods)


def apply_bn_only(mods, spec, x):
    y = mods["bn"](x)
    return mods["ssf"](y) if "ssf" in mods else y


class ComputedWeightConv(nn.Module):
    """A conv whose forward computes its weight from parameters (`ws_conv` block)."""

    def __init__(self, dim: int, cin: int, cout: int, k: int, how: str, bias: bool):
        super().__init__()
        self.conv, self.how = CONV[dim](cin, cout, k, padding=k // 2, bias=bias), how
        fan_in = cin * k ** dim
        if how == "scaled":
            self.gain = nn.Parameter(torch.empty(cout, *[1] * (dim + 1)).uniform_(0.5, 1.5))
            self.scale = fan_in ** -0.5
        if how == "lora":
            self.lora_a = nn.Parameter(torch.randn(2, fan_in) * 0.3)
            self.lora_b = nn.Parameter(torch.randn(cout, 2) * 0.3)

    def weight(self):
        w = self.conv.weight
        if self.how == "lora":
            return w + (self.lora_b @ self.lora_a).reshape_as(w) * 0.5
        gain = (self.gain * self.scale).view(-1) if self.how == "scaled" else None
        return F.batch_norm(w.reshape(1, w.shape[0], -1), None, None, weight=gain, training=True, momentum=0.0,
                            eps=1e-5).reshape_as(w)

    def forward(self, x):
        return self.conv._conv_forward(x, self.weight(), self.conv.bias)


def build_ws_conv(spec, shape):
    dim, mods = len(shape) - 2, {}
    mods["conv"] = ComputedWeightConv(dim, shape[1], spec["cout"], spec["k"], spec["how"], spec["bias"])
    post_modules(spec, mods, dim, spec["cout"])
    return nn.ModuleDict(mods)


def apply_ws_conv(mods, spec, x):
    return post(mods, spec, mods["conv"](x))


def build_bn_view(spec, shape):
    return nn.ModuleDict({"conv": CONV[len(shape) - 2](shape[1], spec["cout"], 1),
                          "bn": randomize_bn(nn.BatchNorm1d(spec["cout"]))})


def apply_bn_view(mods, spec, x):
    y = mods["conv"](x)
    return mods["bn"](y.flatten(2)).reshape(y.shape)


def build_lin_prep_bn(spec, shape):
    return nn.ModuleDict({"bn": randomize_bn(nn.BatchNorm1d(shape[-1]))})


def apply_lin_prep_bn(mods, spec, x):
    return mods["bn"](x.transpose(1, 2)).transpose(1, 2)


def build_lin_bn_view(spec, shape):
    return nn.ModuleDict({"linear": nn.Linear(shape[-1], spec["out"]),
                          "bn": randomize_bn(nn.BatchNorm1d(spec["out"]))})


def apply_lin_bn_view(mods, spec, x):
    y = mods["linear"](x)
    if spec["how"] == "flatten":
        return mods["bn"](y.flatten(0, 1)).reshape(y.shape)
    return mods["bn"](y.transpose(1, 2)).transpose(1, 2)


# ------------------------------------------------------------------ any domain

def build_affine(spec, shape):
    axis = 1 if len(shape) > 3 or (len(shape) == 3 and spec.get("axis") == 1) else -1
    c = shape[axis]
    return nn.ModuleDict({"scale": Affine(c, spec["kind"] == "affine", spec.get("inplace", False), axis, len(shape))})


def apply_affine(mods, spec, x):
    return mods["scale"](x)


def build_act(spec, shape):
    mods = {}
    act_modules(spec, mods)
    return nn.ModuleDict(mods)


def apply_act(mods, spec, x):
    return activate(mods, spec, x)


def apply_control(mods, spec, x):
    """Python control flow on a shape: symbolic_trace cannot follow it, so capture uses export."""
    if x.shape[-1] > spec["thresh"]:
        return x * 2.0
    return x - 1.0


# ------------------------------------------------------------------ linear blocks (N, F) / (N, L, F)

def build_linear(spec, shape):
    mods = {"linear": nn.Linear(shape[-1], spec["out"], bias=spec.get("bias", True))}
    if spec.get("bn"):  # BatchNorm1d normalises axis 1: the features for (N, F), the length for (N, L, F)
        mods["bn"] = randomize_bn(nn.BatchNorm1d(spec["out"] if len(shape) == 2 else shape[1]))
    if spec.get("scale"):
        mods["scale"] = Affine(spec["out"], spec["scale"] == "affine", False, -1)
    act_modules(spec, mods)
    return nn.ModuleDict(mods)


def apply_linear(mods, spec, x):
    return post(mods, spec, mods["linear"](x))


def build_linchain(spec, shape):
    return nn.ModuleDict({"linear1": nn.Linear(shape[-1], spec["mid"], bias=spec["bias1"]),
                          "linear2": nn.Linear(spec["mid"], spec["out"], bias=spec["bias2"])})


def apply_linchain(mods, spec, x):
    return mods["linear2"](mods["linear1"](x))


def build_lora(spec, shape):
    f = shape[-1]
    mods = {"linear": nn.Linear(f, spec["out"]), "lora_a": nn.Linear(f, spec["rank"], bias=False),
            "lora_b": nn.Linear(spec["rank"], spec["out"], bias=False)}
    nn.init.normal_(mods["lora_b"].weight, std=0.3)  # zero-initialised B would hide the branch
    return nn.ModuleDict(mods)


def apply_lora(mods, spec, x):
    if spec.get("merged"):
        w = mods["linear"].weight + (mods["lora_b"].weight @ mods["lora_a"].weight) * spec["s"]
        return F.linear(x, w, mods["linear"].bias)
    return mods["linear"](x) + mods["lora_b"](mods["lora_a"](x)) * spec["s"]


class CastNorm(nn.Module):
    """An affine-free LayerNorm / RMSNorm computed in float32, cast back to the input's dtype, then
    times its weight: transformers' RMSNorm in half precision (a real cast in bfloat16 programs,
    a round trip through float32 in float64 ones, nothing in float32 ones)."""

    def __init__(self, d: int, rms: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(d).uniform_(0.5, 1.5))
        self.d, self.rms = d, rms

    def forward(self, x):
        norm = F.rms_norm if self.rms else F.layer_norm
        return self.weight * norm(x.float(), (self.d,)).to(x.dtype)


def build_layernorm(spec, shape):
    """A LayerNorm (or RMSNorm: spec "rms") over the last axis, affine; spec "swapped": one of the
    swaps' norms instead (pRMSNorm, ELN, DyT); spec "cast": `CastNorm`;
    spec "fanout": two linears read it, their outputs multiplied (a GLU: nothing to merge)."""
    d = shape[-1]
    swapped = spec.get("swapped")
    if swapped:  # pRMSNorm over the first half, ELN, DyT (`rewrite.nn`), their parameters drawn
        ln = {"prms": lambda: PartialRMSNorm(d, p=0.5, eps=1e-6), "eln": lambda: ELN(d, beta_init=float(d)),
              "dyt": lambda: DyT(d, alpha_init=0.5)}[swapped]()
        with torch.no_grad():
            ln.weight.uniform_(0.5, 1.5)
            if getattr(ln, "bias", None) is not None:
                ln.bias.uniform_(-0.5, 0.5)
    elif spec.get("cast"):
        ln = CastNorm(d, spec.get("rms", False))
    else:
        ln = nn.RMSNorm(d) if spec.get("rms") else nn.LayerNorm(d)
        with torch.no_grad():
            ln.weight.uniform_(0.5, 1.5)
            if getattr(ln, "bias", None) is not None:
                ln.bias.uniform_(-0.5, 0.5)
    mods = {"ln": ln}
    if spec.get("ssf"):
        mods["ssf"] = Affine(d, True, False, -1)
    if spec.get("fanout"):  # two linears read the norm (as q, k, v do)
        mods["fan0"], mods["fan1"] = nn.Linear(d, d), nn.Linear(d, d, bias=False)
    act_modules(spec, mods)
    return nn.ModuleDict(mods)


def apply_layernorm(mods, spec, x):
    y = mods["ln"](x)
    y = mods["ssf"](y) if "ssf" in mods else y
    if "fan0" in mods:
        y = mods["fan0"](y) * mods["fan1"](y)
    return activate(mods, spec, y)


class Stateful(nn.Module):
    """A layer whose forward writes its own buffer, then reads it: a call counter (`add_`, `+=`,
    or through a view of a larger state) scaling the output, or a running mean of the channels
    (an EMA, as BatchNorm's statistics move in training) subtracted from it. The output depends
    on how many calls came before, so an optimised copy must start from the user's state and
    keep writing it (a capture that read the buffer as a constant would fold `* calls` away)."""

    def __init__(self, how: str, c: int, channel_axis: int, rank: int):
        super().__init__()
        self.how = how
        self.shape = [1, -1] + [1] * (rank - 2) if channel_axis == 1 else [-1]
        self.dims = [d for d in range(rank) if d != channel_axis % rank]
        if how == "ema":
            self.register_buffer("mean", torch.empty(c).uniform_(-0.5, 0.5))
        else:
            self.register_buffer("calls", torch.ones(3 if how == "view" else ()))

    def forward(self, y):
        if self.how == "ema":
            self.mean.mul_(0.5).add_(0.5 * y.detach().mean(self.dims))
            return y - self.mean.view(self.shape)
        if self.how == "add_":
            self.calls.add_(1)
        elif self.how == "iadd":
            self.calls += 1
        else:  # a write through a view: the buffer changes though no op names it
            self.calls[1:].add_(1)
            return y * self.calls[-1]
        return y * self.calls


def build_stateful(spec, shape):
    if spec["linear"]:  # (N, F) or (N, L, F): features last; images (N, C, ...): channels at axis 1
        mods = {"layer": nn.Linear(shape[-1], spec["out"])}
        if spec.get("bn") and len(shape) == 2:
            mods["bn"] = bn_for(1, spec["out"])
        mods["state"] = Stateful(spec["how"], spec["out"], -1, len(shape))
        return nn.ModuleDict(mods)
    dim = len(shape) - 2
    mods = {"layer": CONV[dim](shape[1], spec["out"], 1)}
    if spec.get("bn"):
        mods["bn"] = bn_for(dim, spec["out"])
    mods["state"] = Stateful(spec["how"], spec["out"], 1, len(shape))
    return nn.ModuleDict(mods)


def apply_stateful(mods, spec, x):
    y = mods["layer"](x)
    y = mods["bn"](y) if "bn" in mods else y
    return mods["state"](y)


def _none(spec, shape):
    return nn.ModuleDict()


_KINDS = ["conv", "branches", "chain", "residual", "cat", "shared", "tied", "readtwice", "mutate", "flatten_fc",
          "view", "to_vec", "to_seq", "bn_only", "affine", "act", "control", "linear", "linchain", "lora", "layernorm",
          "ws_conv", "bn_view", "lin_bn_view", "lin_prep_bn", "stateful"]
_NO_MODULES = {"view", "to_seq", "control"}  # blocks with a forward and nothing to build

BUILD = {k: _none if k in _NO_MODULES else globals()[f"build_{k}"] for k in _KINDS}
APPLY = {k: globals()[f"apply_{k}"] for k in _KINDS}
BUILD["convT"], APPLY["convT"] = build_conv, apply_conv  # a transposed conv is built and run by the conv block
