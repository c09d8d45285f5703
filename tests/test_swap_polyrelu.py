"""ReLU -> PolyReLU (passes.swaps_activation.relu_to_poly, "relu_to_poly"): the formula and its
channel layout, the least-squares fit (`PolyReLU.fit_to`), what is swapped on real CNNs
(torchvision ResNet-18, timm resnet10t with in-place ReLUs), what is reported, in-place ReLUs
whose mutation is observed, training, state_dict, ONNX export and calibration."""
import numpy as np
import pytest
import torch
import torch.nn as nn

from fxrewrite import calibrate, check_onnx, export_onnx, optimize, verify
from fxrewrite.passes import REGISTRY
from fxrewrite.passes.swaps_activation import relu_to_poly
from fxrewrite.rewrite.activations import PolyReLU, fit_quadratic

from conftest import notes, replace_modules, reported_deviation, rewrote, skipped, state_dict_round_trip, \
    timm_model, train_steps


def fit_error(detail):
    import re
    return float(re.search(r"fit error on the recorded inputs \(relative\) ([0-9.e+-]+)", detail)[1])


def coefficients(p, ch=0):
    """[a, b, c] of channel `ch` of a PolyReLU, as floats."""
    return [float(v.detach()[ch]) for v in (p.a, p.b, p.c)]


