"""remove_identity (passes/cleanup.py): `nn.Identity` and dropout that computes the identity
(eval mode, `training=False`, or p = 0) are removed exactly; dropout that really drops stays."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fxrewrite import optimize, verify

from conftest import rewrote


class Passthroughs(nn.Module):
    """Every spelling of an identity, between two linears."""

    def __init__(self, p=0.5, functional_training=False):
        super().__init__()
        self.fc, self.id, self.drop, self.out = nn.Linear(8, 8), nn.Identity(), nn.Dropout(p), nn.Linear(8, 8)
        self.functional_training = functional_training

    def forward(self, x):
        return self.out(F.dropout(self.drop(self.id(self.fc(x))), 0.2, training=self.functional_training))


def modules_called(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_module"]


def test_identity_and_eval_dropout_are_removed_by_count():
    model, x = Passthroughs().eval(), torch.randn(2, 8)
    gm = optimize(model, x, passes=["remove_identity"])
    assert gm.report.count("remove_identity") == 3
    assert [r.node for r in rewrote(gm, "remove_identity")] == ["id_1", "drop", "dropout"]
    assert modules_called(gm) == [] and not any(n.target is torch.ops.aten.alias.default for n in gm.graph.nodes)
    verify(model, gm, x, rtol=0, atol=0)


def test_dropout_with_p_zero_in_training_mode_is_an_identity_too():
    model, x = Passthroughs(p=0.0).eval(), torch.randn(2, 8)
    model.drop.train()
    gm = optimize(model, x, passes=["remove_identity"])
    assert gm.report.count("remove_identity") == 3
    verify(model, gm, x, rtol=0, atol=0)


def test_training_mode_dropout_is_not_removed():
    model, x = Passthroughs().eval(), torch.randn(4, 8)
    model.drop.train()
    gm = optimize(model, x, passes=["remove_identity"])
    assert gm.report.count("remove_identity") == 2  # the Identity and the functional eval dropout
    assert "drop" not in [r.node for r in gm.report.records if r.pass_name == "remove_identity"]
    assert modules_called(gm) == ["drop"] and gm.get_submodule("drop").training
    [s] = gm.report.skipped("canonicalize")  # kept as a module call, before any pass sees it, and says why
    assert "training mode" in s.detail and "model.eval()" in s.detail
    torch.manual_seed(1)
    expected = model(x)
    torch.manual_seed(1)
    torch.testing.assert_close(gm(x), expected, rtol=0, atol=0)  # the same elements dropped


def test_functional_dropout_in_training_mode_is_not_removed():
    model, x = Passthroughs(functional_training=True).eval(), torch.randn(2, 8)
    gm = optimize(model, x, passes=["remove_identity"])
    assert gm.report.count("remove_identity") == 2  # the Identity and the eval-mode module
    assert any(n.target is F.dropout for n in gm.graph.nodes)


def test_model_without_identities_is_left_as_it_is():
    model, x = nn.Sequential(nn.Linear(8, 8), nn.ReLU()).eval(), torch.randn(2, 8)
    gm = optimize(model, x, passes=["remove_identity"])
    assert gm.report.count("remove_identity") == 0
    verify(model, gm, x, rtol=0, atol=0)
