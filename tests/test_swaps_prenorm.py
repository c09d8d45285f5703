"""Exact LayerNorm -> RMSNorm for pre-LN transformers (passes.prenorm), proven in float64 on
GPT-2 and a pre-LN ViT against the original model on fresh inputs; and the cases where it does
not apply, each with its reason."""
import warnings

import pytest
import torch
import torch.nn as nn

from fxrewrite import optimize, verify
from fxrewrite.rewrite import ops

from conftest import count, ids, randomise_norms, rewrote, skipped, tiny_bert, tiny_gpt2, tiny_vit

warnings.filterwarnings("ignore", message=".*specialized.*")


PASS = "prenorm_rmsnorm"


def test_vit_float64_exact():
    torch.manual_seed(0)
    model = randomise_norms(tiny_vit()).double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    gm = optimize(model, x, passes=[PASS])
    assert count(gm, ops.layer_norm) == 0 and count(gm, ops.rms_norm) == 5
    detail = " ".join(r.detail for r in rewrote(gm, PASS))
    for writer in ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.1.mlp.fc2.bias"):
        assert f"re-centred {writer}" in detail or f", {writer}" in detail
    fresh = torch.randn(3, 3, 32, 32, dtype=torch.float64) * 3 + 1  # other batch size, shifted inputs
    result = verify(model, gm, fresh, rtol=1e-10)
    assert result.max_rel < 1e-12
    # and in float32, equal up to rounding
    verify(model.float(), gm.float(), fresh.float(), rtol=1e-5)


@pytest.mark.parametrize("head", [False, True])
def test_gpt2_float64_exact(head):
    torch.manual_seed(0)
    model = randomise_norms(tiny_gpt2(head), key="ln").double()
    gm = optimize(model, ids(), passes=[PASS])
    assert count(gm, ops.layer_norm) == 0 and count(gm, ops.rms_norm) == 5
    assert len(rewrote(gm, PASS)) == 5 + 2 + 4  # 5 norms, wte + wpe, 4 c_proj
    for _ in range(2):
        result = verify(model, gm, ids(), rtol=1e-10)
        assert result.max_rel < 1e-12


def test_post_ln_bert_is_left_alone_with_the_reason():
    torch.manual_seed(0)
    model = tiny_bert(num_hidden_layers=1)
    x = ids()
    gm = optimize(model, x, passes=[PASS])
    skips = skipped(gm, PASS)
    assert len(skips) == 3 and not rewrote(gm, PASS)
    assert all("post-LN block" in s.detail for s in skips)
    verify(model, gm, x, rtol=0, atol=0)


def test_layer_scale_stops_it():
    model = tiny_vit(init_values=0.1)  # LayerScale: a per-channel multiply writes into the stream
    x = torch.randn(1, 3, 32, 32)
    gm = optimize(model, x, passes=[PASS])
    assert not rewrote(gm, PASS) and count(gm, ops.layer_norm) == 5
    assert any("produced by mul" in s.detail for s in skipped(gm, PASS))


class PreLN(nn.Module):
    """A pre-LN block: embedding, one residual branch (scaled by `scale` when given), final norm;
    with `returns_stream`, it also returns its residual stream (like output_hidden_states)."""

    def __init__(self, scale=None, returns_stream=False):
        super().__init__()
        self.emb, self.ln1, self.fc, self.ln2 = nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 8), nn.LayerNorm(8)
        self.scale, self.returns_stream = scale, returns_stream

    def forward(self, x):
        h = self.emb(x)
        branch = self.fc(self.ln1(h))
        h = h + (branch if self.scale is None else branch * self.scale)
        return (self.ln2(h), h) if self.returns_stream else self.ln2(h)


class StreamFromInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln, self.fc = nn.LayerNorm(8), nn.Linear(8, 8)

    def forward(self, x):
        return self.ln(x + self.fc(x))


@pytest.mark.parametrize("model,reason", [(PreLN(returns_stream=True), "returned by the model"),
                                          (StreamFromInput(), "it is a model input")])
def test_not_applicable_cases(model, reason):
    x = torch.randn(2, 3, 4 if isinstance(model, PreLN) else 8)
    gm = optimize(model.eval(), x, passes=[PASS])
    assert not rewrote(gm, PASS)
    assert all(reason in s.detail for s in skipped(gm, PASS)) and skipped(gm, PASS)
    verify(model, gm, x, rtol=0, atol=0)


def test_toy_pre_ln_applies_and_second_run_is_a_no_op():
    torch.manual_seed(0)
    model = randomise_norms(PreLN(scale=0.5).eval(), key="ln").double()
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    gm = optimize(model, x, passes=[PASS])
    assert count(gm, ops.rms_norm) == 2
    verify(model, gm, torch.randn(5, 3, 4, dtype=torch.float64) + 3, rtol=1e-12)
    again = optimize(gm, x, passes=[PASS])
    assert [r.detail for r in again.report.records if r.pass_name == PASS] == \
        ["nothing to do: no LayerNorm in the graph"]