def resnet_like():
    """timm's BasicBlock pattern in small: BN -> Identity -> ReLU(inplace=True), which stays in place."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Identity(), nn.ReLU(inplace=True),
                         nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 4)).eval()


# ---------------------------------------------------------------- formula and layout

def test_poly_relu_formula_and_channel_layout():
    p = PolyReLU()
    with torch.no_grad():
        p.a.fill_(1.0), p.b.fill_(2.0), p.c.fill_(3.0)
    torch.testing.assert_close(p(torch.tensor([-1.0, 0.0, 2.0])), torch.tensor([2.0, 3.0, 11.0]))
    # per channel: dim 1 of NCHW, the last dim of (..., features)
    conv = PolyReLU(3, channel_dim=-3)
    feat = PolyReLU(3, channel_dim=-1)
    with torch.no_grad():
        for m in (conv, feat):
            m.a.copy_(torch.tensor([1.0, 0.0, -1.0]))
            m.b.copy_(torch.tensor([0.0, 1.0, 2.0]))
            m.c.copy_(torch.tensor([0.5, 0.0, 1.0]))
    x = torch.randn(2, 3, 4, 5)
    a, b, c = conv.a.view(3, 1, 1), conv.b.view(3, 1, 1), conv.c.view(3, 1, 1)
    torch.testing.assert_close(conv(x), a * x * x + b * x + c)
    y = torch.randn(2, 7, 3)
    torch.testing.assert_close(feat(y), feat.a * y * y + feat.b * y + feat.c)
    with pytest.raises(ValueError, match="has 3 channels"):
        conv.fit_to(torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3))
    assert {n for n, _ in PolyReLU(4).named_parameters()} == {"a", "b", "c"}
    with pytest.raises(ValueError, match="from the end"):
        PolyReLU(3, channel_dim=1)
    # no shape logic in forward: a model holding PolyReLUs traces, and can be optimized again
    model = nn.Sequential(nn.Conv2d(3, 3, 1), conv, nn.Flatten(), nn.Linear(3 * 16, 3), feat).eval()
    traced = torch.fx.symbolic_trace(model)
    z = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(traced(z), model(z))
    torch.testing.assert_close(optimize(model, z)(z), model(z), rtol=1e-6, atol=1e-6)
    assert REGISTRY["relu_to_poly"].approximate


def test_default_is_least_squares_fit_for_standard_normal_inputs():
    p = PolyReLU().requires_grad_(False)
    assert float(p.a) == pytest.approx(0.1995, abs=1e-4) and float(p.b) == 0.5
    assert float(p.c) == pytest.approx(float(p.a))
    torch.manual_seed(0)
    x = torch.randn(400_000, 1, dtype=torch.float64)
    a, b, c = fit_quadratic(x, torch.relu(x))
    assert (float(a), float(b), float(c)) == pytest.approx((float(p.a), 0.5, float(p.c)), abs=5e-3)


def test_fit_to_is_least_squares_per_channel():
    torch.manual_seed(0)
    # channel 0 ~ N(0, 1), channel 1 ~ N(2, 0.5^2), channel 2 all positive: ReLU is the identity there
    x = torch.stack([torch.randn(4, 6, 6), 2 + 0.5 * torch.randn(4, 6, 6), 1 + torch.rand(4, 6, 6)], 1)
    p = PolyReLU(3, channel_dim=-3)
    note = p.fit_to(x, torch.relu(x), fit_affine=True)
    assert "per channel over 3 channels, 144 values each" in note and "ignored options ['fit_affine']" in note
    for ch in range(3):  # numpy's least-squares quadratic, channel by channel
        xs = x[:, ch].double().flatten().numpy()
        want = np.polyfit(xs, np.maximum(xs, 0), 2)
        np.testing.assert_allclose(coefficients(p, ch), want, rtol=1e-4, atol=1e-5)
    assert coefficients(p, 2)[:2] == pytest.approx([0, 1], abs=1e-5)
    # a target that is a quadratic is recovered exactly
    q = PolyReLU()
    xs = torch.randn(1000)
    q.fit_to(xs, 2 * xs ** 2 - xs + 0.5)
    assert coefficients(q) == pytest.approx([2, -1, 0.5], abs=1e-5)
    # too few values per channel: one polynomial for the layer; too few in all: nothing fitted
    r = PolyReLU(3, channel_dim=-3)
    note = r.fit_to(x[:, :, :2, :2], torch.relu(x[:, :, :2, :2]))
    assert "one polynomial for all 3 channels: 16 values per channel < min_rows=32" in note
    assert torch.equal(r.a, r.a[:1].expand(3))
    assert "not fitted" in PolyReLU().fit_to(torch.randn(5), torch.randn(5))


# ---------------------------------------------------------------- real models

def test_resnet18_every_relu_call_swapped_with_fit_error_reported():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model, x = torchvision.models.resnet18(num_classes=10).eval(), torch.randn(4, 3, 64, 64)
    gm = optimize(model, x, passes=["relu_to_poly"])
    recs = rewrote(gm, "relu_to_poly")
    assert len(recs) == 17  # 9 nn.ReLU modules, each BasicBlock calls its own twice
    assert sum(isinstance(m, PolyReLU) for m in gm.modules()) == 17
    first = gm.get_submodule("relu_poly")
    assert (first.num_channels, first.channel_dim) == (64, -3)  # dim 1 of NCHW
    for r in recs:
        assert 0 < fit_error(r.detail) < 0.3, r.detail
        assert reported_deviation(r.detail) > 0
    assert any("17 swapped; model output deviation" in d for d in notes(gm, "relu_to_poly"))
    # the reference ReLU of every swapped layer is recorded for calibration
    refs = gm.meta["swapped_norms"]
    assert len(refs) == 17 and all(type(refs[n]) is nn.ReLU for n, m in gm.named_modules() if isinstance(m, PolyReLU))
    out = gm(x)
    assert torch.isfinite(out).all()
    assert (out - model(x)).abs().max() < 0.5 * model(x).abs().max()


def test_fit_at_swap_time_is_least_squares_on_the_recorded_input():
    """Linear -> ReLU: the ReLU's input is the linear's output, so the fit can be recomputed."""
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2)).eval(), torch.randn(64, 6)
    h = model[0](x).detach().double()
    for per_channel in (True, False):
        gm = optimize(model, x, passes=[relu_to_poly(per_channel=per_channel)])
        p = gm.get_submodule("1_poly")
        assert p.num_channels == (5 if per_channel else 1) and p.channel_dim == -1
        cols = h.T if per_channel else h.reshape(1, -1)
        for ch, xs in enumerate(cols.numpy()):
            want = np.polyfit(xs, np.maximum(xs, 0), 2)
            np.testing.assert_allclose(coefficients(p, ch), want, rtol=1e-4, atol=1e-5)
        [r] = rewrote(gm, "relu_to_poly")
        y = p(h.float()).detach()
        err = float((y.double() - h.relu()).norm() / h.relu().norm())
        assert fit_error(r.detail) == pytest.approx(err, rel=1e-3)


def test_timm_in_place_relus_swapped_and_selection():
    torch.manual_seed(0)
    model, x = timm_model("resnet10t"), torch.randn(2, 3, 32, 32)
    gm = optimize(model, x, passes=["relu_to_poly"])
    assert len(rewrote(gm, "relu_to_poly")) == sum(isinstance(m, nn.ReLU) for m in model.modules()) == 11
    gm = optimize(model, x, passes=[relu_to_poly(only="layer1")])
    assert [r.detail.split(" -> ")[0] for r in rewrote(gm, "relu_to_poly")] == ["layer1.0.act1", "layer1.0.act2"]
    assert len(skipped(gm, "relu_to_poly")) == 9


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
    gm = optimize(model, x, passes=["relu_to_poly"], inplace=False)
    [s] = skipped(gm, "relu_to_poly")
    assert "in-place ReLU whose mutation is observed" in s.detail
    assert rewrote(gm, "relu_to_poly") == []
    verify(model, gm, x, rtol=0, atol=0)


# ---------------------------------------------------------------- train, save, export, calibrate

def test_swapped_cnn_trains_round_trips_and_exports(tmp_path):
    torch.manual_seed(0)
    model, x = resnet_like(), torch.randn(4, 3, 8, 8)
    gm = optimize(model, x, passes=["relu_to_poly"])
    assert len(rewrote(gm, "relu_to_poly")) == 2
    polys = [m for m in gm.modules() if isinstance(m, PolyReLU)]
    before = [m.a.detach().clone() for m in polys]
    gm.train()
    gm(x).square().mean().backward()
    assert all(m.a.grad is not None and m.b.grad is not None and m.c.grad is not None for m in polys)
    gm.zero_grad()
    losses = train_steps(gm, x)
    assert losses[-1] < losses[0]
    assert not torch.equal(polys[0].a, before[0])  # the coefficients are trained
    gm.eval()
    fresh = state_dict_round_trip(gm, optimize(model, x, passes=["relu_to_poly"]))
    torch.testing.assert_close(fresh(x), gm(x), rtol=0, atol=0)
    path = tmp_path / "poly.onnx"
    export_onnx(gm, x, path)
    import onnx
    types = [n.op_type for n in onnx.load(path).graph.node]
    assert "Relu" not in types  # private inference: no comparison left
    for batch in (4, 6):
        result = check_onnx(gm, path, torch.randn(batch, 3, 8, 8))
        assert result.passed, str(result)


def test_poly_relu_without_example_inputs_keeps_the_normal_fit():
    """A graph without example inputs: PolyReLU keeps the standard-normal fit, and says so."""
    from fxrewrite.passes.swaps_activation import relu_to_poly as factory
    from fxrewrite.rewrite.canonicalize import canonicalize
    from fxrewrite.rewrite.passmanager import run_pass
    from fxrewrite.rewrite.report import Report
    gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
    canonicalize(gm, Report())
    report = Report()
    run_pass(gm, factory(), report, [])
    [r] = [r for r in report.records if r.action == "rewrote"]
    assert "not fitted" in r.detail and "0.1995" in r.detail
    p = next(m for m in gm.modules() if isinstance(m, PolyReLU))
    assert coefficients(p)[1] == 0.5


def test_polyrelu_fit_to_on_held_out_data_by_hand():
    """The calibration protocol by hand: refit each PolyReLU on the inputs it sees in the swapped
    model, against its recorded reference ReLU; the error on those inputs can only go down."""
    torch.manual_seed(0)
    model = resnet_like()
    gm = optimize(model, torch.randn(2, 3, 8, 8), passes=["relu_to_poly"])
    data = torch.randn(16, 3, 8, 8) * 1.5  # another input scale than the swap saw
    for name, ref in gm.meta["swapped_norms"].items():
        poly = gm.get_submodule(name)
        seen = []
        h = poly.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
        with torch.no_grad():
            gm(data)
        h.remove()
        xs = torch.cat(seen)
        err_before = float((poly(xs) - ref(xs)).norm() / ref(xs).norm())
        note = poly.fit_to(xs, ref(xs))
        err_after = float((poly(xs) - ref(xs)).norm() / ref(xs).norm())
        assert err_after <= err_before + 1e-6 and "rel error" in note


def test_calibrate_refits_polyrelus_over_features():
    """(..., features) activations: calibrate's (rows, last dim) inputs are the PolyReLU's layout."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 3)).eval()
    gm = optimize(model, torch.randn(8, 6), passes=["relu_to_poly"])
    fit = [torch.randn(64, 6) * 3 for _ in range(2)]  # another input scale than the swap saw
    result = calibrate(gm, fit, holdout=[torch.randn(64, 6) * 3], reference=model)
    assert len(result.layers) == 2
    assert all(r.error_after < r.error_before for r in result.layers), str(result)
    assert result.output_after < result.output_before


