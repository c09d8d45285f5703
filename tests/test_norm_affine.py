"""fold_norm_affine and fold_scale_shift (passes/norm_affine.py): norm affines folded into the
linears that read the norm, and SSF scales / shifts folded into the norm before them. Exact:
compared in float64 on fresh inputs; what stays, stays with its reason."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

from fxrewrite import optimize, verify
from fxrewrite.passes.norm_affine import FOLD_NORM_AFFINE, FOLD_SCALE_SHIFT
from fxrewrite.rewrite import ops

from conftest import count, notes, randomise_norms, randomize_bn, rewrote, skipped

warnings.filterwarnings("ignore", message=".*specialized.*")

NORMS = (ops.layer_norm, ops.rms_norm, ops.batch_norm)


def norm_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in NORMS]


def affine_free(gm) -> bool:
    """Whether no LayerNorm / RMSNorm of the graph has a weight or bias left."""
    return all(ops.arg(n, "weight") is None and (n.target is ops.rms_norm or ops.arg(n, "bias") is None)
               for n in norm_nodes(gm) if n.target is not ops.batch_norm)


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def unchanged(model, before) -> bool:
    after = model.state_dict()
    return after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)


def exact(model, fast, x):
    """float64 comparison on a fresh input of x's shape."""
    fresh = torch.randn_like(x) if x.is_floating_point() else torch.randint_like(x, 0, 64)
    result = verify(model, fast, fresh, float64=True)
    assert result.max_rel < 1e-10, str(result)


def again(fast, x, passes, name):
    """Optimizing the result again with the same passes rewrites nothing more."""
    twice = optimize(fast, x, passes=passes)
    assert twice.report.count(name) == 0, twice.report
    torch.testing.assert_close(twice(x), fast(x), rtol=0, atol=0)
    return twice


# ================================================================ fold_norm_affine

class QKV(nn.Module):
    def __init__(self, d=16, bias=True, norm=None, residual=False):
        super().__init__()
        self.norm = norm if norm is not None else nn.LayerNorm(d)
        self.q, self.k, self.v = (nn.Linear(d, d, bias=bias) for _ in range(3))
        self.residual = residual

    def forward(self, x):
        h = self.norm(x)
        out = torch.softmax(self.q(h) @ self.k(h).transpose(-1, -2), -1) @ self.v(h)
        return out + h if self.residual else out


class GateUp(nn.Module):
    def __init__(self, d=16, hidden=32):
        super().__init__()
        self.norm = nn.RMSNorm(d)
        self.gate, self.up = nn.Linear(d, hidden, bias=False), nn.Linear(d, hidden, bias=False)
        self.down = nn.Linear(hidden, d, bias=False)

    def forward(self, x):
        h = self.norm(x)
        return x + self.down(torch.nn.functional.silu(self.gate(h)) * self.up(h))


@pytest.mark.parametrize("bias", [True, False])
def test_layernorm_into_qkv(bias):
    model = randomise_norms(QKV(bias=bias)).eval()
    x = torch.randn(2, 5, 16)
    before = snapshot(model)
    fast = optimize(model, x, passes=[FOLD_NORM_AFFINE])
    assert unchanged(model, before)
    assert fast.report.count("fold_norm_affine") == 1, fast.report
    [r] = rewrote(fast, "fold_norm_affine")
    assert r.detail == "LayerNorm weight and bias folded into 3 linear(s): q, k, v; the norm keeps no affine"
    assert count(fast, ops.layer_norm) == 1 and affine_free(fast)
    assert all(ops.arg(n, "bias") is not None for n in fast.graph.nodes if n.target is ops.linear)  # c + W b
    assert not notes(fast, "fold_norm_affine")  # nothing tied
    exact(model, fast, x)
    twice = again(fast, x, [FOLD_NORM_AFFINE], "fold_norm_affine")
    assert notes(twice, "fold_norm_affine") == ["no LayerNorm or RMSNorm with an affine weight or bias found"]


def test_rmsnorm_module_into_gate_and_up():
    model = randomise_norms(GateUp()).eval()
    x = torch.randn(3, 16)
    fast = optimize(model, x, passes=[FOLD_NORM_AFFINE])
    [r] = rewrote(fast, "fold_norm_affine")
    assert r.detail == "RMSNorm weight folded into 2 linear(s): gate, up; the norm keeps no affine"
    assert count(fast, ops.rms_norm) == 1 and affine_free(fast)
    assert all(ops.arg(n, "bias") is None for n in fast.graph.nodes if n.target is ops.linear)  # no b: no c
    exact(model, fast, x)
    again(fast, x, [FOLD_NORM_AFFINE], "fold_norm_affine")


