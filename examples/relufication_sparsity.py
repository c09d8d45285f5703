"""ReLU-fication of a small LLaMA (transformers, built from a config with random weights, nothing
downloaded): every SiLU of the gated FFNs, down(act(gate(x)) * up(x)), becomes a ReLU with
`optimize(model, x, passes=["relufication"])` (or a shifted / thresholded ReLU with
`passes=[relufy(shift=...)]`), and `fxrewrite.sparsity.activation_sparsity` counts the exact
zeros of each activation and of the product act(gate) * up that the down projection reads
(what a sparse kernel skips), before and after, on held-out batches.

    python examples/relufication_sparsity.py [--shift 0.1] [--threshold 0.1]

Prints the swap's report, then a markdown table per layer (zeros before -> after, for the
activation and the gated product) and the output deviation of the swapped model. The swap is
approximate: a real model would be fine-tuned afterwards (ProSparse). Fixed seeds; CPU; a few
seconds.
"""
from __future__ import annotations

import argparse
import warnings

import torch

from fxrewrite import optimize
from fxrewrite.passes.swaps_activation import relufy
from fxrewrite.rewrite.verify import deviation
from fxrewrite.sparsity import activation_sparsity


def tiny_llama():
    from transformers import LlamaConfig, LlamaModel
    cfg = LlamaConfig(num_hidden_layers=4, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, use_cache=False)
    return LlamaModel(cfg).eval()


def batch(seed: int, size: int = 4, tokens: int = 16) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, 256, (size, tokens), generator=g)}


def pct(v) -> str:
    return "-" if v is None else f"{v:.1%}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shift", type=float, default=0.0, help="max(x - shift, 0) instead of ReLU")
    ap.add_argument("--threshold", type=float, default=None, help="x if x > threshold else 0 instead of ReLU")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)

    model = tiny_llama()
    swap = relufy(shift=args.shift, threshold=args.threshold)
    gm = optimize(model, batch(0), passes=[swap])
    print("report:")
    for r in gm.report.records:
        if r.pass_name == "relufication":
            print(f"  {r.action}: {r.detail}")

    held_out = [batch(s) for s in (1, 2, 3)]
    before = activation_sparsity(model, held_out)
    after = activation_sparsity(gm, held_out)
    assert len(before) == len(after), (before, after)

    print("\nactivation sparsity (exact zeros) on 3 held-out batches of 4 x 16 tokens:\n")
    print("| layer | activation | zeros before | zeros after | act * up zeros before | act * up zeros after |")
    print("|---|---|---|---|---|---|")
    for b, a in zip(before, after):
        print(f"| {b.name} | {b.kind} -> {a.kind} | {pct(b.sparsity)} | {pct(a.sparsity)} "
              f"| {pct(b.product_sparsity)} | {pct(a.product_sparsity)} |")
    print(f"| all | | {pct(before.mean())} | {pct(after.mean())} | | |")

    with torch.no_grad():
        ref = [model(**x).last_hidden_state for x in held_out]
        new = [gm(**x)[0] for x in held_out]
    dev_abs, dev_rel = deviation(ref, new)
    print(f"\noutput deviation (last hidden state, held-out): max abs {dev_abs:.3g}, max rel {dev_rel:.3g} "
          f"(approximate swap: fine-tune afterwards)")


if __name__ == "__main__":
    main()
