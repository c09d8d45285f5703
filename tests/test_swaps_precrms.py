"""Exact Pre-LN -> Pre-CRMSNorm (passes.prenorm.prenorm_crmsnorm): the residual stream stored in
d-1 features, each LayerNorm reading it a CRMSNorm. Proven in float64 on GPT-2 (both heads) and a
pre-LN ViT built from configs with random weights, against the original model on fresh inputs;
the cases where it does not apply, each with its reason."""
import copy
import os
import warnings

import pytest
import torch
import torch.nn as nn

from fxrewrite import optimize, verify
from fxrewrite.codegen import runtime
from fxrewrite.codegen.regions import describe_norm
from fxrewrite.passes import REGISTRY
from fxrewrite.rewrite import ops
from fxrewrite.rewrite.shapes import tensor_shape

from conftest import (count, ids, notes, randomise_norms, rewrote, skipped, state_dict_round_trip, tiny_bert,
                      tiny_gpt2, tiny_vit)

warnings.filterwarnings("ignore", message=".*specialized.*")

PASS = "prenorm_crmsnorm"
D = 32  # the tiny models' hidden size


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def crms_derivations(gm):
    return [d for d in gm.derivations if d.pass_name == PASS]


def check_derivations_replay(model, gm):
    """Each new weight is its recorded function of the original model's tensors, and is d-1 wide
    on exactly one axis where the original was d wide."""
    state = dict(model.state_dict(keep_vars=True))
    found = crms_derivations(gm)
    assert found
    for der in found:
        sources = [state[s] for s in der.sources]
        new = getattr(gm, der.target)
        assert torch.equal(der.fn(*sources), new)
        (old,) = sources
        diff = [(a, b) for a, b in zip(old.shape, new.shape) if a != b]
        assert diff == [(D, D - 1)], (der.target, old.shape, new.shape)
    return found


def check_regions(gm):
    """Every CRMSNorm is an ordinary rms_norm over D that the Triton lowering can describe (its
    rebuilt input has a known shape)."""
    norms = [n for n in gm.graph.nodes if n.target is ops.rms_norm]
    for n in norms:
        assert describe_norm(gm, n).op == "rms_norm"
        x = ops.arg(n, "input")
        assert x.target is torch.ops.aten.cat.default and tensor_shape(x)[-1] == D
        assert tensor_shape(x.args[0][0])[-1] == D - 1  # the stream itself
    return norms


def test_vit_float64_exact():
    torch.manual_seed(0)
    model = randomise_norms(tiny_vit()).double()
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    gm = optimize(model, x, passes=[PASS])
    assert count(gm, ops.layer_norm) == 0 and len(check_regions(gm)) == 5
    detail = " ".join(r.detail for r in rewrote(gm, PASS))
    for writer in ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.1.mlp.fc2.bias"):
        assert f"re-centred {writer}" in detail or f", {writer}" in detail
    assert len(rewrote(gm, PASS)) == 5 + 7  # 5 norms; conv, cls_token, pos_embed, 2 x (proj, fc2)
    # the stream really is 31 wide: the writers' weights, and the values between blocks
    assert gm.blocks_0_mlp_fc2_weight_crms.shape == (D - 1, 128)
    assert gm.patch_embed_proj_weight_crms.shape == (D - 1, 3, 8, 8) and gm.cls_token_crms.shape == (1, 1, D - 1)
    check_derivations_replay(model, gm)
    # conv 3*8*8 + 1, cls 1, pos 17, per block proj 32 + 1 and fc2 128 + 1
    assert n_params(model) - n_params(gm) == 193 + 1 + 17 + 2 * (33 + 129) == 535
    fresh = torch.randn(3, 3, 32, 32, dtype=torch.float64) * 3 + 1  # other batch size, shifted inputs
    result = verify(model, gm, fresh, rtol=1e-10)
    assert result.max_rel < 1e-12
    # the report says what happened to the stream
    (stream,) = [d for d in notes(gm, PASS) if d.startswith("residual stream")]
    assert "(5 LayerNorms) stored in 31 features instead of 32: 7 writers re-centred and narrowed" in stream
    assert any("model output deviation" in d for d in notes(gm, PASS))
    # the original model is untouched
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert sum(isinstance(m, nn.LayerNorm) for m in model.modules()) == 5
    verify(model.float(), gm.float(), fresh.float(), rtol=1e-5)  # float32: equal up to rounding


