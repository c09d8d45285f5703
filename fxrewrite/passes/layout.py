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

from ..rewrite import ops
from ..rewrite.attrs import fetch_attr
from ..rewrite.capture import recompile
from ..rewrite.clone import clone_inputs, preserved_state
from ..rewrite.passmanager import Pass
from ..rewrite.rewriter import Rewriter
from ..rewrite.shapes import tensor_shape
from ..rewrite.verify import compare, default_rtol, flatten_outputs

NAME = "layout"


def to_channels_last(rw: Rewriter) -> bool:
    """Store 4-D conv weights channels-last; returns whether the layout was kept."""
    gm = rw.gm
    weights = sorted({ops.arg(n, "weight").target for n in gm.graph.nodes
                      if n.op == "call_function" and n.target is ops.conv
                      and isinstance(ops.arg(n, "weight"), fx.Node) and ops.arg(n, "weight").op == "get_attr"
                      and fetch_attr(gm, ops.arg(n, "weight").target).dim() == 4})
    if not weights:
        rw.note("graph", "no 2-D convolution with a constant weight: layout unchanged")
        return False
    args, kwargs = gm.meta["example_inputs"]
    recompile(gm)
    before = _run(gm, args, kwargs)
    contiguous_outputs = _contiguous_4d_outputs(rw)
    recompile(gm)
    for t in weights:
        rw.set_memory_format(t, torch.channels_last)
    try:
        after = _run(gm, args, kwargs)
        result = compare(before, after, rtol=_rtol(before), atol=0.0)
        reason = None if result.passed else f"outputs moved on the example inputs:\n{result}"
    except Exception as e:  # e.g. a .view() that needs NCHW strides
        reason = f"the model fails with channels-last activations ({type(e).__name__}: {str(e)[:200]})"
    if reason is not None:
        for t in weights:
            rw.set_memory_format(t, torch.contiguous_format)
        for node in contiguous_outputs:
            rw.redirect(node, node.args[0])
            rw.erase(node)
        rw.skip("graph", f"channels-last layout not applied: {reason}")
        return False
    rw.rewrote("graph", f"{len(weights)} convolution weights stored channels-last; "
                        f"{len(contiguous_outputs)} 4-D outputs made contiguous")
    return True


def _rtol(outputs) -> float:
    """How far the same graph may move when only the layout changes: the convolution algorithm
    can change with it, so a few units of rounding of the outputs' dtype (`default_rtol`)."""
    floats = [t.dtype for t in flatten_outputs(outputs).values() if t.is_floating_point()]
    return max((default_rtol(d) for d in floats), default=default_rtol(torch.float32))


def _run(gm: fx.GraphModule, args, kwargs):
    """The graph's outputs on copies of the inputs, its buffers put back afterwards. GraphModule
    prints the generated code around a failing line to stderr; a failure here is an expected
    answer (reported as a skip), so that print is kept from the user."""
    with torch.no_grad(), preserved_state(gm), contextlib.redirect_stderr(io.StringIO()):
        return gm(*clone_inputs(args), **clone_inputs(kwargs))


def _contiguous_4d_outputs(rw: Rewriter) -> list[fx.Node]:
    """Insert `.contiguous()` before every 4-D graph output; returns the new nodes."""
    output = next(n for n in rw.graph.nodes if n.op == "output")
    added: list[fx.Node] = []
    for v in dict.fromkeys(output.all_input_nodes):
        if len(tensor_shape(v) or ()) == 4:
            c = rw.at(output).call_method("contiguous", (v,))
            rw.redirect(v, c, where=lambda user: user is output)
            added.append(c)
    return added


CHANNELS_LAST = Pass(NAME, "exact", analysis=to_channels_last, needs=("example_inputs",), doc=__doc__)
