"""Architecture swaps (passes.swaps): what is swapped, what is reported, and that the swapped
graph computes exactly what the report says (compared with the same model built by hand with
the new modules), on toy models and timm ViT / ConvNeXt."""
import copy
import io
import re

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from fxrewrite import calibrate, optimize
from fxrewrite.rewrite.nn import DyT, GeneralizedSmeLU, SmeLU
from fxrewrite.passes.swaps import (feeds_attention, layernorm_to_rmsnorm, llm_alpha, norm_to_dyt, relu_to_generalized_smelu,
                          relu_to_smelu)


class SmallCNN(nn.Module):
    def __init__(self, act=nn.ReLU):
        super().__init__()
        self.conv1, self.act1 = nn.Conv2d(3, 8, 3, padding=1), act()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)
        self.functional = act is nn.ReLU

    def forward(self, x):
        x = self.act1(self.conv1(x))
        x = self.conv2(x)
        x = F.relu(x) if self.functional else self.act1(x)
        return self.fc(x.mean((2, 3)))


class TinyBlock(nn.Module):
    def __init__(self, norm):
        super().__init__()
        self.norm, self.fc = norm, nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(self.norm(x))


def tiny_vit():
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2, embed_dim=32,
                             num_heads=2, num_classes=10).eval()


def randomise_norms(model, scale=0.3):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * scale)
    return model


def rewrote(gm, pass_name):
    return [r for r in gm.report.records if r.pass_name == pass_name and r.action == "rewrote"]


def skipped(gm, pass_name):
    return [r for r in gm.report.records if r.pass_name == pass_name and r.action == "skipped"]


# ---------------------------------------------------------------- ReLU -> SmeLU

def test_relu_to_smelu_matches_model_built_with_smelu():
    torch.manual_seed(0)
    model = SmallCNN().eval()
    x = torch.randn(2, 3, 16, 16)
    gm = optimize(model, x, passes=[relu_to_smelu(beta=0.5)])
    assert len(rewrote(gm, "relu_to_smelu")) == 2  # the nn.ReLU module and the F.relu call
    assert sum(isinstance(m, SmeLU) for m in gm.modules()) == 2
    for r in rewrote(gm, "relu_to_smelu"):
        dev = float(re.search(r"layer output deviation on the example inputs: max abs ([0-9.e+-]+)", r.detail)[1])
        assert 0 < dev <= 0.5 / 4 + 1e-7  # SmeLU differs from ReLU by at most beta / 4
    by_hand = SmallCNN(act=lambda: SmeLU(0.5)).eval()
    by_hand.load_state_dict(model.state_dict(), strict=False)
    torch.testing.assert_close(gm(x), by_hand(x), rtol=1e-6, atol=1e-6)
    assert any(r.action == "note" and "model output deviation" in r.detail for r in gm.report.records)
    assert isinstance(model.act1, nn.ReLU)  # the user's model is untouched


def test_relu_swap_selection_by_type_name_and_regex():
    torch.manual_seed(0)
    model, x = SmallCNN().eval(), torch.randn(1, 3, 8, 8)
    by_type = optimize(model, x, passes=[relu_to_smelu(only=nn.ReLU)])
    assert len(rewrote(by_type, "relu_to_smelu")) == 1  # F.relu does not come from an nn.ReLU
    [skip] = skipped(by_type, "relu_to_smelu")
    assert "not selected by only=ReLU" in skip.detail
    by_name = optimize(model, x, passes=[relu_to_smelu(only="act1")])
    assert len(rewrote(by_name, "relu_to_smelu")) == 1
    by_regex = optimize(model, x, passes=[relu_to_smelu(only=re.compile("nothing"))])
    assert len(rewrote(by_regex, "relu_to_smelu")) == 0 and len(skipped(by_regex, "relu_to_smelu")) == 2
    with pytest.raises(TypeError, match="only="):
        relu_to_smelu(only=3)


