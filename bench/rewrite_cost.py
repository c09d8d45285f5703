"""What rewriting costs: seconds per stage on graphs of 1k-8k nodes and on ResNet-50.

    python bench/rewrite_cost.py
    python bench/rewrite_cost.py --blocks 16,32 --repvgg "" --no-resnet

Graphs of stacked pre-LN transformer blocks (LayerNorm, attention, MLP, residual adds) and of
stacked RepVGG blocks (where every block is a branch merge) at tiny width, so that the model's
own compute is negligible and the cost measured is the compiler's.
Stages come from `report.timings` (capture = copy of the model + symbolic_trace + shape
propagation). "nodes in": the traced graph; "nodes out": the optimized graph (canonical ops,
one `get_attr` per weight), which is what the passes and the code generation walk.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
from unittest import mock

import torch
import torch.fx as fx
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine, table  # noqa: E402

from fxrewrite import optimize  # noqa: E402


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


class RepBlock(nn.Module):
    """A RepVGG block (3x3 conv+BN, 1x1 conv+BN, BN identity, ReLU): one merge per block."""

    def __init__(self, c=4):
        super().__init__()
        self.dense = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
        self.one = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c))
        self.identity = nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(self.dense(x) + self.one(x) + self.identity(x))


def _row(name: str, model: nn.Module, x, repeat: int) -> dict:
    row = {"model": name, "nodes in": len(fx.symbolic_trace(model).graph.nodes),
           "nodes out": len(optimize(model, x).graph.nodes), **measure(model, x, repeat)}
    print(row, file=sys.stderr)
    return row


def measure(model, x, repeat: int) -> dict:
    """Median milliseconds per stage over `repeat` runs of `optimize`, and how many times the
    graph's Python code was generated (`GraphModule.recompile`) per run."""
    calls = []
    original = fx.GraphModule.recompile

    def counting(self):
        calls.append(1)
        return original(self)

    runs = []
    with mock.patch.object(fx.GraphModule, "recompile", counting):
        for _ in range(repeat):
            calls.clear()
            out = optimize(model, x)
            runs.append(dict(out.report.timings, recompiles=len(calls)))
            del out
    t = {k: statistics.median(r[k] for r in runs) for k in runs[0] if k != "recompiles"}
    total = statistics.median(sum(v for k, v in r.items() if k != "recompiles") for r in runs)
    return {**{k: f"{v * 1e3:.0f}" for k, v in t.items()},
            "total ms": f"{total * 1e3:.0f}",
            "rewrite-only ms": f"{statistics.median(sum(v for k, v in r.items() if k not in ('recompiles', 'capture')) for r in runs) * 1e3:.0f}",
            "recompiles": max(r["recompiles"] for r in runs)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", default="30,60,120,135,240",
                    help="model sizes; 135 blocks optimize into the 5k-node graph the target is stated for")
    ap.add_argument("--repvgg", default="100,200,400",
                    help="sizes of the RepVGG stacks (one branch merge per block); empty for none")
    ap.add_argument("--no-resnet", action="store_true")
    ap.add_argument("--repeat", type=int, default=5, help="runs per model; the table shows medians")
    ap.add_argument("--gc-default", action="store_true",
                    help="leave Python's garbage collector as it is during optimize (to see what holding "
                         "off full collections saves)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    if args.gc_default:
        import fxrewrite.api
        fxrewrite.api.no_full_collections = contextlib.nullcontext
    rows = [_row(f"{n} blocks", stacked(n), torch.randn(1, 4, 16), args.repeat) for n in _sizes(args.blocks)]
    rows += [_row(f"{n} RepVGG blocks", nn.Sequential(*[RepBlock() for _ in range(n)]).eval(),
                  torch.randn(1, 4, 8, 8), args.repeat) for n in _sizes(args.repvgg)]
    if not args.no_resnet:
        import torchvision
        rows.append(_row("resnet50 (1x3x64x64)", torchvision.models.resnet50().eval(), torch.randn(1, 3, 64, 64),
                         args.repeat))
    cols = list(dict.fromkeys(k for r in rows for k in r))
    print(f"\nMachine: {machine()}. Median milliseconds per stage of `optimize` (default exact passes) "
          f"over {args.repeat} runs{' (garbage collector left as it is)' if args.gc_default else ''}.\n")
    print(table(rows, cols))


def _sizes(text: str) -> list[int]:
    return [int(b) for b in text.split(",") if b.strip()]


if __name__ == "__main__":
    main()
