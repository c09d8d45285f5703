"""Calibrate the DyT layers a swap put into a model, against the norms they replaced.

    gm = optimize(model, x, passes=["norm_to_dyt"])
    result = calibrate(gm, batches, holdout=other_batches, reference=model)
    print(result)                     # per layer: alpha and error before -> after

Why. DyT(x) = w * tanh(alpha x) + b does not normalise; whether it resembles the norm it replaced
depends on the scale of that layer's inputs, which alpha0 = 0.5 knows nothing about. Fitting
alpha on a few batches of real inputs brings each DyT close to its norm before fine-tuning.

What is fitted. For each DyT, on the inputs X it receives (its own input in the swapped model)
and the targets T = norm(X) of the norm it replaced (recorded by the swap in
`gm.meta["swapped_norms"]`), minimise the relative error

    E = ||DyT(X) - T|| / ||T||          (Frobenius norms over all rows and channels)

over alpha > 0 (a log-spaced grid, then golden-section refinement; E is one-dimensional and
cheap), with w, b kept; or, with `fit_affine=True`, over alpha and the per-channel w, b, which
for a fixed alpha is ordinary least squares per channel (w_c = cov(t_c, y_c) / var(t_c),
b_c = mean(y_c) - w_c mean(t_c), t = tanh(alpha x)). Layers are calibrated in graph order, each
on the inputs it sees after the layers before it were calibrated (`sequential=True`), or all
from one pass. Fitting is done in float64 on at most `max_rows` rows per layer.

`calibrate` changes the DyT parameters of the model it is given (that is its purpose); the
user's original model, passed as `reference`, is only run.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .rewrite.capture import as_args
from .rewrite.nn import DyT
from .rewrite.verify import deviation, flatten_outputs


@dataclass
class LayerCalibration:
    name: str
    alpha_before: float
    alpha_after: float
    error_before: float  # relative error on the calibration batches
    error_after: float
    holdout_before: float | None = None  # relative error on held-out batches
    holdout_after: float | None = None
    rows: int = 0
    note: str = ""  # e.g. why the affine was not fitted


@dataclass
class CalibrationReport:
    layers: list[LayerCalibration] = field(default_factory=list)
    output_before: float | None = None  # model output max rel deviation from `reference`
    output_after: float | None = None
    data: str = ""  # which batches the output deviation was measured on

    def __str__(self):
        w = max([5] + [len(r.name) for r in self.layers])
        lines = [f"{'layer':<{w}} {'alpha':>16} {'error (fit)':>18} {'error (held out)':>19}"]
        for r in self.layers:
            held = (f"{r.holdout_before:.4f} -> {r.holdout_after:.4f}" if r.holdout_before is not None else "-")
            lines.append(f"{r.name:<{w}} {r.alpha_before:7.3f} -> {r.alpha_after:7.3f} "
                         f"{r.error_before:8.4f} -> {r.error_after:.4f} {held:>19}"
                         + (f"  ({r.note})" if r.note else ""))
        if self.output_before is not None:
            lines.append(f"model output max rel deviation from the reference ({self.data}): "
                         f"{self.output_before:.4f} -> {self.output_after:.4f}")
        return "\n".join(lines)


class _Stop(Exception):
    pass


def _collect(model: nn.Module, module: nn.Module, batches, max_rows: int) -> torch.Tensor:
    """Inputs of `module` over `batches`, flattened to (rows, channels); the forward is cut short
    right after the module's input is seen."""
    rows = []

    def hook(mod, args):
        rows.append(args[0].detach().reshape(-1, args[0].shape[-1]).double())
        raise _Stop

    handle = module.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            for b in batches:
                args, kwargs = as_args(b)
                try:
                    model(*args, **kwargs)
                except _Stop:
                    pass
    finally:
        handle.remove()
    if not rows:
        raise ValueError("the DyT layer was never reached by the calibration batches")
    x = torch.cat(rows)
    if x.shape[0] > max_rows:  # an even subsample, deterministic
        x = x[torch.linspace(0, x.shape[0] - 1, max_rows).long()]
    return x


