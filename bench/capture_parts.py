"""Capture's parts against the standard tools they replace, on the same models in the same run.

    python bench/capture_parts.py
    python bench/capture_parts.py --blocks 60 --repeat 3

  copy     copy.deepcopy(model)                 vs fxrewrite.rewrite.clone.copy_model(model)
  trace    an fx.Tracer (same leaf modules)     vs fxrewrite.rewrite.capture's tracer
  shapes   torch.fx ShapeProp                   vs fxrewrite.rewrite.shapes.propagate_shapes

Each pair is timed alternately (round-robin) from a collected heap, under the garbage-collector
setting `optimize` uses, median of `--repeat` runs; the ratio is standard / ours (above 1: ours
is faster). tests/test_capture.py checks that each pair gives the same result.
"""
from __future__ import annotations

import argparse
import copy
import gc
import os
import statistics
import sys
import time

import torch
import torch.fx as fx
from torch.fx.passes.shape_prop import ShapeProp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine, table  # noqa: E402
from rewrite_cost import stacked  # noqa: E402

from fxrewrite.api import no_full_collections  # noqa: E402
from fxrewrite.rewrite.capture import _Tracer  # noqa: E402
from fxrewrite.rewrite.clone import copy_model  # noqa: E402
from fxrewrite.rewrite.nn import LEAF_MODULES  # noqa: E402
from fxrewrite.rewrite.shapes import propagate_shapes  # noqa: E402


class _FxTracer(fx.Tracer):
    def is_leaf_module(self, m, qualname):
        return isinstance(m, LEAF_MODULES) or super().is_leaf_module(m, qualname)


def _median_pair(standard, ours, repeat: int) -> tuple[float, float]:
    """Each run starts from a collected heap and runs as inside `optimize` (no full garbage
    collections), so neither side pays for the other's garbage."""
    a, b = [], []
    for _ in range(repeat):
        for fn, out in ((standard, a), (ours, b)):
            gc.collect()
            with no_full_collections():
                t0 = time.perf_counter()
                fn()
                out.append(time.perf_counter() - t0)
    return statistics.median(a), statistics.median(b)


def parts(name: str, model, x, repeat: int) -> list[dict]:
    traced = fx.GraphModule(model, _FxTracer().trace(model))
    pairs = {
        "copy": (lambda: copy.deepcopy(model), lambda: copy_model(model)),
        "trace": (lambda: _FxTracer().trace(model), lambda: _Tracer().trace(model)),
        "shapes": (lambda: ShapeProp(traced).propagate(x), lambda: propagate_shapes(traced, x)),
    }
    rows = []
    for part, (standard, ours) in pairs.items():
        s, o = _median_pair(standard, ours, repeat)
        rows.append({"model": name, "nodes": len(traced.graph.nodes), "part": part, "standard ms": f"{s * 1e3:.0f}",
                     "ours ms": f"{o * 1e3:.0f}", "standard / ours": f"{s / o:.2f}x"})
        print(rows[-1], file=sys.stderr)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=240, help="transformer blocks in the stacked model")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--no-timm", action="store_true")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    with torch.no_grad():
        rows = parts(f"{args.blocks} blocks", stacked(args.blocks), torch.randn(1, 4, 16), args.repeat)
        if not args.no_timm:
            import timm
            rows += parts("timm vit_small (1x3x224x224)", timm.create_model("vit_small_patch16_224").eval(),
                          torch.randn(1, 3, 224, 224), args.repeat)
    print(f"\nMachine: {machine()}. Median milliseconds over {args.repeat} alternating runs.\n")
    print(table(rows, list(rows[0])))


if __name__ == "__main__":
    main()
