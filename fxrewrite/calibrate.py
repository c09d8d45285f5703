"""Calibrate the modules an approximate swap put into a model against the layers they replaced.

    gm = optimize(model, x, passes=["norm_to_dyt"])       # or norm_to_eln, relu_to_..., several
    result = calibrate(gm, batches, holdout=other_batches, reference=model)
    print(result)                     # per layer: its scalar parameters and error before -> after

Why. A swapped-in module (DyT, ELN, a fitted polynomial, ...) resembles the layer it replaced
only on the inputs its parameters suit: DyT(x) = w * tanh(alpha x) + b does not normalise, and
alpha0 = 0.5 knows nothing about the scale of that layer's inputs. Fitting the parameters on a
few batches of real inputs brings each module close to its layer before fine-tuning.

The protocol, one loop for every swap. The swap records the replaced layer as a module,
`model.meta["swapped_norms"]` = {swapped module's name: reference module} (also read:
`model.meta["swapped_references"]`, the same record under a name that is not about norms). A
swapped module that has parameters to fit says so with a method

    fit_to(x, target, **options) -> str

which sets its parameters in place so that module(x) ~ target, doing its maths in float64, and
returns a short note ("" if none); options it does not know it ignores (`calibrate` passes
`fit_affine`, `min_affine_rows` and `fit_options` to all). `x` is the module's input in the model
in float64 and in its own layout (NCHW stays NCHW), the calibration batches concatenated along
dim 0 (flattened to (rows, last dim) where their shapes differ beyond dim 0), subsampled evenly
along dim 0 to at most `max_rows` rows of the last dim; `target` is the reference module run on
it in float64. The objective is the relative error

    E = ||m(X) - T|| / ||T||          (Frobenius norms over all rows and channels)

which `calibrate` measures itself, before and after each fit, with the module run in float64;
a fit that would raise E is undone. Recorded modules without `fit_to` are listed in
`CalibrationReport.skipped` and left alone. Modules are fitted in graph order, each on the
inputs it sees after the modules before it were fitted (`sequential=True`), or all on inputs
gathered in one pass. What the modules fit:
- DyT (`rewrite.nn.DyT.fit_to`): alpha > 0 (a log-spaced grid, then golden-section refinement;
  E is one-dimensional and cheap) with w, b kept; or, with `fit_affine=True`, alpha and the
  per-channel w, b, which for a fixed alpha is ordinary least squares per channel
  (w_c = cov(t_c, y_c) / var(t_c), b_c = mean(y_c) - w_c mean(t_c), t = tanh(alpha x)).
- ELN (`rewrite.nn.ELN.fit_to`): beta > 0 the same way, with sqrt(C - 1) x / sqrt(beta + x^2) in
  place of tanh(alpha x).
- PartialRMSNorm: the per-channel weight by least squares.
`min_affine_rows`: with `fit_affine`, a layer that saw fewer rows (e.g. a norm after global
pooling, one row per image) gets its scalar only: a weight and bias per channel fitted on a
handful of rows interpolate them and generalise badly.

`calibrate` changes the parameters of the model it is given (that is its purpose); the user's
original model, passed as `reference`, is only run.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn

from .rewrite.capture import as_args
from .rewrite.nn import relative_error
from .rewrite.verify import deviation, flatten_outputs

RECORD_KEYS = ("swapped_norms", "swapped_references")  # {swapped module name: reference module}


@dataclass
class LayerCalibration:
    name: str
    kind: str  # the swapped module's class name
    error_before: float  # relative error E on the calibration batches
    error_after: float
    params_before: dict = field(default_factory=dict)  # its scalar parameters/buffers, e.g. {"alpha": 0.5}
    params_after: dict = field(default_factory=dict)
    holdout_before: float | None = None  # E on held-out batches
    holdout_after: float | None = None
    rows: int = 0  # rows of the last dim the fit saw
    note: str = ""  # what fit_to said (e.g. why the affine was not fitted)

    @property
    def alpha_before(self) -> float | None:
        return self.params_before.get("alpha")

    @property
    def alpha_after(self) -> float | None:
        return self.params_after.get("alpha")

    def params(self) -> str:
        return ", ".join(f"{k} {v:.4g} -> {self.params_after.get(k, float('nan')):.4g}"
                         for k, v in self.params_before.items()) or "-"


@dataclass
class CalibrationReport:
    layers: list[LayerCalibration] = field(default_factory=list)
    output_before: float | None = None  # model output max rel deviation from `reference`
    output_after: float | None = None
    data: str = ""  # which batches the output deviation was measured on
    skipped: dict[str, str] = field(default_factory=dict)  # recorded modules not fitted, and why

    def layer(self, name: str) -> LayerCalibration:
        return next(r for r in self.layers if r.name == name)

    def __str__(self):
        w = max([5] + [len(r.name) for r in self.layers])
        p = max([10] + [len(r.params()) for r in self.layers])
        k = max([4] + [len(r.kind) for r in self.layers])
        lines = [f"{'layer':<{w}} {'kind':<{k}} {'parameters':<{p}} {'error (fit)':>18} {'error (held out)':>19}"]
        for r in self.layers:
            held = (f"{r.holdout_before:.4f} -> {r.holdout_after:.4f}" if r.holdout_before is not None else "-")
            lines.append(f"{r.name:<{w}} {r.kind:<{k}} {r.params():<{p}} "
                         f"{r.error_before:8.4f} -> {r.error_after:.4f} {held:>19}"
                         + (f"  ({r.note})" if r.note else ""))
        for name, why in self.skipped.items():
            lines.append(f"{name:<{w}} not fitted: {why}")
        if self.output_before is not None:
            lines.append(f"model output max rel deviation from the reference ({self.data}): "
                         f"{self.output_before:.4f} -> {self.output_after:.4f}")
        return "\n".join(lines)


class _Stop(Exception):
    pass


def _collect(model: nn.Module, module: nn.Module, batches, max_rows: int) -> torch.Tensor:
    """Inputs of `module` over `batches` in float64, in the module's own layout, concatenated along
    dim 0 (flattened to (rows, last dim) when the batches' shapes differ beyond dim 0, or the input
    has fewer than 2 dims), at most `max_rows` rows of the last dim, evenly spaced along dim 0; the
    forward is cut short right after the module's input is seen."""
    pieces = []

    def hook(mod, args):
        pieces.append(args[0].detach().double())
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
    if not pieces:
        raise ValueError(f"the swapped layer ({type(module).__name__}) was never reached by the calibration batches")
    if pieces[0].dim() >= 2 and all(p.shape[1:] == pieces[0].shape[1:] for p in pieces):
        x = torch.cat(pieces)
    else:
        x = torch.cat([p.reshape(-1, p.shape[-1]) for p in pieces])
    rows_per_item = x[0].numel() // x.shape[-1]  # rows of the last dim in one slice of dim 0
    keep = max(1, max_rows // max(rows_per_item, 1))
    if x.shape[0] > keep:  # an even subsample, deterministic
        x = x[torch.linspace(0, x.shape[0] - 1, keep).long()]
    return x


def _float64(module: nn.Module) -> nn.Module:
    """A float64 copy of `module`, to measure E without touching it."""
    return copy.deepcopy(module).double().eval()


def _error(module64: nn.Module, x: torch.Tensor, t: torch.Tensor) -> float:
    with torch.no_grad():
        return relative_error(module64(x), t)


def _scalars(module: nn.Module) -> dict[str, float]:
    """The module's own one-element parameters and buffers (alpha, beta, ...), for the report."""
    own = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
    return {n: float(v.detach()) for n, v in own if v is not None and v.numel() == 1 and v.is_floating_point()}


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
              max_rows: int = 20000, min_affine_rows: int = 64, fit_options: dict | None = None) -> CalibrationReport:
    """Fit every swapped module that has `fit_to` to the layer it replaced, on `batches` (a list of
    model inputs: tensors, tuples or keyword dicts); see the module docstring.

    `norms` maps swapped module names to the reference modules they stand for; by default the
    record the swaps left in `model.meta` ("swapped_norms", "swapped_references"). `holdout`: more
    batches, used only to measure each layer's error with its initial and its fitted parameters,
    both on the held-out inputs it sees in the calibrated model (so that only the fit differs).
    `reference`: the original model; the report then gives the model output's max relative
    deviation from it before and after (on `holdout` if given). `fit_affine`, `min_affine_rows`
    and `fit_options` (a dict) are passed to every `fit_to` as keyword options.
    """
    batches = list(batches)
    holdout = list(holdout) if holdout is not None else None
    if not batches:
        raise ValueError("calibrate needs at least one batch of inputs")
    report = CalibrationReport()
    layers = _layers(model, norms, report.skipped)
    options = {"fit_affine": fit_affine, "min_affine_rows": min_affine_rows, **(fit_options or {})}

    eval_data = holdout if holdout is not None else batches
    report.data = "held-out batches" if holdout is not None else "calibration batches"
    ref_outs = _outputs(reference, eval_data) if reference is not None else None
    if ref_outs is not None:
        report.output_before = _output_deviation(ref_outs, _outputs(model, eval_data))
    initial = {n: _float64(m) for n, m, _ in layers}

    fit_inputs = None if sequential else {n: _collect(model, m, batches, max_rows) for n, m, _ in layers}
    for name, module, ref in layers:
        x = _collect(model, module, batches, max_rows) if sequential else fit_inputs[name]
        report.layers.append(_fit_layer(name, module, ref, x, options))

    if holdout:  # both on the held-out inputs the layer sees in the calibrated model: only the fit differs
        for row, (name, module, ref) in zip(report.layers, layers):
            xh = _collect(model, module, holdout, max_rows)
            with torch.no_grad():
                th = ref(xh)
            row.holdout_before = _error(initial[name], xh, th)
            row.holdout_after = _error(_float64(module), xh, th)
    if ref_outs is not None:
        report.output_after = _output_deviation(ref_outs, _outputs(model, eval_data))
    return report


