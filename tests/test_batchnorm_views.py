"""BatchNorm folded through views (flatten / reshape / permute / transpose / ...) into the conv or
linear that feeds it: positive cases counted and compared in float64 on fresh inputs, negative
cases with their reason, timm's LeViT, and the torch.compile route."""
from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
import torch.nn as nn

from fxrewrite import backend, optimize, verify
from fxrewrite.rewrite import ops

from conftest import count, randomize_bn


class LinearNorm(nn.Module):
    """timm LeViT's LinearNorm: Linear -> flatten(0, 1) -> BatchNorm1d -> reshape_as."""

    def __init__(self, cin=6, cout=5):
        super().__init__()
        self.linear, self.bn = nn.Linear(cin, cout, bias=False), nn.BatchNorm1d(cout)

    def forward(self, x):
        x = self.linear(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


class Chain(nn.Module):
    """producer -> views(...) -> BatchNorm, the views given as a function."""

    def __init__(self, producer, bn, views):
        super().__init__()
        self.producer, self.bn, self.views = producer, bn, views

    def forward(self, x):
        return self.bn(self.views(self.producer(x)))


def _shuffle(y):  # conv (B, 6, H, W) -> channel shuffle in 2 groups -> (B, 6, H, W)
    b, c, h, w = y.shape
    return y.view(b, 2, c // 2, h, w).transpose(1, 2).reshape(b, c, h, w)


def _feature_shuffle(y):  # linear (B, N, 6) -> (B*N, 6) with its features shuffled
    b, n, c = y.shape
    return y.view(b, n, 2, c // 2).transpose(2, 3).reshape(b * n, c)


def _fold(model, x, *, folds=1, **kw):
    model = randomize_bn(model).double().eval()
    x = x.double()
    state = copy.deepcopy(model.state_dict())
    fast = optimize(model, x, **kw)
    assert count(fast, ops.batch_norm) == 0, fast.report
    assert fast.report.count("fold_batchnorm") == folds, fast.report
    assert verify(model, fast, torch.randn_like(x), float64=True).max_rel < 1e-10
    for k, v in model.state_dict().items():  # the model given stays untouched
        assert torch.equal(v, state[k]), k
    return fast


def test_levit_linear_norm_folds_through_flatten_and_reshape_as():
    fast = _fold(LinearNorm(), torch.randn(2, 7, 6))
    (rewrite,) = [r for r in fast.report.records if r.pass_name == "fold_batchnorm"]
    assert rewrite.detail.startswith("fold_bn_through_views:") and "flatten" in rewrite.detail
    assert count(fast, ops.linear) == 1


@pytest.mark.parametrize("name, producer, bn, views, shape", [
    ("conv_flatten", nn.Conv2d(3, 4, 3), nn.BatchNorm1d(4), lambda y: y.flatten(2), (2, 3, 6, 5)),
    ("linear_transpose", nn.Linear(6, 5), nn.BatchNorm1d(5), lambda y: y.transpose(1, 2), (2, 7, 6)),
    ("conv_permute_back", nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4),
     lambda y: y.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2), (2, 3, 5, 4)),
    ("conv1d_unsqueeze", nn.Conv1d(3, 4, 3), nn.BatchNorm2d(4), lambda y: y.unsqueeze(-1), (2, 3, 9)),
    ("linear_2d_view", nn.Linear(6, 5), nn.BatchNorm1d(5), lambda y: y.view(-1, 5), (4, 6)),
    ("linear_unflatten_squeeze", nn.Linear(6, 5), nn.BatchNorm1d(5),
     lambda y: torch.flatten(y.unflatten(0, (2, 3)), 0, 1).unsqueeze(1).squeeze(1), (6, 6)),
    ("transposed_conv_flatten", nn.ConvTranspose2d(4, 6, 3, groups=2), nn.BatchNorm1d(6),
     lambda y: y.flatten(2), (2, 4, 5, 5)),
    ("conv_channel_shuffle", nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), _shuffle, (2, 3, 7, 7)),
    ("linear_feature_shuffle", nn.Linear(4, 6), nn.BatchNorm1d(6), _feature_shuffle, (2, 5, 4)),
])
def test_views_that_keep_the_channel_axis_fold(name, producer, bn, views, shape):
    fast = _fold(Chain(producer, bn, views), torch.randn(*shape))
    (rewrite,) = [r for r in fast.report.records if r.pass_name == "fold_batchnorm"]
    assert rewrite.detail.startswith("fold_bn_through_views:"), rewrite.detail
    assert ("channels permuted" in rewrite.detail) == name.endswith("shuffle"), rewrite.detail


def test_folded_weights_replay_from_the_old_tensors():
    model = randomize_bn(Chain(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), _shuffle)).eval()
    fast = optimize(model, torch.randn(2, 3, 7, 7))
    sd = model.state_dict()
    assert len(fast.derivations) == 2
    for d in fast.derivations:
        args = [sd[s] if isinstance(s, str) else s for s in d.sources]
        torch.testing.assert_close(d.fn(*args), getattr(fast, d.target))
        meta = d.fn(*(a.to("meta") if isinstance(a, torch.Tensor) else a for a in args))
        assert meta.device.type == "meta" and meta.shape == getattr(fast, d.target).shape


