"""`verify`: tolerances that follow the dtype, the float64 replay of derived weights, and runs
that leave the user's model, inputs and RNG as they were."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from fxrewrite import VerificationError, optimize, verify

from conftest import randomize_bn


def conv_bn_relu(dtype=torch.float32):
    return randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())).eval().to(dtype)


class RepVGGBlock(nn.Module):
    """3x3 conv+BN + 1x1 conv+BN + identity BN, summed."""

    def __init__(self, c):
        super().__init__()
        self.dense = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
        self.one = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c))
        self.identity = nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(self.dense(x) + self.one(x) + self.identity(x))


# ------------------------------------------------------------------ tolerances that follow the dtype


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_bn_fold_passes_check_and_the_report_says_which_tolerance(dtype):
    m = conv_bn_relu(dtype)
    fast = optimize(m, torch.randn(2, 3, 16, 16, dtype=dtype), check=True)
    name = str(dtype).removeprefix("torch.")
    assert fast.report.count("fold_batchnorm") == 1
    tolerance = fast.report.error["out"]["tolerance"]  # the larger of 8 x eager's rounding and 4 ulps
    assert f"eager's own {name} rounding" in tolerance or f"4 x {name} eps" in tolerance, tolerance
    assert tolerance in fast.report.table()


def test_a_real_mistake_is_still_caught_in_bfloat16():
    m = conv_bn_relu(torch.bfloat16)
    x = torch.randn(2, 3, 16, 16, dtype=torch.bfloat16)
    assert verify(m, optimize(m, x), x).passed
    off = optimize(m, x)
    with torch.no_grad():
        off.get_parameter("0_bn_weight").mul_(1.1)  # folded weights 10% off: ~3x past the tolerance
    with pytest.raises(VerificationError, match="FAIL"):
        verify(m, off, x)
    with torch.no_grad():
        m[1].running_var.uniform_(1e-3, 1e-2)  # small variances: BN's eps matters
    wrong_eps = copy.deepcopy(m)
    wrong_eps[1].eps = 1e-3
    assert verify(m, optimize(m, x), x).passed
    with pytest.raises(VerificationError):
        verify(m, optimize(wrong_eps, x), x)


def test_given_tolerances_are_used_as_given_and_named():
    m = conv_bn_relu()
    x = torch.randn(2, 3, 16, 16)
    result = verify(m, optimize(m, x), x, rtol=1e-5)
    assert result.outputs["out"].tolerance == "rtol 1e-05"
    assert "rtol=1e-05" in str(result)


def test_without_a_float64_run_a_fixed_rtol_per_dtype_and_a_note():
    class Float64Shy(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            if x.dtype == torch.float64:
                raise TypeError("no float64 kernel here")
            return self.lin(x)

    m = Float64Shy().to(torch.bfloat16)
    x = torch.randn(3, 4, dtype=torch.bfloat16)
    result = verify(m, copy.deepcopy(m), x)
    assert result.outputs["out"].tolerance == "rtol 0.03125 (bfloat16 default)"
    assert any("float64 copy of the reference failed (TypeError" in n for n in result.notes)


# ------------------------------------------------------------------ float64 replays the derivations


def test_float64_replay_makes_a_float32_bn_fold_exact():
    m = conv_bn_relu()
    x = torch.randn(2, 3, 16, 16)
    result = verify(m, optimize(m, x), x, float64=True)
    assert not result.replay_partial
    assert result.max_rel <= 1e-13


def test_float64_replay_makes_a_float32_repvgg_merge_exact():
    m = randomize_bn(nn.Sequential(RepVGGBlock(8), RepVGGBlock(8))).eval()
    x = torch.randn(2, 8, 12, 12)
    fast = optimize(m, x)
    assert fast.report.count("merge_branches") == 2
    result = verify(m, fast, torch.randn_like(x), float64=True)
    assert not result.replay_partial
    assert result.max_rel <= 1e-13


# ------------------------------------------------------------------ verify changes nothing of the user's


def test_check_on_a_train_mode_model_changes_neither_its_statistics_nor_the_input():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5), nn.ReLU()).train()
    state = copy.deepcopy(m.state_dict())
    x = torch.randn(2, 3, 8, 8)
    x0 = x.clone()
    fast = optimize(m, x, check=True)  # the same dropout masks in both runs: no false mismatch
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in state.items())
    assert torch.equal(x, x0)
    fast_state, rng = copy.deepcopy(fast.state_dict()), torch.get_rng_state()
    assert verify(m, fast, x).max_abs == 0.0
    assert all(torch.equal(v, fast.state_dict()[k]) for k, v in fast_state.items())  # repeatable
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in state.items())
    assert torch.equal(rng, torch.get_rng_state())


def test_a_model_that_writes_into_its_input_passes_check_and_the_input_stays():
    class Doubles(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x):
            x.mul_(2)
            return self.bn(self.conv(x))

    m = randomize_bn(Doubles()).eval()
    x = torch.randn(1, 3, 8, 8)
    x0 = x.clone()
    fast = optimize(m, x, check=True)
    assert torch.equal(x, x0)
    assert verify(m, fast, x).passed
    assert torch.equal(x, x0)


def test_a_long_float32_reduction_that_rounds_more_than_eager_is_not_a_false_failure():
    """Fuzzer seed 4599: a BN folded into a 3x3x3 conv rounds to 13 x eager's own float32 error on
    that input (1.3e-6 of the output's scale) and is exact in float64; check=True must pass."""
    from fxrewrite.fuzz import generate
    from fxrewrite.fuzz.model import build_model, make_inputs

    program = generate(4599)
    model, x = build_model(program), make_inputs(program, "fresh")
    fast = optimize(model, x, check=True)
    assert verify(model, fast, x, float64=True).max_rel < 1e-12


def test_deviation_counts_a_nan_or_inf_the_reference_lacks_as_infinite():
    from fxrewrite.rewrite.verify import deviation
    ref = torch.tensor([1.0, 2.0, float("nan"), float("inf")])
    assert deviation(ref, ref.clone()) == (0.0, 0.0)  # the same NaN and inf at the same places
    for bad in (torch.tensor([1.0, float("nan"), float("nan"), float("inf")]),
                torch.tensor([1.0, 2.0, 0.0, float("inf")]),
                torch.tensor([1.0, 2.0, float("nan"), 5.0])):
        assert deviation(ref, bad) == (float("inf"), float("inf"))
    assert deviation(torch.tensor([1.0, -4.0]), torch.tensor([1.5, -4.0])) == (0.5, 0.125)


def test_float64_verify_of_an_exported_graph_leaves_out_its_dtype_checks():
    """torch.export writes `_assert_tensor_metadata(x, dtype=float32)` into the graph; a float64
    copy must not trip on them (they check the capture's dtype, which float64 changes on purpose)."""
    import torch.nn as nn

    from fxrewrite import optimize, verify

    class ConvBN(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x, scale):  # keyword inputs: captured by torch.export
            return self.bn(self.conv(x)).float() * scale

    torch.manual_seed(0)
    model = ConvBN().eval()
    with torch.no_grad():
        model.bn.running_var.uniform_(0.5, 2.0)
    inputs = {"x": torch.randn(2, 3, 8, 8), "scale": torch.tensor(2.0)}
    fast = optimize(model, inputs)
    assert any(n.target is torch.ops.aten._assert_tensor_metadata.default for n in fast.graph.nodes)
    result = verify(model, fast, inputs, float64=True, raise_on_fail=False)
    assert result.passed, str(result)
    assert any("dtype checks of the exported graph left out" in n for n in result.notes), result.notes


class _Detector(nn.Module):
    """A backbone and head that trace, and a data-dependent branch that does not (so `optimize`
    captures the parts), then a sort, as detection post-processing does."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Conv2d(8, 1, 1)

    def forward(self, x):
        s = self.head(self.backbone(x)).flatten()
        if s.max() > 0:
            s = s * 2
        return s.sort().values


def test_partially_optimized_model_reports_each_part():
    torch.manual_seed(0)
    model = randomize_bn(_Detector()).eval()
    x = torch.randn(1, 3, 12, 12)
    fast = optimize(model, x)
    assert isinstance(fast.backbone, torch.fx.GraphModule) and not isinstance(fast, torch.fx.GraphModule)
    hooks = [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in (*model.modules(), *fast.modules())]
    result = verify(model, fast, torch.randn(1, 3, 12, 12), float64=True)
    assert "backbone" in result.parts and all(v < 1e-12 for v in result.parts.values()), result.parts
    assert "optimized part backbone: max rel" in str(result)
    assert [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in (*model.modules(), *fast.modules())] == hooks
    # float32: the parts' rounding (a folded BN), one figure per part and call
    result32 = verify(model, fast, torch.randn(1, 3, 12, 12))
    assert 0 < result32.parts["backbone"] < 1e-5, result32.parts
    whole = optimize(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)).eval(), x)
    assert verify(whole, whole, x).parts == {}  # optimized whole: no parts
