"""`python -m fxrewrite.fuzz --n 10000 --jobs 2 --report RELIABILITY.md`: the differential fuzzer's CLI."""
from __future__ import annotations

import argparse
import sys

from .coverage import markdown
from .oracle import OPTIONS, ROTATION
from .runner import plan, reproductions, run, summary


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m fxrewrite.fuzz", description=__doc__)
    ap.add_argument("--n", type=int, default=500, help="cases (seeds) to run")
    ap.add_argument("--seed", type=int, default=0, help="first seed")
    ap.add_argument("--jobs", type=int, default=2, help="worker processes (1: run in this process)")
    ap.add_argument("--options", default=",".join(ROTATION),
                    help=f"options to rotate over, comma-separated, from {sorted(OPTIONS)}")
    ap.add_argument("--inductor", type=int, default=0, help="extra cases through torch.compile + Inductor")
    ap.add_argument("--no-verify64", action="store_true",
                    help="skip fxrewrite.rewrite.verify(float64=True) (derivations replayed on float64 weights)")
    ap.add_argument("--shrink-budget", type=int, default=100, help="case runs per failure class when shrinking (0: off)")
    ap.add_argument("--report", help="write the markdown table here (e.g. RELIABILITY.md)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    options = [o.strip() for o in args.options.split(",") if o.strip()]
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        sys.exit(f"unknown options {unknown}; known: {sorted(OPTIONS)}")
    tasks = plan(args.n, args.seed, options, args.inductor)
    cov, wall = run(tasks, args.jobs, not args.no_verify64)
    print(summary(cov, wall))
    repros = reproductions(cov, not args.no_verify64, args.shrink_budget) if args.shrink_budget else {}
    for text in repros.values():
        print("\n" + text)
    if args.report:
        command = "python -m fxrewrite.fuzz " + " ".join(argv if argv is not None else sys.argv[1:])
        with open(args.report, "w") as f:
            f.write(markdown(cov, wall, command, repros))
        print(f"wrote {args.report}")
    return 1 if cov.failures else 0


if __name__ == "__main__":
    sys.exit(main())
