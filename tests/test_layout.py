"""`optimize(..., layout="channels_last")`: same outputs, NHWC weights, NCHW outputs; models that
need NCHW strides are left alone with a reason."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torchvision

from fxrewrite import optimize, verify
from conftest import randomize_bn


def _cl_weights(gm) -> int:
    """kxk conv weights stored channels-last (a 1x1 weight is both layouts at once)."""
    return sum(1 for _, p in gm.named_parameters() if p.dim() == 4
               and p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous())


def test_resnet18_channels_last_same_outputs():
    model = randomize_bn(torchvision.models.resnet18(num_classes=10)).eval()
    x = torch.randn(2, 3, 64, 64)
    gm = optimize(model, x, layout="channels_last")
    assert _cl_weights(gm) == 17, gm.report  # every 3x3/7x7 conv of ResNet-18 (BN folded in)
    assert any(r.pass_name == "layout" and r.action == "rewrote" for r in gm.report.records)
    assert verify(model, gm, torch.randn(3, 3, 64, 64), rtol=1e-5).passed
    assert all(p.is_contiguous() for p in model.parameters())  # the user's model is untouched


class FeatureMap(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        return self.conv(x)


def test_4d_outputs_stay_contiguous():
    x = torch.randn(2, 3, 9, 9)
    gm = optimize(FeatureMap().eval(), x, layout="channels_last")
    assert _cl_weights(gm) == 1
    assert gm(x).is_contiguous()


class ViewsNCHW(nn.Module):
    """`.view` over channels and space: needs NCHW strides."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return y.view(y.shape[0], -1)


def test_model_that_needs_nchw_is_left_alone_with_a_reason():
    model = ViewsNCHW().eval()
    x = torch.randn(2, 3, 6, 6)
    gm = optimize(model, x, layout="channels_last")
    assert _cl_weights(gm) == 0
    skips = [r.detail for r in gm.report.records if r.pass_name == "layout" and r.action == "skipped"]
    assert skips and "channels-last" in skips[0]
    assert torch.equal(gm(x), model(x))


def test_unknown_layout_is_an_error():
    with pytest.raises(ValueError, match="unknown layout"):
        optimize(FeatureMap().eval(), torch.randn(1, 3, 5, 5), layout="nhwc")