def test_calibrate_refits_polyrelus_over_conv_channels():
    """NCHW activations: the PolyReLU's channels are dim 1, so calibrate has to gather its inputs
    as (rows, channels) (`PolyReLU.channels_last`), not (rows, last dim). 8 channels, width 10."""
    torch.manual_seed(0)
    model = resnet_like()
    gm = optimize(model, torch.randn(2, 3, 10, 10), passes=["relu_to_poly"])
    fit = [torch.randn(4, 3, 10, 10) * 1.5 for _ in range(2)]
    result = calibrate(gm, fit, holdout=[torch.randn(4, 3, 10, 10) * 1.5], reference=model)
    assert len(result.layers) == 2
    assert all(r.error_after < r.error_before for r in result.layers), str(result)


def test_by_hand_model_with_fitted_polys_matches():
    """The swapped graph computes the eager model with each ReLU replaced by its PolyReLU."""
    torch.manual_seed(0)
    model, x = resnet_like(), torch.randn(2, 3, 8, 8)
    gm = optimize(model, x, passes=["relu_to_poly"])
    polys = iter([gm.get_submodule("3_poly"), gm.get_submodule("5_poly")])
    by_hand = replace_modules(model, nn.ReLU, lambda _: next(polys))
    torch.testing.assert_close(gm(x), by_hand(x), rtol=1e-5, atol=1e-5)
