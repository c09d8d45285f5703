"""The oracle's comparisons: the tolerance rule, output comparison, and "nothing of the user's changed".

Tolerance rule (float32, bfloat16): a candidate output passes when

    max|cand - ref64| <= K * max|eager - ref64| + C * eps(dtype) * max|ref64|

where ref64 is the user's model run in float64 on upcast inputs and eager is the user's model
run in its own dtype. K = 8: an exact rewrite rounds differently from eager (folded weights are
rounded once, merged kernels sum in another order) but not by an order of magnitude more;
C ulps of the output's scale (`verify.FLOOR_ULPS`: 16 for float32, 4 for 16-bit types) cover
outputs that eager happens to compute almost exactly (seed 4599: a BN folded into a 3x3x3 conv
of a chain came out at 3.1e-6, 13 x eager's own 2.3e-7 but 1.3e-6 of the output's scale, and
exact in float64). This rule judges rounding only;
exactness itself is judged in float64, where it is strict: float64 models must agree within
REL64 = 1e-9 of max|ref64| (expect ~1e-12), and for float32/bfloat16 models the exact options
replay the derivations on float64 weights (`verify(float64=True)`, the `verify64` class).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from fxrewrite.rewrite.verify import FLOOR_ULPS, flatten_outputs

K = 8.0
REL64 = 1e-9


def tolerance(ref: torch.Tensor, eager: torch.Tensor, dtype: torch.dtype, common: float = 0.0) -> float:
    """The rule above. `common`: a scale the value's rounding may come from beyond its own
    magnitude (a gradient that cancels to ~0 is a sum of terms of the model's gradient scale),
    a floor of the float64 and float32 rules' own term at that scale (16-bit types get none: at
    4 of their ulps it would pass gradients 3% of the largest whole)."""
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    if dtype == torch.float64:
        return REL64 * max(scale, common)
    eager_err = float((eager.double() - ref).abs().max()) if ref.numel() else 0.0
    ulps = FLOOR_ULPS.get(dtype, 1) * torch.finfo(dtype).eps
    return K * eager_err + ulps * max(scale, common if dtype == torch.float32 else 0.0)


def compare_outputs(cand, ref, eager, rounds_in: torch.dtype | None = None, common_scale: bool = False) -> str | None:
    """None when every output of `cand` is within tolerance of `ref`, else what differs.
    `rounds_in`: the dtype the candidate may round in where it is not the outputs' own (a
    lowered kernel of a float64 model that computes a norm in float32, as the model does).
    `common_scale`: the largest finite |ref64| of all the outputs is a floor of every output's
    scale (gradients; `tolerance`)."""
    c, r, e = flatten_outputs(cand), flatten_outputs(ref), flatten_outputs(eager)
    if c.keys() != r.keys():
        return f"outputs differ in structure: {sorted(c)} vs {sorted(r)}"
    common = 0.0
    if common_scale:
        finite = [v.detach().double() for v in r.values() if v.numel()]
        common = max((float(v[torch.isfinite(v)].abs().max()) for v in finite if torch.isfinite(v).any()),
                     default=0.0)
    for k, rv in r.items():
        cv, ev = c[k], e[k]
        if cv.shape != rv.shape or cv.dtype != ev.dtype:
            return f"{k}: {list(cv.shape)} {cv.dtype} vs eager {list(ev.shape)} {ev.dtype}"
        r64, c64 = rv.detach().double(), cv.detach().double()
        if not (torch.isfinite(r64).all() and torch.isfinite(ev.double()).all()):
            continue  # inconclusive: the reference itself overflows
        if not torch.isfinite(c64).all():
            return f"{k}: non-finite candidate output where the reference is finite"
        err, tol = float((c64 - r64).abs().max()), tolerance(r64, ev.detach(), rounds_in or ev.dtype, common)
        if err > tol:
            scale = float(r64.abs().max())
            return f"{k}: max|cand - ref64| = {err:.3g} > tolerance {tol:.3g} (max|ref64| = {scale:.3g}, {ev.dtype})"
    return None


def snapshot(model: nn.Module) -> dict:
    """What the user owns: tensor values, training flags, hook counts."""
    return {"state": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
            "training": [m.training for m in model.modules()],
            "hooks": [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]}


def same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.stride() == b.stride() and bool(
        torch.equal(a, b) or (a.is_floating_point() and torch.allclose(a, b, rtol=0, atol=0, equal_nan=True)))


def model_changes(model: nn.Module, before: dict) -> str | None:
    """None when the model is as `snapshot` saw it, else the first difference."""
    after = snapshot(model)
    if after["state"].keys() != before["state"].keys():
        return f"state_dict keys changed: {sorted(set(after['state']) ^ set(before['state']))}"
    for k, v in before["state"].items():
        if not same_tensor(after["state"][k], v):
            return f"{k} changed"
    if after["training"] != before["training"]:
        return "training flags changed"
    if after["hooks"] != before["hooks"]:
        return "hooks changed"
    return None
