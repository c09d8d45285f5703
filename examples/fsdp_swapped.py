"""Train a DyT-swapped Llama under PyTorch's FSDP2, one `fully_shard` per transformer block.

`optimize(model, x, passes="swap_dyt", partial=LlamaDecoderLayer)` swaps the RMSNorms of each
decoder layer for DyT and keeps every layer a module of its own (a GraphModule in place of the
LlamaDecoderLayer), so it can be sharded the way users shard: `fully_shard(block)` for each
block, then `fully_shard(model)`. Each rank trains on its half of a fixed global batch; FSDP
averages the gradients across ranks, and the loss is a mean over equally many tokens per rank,
so the steps are those of one process on the whole batch (up to float rounding order).
(`fully_shard` refuses 0-d parameters, as it shards along dim 0: the library's DyT keeps its
alpha as a 1-element tensor, as the paper's code does.)

With `--lower triton` each block's fused regions (the DyT norms, the SwiGLU product) also run as
generated Triton kernels, forward and backward, on the parameters FSDP2 gathers for the block
(on CPU: set TRITON_INTERPRET=1 for Triton's interpreter; without it the regions run their eager
reference).

    torchrun --nproc_per_node 2 examples/fsdp_swapped.py    # CPU, gloo
    python examples/fsdp_swapped.py                         # one process, no FSDP: the reference
    TRITON_INTERPRET=1 torchrun --nproc_per_node 2 examples/fsdp_swapped.py --lower triton

Prints one JSON line: {"world_size": N, "losses": [...], "lowered_regions": R}, the global mean
loss at each step and how many fused-region calls the blocks make, and under torchrun
"sharded_graph_blocks", how many blocks are both optimized and sharded.
"""
from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from fxrewrite import optimize
from fxrewrite.codegen.runtime import is_region_call

VOCAB, BATCH, SEQ = 128, 4, 16


def swapped_model(lower: str | None = None) -> torch.nn.Module:
    """A tiny float32 Llama, the same on every rank (fixed seed), with DyT in each decoder layer;
    `lower="triton"` also replaces each layer's fused regions with generated kernels."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, use_cache=False)
    model = LlamaForCausalLM(cfg).train()
    example = {"input_ids": torch.randint(0, VOCAB, (2, 8))}
    return optimize(model, example, passes="swap_dyt", partial=LlamaDecoderLayer, lower=lower)


def lowered_regions(model: torch.nn.Module) -> int:
    """How many fused-region calls the optimized blocks' graphs make."""
    return sum(is_region_call(n) for m in model.modules() if isinstance(m, torch.fx.GraphModule)
               for n in m.graph.nodes)


def global_batch() -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))


def causal_lm_loss(model, ids: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of each next token (every rank has as many tokens, so the mean of the
    ranks' means is the mean over the global batch)."""
    logits = model(input_ids=ids).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))


def train(model, ids: torch.Tensor, steps: int) -> list[float]:
    """`steps` SGD steps on `ids` (this rank's share of the batch); the global mean losses."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for _ in range(steps):
        loss = causal_lm_loss(model, ids)
        opt.zero_grad()
        loss.backward()  # under FSDP2: gradients reduce-scattered and averaged over ranks
        opt.step()
        mean = loss.detach().clone()
        if dist.is_initialized():
            dist.all_reduce(mean, op=dist.ReduceOp.AVG)
        losses.append(mean.item())
    return losses


def single_process(steps: int = 5, lower: str | None = None) -> tuple[list[float], int]:
    """The reference: the same swapped model trained in one process on the whole batch; its
    losses and lowered region count."""
    model = swapped_model(lower)
    return train(model, global_batch(), steps), lowered_regions(model)


def sharded(steps: int, lower: str | None = None) -> tuple[list[float], int, int]:
    """The global mean losses of `steps` steps under FSDP2, how many blocks are optimized
    GraphModules sharded by FSDP2 (every parameter a DTensor), and the lowered region count."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard
    from torch.distributed.tensor import DTensor
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        model = swapped_model(lower)
        mesh = init_device_mesh("cpu", (world,))
        for block in model.model.layers:  # the optimized GraphModules, one per decoder layer
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        swapped = sum(isinstance(b, FSDPModule) and isinstance(b, torch.fx.GraphModule)
                      and all(isinstance(p, DTensor) for p in b.parameters()) for b in model.model.layers)
        regions = lowered_regions(model)
        return train(model, global_batch().chunk(world)[rank], steps), swapped, regions
    finally:
        dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--lower", choices=["triton"], default=None,
                        help="also lower each block's fused regions to generated Triton kernels")
    args = parser.parse_args()
    if "WORLD_SIZE" in os.environ:  # started by torchrun
        losses, swapped, regions = sharded(args.steps, args.lower)
        if int(os.environ["RANK"]) == 0:
            print(json.dumps({"world_size": int(os.environ["WORLD_SIZE"]), "losses": losses,
                              "lowered_regions": regions, "sharded_graph_blocks": swapped}))
    else:
        losses, regions = single_process(args.steps, args.lower)
        print(json.dumps({"world_size": 1, "losses": losses, "lowered_regions": regions}))


if __name__ == "__main__":
    main()
