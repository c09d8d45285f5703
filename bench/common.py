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


def machine() -> str:
    import os
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"python {platform.python_version()}")


def table(rows: list[dict], cols: list[str]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    return "\n".join(lines)
