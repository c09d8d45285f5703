"""Channels-last weights for 2-D convolutions: `optimize(model, x, layout="channels_last")`.

Exact (memory layout only; oneDNN/cuDNN may pick another algorithm, so results agree up to float
rounding). A 4-D convolution weight stored channels-last makes PyTorch run the convolution, and
every activation after it, in NHWC, which oneDNN runs faster on CPU (6-10% on ResNet-50,
MobileNetV3 and EfficientNet-B0 at batch 1, BENCHMARKS.md). Graph outputs that are 4-D are made
contiguous again, so callers see the layout they always did.

Activations in NHWC break a `.view()` that relied on NCHW strides. So the graph is run on the
example inputs afterwards; if it fails or its outputs move, the layout is put back and the report
says why.
"""
from __future__ import annotations

import contextlib
import io

import torch
import torch.fx as fx

from . import ops
from .report import Report
from .attrs import fetch_attr
from .shapes import tensor_shape
from .capture import as_args
from .clone import clone_inputs, preserved_state
from .verify import compare

NAME = "layout"


def to_channels_last(gm: fx.GraphModule, example_inputs, report: Report) -> bool:
    """Store 4-D conv weights channels-last; returns whether the layout was kept."""
    weights = sorted({ops.arg(n, "weight").target for n in gm.graph.nodes
                      if n.op == "call_function" and n.target is ops.conv
                      and isinstance(ops.arg(n, "weight"), fx.Node) and ops.arg(n, "weight").op == "get_attr"
                      and fetch_attr(gm, ops.arg(n, "weight").target).dim() == 4})
    if not weights:
        report.note(NAME, "graph", "no 2-D convolution with a constant weight: layout unchanged")
        return False
    args, kwargs = as_args(example_inputs)
    before = _run(gm, args, kwargs)
    old = {t: fetch_attr(gm, t).data for t in weights}
    contiguous_outputs = _contiguous_4d_outputs(gm)
    gm.recompile()
    for t, data in old.items():
        fetch_attr(gm, t).data = data.contiguous(memory_format=torch.channels_last)
    try:
        after = _run(gm, args, kwargs)
        result = compare(before, after, rtol=1e-5, atol=0.0)
        reason = None if result.passed else f"outputs moved on the example inputs:\n{result}"
    except Exception as e:  # e.g. a .view() that needs NCHW strides
        reason = f"the model fails with channels-last activations ({type(e).__name__}: {str(e)[:200]})"
    if reason is not None:
        for t, data in old.items():
            fetch_attr(gm, t).data = data
        for node in contiguous_outputs:
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
        gm.recompile()
        report.skip(NAME, "graph", f"channels-last layout not applied: {reason}")
        return False
    report.rewrote(NAME, "graph", f"{len(weights)} convolution weights stored channels-last; "
                                  f"{len(contiguous_outputs)} 4-D outputs made contiguous")
    return True


def _run(gm: fx.GraphModule, args, kwargs):
    """The graph's outputs on copies of the inputs, its buffers put back afterwards. GraphModule
    prints the generated code around a failing line to stderr; a failure here is an expected
    answer (reported as a skip), so that print is kept from the user."""
    with torch.no_grad(), preserved_state(gm), contextlib.redirect_stderr(io.StringIO()):
        return gm(*clone_inputs(args), **clone_inputs(kwargs))


def _contiguous_4d_outputs(gm: fx.GraphModule) -> list[fx.Node]:
    """Insert `.contiguous()` before every 4-D graph output; returns the new nodes."""
    output = next(n for n in gm.graph.nodes if n.op == "output")
    added: list[fx.Node] = []

    def wrap(v):
        if isinstance(v, fx.Node) and len(tensor_shape(v) or ()) == 4:
            with gm.graph.inserting_before(output):
                c = gm.graph.call_method("contiguous", (v,))
            c.meta.update({k: v.meta[k] for k in ("val", "tensor_meta") if k in v.meta})
            added.append(c)
            return c
        return v

    output.args = (fx.node.map_arg(output.args[0], wrap),)
    return added