def _skipped(model, x):
    model = randomize_bn(model).double().eval()
    x = x.double()
    fast = optimize(model, x)
    assert count(fast, ops.batch_norm) == 1 and fast.report.count("fold_batchnorm") == 0
    assert verify(model, fast, torch.randn_like(x), float64=True).max_rel < 1e-10
    (skip,) = fast.report.skipped("fold_batchnorm")
    assert skip.detail.startswith("fold_bn_through_views:"), skip.detail  # the closest rule, not the conv one
    return skip.detail


def test_reshape_that_mixes_channels_with_space_is_skipped_with_reason():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm1d(4 * 5)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y.reshape(y.shape[0], 4 * 5, 6))

    detail = _skipped(M(), torch.randn(2, 3, 5, 6))
    assert "mixes the aten.convolution output's channel axis" in detail, detail


def test_linear_features_on_the_wrong_axis_are_skipped_with_reason():
    # (B, N, C) -> contiguous -> BatchNorm1d(N): axis 1 is N, each slice holds all the features
    detail = _skipped(Chain(nn.Linear(6, 5), nn.BatchNorm1d(3), lambda y: y.contiguous()), torch.randn(2, 3, 6))
    assert "mixes the aten.linear output's channel axis" in detail, detail


def test_producer_with_a_second_reader_is_skipped_with_reason():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear, self.bn = nn.Linear(6, 5), nn.BatchNorm1d(5)

        def forward(self, x):
            y = self.linear(x)
            return self.bn(y.flatten(0, 1)).reshape_as(y) + y  # y itself is read again

    detail = _skipped(M(), torch.randn(2, 3, 6))
    assert "linear has other readers (add)" in detail, detail


def test_view_with_a_second_reader_is_skipped_with_reason():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm1d(4)

        def forward(self, x):
            f = self.conv(x).flatten(2)
            return self.bn(f) * f.sigmoid()

    detail = _skipped(M(), torch.randn(2, 3, 5, 5))
    assert "flatten has other readers (sigmoid)" in detail, detail


def test_view_of_something_else_names_the_views_rule():
    detail = _skipped(Chain(nn.ReLU(), nn.BatchNorm1d(4), lambda y: y.flatten(2)), torch.randn(2, 4, 3, 3))
    assert "not a convolution or linear output" in detail and "relu" in detail, detail


def test_optimize_twice_changes_nothing_more():
    once = optimize(randomize_bn(LinearNorm()).eval(), torch.randn(2, 7, 6))
    twice = optimize(once, torch.randn(2, 7, 6))
    assert twice.report.count("fold_batchnorm") == 0
    assert not [r for r in twice.report.records if r.action == "rewrote"]


def _bn_count(model) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_timm_levit_folds_nearly_every_batchnorm():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = randomize_bn(timm.create_model("levit_128s", pretrained=False)).eval()
    x = torch.randn(2, 3, 224, 224)
    fast = optimize(model, x)
    total, folded = _bn_count(model), fast.report.count("fold_batchnorm")
    assert total == 52 and folded >= 0.95 * total, fast.report
    # the two not folded are the heads' BatchNorm1d, which read a mean (merge_branches then folds
    # them into the linear after them)
    assert {s.node for s in fast.report.skipped("fold_batchnorm")} == {"head_bn", "head_dist_bn"}
    assert count(fast, ops.batch_norm) == 0
    assert verify(model, fast, torch.randn_like(x), float64=True).max_rel < 1e-10


class LeViTBlock(nn.Module):
    """Two LinearNorms around a hardswish, a residual, as a LeViT MLP."""

    def __init__(self, c=8):
        super().__init__()
        self.ln1, self.ln2 = LinearNorm(c, 2 * c), LinearNorm(2 * c, c)

    def forward(self, x):
        return x + self.ln2(nn.functional.hardswish(self.ln1(x)))


def test_torch_compile_route_folds_through_views():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = randomize_bn(LeViTBlock()).double().eval()
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    x = torch.randn(2, 5, 8, dtype=torch.float64)
    try:
        with torch.no_grad():
            out = torch.compile(model, backend="rewrite", options={"compiler": record})(x)
            ref = model(x)
    finally:
        torch._dynamo.reset()
    assert (out - ref).abs().max() / ref.abs().max() < 1e-12
    assert backend.last_report().count("fold_batchnorm") == 2, backend.last_report()
    bns = [n for n in graphs[-1].graph.nodes if "batch_norm" in str(n.target)]
    assert not bns, graphs[-1].graph


class UntraceableLinearNorm(LinearNorm):
    """LinearNorm that symbolic_trace cannot capture (control flow on the rank): torch.export does."""

    def forward(self, x):
        if x.dim() == 3:
            return super().forward(x)
        return x


def test_export_route_folds_static_shapes_and_names_a_symbolic_batch():
    model = randomize_bn(UntraceableLinearNorm()).double().eval()
    x = torch.randn(4, 7, 6, dtype=torch.float64)
    static = optimize(model, x, dynamic=False)
    assert count(static, ops.batch_norm) == 0 and static.report.count("fold_batchnorm") == 1, static.report
    assert verify(model, static, torch.randn_like(x), float64=True).max_rel < 1e-10
    # a dynamic batch: one example size would not prove the channel map for every size
    dynamic = optimize(model, x)
    (skip,) = dynamic.report.skipped("fold_batchnorm")
    assert "fold_bn_through_views" in skip.detail and "symbolic" in skip.detail, skip
    assert verify(model, dynamic, torch.randn(3, 7, 6, dtype=torch.float64), float64=True).max_rel < 1e-10
