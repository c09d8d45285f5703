"""Architecture swaps, the remaining proof: every swap on real models built from configs (timm
ViT / ConvNeXt / ResNet, transformers BERT / GPT-2 / LLaMA) with a report that names each
replaced module and a measured deviation that an independent run confirms; swapped models that
train, round-trip through state_dict and export; calibration that helps on held-out data;
selection by type, name, prefix, regex and lists; and the bad inputs."""
import copy
import io
import re
import warnings

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from fxrewrite import passes
from fxrewrite import calibrate, optimize, verify
from fxrewrite.rewrite.nn import DyT, GeneralizedSmeLU, SmeLU
from fxrewrite.passes.swaps import layernorm_to_rmsnorm, norm_to_dyt, relu_to_generalized_smelu, relu_to_smelu

warnings.filterwarnings("ignore", message=".*specialized.*")
transformers = pytest.importorskip("transformers")

SWAPS = ("relu_to_smelu", "relu_to_generalized_smelu", "layernorm_to_rmsnorm", "norm_to_dyt", "prenorm_rmsnorm")


def rewrote(gm, name):
    return [r for r in gm.report.records if r.pass_name == name and r.action == "rewrote"]


def skipped(gm, name):
    return [r for r in gm.report.records if r.pass_name == name and r.action == "skipped"]


def notes(gm, name):
    return [r.detail for r in gm.report.records if r.pass_name == name and r.action == "note"]


