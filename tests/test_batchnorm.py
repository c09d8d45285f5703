"""BatchNorm folding: property tests over conv configurations, awkward cases, bad input."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fxrewrite import CaptureError, InputError, optimize, verify
from fxrewrite.rewrite import ops

from conftest import ConvBNReadElsewhere, count, randomize_bn

CONV = {(1, False): nn.Conv1d, (2, False): nn.Conv2d, (3, False): nn.Conv3d,
        (1, True): nn.ConvTranspose1d, (2, True): nn.ConvTranspose2d, (3, True): nn.ConvTranspose3d}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


@st.composite
def conv_bn(draw):
    nd = draw(st.sampled_from([1, 2, 3]))
    transposed = draw(st.booleans())
    groups = draw(st.sampled_from([1, 2, 3]))
    cin, cout = groups * draw(st.integers(1, 3)), groups * draw(st.integers(1, 3))
    k = draw(st.integers(1, 3))
    stride, dilation = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    kw = dict(stride=stride, dilation=dilation, groups=groups, bias=draw(st.booleans()))
    if transposed:
        kw["padding"] = draw(st.integers(0, (dilation * (k - 1)) // 2))
        kw["output_padding"] = draw(st.integers(0, max(stride, dilation) - 1))
    else:
        kw["padding"] = draw(st.integers(0, 2))
        modes = ["zeros"] + (["reflect", "replicate", "circular"] if kw["padding"] > 0 else [])
        kw["padding_mode"] = draw(st.sampled_from(modes))
    conv = CONV[(nd, transposed)](cin, cout, k, **kw)
    bn = BN[nd](cout, affine=draw(st.booleans()))
    return nn.Sequential(conv, bn), torch.randn(2, cin, *([7] * nd))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv_bn())
def test_fold_any_conv_configuration_float64(case):
    model, x = case
    model = randomize_bn(model).double().eval()
    x = x.double()
    fast = optimize(model, x)
    assert count(fast, ops.batch_norm) == 0, fast.report
    assert fast.report.count("fold_batchnorm") == 1
    verify(model, fast, x, rtol=1e-10)
    verify(model, fast, torch.randn_like(x), rtol=1e-10)  # fresh inputs, not the example


def test_fold_float32_within_1e5():
    model = randomize_bn(nn.Sequential(nn.Conv2d(8, 16, 3, groups=4, dilation=2, stride=2, bias=False),
                                       nn.BatchNorm2d(16))).eval()
    x = torch.randn(2, 8, 17, 17)
    fast = optimize(model, x)
    assert count(fast, ops.batch_norm) == 0
    verify(model, fast, torch.randn_like(x), rtol=1e-5)


def test_linear_bn1d_folds_only_on_2d_outputs():
    folds = randomize_bn(nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5))).double().eval()
    x = torch.randn(4, 6, dtype=torch.float64)
    fast = optimize(folds, x)
    assert count(fast, ops.batch_norm) == 0
    verify(folds, fast, torch.randn_like(x), rtol=1e-10)

    class Seq(nn.Module):  # (N, C, L) into BN1d over axis 1 = L: not the linear's features
        def __init__(self):
            super().__init__()
            self.fc, self.bn = nn.Linear(6, 5), nn.BatchNorm1d(3)

        def forward(self, x):
            return self.bn(self.fc(x))

    m = randomize_bn(Seq()).eval()
    x = torch.randn(2, 3, 6)
    fast = optimize(m, x)
    assert count(fast, ops.batch_norm) == 1
    assert "feature axis" in fast.report.skipped("fold_batchnorm")[0].detail
    verify(m, fast, x)


class SharedConv(nn.Module):
    """One conv module called twice, each call followed by its own BN."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn_a, self.bn_b = nn.BatchNorm2d(4), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn_a(self.conv(x)) + self.bn_b(self.conv(x * 2))


def test_shared_conv_gets_fresh_folded_weights_per_use():
    m = randomize_bn(SharedConv()).double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    fast = optimize(m, x, passes=["fold_batchnorm"])  # merge_branches would also merge the two branches
    assert count(fast, ops.batch_norm) == 0 and count(fast, ops.conv) == 2
    weights = {n.args[1].target for n in fast.graph.nodes if n.target is ops.conv}
    assert len(weights) == 2
    verify(m, fast, torch.randn_like(x), rtol=1e-10)


def test_shared_bn_module_used_twice():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2, self.bn = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.c1(x)) * self.bn(self.c2(x))

    m = randomize_bn(M()).double().eval()
    x = torch.randn(1, 3, 6, 6, dtype=torch.float64)
    fast = optimize(m, x)
    assert count(fast, ops.batch_norm) == 0
    verify(m, fast, torch.randn_like(x), rtol=1e-10)


