"""ReLU -> SmeLU / generalized SmeLU (passes.swaps.relu_to_smelu, relu_to_generalized_smelu): what
is swapped (module, functional and in-place ReLUs), what is reported, that the swapped graph
computes what a model built by hand with SmeLU computes, selection, training, state_dict and
export."""
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fxrewrite import optimize, verify
from fxrewrite.rewrite.nn import GeneralizedSmeLU, SmeLU
from fxrewrite.passes.swaps import relu_to_generalized_smelu, relu_to_smelu

from conftest import (TinyBlock, replace_modules, reported_deviation, rewrote, skipped, state_dict_round_trip,
                      timm_model, train_steps)


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


def smelu_by_hand(model, beta):
    return replace_modules(model, nn.ReLU, lambda _: SmeLU(beta))


def test_relu_to_smelu_matches_model_built_with_smelu():
    torch.manual_seed(0)
    model = SmallCNN().eval()
    x = torch.randn(2, 3, 16, 16)
    gm = optimize(model, x, passes=[relu_to_smelu(beta=0.5)])
    assert len(rewrote(gm, "relu_to_smelu")) == 2  # the nn.ReLU module and the F.relu call
    assert sum(isinstance(m, SmeLU) for m in gm.modules()) == 2
    for r in rewrote(gm, "relu_to_smelu"):
        dev = reported_deviation(r.detail)
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
    fresh = state_dict_round_trip(gm, optimize(model, x, passes=[p]))
    torch.testing.assert_close(fresh(x), gm(x), rtol=0, atol=0)


# ---------------------------------------------------------------- ReLU modules kept in place

def test_resnet_every_relu_swapped_including_in_place_ones():
    """timm's BasicBlock runs ReLU(inplace=True) on an Identity's output, which canonicalisation
    keeps in place; the swap must still see it (it used to miss 4 of 11 without a word)."""
    torch.manual_seed(0)
    model = timm_model("resnet10t")
    x = torch.randn(2, 3, 32, 32)
    gm = optimize(model, x, passes=[relu_to_smelu(beta=0.5)])
    n_relu = sum(isinstance(m, nn.ReLU) for m in model.modules())
    assert len(rewrote(gm, "relu_to_smelu")) == n_relu == 11
    for r in rewrote(gm, "relu_to_smelu"):  # measured on the op's input before the op ran
        assert 0 < reported_deviation(r.detail) <= 0.5 / 4 + 1e-6
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


def test_selection_of_in_place_relu_modules_by_name_and_type():
    model, x = timm_model("resnet10t", num_classes=4), torch.randn(1, 3, 16, 16)
    gm = optimize(model, x, passes=[relu_to_smelu(only="layer1")])
    assert [r.detail.split(" -> ")[0] for r in rewrote(gm, "relu_to_smelu")] == ["layer1.0.act1", "layer1.0.act2"]
    gm = optimize(model, x, passes=[relu_to_smelu(only=nn.ReLU)])
    assert len(rewrote(gm, "relu_to_smelu")) == 11


# ---------------------------------------------------------------- ordinary modules: train, save, export

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
    losses = train_steps(gm, x)
    assert losses[-1] < losses[0]
    act = next(m for m in gm.modules() if isinstance(m, (SmeLU, GeneralizedSmeLU)))
    assert float(act.beta) != pytest.approx(0.6 if isinstance(act, GeneralizedSmeLU) else 1.0)  # beta learned
    gm.eval()
    fresh = state_dict_round_trip(gm, optimize(model, x, passes=[swap]))
    torch.testing.assert_close(fresh(x), gm(x), rtol=0, atol=0)
    ep = torch.export.export(gm, (x,))
    torch.testing.assert_close(ep.module()(x), gm(x), rtol=1e-5, atol=1e-5)


def test_fixed_parameters_are_buffers():
    """learnable=False: the parameters are saved with the model but never trained."""
    assert not list(SmeLU(0.5).parameters()) and "beta" in SmeLU(0.5).state_dict()
    g = GeneralizedSmeLU(0.3, 0.6, 0.1, 0.9)
    assert not list(g.parameters()) and set(g.state_dict()) == {"alpha", "beta", "g_left", "g_right"}
    assert len(list(GeneralizedSmeLU(0.3, 0.6, 0.1, 0.9, learnable=True).parameters())) == 4
