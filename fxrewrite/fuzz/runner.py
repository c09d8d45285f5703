"""Run many cases in worker processes and total them; shrink each failure class once; write the table.

Workers are spawned (a fresh interpreter: no CUDA/fork hazards) and replaced every
MAX_TASKS cases so that Dynamo's and Triton's caches cannot grow without bound.
"""
from __future__ import annotations

import multiprocessing
import os
import sys
import time

from .coverage import Coverage, constructs
from .oracle import ROTATION, run_case
from .shrink import reproduction, shrink

MAX_TASKS = 300


def plan(n: int, start: int = 0, options=ROTATION, inductor: int = 0) -> list[tuple[int, str]]:
    """(seed, option) for each case: options rotate by seed; `inductor` extra cases after them."""
    tasks = [(s, options[s % len(options)]) for s in range(start, start + n)]
    return tasks + [(s, "inductor") for s in range(start + n, start + n + inductor)]


def _work(task):
    seed, option, verify64 = task
    res = run_case(seed, option, verify64)
    return res, constructs(res.program)


def run(tasks, jobs: int = 2, verify64: bool = True, out=sys.stdout) -> tuple[Coverage, float]:
    """Run the cases, printing progress; returns the totals and the wall time.

    Kernels run in Triton's interpreter, which TRITON_INTERPRET=1 selects only if it is set before
    triton is imported; importing fxrewrite imports triton (through torch), so cases run in this
    process only when it was set from the start, else in spawned workers (one with `jobs=1`)."""
    interpreted = os.environ.get("TRITON_INTERPRET") == "1" or "triton" not in sys.modules
    os.environ.setdefault("TRITON_INTERPRET", "1")  # kernels on the CPU; workers inherit it
    cov, t0 = Coverage(), time.perf_counter()
    work = [(s, o, verify64) for s, o in tasks]
    if jobs <= 1 and interpreted:
        results = map(_work, work)
        pool = None
    else:
        pool = multiprocessing.get_context("spawn").Pool(max(jobs, 1), maxtasksperchild=MAX_TASKS)
        results = pool.imap_unordered(_work, work, chunksize=2)
    try:
        for i, (res, drawn) in enumerate(results, 1):
            cov.add(res, drawn)
            if res.failures:
                print(f"  seed {res.seed} ({res.option}): {', '.join(res.failures)}", file=out, flush=True)
            if i % 100 == 0 or i == len(work):
                print(f"[{i}/{len(work)}] {time.perf_counter() - t0:.0f}s, failures {sum(cov.failures.values())}",
                      file=out, flush=True)
    finally:
        if pool is not None:
            pool.terminate()
    return cov, time.perf_counter() - t0


def reproductions(cov: Coverage, verify64: bool = True, budget: int = 100) -> dict[str, str]:
    """Shrink the first failing case of each class and return its reproduction snippet."""
    out = {}
    for cls, res in cov.examples.items():
        program, _ = shrink(res.program, res.option, cls, verify64, budget)
        out[cls] = reproduction(program, res.option, cls, res.failures[cls])
    return out


def summary(cov: Coverage, wall: float) -> str:
    lines = [f"{sum(cov.cases.values())} cases in {wall:.0f} s wall"]
    for option, n in sorted(cov.cases.items()):
        lines.append(f"  {option:14s} {n:6d} cases, {cov.seconds[option] / n:.3f} s/case")
    lines.append(f"failures: {sum(cov.failures.values())}")
    for cls, n in cov.failures.most_common():
        ex = cov.examples[cls]
        lines.append(f"  {cls:28s} {n:5d}  (first: seed {ex.seed}, {ex.option}) {ex.failures[cls][:120]}")
    if cov.rejected:
        lines.append(f"rejected with a documented error: {sum(cov.rejected.values())}")
        lines += [f"  {n:5d}  {reason}" for reason, n in cov.rejected.most_common(10)]
    return "\n".join(lines)
