"""Affine maps as one convolution or one linear layer, and the algebra that merges them.

Every linear op of a re-parameterizable block is an affine map of its input:

    conv(x, W, b, stride s, padding p, dilation d, groups g)
    BatchNorm (eval) / per-channel scale or shift = depthwise 1x1 conv (weight s, bias t)
    identity = depthwise 1x1 conv with weight 1;   zero pad by p = identity with padding p
    avg_pool(k, s, p) (count_include_pad) = depthwise kxk conv with weight 1/k^2

A `ConvMap` is such a map written as one `aten.convolution`; a `LinearMap` is one `aten.linear`
(weight None stands for the identity, so that a wide identity is never materialised).
The operations below combine maps exactly, or raise `NotMergeable` with the reason:

- **sum** (RepVGG, ACNet, DBB, MobileOne): kernels are zero-padded into one common kernel, each
  placed so that it reads the same input pixels as before. Per spatial axis, a branch with kernel
  k, padding p, dilation d reads rows o*s - p + d*u, u < k. In the merged kernel (K, P, D) it sits
  at offset t = (P - p) / D. This needs equal strides, one dilation among kernels wider than 1,
  integer offsets, and equal `2p - d(k - 1)` for every branch (the same output size for every
  input size). Groups: a conv with g groups is also block-diagonal for any divisor of g, so the
  sum has gcd(g_i) groups (the identity counts as depthwise: groups = channels).
- **composition** b after a (1x1 -> kxk, kxk -> 1x1, kxk -> kxk): the kernel is the full 2-D
  convolution of the two kernels, summed over the middle channels, computed with one grouped
  `conv2d`. Exact when the second map reads only values the first computed: its padding is 0, or
  the first map is pointwise (or reads only padding) *and* its bias is zero, because the second
  conv pads the first's output with zeros where the merged conv would see the first's bias.
  The first map must have stride 1 unless the second is 1x1 without padding (then the strides
  multiply).
- **affine** after a map: W * s (per output channel), b * s + t.

All arithmetic is done in float64 by the callers' conversion; exactness here means the same
function in real arithmetic (results agree with the unmerged block up to float rounding).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from ..rewrite.values import NEEDS_VALUES, has_values


class NotMergeable(Exception):
    """The maps cannot be merged into one op exactly; the message says why."""


# ------------------------------------------------------------------ convolution maps

@dataclass
class ConvMap:
    weight: torch.Tensor  # [cout, cin / groups, kh, kw]
    bias: torch.Tensor  # [cout]
    stride: tuple
    padding: tuple
    dilation: tuple
    groups: int
    cin: int
    zero_bias: bool = False  # known zero by construction (no bias, identity, pooling): also on meta

    @property
    def cout(self) -> int:
        return self.weight.shape[0]

    @property
    def kernel(self) -> tuple:
        return tuple(self.weight.shape[2:])

    def macs_per_output(self) -> int:
        """Multiply-adds per output element."""
        return (self.cin // self.groups) * math.prod(self.kernel)

    def describe(self) -> str:
        kh, kw = self.kernel
        extra = [f"groups {self.groups}"] if self.groups > 1 else []
        extra += [f"stride {_fmt(self.stride)}"] if any(s != 1 for s in self.stride) else []
        extra += [f"dilation {_fmt(self.dilation)}"] if any(d != 1 for d in self.dilation) else []
        return f"conv {kh}x{kw}" + (f" ({', '.join(extra)})" if extra else "")


def _fmt(t):
    return str(t[0]) if len(set(t)) == 1 else "x".join(map(str, t))


def conv_map(weight, bias, stride, padding, dilation, groups) -> ConvMap:
    w = weight.double()
    b = bias.double() if bias is not None else torch.zeros(w.shape[0], dtype=torch.float64, device=w.device)
    kernel = w.shape[2:]
    # a 1-wide axis reads one pixel whatever its dilation: normalise it to 1
    dil = tuple(1 if k == 1 else d for k, d in zip(kernel, dilation))
    return ConvMap(w, b, tuple(stride), tuple(padding), dil, int(groups), w.shape[1] * int(groups), bias is None)


def identity_conv(channels: int, padding=(0, 0)) -> ConvMap:
    """x itself (or x zero-padded by `padding`) as a depthwise 1x1 conv."""
    return ConvMap(torch.ones(channels, 1, 1, 1, dtype=torch.float64), torch.zeros(channels, dtype=torch.float64),
                   (1, 1), tuple(padding), (1, 1), channels, channels, zero_bias=True)


def avg_pool_conv(channels: int, kernel, stride, padding, divisor=None) -> ConvMap:
    """avg_pool2d with count_include_pad (or no padding) as a depthwise conv of weight 1/divisor."""
    kh, kw = kernel
    div = divisor if divisor else kh * kw
    w = torch.full((channels, 1, kh, kw), 1.0 / div, dtype=torch.float64)
    return ConvMap(w, torch.zeros(channels, dtype=torch.float64), tuple(stride), tuple(padding), (1, 1),
                   channels, channels, zero_bias=True)


def regroup(m: ConvMap, groups: int) -> ConvMap:
    """The same map written with `groups` groups (a divisor of m.groups): block-diagonal blocks
    placed inside the wider per-group input slice, zeros elsewhere."""
    if groups == m.groups:
        return m
    if m.groups % groups:
        raise ValueError(f"{groups} groups do not divide {m.groups}")
    r = m.groups // groups
    cin_g = m.cin // m.groups
    out_per_group = m.cout // m.groups
    w = torch.zeros(m.cout, r, cin_g, *m.kernel, dtype=m.weight.dtype, device=m.weight.device)
    sub = (torch.arange(m.cout, device=w.device) // out_per_group) % r  # which slice of the wider group each output reads
    w[torch.arange(m.cout, device=w.device), sub] = m.weight
    return replace(m, weight=w.reshape(m.cout, r * cin_g, *m.kernel), groups=groups)


def _is_identity(m: ConvMap) -> bool:
    """Whether m is exactly x -> x (a depthwise 1x1 conv of weight 1, no bias, no padding)."""
    return (m.kernel == (1, 1) and m.groups == m.cin == m.cout and m.stride == (1, 1) and m.padding == (0, 0)
            and has_values(m.weight, m.bias)  # on meta: unknown, and the general product is the same map
            and bool((m.weight == 1).all()) and not bool(m.bias.ne(0).any()))


def affine(m, scale=None, shift=None):
    """(scale * m + shift) per output channel (ConvMap) or per output feature (LinearMap)."""
    if isinstance(m, LinearMap):
        return m.affine(scale, shift)
    w, b = m.weight, m.bias
    if scale is not None:
        w = w * scale.reshape(-1, 1, 1, 1)
        b = b * scale
    if shift is not None:
        b = b + shift
    return replace(m, weight=w, bias=b, zero_bias=m.zero_bias and shift is None)


def add_conv(a: ConvMap, b: ConvMap) -> ConvMap:
    """a + b as one conv (see the module docstring for when that is exact)."""
    if a.cin != b.cin or a.cout != b.cout:
        raise NotMergeable(f"channel counts differ ({a.cin}->{a.cout} vs {b.cin}->{b.cout})")
    K, P, D, S = [], [], [], []
    offsets = ([], [])
    for axis in range(2):
        name = "HW"[axis]
        ka, kb = a.kernel[axis], b.kernel[axis]
        if a.stride[axis] != b.stride[axis]:
            raise NotMergeable(f"strides differ along {name} ({a.stride[axis]} vs {b.stride[axis]})")
        wide = {m.dilation[axis] for m, k in ((a, ka), (b, kb)) if k > 1}
        if len(wide) > 1:
            raise NotMergeable(f"dilations differ along {name} ({sorted(wide)})")
        d = wide.pop() if wide else 1
        span_a = 2 * a.padding[axis] - a.dilation[axis] * (ka - 1)
        span_b = 2 * b.padding[axis] - b.dilation[axis] * (kb - 1)
        if span_a != span_b:
            raise NotMergeable(
                f"windows are not aligned along {name}: kernel {ka} padding {a.padding[axis]} vs "
                f"kernel {kb} padding {b.padding[axis]} give different output sizes or centres")
        p = max(a.padding[axis], b.padding[axis])
        if (p - a.padding[axis]) % d or (p - b.padding[axis]) % d:
            raise NotMergeable(f"padding difference along {name} is not a multiple of the dilation {d}")
        k = (2 * p - span_a) // d + 1
        for m, km, off in ((a, ka, offsets[0]), (b, kb, offsets[1])):
            t = (p - m.padding[axis]) // d
            if t + km > k:
                raise NotMergeable(f"kernel {km} does not fit in the merged kernel {k} along {name}")
            off.append(t)
        K.append(k), P.append(p), D.append(d), S.append(a.stride[axis])
    groups = math.gcd(a.groups, b.groups)
    ra, rb = regroup(a, groups), regroup(b, groups)
    w = torch.zeros(a.cout, a.cin // groups, *K, dtype=torch.float64, device=a.weight.device)
    for m, (th, tw) in ((ra, offsets[0]), (rb, offsets[1])):
        kh, kw = m.kernel
        w[:, :, th:th + kh, tw:tw + kw] += m.weight
    return ConvMap(w, ra.bias + rb.bias, tuple(S), tuple(P), tuple(D), groups, a.cin, a.zero_bias and b.zero_bias)


def compose_conv(a: ConvMap, b: ConvMap) -> ConvMap:
    """b(a(x)) as one conv (see the module docstring for when that is exact)."""
    if a.cout != b.cin:
        raise NotMergeable(f"channel counts do not chain ({a.cout} into {b.cin})")
    K, S, P, D = [], [], [], []
    needs_zero_bias = False
    for axis in range(2):
        name = "HW"[axis]
        ka, sa, pa, da = a.kernel[axis], a.stride[axis], a.padding[axis], a.dilation[axis]
        kb, sb, pb, db = b.kernel[axis], b.stride[axis], b.padding[axis], b.dilation[axis]
        if ka == 1 and sa == 1:  # pointwise first: the second conv's geometry, paddings add up
            K.append(kb), S.append(sb), P.append(pa + pb), D.append(db)
            needs_zero_bias |= pb > 0
        elif kb == 1 and pb == 0:  # pointwise second: it reads every sb-th output of the first
            K.append(ka), S.append(sa * sb), P.append(pa), D.append(da)
        elif sa == 1 and da == 1 and db == 1:
            if pb > 0 and pa < ka - 1:
                raise NotMergeable(
                    f"along {name} the second conv zero-pads the first one's output (padding {pb}), but the "
                    f"merged conv would compute the first conv there from real pixels")
            K.append(ka + kb - 1), S.append(sb), P.append(pa + pb), D.append(1)
            needs_zero_bias |= pb > 0
        else:
            raise NotMergeable(f"along {name} the first conv has stride {sa} / dilation {da} and the second "
                               f"kernel {kb} / dilation {db}: not one convolution")
    if needs_zero_bias and not a.zero_bias and not has_values(a.bias):
        raise NotMergeable(f"the second conv zero-pads the first one's output, whose bias must be zero: {NEEDS_VALUES}")
    if needs_zero_bias and not a.zero_bias and bool(a.bias.ne(0).any()):
        raise NotMergeable("the second conv zero-pads the first one's output, whose bias is not zero: "
                           "the border would differ")
    geometry = dict(stride=tuple(S), padding=tuple(P), dilation=tuple(D))
    if _is_identity(b):
        return replace(a, **geometry)
    if _is_identity(a):
        return replace(b, **geometry)
    groups = math.gcd(a.groups, b.groups)
    ra, rb = regroup(a, groups), regroup(b, groups)
    mid_g = a.cout // groups
    out_g = b.cout // groups
    in_g = a.cin // groups
    # full convolution of the kernels, summed over middle channels, per group:
    #   W[o, i] = sum_m  rb[o, m] (*) ra[m, i]   (true convolution, so that conv(conv(x, A), B) = conv(x, W))
    A = ra.weight.reshape(groups, mid_g, in_g, *ra.kernel)
    B = rb.weight.reshape(groups, out_g, mid_g, *rb.kernel)
    if ra.kernel == (1, 1):
        w = torch.einsum("gomhw,gmi->goihw", B, A[..., 0, 0]).reshape(b.cout, in_g, *rb.kernel)
    elif rb.kernel == (1, 1):
        w = torch.einsum("gom,gmihw->goihw", B[..., 0, 0], A).reshape(b.cout, in_g, *ra.kernel)
    else:
        kbh, kbw = rb.kernel
        w = F.conv2d(ra.weight.permute(1, 0, 2, 3), rb.weight.flip(2, 3), padding=(kbh - 1, kbw - 1), groups=groups)
        w = w.permute(1, 0, 2, 3).contiguous()
    bias_in = ra.bias.reshape(groups, 1, mid_g)  # the first map's bias, per group
    taps = rb.weight.sum((2, 3)).reshape(groups, out_g, mid_g)
    bias = rb.bias + (taps * bias_in).sum(-1).reshape(-1)
    return ConvMap(w, bias, tuple(S), tuple(P), tuple(D), groups, a.cin, a.zero_bias and b.zero_bias)


def conv_into_linear(conv: ConvMap, in_shape, fc_weight, fc_bias):
    """linear(flatten(conv(x))) = linear'(flatten(x)) on inputs of shape (C, H, W) = in_shape.

    W' = W . M where M is the conv's matrix; W'[d] is the conv's adjoint applied to row d of W
    (reshaped to the conv's output), computed without materialising M. b' = b + W . flatten(conv(0)).
    """
    c, h, w = in_shape
    d = fc_weight.shape[0]
    wt = conv.weight
    with torch.no_grad():
        out0 = F.conv2d(torch.zeros(1, c, h, w, dtype=torch.float64, device=wt.device), wt, conv.bias, conv.stride, conv.padding,
                        conv.dilation, conv.groups)
        grad_out = fc_weight.double().reshape(d, *out0.shape[1:])
        w_new = torch.nn.grad.conv2d_input((d, c, h, w), wt, grad_out, conv.stride, conv.padding,
                                           conv.dilation, conv.groups)
    b = fc_bias.double() if fc_bias is not None else torch.zeros(d, dtype=torch.float64, device=wt.device)
    return w_new.reshape(d, -1), b + fc_weight.double() @ out0.reshape(-1)


# ------------------------------------------------------------------ linear maps (last axis)

@dataclass
class LinearMap:
    weight: torch.Tensor | None  # [out, in]; None: the identity
    bias: torch.Tensor  # [out]
    cin: int

    @property
    def cout(self) -> int:
        return self.cin if self.weight is None else self.weight.shape[0]

    def dense(self) -> torch.Tensor:
        return torch.eye(self.cin, dtype=torch.float64, device=self.bias.device) if self.weight is None else self.weight

    def affine(self, scale=None, shift=None) -> "LinearMap":
        w, b = self.weight, self.bias
        if scale is not None:
            w = torch.diag(scale) if w is None else w * scale.reshape(-1, 1)
            b = b * scale
        if shift is not None:
            b = b + shift
        return LinearMap(w, b, self.cin)

    def macs_per_output(self) -> int:
        return self.cin

    def describe(self) -> str:
        return f"linear {self.cin}->{self.cout}"


def linear_map(weight, bias) -> LinearMap:
    w = weight.double()
    b = bias.double() if bias is not None else torch.zeros(w.shape[0], dtype=torch.float64, device=w.device)
    return LinearMap(w, b, w.shape[1])


def identity_linear(features: int) -> LinearMap:
    return LinearMap(None, torch.zeros(features, dtype=torch.float64), features)


def add_linear(a: LinearMap, b: LinearMap) -> LinearMap:
    if a.cin != b.cin or a.cout != b.cout:
        raise NotMergeable(f"feature counts differ ({a.cin}->{a.cout} vs {b.cin}->{b.cout})")
    if a.weight is None and b.weight is None:
        return identity_linear(a.cin).affine(torch.full((a.cin,), 2.0, dtype=torch.float64, device=a.bias.device),
                                             a.bias + b.bias)
    return LinearMap(a.dense() + b.dense(), a.bias + b.bias, a.cin)


def compose_linear(a: LinearMap, b: LinearMap) -> LinearMap:
    if a.cout != b.cin:
        raise NotMergeable(f"feature counts do not chain ({a.cout} into {b.cin})")
    if b.weight is None:
        return LinearMap(a.weight, a.bias + b.bias, a.cin)
    if a.weight is None:
        return LinearMap(b.weight, b.bias + b.weight @ a.bias, a.cin)
    return LinearMap(b.weight @ a.weight, b.bias + b.weight @ a.bias, a.cin)


def add(a, b):
    return add_linear(a, b) if isinstance(a, LinearMap) else add_conv(a, b)


def compose(a, b):
    return compose_linear(a, b) if isinstance(a, LinearMap) else compose_conv(a, b)
