"""`fold_constants`: what depends on weights alone is computed once (exact), on every route."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrizations, parametrize

from fxrewrite import optimize, verify
from fxrewrite.backend import REPORTS
from fxrewrite.rewrite.constants import constant_nodes
from fxrewrite.rewrite.effects import is_view

timm = pytest.importorskip("timm")


def computed_from_weights(gm) -> list[str]:
    """Nodes of `gm` that still compute something from constants alone (views of a weight aside)."""
    return [n.name for n in constant_nodes(gm.graph) if n.op != "get_attr" and not is_view(n)]


def check_exact(model, fast, x, tol=1e-10):
    result = verify(model, fast, x, float64=True)
    assert result.max_rel < tol, result


# ---------------------------------------------------------------- models from the papers

class LoRALinear(nn.Module):
    """LoRA merged in forward: W + B A s."""

    def __init__(self, n_in, n_out, rank=4, scale=0.5):
        super().__init__()
        self.base = nn.Linear(n_in, n_out)
        self.lora_a = nn.Parameter(torch.randn(rank, n_in))
        self.lora_b = nn.Parameter(torch.randn(n_out, rank))
        self.scale = scale

    def forward(self, x):
        return F.linear(x, self.base.weight + (self.lora_b @ self.lora_a) * self.scale, self.base.bias)


class DEConv(nn.Module):
    """DEA-Net's detail-enhanced convolution (Chen et al. 2024), as the paper defines its
    re-parameterised kernel: vanilla + central, angular, horizontal and vertical difference
    kernels, summed, then one 3x3 convolution."""

    def __init__(self, c, theta=1.0):
        super().__init__()
        self.vc = nn.Parameter(torch.randn(c, c, 3, 3) * 0.1)
        self.cd = nn.Parameter(torch.randn(c, c, 3, 3) * 0.1)
        self.ad = nn.Parameter(torch.randn(c, c, 3, 3) * 0.1)
        self.hd = nn.Parameter(torch.randn(c, c, 3) * 0.1)
        self.vd = nn.Parameter(torch.randn(c, c, 3) * 0.1)
        self.bias = nn.Parameter(torch.randn(c) * 0.1)
        centre = torch.zeros(3, 3)
        centre[1, 1] = 1.0
        self.register_buffer("centre", centre)
        self.register_buffer("clockwise", torch.tensor([3, 0, 1, 6, 4, 2, 7, 8, 5]))
        self.theta = theta

    def kernel(self):
        cd = self.cd - self.cd.sum((2, 3), keepdim=True) * self.centre  # centre tap minus the sum
        ad = (self.ad.flatten(2) - self.theta * self.ad.flatten(2)[:, :, self.clockwise]).reshape(self.ad.shape)
        hd = torch.stack([self.hd, torch.zeros_like(self.hd), -self.hd], dim=-1)  # left column minus right
        vd = torch.stack([self.vd, torch.zeros_like(self.vd), -self.vd], dim=-2)  # top row minus bottom
        return self.vc + cd + ad + hd + vd

    def forward(self, x):
        return F.conv2d(x, self.kernel(), self.bias, padding=1)


class Symmetric(nn.Module):
    """A user's parametrization: the weight is kept symmetric."""

    def forward(self, w):
        return w.triu() + w.triu(1).transpose(0, 1)


def weight_normed(conv):
    return parametrizations.weight_norm(conv)


def legacy(fn, module):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return fn(module)


def symmetric_linear():
    lin = nn.Linear(6, 6)
    parametrize.register_parametrization(lin, "weight", Symmetric())
    return lin