def test_norm_also_read_by_residual_add_is_skipped():
    model = randomise_norms(QKV(residual=True)).eval()
    x = torch.randn(2, 5, 16)
    fast = optimize(model, x, passes=[FOLD_NORM_AFFINE])
    assert fast.report.count("fold_norm_affine") == 0
    [s] = skipped(fast, "fold_norm_affine")
    assert s.detail.startswith("LayerNorm affine left in place: the norm's output is also read by add")
    assert "(aten.add): its affine cannot move into the linears" in s.detail
    assert not affine_free(fast)
    exact(model, fast, x)


def test_norm_over_two_axes_is_skipped():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.fc = nn.LayerNorm([4, 8]), nn.Linear(8, 8)

        def forward(self, x):
            return self.fc(self.norm(x))

    model, x = randomise_norms(Block()).eval(), torch.randn(2, 4, 8)
    fast = optimize(model, x, passes=[FOLD_NORM_AFFINE])
    [s] = skipped(fast, "fold_norm_affine")
    assert "normalises 2 axes [4, 8]" in s.detail
    exact(model, fast, x)


def test_linear_read_twice_keeps_its_other_use():
    """A Linear applied to the norm and to something else: its weight is read elsewhere, so the
    folded linear gets its own copy (noted) and the other call keeps the original."""
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.fc = nn.LayerNorm(8), nn.Linear(8, 8)

        def forward(self, x):
            return self.fc(self.norm(x)) + self.fc(x)

    model, x = randomise_norms(Shared()).eval(), torch.randn(3, 8)
    fast = optimize(model, x, passes=[FOLD_NORM_AFFINE])
    assert fast.report.count("fold_norm_affine") == 1
    [note] = notes(fast, "fold_norm_affine")
    assert note.startswith("fc.weight is also read by fc_1 (aten.linear)") and note.endswith("no longer tied")
    exact(model, fast, x)


class CastThenScale(nn.Module):
    """transformers' half-precision RMSNorm: normalised in float64 here (float32 there), cast back
    to the input's dtype, then times the weight; `other` adds a reader that is not a linear."""

    def __init__(self, d=16, weight_first=True, other=False, weight_dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(d, dtype=weight_dtype) + 0.5)
        self.q, self.k = nn.Linear(d, 8), nn.Linear(d, 8, bias=False)
        self.d, self.weight_first, self.other = d, weight_first, other

    def forward(self, x):
        h = torch.nn.functional.rms_norm(x.to(torch.float64), (self.d,)).to(x.dtype)
        h = self.weight * h if self.weight_first else h * self.weight
        out = self.q(h) + self.k(h)
        return out + h[..., :8] if self.other else out


@pytest.mark.parametrize("weight_first", [True, False])
def test_weight_applied_after_a_cast_folds_into_the_linears(weight_first):
    model, x = CastThenScale(weight_first=weight_first).eval(), torch.randn(2, 5, 16)
    fast = optimize(model, x, passes=["lift_norms", FOLD_NORM_AFFINE])
    [r] = rewrote(fast, "fold_norm_affine")
    assert r.detail.startswith("RMSNorm weight (applied after a cast, mul") and r.detail.endswith(
        "folded into 2 linear(s): q, k; the norm keeps no affine")
    assert count(fast, torch.ops.aten.mul.Tensor) == 0 and "weight" not in dict(fast.named_parameters())
    fresh = torch.randn(3, 7, 16)
    result = verify(model, fast, fresh)  # float32: each side rounds its product once
    assert result.max_rel < 1e-6, str(result)
    again(fast, x, ["lift_norms", FOLD_NORM_AFFINE], "fold_norm_affine")


def test_weight_after_a_cast_read_by_something_else_is_skipped():
    model, x = CastThenScale(other=True).eval(), torch.randn(2, 5, 16)
    fast = optimize(model, x, passes=["lift_norms", FOLD_NORM_AFFINE])
    [s] = skipped(fast, "fold_norm_affine")
    assert s.detail.startswith("RMSNorm affine left in place: the norm's output is also read by getitem")
    assert count(fast, torch.ops.aten.mul.Tensor) == 1
    torch.testing.assert_close(fast(x), model(x), rtol=0, atol=0)