def _rel_error(y: torch.Tensor, t: torch.Tensor) -> float:
    return float((y - t).norm() / t.norm().clamp_min(1e-300))


def _affine_for(alpha: float, x, t):
    """Per-channel least-squares w, b for target t given tanh(alpha x)."""
    z = torch.tanh(alpha * x)
    zm, tm = z.mean(0), t.mean(0)
    var = ((z - zm) ** 2).mean(0)
    w = torch.where(var > 1e-30, ((z - zm) * (t - tm)).mean(0) / var.clamp_min(1e-30), torch.zeros_like(var))
    return w, tm - w * zm


def _error_at(alpha: float, x, t, w, b, fit_affine: bool):
    if fit_affine:
        w, b = _affine_for(alpha, x, t)
    y = torch.tanh(alpha * x) * w + (b if b is not None else 0)
    return _rel_error(y, t), w, b


def _fit_alpha(x, t, w, b, fit_affine: bool, alpha0: float):
    """Minimise the relative error over log alpha: grid on [1e-3, 1e3], then golden section."""
    grid = torch.logspace(-3, 3, 73, dtype=torch.float64).tolist()
    if alpha0 > 0:
        grid.append(alpha0)
    errs = [_error_at(a, x, t, w, b, fit_affine)[0] for a in grid]
    i = min(range(len(grid)), key=errs.__getitem__)
    best = grid[i]
    lo, hi = math.log(best) - 0.1, math.log(best) + 0.1  # grid step is ln(10)/12 ~ 0.19
    g = (math.sqrt(5) - 1) / 2
    c, d = hi - g * (hi - lo), lo + g * (hi - lo)
    fc, fd = (_error_at(math.exp(v), x, t, w, b, fit_affine)[0] for v in (c, d))
    for _ in range(40):
        if fc < fd:
            hi, d, fd = d, c, fc
            c = hi - g * (hi - lo)
            fc = _error_at(math.exp(c), x, t, w, b, fit_affine)[0]
        else:
            lo, c, fc = c, d, fd
            d = lo + g * (hi - lo)
            fd = _error_at(math.exp(d), x, t, w, b, fit_affine)[0]
    cand = math.exp((lo + hi) / 2)
    if _error_at(cand, x, t, w, b, fit_affine)[0] > errs[i]:
        cand = best
    return cand


def _params(dyt: DyT):
    """(alpha, w, b) of a DyT, detached float64 copies."""
    b = dyt.bias.detach().double().clone() if dyt.bias is not None else None
    return float(dyt.alpha.detach()), dyt.weight.detach().double().clone(), b


def _dyt_error(dyt: DyT, ref: nn.Module, x, params=None) -> float:
    alpha, w, b = params if params is not None else _params(dyt)
    with torch.no_grad():
        y = torch.tanh(alpha * x) * w + (b if b is not None else 0)
        return _rel_error(y, ref.double()(x))


def _outputs(model, batches):
    outs = []
    with torch.no_grad():
        for bt in batches:
            args, kwargs = as_args(bt)
            outs.append(flatten_outputs(model(*args, **kwargs)))
    return outs


def _output_deviation(ref_outs, outs) -> float:
    """The worst max rel deviation (`rewrite.verify.deviation`) of any floating output on any batch."""
    return max((deviation(v, c[k])[1] for r, c in zip(ref_outs, outs) for k, v in r.items() if v.is_floating_point()),
               default=0.0)


