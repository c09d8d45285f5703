"""The catalogue of passes, in one explicit registry (nothing registers itself on import).

`DEFAULT` is what `optimize` runs when no passes are named: exact passes only. Approximate
passes (architecture swaps) run only when asked for by name or preset.
"""
from __future__ import annotations

from rewrite.passmanager import Pass

from .batchnorm import BATCHNORM_FOLDING
from .cleanup import IDENTITY_REMOVAL
from .reparam import STRUCTURAL_REPARAM

REGISTRY: dict[str, Pass] = {p.name: p for p in [
    IDENTITY_REMOVAL,
    BATCHNORM_FOLDING,
    STRUCTURAL_REPARAM,
]}

DEFAULT: list[str] = ["remove_identity", "fold_batchnorm", "merge_branches"]

PRESETS: dict[str, list[str]] = {
    "exact": DEFAULT,
}

# architecture swaps (issue 4): opt-in only, never in DEFAULT; factories with options in passes.swaps
from .prenorm import PRENORM_RMSNORM  # noqa: E402
from .swaps import (LAYERNORM_TO_RMSNORM, LIFT_NORMS, NORM_TO_DYT, RELU_TO_GENERALIZED_SMELU,  # noqa: E402
                    RELU_TO_SMELU)

REGISTRY.update({p.name: p for p in [LIFT_NORMS, RELU_TO_SMELU, RELU_TO_GENERALIZED_SMELU, LAYERNORM_TO_RMSNORM,
                                     NORM_TO_DYT, PRENORM_RMSNORM]})
PRESETS.update({"swap_dyt": ["lift_norms", "norm_to_dyt"], "swap_smelu": ["relu_to_smelu"],
                "swap_rmsnorm": ["layernorm_to_rmsnorm"]})


def resolve(names) -> list[Pass]:
    """Pass objects for a list of pass names, preset names or Pass objects."""
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