def test_weight_after_a_cast_in_another_dtype_is_not_taken():
    """A float64 weight times the float32 cast promotes to float64: the linears would read the
    float32 cast instead, so the product is no norm weight to fold."""
    model, x = CastThenScale(weight_dtype=torch.float64).eval(), torch.randn(2, 5, 16)
    model.q.double(), model.k.double()
    fast = optimize(model, x, passes=["lift_norms", FOLD_NORM_AFFINE])
    assert fast.report.count("fold_norm_affine") == 0
    assert notes(fast, "fold_norm_affine") == ["no LayerNorm or RMSNorm with an affine weight or bias found"]
    torch.testing.assert_close(fast(x), model(x), rtol=0, atol=0)


# ---------------------------------------------------------------- a transformers Llama

def tiny_llama_lm():
    t = pytest.importorskip("transformers")
    cfg = t.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    return randomise_norms(t.LlamaForCausalLM(cfg).eval())  # every RMSNorm weight, final norm included


@pytest.fixture(scope="module")
def llama():
    model = tiny_llama_lm()
    x = {"input_ids": torch.randint(0, 64, (2, 8))}
    before = snapshot(model)
    fast = optimize(model, x, passes=["lift_norms", FOLD_NORM_AFFINE])
    return model, x, before, fast


def test_llama_norms_fold_into_qkv_gate_up_and_lm_head(llama):
    model, x, before, fast = llama
    assert unchanged(model, before)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # the user's model is still tied
    records = rewrote(fast, "fold_norm_affine")
    assert len(records) == fast.report.count("fold_norm_affine") == 5  # 2 layers x (input, post-attention) + final
    details = [r.detail for r in records]
    for i in range(2):
        attn = ", ".join(f"model.layers.{i}.self_attn.{p}_proj" for p in "qkv")
        mlp = f"model.layers.{i}.mlp.gate_proj, model.layers.{i}.mlp.up_proj"
        assert f"RMSNorm weight folded into 3 linear(s): {attn}; the norm keeps no affine" in details
        assert f"RMSNorm weight folded into 2 linear(s): {mlp}; the norm keeps no affine" in details
    assert "RMSNorm weight folded into 1 linear(s): lm_head; the norm keeps no affine" in details
    assert count(fast, ops.rms_norm) == 5 and affine_free(fast)
    [tie] = notes(fast, "fold_norm_affine")
    assert tie.startswith("lm_head.weight shares its storage with model.embed_tokens.weight")
    assert "is also read by embedding (aten.embedding)" in tie
    assert tie.endswith("the linear now reads a derived copy, so this weight is no longer tied")


def test_llama_matches_eager_and_is_idempotent(llama):
    model, x, _, fast = llama
    for batch, seq in [(2, 8), (3, 5)]:
        verify(model, fast, {"input_ids": torch.randint(0, 64, (batch, seq))})  # float32 rounding
    twice = optimize(fast, x, passes=["lift_norms", FOLD_NORM_AFFINE])
    assert twice.report.count("fold_norm_affine") == 0 and twice.report.count("lift_norms") == 0
    assert not skipped(twice, "fold_norm_affine")


def without_dtype_checks(gm):
    """A copy of an exported graph without torch.export's `_assert_tensor_metadata` checks (also
    in higher-order submodules such as the rotary embedding's), which pin the capture's float32
    and so fail in a float64 copy; they compute nothing. Keeps `.derivations` for the replay."""
    out = copy.deepcopy(gm)
    for mod in out.modules():
        if isinstance(mod, fx.GraphModule):
            for n in list(mod.graph.nodes):
                if n.op == "call_function" and n.target is torch.ops.aten._assert_tensor_metadata.default:
                    mod.graph.erase_node(n)
            mod.recompile()
    out.derivations = getattr(gm, "derivations", [])
    return out


def test_llama_float64_exact(llama):
    """Exact in float64, against the same capture without the fold. (transformers' eager Llama in
    float64 still computes its norms and rotary angles in float32, so the eager model is compared
    at float32 rounding above; a float64 Llama keeps the float32 norm casts, which lift_norms
    leaves as they are.)"""
    model, x, _, fast = llama
    reference = optimize(model, x, passes=["lift_norms"])
    assert reference.report.count("lift_norms") == 5
    ref64, fast64 = without_dtype_checks(reference), without_dtype_checks(fast)
    for batch, seq in [(2, 8), (3, 5)]:
        result = verify(ref64, fast64, {"input_ids": torch.randint(0, 64, (batch, seq))}, float64=True)
        assert result.max_rel < 1e-10, str(result)
        assert not result.replay_partial, result.notes


