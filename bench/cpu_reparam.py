"""Structural re-parameterization latency on CPU: train-time structure vs `optimize` vs timm's
`reparameterize_model` (each block's own hand-written merge).

    python bench/cpu_reparam.py                        # repvgg_a0, mobileone_s0; 1 thread and all
    python bench/cpu_reparam.py --models repvgg_a0 --threads 1 --iters 20
    python bench/cpu_reparam.py --quick                # smoke run: small input, few iterations

Random weights and random BN statistics (a fresh BN is the identity, which would flatter nothing
but hide mistakes), batch 1 at 224x224, medians of `--iters` runs after warm-up, all variants
timed in the same process, interleaved per model. Every variant is verified against the
train-time model first. Prints a Markdown table; ratios are train-time time / variant time
(higher is faster), and `optimize` vs timm is timm's time / ours (above 1: ours is faster).
"""
from __future__ import annotations

import argparse
import os
import sys

import timm
import torch
from timm.utils.model import reparameterize_model

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine, medians_interleaved, randomize_bn, table  # noqa: E402

from fxrewrite import optimize, verify  # noqa: E402




def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="repvgg_a0,mobileone_s0")
    ap.add_argument("--threads", default=f"1,{torch.get_num_threads()}")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--iters", type=int, default=21)
    ap.add_argument("--quick", action="store_true", help="smoke run: 64x64 input, 3 iterations, 1 warm-up")
    args = ap.parse_args(argv)
    size, iters, warmup = (64, 3, 1) if args.quick else (args.size, args.iters, 3)
    rows = []
    torch.manual_seed(0)
    for name in args.models.split(","):
        model = randomize_bn(timm.create_model(name, pretrained=False)).eval()
        x = torch.randn(1, 3, size, size)
        variants = {"train-time": model, "optimize": optimize(model, x), "timm reparam": reparameterize_model(model)}
        for v in variants.values():
            verify(model, v, x, rtol=1e-4)
        for threads in [int(t) for t in args.threads.split(",")]:
            torch.set_num_threads(threads)
            ms = medians_interleaved(variants, x, warmup=warmup, rounds=iters)
            base = ms["train-time"]
            rows.append({"model": name, "threads": threads,
                         **{f"{k} ms": f"{v:.1f}" for k, v in ms.items()},
                         "optimize speedup": f"{base / ms['optimize']:.2f}x",
                         "timm speedup": f"{base / ms['timm reparam']:.2f}x",
                         "optimize vs timm": f"{ms['timm reparam'] / ms['optimize']:.2f}x"})
            print(rows[-1], file=sys.stderr)
    print(f"\nMachine: {machine()}; timm {timm.__version__}; batch 1, {size}x{size}, median of {iters} rounds, variants interleaved"
          f"{' (--quick: not a measurement)' if args.quick else ''}\n")
    print(table(rows, list(rows[0].keys())))


if __name__ == "__main__":
    main()
