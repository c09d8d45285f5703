"""Modules that the architecture swaps put into a model. Ordinary `nn.Module`s: they train,
save and load (`state_dict`), and export. Capture keeps them as leaf modules (one `call_module`
node each), so that passes and the Triton lowering can recognise them.

Attribute names are part of the contract with the Triton lowering: `SmeLU.beta`;
`GeneralizedSmeLU.alpha, beta, g_left, g_right`; `DyT.alpha, weight, bias`. The formulas are the
functions `smelu` and `dyt`, which the modules and the lowering's eager reference
(`codegen.ir`) both call, so the two cannot drift apart.
"""
from __future__ import annotations

import torch
import torch.nn as nn


def smelu(x: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """SmeLU of `x` with threshold `beta` (a tensor, cast to x's dtype): the formula of `SmeLU`."""
    beta = beta.to(x.dtype)
    quad = (x + beta) ** 2 / (4 * beta)
    return torch.where(x >= beta, x, torch.where(x <= -beta, torch.zeros_like(x), quad))


def dyt(x: torch.Tensor, alpha: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Dynamic Tanh, weight * tanh(alpha * x) + bias (no bias when None): the formula of `DyT`."""
    y = torch.tanh(alpha * x) * weight
    return y + bias if bias is not None else y


def _scalar(module: nn.Module, name: str, value: float, learnable: bool):
    t = torch.tensor(float(value))
    if learnable:
        setattr(module, name, nn.Parameter(t))
    else:
        module.register_buffer(name, t)


class SmeLU(nn.Module):
    """SmeLU(beta): 0 for x <= -beta; (x + beta)^2 / (4 beta) for |x| <= beta; x for x >= beta.

    From "Smooth activations and reproducibility in deep networks". Monotone, with a continuous
    gradient (0 at -beta, 1 at beta). `learnable=True` makes beta a parameter (gradient exact:
    d/dbeta of the quadratic is (x + beta)(beta - x) / (4 beta^2), zero at both ends).
    """

    def __init__(self, beta: float = 1.0, learnable: bool = False):
        super().__init__()
        if not beta > 0:
            raise ValueError(f"SmeLU needs beta > 0, got {beta}")
        _scalar(self, "beta", beta, learnable)

    def forward(self, x):
        return smelu(x, self.beta)

    def extra_repr(self):
        return f"beta={float(self.beta.detach()):g}"


class GeneralizedSmeLU(nn.Module):
    """Generalized SmeLU: slope g_left left of -alpha, slope g_right right of beta, and on the
    transition region [-alpha, beta] the quadratic whose value and first derivative are
    continuous at both ends:

        f(x) = g_right * x                  for x >= beta
        f(x) = a x^2 + b x + u              for -alpha <= x <= beta
        f(x) = g_left * x + t               for x <= -alpha

        a = (g_right - g_left) / (2 (alpha + beta))       (f'' on the region)
        b = (alpha g_right + beta g_left) / (alpha + beta)  (so f'(-alpha) = g_left, f'(beta) = g_right)
        u = g_right beta - a beta^2 - b beta               (value continuous at beta)
        t = a alpha^2 - b alpha + u + g_left alpha         (value continuous at -alpha)

    With g_left = 0, g_right = 1, alpha = beta it is SmeLU(beta): a = 1/(4 beta), b = 1/2,
    u = beta/4, t = 0, i.e. (x + beta)^2 / (4 beta). `learnable=True` makes all four parameters
    trainable; gradients flow through a, b, u, t by autograd.
    """

    def __init__(self, alpha: float = 1.0, beta: float = 1.0, g_left: float = 0.0, g_right: float = 1.0,
                 learnable: bool = False):
        super().__init__()
        if alpha < 0 or beta < 0 or not alpha + beta > 0:
            raise ValueError(f"GeneralizedSmeLU needs alpha, beta >= 0 and alpha + beta > 0, got {alpha}, {beta}")
        for name, v in (("alpha", alpha), ("beta", beta), ("g_left", g_left), ("g_right", g_right)):
            _scalar(self, name, v, learnable)

    def coefficients(self, dtype=None):
        """(a, b, u, t) of the piecewise definition above."""
        al, be, gl, gr = (getattr(self, n) if dtype is None else getattr(self, n).to(dtype)
                          for n in ("alpha", "beta", "g_left", "g_right"))
        a = (gr - gl) / (2 * (al + be))
        b = (al * gr + be * gl) / (al + be)
        u = gr * be - a * be * be - b * be
        t = a * al * al - b * al + u + gl * al
        return a, b, u, t

    def forward(self, x):
        a, b, u, t = self.coefficients(x.dtype)
        al, be = self.alpha.to(x.dtype), self.beta.to(x.dtype)
        quad = (a * x + b) * x + u
        right = self.g_right.to(x.dtype) * x
        left = self.g_left.to(x.dtype) * x + t
        return torch.where(x >= be, right, torch.where(x <= -al, left, quad))

    def extra_repr(self):
        return ", ".join(f"{n}={float(getattr(self, n).detach()):g}" for n in ("alpha", "beta", "g_left", "g_right"))


class DyT(nn.Module):
    """Dynamic Tanh ("Transformers without Normalization"): weight * tanh(alpha * x) + bias,
    with alpha a learnable scalar (alpha0 = 0.5 by default) and a per-channel weight and bias
    over the last dimension, as the LayerNorm it replaces."""

    def __init__(self, normalized_shape: int, alpha_init: float = 0.5, bias: bool = True):
        super().__init__()
        self.normalized_shape = int(normalized_shape)
        self.alpha = nn.Parameter(torch.tensor(float(alpha_init)))
        self.weight = nn.Parameter(torch.ones(self.normalized_shape))
        self.bias = nn.Parameter(torch.zeros(self.normalized_shape)) if bias else None

    def forward(self, x):
        return dyt(x, self.alpha, self.weight, self.bias)

    def extra_repr(self):
        return f"{self.normalized_shape}, alpha={float(self.alpha.detach()):.3g}, bias={self.bias is not None}"


LEAF_MODULES: tuple[type, ...] = (SmeLU, GeneralizedSmeLU, DyT)
