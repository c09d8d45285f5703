"""The engine on toy graphs: canonicalisation of every spelling, patterns, near-miss reasons."""
from __future__ import annotations

import operator

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from fxrewrite import Report, optimize, verify
from fxrewrite.rewrite import ops
from fxrewrite.rewrite.canonicalize import canonicalize
from fxrewrite.rewrite.capture import capture
from fxrewrite.rewrite.passmanager import Pass, Rule, run_pass
from fxrewrite.rewrite.pattern import Any, Lit, NoMatch, Op, Param, match

from conftest import ConvBNReadElsewhere, count


def canonical(model, x):
    report = Report()
    gm = capture(model, x, report)
    canonicalize(gm, report)
    return gm, report


class Spellings(nn.Module):
    """The same conv + BN + ReLU + residual written four ways."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        a = self.relu(self.bn(self.conv(x)))
        b = F.relu(F.batch_norm(F.conv2d(x, self.conv.weight, self.conv.bias, padding=1),
                                self.bn.running_mean, self.bn.running_var, self.bn.weight, self.bn.bias))
        c = torch.relu(torch.conv2d(x, self.conv.weight, self.conv.bias, 1, 1))
        c += a
        return (a + b).relu() * c


def test_every_spelling_becomes_one_canonical_op():
    m = Spellings().eval()
    gm, _ = canonical(m, torch.randn(1, 4, 8, 8))
    targets = {n.target for n in gm.graph.nodes if n.op in ("call_function", "call_method", "call_module")}
    assert targets <= ops.CANONICAL, targets - ops.CANONICAL
    assert count(gm, ops.conv) == 3
    assert count(gm, ops.batch_norm) == 2
    assert count(gm, ops.relu) == 4
    gm.recompile()
    x = torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(gm(x), m(x))


def test_export_spelling_is_canonicalised_too():
    m = Spellings().eval()
    ep = torch.export.export(m, (torch.randn(2, 4, 8, 8),))
    gm = ep.module()
    canonicalize(gm, Report())
    assert count(gm, ops.conv) == 3 and count(gm, ops.batch_norm) == 2
    assert not any("_" == str(n.target).split(".")[-2][-1:] for n in gm.graph.nodes
                   if n.op == "call_function" and str(n.target).startswith("aten.relu_"))
    gm.recompile()
    x = torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(gm(x), m(x))


def test_inplace_on_a_value_read_later_is_functionalised_correctly():
    class M(nn.Module):
        def forward(self, x):
            y = x * 2  # a fresh value
            z = y.relu_()  # mutates y: later readers of y see relu(y)
            return y + z + x

    m = M()
    gm, _ = canonical(m, torch.randn(8))
    gm.recompile()
    x = torch.randn(8)
    torch.testing.assert_close(gm(x), m(x))


def test_inplace_on_a_graph_input_is_kept():
    class M(nn.Module):
        def forward(self, x):
            x.add_(1)
            return x * 2

    gm, _ = canonical(M(), torch.randn(3))
    assert any(n.target == "add_" or n.target is torch.Tensor.add_ for n in gm.graph.nodes), gm.graph


def test_padding_modes_and_same_padding_canonicalise_exactly():
    convs = [nn.Conv2d(3, 4, 3, padding=1, padding_mode=m) for m in ("reflect", "replicate", "circular")]
    convs += [nn.Conv2d(3, 4, 4, padding="same"), nn.Conv1d(3, 4, 2, padding="same", dilation=3)]
    for conv in convs:
        x = torch.randn(1, 3, 9) if isinstance(conv, nn.Conv1d) else torch.randn(1, 3, 9, 9)
        asymmetric = conv.padding == "same" and conv.kernel_size[0] % 2 == 0 and conv.dilation[0] % 2 == 1
        for model in (conv, nn.Sequential(conv)):  # traced through F.conv2d, and as a module call
            gm, _ = canonical(model, x)
            # F.conv2d(padding='same') with an asymmetric pad is left as written; the module form
            # becomes aten.pad + aten.convolution
            expected = 0 if asymmetric and model is conv else 1
            assert count(gm, ops.conv) == expected, (conv, gm.graph)
            gm.recompile()
            torch.testing.assert_close(gm(x), conv(x))


def test_pattern_captures_and_reasons():
    m = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)).eval()
    gm, _ = canonical(m, torch.randn(1, 3, 4, 4))
    bn = next(n for n in gm.graph.nodes if n.target is ops.batch_norm)
    pat = Op(ops.batch_norm, input=Op(ops.conv, weight=Param("w"), name="conv"), eps=Lit(name="eps"))
    mt = match(pat, bn)
    assert mt.captures["eps"] == 1e-5 and mt.captures["w"].op == "get_attr"
    assert [n.target for n in mt.nodes] == [ops.batch_norm, ops.conv]
    with pytest.raises(NoMatch, match="input is .* not aten.linear"):
        match(Op(ops.batch_norm, input=Op(ops.linear)), bn)
    with pytest.raises(NoMatch, match="training is False, not True"):
        match(Op(ops.batch_norm, training=Lit(True, what="training")), bn)


def test_interior_value_with_two_users_is_a_near_miss_with_reason():
    m = ConvBNReadElsewhere(channels=3, add=True).eval()
    x = torch.randn(1, 3, 4, 4)
    f = optimize(m, x, passes=["fold_batchnorm"])  # (merge_branches would merge bn(y) + y as a whole)
    assert count(f, ops.batch_norm) == 1
    (skip,) = f.report.skipped("fold_batchnorm")
    assert "2 users" in skip.detail
    verify(m, f, x)


def test_a_custom_rule_runs_to_a_fixed_point_and_is_idempotent():
    # x * 1 -> x, written as a rule: nested multiplies all disappear
    rule = Rule("drop_mul_one", Op(ops.mul, self=Any("x"), other=Lit(1)), lambda rw, x: x)
    p = Pass("drop_mul_one", "exact", rules=[rule])

    class M(nn.Module):
        def forward(self, x):
            return ((x * 1) * 1 + 1) * 1

    gm, report = canonical(M(), torch.randn(3))
    assert run_pass(gm, p, report, []) == 3
    assert count(gm, ops.mul) == 0
    assert run_pass(gm, p, report, []) == 0
    gm.recompile()
    x = torch.randn(3)
    torch.testing.assert_close(gm(x), x + 1)


def test_user_model_is_never_mutated():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    optimize(m, torch.randn(1, 3, 8, 8))
    after = m.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert isinstance(m[1], nn.BatchNorm2d)


def test_report_prints_a_table_and_accounts_for_every_removed_tensor():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.2), nn.Identity()).eval()
    f = optimize(m, torch.randn(1, 3, 8, 8))
    text = str(f.report)
    assert "fold_bn_into_conv" in text and "remove_identity" in text
    removed = [r for r in f.report.records if r.action == "removed"]
    assert {r.node for r in removed} == {"0", "1"}
    assert all("absorbed into" in r.detail for r in removed)
    assert len(f.derivations) == 2 and f.derivations[0].sources[0] == "0.weight"


def test_one_recompile_per_optimize_and_timings_per_stage(monkeypatch):
    calls = []
    original = fx.GraphModule.recompile
    monkeypatch.setattr(fx.GraphModule, "recompile", lambda self: calls.append(1) or original(self))
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    x = torch.randn(1, 3, 8, 8)
    fast = optimize(m, x)
    assert len(calls) == 1  # code is generated once, at the end: not for the traced graph too
    torch.testing.assert_close(fast(x), m(x))
    assert len(calls) == 1 and "convolution" in fast.code  # and is ready: running needs no more
    assert {"capture", "canonicalize", "fold_batchnorm", "recompile"} <= set(fast.report.timings)


def test_rewrite_cost_bench_runs_and_counts_one_recompile(capsys):
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parent.parent / "bench" / "rewrite_cost.py"
    spec = importlib.util.spec_from_file_location("rewrite_cost", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--blocks", "2", "--repvgg", "3", "--no-resnet", "--repeat", "1"])
    rows = [line.split("|") for line in capsys.readouterr().out.splitlines() if "blocks |" in line]
    assert [r[1].strip() for r in rows] == ["2 blocks", "3 RepVGG blocks"]
    assert all(r[-2].strip() == "1" for r in rows)  # one code generation per optimize
    assert rows[1][3].strip() == "14"  # input, 3 x (merged conv, its weight and bias, ReLU), output


def test_a_bn_with_nothing_to_fold_into_says_it_stays():
    m = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 1)).eval()
    fast = optimize(m, torch.randn(1, 3, 4, 4))
    (skip,) = fast.report.skipped("fold_batchnorm")
    assert "(input), not aten.convolution" in skip.detail and "stays" in skip.detail


def test_division_with_rounding_mode_is_left_as_written():
    class Div(nn.Module):
        def forward(self, x, y):
            return torch.div(x, y, rounding_mode="floor") + x.div(y, rounding_mode="trunc")

    a, b = torch.randn(16) * 5, torch.rand(16) + 0.5
    gm = optimize(Div(), (a, b), passes=[])
    assert torch.equal(gm(a, b), Div()(a, b))


def test_inplace_op_seen_through_an_earlier_view_stays_in_place():
    class ViewThenAdd(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 1)

        def forward(self, x):
            y = self.conv(x)
            v = y.view(-1)
            y.add_(1)  # v sees this
            return v

    model = ViewThenAdd().eval()
    x = torch.randn(1, 2, 3, 3)
    gm = optimize(model, x, passes=[])
    assert torch.equal(gm(x), model(x))


def test_verify_compares_non_finite_values_exactly():
    from fxrewrite.rewrite.verify import compare
    ref = torch.tensor([1.0, float("inf"), float("nan"), 2.0])
    assert compare(ref, ref.clone(), rtol=1e-6, atol=0).passed
    assert compare(ref, ref * (1 + 1e-9), rtol=1e-6, atol=0).passed  # rounding on the finite part
    assert not compare(ref, torch.tensor([1.0, -float("inf"), float("nan"), 2.0]), rtol=1e-6, atol=0).passed
    assert not compare(ref, torch.tensor([1.0, 5.0, float("nan"), 2.0]), rtol=1e-6, atol=0).passed
    assert not compare(ref, torch.tensor([1.0, float("inf"), float("nan"), 3.0]), rtol=1e-6, atol=0).passed


class NormSpellings(nn.Module):
    """The arithmetic of written-out norms, in the spellings each route records."""

    def forward(self, x):
        a = x.pow(2) + torch.pow(x, 3) + x ** 2 + x.square()
        b = x.mean(-1, keepdim=True) + torch.mean(x, dim=(1, 2), keepdim=True) + x.mean(dim=[-1], keepdim=True)
        c = torch.rsqrt(a.abs() + 1) + (a.abs() + 1).rsqrt()
        d = x.to(torch.float64).float() + x.half().to(dtype=torch.float32) + x.to(x.dtype) + x.type_as(x)
        return a + b + c + d + x.mean()  # x.mean(): a mean over everything, another overload


def test_norm_arithmetic_becomes_canonical_on_every_route():
    m, x = NormSpellings(), torch.randn(2, 3, 4)
    for route in ("symbolic_trace", "export"):
        if route == "export":
            gm = torch.export.export(m, (x,)).module()
            canonicalize(gm, Report())
        else:
            gm, _ = canonical(m, x)
        assert count(gm, ops.pow) == 4 and count(gm, ops.mean) == 3 and count(gm, ops.rsqrt) == 2, route
        assert count(gm, ops.cast) == 4, route  # x.to(x.dtype) is x itself; float64, half and back stay
        gm.recompile()
        torch.testing.assert_close(gm(x), m(x), rtol=0, atol=0)


def test_a_cast_that_may_return_its_input_is_never_functionalised_away():
    """`y = x.to(float32)` is `x` itself for a float32 `x`, so `y.add_(1)` writes `x`: the
    mutation must stay, or a later read of `x` would miss it."""
    class M(nn.Module):
        def forward(self, x):
            z = x * 2
            y = z.to(torch.float32)
            y.add_(1)
            return z + y

    m, x = M(), torch.randn(5)
    gm, _ = canonical(m, x)
    gm.recompile()
    torch.testing.assert_close(gm(x), m(x), rtol=0, atol=0)


def test_a_pass_that_needs_shapes_is_skipped_with_the_reason_on_a_graph_without_them():
    from fxrewrite.passes import REGISTRY
    from fxrewrite.rewrite.passmanager import run_pass

    gm = fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1)))  # no shape propagation
    report = Report()
    assert run_pass(gm, REGISTRY["merge_branches"], report, []) == 0
    [skip] = report.skipped("merge_branches")
    assert skip.detail == "not run: it needs shapes, which this route does not provide"
