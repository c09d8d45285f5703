"""LayerNorm / RMSNorm -> ELN (passes.swaps_norm.norm_to_eln, rewrite.nn.ELN): the formula at known
points and its extremes, what is swapped and reported (timm ViT, GPT-2, LLaMA), that the swapped
graph computes what the model built by hand with ELN computes, training, state_dict, ONNX, and
ELN against DyT right after the swap and after calibration."""
import math
import warnings

import onnx
import pytest
import torch
import torch.nn as nn

from fxrewrite import calibrate, check_onnx, export_onnx, optimize
from fxrewrite import onnx_export
from fxrewrite.passes import REGISTRY
from fxrewrite.passes.swaps_norm import norm_to_eln
from fxrewrite.rewrite.nn import ELN, eln

from conftest import (TinyBlock, ids, randomise_norms, replace_modules, reported_deviation, rewrote, skipped,
                      state_dict_round_trip, tiny_gpt2, tiny_llama, tiny_vit, train_steps)

warnings.filterwarnings("ignore", message=".*specialized.*")


# ---------------------------------------------------------------- the formula

def test_eln_formula_by_hand_on_a_row():
    torch.manual_seed(0)
    c, beta = 6, 2.5
    m = ELN(c, beta)
    with torch.no_grad():
        m.weight.copy_(torch.tensor([1.0, 2.0, 0.5, -1.0, 1.5, 3.0]))
        m.bias.copy_(torch.tensor([0.0, 0.1, -0.2, 0.3, 0.0, 1.0]))
    x = torch.tensor([0.0, 1.0, -2.0, 0.5, 10.0, -3.0], dtype=torch.float64)
    by_hand = [math.sqrt(c - 1) * v / math.sqrt(beta + v * v) * w + b
               for v, w, b in zip(x.tolist(), m.weight.tolist(), m.bias.tolist())]
    torch.testing.assert_close(m.double()(x), torch.tensor(by_hand, dtype=torch.float64), rtol=1e-14, atol=1e-14)
    assert float(m(x)[0].detach()) == float(m.bias[0].detach())  # ELN(0) = b
    # the functional form is the module's formula
    torch.testing.assert_close(eln(x, m.beta, m.weight, m.bias, c), m(x), rtol=0, atol=0)


def test_eln_extremes_slope_and_layernorm_limit():
    c, beta = 50, 4.0
    m = ELN(c, beta, bias=False).double()

    def f(x):  # ELN with weight 1, on values of any shape
        return eln(x, torch.tensor(beta, dtype=torch.float64), torch.ones(1, dtype=torch.float64), None, c)

    big = torch.tensor([1e9, -1e9, 1e3], dtype=torch.float64)
    top = math.sqrt(c - 1)  # 7 for C = 50, the paper's Figure 1
    y = f(big)
    assert y[0] == pytest.approx(top, rel=1e-12) and y[1] == pytest.approx(-top, rel=1e-12)
    assert float(y[2]) == pytest.approx(top * (1 - beta / (2 * 1e6)), rel=1e-9)  # the slow approach
    xs = torch.linspace(-1e4, 1e4, 20001, dtype=torch.float64)
    assert float(f(xs).abs().max()) < top  # never beyond the bound
    # slope at 0 is sqrt((C - 1) / beta); with beta = (C - 1) sigma^2 it is LayerNorm's 1 / sigma
    x0 = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    f(x0).sum().backward()
    assert float(x0.grad) == pytest.approx(math.sqrt((c - 1) / beta), rel=1e-12)
    sigma = 0.7
    assert math.sqrt((c - 1) / ELN(c, (c - 1) * sigma ** 2).beta.item()) == pytest.approx(1 / sigma, rel=1e-6)
    # LayerNorm's largest possible output: one outlier in a row of zeros gives +-sqrt(C - 1), ELN's bound
    row = torch.zeros(c, dtype=torch.float64)
    row[0] = 1e6
    ln = nn.functional.layer_norm(row, (c,), eps=0.0)
    assert float(ln[0]) == pytest.approx(top, rel=1e-12)
    with torch.no_grad():
        assert float(m(row)[0]) == pytest.approx(top, rel=1e-9) and float(m(-row)[0]) == pytest.approx(-top, rel=1e-9)


