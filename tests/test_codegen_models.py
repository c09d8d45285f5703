"""`optimize(model, x, lower="triton")` on real model families (tiny configs, random weights):
the lowered model matches eager, every norm is reported, and the regions really ran as kernels.

Kernels run in Triton's interpreter (TRITON_INTERPRET=1 set before Python starts) or on a GPU;
otherwise these tests are skipped (test_codegen.py covers the eager fallback).
"""
from __future__ import annotations

import os
import warnings

import pytest
import torch

from fxrewrite.codegen import runtime
from fxrewrite import optimize

warnings.filterwarnings("ignore", message=".*specialized.*")
DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda" if torch.cuda.is_available() else None
pytestmark = pytest.mark.skipif(DEVICE is None, reason="no Triton target: set TRITON_INTERPRET=1 or use a GPU")
OP = runtime.OP


def lowered_records(report):
    return [r for r in report.records if r.pass_name == "lower_triton" and r.action == "rewrote"]


def n_outputs(record) -> int:
    """How many values leave the region, from its report line (`... outputs a, b`)."""
    return len(record.detail.split("outputs ")[1].split(", "))


def ops_of(record) -> list[str]:
    """The region's ops, from its report line (`add_6:add -> to_8:cast -> ... => kernel ...`)."""
    return [step.rsplit(":", 1)[1] for step in record.detail.split(" => ")[0].split(" -> ")]


def test_llama_tiny(launches):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=48, intermediate_size=96, num_attention_heads=2,
                                   num_key_value_heads=2, vocab_size=100)
    model = transformers.LlamaModel(cfg).eval().to(DEVICE)
    with torch.no_grad():
        for layer in model.modules():  # fresh RMSNorm weights are all 1: randomise them
            if type(layer).__name__ == "LlamaRMSNorm":
                layer.weight.uniform_(0.5, 1.5)
    ids = {"input_ids": torch.randint(0, 100, (2, 8), device=DEVICE)}
    fast = optimize(model, ids, lower="triton")
    done = lowered_records(fast.report)
    # 2 layers x (input, post-attention) + the final norm, each lifted from its decomposed form,
    # and one GLU region per layer's MLP (silu(gate) * up)
    norms = [r for r in done if ops_of(r) != ["silu", "mul"]]
    assert len(norms) == 5 and len(done) == 7 == sum(map(runtime.is_region_call, fast.graph.nodes)), fast.report
    assert not fast.report.skipped("lower_triton")
    # after the first, each region takes in the residual add feeding it; the updated residual
    # stream leaves as a second output (not after the last). LLaMA's float32 casts of a float32
    # model are no-ops, which canonicalisation drops.
    assert [ops_of(r) for r in norms] == [["rms_norm"]] + [["add", "rms_norm"]] * 4
    assert [n_outputs(r) for r in norms] == [1, 2, 2, 2, 1]
    with torch.no_grad():
        want = model(**ids).last_hidden_state
        got = fast(**ids).last_hidden_state
    assert len(launches) == 7
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_vit_tiny(launches):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                              num_classes=10).eval().to(DEVICE)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 3, 32, 32, device=DEVICE)
    fast = optimize(model, x, lower="triton")
    done = lowered_records(fast.report)
    n_ln = sum(isinstance(m, torch.nn.LayerNorm) for m in model.modules())
    assert len(done) == n_ln == 5 == sum(map(runtime.is_region_call, fast.graph.nodes)), fast.report
    # pos-embed add + first LayerNorm, then each residual add + the next LayerNorm, the sum also
    # leaving the region as the residual stream (the last feeds only the final norm)
    assert [ops_of(r) for r in done] == [["add", "layer_norm"]] * 5
    assert [n_outputs(r) for r in done] == [2, 2, 2, 2, 1]
    assert all("kernel _add_layer_norm_fwd_kernel" in r.detail for r in done)
    with torch.no_grad():
        want, got = model(x), fast(x)
    assert len(launches) == 5
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
