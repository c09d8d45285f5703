"""Is this tree's `optimize` slower than another commit's? Both timed alternately in one run.

    git worktree add /tmp/old 784db41
    python bench/rewrite_cost_ab.py --old /tmp/old --rounds 7

Each round runs one fresh process per tree, alternating (old, new, old, new, ...), so that the
machine's drift falls on both alike. A process builds the same models (from
`bench/rewrite_cost.py`: 135 pre-LN transformer blocks, about 5k nodes, and 200 RepVGG blocks),
calls that tree's `optimize` once to warm up and then times `--calls` calls. The table gives
the median per model and tree and the ratio new / old (below 1: the new tree is faster).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine, table  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
NEW = os.path.dirname(HERE)

_CHILD = r"""
import importlib, json, os, sys, time
sys.path.insert(0, {bench!r})
import torch
torch.manual_seed(0)
from rewrite_cost import RepBlock, stacked
package = "fxrewrite" if os.path.isdir(os.path.join({tree!r}, "fxrewrite")) else "rewrite"
optimize = importlib.import_module(package).optimize
out = {{}}
for name, model, x in [("transformer x135", stacked(135), torch.randn(1, 4, 16)),
                       ("repvgg x200", torch.nn.Sequential(*[RepBlock() for _ in range(200)]).eval(),
                        torch.randn(1, 4, 8, 8))]:
    optimize(model, x)
    times = []
    for _ in range({calls}):
        t0 = time.perf_counter(); optimize(model, x); times.append(time.perf_counter() - t0)
    out[name] = times
print(json.dumps(out))
"""


def run_tree(tree: str, calls: int) -> dict[str, list[float]]:
    env = dict(os.environ, PYTHONPATH=tree)
    code = _CHILD.format(bench=HERE, tree=tree, calls=calls)
    done = subprocess.run([sys.executable, "-c", code], cwd=tree, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", required=True, help="a checkout of the commit to compare with")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=3, help="timed optimize calls per process")
    args = ap.parse_args(argv)
    times: dict[tuple[str, str], list[float]] = {}
    for r in range(args.rounds):
        for label, tree in (("old", os.path.abspath(args.old)), ("new", NEW)):
            for model, ts in run_tree(tree, args.calls).items():
                times.setdefault((model, label), []).extend(ts)
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    rows = []
    for model in dict.fromkeys(m for m, _ in times):
        old, new = statistics.median(times[(model, "old")]), statistics.median(times[(model, "new")])
        rows.append({"model": model, "old median s": f"{old:.3f}", "new median s": f"{new:.3f}",
                     "new / old": f"{new / old:.3f}"})
    print(f"Machine: {machine()}. {args.rounds} rounds x {args.calls} calls per tree, alternating.\n")
    print(table(rows, ["model", "old median s", "new median s", "new / old"]))


if __name__ == "__main__":
    main()