@pytest.mark.parametrize("head", [False, True])
def test_gpt2_float64_exact(head):
    torch.manual_seed(0)
    model = randomise_norms(tiny_gpt2(head), key="ln").double()
    before = copy.deepcopy(model.state_dict())
    gm = optimize(model, ids(), passes=[PASS])
    assert count(gm, ops.layer_norm) == 0 and len(check_regions(gm)) == 5
    assert len(rewrote(gm, PASS)) == 5 + 2 + 4  # 5 norms, wte + wpe, 4 c_proj
    found = check_derivations_replay(model, gm)
    assert len(found) == 2 + 4 * 2  # wte, wpe, 4 x (c_proj weight, bias)
    prefix = "transformer_" if head else ""
    assert getattr(gm, f"{prefix}h_0_mlp_c_proj_weight_crms").shape == (128, D - 1)  # Conv1D: (in, out)
    # untied: wte 100 + wpe 32 + per block attn c_proj 32 + 1, mlp c_proj 128 + 1. Tied (LM head):
    # the head keeps the full wte, the stream gets a 100 x 31 copy
    saved = 100 + 32 + 2 * (33 + 129)
    assert n_params(model) - n_params(gm) == (saved - 100 * (D - 1) - 100 if head else saved)
    for _ in range(2):
        result = verify(model, gm, ids(), rtol=1e-10)
        assert result.max_rel < 1e-12
    result = verify(model, gm, ids(3, 11), rtol=1e-10)  # other batch and sequence lengths
    assert result.max_rel < 1e-12
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_state_dict_loads_into_a_second_run():
    torch.manual_seed(0)
    model = randomise_norms(tiny_gpt2(), key="ln").double()
    gm = optimize(model, ids(), passes=[PASS])
    torch.manual_seed(1)
    other = randomise_norms(tiny_gpt2(), key="ln").double()  # other weights, same structure
    gm2 = optimize(other, ids(batch=2), passes=[PASS])
    x = ids(2, 5)
    with torch.no_grad():
        assert not torch.allclose(gm(**x).last_hidden_state, gm2(**x).last_hidden_state)
    state_dict_round_trip(gm, gm2)
    verify(model, gm2, x, rtol=1e-10)


def test_second_run_is_a_no_op():
    torch.manual_seed(0)
    model = randomise_norms(tiny_vit()).double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    gm = optimize(model, x, passes=[PASS])
    again = optimize(gm, x, passes=[PASS])
    assert [r.detail for r in again.report.records if r.pass_name == PASS] == \
        ["nothing to do: no LayerNorm in the graph"]
    assert n_params(again) == n_params(gm)
    verify(model, again, x, rtol=1e-10)


def test_post_ln_bert_is_left_alone_with_the_reason():
    torch.manual_seed(0)
    model = tiny_bert(num_hidden_layers=1)
    x = ids()
    gm = optimize(model, x, passes=[PASS])
    skips = skipped(gm, PASS)
    assert len(skips) == 3 and not rewrote(gm, PASS)
    assert all("post-LN block" in s.detail and "stored in d-1 dims" in s.detail for s in skips)
    verify(model, gm, x, rtol=0, atol=0)


