"""BN folding latency on CPU: eager vs torch.fx `fuse` vs torch.ao FX fusion vs `optimize` (and
`optimize(..., layout="channels_last")`, which also stores conv weights NHWC).

    python bench/cpu_fold.py                 # ResNet-50, MobileNetV3-Large, EfficientNet-B0; 1 thread and all
    python bench/cpu_fold.py --models resnet50 --threads 1 --iters 20

Random weights and random BN statistics (so folding is real work), batch 1 at 224x224, medians
of `--iters` rounds after warm-up, every variant timed in the same process, round-robin (each
round runs every variant once). Prints a Markdown table; "vs" ratios are the other's time /
ours (higher: ours is faster).
"""
from __future__ import annotations

import argparse
import copy
import os
import sys

import torch
import torchvision

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine, medians_interleaved, randomize_bn, table  # noqa: E402

from fxrewrite import optimize, verify  # noqa: E402




def fx_fuse(model):
    from torch.fx.experimental.optimization import fuse
    return fuse(copy.deepcopy(model))


def ao_fuse(model):
    from torch.ao.quantization.fx.fuse import fuse as _unused  # noqa: F401  (the API lives below)
    from torch.ao.quantization.quantize_fx import fuse_fx
    return fuse_fx(copy.deepcopy(model))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="resnet50,mobilenet_v3_large,efficientnet_b0")
    ap.add_argument("--threads", default=f"1,{torch.get_num_threads()}")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--iters", type=int, default=21)
    args = ap.parse_args(argv)
    rows = []
    torch.manual_seed(0)
    for name in args.models.split(","):
        model = randomize_bn(getattr(torchvision.models, name)()).eval()
        x = torch.randn(1, 3, args.size, args.size)
        variants = {"eager": model, "fx fuse": fx_fuse(model), "ao fuse_fx": ao_fuse(model),
                    "optimize": optimize(model, x),
                    "optimize channels_last": optimize(model, x, layout="channels_last")}
        for v in variants.values():
            verify(model, v, x, rtol=1e-4)
        for threads in [int(t) for t in args.threads.split(",")]:
            torch.set_num_threads(threads)
            ms = medians_interleaved(variants, x, rounds=args.iters)
            best_peer = min(ms["fx fuse"], ms["ao fuse_fx"])
            rows.append({"model": name, "threads": threads,
                         **{f"{k} ms": f"{v:.1f}" for k, v in ms.items()},
                         "optimize vs eager": f"{ms['eager'] / ms['optimize']:.2f}x",
                         "optimize vs best peer": f"{best_peer / ms['optimize']:.2f}x",
                         "channels_last vs best peer": f"{best_peer / ms['optimize channels_last']:.2f}x"})
            print(rows[-1], file=sys.stderr)
    print(f"\nMachine: {machine()}; batch 1, {args.size}x{args.size}, median of {args.iters} rounds, variants interleaved\n")
    print(table(rows, list(rows[0].keys())))


if __name__ == "__main__":
    main()
