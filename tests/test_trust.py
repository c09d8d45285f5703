"""Regression tests for models that `optimize` used to return silently wrong (or crash on):
reads moved past in-place mutations, dropped hooks, parametrized weights, channels-last merged
weights, the user's model or inputs changed, extra example inputs, near misses without a reason."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
from torch.nn.utils.parametrizations import weight_norm

from fxrewrite import InputError, optimize, verify
from fxrewrite.rewrite import ops
from tests.conftest import count, randomize_bn


def _fresh_check(model, fast, shape, dtype=torch.float32):
    """Outputs on a fresh input (not the example), each side on its own copy of it."""
    x = torch.randn(shape, dtype=dtype)
    with torch.no_grad():
        want = model(x.clone())
        got = fast(x.clone())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- reads moved past mutations

class _ReluOnInputAfterConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.conv(x)
        x.relu_()
        return torch.cat([self.bn(y), x], 1)


class _AddOnInputBetweenBranches(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 3, 1)

    def forward(self, x):
        a = self.c1(x)
        x.add_(1.0)
        return a + self.c2(x)


def test_bn_fold_never_reads_an_input_after_it_was_mutated():
    model = randomize_bn(_ReluOnInputAfterConv()).eval()
    fast = optimize(model, torch.randn(2, 3, 8, 8))
    _fresh_check(model, fast, (2, 3, 8, 8))
    assert count(fast, ops.batch_norm) == 1
    reasons = [r.detail for r in fast.report.skipped("fold_batchnorm")]
    assert any("writes in place in between" in r for r in reasons), reasons


def test_branch_merge_never_reads_an_input_after_it_was_mutated():
    model = _AddOnInputBetweenBranches().eval()
    fast = optimize(model, torch.randn(2, 3, 8, 8))
    _fresh_check(model, fast, (2, 3, 8, 8))
    assert count(fast, ops.conv) == 2
    assert any("writes in place in between" in r.detail for r in fast.report.skipped("merge_branches"))


def test_the_same_through_the_export_route():
    class Untraceable(_ReluOnInputAfterConv):
        def forward(self, x):
            if x.shape[-1] > 4:  # a Python branch on a shape: symbolic_trace fails, export does not
                return super().forward(x)
            return x

    model = randomize_bn(Untraceable()).eval()
    fast = optimize(model, torch.randn(2, 3, 8, 8))
    assert "torch.export" in str(fast.report)
    _fresh_check(model, fast, (2, 3, 8, 8))


def test_a_mutation_before_every_read_does_not_block_folding():
    class ReluFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 3, 3), nn.BatchNorm2d(3)

        def forward(self, x):
            x.relu_()
            return self.bn(self.conv(x))

    model = randomize_bn(ReluFirst()).eval()
    fast = optimize(model, torch.randn(2, 3, 8, 8))
    assert fast.report.count("fold_batchnorm") == 1
    _fresh_check(model, fast, (2, 3, 8, 8))


# ---------------------------------------------------------------- hooks

@pytest.mark.parametrize("kind", ["forward", "pre"])
def test_hooks_on_a_leaf_module_are_kept(kind):
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())).eval()
    if kind == "forward":
        model[0].register_forward_hook(lambda m, i, o: o * 2)
    else:
        model[0].register_forward_pre_hook(lambda m, i: (i[0] * 2,))
    fast = optimize(model, torch.randn(1, 3, 8, 8))
    _fresh_check(model, fast, (1, 3, 8, 8))
    skips = [r.detail for r in fast.report.skipped("canonicalize")]
    assert any("kept as a module call" in s and "hook" in s for s in skips), skips


def test_hooks_on_a_module_traced_through_are_kept():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            return self.conv(x) + 1

    model = nn.Sequential(Block(), nn.ReLU()).eval()
    model[0].register_forward_hook(lambda m, i, o: o * 3)
    fast = optimize(model, torch.randn(1, 3, 4, 4))
    _fresh_check(model, fast, (1, 3, 4, 4))


def test_hooks_on_the_model_itself_are_kept():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    model.register_forward_hook(lambda m, i, o: o - 5)
    fast = optimize(model, torch.randn(1, 3, 8, 8))
    _fresh_check(model, fast, (1, 3, 8, 8))


# ---------------------------------------------------------------- parametrized weights

def test_parametrized_weight_norm_conv_becomes_a_conv_with_its_weight_folded():
    model = nn.Sequential(weight_norm(nn.Conv2d(4, 4, 3)), nn.ReLU()).eval()
    fast = optimize(model, torch.randn(1, 4, 8, 8))
    _fresh_check(model, fast, (1, 4, 8, 8))
    assert fast.report.count("fold_constants") == 1
    assert not [n for n in fast.graph.nodes if n.op == "call_module"]


def test_legacy_weight_norm_hook_becomes_its_computation():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        conv = torch.nn.utils.weight_norm(nn.Conv2d(4, 4, 3))
    model = nn.Sequential(conv, nn.ReLU()).eval()
    fast = optimize(model, torch.randn(1, 4, 8, 8))
    _fresh_check(model, fast, (1, 4, 8, 8))
    assert fast.report.count("fold_constants") == 1


def test_a_users_own_pre_hook_keeps_the_module_a_call():
    conv = nn.Conv2d(4, 4, 3)
    conv.register_forward_pre_hook(lambda mod, args: (args[0] * 2,))
    model = nn.Sequential(conv, nn.ReLU()).eval()
    fast = optimize(model, torch.randn(1, 4, 8, 8))
    _fresh_check(model, fast, (1, 4, 8, 8))
    assert any("hook" in r.detail for r in fast.report.skipped("canonicalize"))


# ---------------------------------------------------------------- memory format

def test_merged_weights_are_contiguous_and_views_after_them_work():
    class ConvChainThenView(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 3)

        def forward(self, x):
            y = self.b(self.a(x))
            return y.view(y.shape[0], -1)

    model = ConvChainThenView().eval()
    fast = optimize(model, torch.randn(2, 4, 8, 8))
    assert fast.report.count("merge_branches") == 1
    assert all(t.is_contiguous() for t in list(fast.parameters()) + list(fast.buffers()))
    _fresh_check(model, fast, (2, 4, 8, 8))


def test_merged_1x1_weights_have_row_major_strides():
    """Two 1x1 convs merged through an einsum: `.contiguous()` would keep strides like
    (16, 1, 16, 16), which oneDNN and torch.export read as channels-last (export then fixed a
    dynamic batch of 1 and ONNX export failed on torchvision's mobilenet_v3_small)."""
    model = nn.Sequential(nn.Conv2d(16, 16, 1), nn.Conv2d(16, 72, 1)).eval()
    fast = optimize(model, torch.randn(2, 16, 4, 4))
    assert fast.report.count("merge_branches") == 1
    for t in list(fast.parameters()) + list(fast.buffers()):
        expected = torch.empty(t.shape).stride()
        assert t.stride() == expected, (t.shape, t.stride())
    _fresh_check(model, fast, (2, 16, 4, 4))


# ---------------------------------------------------------------- the user's things stay

def test_train_mode_batchnorm_statistics_stay_in_the_copy_and_the_user_model():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = optimize(model, torch.randn(2, 3, 8, 8))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    # the optimized copy starts from the same statistics as the user's model
    got = {k.replace("_", "."): v for k, v in fast.state_dict().items()}
    assert torch.equal(fast.get_submodule("1").running_mean, before["1.running_mean"]), got.keys()


@pytest.mark.parametrize("layout", [None, "channels_last"])
def test_a_model_that_writes_into_its_input_leaves_the_example_input_alone(layout):
    class ScalesItsInput(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            x.mul_(2)
            return self.conv(x)

    model = ScalesItsInput().eval()
    x = torch.randn(1, 3, 4, 4)
    x0 = x.clone()
    fast = optimize(model, x, check=True, layout=layout)
    assert torch.equal(x, x0)
    _fresh_check(model, fast, (1, 3, 4, 4))


def test_channels_last_fallback_prints_nothing(capfd):
    class NeedsNCHW(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            y = self.conv(x)
            return y.view(y.shape[0], -1)

    fast = optimize(NeedsNCHW().eval(), torch.randn(2, 3, 8, 8), layout="channels_last")
    assert fast.report.skipped("layout")
    out, err = capfd.readouterr()
    assert "Traceback" not in err and "FX-traced" not in err, err


# ---------------------------------------------------------------- inputs and near misses

def test_extra_example_inputs_are_an_error():
    model = nn.Sequential(nn.Conv2d(4, 4, 1)).eval()
    x = torch.randn(1, 4, 8, 8)
    with pytest.raises(InputError, match="does not take the example inputs"):
        optimize(model, (x, x))
    with pytest.raises(InputError, match="does not take the example inputs"):
        optimize(model, {"nope": x})


def test_asymmetric_same_padding_is_a_near_miss_with_a_reason():
    model = nn.Sequential(nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 2, padding="same")).eval()
    fast = optimize(model, torch.randn(1, 4, 8, 8))
    _fresh_check(model, fast, (1, 4, 8, 8))
    reasons = [r.detail for r in fast.report.skipped("merge_branches")]
    assert any("asymmetric zero padding" in r for r in reasons), reasons


def test_a_pad_the_library_inserts_has_a_shape_so_merging_goes_on_after_it():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), nn.Conv2d(4, 4, 1)).eval()
    fast = optimize(model, torch.randn(1, 4, 8, 8))
    assert fast.report.count("merge_branches") == 1, fast.report
    assert not any("unknown" in r.detail for r in fast.report.skipped())
    _fresh_check(model, fast, (1, 4, 8, 8))


