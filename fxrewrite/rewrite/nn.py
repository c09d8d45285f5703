"""Modules that the architecture swaps put into a model. Ordinary `nn.Module`s: they train,
save and load (`state_dict`), and export. Capture keeps them as leaf modules (one `call_module`
node each), so that passes and the Triton lowering can recognise them.

Attribute names are part of the contract with the Triton lowering: `SmeLU.beta`;
`GeneralizedSmeLU.alpha, beta, g_left, g_right`; `DyT.alpha, weight, bias`. The formulas are the
functions `smelu` and `dyt`, which the modules and the lowering's eager reference
(`codegen.ir`) both call, so the two cannot drift apart. `ELN` (formula `eln`) and
`PartialRMSNorm` (formula `partial_rms_norm`) are not lowered yet: they run as eager code.

Calibration protocol (`fxrewrite.calibrate`): a module whose parameters can be fitted to the
layer it replaced has `fit_to(x, target, **options) -> str`: it sets its parameters in place so
that module(x) ~ target (x: inputs it saw, float64, in its own layout; target: the replaced
layer's outputs on them), working in float64, and returns a short note ("" if none). Options it
does not know are ignored. `DyT`, `ELN` and `PartialRMSNorm` have one (over the last dim: they
view x as (rows, channels)).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .activations import PolyReLU, ShiftedReLU, ThresholdReLU  # the swaps' activation modules (leaves too)


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
    """A scalar of the formula: a learnable one is a parameter of shape (1,), not 0-d, because
    FSDP2's `fully_shard` cannot shard a 0-d parameter (and the DyT paper's code keeps its alpha
    so too); a fixed one a 0-d buffer."""
    if learnable:
        setattr(module, name, nn.Parameter(torch.full((1,), float(value))))
    else:
        t = torch.tensor(float(value))
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
        self.alpha = nn.Parameter(torch.full((1,), float(alpha_init)))  # (1,): FSDP2 shards no 0-d parameter
        self.weight = nn.Parameter(torch.ones(self.normalized_shape))
        self.bias = nn.Parameter(torch.zeros(self.normalized_shape)) if bias else None

    def forward(self, x):
        return dyt(x, self.alpha, self.weight, self.bias)

    def fit_to(self, x: torch.Tensor, target: torch.Tensor, fit_affine: bool = False, min_affine_rows: int = 64,
               **options) -> str:
        """Fit alpha (and with `fit_affine`, the per-channel weight and bias) so that DyT(x) ~ target:
        minimise E = ||DyT(x) - target|| / ||target|| over alpha > 0 (log grid 1e-3..1e3 plus the
        current alpha, then golden section), each alpha with its least-squares w, b when fitting
        the affine. A layer with fewer than `min_affine_rows` rows gets alpha only."""
        def grid(a0):
            return torch.logspace(-3, 3, 73, dtype=torch.float64).tolist() + ([a0] if a0 > 0 else [])
        return fit_squashing(self, "alpha", lambda a, x: torch.tanh(a * x), grid, x, target, fit_affine,
                             min_affine_rows)

    def extra_repr(self):
        return f"{self.normalized_shape}, alpha={float(self.alpha.detach()):.3g}, bias={self.bias is not None}"


def eln(x: torch.Tensor, beta: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
        channels: int) -> torch.Tensor:
    """Elementwise Layer Normalization, sqrt(C - 1) * x / sqrt(beta + x^2) * weight + bias with
    C = `channels` (no bias when None): the formula of `ELN`."""
    y = x * torch.rsqrt(beta + x * x) * (math.sqrt(channels - 1) * weight)
    return y + bias if bias is not None else y


class ELN(nn.Module):
    """Elementwise Layer Normalization (F. Stollenwerk 2025, arXiv 2503.21708, Eq. 15):

        ELN(x) = sqrt(C - 1) * x / sqrt(beta + x^2) * weight + bias

    with C the number of channels (the last dim), beta > 0 a learnable scalar and a per-channel
    weight and bias as the norm it replaces. Its extremes are +-sqrt(C - 1) * weight (+ bias),
    the largest |value| one channel of a LayerNorm output can take (sum of y_i^2 = C with
    mean 0).

    Derivation (LayerNorm, y = (x - mu) / sigma over C channels). The diagonal of its Jacobian is
    dy_i/dx_i = (C - 1 - y_i^2) / (C sigma). DyT follows by taking F = 1 / (C sigma) as a
    constant: dy/dx = F (C - 1 - y^2) integrates to y = sqrt(C - 1) tanh(alpha x) (the paper's
    scaled DyT; `DyT` has the plain tanh and lets the weight carry the scale). ELN keeps sigma's
    dependence: with sigma = (x_i - mu) / y_i, u = x_i - mu and du = (C - 1)/C dx_i the equation
    becomes dy / (y (C - 1 - y^2)) = du / ((C - 1) u), whose solution is
    y^2 / (C - 1 - y^2) = u^2 / beta, i.e. y = sqrt(C - 1) u / sqrt(beta + u^2), beta > 0 the
    integration constant. As DyT does, the elementwise form drops the row mean (u = x).

    How it differs from DyT: a rational inverse-square-root squashing instead of tanh, bounded
    by sqrt(C - 1) instead of 1 (times the weight), approaching its bound like 1 - beta/(2 x^2)
    (slowly: large inputs stay distinguishable, as in LayerNorm, where tanh saturates
    exponentially); slope at 0 is sqrt((C - 1) / beta) where DyT's is alpha.

    Initialisation: matching LayerNorm's slope at 0, 1/sigma, gives beta = (C - 1) sigma^2;
    `beta_init` defaults to C - 1 (inputs of unit variance). The swap (`norm_to_eln`) sets it
    from the variance it measures on the example inputs.
    """

    def __init__(self, normalized_shape: int, beta_init: float | None = None, bias: bool = True):
        super().__init__()
        self.normalized_shape = int(normalized_shape)
        if self.normalized_shape < 2:
            raise ValueError(f"ELN needs at least 2 channels, got {self.normalized_shape}")
        beta_init = float(self.normalized_shape - 1) if beta_init is None else float(beta_init)
        if not beta_init > 0:
            raise ValueError(f"ELN needs beta > 0, got {beta_init}")
        self.beta = nn.Parameter(torch.full((1,), beta_init))  # (1,): FSDP2 shards no 0-d parameter
        self.weight = nn.Parameter(torch.ones(self.normalized_shape))
        self.bias = nn.Parameter(torch.zeros(self.normalized_shape)) if bias else None

    def forward(self, x):
        return eln(x, self.beta, self.weight, self.bias, self.normalized_shape)

    def fit_to(self, x: torch.Tensor, target: torch.Tensor, fit_affine: bool = False, min_affine_rows: int = 64,
               **options) -> str:
        """Fit beta (and with `fit_affine`, the per-channel weight and bias) so that ELN(x) ~ target:
        minimise E = ||ELN(x) - target|| / ||target|| over beta > 0 (log grid over 1e-6..1e6 times
        the current beta, then golden section), each beta with its least-squares w, b when
        fitting the affine. A layer with fewer than `min_affine_rows` rows gets beta only."""
        scale = math.sqrt(self.normalized_shape - 1)

        def grid(b0):
            return (b0 * torch.logspace(-6, 6, 145, dtype=torch.float64)).tolist() + [b0]
        return fit_squashing(self, "beta", lambda be, x: scale * x * torch.rsqrt(be + x * x), grid, x, target,
                             fit_affine, min_affine_rows)

    def extra_repr(self):
        return f"{self.normalized_shape}, beta={float(self.beta.detach()):.4g}, bias={self.bias is not None}"


def partial_rms_norm(x: torch.Tensor, k: int, weight: torch.Tensor | None, eps: float | None) -> torch.Tensor:
    """x / sqrt(mean(x[..., :k]^2) + eps) * weight: the formula of `PartialRMSNorm` (the statistic in
    at least float32; eps None is the dtype's machine epsilon, as torch.nn.RMSNorm)."""
    if k == x.shape[-1]:
        return F.rms_norm(x, (k,), weight, eps)
    head = x[..., :k]
    if head.dtype in (torch.float16, torch.bfloat16):
        head = head.float()
    e = torch.finfo(x.dtype).eps if eps is None else eps
    y = x * torch.rsqrt(head.pow(2).mean(-1, keepdim=True) + e).to(x.dtype)
    return y * weight if weight is not None else y


class PartialRMSNorm(nn.Module):
    """pRMSNorm ("Root Mean Square Layer Normalization", Zhang & Sennrich 2019): RMSNorm whose
    root mean square is estimated from the first k = max(1, floor(p C)) of the C channels,

        y = x / sqrt(mean(x[..., :k]^2) + eps) * weight

    p = 6.25% in the paper. With k = C it is RMSNorm (computed by `F.rms_norm`). Exact only in
    expectation, when the channels are exchangeable; a row whose first k channels are unusually
    small or large is scaled up or down accordingly."""

    def __init__(self, normalized_shape: int, p: float = 0.0625, eps: float | None = None,
                 elementwise_affine: bool = True):
        super().__init__()
        if not 0 < p <= 1:
            raise ValueError(f"pRMSNorm needs 0 < p <= 1, got {p}")
        self.normalized_shape = int(normalized_shape)
        self.p, self.eps = float(p), eps
        self.k = max(1, min(self.normalized_shape, math.floor(p * self.normalized_shape + 1e-9)))
        self.weight = nn.Parameter(torch.ones(self.normalized_shape)) if elementwise_affine else None

    def forward(self, x):
        return partial_rms_norm(x, self.k, self.weight, self.eps)

    def fit_to(self, x: torch.Tensor, target: torch.Tensor, min_affine_rows: int = 64, **options) -> str:
        """Fit the weight so that pRMSNorm(x) ~ target by least squares: per channel,
        w_c = sum(z_c t_c) / sum(z_c^2) with z = x / rms_k(x); one common factor for the weight
        when fewer than `min_affine_rows` rows were seen. No weight, nothing to fit."""
        if self.weight is None:
            return "no weight to fit"
        x, target = _rows(x), _rows(target)
        with torch.no_grad():
            z = partial_rms_norm(x, self.k, None, self.eps)
            if x.shape[0] >= min_affine_rows:
                den = (z * z).sum(0)
                w = torch.where(den > 1e-300, (z * target).sum(0) / den.clamp_min(1e-300), self.weight.double())
                self.weight.copy_(w)
                return ""
            y = z * self.weight.double()
            s = float((y * target).sum() / (y * y).sum().clamp_min(1e-300))
            self.weight.mul_(s)
            return f"one common factor {s:.4g}: {x.shape[0]} rows < min_affine_rows={min_affine_rows}"

    def extra_repr(self):
        return f"{self.normalized_shape}, p={self.p:g} (k={self.k}), eps={self.eps}"


# ---------------------------------------------------------------- fitting helpers (float64)

def _rows(x: torch.Tensor) -> torch.Tensor:
    """`x` as (rows, last dim) in float64: the view of a module that works per channel of the last dim."""
    return x.reshape(-1, x.shape[-1]).double()


def relative_error(y: torch.Tensor, t: torch.Tensor) -> float:
    """||y - t|| / ||t|| (Frobenius norms), the objective every `fit_to` minimises."""
    return float((y - t).norm() / t.norm().clamp_min(1e-300))


def _affine_lsq(z: torch.Tensor, t: torch.Tensor):
    """Per-channel least-squares w, b for target t given z: w_c = cov(z_c, t_c) / var(z_c),
    b_c = mean(t_c) - w_c mean(z_c) (w_c = 0 for a constant z_c)."""
    zm, tm = z.mean(0), t.mean(0)
    var = ((z - zm) ** 2).mean(0)
    w = torch.where(var > 1e-30, ((z - zm) * (t - tm)).mean(0) / var.clamp_min(1e-30), torch.zeros_like(var))
    return w, tm - w * zm


def fit_squashing(mod: nn.Module, name: str, shape, grid, x: torch.Tensor, target: torch.Tensor,
                  fit_affine: bool, min_affine_rows: int) -> str:
    """Fit the scalar parameter `name` of an elementwise norm stand-in (DyT's alpha, ELN's beta)
    whose output is `shape(s, x) * weight + bias`, over `grid(current value)` (`fit_scalar`),
    and with `fit_affine` its per-channel weight and bias too, when there are `min_affine_rows`
    rows to fit them on. In place; returns a note when the affine was asked for but not fitted."""
    x, target = _rows(x), _rows(target)
    with torch.no_grad():
        w = mod.weight.detach().double()
        b = mod.bias.detach().double() if mod.bias is not None else None
        scalar = getattr(mod, name)
        affine = fit_affine and x.shape[0] >= min_affine_rows
        note = "" if affine or not fit_affine else \
            f"{name} only: {x.shape[0]} rows < min_affine_rows={min_affine_rows} for a per-channel w, b"
        s, w_new, b_new = fit_scalar(lambda v: shape(v, x), target, w, b, affine, grid(float(scalar.detach())))
        scalar.fill_(s)
        if affine:
            mod.weight.copy_(w_new)
            if mod.bias is not None:
                mod.bias.copy_(b_new)
    return note


def fit_scalar(shape, t: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, affine: bool, grid: list[float]):
    """Minimise E(s) = ||shape(s) * w + b - t|| / ||t|| over a scalar s > 0 (with `affine`, each s
    with its least-squares w, b): the best of `grid`, refined by golden section on log s within
    +-0.1 of it (grids are 12 per decade). Returns (s, w, b) at the minimum."""

    def error_at(s):
        z = shape(s)
        ww, bb = _affine_lsq(z, t) if affine else (w, b)
        return relative_error(z * ww + (bb if bb is not None else 0), t), ww, bb

    errs = [error_at(s)[0] for s in grid]
    i = min(range(len(grid)), key=errs.__getitem__)
    best = grid[i]
    lo, hi = math.log(best) - 0.1, math.log(best) + 0.1  # grid step is ln(10)/12 ~ 0.19
    g = (math.sqrt(5) - 1) / 2
    c, d = hi - g * (hi - lo), lo + g * (hi - lo)
    fc, fd = (error_at(math.exp(v))[0] for v in (c, d))
    for _ in range(40):
        if fc < fd:
            hi, d, fd = d, c, fc
            c = hi - g * (hi - lo)
            fc = error_at(math.exp(c))[0]
        else:
            lo, c, fc = c, d, fd
            d = lo + g * (hi - lo)
            fd = error_at(math.exp(d))[0]
    cand = math.exp((lo + hi) / 2)
    if error_at(cand)[0] > errs[i]:
        cand = best
    _, ww, bb = error_at(cand)
    return cand, ww, bb


LEAF_MODULES: tuple[type, ...] = (SmeLU, GeneralizedSmeLU, DyT, ELN, PartialRMSNorm, ShiftedReLU, ThresholdReLU, PolyReLU)