# ================================================================ fold_scale_shift (SSF)

class SSFBlock(nn.Module):
    """A ViT-like block with SSF after its norms: norm(x) * scale + shift, then the MLP."""

    def __init__(self, norm, d=16, shape=None, shift=True, scale=True, reverse=False):
        super().__init__()
        shape = shape or (d,)
        self.norm, self.fc1, self.fc2 = norm, nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.scale = nn.Parameter(torch.randn(shape) * 0.3 + 1) if scale else None
        self.shift = nn.Parameter(torch.randn(shape) * 0.3) if shift else None
        self.reverse = reverse

    def forward(self, x):
        h = self.norm(x)
        if self.scale is not None:
            h = self.scale * h if self.reverse else h * self.scale
        if self.shift is not None:
            h = self.shift + h if self.reverse else h + self.shift
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(h)))


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("shape", [(16,), (1, 1, 16)])
def test_ssf_after_layernorm(shape, reverse):
    model = randomise_norms(SSFBlock(nn.LayerNorm(16), shape=shape, reverse=reverse)).eval()
    x = torch.randn(2, 5, 16)
    before = snapshot(model)
    fast = optimize(model, x, passes=[FOLD_SCALE_SHIFT])
    assert unchanged(model, before)
    assert fast.report.count("fold_scale_shift") == 2, fast.report  # the scale, then the shift
    assert count(fast, ops.mul) == 0 and count(fast, ops.add) == 1  # the residual add only
    assert not skipped(fast, "fold_scale_shift")
    [norm] = norm_nodes(fast)
    assert list(fast.get_parameter(ops.arg(norm, "weight").target).shape) == [16]
    exact(model, fast, x)
    again(fast, x, [FOLD_SCALE_SHIFT], "fold_scale_shift")


@pytest.mark.parametrize("scale, shift", [(True, False), (False, True)])
def test_ssf_scale_alone_and_shift_alone(scale, shift):
    norm = nn.LayerNorm(16, elementwise_affine=False)  # no affine of its own: the SSF one becomes it
    model = SSFBlock(norm, scale=scale, shift=shift).eval()
    x = torch.randn(2, 5, 16)
    fast = optimize(model, x, passes=[FOLD_SCALE_SHIFT])
    assert fast.report.count("fold_scale_shift") == 1
    [n] = norm_nodes(fast)
    assert (ops.arg(n, "weight") is not None) == scale and (ops.arg(n, "bias") is not None) == shift
    exact(model, fast, x)


def test_ssf_after_rmsnorm_keeps_the_shift():
    model = randomise_norms(SSFBlock(nn.RMSNorm(16))).eval()
    x = torch.randn(2, 5, 16)
    fast = optimize(model, x, passes=[FOLD_SCALE_SHIFT])
    assert fast.report.count("fold_scale_shift") == 1
    [s] = skipped(fast, "fold_scale_shift")
    assert s.detail == ("fold_shift_into_norm: aten.rms_norm has no bias to take a shift; "
                        "the scale or shift stays after the norm")
    assert count(fast, ops.mul) == 0 and count(fast, ops.add) == 2  # the shift and the residual
    exact(model, fast, x)
    again(fast, x, [FOLD_SCALE_SHIFT], "fold_scale_shift")


def test_ssf_then_norm_affine_into_the_linears():
    """SSF into the LayerNorm, then the whole affine into fc1: an affine-free norm."""
    model = randomise_norms(SSFBlock(nn.LayerNorm(16))).eval()
    x = torch.randn(2, 5, 16)
    fast = optimize(model, x, passes=[FOLD_SCALE_SHIFT, FOLD_NORM_AFFINE])
    assert fast.report.count("fold_scale_shift") == 2 and fast.report.count("fold_norm_affine") == 1
    assert affine_free(fast) and count(fast, ops.mul) == 0
    exact(model, fast, x)


class ConvBNSSF(nn.Module):
    def __init__(self, shape=(8, 1, 1), affine=True):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8, affine=affine)
        self.scale = nn.Parameter(torch.randn(shape) * 0.3 + 1)
        self.shift = nn.Parameter(torch.randn(shape) * 0.3)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)) * self.scale + self.shift)