def test_conv_output_read_elsewhere_is_skipped_with_reason():
    m = randomize_bn(ConvBNReadElsewhere()).eval()
    x = torch.randn(1, 3, 5, 5)
    fast = optimize(m, x)
    assert count(fast, ops.batch_norm) == 1
    assert "users" in fast.report.skipped("fold_batchnorm")[0].detail
    verify(m, fast, x)


def test_train_mode_bn_is_never_folded_and_says_why():
    m = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).train()
    x = torch.randn(4, 3, 8, 8)
    fast = optimize(m, x)
    assert fast.report.count("fold_batchnorm") == 0
    (skip,) = fast.report.skipped("canonicalize")
    assert "training mode" in skip.detail and "eval()" in skip.detail
    # still the same function: batch statistics, and running stats updated like the original
    ref = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).train()
    ref.load_state_dict(m.state_dict())
    torch.testing.assert_close(fast(x), ref(x))


def test_functional_train_mode_batch_norm_is_a_near_miss():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.register_buffer("mean", torch.zeros(4))
            self.register_buffer("var", torch.ones(4))

        def forward(self, x):
            return nn.functional.batch_norm(self.conv(x), self.mean, self.var, training=True)

    fast = optimize(M(), torch.randn(2, 3, 4, 4))
    assert count(fast, ops.batch_norm) == 1
    assert "training is True" in fast.report.skipped("fold_batchnorm")[0].detail


def test_model_without_bn_gets_an_empty_honest_report():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    fast = optimize(m.eval(), torch.randn(1, 3, 8, 8))
    assert not [r for r in fast.report.records if r.action in ("rewrote", "skipped", "removed")]
    assert [r.pass_name for r in fast.report.records] == ["capture"]


def test_untraceable_model_names_the_failure():
    class Dynamic(nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent: neither symbolic_trace nor export can capture it
                return x * 2
            return x - 1

    with pytest.raises(CaptureError) as e:
        optimize(Dynamic(), torch.randn(3))
    assert "symbolic_trace failed" in str(e.value) and "torch.export failed" in str(e.value)


def test_integer_inputs_to_a_float_model_get_an_input_error():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    with pytest.raises(InputError, match="int64"):
        optimize(m, torch.randint(0, 5, (1, 3, 8, 8)))


def test_not_a_module_and_bad_inputs():
    with pytest.raises(TypeError, match="nn.Module"):
        optimize(lambda x: x, torch.randn(2))
    with pytest.raises(TypeError, match="example_inputs"):
        optimize(nn.ReLU(), 3.0)


def test_optimize_twice_changes_nothing_more():
    m = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())).eval()
    x = torch.randn(1, 3, 8, 8)
    once = optimize(m, x)
    twice = optimize(once, x)
    assert twice.report.count("fold_batchnorm") == 0
    assert not [r for r in twice.report.records if r.action == "rewrote"]
    assert count(twice, ops.conv) == count(once, ops.conv) == 1
    verify(m, twice, x)


def test_check_records_the_error_in_the_report():
    m = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).eval()
    fast = optimize(m, torch.randn(1, 3, 8, 8), check=True)
    assert fast.report.error["out"]["max_rel"] < 1e-5
    assert "max rel" in str(fast.report)


def test_folded_weights_are_functions_of_old_weights_and_replay_on_meta():
    m = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).eval()
    fast = optimize(m, torch.randn(1, 3, 8, 8))
    sd = m.state_dict()
    for d in fast.derivations:
        replay = d.fn(*(sd[s] if isinstance(s, str) else s for s in d.sources))
        torch.testing.assert_close(replay, getattr(fast, d.target))
        meta = d.fn(*(sd[s].to("meta") if isinstance(s, str) else s for s in d.sources))
        assert meta.device.type == "meta" and meta.shape == getattr(fast, d.target).shape


def test_bf16_conv_before_fp32_batchnorm_keeps_the_conv_dtype():
    conv = nn.Conv2d(3, 4, 3, bias=False).to(torch.bfloat16)
    bn = nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)

    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = conv, bn

        def forward(self, x):
            return self.bn(self.conv(x))  # bf16 input, fp32 statistics: allowed by batch_norm

    model = Mixed().eval()
    x = torch.randn(1, 3, 8, 8, dtype=torch.bfloat16)
    gm = optimize(model, x)
    weights = dict(gm.named_parameters()) | dict(gm.named_buffers())
    dtypes = {t.dtype for n, t in weights.items() if "bn_weight" in n or "bn_bias" in n}
    assert dtypes == {torch.bfloat16}, (dtypes, gm.report)
    assert verify(model, gm, x, rtol=2e-2).passed
