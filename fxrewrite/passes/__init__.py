"""The catalogue of passes, in one explicit registry (nothing registers itself on import).

`DEFAULT` is what `optimize` runs when no passes are named: exact passes only. Approximate
passes (architecture swaps) run only when asked for by name or preset; their factories with
options (`swaps.norm_to_dyt(alpha=...)`, ...) are in `passes.swaps`. The finishing steps
(`inplace`, `layout`) and the Triton lowering are passes too, added by the pipeline that
`optimize` and the compile backend share.
"""
from __future__ import annotations

from ..rewrite.lift_norms import LIFT_NORMS
from ..rewrite.passmanager import Pass

from .batchnorm import BATCHNORM_FOLDING
from .batchnorm_forward import FOLD_BN_FORWARD
from .cleanup import IDENTITY_REMOVAL
from .constants import FOLD_CONSTANTS
from .inplace import INPLACE
from .layout import CHANNELS_LAST
from .norm_affine import FOLD_NORM_AFFINE, FOLD_SCALE_SHIFT
from .prenorm import PRENORM_CRMSNORM, PRENORM_RMSNORM
from .reparam import STRUCTURAL_REPARAM
from .swaps import LAYERNORM_TO_RMSNORM, NORM_TO_DYT, RELU_TO_GENERALIZED_SMELU, RELU_TO_SMELU
from .swaps_activation import RELU_TO_POLY, RELUFICATION
from .swaps_norm import NORM_TO_ELN, RMSNORM_TO_PRMSNORM

REGISTRY: dict[str, Pass] = {p.name: p for p in [
    IDENTITY_REMOVAL, FOLD_CONSTANTS, FOLD_SCALE_SHIFT, BATCHNORM_FOLDING, STRUCTURAL_REPARAM, FOLD_BN_FORWARD,
    LIFT_NORMS,
    FOLD_NORM_AFFINE, PRENORM_RMSNORM, PRENORM_CRMSNORM,
    RELU_TO_SMELU, RELU_TO_GENERALIZED_SMELU, LAYERNORM_TO_RMSNORM, NORM_TO_DYT,
    RELUFICATION, RELU_TO_POLY,
    NORM_TO_ELN, RMSNORM_TO_PRMSNORM,
]}

DEFAULT: list[str] = ["remove_identity", "fold_constants", "fold_scale_shift", "fold_batchnorm", "merge_branches",
                       "fold_bn_forward"]

PRESETS: dict[str, list[str]] = {
    "exact": DEFAULT,
    # before quantisation: norms lose their affine to the linears that read them (exact, but
    # the checkpoint's structure changes and tied weights become copies: opt-in)
    "quantize_prep": DEFAULT + ["lift_norms", "fold_norm_affine"],
    "swap_dyt": ["lift_norms", "norm_to_dyt"],
    "swap_smelu": ["relu_to_smelu"],
    "swap_rmsnorm": ["layernorm_to_rmsnorm"],
}

__all__ = ["REGISTRY", "DEFAULT", "PRESETS", "resolve", "INPLACE", "CHANNELS_LAST", "LIFT_NORMS"]


def resolve(names) -> list[Pass]:
    """Pass objects for pass names, preset names or Pass objects (one, or a list of them)."""
    if isinstance(names, (str, Pass)):
        names = [names]
    out: list[Pass] = []
    for item in names:
        if isinstance(item, Pass):
            out.append(item)
        elif item in PRESETS:
            out += [REGISTRY[n] for n in PRESETS[item]]
        elif item in REGISTRY:
            out.append(REGISTRY[item])
        else:
            raise KeyError(f"unknown pass or preset {item!r}; known passes: {sorted(REGISTRY)}, "
                           f"presets: {sorted(PRESETS)}")
    return out