def test_eln_validation_and_registry():
    assert "norm_to_eln" in REGISTRY
    with pytest.raises(ValueError, match="beta > 0"):
        ELN(8, 0.0)
    with pytest.raises(ValueError, match="at least 2 channels"):
        ELN(1)
    with pytest.raises(ValueError, match="beta must be"):
        norm_to_eln(beta=-1.0)
    with pytest.raises(ValueError, match="norms must be"):
        norm_to_eln(norms=("batch_norm",))
    assert ELN(33).beta.item() == 32.0  # default: C - 1, unit-variance inputs


# ---------------------------------------------------------------- what is swapped

def by_hand_eln(model, beta):
    def make(mod):
        e = ELN(mod.normalized_shape[0], beta)
        with torch.no_grad():
            e.weight.copy_(mod.weight)
            e.bias.copy_(mod.bias)
        return e
    return replace_modules(model, nn.LayerNorm, make)


def test_vit_norm_to_eln_reports_records_and_matches_by_hand_model():
    torch.manual_seed(0)
    model = randomise_norms(tiny_vit())
    x = torch.randn(2, 3, 32, 32)
    gm = optimize(model, x, passes=["norm_to_eln"])
    recs = rewrote(gm, "norm_to_eln")
    assert [r.detail.split(" -> ")[0] for r in recs] == ["blocks.0.norm1", "blocks.0.norm2", "blocks.1.norm1",
                                                         "blocks.1.norm2", "norm"]
    assert all("(C - 1) sigma^2" in r.detail and reported_deviation(r.detail) > 0 for r in recs)
    refs = gm.meta["swapped_norms"]
    assert sorted(refs) == sorted(n for n, m in gm.named_modules() if isinstance(m, ELN))
    assert isinstance(refs["blocks.0.norm1_eln"], nn.LayerNorm)
    torch.testing.assert_close(refs["blocks.0.norm1_eln"].weight, model.blocks[0].norm1.weight)
    # beta0 = (C - 1) * (mean row variance of the norm's input + eps), measured on the example inputs
    seen = {}
    h = model.blocks[0].norm1.register_forward_pre_hook(lambda mod, a: seen.setdefault("x", a[0].detach()))
    model(x)
    h.remove()
    s2 = float(seen["x"].double().var(-1, unbiased=False).mean()) + 1e-6
    assert float(gm.get_submodule("blocks.0.norm1_eln").beta.detach()) == pytest.approx(31 * s2, rel=1e-5)
    # with a given beta0 the graph is the model built by hand with ELN
    gm5 = optimize(model, x, passes=[norm_to_eln(beta=5.0)])
    hand = by_hand_eln(model, 5.0)
    torch.testing.assert_close(gm5(x), hand(x), rtol=1e-5, atol=1e-5)
    # capture keeps ELN as one module call (a leaf), so a model built with it optimizes as itself
    again = optimize(hand, x)
    assert sum(n.op == "call_module" and isinstance(again.get_submodule(n.target), ELN)
               for n in again.graph.nodes) == 5
    torch.testing.assert_close(again(x), hand(x), rtol=1e-5, atol=1e-5)


def test_gpt2_and_llama_swap_counts():
    torch.manual_seed(0)
    gm = optimize(tiny_gpt2(), ids(), passes=["norm_to_eln"])
    assert len(rewrote(gm, "norm_to_eln")) == 5
    assert all("ELN from LayerNorm" in r.detail for r in rewrote(gm, "norm_to_eln"))
    llama = tiny_llama()
    gm = optimize(llama, ids(), passes=["lift_norms", "norm_to_eln"])
    recs = rewrote(gm, "norm_to_eln")
    assert len(recs) == 5 and all("ELN from RMSNorm" in r.detail for r in recs)
    assert all(isinstance(r, nn.RMSNorm) for r in gm.meta["swapped_norms"].values())
    assert gm(**ids())[0].shape == (1, 8, 32)


def test_norm_over_several_dims_or_one_channel_is_skipped():
    multi = nn.Sequential(nn.LayerNorm([4, 8]), nn.Flatten(), nn.Linear(32, 2)).eval()
    gm = optimize(multi, torch.randn(2, 4, 8), passes=["norm_to_eln"])
    [s] = skipped(gm, "norm_to_eln")
    assert "normalises over 2 dims [4, 8] jointly" in s.detail
    one = nn.Sequential(nn.Linear(4, 1), nn.LayerNorm(1)).eval()
    gm = optimize(one, torch.randn(2, 4), passes=["norm_to_eln"])
    [s] = skipped(gm, "norm_to_eln")
    assert "over 1 channel" in s.detail
    plain = TinyBlock(nn.LayerNorm(8, elementwise_affine=False)).eval()
    gm = optimize(plain, torch.randn(2, 8), passes=["norm_to_eln"])
    [r] = rewrote(gm, "norm_to_eln")
    assert "no affine parameters: weight 1, bias 0" in r.detail


