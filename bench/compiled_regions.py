"""Lowered regions under torch.compile: what a region costs inside Inductor's code.

    python bench/compiled_regions.py            # CPU (regions decompose to ATen ops) or CUDA (to their kernels)
    python bench/compiled_regions.py --quick    # smoke run

Model: a stack of pre-norm blocks, `h = x + r; x = linear(silu(rms_norm(h)))`, the residual
stream carried beside (one add + RMSNorm + SiLU region with two outputs per block, the shape of
a decoder layer's norm). Lowered with `optimize(model, x, lower="triton")`, then compiled with
Inductor three ways, on the same weights and inputs:

  inductor   torch.compile(model): the peer, Inductor alone on the eager model
  opaque     torch.compile(lowered) with FXREWRITE_COMPILED_REGIONS=opaque while compiling: each
             region stays an opaque custom op, one Python call per region per forward (what
             the library did before regions decomposed)
  traced     torch.compile(lowered): each region decomposes under AOTAutograd (CUDA: a
             `wrap_triton` launch of the generated kernel; CPU: the region's ATen reference,
             which Inductor fuses)

Then transformers' LlamaModel (hidden 512, 4 layers, random weights, token ids (1, 8) and
(2, 128)) the same three ways, but through the compile backend: `torch.compile(model)`, and
`torch.compile(model, backend="rewrite", options={"lower": "triton"})` (the exact passes and the
lowering run inside the compile) with the regions opaque or traced (`--no-llama` skips it).

Each variant is compiled and called first, then the calls alternate round-robin
(`common.medians_interleaved`). Printed: median ms per forward, ratios to `inductor`, the
max deviation from eager, and from a profiler trace of one forward of each variant the number
of `fxrewrite::fused_region` calls (the Python dispatch per region), with the traced variant's
profiler table. On CPU the regions run their reference (no compiled Triton there), so CPU
figures compare Inductor's fusion of the reference against the opaque op, not our kernels.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import machine, medians_interleaved, table  # noqa: E402

ENV = "FXREWRITE_COMPILED_REGIONS"


class Block(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.norm = nn.RMSNorm(n, eps=1e-6)
        self.proj = nn.Linear(n, n)

    def forward(self, x, r):
        h = x + r
        return self.proj(F.silu(self.norm(h))), h


class Stack(nn.Module):
    def __init__(self, n, layers):
        super().__init__()
        self.blocks = nn.ModuleList(Block(n) for _ in range(layers))

    def forward(self, x):
        r = torch.zeros_like(x)
        for block in self.blocks:
            x, r = block(x, r)
        return x + r


def build(n: int, layers: int, device: str, dtype: torch.dtype):
    torch.manual_seed(0)
    model = Stack(n, layers)
    with torch.no_grad():
        for b in model.blocks:
            b.norm.weight.uniform_(0.5, 1.5)
    return model.to(device=device, dtype=dtype).eval()


def compiled(model, opaque: bool, example, **compile_args):
    """torch.compile of a copy of `model` (Dynamo caches compiled code per code object, and a
    GraphModule's copy gets its own), traced by its first call with the region op kept opaque
    or not."""
    fn = torch.compile(copy.deepcopy(model), **compile_args)
    old = os.environ.pop(ENV, None)
    if opaque:
        os.environ[ENV] = "opaque"
    try:
        with torch.no_grad():
            fn(example)
    finally:
        os.environ.pop(ENV, None)
        if old is not None:
            os.environ[ENV] = old
    return fn


def region_calls(fn, x) -> tuple[int, str]:
    """(fxrewrite::fused_region calls in one forward, the profiler's table of that forward)."""
    acts = [torch.profiler.ProfilerActivity.CPU]
    if x.is_cuda:
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.no_grad(), torch.profiler.profile(activities=acts) as prof:
        fn(x)
    events = prof.key_averages()
    calls = sum(e.count for e in events if e.key == "fxrewrite::fused_region")
    return calls, events.table(sort_by="self_cpu_time_total", row_limit=12)


def run(n, layers, shapes, device, dtype, rounds, warmup):
    from fxrewrite import optimize
    from fxrewrite.codegen.runtime import is_region_call
    model = build(n, layers, device, dtype)
    example = torch.randn(*shapes[0], n, device=device, dtype=dtype)
    lowered = optimize(model, (example,), lower="triton")
    regions = sum(map(is_region_call, lowered.graph.nodes))
    rows, trace = [], ""
    for shape in shapes:
        torch._dynamo.reset()
        x = torch.randn(*shape, n, device=device, dtype=dtype)
        fns = {"inductor": compiled(model, False, x), "opaque": compiled(lowered, True, x),
               "traced": compiled(lowered, False, x)}
        row, table_text = _measure(f"stack {'x'.join(map(str, (*shape, n)))}", regions, model, fns, x, rounds, warmup)
        rows.append(row)
        trace = trace or table_text
    return rows, trace


def _measure(name, regions, model, fns, x, rounds, warmup) -> tuple[dict, str]:
    """The table row of the variants `fns` on input `x` (each compiled and called already), and
    the profiler table of one forward of the traced variant."""
    with torch.no_grad():
        ref = model(x)
        errs = {k: float((f(x) - ref).abs().max() / ref.abs().max()) for k, f in fns.items()}
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    ms = medians_interleaved({k: (lambda x, f=f: (f(x), sync())) for k, f in fns.items()}, x, warmup, rounds)
    profiled = {k: region_calls(f, x) for k, f in fns.items()}
    return _row(name, regions, ms, {k: calls for k, (calls, _) in profiled.items()}, errs), profiled["traced"][1]


def _row(name, regions, ms, calls, errs) -> dict:
    row = {"model, shape": name, "regions": regions}
    row |= {f"{k} ms": f"{v:.3f}" for k, v in ms.items()}
    row |= {f"{k} vs inductor": f"{ms['inductor'] / ms[k]:.2f}x" for k in ("opaque", "traced")}
    row |= {f"region calls ({k})": calls[k] for k in ms}
    row["max rel err (traced)"] = f"{errs['traced']:.1e}"
    return row


class LastHidden(nn.Module):
    """A transformers model called on token ids, returning the last hidden state (a tensor)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model(input_ids=ids).last_hidden_state


def run_llama(shapes, device, dtype, rounds, warmup):
    """transformers' LlamaModel (hidden 512, 4 layers, random weights) through
    `torch.compile(backend="rewrite", options={"lower": "triton"})`, against Inductor alone: the
    exact passes and the lowering inside the compile, regions opaque or traced."""
    import transformers
    from fxrewrite import backend
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=1000, use_cache=False, hidden_size=512, intermediate_size=1408,
                                   num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2)
    model = LastHidden(transformers.LlamaModel(cfg)).to(device=device, dtype=dtype).eval()
    rows = []
    for batch, seq in shapes:
        torch._dynamo.reset()
        ids = torch.randint(0, 1000, (batch, seq), device=device)
        rewrite = dict(backend="rewrite", options={"lower": "triton"})
        fns = {"inductor": compiled(model, False, ids), "opaque": compiled(model, True, ids, **rewrite),
               "traced": compiled(model, False, ids, **rewrite)}
        regions = sum(r.pass_name == "lower_triton" and r.action == "rewrote" for r in backend.last_report().records)
        rows.append(_measure(f"llama {batch}x{seq}", regions, model, fns, ids, rounds, warmup)[0])
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--hidden", type=int, default=None)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=51)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-llama", action="store_true", help="the block stack only")
    args = ap.parse_args(argv)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("run without TRITON_INTERPRET: on CPU the regions' reference is what users run")
    if device == "cuda":
        n, shapes, dtype = args.hidden or 4096, [(1, 1), (1, 64), (8, 512)], torch.bfloat16
    else:
        n, shapes, dtype = args.hidden or 256, [(1, 8), (4, 128)], torch.float32
    rounds, warmup = (5, 1) if args.quick else (args.rounds, args.warmup)
    rows, trace = run(n, args.layers, shapes, device, dtype, rounds, warmup)
    if not args.no_llama:
        rows += run_llama([(1, 8), (2, 128)], device, dtype, rounds, warmup)
    where = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"Machine: {machine()}, {where}, {str(dtype).replace('torch.', '')}, stack of {args.layers} blocks; "
          f"median of {rounds} rounds, variants interleaved\n")
    cols = list(rows[0])
    print(table(rows, cols))
    print("\nProfiler, one forward of the traced variant (first shape):\n")
    print(trace)
    bad = [r for r in rows if r["region calls (traced)"] != 0 or r["region calls (opaque)"] < r["regions"]]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
