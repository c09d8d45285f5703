"""Activation modules that the activation swaps (`passes.swaps_activation`) put into a model:
ReLU-fication (`ShiftedReLU`, `ThresholdReLU`) and polynomial ReLU for private inference
(`PolyReLU`). Ordinary `nn.Module`s like those of `rewrite.nn`: they train, save and load
(`state_dict`), and export to ONNX as elementwise ops (Sub/Relu, Greater/Where, Mul/Add).

The formulas are the functions `shifted_relu`, `threshold_relu` and `poly_relu`, which the
modules call.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn


def shifted_relu(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """max(x - shift, 0): a ReLU moved right by `shift` (continuous; zero for x <= shift)."""
    return torch.relu(x - shift.to(x.dtype))


def threshold_relu(x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """x where x > threshold, else 0 (ProSparse's FATReLU): the identity above the threshold,
    so it jumps from 0 to `threshold` there when threshold > 0; ReLU for threshold = 0."""
    return torch.where(x > threshold.to(x.dtype), x, torch.zeros_like(x))


def poly_relu(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """a x^2 + b x + c, evaluated as (a x + b) x + c; a, b, c broadcast against x."""
    return (a * x + b) * x + c


class ShiftedReLU(nn.Module):
    """ShiftedReLU(shift): y = max(x - shift, 0).

    With shift > 0 more of the inputs map to exactly 0 than under ReLU (all x <= shift): the
    shifted ReLU of "ReLU Strikes Back" / ProSparse's activation-threshold shifting, used to
    raise activation sparsity. Its output is also moved down by `shift` for x > shift (the
    function stays continuous, with gradient 0 below the shift and 1 above). `shift` is a
    buffer: saved with the model, not trained.
    """

    def __init__(self, shift: float = 0.0):
        super().__init__()
        self.register_buffer("shift", torch.tensor(float(shift)))

    def forward(self, x):
        return shifted_relu(x, self.shift)

    def extra_repr(self):
        return f"shift={float(self.shift):g}"


class ThresholdReLU(nn.Module):
    """ThresholdReLU(threshold): y = x for x > threshold, 0 otherwise (threshold >= 0).

    ProSparse's FATReLU: values at or below the threshold are cut to exactly 0 while the values
    kept are not changed (unlike `ShiftedReLU`); discontinuous at the threshold (a jump of
    `threshold`), gradient 1 above it and 0 below. `threshold` is a buffer, not trained.
    """

    def __init__(self, threshold: float = 0.0):
        super().__init__()
        if not threshold >= 0:
            raise ValueError(f"ThresholdReLU needs threshold >= 0 (else it passes negative values), got {threshold}")
        self.register_buffer("threshold", torch.tensor(float(threshold)))

    def forward(self, x):
        return threshold_relu(x, self.threshold)

    def extra_repr(self):
        return f"threshold={float(self.threshold):g}"


# least-squares quadratic for ReLU on a standard normal input: b = 1/2 fits the odd part x/2
# exactly; a x^2 + c fitting |x|/2 gives 3a + c = E|x| x^2 / 2 = sqrt(2/pi), a + c = E|x| / 2,
# so a = c = sqrt(2/pi) / 4
_NORMAL_FIT = (math.sqrt(2 / math.pi) / 4, 0.5, math.sqrt(2 / math.pi) / 4)


class PolyReLU(nn.Module):
    """Polynomial ReLU (AutoReP): y = a x^2 + b x + c, per channel.

    `num_channels` coefficients (a, b, c) per channel, or one of each for `num_channels=1`
    (one polynomial for the whole layer). The channel is dim `channel_dim` of the input, counted
    from the end so that the module takes any number of leading (batch) dims and its forward
    needs no shape logic (it traces with `symbolic_trace` too): -3 for NCHW convolution
    activations (dim 1 of a 4-d input), -1 for (..., features) activations. a, b, c are
    parameters: the model stays trainable. They start as the least-squares fit of ReLU on a
    standard normal input (a = c = sqrt(2/pi)/4 ~ 0.1995, b = 1/2) and `fit_to` fits them to
    any inputs. A quadratic grows without bound: far outside the fitted input range it is far
    from ReLU, so fit it on the distribution the layer really sees.
    """

    def __init__(self, num_channels: int = 1, channel_dim: int = -1):
        super().__init__()
        if num_channels < 1:
            raise ValueError(f"PolyReLU needs num_channels >= 1, got {num_channels}")
        if channel_dim >= 0:
            raise ValueError(f"PolyReLU counts channel_dim from the end (-3 for NCHW, -1 for features), "
                             f"got {channel_dim}")
        self.num_channels, self.channel_dim = int(num_channels), int(channel_dim)
        a0, b0, c0 = _NORMAL_FIT
        self.a = nn.Parameter(torch.full((self.num_channels,), a0))
        self.b = nn.Parameter(torch.full((self.num_channels,), b0))
        self.c = nn.Parameter(torch.full((self.num_channels,), c0))

    def _shaped(self, p: torch.Tensor, dtype) -> torch.Tensor:
        """A coefficient broadcastable against the input (its channels along `channel_dim`)."""
        p = p.to(dtype)
        if self.num_channels == 1:
            return p.reshape(())
        return p.reshape([self.num_channels] + [1] * (-self.channel_dim - 1))

    def forward(self, x):
        return poly_relu(x, self._shaped(self.a, x.dtype), self._shaped(self.b, x.dtype),
                         self._shaped(self.c, x.dtype))

    def channels_last(self, x: torch.Tensor) -> torch.Tensor:
        """`x` (shaped as this module's input) as (rows, num_channels): the values each
        channel's polynomial sees."""
        if self.num_channels == 1:
            return x.reshape(-1, 1)
        if x.dim() < -self.channel_dim or x.shape[self.channel_dim] != self.num_channels:
            raise ValueError(f"PolyReLU has {self.num_channels} channels at dim {self.channel_dim}, "
                             f"the input {tuple(x.shape)} does not")
        return x.movedim(self.channel_dim, -1).reshape(-1, self.num_channels)

    @torch.no_grad()
    def fit_to(self, x: torch.Tensor, target: torch.Tensor, **options) -> str:
        """Fit a, b, c in place by least squares so that a x^2 + b x + c approximates `target`
        (e.g. relu(x)) on the inputs `x` (shaped as this module's input), in float64: per
        channel when every channel has at least `min_rows` values (default 32), else one
        polynomial fitted on all values and given to every channel (a quadratic through a
        handful of points per channel extrapolates wildly); with fewer than `min_rows` values in
        all, nothing is fitted. `ridge` (default 1e-9, relative to the moments of the
        standardised inputs) keeps a channel with constant inputs solvable. Other options are
        for other modules and are ignored (the note says so).
        Returns a short note: how it was fitted and the relative error ||p(x) - t|| / ||t||
        before and after."""
        ridge = float(options.pop("ridge", 1e-9))
        min_rows = int(options.pop("min_rows", 32))
        ignored = f"; ignored options {sorted(options)}" if options else ""
        X = self.channels_last(x.detach().double())
        T = self.channels_last(target.detach().double())
        coeffs = [p.detach().double().reshape(1, -1) for p in (self.a, self.b, self.c)]
        before = relative_error(poly_relu(X, *coeffs), T)
        if X.numel() < min_rows:
            return f"not fitted: {X.numel()} values < min_rows={min_rows}; rel error {before:.4g}{ignored}"
        if X.shape[0] >= min_rows or self.num_channels == 1:
            how = (f"per channel over {self.num_channels} channels, {X.shape[0]} values each" if self.num_channels > 1
                   else f"one polynomial, {X.shape[0]} values")
            a, b, c = fit_quadratic(X, T, ridge)
        else:
            how = (f"one polynomial for all {self.num_channels} channels: {X.shape[0]} values per channel "
                   f"< min_rows={min_rows}")
            a, b, c = (v.expand(self.num_channels) for v in fit_quadratic(X.reshape(-1, 1), T.reshape(-1, 1), ridge))
        self.a.copy_(a)
        self.b.copy_(b)
        self.c.copy_(c)
        after = relative_error(poly_relu(X, a.reshape(1, -1), b.reshape(1, -1), c.reshape(1, -1)), T)
        return f"least squares ({how}): rel error {before:.4g} -> {after:.4g}{ignored}"

    def extra_repr(self):
        return f"{self.num_channels}, channel_dim={self.channel_dim}"


def relative_error(y: torch.Tensor, t: torch.Tensor) -> float:
    """||y - t|| / ||t|| (Frobenius; 0 when both are 0)."""
    num, den = float((y - t).norm()), float(t.norm())
    return num / den if den > 0 else (0.0 if num == 0 else float("inf"))


def fit_quadratic(x: torch.Tensor, t: torch.Tensor, ridge: float = 1e-9):
    """Per-column least-squares (a, b, c) minimising sum_rows (a x^2 + b x + c - t)^2 for
    x, t of shape (rows, channels), float64. Each column is standardised (u = (x - m) / s)
    before the 3x3 normal equations are solved, then the coefficients are mapped back to x."""
    x, t = x.double(), t.double()
    m = x.mean(0)
    s = x.std(0, correction=0)
    s = torch.where(s > 0, s, torch.ones_like(s))
    u = (x - m) / s
    powers = torch.stack([torch.ones_like(u), u, u * u], -1)  # (rows, C, 3)
    gram = torch.einsum("rci,rcj->cij", powers, powers)  # (C, 3, 3)
    rhs = torch.einsum("rci,rc->ci", powers, t)
    scale = gram.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-300)
    gram = gram + ridge * scale[:, None, None] * torch.eye(3, dtype=gram.dtype)
    g, beta, alpha = torch.linalg.lstsq(gram, rhs.unsqueeze(-1)).solution.squeeze(-1).unbind(-1)
    # y = alpha u^2 + beta u + g with u = (x - m) / s
    a = alpha / s**2
    b = beta / s - 2 * alpha * m / s**2
    c = alpha * m**2 / s**2 - beta * m / s + g
    return a, b, c
