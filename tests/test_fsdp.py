"""A model swapped to DyT per block trains under PyTorch's FSDP2 (`fully_shard` on each optimized
block, then on the model) exactly as in one process: examples/fsdp_swapped.py under torchrun,
two CPU ranks on gloo, against the same script's single-process run in this process; once as
swapped, once with each block's fused regions lowered to generated kernels (forward and backward
in Triton's interpreter, on the parameters FSDP2 gathers)."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "fsdp_swapped.py"


def _fsdp2_missing() -> str | None:
    if not dist.is_available() or not dist.is_gloo_available():
        return "torch.distributed with the gloo backend is not available"
    import torch.distributed.fsdp as fsdp
    if not hasattr(fsdp, "fully_shard"):
        return "this torch has no FSDP2 (torch.distributed.fsdp.fully_shard)"
    return None


def _example():
    spec = importlib.util.spec_from_file_location("fsdp_swapped", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(_fsdp2_missing() is not None, reason=str(_fsdp2_missing()))
@pytest.mark.parametrize("lower", [None, "triton"])
def test_fsdp2_training_of_a_block_swapped_model_matches_one_process(lower):
    # --standalone: a free local port, so that parallel runs do not collide on 29500
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(EXAMPLE)]
    if lower:  # the blocks' fused regions as generated kernels (Triton's interpreter on CPU)
        cmd += ["--lower", lower]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", TRITON_INTERPRET="1")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    sharded = json.loads(done.stdout.strip().splitlines()[-1])
    assert sharded["world_size"] == 2 and sharded["sharded_graph_blocks"] == 2, sharded
    # two decoder layers, each: its two DyT norms (with their residual adds) and the SwiGLU product
    assert sharded["lowered_regions"] == (6 if lower else 0), sharded

    reference, regions = _example().single_process(steps=5, lower=lower)
    assert regions == sharded["lowered_regions"]
    assert len(sharded["losses"]) == len(reference) == 5
    for step, (a, b) in enumerate(zip(sharded["losses"], reference)):
        assert abs(a - b) <= 1e-5 * abs(b), (step, sharded["losses"], reference)
    assert reference[-1] < reference[0], reference  # it trains