def test_float64_check_of_the_fixed_cases_is_exact():
    model = randomize_bn(_ReluOnInputAfterConv()).eval()
    x = torch.randn(2, 3, 8, 8)
    fast = optimize(model, x)
    assert verify(model, fast, x, float64=True).max_rel < 1e-12


def test_optimize_leaves_the_callers_random_stream_alone():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5)).train()
    x = torch.randn(2, 4)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    optimize(model, x, check=True)
    assert torch.equal(torch.rand(3), expected)


def test_channels_last_is_kept_for_a_bfloat16_model():
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3)))
    model = model.eval().to(torch.bfloat16)
    fast = optimize(model, torch.randn(2, 3, 12, 12, dtype=torch.bfloat16), layout="channels_last")
    assert fast.report.count("layout") == 1, fast.report.skipped("layout")


def test_float64_verify_of_a_lowered_model_says_why_it_cannot():
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.GELU()).eval()
    x = torch.randn(4, 8)
    fast = optimize(model, x, lower="triton")
    with pytest.raises(ValueError, match="lowered Triton regions"):
        verify(model, fast, x, float64=True)


@torch.fx.wrap
def _add_cls_shortcut(x, shortcut):
    """As torchvision's MViT: writes its first input in place; nothing reads what it returns."""
    x[:, 1:] += shortcut[:, 1:]
    return x


class WrappedInPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        y = self.lin(x)
        _add_cls_shortcut(y, x)
        return y.transpose(0, 1)


def test_a_wrapped_function_that_writes_its_input_is_kept():
    model = WrappedInPlace().eval()
    fast = optimize(model, torch.randn(3, 5, 4))
    x = torch.randn(3, 5, 4)
    torch.testing.assert_close(fast(x), model(x), rtol=0, atol=0)
