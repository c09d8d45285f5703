"""LayerNorm / RMSNorm -> DyT (passes.swaps.norm_to_dyt): what is swapped and reported, that the
swapped graph computes what the same model built by hand with DyT computes (timm ViT / ConvNeXt),
the alpha rules (attention, LLM), selection, and calibration on held-out data (ViT, ConvNeXt,
GPT-2, LLaMA); BERT / GPT-2 / LLaMA captured with torch.export."""
import re
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fxrewrite import calibrate, optimize
from fxrewrite.rewrite.nn import DyT
from fxrewrite.passes.swaps import feeds_attention, layernorm_to_rmsnorm, llm_alpha, norm_to_dyt

from conftest import (TinyBlock, ids, randomise_norms, replace_modules, rewrote, skipped, state_dict_round_trip,
                      timm_model, tiny_bert, tiny_gpt2, tiny_llama, tiny_vit)

warnings.filterwarnings("ignore", message=".*specialized.*")


class _DyTChannels(nn.Module):
    """DyT over dim 1 of an NCHW tensor: what a LayerNorm2d becomes."""

    def __init__(self, dyt):
        super().__init__()
        self.dyt = dyt

    def forward(self, x):
        return self.dyt(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def by_hand_dyt(model, alpha=0.5):
    """The same model with every LayerNorm module replaced by DyT(w, b, alpha), in eager mode
    (over the channels of an NCHW tensor for timm's LayerNorm2d)."""
    from timm.layers import LayerNorm2d

    def dyt(mod):
        d = DyT(mod.normalized_shape[0], alpha)
        with torch.no_grad():
            d.weight.copy_(mod.weight)
            d.bias.copy_(mod.bias)
        return _DyTChannels(d) if isinstance(mod, LayerNorm2d) else d
    return replace_modules(model, nn.LayerNorm, dyt)


def convnext():
    return randomise_norms(timm_model("convnext_atto"))


# ---------------------------------------------------------------- what is swapped, by hand

def test_vit_norm_to_dyt_reports_and_matches_by_hand_model():
    torch.manual_seed(0)
    model = randomise_norms(tiny_vit())
    x = torch.randn(2, 3, 32, 32)
    gm = optimize(model, x, passes=["norm_to_dyt"])
    recs = rewrote(gm, "norm_to_dyt")
    assert [r.detail.split(" -> ")[0] for r in recs] == ["blocks.0.norm1", "blocks.0.norm2", "blocks.1.norm1",
                                                         "blocks.1.norm2", "norm"]
    assert all("layer output deviation on the example inputs: max abs" in r.detail for r in recs)
    assert "blocks.0.norm1_dyt" in dict(gm.named_modules())
    torch.testing.assert_close(gm(x), by_hand_dyt(model)(x), rtol=1e-5, atol=1e-5)
    # ordinary modules: export and train
    ep = torch.export.export(gm, (x,))
    torch.testing.assert_close(ep.module()(x), gm(x), rtol=1e-5, atol=1e-5)
    gm.train()
    gm(x).sum().backward()
    assert gm.get_submodule("blocks.0.norm1_dyt").alpha.grad is not None


def test_convnext_layernorm2d_to_dyt():
    torch.manual_seed(0)
    model = timm_model("convnext_atto")
    x = torch.randn(1, 3, 32, 32)
    gm = optimize(model, x, passes=["norm_to_dyt"])
    n_ln = sum(isinstance(m, nn.LayerNorm) for m in model.modules())
    assert len(rewrote(gm, "norm_to_dyt")) == n_ln and n_ln > 0
    assert gm(x).shape == (1, 10)


def test_convnext_dyt_matches_by_hand():
    torch.manual_seed(0)
    model = convnext()
    x = torch.randn(1, 3, 32, 32)
    gm = optimize(model, x, passes=["norm_to_dyt"])
    torch.testing.assert_close(gm(x), by_hand_dyt(model)(x), rtol=1e-5, atol=1e-5)


def test_norm_over_several_dims_and_without_affine():
    torch.manual_seed(0)
    multi = nn.Sequential(nn.LayerNorm([4, 8]), nn.Flatten(), nn.Linear(32, 2)).eval()
    x = torch.randn(2, 4, 8)
    gm = optimize(multi, x, passes=["norm_to_dyt"])
    [s] = skipped(gm, "norm_to_dyt")
    assert "normalises over 2 dims [4, 8] jointly" in s.detail
    torch.testing.assert_close(gm(x), multi(x), rtol=0, atol=0)  # untouched
    gm = optimize(multi, x, passes=["layernorm_to_rmsnorm"])  # RMSNorm can normalise over several dims
    torch.testing.assert_close(gm(x), multi[2](F.rms_norm(x, (4, 8), multi[0].weight, 1e-5).flatten(1)),
                               rtol=1e-6, atol=1e-6)

    plain = TinyBlock(nn.LayerNorm(8, elementwise_affine=False)).eval()
    gm = optimize(plain, torch.randn(2, 8), passes=["norm_to_dyt"])
    [r] = rewrote(gm, "norm_to_dyt")
    assert "no affine parameters: weight 1, bias 0" in r.detail
    dyt = next(m for m in gm.modules() if isinstance(m, DyT))
    assert torch.equal(dyt.weight, torch.ones(8)) and torch.equal(dyt.bias, torch.zeros(8))


def test_bert_all_layernorms_to_dyt():
    torch.manual_seed(0)
    model = tiny_bert()
    gm = optimize(model, ids(), passes=["swap_dyt"])
    assert gm.report.count("norm_to_dyt") == 5
    out = gm(**ids())
    assert out[0].shape == (1, 8, 32)


# ---------------------------------------------------------------- alpha

def test_attention_alpha_rule_on_vit():
    model, x = tiny_vit(), torch.randn(1, 3, 32, 32)
    gm = optimize(model, x, passes=[norm_to_dyt(alpha=0.3, attention_alpha=0.9)])
    alphas = {n: float(m.alpha.detach()) for n, m in gm.named_modules() if isinstance(m, DyT)}
    assert alphas == pytest.approx({"blocks.0.norm1_dyt": 0.9, "blocks.0.norm2_dyt": 0.3, "blocks.1.norm1_dyt": 0.9,
                                    "blocks.1.norm2_dyt": 0.3, "norm_dyt": 0.3})
    assert llm_alpha(4096) == (0.8, 0.2) and llm_alpha(5120) == (0.6, 0.15) and llm_alpha(8192) == (0.2, 0.05)
    with pytest.raises(ValueError, match="alpha must be"):
        norm_to_dyt(alpha="big")


def test_feeds_attention_is_false_for_mlp_norm():
    from fxrewrite.rewrite.canonicalize import canonicalize
    from fxrewrite.rewrite.capture import capture
    from fxrewrite.rewrite.report import Report
    from fxrewrite.rewrite import ops
    gm = capture(tiny_vit(), torch.randn(1, 3, 32, 32), Report())
    canonicalize(gm, Report())
    lns = [n for n in gm.graph.nodes if n.target is ops.layer_norm]
    assert [feeds_attention(n) for n in lns] == [True, False, True, False, False]


def test_llama_dyt_llm_rule_and_calibration():
    torch.manual_seed(0)
    model = tiny_llama()
    gm = optimize(model, ids(), passes=["lift_norms", norm_to_dyt(alpha="llm")])
    alphas = {n: round(float(m.alpha.detach()), 3) for n, m in gm.named_modules() if isinstance(m, DyT)}
    assert alphas == {"layers.0.input_layernorm_dyt": 0.8, "layers.0.post_attention_layernorm_dyt": 0.2,
                      "layers.1.input_layernorm_dyt": 0.8, "layers.1.post_attention_layernorm_dyt": 0.2,
                      "norm_dyt": 0.2}
    assert all("layer output deviation" in r.detail for r in gm.report.records
               if r.pass_name == "norm_to_dyt" and r.action == "rewrote")
    result = calibrate(gm, [ids() for _ in range(3)], holdout=[ids() for _ in range(2)], reference=model)
    for row in result.layers:
        assert row.holdout_after < 0.6 * row.holdout_before, row
    assert result.output_after < result.output_before


# ---------------------------------------------------------------- selection

def test_selection_by_prefix_list_and_type_on_norms():
    model, x = tiny_vit(), torch.randn(1, 3, 32, 32)

    def swapped(only):
        gm = optimize(model, x, passes=[norm_to_dyt(only=only)])
        assert len(rewrote(gm, "norm_to_dyt")) + len(skipped(gm, "norm_to_dyt")) == 5
        return sorted(n for n, m in gm.named_modules() if isinstance(m, DyT))

    assert swapped("blocks.0") == ["blocks.0.norm1_dyt", "blocks.0.norm2_dyt"]  # a dotted prefix
    assert swapped("blocks.0.norm") == []  # a prefix is whole path components, not characters
    assert swapped([re.compile(r"norm2$"), "norm"]) == ["blocks.0.norm2_dyt", "blocks.1.norm2_dyt", "norm_dyt"]
    assert swapped(nn.RMSNorm) == []
    assert len(swapped(nn.LayerNorm)) == 5
    gm = optimize(model, x, passes=[layernorm_to_rmsnorm(only=re.compile(r"blocks\.1\."))])
    assert [r.detail.split(" -> ")[0] for r in rewrote(gm, "layernorm_to_rmsnorm")] == ["blocks.1.norm1",
                                                                                        "blocks.1.norm2"]


def test_gpt2_dyt_selected_by_type_and_regex_round_trip():
    torch.manual_seed(0)
    model = tiny_gpt2()
    x = ids()
    gm = optimize(model, x, passes=[norm_to_dyt(only=nn.LayerNorm)])  # export records the class by name
    assert gm.report.count("norm_to_dyt") == 5
    gm = optimize(model, x, passes=[norm_to_dyt(only=re.compile(r"ln_2$"))])
    assert gm.report.count("norm_to_dyt") == 2 and len(gm.report.skipped("norm_to_dyt")) == 3
    fresh = optimize(model, x, passes=[norm_to_dyt(only=re.compile(r"ln_2$"))])
    with torch.no_grad():
        fresh.get_submodule("h.0.ln_2_dyt").alpha.fill_(3.0)
    state_dict_round_trip(gm, fresh)
    torch.testing.assert_close(fresh(**x), gm(**x), rtol=0, atol=0)


# ---------------------------------------------------------------- calibration

def test_calibration_reduces_heldout_error_on_vit():
    torch.manual_seed(0)
    model = randomise_norms(tiny_vit())
    gm = optimize(model, torch.randn(1, 3, 32, 32), passes=["norm_to_dyt"])
    fit = [torch.randn(2, 3, 32, 32) for _ in range(3)]
    held = [torch.randn(2, 3, 32, 32) for _ in range(2)]
    result = calibrate(gm, fit, holdout=held, reference=model)
    assert len(result.layers) == 5
    for row in result.layers:
        assert row.holdout_after < 0.8 * row.holdout_before, row
        assert row.error_after <= row.error_before
    assert result.output_after < result.output_before
    assert "held-out" in str(result)
    # fitting the affine too can only do better than alpha alone (same inputs, more freedom)
    gm2 = optimize(model, torch.randn(1, 3, 32, 32), passes=["norm_to_dyt"])
    result2 = calibrate(gm2, fit, holdout=held, fit_affine=True, sequential=False)
    assert all(b.error_after <= a.error_after + 1e-9 for a, b in zip(result.layers[:1], result2.layers[:1]))


@pytest.mark.slow  # about 30 s: 17 layers fitted in sequence
def test_convnext_calibration_on_held_out():
    torch.manual_seed(0)
    model = convnext()
    gm = optimize(model, torch.randn(1, 3, 32, 32), passes=["norm_to_dyt"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fit = [torch.randn(2, 3, 32, 32) for _ in range(2)]
    held = [torch.randn(2, 3, 32, 32) for _ in range(2)]
    result = calibrate(gm, fit, holdout=held, reference=model, fit_affine=True, max_rows=2000)
    assert len(result.layers) == sum(isinstance(m, nn.LayerNorm) for m in model.modules())
    for r in result.layers:
        assert r.holdout_after < r.holdout_before, str(result)
        # stage 3 is 1x1 at this size and head.norm follows global pooling: 4 rows, too few for w, b
        assert ("alpha only" in r.note) == (r.rows < 64), str(result)
    assert result.layers[-1].name == "head.norm_dyt" and result.layers[-1].rows == 4
    assert result.output_after < result.output_before
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # reference only run


def test_gpt2_calibration_improves_held_out_and_output():
    torch.manual_seed(0)
    model = randomise_norms(tiny_gpt2(), "ln")
    gm = optimize(model, ids(), passes=["norm_to_dyt"])  # the graph is captured at batch 1
    result = calibrate(gm, [ids() for _ in range(3)], holdout=[ids() for _ in range(2)], reference=model,
                       sequential=False)
    assert [r.name for r in result.layers] == ["h.0.ln_1_dyt", "h.0.ln_2_dyt", "h.1.ln_1_dyt", "h.1.ln_2_dyt",
                                               "ln_f_dyt"]
    for r in result.layers:
        assert r.holdout_after < r.holdout_before and r.alpha_after != r.alpha_before, r
    assert result.output_after < result.output_before


def test_calibrate_bad_input():
    with pytest.raises(ValueError, match="no record of replaced norms"):
        calibrate(optimize(TinyBlock(nn.LayerNorm(8)).eval(), torch.randn(1, 8)), [torch.randn(1, 8)])
    with pytest.raises(ValueError, match="at least one batch"):
        calibrate(TinyBlock(nn.LayerNorm(8)), [])
