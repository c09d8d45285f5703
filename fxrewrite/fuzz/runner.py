"""Run many cases in worker processes and total them; shrink each failure class once; write the table.

Workers are spawned (a fresh interpreter: no CUDA/fork hazards) and replaced every
MAX_TASKS cases so that Dynamo's and Triton's caches cannot grow without bound.

A case whose worker hangs or dies never answers (a process pool loses it silently; one run of
3,500 cases waited forever on one): each worker marks the case it is running in a file, and
when no case has finished for STALL_S seconds the pool is killed, each marked case is counted
as a `hang` failure, and the cases still owed run in a fresh pool.
"""
from __future__ import annotations

import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

from .coverage import Coverage, constructs
from .grammar import generate
from .oracle import ROTATION, CaseResult, run_case
from .shrink import reproduction, shrink

MAX_TASKS = 300
STALL_S = 600.0  # no case finished for this long: the running ones are stuck (the slowest seen take ~20 s)
FAULT = "FXREWRITE_FUZZ_FAULT"  # "hang:<seed>,die:<seed>": faults the runner's own test injects


def plan(n: int, start: int = 0, options=ROTATION, inductor: int = 0) -> list[tuple[int, str]]:
    """(seed, option) for each case: options rotate by seed; `inductor` extra cases after them."""
    tasks = [(s, options[s % len(options)]) for s in range(start, start + n)]
    return tasks + [(s, "inductor") for s in range(start + n, start + n + inductor)]


def _work(task, marks: str | None = None):
    seed, option, verify64 = task
    mark = Path(marks) / str(os.getpid()) if marks else None
    if mark is not None:
        mark.write_text(f"{seed} {option}")
    faults = os.environ.get(FAULT, "").split(",")
    if f"hang:{seed}" in faults:
        time.sleep(10 ** 6)
    if f"die:{seed}" in faults:
        os._exit(1)
    res = run_case(seed, option, verify64)
    if mark is not None:
        mark.unlink()
    return res, constructs(res.program)


def _pool_run(work: list, jobs: int, marks: str, on_result, stall_s: float) -> list:
    """Run `work` in a fresh pool, handing each result to `on_result`; the tasks still owed
    when no case has finished for `stall_s` seconds (none when all finished)."""
    pool = multiprocessing.get_context("spawn").Pool(max(jobs, 1), maxtasksperchild=MAX_TASKS)
    try:
        pending = {pool.apply_async(_work, (task, marks)): task for task in work}
        last = time.monotonic()
        while pending:
            done = [a for a in pending if a.ready()]
            for a in done:
                del pending[a]
                on_result(a.get())
            if done:
                last = time.monotonic()
            elif time.monotonic() - last > stall_s:
                return list(pending.values())
            else:
                time.sleep(0.02)
        return []
    finally:
        pool.terminate()


def _hung(task, stall_s: float) -> CaseResult:
    seed, option, _ = task
    res = CaseResult(seed, option, generate(seed))
    res.fail("hang", f"no answer in {stall_s:.0f} s: its worker hung or died")
    return res


def run(tasks, jobs: int = 2, verify64: bool = True, out=sys.stdout, stall_s: float = STALL_S) -> tuple[Coverage, float]:
    """Run the cases, printing progress; returns the totals and the wall time.

    Kernels run in Triton's interpreter, which TRITON_INTERPRET=1 selects only if it is set before
    triton is imported; importing fxrewrite imports triton (through torch), so cases run in this
    process only when it was set from the start, else in spawned workers (one with `jobs=1`)."""
    interpreted = os.environ.get("TRITON_INTERPRET") == "1" or "triton" not in sys.modules
    os.environ.setdefault("TRITON_INTERPRET", "1")  # kernels on the CPU; workers inherit it
    cov, t0 = Coverage(), time.perf_counter()
    work = [(s, o, verify64) for s, o in tasks]
    count = [0]

    def take(result):
        res, drawn = result
        cov.add(res, drawn)
        count[0] += 1
        if res.failures:
            print(f"  seed {res.seed} ({res.option}): {', '.join(res.failures)}", file=out, flush=True)
        if count[0] % 100 == 0 or count[0] == len(work):
            print(f"[{count[0]}/{len(work)}] {time.perf_counter() - t0:.0f}s, failures {sum(cov.failures.values())}",
                  file=out, flush=True)

    if jobs <= 1 and interpreted:
        for task in work:
            take(_work(task))
        return cov, time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as marks:
        while work:
            owed = _pool_run(work, jobs, marks, take, stall_s)
            running = {tuple(f.read_text().split()) for f in Path(marks).iterdir()}
            for f in Path(marks).iterdir():
                f.unlink()
            stuck = [t for t in owed if (str(t[0]), t[1]) in running] or owed[:1]  # (unmarked: blame one)
            for task in stuck:
                take((_hung(task, stall_s), set()))
            work = [t for t in owed if t not in stuck]
    return cov, time.perf_counter() - t0


def reproductions(cov: Coverage, verify64: bool = True, budget: int = 100) -> dict[str, str]:
    """Shrink the first failing case of each class and return its reproduction snippet."""
    out = {}
    for cls, res in cov.examples.items():
        if cls == "hang":  # (re-running it here would hang the run)
            out[cls] = reproduction(res.program, res.option, cls, res.failures[cls])
            continue
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
