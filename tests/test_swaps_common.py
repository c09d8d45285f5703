"""What every architecture swap promises, on real models built from configs (timm ViT / ConvNeXt /
ResNet, transformers BERT / GPT-2 / LLaMA): a report that names each replaced module with a
measured deviation that an independent run confirms; swapped models that export and round-trip
through state_dict; swaps are opt-in; a model without the op; bad arguments. Each swap's own
tests are in test_swap_smelu.py, test_swap_rmsnorm.py, test_swap_dyt.py and
test_swaps_prenorm.py."""
import warnings

import pytest
import torch
import torch.nn as nn

from fxrewrite import passes
from fxrewrite import calibrate, optimize, verify
from fxrewrite.rewrite.nn import DyT, GeneralizedSmeLU, SmeLU
from fxrewrite.passes.swaps import norm_to_dyt, relu_to_generalized_smelu, relu_to_smelu

from conftest import (ids, notes, randomise_norms, reported_deviation, rewrote, skipped, timm_model, tiny_bert,
                      tiny_gpt2, tiny_llama, tiny_vit, train_steps)

warnings.filterwarnings("ignore", message=".*specialized.*")

SWAPS = ("relu_to_smelu", "relu_to_generalized_smelu", "layernorm_to_rmsnorm", "norm_to_dyt", "prenorm_rmsnorm")


# ---------------------------------------------------------------- real models: report is the truth

def _vit():
    return randomise_norms(tiny_vit()), lambda: torch.randn(2, 3, 32, 32), nn.LayerNorm


def _convnext():
    return randomise_norms(timm_model("convnext_atto")), lambda: torch.randn(1, 3, 32, 32), nn.LayerNorm


def _bert():
    return randomise_norms(tiny_bert(hidden_act="relu"), "LayerNorm"), lambda: ids(2), nn.LayerNorm


def _gpt2():
    return randomise_norms(tiny_gpt2(), "ln"), lambda: ids(2), nn.LayerNorm


def _llama():
    m = tiny_llama()
    return randomise_norms(m), lambda: ids(2), type(m.norm)


CASES = [("vit", _vit, "layernorm_to_rmsnorm"), ("vit", _vit, "norm_to_dyt"),
         ("convnext", _convnext, "layernorm_to_rmsnorm"), ("convnext", _convnext, "norm_to_dyt"),
         ("bert", _bert, "relu_to_smelu"), ("bert", _bert, "layernorm_to_rmsnorm"), ("bert", _bert, "norm_to_dyt"),
         ("gpt2", _gpt2, "layernorm_to_rmsnorm"), ("gpt2", _gpt2, "norm_to_dyt"),
         ("llama", _llama, "norm_to_dyt")]


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
        layer = reported_deviation(r.detail)
        assert 0 < layer < float("inf"), r.detail
    [note] = notes(gm, swap)
    reported = reported_deviation(note, "model output deviation on the example inputs")
    measured = verify(model, gm, x, raise_on_fail=False).max_abs  # an independent run of both models
    assert reported > 0 and reported == pytest.approx(measured, rel=6e-3, abs=1e-6)  # printed to 3 digits
    assert not skipped(gm, swap)


# ---------------------------------------------------------------- ordinary modules: export, save

def test_swapped_gpt2_dyt_and_vit_rmsnorm_export_and_round_trip():
    torch.manual_seed(0)
    model, _, _ = _gpt2()
    x = ids()
    gm = optimize(model, x, passes=["norm_to_dyt"])
    ep = torch.export.export(gm, (), x)
    torch.testing.assert_close(ep.module()(**x)[0], gm(**x)[0], rtol=1e-5, atol=1e-5)
    state = {k: v + 0.01 for k, v in gm.state_dict().items() if "_dyt" in k}
    assert len(state) == 5 * 3  # alpha, weight, bias of each DyT
    gm.load_state_dict(state, strict=False)
    assert float(gm.get_submodule("h.0.ln_1_dyt").alpha) == pytest.approx(0.51)

    vit = randomise_norms(tiny_vit())
    xv = torch.randn(1, 3, 32, 32)
    gv = optimize(vit, xv, passes=["layernorm_to_rmsnorm"])
    rms = [m for m in gv.modules() if isinstance(m, nn.RMSNorm)]
    assert len(rms) == 5 and torch.equal(rms[0].weight, vit.blocks[0].norm1.weight)  # the weight is copied
    ep = torch.export.export(gv, (xv,))
    torch.testing.assert_close(ep.module()(xv), gv(xv), rtol=1e-5, atol=1e-5)
    assert train_steps(gv, xv)[-1] < train_steps(optimize(vit, xv, passes=["layernorm_to_rmsnorm"]), xv, 1)[0]


# ---------------------------------------------------------------- opt-in; nothing to swap; bad input

def test_swaps_are_opt_in():
    assert not set(SWAPS) & set(passes.DEFAULT)
    model, x = timm_model("resnet10t", num_classes=4), torch.randn(1, 3, 16, 16)
    gm = optimize(model, x)
    assert not any(isinstance(m, (SmeLU, GeneralizedSmeLU, DyT, nn.RMSNorm)) for m in gm.modules())
    assert not [r for r in gm.report.records if r.pass_name in SWAPS]
    verify(model, gm, x, rtol=1e-4, atol=1e-5)


def test_norm_swaps_on_a_model_without_norms():
    model, x = timm_model("resnet10t", num_classes=4), torch.randn(1, 3, 16, 16)
    gm = optimize(model, x, passes=["norm_to_dyt", "layernorm_to_rmsnorm", "prenorm_rmsnorm"])
    assert notes(gm, "norm_to_dyt") == ["nothing to swap: the graph has no aten.layer_norm/aten.rms_norm"]
    assert notes(gm, "layernorm_to_rmsnorm") == ["nothing to swap: the graph has no aten.layer_norm"]
    assert notes(gm, "prenorm_rmsnorm") == ["nothing to do: no LayerNorm in the graph"]
    verify(model, gm, x, rtol=0, atol=0)


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
    with pytest.raises(ValueError, match="none of the recorded swapped layers.*0: a Linear has no fit_to"):
        calibrate(gm, [torch.randn(2, 8)], norms={"0": model[1]})  # a module with nothing to fit
    with pytest.raises(ValueError, match="none of the recorded swapped layers"):
        calibrate(gm, [torch.randn(2, 8)], norms={"missing": model[1]})