def calibrate(model: nn.Module, batches, *, fit_affine: bool = False, holdout=None, reference: nn.Module | None = None,
              norms: dict[str, nn.Module] | None = None, sequential: bool = True,
              max_rows: int = 20000, min_affine_rows: int = 64) -> CalibrationReport:
    """Fit each DyT's alpha (and with `fit_affine`, its weight and bias) to the outputs of the norm
    it replaced, on `batches` (a list of model inputs: tensors, tuples or keyword dicts).

    `norms` maps DyT module names to the norm modules they stand for; by default the record the
    swap left in `model.meta["swapped_norms"]`. `holdout`: more batches, used only to measure
    each layer's error with its initial and its fitted parameters, both on the held-out inputs it
    sees in the calibrated model (so that only the fit differs). `reference`: the original model; the report then gives
    the model output's max relative deviation from it before and after (on `holdout` if given).
    `min_affine_rows`: with `fit_affine`, a layer that saw fewer rows (e.g. a norm after global
    pooling, one row per image) gets alpha only: a weight and bias per channel fitted on a
    handful of rows interpolate them and generalise badly.
    """
    batches = list(batches)
    holdout = list(holdout) if holdout is not None else None
    if not batches:
        raise ValueError("calibrate needs at least one batch of inputs")
    layers = _dyt_layers(model, norms)

    report = CalibrationReport()
    eval_data = holdout if holdout is not None else batches
    report.data = "held-out batches" if holdout is not None else "calibration batches"
    ref_outs = _outputs(reference, eval_data) if reference is not None else None
    if ref_outs is not None:
        report.output_before = _output_deviation(ref_outs, _outputs(model, eval_data))
    initial = {n: _params(d) for n, d, _ in layers}

    fit_inputs = None if sequential else {n: _collect(model, d, batches, max_rows) for n, d, _ in layers}
    for name, dyt, ref in layers:
        x = _collect(model, dyt, batches, max_rows) if sequential else fit_inputs[name]
        report.layers.append(_fit_layer(name, dyt, ref, x, fit_affine, min_affine_rows))

    if holdout:  # both on the held-out inputs the layer sees in the calibrated model: only the fit differs
        for row, (name, dyt, ref) in zip(report.layers, layers):
            xh = _collect(model, dyt, holdout, max_rows)
            row.holdout_before = _dyt_error(dyt, ref, xh, initial[name])
            row.holdout_after = _dyt_error(dyt, ref, xh)
    if ref_outs is not None:
        report.output_after = _output_deviation(ref_outs, _outputs(model, eval_data))
    return report


def _dyt_layers(model: nn.Module, norms) -> list[tuple[str, DyT, nn.Module]]:
    """(name, DyT, the norm it replaced in float64) for each recorded DyT still in `model`."""
    if norms is None:
        norms = getattr(model, "meta", {}).get("swapped_norms")
        if not norms:
            raise ValueError("the model carries no record of replaced norms (model.meta['swapped_norms'], left by "
                             "the norm_to_dyt swap); pass norms={dyt_module_name: norm_module}")
    named = dict(model.named_modules())
    layers = []
    for name, ref in norms.items():
        if name not in named:
            continue  # the swapped layer was removed later (e.g. dead code)
        if not isinstance(named[name], DyT):
            raise TypeError(f"{name} is a {type(named[name]).__name__}, not a DyT")
        layers.append((name, named[name], ref.double().eval()))
    if not layers:
        raise ValueError("none of the recorded DyT layers is in the model")
    return layers


def _fit_layer(name: str, dyt: DyT, ref: nn.Module, x: torch.Tensor, fit_affine: bool,
               min_affine_rows: int) -> LayerCalibration:
    """Fit one DyT on its inputs `x` to `ref(x)`, set its parameters, and say how it went."""
    with torch.no_grad():
        t = ref(x)
        w = dyt.weight.detach().double()
        b = dyt.bias.detach().double() if dyt.bias is not None else None
        a0 = float(dyt.alpha.detach())
        before = _dyt_error(dyt, ref, x)
        affine = fit_affine and x.shape[0] >= min_affine_rows
        note = "" if affine or not fit_affine else \
            f"alpha only: {x.shape[0]} rows < min_affine_rows={min_affine_rows} for a per-channel w, b"
        alpha = _fit_alpha(x, t, w, b, affine, a0)
        _, w_new, b_new = _error_at(alpha, x, t, w, b, affine)
        dyt.alpha.fill_(alpha)
        if affine:
            dyt.weight.copy_(w_new)
            if dyt.bias is not None:
                dyt.bias.copy_(b_new)
        after = _dyt_error(dyt, ref, x)
    return LayerCalibration(name, a0, alpha, before, after, rows=x.shape[0], note=note)
