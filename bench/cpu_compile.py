"""torch.compile on CPU: Inductor as it comes vs `backend="rewrite"` (our passes, then Inductor).

    python bench/cpu_compile.py                  # ResNet-50 and RepVGG-A0, batch 1, 224x224
    python bench/cpu_compile.py --quick          # smoke run: 64x64, few repetitions
    python bench/cpu_compile.py --models resnet50 --threads 1 --iters 30

Variants, all timed in the same process on the same model and input:
  eager             the model as it is
  inductor          torch.compile(model) (Inductor, no freezing: BNs stay separate ops)
  inductor+freeze   torch.compile(model, options={"freezing": True}) (Inductor's own conv+BN folding)
  rewrite           torch.compile(model, backend="rewrite"): our exact passes (BN folding, branch
                    merging) on Dynamo's graph with weights frozen, then Inductor

Random weights and random BN statistics (folding is real work), under torch.no_grad().
"compile s" is the wall time of the first call (Dynamo + passes + Inductor), with Inductor's
on-disk graph cache off so that no variant reuses another's work. Latency: median of `--iters`
calls after `--warmup` calls. "rewrites" says what the rewrite backend did to the graphs it
handed Inductor (from its reports). Variants run one after another, each from a clean Dynamo
state. Prints a Markdown table; ratios are inductor time / variant time (higher is faster).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine, median_ms, randomize_bn, table  # noqa: E402

import fxrewrite.backend  # noqa: E402,F401  (registers the backend when the entry point is not installed)




def build(name: str):
    """ResNet-50 from torchvision, RepVGG-A0 (train-time branches) from timm; random weights."""
    if name == "resnet50":
        import torchvision
        return torchvision.models.resnet50()
    if name == "repvgg_a0":
        import timm
        return timm.create_model("repvgg_a0", pretrained=False)
    raise SystemExit(f"unknown model {name!r}; choose from resnet50, repvgg_a0")


def compile_variant(model, variant: str):
    if variant == "eager":
        return model
    if variant == "inductor":
        return torch.compile(model)
    if variant == "inductor+freeze":
        return torch.compile(model, options={"freezing": True})
    if variant == "rewrite":
        return torch.compile(model, backend="rewrite")
    raise SystemExit(f"unknown variant {variant!r}")


def rewrites_since(first: int) -> str:
    """What the rewrite backend did to the graphs it compiled since REPORTS[first]."""
    from fxrewrite.backend import REPORTS
    reports = REPORTS[first:]
    folded = sum(r.count("fold_batchnorm") for r in reports)
    merged = sum(r.count("merge_branches") for r in reports)
    return f"{len(reports)} graph(s): {folded} BN folded, {merged} blocks merged"


def run_model(name: str, variants: list[str], size: int, warmup: int, iters: int) -> list[dict]:
    """One row per variant, each compiled from a clean Dynamo state and timed right after."""
    from fxrewrite.backend import REPORTS

    torch.manual_seed(0)
    model = randomize_bn(build(name)).eval()
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        ref = model(x)
    rows = []
    for v in variants:
        torch._dynamo.reset()
        first = len(REPORTS)
        fn = compile_variant(model, v)
        start = time.perf_counter()
        with torch.no_grad():
            out = fn(x)
        seconds = time.perf_counter() - start
        err = ((out - ref).abs().max() / ref.abs().max()).item()
        ms = median_ms(fn, x, warmup=warmup, iters=iters)
        rows.append({"model": name, "variant": v, "compile s": f"{seconds:.1f}" if v != "eager" else "-",
                     "ms": ms, "max rel err": f"{err:.1e}", "rewrites": rewrites_since(first) if v == "rewrite" else ""})
        print(f"{name} {v}: first call {seconds:.1f} s, {ms:.2f} ms, max rel err {err:.1e}", file=sys.stderr,
              flush=True)
    base = next((r["ms"] for r in rows if r["variant"] == "inductor"), None)
    for r in rows:
        r["vs inductor"] = f"{base / r['ms']:.2f}x" if base else ""
        r["ms"] = f"{r['ms']:.2f}"
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="resnet50,repvgg_a0")
    ap.add_argument("--variants", default="eager,inductor,inductor+freeze,rewrite")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="smoke run: 64x64 input, 1 warm-up, 3 timed calls")
    args = ap.parse_args(argv)
    if args.quick:
        args.size, args.warmup, args.iters = 64, 1, 3
    torch.set_num_threads(args.threads)
    import torch._inductor.config as inductor_config
    inductor_config.fx_graph_cache = False  # compile times must not depend on earlier runs

    variants = args.variants.split(",")
    rows = []
    for name in args.models.split(","):
        rows += run_model(name, variants, args.size, args.warmup, args.iters)
    print(f"\nMachine: {machine()}; {args.threads} threads; batch 1, {args.size}x{args.size}; "
          f"median of {args.iters} calls after {args.warmup} warm-up calls"
          f"{' (--quick smoke run: not a measurement)' if args.quick else ''}\n")
    print(table(rows, ["model", "variant", "compile s", "ms", "vs inductor", "max rel err", "rewrites"]))


if __name__ == "__main__":
    main()