# ---------------------------------------------------------------- training, saving, ONNX

def test_swapped_vit_trains_round_trips_and_exports(tmp_path):
    torch.manual_seed(0)
    model = randomise_norms(tiny_vit())
    x = torch.randn(2, 3, 32, 32)
    gm = optimize(model, x, passes=["norm_to_eln"])
    e = gm.get_submodule("blocks.0.norm1_eln")
    beta0 = float(e.beta.detach())
    gm.train()
    gm(x).square().mean().backward()
    assert e.beta.grad is not None and e.beta.grad.abs() > 0 and e.weight.grad.abs().sum() > 0
    gm.zero_grad()
    losses = train_steps(gm, x)
    assert losses[-1] < losses[0]
    assert float(e.beta.detach()) != beta0  # beta learned
    gm.eval()
    fresh = state_dict_round_trip(gm, optimize(model, x, passes=["norm_to_eln"]))
    torch.testing.assert_close(fresh(x), gm(x), rtol=0, atol=0)
    path = tmp_path / "vit_eln.onnx"
    info = export_onnx(gm, x, path)
    assert {n.domain for n in onnx.load(path).graph.node} <= onnx_export.STANDARD_DOMAINS
    assert "LayerNormalization" not in info.op_counts and "Sqrt" in info.op_counts  # ELN as elementwise ops
    for batch in (2, 3):
        result = check_onnx(gm, path, torch.randn(batch, 3, 32, 32))
        assert result.passed, str(result)


# ---------------------------------------------------------------- ELN vs DyT

def _compare(model, inputs, fit, held, lift=False):
    """Per-layer relative error E (held-out) right after the swap and after calibration, and the
    model output deviation, for DyT (alpha0 = 0.5) and ELN (beta0 from the data)."""
    out = {}
    for name in ("norm_to_dyt", "norm_to_eln"):
        gm = optimize(model, inputs, passes=(["lift_norms"] if lift else []) + [name])
        rep = calibrate(gm, fit, holdout=held, reference=model)
        out[name] = rep
        for r in rep.layers:
            assert r.error_after <= r.error_before, str(rep)  # calibration never makes the fit worse
    return out


def _summary(label, out):
    lines = [f"ELN vs DyT on {label}: mean per-layer held-out E, after swap -> after calibration; "
             f"model output max rel deviation before -> after"]
    for name, rep in out.items():
        n = len(rep.layers)
        hb = sum(r.holdout_before for r in rep.layers) / n
        ha = sum(r.holdout_after for r in rep.layers) / n
        lines.append(f"  {name}: E {hb:.4f} -> {ha:.4f}; output {rep.output_before:.4f} -> {rep.output_after:.4f}")
        lines += [f"    {r.name}: {r.params()}, E {r.holdout_before:.4f} -> {r.holdout_after:.4f}" for r in rep.layers]
    return "\n".join(lines)


def test_eln_vs_dyt_on_gpt2():
    torch.manual_seed(0)
    model = randomise_norms(tiny_gpt2(), "ln")
    fit, held = [ids() for _ in range(3)], [ids() for _ in range(2)]
    out = _compare(model, ids(), fit, held)
    print("\n" + _summary("tiny GPT-2 (2 layers, width 32, random weights, LayerNorm w/b randomised)", out))
    dyt, eln_ = out["norm_to_dyt"], out["norm_to_eln"]
    assert len(dyt.layers) == len(eln_.layers) == 5
    for r in dyt.layers + eln_.layers:
        assert r.holdout_after <= r.holdout_before * 1.05, r  # the fit generalises to held-out inputs
    # right after the swap ELN, with beta0 from the data, is closer to the norms than DyT with alpha0 = 0.5
    assert sum(r.holdout_before for r in eln_.layers) < sum(r.holdout_before for r in dyt.layers)


def test_eln_vs_dyt_on_llama():
    torch.manual_seed(0)
    model = tiny_llama()
    fit, held = [ids() for _ in range(3)], [ids() for _ in range(2)]
    out = _compare(model, ids(), fit, held, lift=True)
    print("\n" + _summary("tiny LLaMA (2 layers, width 32, random weights, RMSNorm)", out))
    assert len(out["norm_to_dyt"].layers) == len(out["norm_to_eln"].layers) == 5
    for rep in out.values():
        assert rep.output_after <= rep.output_before