def randomise(model, key, scale=0.3):
    """Non-trivial norm weights and biases, so that dropping them shows."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if key in name:
                p.add_(torch.randn_like(p) * scale)
    return model


def tiny_vit():
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2, embed_dim=32,
                             num_heads=2, num_classes=10).eval()


def ids():
    return {"input_ids": torch.randint(0, 100, (2, 8))}


# ---------------------------------------------------------------- real models: report is the truth

def _vit():
    return randomise(tiny_vit(), "norm"), lambda: torch.randn(2, 3, 32, 32), nn.LayerNorm


def _convnext():
    m = randomise(timm.create_model("convnext_atto", pretrained=False, num_classes=10).eval(), "norm")
    return m, lambda: torch.randn(1, 3, 32, 32), nn.LayerNorm


def _bert():
    cfg = transformers.BertConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                  vocab_size=100, hidden_act="relu")
    return randomise(transformers.BertModel(cfg).eval(), "LayerNorm"), ids, nn.LayerNorm


def _gpt2():
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=32)
    return randomise(transformers.GPT2Model(cfg).eval(), "ln"), ids, nn.LayerNorm


def _llama():
    cfg = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                   num_key_value_heads=2, vocab_size=100)
    m = transformers.LlamaModel(cfg).eval()
    return randomise(m, "norm"), ids, type(m.norm)


CASES = [("vit", _vit, "layernorm_to_rmsnorm"), ("vit", _vit, "norm_to_dyt"),
         ("convnext", _convnext, "layernorm_to_rmsnorm"), ("convnext", _convnext, "norm_to_dyt"),
         ("bert", _bert, "relu_to_smelu"), ("bert", _bert, "layernorm_to_rmsnorm"), ("bert", _bert, "norm_to_dyt"),
         ("gpt2", _gpt2, "layernorm_to_rmsnorm"), ("gpt2", _gpt2, "norm_to_dyt"),
         ("llama", _llama, "norm_to_dyt")]


def _model_value(detail, what):
    return float(re.search(what + r": max abs ([0-9.e+-]+|inf|nan)", detail)[1])


@pytest.mark.parametrize("label,build,swap", CASES, ids=[f"{c[0]}-{c[2]}" for c in CASES])
def test_real_model_report_lists_each_module_and_true_deviation(label, build, swap):
    torch.manual_seed(0)
    model, make_x, norm_cls = build()
    x = make_x()
    if isinstance(x, dict):
        x = {"input_ids": x["input_ids"][:1]}
    steps = ["lift_norms", swap] if label == "llama" else [swap]
    gm = optimize(model, x, passes=steps)
    if swap == "relu_to_smelu":
        expected = [f"encoder.layer.{i}.intermediate.intermediate_act_fn" for i in range(2)]
    else:
        expected = [n for n, m in model.named_modules() if isinstance(m, norm_cls)]
    recs = rewrote(gm, swap)
    assert [r.detail.split(" -> ")[0] for r in recs] == expected
    for r in recs:
        layer = _model_value(r.detail, "layer output deviation on the example inputs")
        assert 0 < layer < float("inf"), r.detail
    [note] = notes(gm, swap)
    reported = _model_value(note, "model output deviation on the example inputs")
    measured = verify(model, gm, x, raise_on_fail=False).max_abs  # an independent run of both models
    assert reported > 0 and reported == pytest.approx(measured, rel=6e-3, abs=1e-6)  # printed to 3 digits
    assert not skipped(gm, swap)


# ---------------------------------------------------------------- ReLU modules kept in place

def smelu_by_hand(model, beta):
    out = copy.deepcopy(model)
    for name, mod in list(out.named_modules()):
        if isinstance(mod, nn.ReLU):
            parent, _, leaf = name.rpartition(".")
            setattr(out.get_submodule(parent) if parent else out, leaf, SmeLU(beta))
    return out


def test_resnet_every_relu_swapped_including_in_place_ones():
    """timm's BasicBlock runs ReLU(inplace=True) on an Identity's output, which canonicalisation
    keeps in place; the swap must still see it (it used to miss 4 of 11 without a word)."""
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", pretrained=False, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    gm = optimize(model, x, passes=[relu_to_smelu(beta=0.5)])
    n_relu = sum(isinstance(m, nn.ReLU) for m in model.modules())
    assert len(rewrote(gm, "relu_to_smelu")) == n_relu == 11
    for r in rewrote(gm, "relu_to_smelu"):  # measured on the op's input before the op ran
        assert 0 < _model_value(r.detail, "layer output deviation on the example inputs") <= 0.5 / 4 + 1e-6
    torch.testing.assert_close(gm(x), smelu_by_hand(model, 0.5)(x), rtol=1e-5, atol=1e-5)


class ObservedInPlace(nn.Module):
    """An in-place ReLU on a view whose base is read afterwards: the mutation is visible."""

    def __init__(self):
        super().__init__()
        self.fc, self.act = nn.Linear(4, 4), nn.ReLU(inplace=True)

    def forward(self, x):
        a = self.fc(x)
        v = a.view(a.shape)
        self.act(v)
        return a * 2 + v


def test_in_place_relu_with_observed_mutation_is_skipped_with_reason():
    torch.manual_seed(0)
    model, x = ObservedInPlace().eval(), torch.randn(3, 4)
    gm = optimize(model, x, passes=["relu_to_smelu"], inplace=False)
    [s] = skipped(gm, "relu_to_smelu")
    assert "in-place ReLU whose mutation is observed" in s.detail
    verify(model, gm, x, rtol=0, atol=0)


# ---------------------------------------------------------------- ordinary modules: train, save, export

def _train_steps(model, x, steps=5):
    torch.manual_seed(1)
    target = torch.randn_like(model(x))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        loss = F.mse_loss(model(x), target)
        loss.backward()
        opt.step()
        losses.append(float(loss))
    return losses


def resnet_like():
    """timm's BasicBlock pattern in small: BN -> Identity -> ReLU(inplace=True), which stays in place."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Identity(), nn.ReLU(inplace=True),
                         nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 4)).eval()


@pytest.mark.parametrize("swap", [relu_to_generalized_smelu(0.3, 0.6, 0.05, 1.0, learnable=True),
                                  relu_to_smelu(learnable=True)], ids=["gsmelu", "smelu"])
