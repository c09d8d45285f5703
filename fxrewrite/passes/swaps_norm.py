"""More norm swaps: LayerNorm/RMSNorm -> ELN, RMSNorm -> pRMSNorm.

Approximate (the function changes), opt-in by name (`passes=["norm_to_eln"]`) or through the
factories below with options. Built on `swaps.swap_pass`: each swap is a `call_module` to a new
module from `rewrite.nn` registered next to the norm it replaces (`blocks.0.norm1_eln`), the
replaced norm is recorded as a module in `gm.meta["swapped_norms"]` (for `fxrewrite.calibrate`),
and the report has one "rewrote" record per swap with the layer's output deviation on the example
inputs, plus the model's output deviation.

- LayerNorm/RMSNorm -> ELN (Elementwise Layer Normalization, Stollenwerk 2025, Eq. 15):
  ELN(x) = sqrt(C - 1) * x / sqrt(beta + x^2) * w + b over the C channels of the last dim, with
  the norm's own w (and b; 0 for RMSNorm or a norm without one) and a learnable scalar beta.
  DyT (w * tanh(alpha x) + b) is the same derivation from LayerNorm's Jacobian with the row's
  sigma held constant; ELN keeps it, which gives an inverse square root instead of tanh, extremes
  +-sqrt(C - 1) * w instead of +-w, and a slow (1 - beta / 2x^2) approach to them instead of
  tanh's exponential saturation. Neither normalises: the deviation depends on the input scale.
  beta0 = (C - 1) sigma^2 matches the norm's slope 1/sigma at 0; with `beta="data"` (default)
  sigma^2 is the mean over rows of the norm's own statistic (variance for LayerNorm, mean
  square for RMSNorm, + eps) on the example inputs, else (C - 1) with no example inputs; a
  number sets beta0 for every norm. `fxrewrite.calibrate` then fits beta (and optionally w, b)
  to the replaced norm's outputs (`ELN.fit_to`). A norm over several dims is skipped.
- RMSNorm -> pRMSNorm (Zhang & Sennrich 2019): y = x / sqrt(mean(x[..., :k]^2) + eps) * w with
  k = max(1, floor(p C)), p = 6.25% by default (the paper's). Exact for p = 1; otherwise the RMS
  is an estimate from k channels, good when the channels are alike, poor with a few outlier
  channels among the first k or outside them. `norms=("rms_norm", "layer_norm")` also turns
  LayerNorms into pRMSNorms, dropping their mean subtraction and bias (said in the report).
  With `lower="triton"` both are lowered: ELN like DyT, pRMSNorm with a kernel whose statistic
  reads only the first k columns (the output still reads and writes the whole row, so on a
  memory-bound GPU little is saved; not yet measured).
"""
from __future__ import annotations

import weakref

import torch

from ..rewrite import ops
from ..rewrite.nn import ELN, PartialRMSNorm
from ..rewrite.passmanager import Pass
from ..rewrite.values import has_values

from .swap_common import nodes_with, run_recording, swapped_input
from .swaps import SwapPlan, elementwise_why, last_dim_norm, norm_kind, swap_pass, with_affine

_NORMS = {"layer_norm": ops.layer_norm, "rms_norm": ops.rms_norm}


def _targets(norms, allowed) -> list:
    bad = [k for k in norms if k not in allowed]
    if bad or not norms:
        raise ValueError(f"norms must be a non-empty subset of {sorted(allowed)}, got {norms!r}")
    return [_NORMS[k] for k in norms]


def _input_sigma2(gm, targets) -> dict:
    """{norm node: mean over rows of its statistic + eps} on the example inputs (variance for
    LayerNorm, mean square for RMSNorm); empty when the graph cannot be run."""
    nodes = nodes_with(gm, targets)
    _, seen = run_recording(gm, {n: swapped_input(n, "input") for n in nodes})
    if not isinstance(seen, dict):
        return {}
    out = {}
    for n, (x, _) in seen.items():
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            continue
        x = x.detach().double()
        stat = x.var(-1, unbiased=False) if n.target is ops.layer_norm else x.pow(2).mean(-1)
        out[n] = float(stat.mean()) + float(ops.arg(n, "eps") or 0.0)
    return out


