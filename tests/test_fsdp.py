"""A model swapped to DyT per block trains under PyTorch's FSDP2 (`fully_shard` on each optimized
block, then on the model) exactly as in one process: examples/fsdp_swapped.py under torchrun,
two CPU ranks on gloo, against the same script's single-process run in this process."""
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
def test_fsdp2_training_of_a_block_swapped_model_matches_one_process():
    # --standalone: a free local port, so that parallel runs do not collide on 29500
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(EXAMPLE)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    sharded = json.loads(done.stdout.strip().splitlines()[-1])
    assert sharded["world_size"] == 2 and sharded["sharded_graph_blocks"] == 2, sharded

    reference = _example().single_process(steps=5)
    assert len(sharded["losses"]) == len(reference) == 5
    for step, (a, b) in enumerate(zip(sharded["losses"], reference)):
        assert abs(a - b) <= 1e-5 * abs(b), (step, sharded["losses"], reference)
    assert reference[-1] < reference[0], reference  # it trains
