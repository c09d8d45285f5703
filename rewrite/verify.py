"""Compare two models' outputs on the same inputs, output by output.

Outputs may be tensors or any nesting of tuples, lists, dicts and HF `ModelOutput`s. Each tensor
output is compared with a norm-wise criterion: it passes when max|a - b| <= atol + rtol * max|ref|
(element-wise relative error is meaningless where the reference crosses zero).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .capture import as_args


class VerificationError(AssertionError):
    """The candidate's outputs differ from the reference's beyond tolerance."""


@dataclass
class OutputDiff:
    max_abs: float
    max_rel: float  # max|a - b| / max|ref|
    passed: bool
    shape: tuple


@dataclass
class VerifyResult:
    outputs: dict[str, OutputDiff] = field(default_factory=dict)
    rtol: float = 0.0
    atol: float = 0.0
    dtype: str = ""

    @property
    def passed(self) -> bool:
        return all(d.passed for d in self.outputs.values())

    @property
    def max_abs(self) -> float:
        return max((d.max_abs for d in self.outputs.values()), default=0.0)

    @property
    def max_rel(self) -> float:
        return max((d.max_rel for d in self.outputs.values()), default=0.0)

    def as_dict(self) -> dict:
        return {k: {"max_abs": d.max_abs, "max_rel": d.max_rel} for k, d in self.outputs.items()}

    def __str__(self):
        lines = [f"{'PASS' if self.passed else 'FAIL'} ({self.dtype}, rtol={self.rtol:g}, atol={self.atol:g})"]
        for k, d in self.outputs.items():
            lines.append(f"  {k}: shape {list(d.shape)}, max abs {d.max_abs:.3g}, max rel {d.max_rel:.3g}"
                         f"{'' if d.passed else '  <-- FAIL'}")
        return "\n".join(lines)


def flatten_outputs(out, prefix: str = "out") -> dict[str, torch.Tensor]:
    """Name every tensor in a nested output: out, out[0], out.logits, ..."""
    if isinstance(out, torch.Tensor):
        return {prefix: out}
    flat: dict[str, torch.Tensor] = {}
    if isinstance(out, dict):  # includes HF ModelOutput (an OrderedDict)
        for k, v in out.items():
            flat.update(flatten_outputs(v, f"{prefix}.{k}"))
    elif isinstance(out, (tuple, list)):
        for i, v in enumerate(out):
            flat.update(flatten_outputs(v, f"{prefix}[{i}]"))
    return flat


def _to_double(x):
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x.double()
    if isinstance(x, (tuple, list)):
        return type(x)(_to_double(v) for v in x)
    if isinstance(x, dict):
        return {k: _to_double(v) for k, v in x.items()}
    return x


def _amax(t: torch.Tensor) -> float:
    return float(t.abs().max()) if t.numel() else 0.0


def compare(ref_out, cand_out, rtol: float, atol: float) -> VerifyResult:
    ref, cand = flatten_outputs(ref_out), flatten_outputs(cand_out)
    if ref.keys() != cand.keys():
        raise VerificationError(f"outputs differ in structure: {sorted(ref)} vs {sorted(cand)}")
    result = VerifyResult(rtol=rtol, atol=atol)
    for k, r in ref.items():
        c = cand[k]
        if r.shape != c.shape:
            raise VerificationError(f"{k}: shape {list(r.shape)} vs {list(c.shape)}")
        if not r.is_floating_point():
            diff = float((r != c).sum())
            result.outputs[k] = OutputDiff(diff, diff, diff == 0, tuple(r.shape))
            continue
        r64, c64 = r.detach().double(), c.detach().double()
        if not (torch.isfinite(r64).all() and torch.isfinite(c64).all()):
            # the same non-finite values (nan, +inf, -inf) at the same places, the rest within tolerance
            fin = torch.isfinite(r64)
            same_place = bool(torch.equal(fin, torch.isfinite(c64))) and bool(torch.equal(r64.isnan(), c64.isnan()))
            same_inf = same_place and bool(torch.equal(r64[~fin & ~r64.isnan()], c64[~fin & ~c64.isnan()]))
            scale = _amax(r64[fin]) if fin.any() else 0.0
            close = same_inf and (not fin.any() or _amax(r64[fin] - c64[fin]) <= atol + rtol * scale)
            result.outputs[k] = OutputDiff(float("nan"), float("nan"), close, tuple(r.shape))
            continue
        max_abs, scale = _amax(r64 - c64), _amax(r64)
        max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
        result.outputs[k] = OutputDiff(max_abs, max_rel, max_abs <= atol + rtol * scale, tuple(r.shape))
    result.dtype = str(next(iter(ref.values())).dtype).replace("torch.", "") if ref else ""
    return result


def verify(reference: nn.Module, candidate: nn.Module, inputs, rtol: float | None = None,
           atol: float | None = None, float64: bool = False, raise_on_fail: bool = True) -> VerifyResult:
    """Run both models on `inputs` and compare every output.

    float64=True runs copies of both models in double precision, which separates a rewrite's
    real error from float32 rounding (exact rewrites then agree to ~1e-12). Default tolerances:
    rtol 1e-5 (float32) or 1e-10 (float64), atol 0.
    """
    args, kwargs = as_args(inputs)
    if float64:
        reference, candidate = copy.deepcopy(reference).double(), copy.deepcopy(candidate).double()
        args, kwargs = _to_double(args), _to_double(kwargs)
    rtol = (1e-10 if float64 else 1e-5) if rtol is None else rtol
    atol = 0.0 if atol is None else atol
    with torch.no_grad():
        ref_out = reference(*args, **kwargs)
        cand_out = candidate(*args, **kwargs)
    result = compare(ref_out, cand_out, rtol, atol)
    if raise_on_fail and not result.passed:
        raise VerificationError(str(result))
    return result
