"""What rewriting costs: seconds per stage on graphs of 1k-8k nodes and on ResNet-50.

    python bench/rewrite_cost.py
    python bench/rewrite_cost.py --blocks 16,32 --no-resnet

Graphs of stacked pre-LN transformer blocks (LayerNorm, attention, MLP, residual adds) at tiny
width, so that the model's own compute is negligible and the cost measured is the compiler's.
Stages come from `report.timings` (capture = deep copy + symbolic_trace + shape propagation).
"""
from __future__ import annotations

import argparse
import os
import sys
from unittest import mock

import torch
import torch.fx as fx
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine, table  # noqa: E402

from rewrite import optimize  # noqa: E402


class Block(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.bn = nn.BatchNorm1d(4 * d)
        self.drop = nn.Dropout(0.1)

    def forward(self, x):
        q, k, v = self.qkv(self.ln1(x)).chunk(3, dim=-1)
        a = torch.softmax(q @ k.transpose(-1, -2) / 4.0, dim=-1) @ v
        x = x + self.drop(self.proj(a))
        h = self.fc1(self.ln2(x))
        h = self.bn(h.transpose(1, 2)).transpose(1, 2)
        return x + self.fc2(torch.nn.functional.gelu(h))


def stacked(n_blocks: int) -> nn.Module:
    return nn.Sequential(*[Block() for _ in range(n_blocks)]).eval()


def measure(model, x) -> dict:
    calls = []
    original = fx.GraphModule.recompile

    def counting(self):
        calls.append(1)
        return original(self)

    with mock.patch.object(fx.GraphModule, "recompile", counting):
        calls.clear()
        out = optimize(model, x)
        recompiles_after_capture = len(calls) - 1  # GraphModule() itself compiles the traced graph once
    t = out.report.timings
    nodes = len(out.graph.nodes)
    return {"nodes in": t.get("_nodes_in", ""), "nodes out": nodes,
            **{k: f"{v * 1e3:.0f}" for k, v in t.items()},
            "total ms": f"{sum(t.values()) * 1e3:.0f}",
            "rewrite-only ms": f"{(sum(t.values()) - t['capture']) * 1e3:.0f}",
            "recompiles": recompiles_after_capture}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", default="30,60,120,240")
    ap.add_argument("--no-resnet", action="store_true")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    rows = []
    for n in [int(b) for b in args.blocks.split(",")]:
        model = stacked(n)
        x = torch.randn(1, 4, 16)
        traced_nodes = len(fx.symbolic_trace(model).graph.nodes)
        row = {"model": f"{n} blocks", **measure(model, x)}
        row["nodes in"] = traced_nodes
        rows.append(row)
        print(row, file=sys.stderr)
    if not args.no_resnet:
        import torchvision
        model = torchvision.models.resnet50().eval()
        row = {"model": "resnet50 (1x3x64x64)", **measure(model, torch.randn(1, 3, 64, 64))}
        row["nodes in"] = len(fx.symbolic_trace(model).graph.nodes)
        rows.append(row)
    cols = list(dict.fromkeys(k for r in rows for k in r))
    print(f"\nMachine: {machine()}. Milliseconds per stage of `optimize` (default exact passes).\n")
    print(table(rows, cols))


if __name__ == "__main__":
    main()
