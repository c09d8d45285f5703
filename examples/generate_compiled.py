"""Greedy `generate()` through `torch.compile(backend="rewrite")` with fused RMSNorm kernels.

The recipe: compile the model's `forward`, not the model, so that transformers' `generate()`
(KV cache, attention masks, stopping) stays as it is and calls the compiled forward at each
step. Dynamo inlines each RMSNorm; the backend lifts it back into one norm op and lowers it
(with the residual add before it) to one generated Triton kernel. The KV cache tensors are
graph inputs that change on every step, never frozen parameters.

    python examples/generate_compiled.py                  # tiny Llama from a config, random weights
    python examples/generate_compiled.py --dtype bfloat16 --family qwen2

Prints, for one prompt and for a left-padded batch of prompts of different lengths, whether the
compiled model generates token for token what eager generates, and the fused regions. Without a
GPU, run it with TRITON_INTERPRET=1 (Triton's interpreter runs the kernels on the CPU).
"""
from __future__ import annotations

import argparse

import torch
import transformers

from fxrewrite import backend

FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    "gemma": (transformers.GemmaConfig, transformers.GemmaForCausalLM),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
}


def tiny_causal_lm(family: str, dtype: torch.dtype, seed: int = 0):
    """A 2-layer decoder of `family` with random weights (nothing is downloaded)."""
    config_cls, model_cls = FAMILIES[family]
    config = config_cls(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=16, vocab_size=128, max_position_embeddings=128,
                        pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    return model_cls(config).eval().to(dtype)


def prompts(batch: int, seed: int = 1):
    """Token ids and attention mask: prompts of lengths 7, 4, 9, ... left-padded with token 0."""
    g = torch.Generator().manual_seed(seed)
    lengths = [7, 4, 9, 5][:batch]
    width = max(lengths)
    ids = torch.zeros(batch, width, dtype=torch.long)
    mask = torch.zeros(batch, width, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, width - n:] = torch.randint(3, 128, (n,), generator=g)
        mask[i, width - n:] = 1
    return ids, mask


def greedy(model, ids, mask, new_tokens: int):
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                              min_new_tokens=new_tokens, pad_token_id=0)


def compare(family: str, dtype: torch.dtype, new_tokens: int, compiler: str = "eager") -> dict:
    """Eager and compiled greedy generation on one prompt and on a left-padded batch."""
    model = tiny_causal_lm(family, dtype)
    cases = {"one prompt": prompts(1), "left-padded batch of 3": prompts(3)}
    want = {name: greedy(model, ids, mask, new_tokens) for name, (ids, mask) in cases.items()}
    first = len(backend.REPORTS)
    model.forward = torch.compile(model.forward, backend="rewrite",
                                  options={"lower": "triton", "compiler": compiler})
    got = {name: greedy(model, ids, mask, new_tokens) for name, (ids, mask) in cases.items()}
    reports = backend.REPORTS[first:]
    return {"same": {name: torch.equal(got[name], want[name]) for name in cases},
            "graphs": len(reports), "fused": [_lowered(r, glu=False) for r in reports],
            "glu": [_lowered(r, glu=True) for r in reports],
            "norms": sum(1 for m in model.modules() if type(m).__name__.endswith("RMSNorm")),
            "layers": model.config.num_hidden_layers}


def _lowered(report, glu: bool) -> int:
    """Regions the lowering fused in one compiled graph: norm regions, or GLU regions (a gated
    product `act(gate) * up`), by the kind that starts each region's report line."""
    return sum(1 for r in report.records if r.pass_name == "lower_triton" and r.action == "rewrote"
               and r.detail.startswith("glu region:") == glu)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=sorted(FAMILIES), default="llama")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--compiler", default="eager", help="final compiler after the rewrite: eager or inductor")
    args = ap.parse_args(argv)
    out = compare(args.family, getattr(torch, args.dtype), args.new_tokens, args.compiler)
    for name, same in out["same"].items():
        print(f"{args.family} {args.dtype} {name}: {args.new_tokens} greedy tokens "
              f"{'identical to eager' if same else 'DIFFER from eager'}")
    print(f"compiled graphs: {out['graphs']}; fused regions per graph: {out['fused']} "
          f"(the model has {out['norms']} RMSNorms); GLU regions per graph: {out['glu']} "
          f"(the model has {out['layers']} gated MLPs)")
    return 0 if all(out["same"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
