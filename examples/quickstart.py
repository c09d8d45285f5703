"""Optimize a real torchvision ResNet-50 and show what changed.

    python examples/quickstart.py            # batch 1, 224x224
    python examples/quickstart.py --size 64  # quicker

Random weights with random BatchNorm statistics stand in for a trained model (nothing is
downloaded). Prints the report, the measured error, and eager latency before/after (also with
`layout="channels_last"`, which stores the conv weights NHWC for faster oneDNN convolutions).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchvision

from fxrewrite import optimize, verify


def medians_ms(models: dict, x, rounds: int) -> dict:
    """Median latency of each model, timed round-robin so that machine drift hits all alike."""
    times = {name: [] for name in models}
    with torch.no_grad():
        for m in models.values():
            m(x)
        for _ in range(rounds):
            for name, m in models.items():
                t0 = time.perf_counter()
                m(x)
                times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


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

    nhwc = optimize(model, x, layout="channels_last")  # also store conv weights channels-last
    ms = medians_ms({"eager": model, "optimize": fast, "optimize channels_last": nhwc}, x, args.iters)
    print(f"\neager latency (median of {args.iters}, {torch.get_num_threads()} threads):")
    for name, t in ms.items():
        print(f"  {name:24s} {t:7.1f} ms  ({ms['eager'] / t:.2f}x)")


if __name__ == "__main__":
    main()
