"""fold_bn_forward: an eval BatchNorm folded into the linears / convs that read it (PRepBN / SLAB
transformers' transpose -> BatchNorm1d -> transpose -> q, k, v). Positive cases counted and
compared in float64 on fresh inputs, negative cases with their reason, running twice changes
nothing, and the torch.compile route."""
from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
import torch.nn as nn
import torch.nn.functional as F

from fxrewrite import backend, optimize, verify
from fxrewrite.passes.batchnorm_forward import FOLD_BN_FORWARD, ZERO_PADDING, conv_in_bias, conv_in_weight
from fxrewrite.rewrite import ops

from conftest import count, rewrote, skipped

NAME = "fold_bn_forward"


def random_bn(model: nn.Module) -> nn.Module:
    """Eval mode, BN statistics and affine drawn at random (var in [0.5, 2], mean ~ N(0, 1))."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                if m.weight is not None:
                    m.weight.normal_()
                    m.bias.normal_()
    return model.eval()


def fold(model, x, passes, *, folds=1):
    """Optimise, check the count, exactness in float64 on a fresh input, the user's model
    untouched and a second run that changes nothing; returns the optimised module."""
    state = copy.deepcopy(model.state_dict())
    fast = optimize(model, x, passes=passes)
    assert fast.report.count(NAME) == folds, fast.report
    assert verify(model, fast, torch.randn_like(x), float64=True).max_rel < 1e-10
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    twice = optimize(fast, x, passes=passes)
    assert twice.report.count(NAME) == 0, twice.report
    torch.testing.assert_close(twice(x), fast(x), rtol=0, atol=0)
    return fast


def skip_reason(model, x, passes):
    """The one reason the pass gives for leaving the BN, which must still be there."""
    fast = optimize(model, x, passes=passes)
    assert fast.report.count(NAME) == 0 and count(fast, ops.batch_norm) == 1, fast.report
    assert verify(model, fast, torch.randn_like(x), float64=True).max_rel < 1e-10
    [r] = skipped(fast, NAME)
    return r.detail


# ---------------------------------------------------------------- SLAB / PRepBN

class SlabAttention(nn.Module):
    """(B, N, C) -> transpose -> BatchNorm1d -> transpose -> q, k, v -> softmax attention."""

    def __init__(self, c=8, bias=True, affine=True):
        super().__init__()
        self.norm = nn.BatchNorm1d(c, affine=affine)
        self.q, self.k = nn.Linear(c, c, bias=bias), nn.Linear(c, c, bias=bias)
        self.v = nn.Linear(c, 6, bias=not bias)

    def forward(self, x):
        y = self.norm(x.transpose(1, 2)).transpose(1, 2)
        q, k, v = self.q(y), self.k(y), self.v(y)
        return torch.softmax(q @ k.transpose(-2, -1) / 8 ** 0.5, dim=-1) @ v


@pytest.mark.parametrize("bias, affine", [(True, True), (False, True), (True, False)])
def test_slab_block_folds_into_q_k_v(bias, affine):
    model, x = random_bn(SlabAttention(bias=bias, affine=affine)), torch.randn(2, 5, 8)
    fast = fold(model, x, ["exact"])
    assert count(fast, ops.batch_norm) == 0 and count(fast, ops.linear) == 3
    [r] = rewrote(fast, NAME)
    assert r.node == "norm" and "3 reader(s)" in r.detail
    assert all(f"{name} -> aten.linear" in r.detail for name in "qkv")
    assert all(ops.arg(n, "bias") is not None for n in fast.graph.nodes if n.target is ops.linear)


def test_slab_block_through_reshape_views():
    """BatchNorm1d over (B*N, C) rows: flatten -> BN -> view back -> Linear (features in order)."""
    class Rows(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn, self.fc = nn.BatchNorm1d(6), nn.Linear(6, 4)

        def forward(self, x):
            return self.fc(self.bn(x.flatten(0, 1)).view(x.shape[0], -1, 6)).relu()

    fast = fold(random_bn(Rows()), torch.randn(3, 5, 6), [FOLD_BN_FORWARD])
    assert count(fast, ops.batch_norm) == 0


def test_channel_permuting_views_fold_with_the_permutation():
    """(B, C, L) -> BN -> a channel shuffle in 2 groups -> transpose -> Linear: feature j of the
    linear holds BN channel c(j), a permutation."""
    class Shuffle(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn, self.fc = nn.BatchNorm1d(6), nn.Linear(6, 3)

        def forward(self, x):
            y = self.bn(x)
            b, c, n = y.shape
            return self.fc(y.view(b, 2, 3, n).transpose(1, 2).reshape(b, c, n).transpose(1, 2))

    fold(random_bn(Shuffle()), torch.randn(2, 6, 4), [FOLD_BN_FORWARD])


def test_batchnorm1d_on_3d_input_does_not_map_onto_linear_features():
    """(B, C, L) -> BatchNorm1d(C) -> Linear(L, ...): the linear contracts L, the BN scales C."""
    class NoMap(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn, self.fc = nn.BatchNorm1d(4), nn.Linear(6, 5)

        def forward(self, x):
            return self.fc(self.bn(x))

    reason = skip_reason(random_bn(NoMap()), torch.randn(2, 4, 6), ["exact"])
    assert reason.startswith("fc (aten.linear): the BatchNorm's channel axis (axis 1 of [2, 4, 6]) does not map")
    assert "mixes channels" in reason and reason.endswith("the BatchNorm stays as it is")


# ---------------------------------------------------------------- convolutions

class BNConv(nn.Module):
    def __init__(self, cin=4, cout=6, k=3, residual=False, **conv):
        super().__init__()
        self.bn, self.conv, self.residual = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, k, **conv), residual

    def forward(self, x):
        y = self.bn(x)
        return self.conv(y) + y if self.residual else self.conv(y)


@pytest.mark.parametrize("conv", [dict(), dict(groups=2), dict(groups=2, stride=2, dilation=2, bias=False)])
def test_bn_into_unpadded_conv(conv):
    fast = fold(random_bn(BNConv(**conv)), torch.randn(2, 4, 9, 8), [FOLD_BN_FORWARD])
    assert count(fast, ops.batch_norm) == 0 and count(fast, ops.conv) == 1


def test_batchnorm1d_into_conv1d():
    class BNConv1d(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn, self.conv = nn.BatchNorm1d(4), nn.Conv1d(4, 6, 3, groups=2)

        def forward(self, x):
            return self.conv(self.bn(x))

    fold(random_bn(BNConv1d()), torch.randn(2, 4, 9), [FOLD_BN_FORWARD])


def test_bn_into_conv_with_reflect_padding():
    """padding_mode='reflect' becomes aten.pad(reflect) -> conv: the padded values are copies of
    BN outputs, so the affine commutes with the pad (merge_branches leaves this one)."""
    fast = fold(random_bn(BNConv(padding=1, padding_mode="reflect")), torch.randn(2, 4, 7, 7),
                ["exact"])
    assert count(fast, ops.batch_norm) == 0 and count(fast, ops.pad) == 1


def test_bn_read_by_two_convs_folds_into_both():
    """merge_branches merges single-root regions; a BN read by two convs is left to this pass."""
    class TwoConvs(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(4)
            self.a, self.b = nn.Conv2d(4, 3, 1), nn.Conv2d(4, 3, 3, groups=1)

        def forward(self, x):
            y = self.bn(x)
            return self.a(y)[..., 1:-1, 1:-1] * self.b(y)

    fast = fold(random_bn(TwoConvs()), torch.randn(2, 4, 6, 6), ["exact"])
    [r] = rewrote(fast, NAME)
    assert "2 reader(s): a -> aten.convolution" in r.detail and "b -> aten.convolution" in r.detail


def test_zero_padded_conv_is_skipped():
    reason = skip_reason(random_bn(BNConv(padding=1)), torch.randn(2, 4, 7, 7), [FOLD_BN_FORWARD])
    assert reason == f"conv (aten.convolution) has padding [1, 1]: {ZERO_PADDING}; the BatchNorm stays as it is"


class Padded(BNConv):
    """BN -> an explicit pad (a function of the BN output) -> conv without padding of its own."""

    def __init__(self, pad):
        super().__init__()
        self.pad = pad

    def forward(self, x):
        return self.conv(self.pad(self.bn(x)))


@pytest.mark.parametrize("pad", [lambda y: F.pad(y, (1, 1, 1, 1)), lambda y: torch.constant_pad_nd(y, (1, 1, 0, 0))],
                         ids=["F.pad", "constant_pad_nd"])
def test_explicit_zero_pad_before_conv_is_skipped(pad):
    reason = skip_reason(random_bn(Padded(pad)), torch.randn(2, 4, 7, 7), ["exact"])
    assert f"(a constant pad with 0): {ZERO_PADDING}" in reason, reason


def test_explicit_constant_pad_with_a_value_is_skipped():
    reason = skip_reason(random_bn(Padded(lambda y: F.pad(y, (1, 1, 1, 1), value=2.0))), torch.randn(2, 4, 7, 7),
                         [FOLD_BN_FORWARD])
    assert "pads with the constant 2.0" in reason, reason


@pytest.mark.parametrize("pad", [lambda y: F.pad(y, (2, 1, 1, 0), mode="replicate"),
                                 lambda y: F.pad(y, (1, 1, 1, 1), mode="circular"),
                                 lambda y: F.pad(y, (-1, 0, 0, -1))],
                         ids=["replicate", "circular", "crop"])
def test_copying_or_cropping_pad_before_conv_folds(pad):
    fast = fold(random_bn(Padded(pad)), torch.randn(2, 4, 7, 7), ["exact"])
    assert count(fast, ops.batch_norm) == 0


def test_residual_reader_stops_the_fold_naming_it():
    model, x = random_bn(BNConv(cout=4, k=1, residual=True)), torch.randn(2, 4, 5, 5)
    reason = skip_reason(model, x, [FOLD_BN_FORWARD])
    assert reason.startswith("add (aten.add) reads bn: not a linear or convolution"), reason
    # in the default pipeline merge_branches takes the whole region (BN, conv, identity) first
    fast = optimize(model, x, passes=["exact"])
    assert fast.report.count("merge_branches") == 1 and count(fast, ops.batch_norm) == 0
    assert not skipped(fast, NAME)


def test_bn_output_returned_stops_the_fold():
    class Returned(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn, self.fc = nn.BatchNorm1d(4), nn.Linear(4, 2)

        def forward(self, x):
            y = self.bn(x)
            return self.fc(y), y

    model, x = random_bn(Returned()), torch.randn(3, 4)
    fast = optimize(model, x, passes=[FOLD_BN_FORWARD])
    [r] = skipped(fast, NAME)
    assert "output" in r.detail and count(fast, ops.batch_norm) == 1


def test_conv_math_matches_a_bn_then_conv_in_float64():
    """The derivation functions alone: conv(x s + t; W, b) = conv(x; W', b') without padding."""
    torch.manual_seed(1)
    w, b = torch.randn(6, 2, 3, 3, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    s, t = torch.rand(4, dtype=torch.float64) + 0.5, torch.randn(4, dtype=torch.float64)
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64)
    ref = F.conv2d(x * s.view(1, -1, 1, 1) + t.view(1, -1, 1, 1), w, b, groups=2)
    out = F.conv2d(x, conv_in_weight(w, s, 2), conv_in_bias(w, b, t, 2), groups=2)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- torch.compile

@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_slab_block_under_torch_compile(fresh_dynamo):
    """Through the backend, and again after Dynamo recompiles with dynamic batch and sequence
    sizes: transposes move the channel axis the same way whatever the sizes, so it still folds."""
    model = random_bn(SlabAttention())
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(model, backend="rewrite",
                             options={"passes": ["exact"], "compiler": record})
    for shape in [(2, 5, 8), (3, 7, 8)]:
        x = torch.randn(shape)
        with torch.no_grad():
            out, ref = compiled(x), model(x)
        assert (out - ref).abs().max() < 1e-5
        assert backend.last_report().count(NAME) == 1, backend.last_report()
    assert len(graphs) == 2
    assert not any(n.op == "call_function" and "batch_norm" in str(n.target)
                   for gm in graphs for n in gm.graph.nodes)