def test_swapped_cnn_trains_round_trips_and_exports(swap):
    torch.manual_seed(0)
    model, x = resnet_like(), torch.randn(2, 3, 8, 8)
    gm = optimize(model, x, passes=[swap])
    assert len(rewrote(gm, swap.name)) == 2
    losses = _train_steps(gm, x)
    assert losses[-1] < losses[0]
    act = next(m for m in gm.modules() if isinstance(m, (SmeLU, GeneralizedSmeLU)))
    assert float(act.beta) != pytest.approx(0.6 if isinstance(act, GeneralizedSmeLU) else 1.0)  # beta learned
    gm.eval()
    buf = io.BytesIO()
    torch.save(gm.state_dict(), buf)
    buf.seek(0)
    fresh = optimize(model, x, passes=[swap])
    fresh.load_state_dict(torch.load(buf))
    torch.testing.assert_close(fresh(x), gm(x), rtol=0, atol=0)
    ep = torch.export.export(gm, (x,))
    torch.testing.assert_close(ep.module()(x), gm(x), rtol=1e-5, atol=1e-5)


def test_swapped_gpt2_dyt_and_vit_rmsnorm_export_and_round_trip():
    torch.manual_seed(0)
    model, _, _ = _gpt2()
    x = {"input_ids": torch.randint(0, 100, (1, 8))}
    gm = optimize(model, x, passes=["norm_to_dyt"])
    ep = torch.export.export(gm, (), x)
    torch.testing.assert_close(ep.module()(**x)[0], gm(**x)[0], rtol=1e-5, atol=1e-5)
    state = {k: v + 0.01 for k, v in gm.state_dict().items() if "_dyt" in k}
    assert len(state) == 5 * 3  # alpha, weight, bias of each DyT
    gm.load_state_dict(state, strict=False)
    assert float(gm.get_submodule("h.0.ln_1_dyt").alpha) == pytest.approx(0.51)

    vit = randomise(tiny_vit(), "norm")
    xv = torch.randn(1, 3, 32, 32)
    gv = optimize(vit, xv, passes=["layernorm_to_rmsnorm"])
    rms = [m for m in gv.modules() if isinstance(m, nn.RMSNorm)]
    assert len(rms) == 5 and torch.equal(rms[0].weight, vit.blocks[0].norm1.weight)  # the weight is copied
    ep = torch.export.export(gv, (xv,))
    torch.testing.assert_close(ep.module()(xv), gv(xv), rtol=1e-5, atol=1e-5)
    assert _train_steps(gv, xv)[-1] < _train_steps(optimize(vit, xv, passes=["layernorm_to_rmsnorm"]), xv, 1)[0]


# ---------------------------------------------------------------- DyT on ConvNeXt, by hand; calibration

