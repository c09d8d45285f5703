"""Structural re-parameterization on hand-written blocks, checked in float64 against the
unmerged block on fresh inputs (including input sizes other than the example's), plus the
skips with their reasons, the derivations and the graph view."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fxrewrite import optimize
from fxrewrite.rewrite import ops
from fxrewrite.rewrite.canonicalize import canonicalize
from fxrewrite.rewrite.capture import capture
from fxrewrite.rewrite.graphview import DominatorView, to_dot
from fxrewrite.rewrite.report import Report
from fxrewrite.rewrite.attrs import fetch_attr

from conftest import count, randomize_bn


def conv_bn(cin, cout, k, stride=1, padding=0, groups=1, dilation=1, bias=False):
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, padding, dilation=dilation, groups=groups, bias=bias),
                         nn.BatchNorm2d(cout))


def deploy(model, x):
    """Optimize a float64 copy of `model` with the default (exact) passes."""
    model = randomize_bn(model).double().eval()
    return model, optimize(model, x.double())


def assert_same(model, gm, *inputs, tol=1e-11):
    with torch.no_grad():
        for x in inputs:
            ref, out = model(x.double()), gm(x.double())
            scale = ref.abs().max().item()
            assert (ref - out).abs().max().item() <= tol * max(scale, 1.0), "merged model differs"


def merges(gm) -> int:
    return gm.report.count("merge_branches")


def skips(gm) -> list[str]:
    return [r.detail for r in gm.report.skipped("merge_branches")]


# ------------------------------------------------------------------ blocks


class RepVGGBlock(nn.Module):
    def __init__(self, c, cout=None, stride=1, groups=1):
        super().__init__()
        cout = cout or c
        self.dense = conv_bn(c, cout, 3, stride, 1, groups)
        self.one = conv_bn(c, cout, 1, stride, 0, groups)
        self.identity = nn.BatchNorm2d(c) if cout == c and stride == 1 else None
        self.act = nn.ReLU()

    def forward(self, x):
        y = self.dense(x) + self.one(x)
        if self.identity is not None:
            y = y + self.identity(x)
        return self.act(y)


class ACBlock(nn.Module):
    """ACNet: 3x3 + 1x3 + 3x1, each with BN."""

    def __init__(self, c, cout):
        super().__init__()
        self.square = conv_bn(c, cout, 3, padding=1)
        self.hor = nn.Sequential(nn.Conv2d(c, cout, (1, 3), padding=(0, 1), bias=False), nn.BatchNorm2d(cout))
        self.ver = nn.Sequential(nn.Conv2d(c, cout, (3, 1), padding=(1, 0), bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return F.relu(self.square(x) + self.hor(x) + self.ver(x))


class DBB(nn.Module):
    """Diverse Branch Block: kxk, 1x1, 1x1 -> kxk, 1x1 -> avg-pool, each with BN.

    As in the paper, the 1x1 in front of a kxk/avg-pool pads its output with its BN's bias
    (BNAndPad): here the 1x1 conv itself carries the padding, so its border output is exactly its
    bias, and the kxk / avg-pool after it has padding 0 (the same function)."""

    def __init__(self, c, cout, k=3, stride=1):
        super().__init__()
        p = k // 2
        self.kxk = conv_bn(c, cout, k, stride, p)
        self.one = conv_bn(c, cout, 1, stride, 0)
        self.seq = nn.Sequential(nn.Conv2d(c, c, 1, padding=p, bias=False), nn.BatchNorm2d(c),
                                 nn.Conv2d(c, cout, k, stride, 0, bias=False), nn.BatchNorm2d(cout))
        self.avg = nn.Sequential(nn.Conv2d(c, cout, 1, padding=p, bias=False), nn.BatchNorm2d(cout),
                                 nn.AvgPool2d(k, stride, 0), nn.BatchNorm2d(cout))

    def forward(self, x):
        return self.kxk(x) + self.one(x) + self.seq(x) + self.avg(x)


class MobileOneBlock(nn.Module):
    """k over-parameterized kxk branches, a 1x1 scale branch and a BN-only branch."""

    def __init__(self, c, k=3, branches=3, depthwise=True):
        super().__init__()
        g = c if depthwise else 1
        self.convs = nn.ModuleList(conv_bn(c, c, k, 1, k // 2, g) for _ in range(branches))
        self.scale = conv_bn(c, c, 1, 1, 0, g) if k > 1 else None
        self.skip = nn.BatchNorm2d(c)

    def forward(self, x):
        out = self.skip(x)
        if self.scale is not None:
            out = out + self.scale(x)
        for conv in self.convs:
            out = out + conv(x)
        return F.relu(out)


class LayerScaled(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = conv_bn(c, c, 3, padding=1)
        self.gamma = nn.Parameter(torch.rand(c) + 0.5)
        self.shift = nn.Parameter(torch.randn(c, 1, 1))

    def forward(self, x):
        return F.gelu(self.conv(x) * self.gamma.view(1, -1, 1, 1) + self.shift)


class RepMLPish(nn.Module):
    """Conv branches (3x3, 1x1, identity BN) feeding an FC over a fixed 6x6 map."""

    def __init__(self, c=3, d=5, hw=6):
        super().__init__()
        self.block = nn.Sequential()
        self.three, self.one, self.bn = conv_bn(c, c, 3, padding=1), conv_bn(c, c, 1), nn.BatchNorm2d(c)
        self.fc = nn.Linear(c * hw * hw, d)

    def forward(self, x):
        y = self.three(x) + self.one(x) + self.bn(x)
        return self.fc(torch.flatten(y, 1))


class LoRALinear(nn.Module):
    def __init__(self, din=12, dout=10, rank=2):
        super().__init__()
        self.base = nn.Linear(din, dout)
        self.A = nn.Parameter(torch.randn(din, rank))
        self.B = nn.Parameter(torch.randn(rank, dout))

    def forward(self, x):
        return torch.relu(self.base(x) + (x @ self.A @ self.B) * 0.5)


# ------------------------------------------------------------------ positive cases

@pytest.mark.parametrize("groups", [1, 2, 4, 8])
def test_repvgg_block_grouped(groups):
    model, gm = deploy(RepVGGBlock(8, groups=groups), torch.randn(2, 8, 9, 9))
    assert count(gm, ops.conv) == 1 and count(gm, ops.batch_norm) == 0 and merges(gm) == 1
    conv = next(n for n in gm.graph.nodes if n.target is ops.conv)
    assert ops.arg(conv, "groups") == groups
    assert_same(model, gm, torch.randn(2, 8, 9, 9), torch.randn(1, 8, 5, 12))


def test_repvgg_block_stride2_without_identity():
    model, gm = deploy(RepVGGBlock(4, 6, stride=2), torch.randn(1, 4, 10, 10))
    assert count(gm, ops.conv) == 1
    assert_same(model, gm, torch.randn(2, 4, 10, 10), torch.randn(1, 4, 7, 9))  # odd sizes too


def test_acnet_block():
    model, gm = deploy(ACBlock(3, 5), torch.randn(1, 3, 8, 8))
    assert count(gm, ops.conv) == 1
    conv = next(n for n in gm.graph.nodes if n.target is ops.conv)
    assert list(fetch_attr(gm, ops.arg(conv, "weight").target).shape) == [5, 3, 3, 3]
    assert_same(model, gm, torch.randn(2, 3, 8, 8), torch.randn(1, 3, 5, 11))


@pytest.mark.parametrize("k,stride", [(3, 1), (3, 2), (5, 1)])
def test_diverse_branch_block_all_four_branches(k, stride):
    model, gm = deploy(DBB(4, 6, k, stride), torch.randn(1, 4, 12, 12))
    assert count(gm, ops.conv) == 1 and count(gm, ops.avg_pool2d) == 0 and count(gm, ops.batch_norm) == 0
    assert_same(model, gm, torch.randn(2, 4, 12, 12), torch.randn(1, 4, 9, 13))


@pytest.mark.parametrize("depthwise,k", [(True, 3), (False, 3), (False, 1), (True, 1)])
def test_mobileone_block(depthwise, k):
    model, gm = deploy(MobileOneBlock(6, k=k, depthwise=depthwise), torch.randn(1, 6, 8, 8))
    assert count(gm, ops.conv) == 1
    assert_same(model, gm, torch.randn(2, 6, 8, 8), torch.randn(1, 6, 3, 5))


def test_sequential_kxk_then_1x1_and_1x1_then_kxk():
    seq = nn.Sequential(conv_bn(8, 8, 3, padding=1), nn.Conv2d(8, 4, 1), nn.ReLU(),
                        nn.Conv2d(4, 4, 1, bias=False), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
    model, gm = deploy(seq, torch.randn(1, 8, 7, 7))
    assert count(gm, ops.conv) == 2
    assert_same(model, gm, torch.randn(2, 8, 7, 7), torch.randn(1, 8, 4, 6))


def test_layer_scale_and_shift_fold_into_conv():
    model, gm = deploy(LayerScaled(4), torch.randn(1, 4, 6, 6))
    assert count(gm, ops.conv) == 1 and count(gm, ops.mul) == 0 and count(gm, ops.add) == 0
    assert_same(model, gm, torch.randn(2, 4, 6, 6))


def test_linear_chains_lora_and_bn1d():
    mlp = nn.Sequential(nn.BatchNorm1d(16), nn.Linear(16, 32), nn.Linear(32, 8), nn.ReLU())
    model, gm = deploy(mlp, torch.randn(4, 16))
    assert count(gm, ops.linear) == 1 and count(gm, ops.batch_norm) == 0
    assert_same(model, gm, torch.randn(3, 16))

    model, gm = deploy(LoRALinear(), torch.randn(2, 3, 12))
    assert count(gm, ops.linear) == 1 and merges(gm) == 1
    assert_same(model, gm, torch.randn(2, 3, 12), torch.randn(5, 12))


def test_repmlp_conv_branches_fold_into_fc():
    model, gm = deploy(RepMLPish(), torch.randn(2, 3, 6, 6))
    assert count(gm, ops.conv) == 0 and count(gm, ops.linear) == 1
    assert_same(model, gm, torch.randn(4, 3, 6, 6))


def test_layer_scale_on_linear_and_residual_identity():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 6)
            self.ls = nn.Parameter(torch.rand(6))

        def forward(self, x):
            return torch.tanh(x + self.fc(x) * self.ls)

    model, gm = deploy(Block(), torch.randn(2, 4, 6))
    assert count(gm, ops.linear) == 1 and count(gm, ops.add) == 0
    assert_same(model, gm, torch.randn(3, 6))


# ------------------------------------------------------------------ skips with reasons

def test_dilation_mismatch_is_skipped_and_each_branch_still_folds():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = conv_bn(4, 4, 3, padding=1), conv_bn(4, 4, 3, padding=2, dilation=2)

        def forward(self, x):
            return self.a(x) + self.b(x)

    model, gm = deploy(Block(), torch.randn(1, 4, 8, 8))
    assert count(gm, ops.conv) == 2 and count(gm, ops.batch_norm) == 0
    assert any("dilations differ" in r for r in skips(gm)), skips(gm)
    assert_same(model, gm, torch.randn(2, 4, 8, 8))


def test_misaligned_windows_are_skipped():
    class Block(nn.Module):  # 3x3 pad 1 stride 2 vs avg-pool 2x2 stride 2 -> 1x1: same shapes, other pixels
        def __init__(self):
            super().__init__()
            self.a = conv_bn(4, 4, 3, 2, 1)
            self.b = nn.Sequential(nn.AvgPool2d(2, 2), nn.Conv2d(4, 4, 1))

        def forward(self, x):
            return self.a(x) + self.b(x)

    model, gm = deploy(Block(), torch.randn(1, 4, 8, 8))
    assert any("not aligned" in r for r in skips(gm)), skips(gm)
    assert_same(model, gm, torch.randn(2, 4, 8, 8))


def test_strided_conv_before_wide_conv_is_skipped():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(4, 4, 1, 2)
            self.b = nn.Sequential(nn.AvgPool2d(2, 2), nn.Conv2d(4, 4, 3, padding=1))

        def forward(self, x):
            return self.a(x) + self.b(x)

    model, gm = deploy(Block(), torch.randn(1, 4, 8, 8))
    assert any("stride 2" in r for r in skips(gm)), skips(gm)
    assert_same(model, gm, torch.randn(2, 4, 8, 8))


def test_padding_after_biased_conv_is_skipped():
    # 1x1 (with BN bias) -> 3x3 padded: the 3x3 pads zeros where a merged conv would see the bias
    seq = nn.Sequential(conv_bn(4, 4, 1), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
    model, gm = deploy(seq, torch.randn(1, 4, 6, 6))
    assert count(gm, ops.conv) == 2
    assert any("bias is not zero" in r for r in skips(gm)), skips(gm)
    # two padded 3x3 convs in a row: the second one's padding cuts the first one's window
    seq = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.Conv2d(4, 2, 3, padding=1), nn.ReLU())
    model, gm = deploy(seq, torch.randn(1, 4, 6, 6))
    assert count(gm, ops.conv) == 2
    assert any("zero-pads the first one's output" in r for r in skips(gm)), skips(gm)
    assert_same(model, gm, torch.randn(1, 4, 6, 6))


def test_expensive_sequential_merge_is_skipped():
    seq = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 32, 1), nn.ReLU())
    model, gm = deploy(seq, torch.randn(1, 8, 6, 6))
    assert count(gm, ops.conv) == 2
    assert any("multiply-adds" in r for r in skips(gm)), skips(gm)


def test_nonlinear_branch_and_shared_values_are_left_alone():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = conv_bn(4, 4, 3, padding=1), conv_bn(4, 4, 1)

        def forward(self, x):
            a = self.a(x)
            return F.relu(a) + self.b(x), a  # a is read twice and goes through a ReLU

    model = randomize_bn(Block()).double().eval()
    gm = optimize(model, torch.randn(1, 4, 5, 5).double())
    assert count(gm, ops.conv) == 2 and merges(gm) == 0
    with torch.no_grad():
        x = torch.randn(2, 4, 5, 5).double()
        for r, o in zip(model(x), gm(x)):
            assert torch.allclose(r, o, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ contracts

def test_user_model_untouched_idempotent_and_derivations_replay():
    model = randomize_bn(DBB(4, 4)).double().eval()
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(1, 4, 8, 8).double()
    gm = optimize(model, x)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    again = optimize(gm, x)
    assert merges(again) == 0 and count(again, ops.conv) == 1
    # replay every derivation from the user's tensors: the same final weights
    env = dict(model.state_dict())
    for d in gm.derivations:
        env[d.target] = d.fn(*[env[s] if isinstance(s, str) else s for s in d.sources])
    for name, t in list(gm.named_parameters()) + list(gm.named_buffers()):
        assert torch.equal(env[name], t), name
    # replay again after an in-place update of the same source tensors: fresh results, not cached ones
    sources = {s for d in gm.derivations for s in d.sources if isinstance(s, str) and s in model.state_dict()}
    for name in sources:
        env[name].mul_(1.5)
    replay = dict(env)
    for d in gm.derivations:
        replay[d.target] = d.fn(*[replay[s] if isinstance(s, str) else s for s in d.sources])
    fresh = {k: v.clone() for k, v in env.items() if k in sources}
    for d in gm.derivations:
        fresh[d.target] = d.fn(*[fresh[s] if isinstance(s, str) else s for s in d.sources])
    finals = [n for n, _ in list(gm.named_parameters()) + list(gm.named_buffers())]
    assert finals and all(torch.equal(replay[n], fresh[n]) for n in finals)
    assert any(not torch.equal(replay[n], env_t) for n, env_t in gm.state_dict().items() if n in finals)


def test_float32_model_keeps_float32_weights():
    model = randomize_bn(RepVGGBlock(4)).eval()
    gm = optimize(model, torch.randn(1, 4, 6, 6))
    assert all(p.dtype == torch.float32 for p in gm.parameters())
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        assert torch.allclose(model(x), gm(x), rtol=1e-5, atol=1e-5)


def test_graphview_branch_set_and_dot():
    model = randomize_bn(RepVGGBlock(4)).eval()
    gm = capture(model, torch.randn(1, 4, 6, 6), Report())
    canonicalize(gm, Report())
    view = DominatorView(gm.graph)
    x = next(n for n in gm.graph.nodes if n.op == "placeholder")
    outer_add = [n for n in gm.graph.nodes if n.target is ops.add][-1]
    assert view.idom[outer_add] is x  # the fork of the three branches
    branch = view.between(x, outer_add)
    assert {n.target for n in branch} == {ops.conv, ops.batch_norm, ops.add}
    assert sum(n.target is ops.conv for n in branch) == 2 and sum(n.target is ops.batch_norm for n in branch) == 3
    dot = to_dot(gm.graph, highlight=branch)
    assert dot.startswith("digraph") and dot.count("fillcolor") == len(branch) and "->" in dot


def test_a_deep_stack_is_merged_with_one_graph_analysis(monkeypatch):
    """Each merge leaves the dominators of the roots still to visit (earlier in the graph) as
    they were, so the pass analyses the graph once, not once per merge (which made it
    quadratic in the depth of RepVGG-like networks)."""
    built = []
    original = DominatorView.__init__
    monkeypatch.setattr(DominatorView, "__init__", lambda self, graph: built.append(1) or original(self, graph))
    model = nn.Sequential(*[RepVGGBlock(4) for _ in range(12)], MobileOneBlock(4, 3, depthwise=True))
    x = torch.randn(2, 4, 9, 9)
    model, gm = deploy(model, x)
    assert merges(gm) == 13 and count(gm, ops.conv) == 13 and len(built) == 1
    assert_same(model, gm, x, torch.randn(1, 4, 6, 11))


def test_a_region_reading_one_value_twice_is_erased_once(recwarn):
    """`y + bn(y)`: the conv feeding both sides is reached twice when the merged region is
    erased; fx warns (an error under -W error) if it is erased twice."""
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return torch.relu(y + self.bn(y))

    x = torch.randn(1, 4, 8, 8)
    model, gm = deploy(Twice(), x)
    assert not [w for w in recwarn if "erase" in str(w.message)]
    assert merges(gm) == 1 and count(gm, ops.conv) == 1
    assert_same(model, gm, x)
