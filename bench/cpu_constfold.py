"""Weight standardisation folded once: NF-Net and BiT models on CPU, eager and compiled.

    python bench/cpu_constfold.py                           # nf_resnet50, nfnet_l0, resnetv2_50x1_bit
    python bench/cpu_constfold.py --models nf_resnet26 --size 160 --rounds 11

NF-Nets (`ScaledStdConv2d`) and BiT (`StdConv2d`) standardise every conv weight on every forward
pass; `optimize` computes those weights once (`fold_constants`). Variants, timed round-robin in
one process (each round runs every variant once, in a rotated order; every compiled variant is
compiled and warmed up first):

  eager             the timm model as built
  optimize          `optimize(model, x)`: weights standardised once, then BN folding and merges
  inductor+freeze   torch.compile(model, options={"freezing": True}): Inductor constant-folds too
  optimize+inductor torch.compile(optimize(model, x)): both

Random weights (timm's init), batch 1 by default. Prints a Markdown table; "x" ratios are the
other variant's median / ours (higher: ours is faster).
"""
from __future__ import annotations

import argparse
import os
import sys

import timm
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine, medians_interleaved, table  # noqa: E402

from fxrewrite import optimize, verify  # noqa: E402


def variants(model, x, compiled: bool) -> dict:
    fast = optimize(model, x)
    verify(model, fast, x, rtol=1e-4)
    out = {"eager": model, "optimize": fast}
    if compiled:
        out["inductor+freeze"] = torch.compile(model, options={"freezing": True})
        out["optimize+inductor"] = torch.compile(fast)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="nf_resnet50,nfnet_l0,resnetv2_50x1_bit")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--no-compile", action="store_true", help="eager variants only (no Inductor)")
    args = ap.parse_args(argv)
    rows = []
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False).eval()
        x = torch.randn(args.batch, 3, args.size, args.size)
        with torch.no_grad():
            v = variants(model, x, not args.no_compile)
        ms = medians_interleaved(v, x, rounds=args.rounds)
        row = {"model": name, **{f"{k} ms": f"{t:.1f}" for k, t in ms.items()},
               "optimize vs eager": f"{ms['eager'] / ms['optimize']:.2f}x"}
        if "inductor+freeze" in ms:
            row["optimize vs inductor+freeze"] = f"{ms['inductor+freeze'] / ms['optimize']:.2f}x"
            row["optimize+inductor vs inductor+freeze"] = f"{ms['inductor+freeze'] / ms['optimize+inductor']:.2f}x"
        rows.append(row)
        print(row, file=sys.stderr)
    print(f"\nMachine: {machine()}, {torch.get_num_threads()} threads; batch {args.batch}, {args.size}x{args.size}, "
          f"median of {args.rounds} rounds, variants interleaved\n")
    print(table(rows, list(rows[0].keys())))


if __name__ == "__main__":
    main()
