"""torch.compile on CPU: Inductor as it comes vs `backend="rewrite"` (our passes, then Inductor).

    python bench/cpu_compile.py                  # ResNet-50, RepVGG-A0, MobileOne-S0, NF-ResNet-26; batch 1, 224x224
    python bench/cpu_compile.py --quick          # smoke run: 64x64, few rounds
    python bench/cpu_compile.py --models resnet50 --threads 1 --rounds 31

Models: a torchvision classification model name (resnet50), else a timm name (repvgg_a0,
mobileone_s0, nf_resnet26: train-time branches, weight standardisation), built with random
weights (timm: pretrained=False) and random BN statistics (folding is real work).

Variants, all on the same weights and input, timed in the same process:
  eager             the model as it is
  inductor          torch.compile(model) (Inductor, no freezing: BNs stay separate ops)
  inductor+freeze   torch.compile(model, options={"freezing": True}) (Inductor's own conv+BN folding)
  rewrite           torch.compile(model, backend="rewrite"): our exact passes (BN folding, branch
                    merging, constant folding) on Dynamo's graph with weights frozen, then Inductor

How it is timed, per model: every variant is compiled first (each compiled variant on its own
copy of the model), one after another. "compile s" is the wall time of that first call (Dynamo +
passes + Inductor); the output of that call gives "max rel err" (vs eager). Then every variant is
warmed up (`--warmup` calls each) and the calls alternate round-robin: each of `--rounds` rounds
runs every variant once, in an order rotated by one each round, so that a slow spell of a shared
machine hits all variants alike instead of whichever was being timed in its own block. "ms" is
the median over the rounds (`common.medians_interleaved`); a recompile during the rounds is
reported under the table. Ratios are the other variant's median / this variant's median ("vs
inductor": higher is faster than Inductor).

Compile times: Inductor's on-disk caches go to a fresh temporary directory (unless
TORCHINDUCTOR_CACHE_DIR is set) with its FX graph cache off, so no run reuses an earlier run's
kernels; and before the first model each compiled variant compiles a small conv+BN net once and
Dynamo is reset (unless --no-prime), so that one-time costs (imports, compile workers, the C++
toolchain's first run) are not charged to whichever variant compiles first. Within a model
Dynamo is not reset between variants (that would discard the compiled code of the earlier ones),
so a later variant may reuse in-process work of an earlier one (identical kernels).
"rewrites" says what the rewrite backend did to the graphs it handed Inductor (from its reports).
Runs under torch.no_grad(); prints a Markdown table.
"""
from __future__ import annotations

import argparse
import atexit
import copy
import os
import shutil
import sys
import tempfile
import time
from collections import Counter

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine, medians_interleaved, randomize_bn, table  # noqa: E402

import fxrewrite.backend  # noqa: E402,F401  (registers the backend when the entry point is not installed)

MODELS = "resnet50,repvgg_a0,mobileone_s0,nf_resnet26,repvit_m0_9,fastvit_t8"
VARIANTS = ("eager", "inductor", "inductor+freeze", "rewrite")
BASELINES = ("inductor", "inductor+freeze")


def build(name: str):
    """A torchvision classification model if there is one of that name, else a timm model
    (pretrained=False); random weights either way."""
    import torchvision
    if name in torchvision.models.list_models(module=torchvision.models):
        return torchvision.models.get_model(name, weights=None)
    import timm
    if timm.is_model(name):
        return timm.create_model(name, pretrained=False)
    raise SystemExit(f"unknown model {name!r}: neither a torchvision classification model nor a timm model")


def compile_variant(model, variant: str):
    """The callable to time: the model itself for eager, else torch.compile of a private copy."""
    if variant == "eager":
        return model
    model = copy.deepcopy(model)
    if variant == "inductor":
        return torch.compile(model)
    if variant == "inductor+freeze":
        return torch.compile(model, options={"freezing": True})
    if variant == "rewrite":
        return torch.compile(model, backend="rewrite")
    raise SystemExit(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")


def rewrites(reports) -> str:
    """What the rewrite backend did to the graphs in `reports`: rewrites per pass."""
    done = Counter()
    for r in reports:
        for (pass_name, action), n in r.counts().items():
            if action == "rewrote":
                done[pass_name] += n
    passed = sum(any(rec.pass_name == "backend" and "passed through" in rec.detail for rec in r.records)
                 for r in reports)
    text = f"{len(reports)} graph(s): " + (", ".join(f"{p} {n}" for p, n in sorted(done.items()))
                                           or "nothing rewritten")
    return text + (f" ({passed} passed through unchanged)" if passed else "")


def prime(variants: list[str]):
    """Compile a small conv+BN net once with each compiled variant, then reset Dynamo."""
    torch.manual_seed(0)
    net = randomize_bn(torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.BatchNorm2d(8))).eval()
    x = torch.randn(1, 3, 16, 16)
    start = time.perf_counter()
    with torch.no_grad():
        for v in variants:
            if v != "eager":
                compile_variant(net, v)(x)
    torch._dynamo.reset()
    print(f"primed {', '.join(v for v in variants if v != 'eager')} in {time.perf_counter() - start:.1f} s",
          file=sys.stderr, flush=True)


