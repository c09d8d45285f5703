"""Remove ops that compute the identity: `nn.Identity`, eval-mode dropout (canonicalised to
`aten.alias`). Exact: the value is passed through unchanged."""
from __future__ import annotations

import torch

from ..rewrite.passmanager import Pass, Rule
from ..rewrite.pattern import Any, Op


def remove_identity(rw, x, node):
    return x


IDENTITY_REMOVAL = Pass(
    "remove_identity", "exact",
    rules=[Rule("remove_identity", Op(torch.ops.aten.alias.default, self=Any("x"), name="node"), remove_identity)],
    doc=__doc__,
)