@pytest.mark.parametrize("affine", [True, False])
def test_ssf_after_batchnorm(affine):
    model = randomize_bn(ConvBNSSF(affine=affine)).eval()
    x = torch.randn(2, 3, 6, 6)
    fast = optimize(model, x, passes=[FOLD_SCALE_SHIFT])
    assert fast.report.count("fold_scale_shift") == 2, fast.report
    assert count(fast, ops.mul) == 0 and count(fast, ops.add) == 0 and count(fast, ops.batch_norm) == 1
    [bn] = norm_nodes(fast)
    assert list(fast.get_parameter(ops.arg(bn, "weight").target).shape) == [8]
    exact(model, fast, x)
    again(fast, x, [FOLD_SCALE_SHIFT], "fold_scale_shift")
    # and then the default BatchNorm folding takes the whole thing into the conv
    folded = optimize(model, x, passes=[FOLD_SCALE_SHIFT, "fold_batchnorm"])
    assert count(folded, ops.batch_norm) == 0
    exact(model, folded, x)


def test_ssf_over_a_non_channel_axis_is_skipped():
    # (5, 1): one scale per token, along axis 1 of (2, 5, 16): not the normalised axis
    model = randomise_norms(SSFBlock(nn.LayerNorm(16), shape=(5, 1))).eval()
    x = torch.randn(2, 5, 16)
    fast = optimize(model, x, passes=[FOLD_SCALE_SHIFT])
    assert fast.report.count("fold_scale_shift") == 0
    [s] = skipped(fast, "fold_scale_shift")  # the shift is not reached: the scale stays in between
    assert "scale of shape [5, 1] varies along axis 1 of the norm's output (rank 3), not only along the " \
           "normalised axis 2: it cannot become the norm's affine" in s.detail
    assert s.detail.endswith("the scale or shift stays after the norm")
    exact(model, fast, x)


def test_ssf_over_spatial_axis_after_batchnorm_is_skipped():
    model = randomize_bn(ConvBNSSF(shape=(6,))).eval()  # broadcasts along W, not the channels
    x = torch.randn(2, 3, 6, 6)
    fast = optimize(model, x, passes=[FOLD_SCALE_SHIFT])
    assert fast.report.count("fold_scale_shift") == 0
    [s] = skipped(fast, "fold_scale_shift")
    assert "scale of shape [6] varies along axis 3 of the norm's output (rank 4), not only along the " \
           "channel axis 1" in s.detail
    exact(model, fast, x)


def test_ssf_on_a_norm_read_elsewhere_is_skipped():
    class TwoReaders(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.scale = nn.LayerNorm(8), nn.Parameter(torch.randn(8))

        def forward(self, x):
            h = self.norm(x)
            return h * self.scale, h

    model, x = TwoReaders().eval(), torch.randn(3, 8)
    fast = optimize(model, x, passes=[FOLD_SCALE_SHIFT])
    assert fast.report.count("fold_scale_shift") == 0
    [s] = skipped(fast, "fold_scale_shift")
    assert "has 2 users; its value is needed elsewhere" in s.detail
    exact(model, fast, x)


def test_through_torch_compile_with_the_quantize_prep_preset():
    from fxrewrite.backend import REPORTS
    model = randomise_norms(QKV()).eval()
    x = torch.randn(2, 5, 16)
    REPORTS.clear()
    compiled = torch.compile(model, backend="rewrite", options={"passes": ["quantize_prep"], "compiler": "eager"})
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    assert sum(r.count("fold_norm_affine") for r in REPORTS) == 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_llama_folds_and_stays_as_close_to_float64(llama, dtype):
    """In 16-bit, transformers multiplies the norm weight after the cast back from float32; the
    five norms still fold. Each side rounds once in that dtype, so the folded model is as far from
    the float64 model as the original is (not bit-equal to it)."""
    model = copy.deepcopy(llama[0]).to(dtype)
    fast = optimize(model, llama[1], passes="quantize_prep")
    records = rewrote(fast, "fold_norm_affine")
    assert len(records) == 5 and all("(applied after a cast, mul" in r.detail for r in records)
    ref64 = copy.deepcopy(llama[0]).double()
    fresh = torch.randint(0, 64, (3, 11))
    with torch.no_grad():
        want = ref64(input_ids=fresh).logits
        scale = want.abs().max()
        err_model = ((model(input_ids=fresh).logits.double() - want).abs().max() / scale).item()
        err_fast = ((fast(input_ids=fresh).logits.double() - want).abs().max() / scale).item()
    assert err_fast <= 2 * err_model + 1e-3, (err_fast, err_model)
