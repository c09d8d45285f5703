"""Fold eval-mode BatchNorm into the convolution or linear layer that feeds it.

Math (exact up to float rounding). With s = gamma / sqrt(running_var + eps), per output channel c:

    BN(conv(x, W, b))[c] = s[c] * (conv(x, W, b)[c] - mean[c]) + beta[c]
                         = conv(x, W * s[c], (b[c] - mean[c]) * s[c] + beta[c])[c]

For a transposed convolution the output channels are the weight's second axis, per group.
For Linear followed by BatchNorm1d the output features are the rows of W; this holds when the
linear output is (N, C), where BatchNorm1d's channel axis is the feature axis.

Each use of a shared conv gets its own folded weights; the original weights stay for other uses.
The folded weights are computed in float64 and cast back to the weight's dtype, as a pure
function of the old tensors (`fold_weight`, `fold_bias`), so the transform can be replayed on
other storage.
"""
from __future__ import annotations

import torch

from ..rewrite import ops
from ..rewrite.shapes import tensor_shape
from ..rewrite.passmanager import Pass, Rule
from ..rewrite.pattern import Any, Lit, Op, Param


def bn_scale(gamma, var, eps):
    """s = gamma / sqrt(var + eps), in float64."""
    s = torch.rsqrt(var.double() + eps)
    return s * gamma.double() if gamma is not None else s


def fold_weight(w, gamma, var, eps, *, transposed=False, groups=1):
    """W' = W * s along the output-channel axis (axis 0; for transposed convs axis 1 per group)."""
    s = bn_scale(gamma, var, eps)
    w64 = w.double()
    if not transposed:
        out = w64 * s.reshape(-1, *([1] * (w.dim() - 1)))
    else:
        cin, cout_g = w.shape[0], w.shape[1]
        grouped = w64.reshape(groups, cin // groups, cout_g, *w.shape[2:])
        out = (grouped * s.reshape(groups, 1, cout_g, *([1] * (w.dim() - 2)))).reshape(w.shape)
    return out.to(w.dtype)


def fold_bias(b, gamma, beta, mean, var, eps, dtype=None):
    """b' = (b - mean) * s + beta, in `dtype` (the conv's weight dtype: a bf16 conv after an
    fp32 BN keeps a bf16 bias)."""
    s = bn_scale(gamma, var, eps)
    b64 = b.double() if b is not None else torch.zeros_like(mean, dtype=torch.float64)
    out = (b64 - mean.double()) * s
    if beta is not None:
        out = out + beta.double()
    return out.to(dtype or mean.dtype)


def _bn(producer):
    return Op(ops.batch_norm, input=producer, weight=Param("gamma", optional=True),
              bias=Param("beta", optional=True), running_mean=Param("mean"), running_var=Param("var"),
              training=Lit(False, what="training"), eps=Any("eps"), name="bn")


CONV_BN = _bn(Op(ops.conv, input=Any("x"), weight=Param("w"), bias=Param("b", optional=True),
                 stride=Any("stride"), padding=Any("padding"), dilation=Any("dilation"),
                 transposed=Any("transposed"), output_padding=Any("output_padding"), groups=Any("groups"),
                 name="conv"))

LINEAR_BN = _bn(Op(ops.linear, input=Any("x"), weight=Param("w"), bias=Param("b", optional=True), name="linear"))


def fold_bn_into_conv(rw, x, w, b, stride, padding, dilation, transposed, output_padding, groups,
                      gamma, beta, mean, var, eps, conv, bn):
    w2 = rw.param(f"{conv.name}_bn_weight", lambda w_, g_, v_: fold_weight(
        w_, g_, v_, eps, transposed=transposed, groups=groups), w, gamma, var)
    b2 = rw.param(f"{conv.name}_bn_bias", lambda b_, w_, g_, be_, m_, v_: fold_bias(
        b_, g_, be_, m_, v_, eps, dtype=w_.dtype), b, w, gamma, beta, mean, var)
    return rw.call(ops.conv, input=x, weight=w2, bias=b2, stride=stride, padding=padding, dilation=dilation,
                   transposed=transposed, output_padding=output_padding, groups=groups)


def linear_output_is_2d(linear, **_):
    shape = tensor_shape(linear)
    if shape is None:
        return "the linear output's shape is unknown (no example inputs reached it)"
    if len(shape) != 2:
        return f"linear output has shape {list(shape)}: BatchNorm1d normalises axis 1, not the feature axis"
    return None


def fold_bn_into_linear(rw, x, w, b, gamma, beta, mean, var, eps, linear, bn):
    w2 = rw.param(f"{linear.name}_bn_weight", lambda w_, g_, v_: fold_weight(w_, g_, v_, eps), w, gamma, var)
    b2 = rw.param(f"{linear.name}_bn_bias", lambda b_, w_, g_, be_, m_, v_: fold_bias(
        b_, g_, be_, m_, v_, eps, dtype=w_.dtype), b, w, gamma, beta, mean, var)
    return rw.call(ops.linear, input=x, weight=w2, bias=b2)


BATCHNORM_FOLDING = Pass(
    "fold_batchnorm", "exact",
    rules=[Rule("fold_bn_into_conv", CONV_BN, fold_bn_into_conv),
           Rule("fold_bn_into_linear", LINEAR_BN, fold_bn_into_linear, check=linear_output_is_2d)],
    doc=__doc__,
    miss_note="the BatchNorm stays as it is (one aten.batch_norm)",
)