def _records(model: nn.Module) -> dict[str, nn.Module]:
    meta = getattr(model, "meta", None) or {}
    out: dict[str, nn.Module] = {}
    for key in RECORD_KEYS:
        out.update(meta.get(key) or {})
    return out


def _graph_order(model: nn.Module, names) -> list[str]:
    """`names` in the order their modules are first called in the graph (a GraphModule), else in
    `named_modules` order."""
    rank: dict[str, int] = {}
    if isinstance(model, fx.GraphModule):
        for n in model.graph.nodes:
            if n.op == "call_module":
                rank.setdefault(n.target, len(rank))
    for name, _ in model.named_modules():
        rank.setdefault(name, len(rank))
    return sorted(names, key=lambda n: rank.get(n, len(rank)))


def _layers(model: nn.Module, norms, skipped: dict) -> list[tuple[str, nn.Module, nn.Module]]:
    """(name, swapped module, its reference in float64) for each recorded module with `fit_to`
    still in `model`, in graph order; the others go to `skipped` with the reason."""
    if norms is None:
        norms = _records(model)
        if not norms:
            raise ValueError("the model carries no record of replaced norms or layers (model.meta['swapped_norms'], "
                             "left by the swaps such as norm_to_dyt); pass norms={swapped_module_name: reference}")
    named = dict(model.named_modules())
    layers = []
    for name in _graph_order(model, [n for n in norms if n in named]):  # a missing one was removed later (dead code)
        module = named[name]
        if not callable(getattr(module, "fit_to", None)):
            skipped[name] = f"a {type(module).__name__} has no fit_to"
            continue
        layers.append((name, module, copy.deepcopy(norms[name]).double().eval()))
    if not layers:
        why = f" ({'; '.join(f'{k}: {v}' for k, v in skipped.items())})" if skipped else ""
        raise ValueError(f"none of the recorded swapped layers is in the model with a fit_to method{why}")
    return layers


def _fit_layer(name: str, module: nn.Module, ref: nn.Module, x: torch.Tensor, options: dict) -> LayerCalibration:
    """Fit one module on its inputs `x` to `ref(x)` with its own `fit_to`, and say how it went."""
    with torch.no_grad():
        t = ref(x)
    before = _error(_float64(module), x, t)
    params_before = _scalars(module)
    saved = {k: v.detach().clone() for k, v in module.state_dict().items()}
    note = module.fit_to(x, t, **options) or ""
    after = _error(_float64(module), x, t)
    if not after <= before:  # never leave a layer worse than the swap did (or NaN)
        with torch.no_grad():
            module.load_state_dict(saved)
        note = "; ".join(filter(None, [note, f"fit gave E={after:.4g} > {before:.4g}: initial parameters kept"]))
        after = before
    return LayerCalibration(name, type(module).__name__, before, after, params_before, _scalars(module),
                            rows=x.numel() // max(x.shape[-1], 1) if x.dim() else 1, note=note)