class _DyTChannels(nn.Module):
    """DyT over dim 1 of an NCHW tensor: what a LayerNorm2d becomes."""

    def __init__(self, dyt):
        super().__init__()
        self.dyt = dyt

    def forward(self, x):
        return self.dyt(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def test_convnext_dyt_matches_by_hand():
    from timm.layers import LayerNorm2d
    torch.manual_seed(0)
    model, make_x, _ = _convnext()
    x = make_x()
    gm = optimize(model, x, passes=["norm_to_dyt"])
    by_hand = copy.deepcopy(model)
    for name, mod in list(by_hand.named_modules()):
        if isinstance(mod, nn.LayerNorm):
            d = DyT(mod.normalized_shape[0], 0.5)
            with torch.no_grad():
                d.weight.copy_(mod.weight)
                d.bias.copy_(mod.bias)
            parent, _, leaf = name.rpartition(".")
            setattr(by_hand.get_submodule(parent), leaf, _DyTChannels(d) if isinstance(mod, LayerNorm2d) else d)
    torch.testing.assert_close(gm(x), by_hand(x), rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # about 30 s: 17 layers fitted in sequence
def test_convnext_calibration_on_held_out():
    torch.manual_seed(0)
    model, make_x, _ = _convnext()
    gm = optimize(model, make_x(), passes=["norm_to_dyt"])
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
    model, _, _ = _gpt2()
    gm = optimize(model, {"input_ids": torch.randint(0, 100, (1, 8))}, passes=["norm_to_dyt"])
    one = lambda: {"input_ids": torch.randint(0, 100, (1, 8))}  # noqa: E731 (the graph was captured at batch 1)
    result = calibrate(gm, [one() for _ in range(3)], holdout=[one() for _ in range(2)], reference=model,
                       sequential=False)
    assert [r.name for r in result.layers] == ["h.0.ln_1_dyt", "h.0.ln_2_dyt", "h.1.ln_1_dyt", "h.1.ln_2_dyt",
                                               "ln_f_dyt"]
    for r in result.layers:
        assert r.holdout_after < r.holdout_before and r.alpha_after != r.alpha_before, r
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


def test_selection_of_in_place_relu_modules_by_name_and_type():
    model, x = timm.create_model("resnet10t", pretrained=False, num_classes=4).eval(), torch.randn(1, 3, 16, 16)
    gm = optimize(model, x, passes=[relu_to_smelu(only="layer1")])
    assert [r.detail.split(" -> ")[0] for r in rewrote(gm, "relu_to_smelu")] == ["layer1.0.act1", "layer1.0.act2"]
    gm = optimize(model, x, passes=[relu_to_smelu(only=nn.ReLU)])
    assert len(rewrote(gm, "relu_to_smelu")) == 11


def test_swaps_are_opt_in():
    assert not set(SWAPS) & set(passes.DEFAULT)
    model, x = timm.create_model("resnet10t", pretrained=False, num_classes=4).eval(), torch.randn(1, 3, 16, 16)
    gm = optimize(model, x)
    assert not any(isinstance(m, (SmeLU, GeneralizedSmeLU, DyT, nn.RMSNorm)) for m in gm.modules())
    assert not [r for r in gm.report.records if r.pass_name in SWAPS]
    verify(model, gm, x, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- bad input

def test_norm_swaps_on_a_model_without_norms():
    model, x = timm.create_model("resnet10t", pretrained=False, num_classes=4).eval(), torch.randn(1, 3, 16, 16)
    gm = optimize(model, x, passes=["norm_to_dyt", "layernorm_to_rmsnorm", "prenorm_rmsnorm"])
    assert notes(gm, "norm_to_dyt") == ["nothing to swap: the graph has no aten.layer_norm/aten.rms_norm"]
    assert notes(gm, "layernorm_to_rmsnorm") == ["nothing to swap: the graph has no aten.layer_norm"]
    assert notes(gm, "prenorm_rmsnorm") == ["nothing to do: no LayerNorm in the graph"]
    verify(model, gm, x, rtol=0, atol=0)


def test_layernorm_without_affine_to_rmsnorm():
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8, elementwise_affine=False)).eval()
    x = torch.randn(3, 8) + 1
    gm = optimize(model, x, passes=["layernorm_to_rmsnorm"])
    [r] = rewrote(gm, "layernorm_to_rmsnorm")
    assert "had no weight: RMSNorm without one" in r.detail and "the bias" not in r.detail
    torch.testing.assert_close(gm(x), F.rms_norm(model[0](x), (8,), None, 1e-5), rtol=1e-6, atol=1e-6)


def test_bad_arguments_are_refused_early():
    with pytest.raises(ValueError, match="alpha must be > 0"):
        norm_to_dyt(alpha=0.0)
    with pytest.raises(ValueError, match="attention_alpha must be > 0"):
        norm_to_dyt(attention_alpha=-1)
    with pytest.raises(ValueError, match="beta > 0"):
        relu_to_smelu(beta=-1)
    with pytest.raises(ValueError, match="alpha, beta >= 0"):
        relu_to_generalized_smelu(alpha=-0.5)
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8)).eval()
    gm = optimize(model, torch.randn(2, 8), passes=["norm_to_dyt"])
    with pytest.raises(TypeError, match="not a DyT"):
        calibrate(gm, [torch.randn(2, 8)], norms={"0": model[1]})
    with pytest.raises(ValueError, match="none of the recorded DyT layers"):
        calibrate(gm, [torch.randn(2, 8)], norms={"missing": model[1]})


def test_fixed_parameters_are_buffers():
    """learnable=False: the parameters are saved with the model but never trained."""
    assert not list(SmeLU(0.5).parameters()) and "beta" in SmeLU(0.5).state_dict()
    g = GeneralizedSmeLU(0.3, 0.6, 0.1, 0.9)
    assert not list(g.parameters()) and set(g.state_dict()) == {"alpha", "beta", "g_left", "g_right"}
    assert len(list(GeneralizedSmeLU(0.3, 0.6, 0.1, 0.9, learnable=True).parameters())) == 4