def test_layer_scale_stops_it():
    model = tiny_vit(init_values=0.1)  # LayerScale: a per-channel multiply writes into the stream
    x = torch.randn(1, 3, 32, 32)
    gm = optimize(model, x, passes=[PASS])
    assert not rewrote(gm, PASS) and count(gm, ops.layer_norm) == 5
    assert any("produced by mul" in s.detail for s in skipped(gm, PASS))
    assert n_params(gm) == n_params(model)


class PreLN(nn.Module):
    """A pre-LN block: embedding, one residual branch (scaled by `scale` when given), final norm;
    `returns_stream` also returns the residual stream, `reads_width` reshapes the stream with its
    own hidden size (`h.shape[-1]`)."""

    def __init__(self, d=8, scale=None, returns_stream=False, reads_width=False):
        super().__init__()
        self.emb, self.ln1, self.fc, self.ln2 = nn.Linear(4, d), nn.LayerNorm(d), nn.Linear(d, d), nn.LayerNorm(d)
        self.scale, self.returns_stream, self.reads_width = scale, returns_stream, reads_width

    def forward(self, x):
        h = self.emb(x)
        branch = self.fc(self.ln1(h))
        h = h + (branch if self.scale is None else branch * self.scale)
        if self.reads_width:
            h = h.reshape(h.shape[0], -1, h.shape[-1])
        return (self.ln2(h), h) if self.returns_stream else self.ln2(h)


class StreamFromInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln, self.fc = nn.LayerNorm(4), nn.Linear(4, 4)

    def forward(self, x):
        return self.ln(x + self.fc(x))


@pytest.mark.parametrize("model,reason", [
    (PreLN(returns_stream=True), "returned by the model"),
    (StreamFromInput(), "it is a model input"),
    (PreLN(reads_width=True), "reads the hidden size of the residual stream"),
    (PreLN(d=2), "the hidden size is 2"),
])
def test_not_applicable_cases(model, reason):
    x = torch.randn(2, 3, 4)
    gm = optimize(model.eval(), x, passes=[PASS])
    assert not rewrote(gm, PASS)
    assert skipped(gm, PASS) and all(reason in s.detail for s in skipped(gm, PASS)), skipped(gm, PASS)
    verify(model, gm, x, rtol=0, atol=0)


def test_toy_pre_ln_applies():
    torch.manual_seed(0)
    model = randomise_norms(PreLN(scale=0.5).eval(), key="ln").double()
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    gm = optimize(model, x, passes=[PASS])
    assert count(gm, ops.rms_norm) == 2 and count(gm, ops.layer_norm) == 0
    assert gm.emb_weight_crms.shape == (7, 4) and gm.fc_weight_crms.shape == (7, 8)
    assert n_params(model) - n_params(gm) == (4 + 1) + (8 + 1)
    verify(model, gm, torch.randn(5, 3, 4, dtype=torch.float64) + 3, rtol=1e-12)


def test_registered_as_exact():
    assert REGISTRY[PASS].exactness == "exact" and not REGISTRY[PASS].approximate


TRITON = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda" if torch.cuda.is_available() else None


@pytest.mark.skipif(TRITON is None, reason="no Triton target: set TRITON_INTERPRET=1 or use a GPU")
def test_crmsnorms_lower_to_triton():
    """Each CRMSNorm's rms_norm (+ bias) becomes a generated kernel; the rebuilt input (cat) stays
    outside the region."""
    torch.manual_seed(0)
    model = randomise_norms(tiny_vit()).to(TRITON)
    x = torch.randn(2, 3, 32, 32, device=TRITON)
    fast = optimize(model, x, passes=[PASS], lower="triton")
    assert len(rewrote(fast, PASS)) == 12
    lowered = rewrote(fast, "lower_triton")
    assert len(lowered) == 5 == sum(map(runtime.is_region_call, fast.graph.nodes))
    assert all(r.detail.startswith(f"rms_norm region: {r.node}:rms_norm -> ") for r in lowered)
    verify(model, fast, x, rtol=1e-4, atol=1e-5)