def run_model(name: str, variants: list[str], size: int, warmup: int, rounds: int) -> tuple[list[dict], int]:
    """One row per variant: compiled one after another, then timed interleaved. Also returns the
    number of frames Dynamo compiled during the timed rounds (0 unless something recompiled)."""
    from torch._dynamo.utils import counters

    from fxrewrite.backend import REPORTS

    torch._dynamo.reset()  # the previous model's compiled code is no longer needed
    torch.manual_seed(0)
    model = randomize_bn(build(name)).eval()
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        ref = model(x)
    fns, rows = {}, {}
    for v in variants:
        seen = {id(r) for r in REPORTS}
        fn = compile_variant(model, v)
        start = time.perf_counter()
        with torch.no_grad():
            out = fn(x)
        seconds = time.perf_counter() - start
        err = ((out - ref).abs().max() / ref.abs().max()).item()
        fns[v] = fn
        rows[v] = {"model": name, "variant": v, "compile s": f"{seconds:.1f}" if v != "eager" else "-",
                   "max rel err": f"{err:.1e}",
                   "rewrites": rewrites([r for r in REPORTS if id(r) not in seen]) if v == "rewrite" else ""}
        print(f"{name} {v}: first call {seconds:.1f} s, max rel err {err:.1e}", file=sys.stderr, flush=True)

    frames = counters["frames"]["total"]
    ms = medians_interleaved(fns, x, warmup=warmup, rounds=rounds)
    recompiled = counters["frames"]["total"] - frames
    print(f"{name}: " + ", ".join(f"{v} {t:.2f} ms" for v, t in ms.items())
          + (f"; {recompiled} frame(s) compiled during the timed rounds" if recompiled else ""),
          file=sys.stderr, flush=True)
    for v, r in rows.items():
        r["ms"] = f"{ms[v]:.2f}"
        for base in BASELINES:
            r[f"vs {base}"] = f"{ms[base] / ms[v]:.2f}x" if base in ms else ""
    return list(rows.values()), recompiled


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=MODELS,
                    help=f"comma-separated torchvision or timm model names (default: {MODELS})")
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help=f"comma-separated subset of {', '.join(VARIANTS)} (default: all)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(),
                    help="torch intra-op threads (default: %(default)s)")
    ap.add_argument("--size", type=int, default=224, help="input height and width, batch 1 (default: %(default)s)")
    ap.add_argument("--warmup", type=int, default=5,
                    help="untimed calls per variant after compiling, before the rounds (default: %(default)s)")
    ap.add_argument("--rounds", "--iters", dest="rounds", type=int, default=21,
                    help="timed rounds; each runs every variant once, order rotated (default: %(default)s)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 64x64 input, 1 warm-up call, 3 rounds")
    ap.add_argument("--no-prime", action="store_true",
                    help="skip the throwaway compile of a small net before the first model")
    args = ap.parse_args(argv)
    if args.quick:
        args.size, args.warmup, args.rounds = 64, 1, 3
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    torch.set_num_threads(args.threads)
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:  # compile times must not depend on earlier runs
        cache = tempfile.mkdtemp(prefix="cpu_compile_inductor_")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        atexit.register(shutil.rmtree, cache, ignore_errors=True)
    import torch._inductor.config as inductor_config
    inductor_config.fx_graph_cache = False

    if not args.no_prime:
        prime(variants)
    rows, notes = [], []
    for name in args.models.split(","):
        model_rows, recompiled = run_model(name, variants, args.size, args.warmup, args.rounds)
        rows += model_rows
        if recompiled:
            notes.append(f"{name}: {recompiled} frame(s) compiled during the timed rounds; its medians include that")
    threads = f"{args.threads} thread{'s' if args.threads != 1 else ''}"
    warm = f"{args.warmup} call{'s' if args.warmup != 1 else ''}"
    print(f"\nMachine: {machine()}; {threads}; batch 1, {args.size}x{args.size}; each variant compiled and warmed "
          f"up ({warm}), then median of {args.rounds} rounds, variants interleaved (each round runs every "
          f"variant once, order rotated){' (--quick smoke run: not a measurement)' if args.quick else ''}\n")
    print(table(rows, ["model", "variant", "compile s", "ms", *(f"vs {b}" for b in BASELINES), "max rel err",
                       "rewrites"]))
    for note in notes:
        print(f"\nNote: {note}")


if __name__ == "__main__":
    main()