CASES = {
    "weight_norm conv": (lambda: nn.Sequential(weight_normed(nn.Conv2d(3, 8, 3, padding=1)), nn.ReLU()),
                         (2, 3, 9, 9)),
    "weight_norm conv + BN": (lambda: nn.Sequential(weight_normed(nn.Conv2d(3, 8, 3)), nn.BatchNorm2d(8)),
                              (2, 3, 9, 9)),
    "orthogonal linear": (lambda: parametrizations.orthogonal(nn.Linear(6, 6)), (4, 6)),
    "spectral_norm linear": (lambda: parametrizations.spectral_norm(nn.Linear(6, 5)), (4, 6)),
    "user parametrization": (symmetric_linear, (4, 6)),
    "legacy weight_norm": (lambda: nn.Sequential(legacy(torch.nn.utils.weight_norm, nn.Conv2d(3, 8, 3))),
                           (2, 3, 9, 9)),
    "legacy spectral_norm": (lambda: nn.Sequential(legacy(torch.nn.utils.spectral_norm, nn.Conv2d(3, 8, 3))),
                             (2, 3, 9, 9)),
    "LoRA in forward": (lambda: LoRALinear(6, 5), (4, 6)),
    "DEConv": (lambda: DEConv(4), (2, 4, 10, 10)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_folds_weight_arithmetic_exactly(name):
    torch.manual_seed(0)
    factory, shape = CASES[name]
    model = factory().eval()
    if isinstance(model, nn.Sequential) and isinstance(model[-1], nn.BatchNorm2d):
        model[-1].running_var.uniform_(0.5, 2.0)
        model[-1].running_mean.normal_()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = optimize(model, torch.randn(shape))
    assert fast.report.count("fold_constants") >= 1, fast.report
    assert computed_from_weights(fast) == []
    check_exact(model, fast, torch.randn(shape))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "the user's model changed"
    again = optimize(fast, torch.randn(shape))  # idempotent: nothing left to fold
    assert again.report.count("fold_constants") == 0


def test_legacy_weight_norm_on_the_root_stays_correct():
    """On the root module symbolic_trace reads the weight the hook last computed (its forward,
    not its call, is traced): capture writes that read as the hook's computation instead."""
    torch.manual_seed(0)
    model = legacy(torch.nn.utils.weight_norm, nn.Conv2d(3, 8, 3)).eval()
    fast = optimize(model, torch.randn(2, 3, 9, 9))
    assert fast.report.count("fold_constants") == 1 and not fast._forward_pre_hooks
    for _ in range(2):  # (the first call of a lazily compiled module takes another path)
        check_exact(model, fast, torch.randn(2, 3, 9, 9))


def test_weight_norm_conv_then_batchnorm_folds_both():
    torch.manual_seed(0)
    model = nn.Sequential(weight_normed(nn.Conv2d(3, 8, 3)), nn.BatchNorm2d(8)).eval()
    fast = optimize(model, torch.randn(2, 3, 9, 9))
    assert fast.report.count("fold_batchnorm") == 1
    assert not [n for n in fast.graph.nodes if "batch_norm" in str(n.target)]


def test_report_names_what_was_folded():
    model = LoRALinear(6, 5).eval()
    fast = optimize(model, torch.randn(4, 6))
    [record] = [r for r in fast.report.records if r.pass_name == "fold_constants"]
    assert "base.weight" in record.detail and "lora_a" in record.detail and "lora_b" in record.detail


class Broadcast(nn.Module):
    def __init__(self):
        super().__init__()
        self.b = nn.Parameter(torch.randn(8))

    def forward(self, x):
        return x + (self.b * 2).view(1, 8, 1, 1).expand(2, 8, 32, 32)


def test_broadcast_is_not_stored_but_what_it_broadcasts_is():
    model = Broadcast().eval()
    fast = optimize(model, torch.randn(2, 8, 32, 32))
    skips = [r.detail for r in fast.report.records if r.pass_name == "fold_constants" and r.action == "skipped"]
    assert len(skips) == 1 and "broadcasts: 8 elements read make 16,384" in skips[0], skips
    assert fast.report.count("fold_constants") == 1  # b * 2
    stored = dict(fast.named_buffers()) | dict(fast.named_parameters())
    assert max(t.numel() for t in stored.values()) == 8
    check_exact(model, fast, torch.randn(2, 8, 32, 32))


class Counter(nn.Module):
    """A buffer written in place is no constant: what reads it is computed on each call."""

    def __init__(self):
        super().__init__()
        self.register_buffer("steps", torch.zeros(4))

    def forward(self, x):
        self.steps.add_(1)
        return x * (self.steps * 2)


def test_a_buffer_written_in_place_is_not_folded():
    model = Counter().eval()
    fast = optimize(model, torch.randn(3, 4))
    assert fast.report.count("fold_constants") == 0
    x = torch.randn(3, 4)
    assert torch.equal(fast(x), x * 2) and torch.equal(fast(x), x * 4)


class DropoutOnWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return F.linear(x, F.dropout(self.lin.weight, 0.5, training=True))


def test_random_values_are_not_folded():
    fast = optimize(DropoutOnWeight().eval(), torch.randn(3, 4))
    assert fast.report.count("fold_constants") == 0
    x = torch.randn(3, 4)
    assert not torch.equal(fast(x), fast(x))


def test_training_mode_keeps_the_parametrization_for_the_gradient():
    torch.manual_seed(0)
    model = nn.Sequential(weight_normed(nn.Conv2d(3, 8, 3))).train()
    fast = optimize(model, torch.randn(2, 3, 9, 9))
    assert fast.report.count("fold_constants") == 0
    [skip] = [r.detail for r in fast.report.records if r.pass_name == "fold_constants"]
    assert "training mode" in skip
    fast.train()  # still allowed: nothing was folded
    fast(torch.randn(2, 3, 9, 9)).sum().backward()
    assert fast.get_parameter("0.parametrizations.weight.original0").grad is not None
    again = optimize(fast, torch.randn(2, 3, 9, 9))  # the parametrization's call traces again
    assert verify(model, again, torch.randn(2, 3, 9, 9)).passed


def test_inference_only_after_folding():
    fast = optimize(LoRALinear(6, 5).eval(), torch.randn(4, 6))
    with pytest.raises(Exception, match="fold_constants"):
        fast.train()


# ---------------------------------------------------------------- real architectures

def _randomised(name):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.normal_(1.0, 0.2)  # gains and biases away from their init
    return model


@pytest.mark.parametrize("name", ["nf_resnet50", "nfnet_l0", "resnetv2_50x1_bit"])
def test_weight_standardised_models_fold_every_conv(name):
    model = _randomised(name)
    x = torch.randn(2, 3, 64, 64)
    fast = optimize(model, x)
    ws_convs = sum(1 for m in model.modules() if type(m).__name__ in ("ScaledStdConv2d", "StdConv2d"))
    assert fast.report.count("fold_constants") >= ws_convs > 0
    assert computed_from_weights(fast) == []
    assert not [n for n in fast.graph.nodes if "batch_norm" in str(n.target)]
    check_exact(model, fast, torch.randn(2, 3, 64, 64))


def test_through_torch_compile():
    model = _randomised("nf_resnet26")
    x = torch.randn(2, 3, 64, 64)
    REPORTS.clear()
    compiled = torch.compile(model, backend="rewrite")
    with torch.no_grad():
        out, ref = compiled(x), model(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    convs = sum(1 for m in model.modules() if type(m).__name__ == "ScaledStdConv2d")
    assert sum(r.count("fold_constants") for r in REPORTS) >= convs > 0
    assert not any("batch norm in training mode" in str(r) for r in REPORTS)


def test_levit_attention_biases_are_gathered_once_and_no_batchnorm_is_left():
    model = _randomised("levit_128s")
    x = torch.randn(2, 3, 224, 224)
    fast = optimize(model, x)
    gathers = [r for r in fast.report.records if r.pass_name == "fold_constants" and r.action == "rewrote"]
    assert len(gathers) == 11 and all("attention_bias" in r.detail for r in gathers)
    assert computed_from_weights(fast) == []
    assert not [n for n in fast.graph.nodes if "batch_norm" in str(n.target)]
    check_exact(model, fast, torch.randn(2, 3, 224, 224))
