"""Optimize a real torchvision ResNet-50 and show what changed.

    python examples/quickstart.py            # batch 1, 224x224
    python examples/quickstart.py --size 64  # quicker

Random weights with random BatchNorm statistics stand in for a trained model (nothing is
downloaded). Prints the report, the measured error, and eager latency before/after.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchvision

from rewrite import optimize, verify


def median_ms(model, x, iters=10):
    with torch.no_grad():
        model(x)
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            model(x)
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--iters", type=int, default=10)
    args = ap.parse_args()

    torch.manual_seed(0)
    model = torchvision.models.resnet50()
    with torch.no_grad():  # stand-in for trained statistics
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    model.eval()
    x = torch.randn(1, 3, args.size, args.size)

    fast = optimize(model, x)
    print(fast.report.table(max_rows=12))

    result = verify(model, fast, torch.randn_like(x))
    print(f"\nerror on a fresh input: {result}")

    before, after = median_ms(model, x, args.iters), median_ms(fast, x, args.iters)
    print(f"\neager latency (median of {args.iters}, {torch.get_num_threads()} threads): "
          f"{before:.1f} ms -> {after:.1f} ms ({before / after:.2f}x)")


if __name__ == "__main__":
    main()
