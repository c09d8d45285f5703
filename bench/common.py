"""Timing helpers shared by the CPU benchmarks: medians of repeated runs after warm-up."""
from __future__ import annotations

import platform
import statistics
import time

import torch


def median_ms(fn, x, warmup: int = 3, iters: int = 10) -> float:
    """Median wall time of `fn(x)` in milliseconds, under no_grad."""
    with torch.no_grad():
        for _ in range(warmup):
            fn(x)
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn(x)
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def medians_interleaved(variants: dict, x, warmup: int = 3, rounds: int = 15) -> dict:
    """Median wall time (ms) of each `variants[name](x)`, timed round-robin: every round runs
    each variant once, in a rotated order, so that a slow spell of a shared machine hits all
    variants alike instead of whichever ran during it."""
    names = list(variants)
    times = {n: [] for n in names}
    with torch.no_grad():
        for n in names:
            for _ in range(warmup):
                variants[n](x)
        for r in range(rounds):
            for n in names[r % len(names):] + names[:r % len(names)]:
                t0 = time.perf_counter()
                variants[n](x)
                times[n].append((time.perf_counter() - t0) * 1e3)
    return {n: statistics.median(t) for n, t in times.items()}


def randomize_bn(model):
    """Random BatchNorm statistics and affine parameters: a fresh BN is the identity, which would
    make folding free and hide mistakes."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                if m.affine:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.5, 0.5)
    return model


def machine() -> str:
    import os
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"python {platform.python_version()}")


def table(rows: list[dict], cols: list[str]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    return "\n".join(lines)