def norm_to_eln(beta: float | str = "data", only=None, norms=("layer_norm", "rms_norm")) -> Pass:
    """LayerNorm/RMSNorm -> ELN (see the module docstring). `beta`: "data" for beta0 = (C - 1)
    sigma^2 from the example inputs, or a number > 0 for every norm."""
    if beta != "data" and not (isinstance(beta, (int, float)) and beta > 0):
        raise ValueError(f"beta must be a number > 0 or 'data', got {beta!r}")
    targets = _targets(norms, _NORMS)
    measured = {"gm": None, "nodes": set(), "sigma2": {}}  # one measuring run per graph, at its first norm

    def sigma2(gm, n):
        if measured["gm"] is None or measured["gm"]() is not gm or n not in measured["nodes"]:
            measured.update(gm=weakref.ref(gm), nodes=set(nodes_with(gm, targets)), sigma2=_input_sigma2(gm, targets))
        return measured["sigma2"].get(n)

    def plan(rw, n):
        found = last_dim_norm(rw, n, elementwise_why("ELN"))
        if isinstance(found, str):
            return found
        c, w, b, ref = found
        if c < 2:
            return f"normalises over {c} channel: ELN's bound sqrt(C - 1) is 0"
        if beta == "data":
            s2 = sigma2(rw.gm, n)
            if s2 is not None and s2 > 0:
                b0, why = (c - 1) * s2, f"(C - 1) sigma^2, sigma^2 = {s2:.4g} on the example inputs"
            else:
                b0, why = float(c - 1), "C - 1: no variance measured on example inputs, sigma^2 = 1 assumed"
        else:
            b0, why = float(beta), "given"
        mod = with_affine(ELN(c, b0, bias=True), w, b)
        kind = norm_kind(n)
        affine = "" if w is not None or b is not None else f"; the {kind} had no affine parameters: weight 1, bias 0"
        return SwapPlan(mod, f"ELN from {kind}, beta0={b0:.4g} ({why}){affine}", reference=ref)

    return swap_pass("norm_to_eln", targets, "input", plan, "eln", only, __doc__)


def rmsnorm_to_prmsnorm(p: float = 0.0625, only=None, norms=("rms_norm",)) -> Pass:
    """RMSNorm (and with norms=("rms_norm", "layer_norm"), LayerNorm) -> PartialRMSNorm(p)."""
    if not 0 < p <= 1:
        raise ValueError(f"p must be in (0, 1], got {p!r}")
    targets = _targets(norms, _NORMS)

    def plan(rw, n):
        found = last_dim_norm(rw, n, "pRMSNorm takes the first channels of the last dim")
        if isinstance(found, str):
            return found
        c, w, b, ref = found
        mod = with_affine(PartialRMSNorm(c, p, eps=ops.arg(n, "eps"), elementwise_affine=w is not None), w, None)
        kind = norm_kind(n)
        dropped = ""
        if n.target is ops.layer_norm:
            dropped = "; dropped: the mean subtraction" + (
                f" and the bias (max |b| {float(b.abs().max()):.3g})" if has_values(b) and b is not None
                else " and the bias" if b is not None else "")
        exact = " (all of them: exact)" if mod.k == c and n.target is ops.rms_norm else ""
        return SwapPlan(mod, f"pRMSNorm from {kind}, RMS from the first {mod.k} of {c} channels "
                             f"(p={p:g}){exact}{dropped}", reference=ref)

    return swap_pass("rmsnorm_to_prmsnorm", targets, "input", plan, "prms", only, __doc__)


NORM_TO_ELN = norm_to_eln()
RMSNORM_TO_PRMSNORM = rmsnorm_to_prmsnorm()
