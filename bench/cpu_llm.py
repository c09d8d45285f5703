"""A Llama-architecture language model on CPU: eager vs torch.export's module vs `optimize`.

    python bench/cpu_llm.py                   # two configs, (batch, seq) (1, 8) and (2, 128)
    python bench/cpu_llm.py --quick           # smoke run: few rounds

Models: transformers' LlamaModel from configs with random weights (nothing downloaded): "tiny"
(hidden 64, 2 layers, the size the tests use) and "small" (hidden 512, 4 layers, 8 heads, 2 of
them key/value heads), KV cache off in every variant (a forward over the whole sequence, what
`optimize` captures).

Variants, on the same weights and inputs, timed in one process:
  eager      the transformers model
  export     torch.export.export(model, ...).module(): the capture alone, no passes (the peer
             that separates what capture costs per call from what the passes change)
  optimize   optimize(model, example): the same capture route (torch.export, batch and sequence
             dynamic) plus the exact passes

Every variant is built and called once first, then warmed up, then the calls alternate
round-robin (`common.medians_interleaved`: each round runs every variant once, in an order
rotated each round). "ms" is the median over the rounds; ratios are eager's median / the
variant's (above 1: faster than eager). Also printed: each variant's max relative deviation
from eager on the timed input. Runs under torch.no_grad(); prints a Markdown table.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine, medians_interleaved, table  # noqa: E402

CONFIGS = {"tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=1),
           "small": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=2)}
SHAPES = [(1, 8), (2, 128)]


def build(name: str):
    import transformers
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=1000, use_cache=False, **CONFIGS[name])
    return transformers.LlamaModel(config).eval()


def variants(model, example: dict) -> dict:
    from fxrewrite import optimize
    exported = torch.export.export(model, (), example, dynamic_shapes={
        "input_ids": {0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO}}, strict=False).module()
    return {"eager": model, "export": exported, "optimize": optimize(model, example)}


def output(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out.last_hidden_state if hasattr(out, "last_hidden_state") \
        else out["last_hidden_state"]


def run(name: str, rounds: int, warmup: int) -> list[dict]:
    model = build(name)
    example = {"input_ids": torch.randint(0, 1000, (2, 8))}
    with torch.no_grad():
        fns = variants(model, example)
    rows = []
    for batch, seq in SHAPES:
        ids = torch.randint(0, 1000, (batch, seq))
        with torch.no_grad():
            ref = output(model(input_ids=ids))
            errs = {k: float((output(f(input_ids=ids)) - ref).abs().max() / ref.abs().max()) for k, f in fns.items()}
        ms = medians_interleaved({k: (lambda x, f=f: f(input_ids=x)) for k, f in fns.items()}, ids, warmup, rounds)
        row = {"model": name, "batch, seq": f"{batch}, {seq}", **{f"{k} ms": f"{v:.2f}" for k, v in ms.items()}}
        row |= {f"{k} vs eager": f"{ms['eager'] / ms[k]:.2f}x" for k in fns if k != "eager"}
        row["max rel err (optimize)"] = f"{errs['optimize']:.1e}"
        rows.append(row)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tiny,small")
    ap.add_argument("--rounds", type=int, default=31)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rounds, warmup = (5, 1) if args.quick else (args.rounds, args.warmup)
    import transformers
    rows = [r for name in args.models.split(",") for r in run(name, rounds, warmup)]
    print(f"Machine: {machine()}, transformers {transformers.__version__}, {args.threads} threads; "
          f"median of {rounds} rounds, variants interleaved\n")
    cols = ["model", "batch, seq", "eager ms", "export ms", "optimize ms", "export vs eager", "optimize vs eager",
            "max rel err (optimize)"]
    print(table(rows, cols))


if __name__ == "__main__":
    main()
