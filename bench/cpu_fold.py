"""BN folding latency on CPU: eager vs torch.fx `fuse` vs torch.ao FX fusion vs `optimize`.

    python bench/cpu_fold.py                 # ResNet-50, MobileNetV3-Large, EfficientNet-B0; 1 thread and all
    python bench/cpu_fold.py --models resnet50 --threads 1 --iters 20

Random weights and random BN statistics (so folding is real work), batch 1 at 224x224, medians
of `--iters` runs after warm-up, every variant timed in the same process, interleaved per model.
Prints a Markdown table (ratios are eager time / variant time: higher is faster).
"""
from __future__ import annotations

import argparse
import copy
import os
import sys

import torch
import torchvision

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine, median_ms, table  # noqa: E402

from rewrite import optimize, verify  # noqa: E402


def randomize_bn(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model


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
    ap.add_argument("--iters", type=int, default=15)
    args = ap.parse_args(argv)
    rows = []
    torch.manual_seed(0)
    for name in args.models.split(","):
        model = randomize_bn(getattr(torchvision.models, name)()).eval()
        x = torch.randn(1, 3, args.size, args.size)
        variants = {"eager": model, "fx fuse": fx_fuse(model), "ao fuse_fx": ao_fuse(model),
                    "optimize": optimize(model, x)}
        for v in variants.values():
            verify(model, v, x, rtol=1e-4)
        for threads in [int(t) for t in args.threads.split(",")]:
            torch.set_num_threads(threads)
            ms = {k: median_ms(v, x, iters=args.iters) for k, v in variants.items()}
            best_peer = min(ms["fx fuse"], ms["ao fuse_fx"])
            rows.append({"model": name, "threads": threads,
                         **{f"{k} ms": f"{v:.1f}" for k, v in ms.items()},
                         "optimize vs eager": f"{ms['eager'] / ms['optimize']:.2f}x",
                         "optimize vs best peer": f"{best_peer / ms['optimize']:.2f}x"})
            print(rows[-1], file=sys.stderr)
    print(f"\nMachine: {machine()}; batch 1, {args.size}x{args.size}, median of {args.iters} runs\n")
    print(table(rows, list(rows[0].keys())))


if __name__ == "__main__":
    main()