def test_swap_on_model_without_the_op_says_so():
    model, x = TinyBlock(nn.LayerNorm(8)).eval(), torch.randn(2, 8)
    gm = optimize(model, x, passes=["relu_to_smelu"])
    [note] = [r for r in gm.report.records if r.pass_name == "relu_to_smelu"]
    assert note.action == "note" and "nothing to swap" in note.detail
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)


def test_generalized_smelu_swap_trains_and_round_trips():
    torch.manual_seed(0)
    model, x = SmallCNN().eval(), torch.randn(2, 3, 8, 8)
    p = relu_to_generalized_smelu(alpha=0.3, beta=0.6, g_left=0.05, g_right=1.0, learnable=True)
    gm = optimize(model, x, passes=[p])
    mods = [m for m in gm.modules() if isinstance(m, GeneralizedSmeLU)]
    assert len(mods) == 2
    gm.train()
    gm(x).square().mean().backward()
    assert all(m.beta.grad is not None and m.g_left.grad is not None for m in mods)
    buf = io.BytesIO()
    torch.save(gm.state_dict(), buf)
    buf.seek(0)
    fresh = optimize(model, x, passes=[p])
    fresh.load_state_dict(torch.load(buf))
    torch.testing.assert_close(fresh(x), gm(x), rtol=0, atol=0)


# ---------------------------------------------------------------- LayerNorm -> RMSNorm

@pytest.mark.parametrize("keep_bias", [False, True])
def test_layernorm_to_rmsnorm_is_rmsnorm_with_the_weight(keep_bias):
    torch.manual_seed(0)
    model = randomise_norms(TinyBlock(nn.LayerNorm(8)).eval())
    x = torch.randn(3, 8) + 2.0  # a non-zero mean: the swap is visible
    gm = optimize(model, x, passes=[layernorm_to_rmsnorm(keep_bias=keep_bias)])
    [r] = rewrote(gm, "layernorm_to_rmsnorm")
    assert "dropped: the mean subtraction" in r.detail
    assert ("the bias" in r.detail) != keep_bias
    assert any(isinstance(m, nn.RMSNorm) for m in gm.modules())
    ln = model.norm
    expected = F.rms_norm(x, (8,), ln.weight, ln.eps) + (ln.bias if keep_bias else 0)
    torch.testing.assert_close(gm(x), model.fc(expected), rtol=1e-6, atol=1e-6)


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


# ---------------------------------------------------------------- DyT on timm models

def by_hand_dyt(model, alpha=0.5):
    """The same model with every LayerNorm module replaced by DyT(w, b, alpha), in eager mode."""
    out = copy.deepcopy(model)
    for name, mod in list(out.named_modules()):
        if isinstance(mod, nn.LayerNorm):
            d = DyT(mod.normalized_shape[0], alpha)
            with torch.no_grad():
                d.weight.copy_(mod.weight)
                d.bias.copy_(mod.bias)
            parent, _, leaf = name.rpartition(".")
            setattr(out.get_submodule(parent) if parent else out, leaf, d)
    return out


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


def test_calibrate_bad_input():
    with pytest.raises(ValueError, match="no record of replaced norms"):
        calibrate(optimize(TinyBlock(nn.LayerNorm(8)).eval(), torch.randn(1, 8)), [torch.randn(1, 8)])
    with pytest.raises(ValueError, match="at least one batch"):
        calibrate(TinyBlock(nn.LayerNorm(8)), [])


def test_convnext_layernorm2d_to_dyt():
    torch.manual_seed(0)
    model = timm.create_model("convnext_atto", pretrained=False, num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    gm = optimize(model, x, passes=["norm_to_dyt"])
    n_ln = sum(isinstance(m, nn.LayerNorm) for m in model.modules())
    assert len(rewrote(gm, "norm_to_dyt")) == n_ln and n_ln > 0
    assert gm(x).shape == (1, 10)
