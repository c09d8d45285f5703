"""BN folding on real architectures with random weights and random BN statistics."""
from __future__ import annotations

import pytest
import timm
import torch
import torchvision

from fxrewrite import optimize, verify
from fxrewrite.rewrite import ops

from conftest import count, count_bn_after_producer, randomize_bn

TORCHVISION = ["resnet18", "resnext50_32x4d", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0",
               "regnet_y_400mf", "densenet121", "shufflenet_v2_x0_5", "vgg11_bn", "mnasnet0_5", "googlenet"]
TIMM = ["resnet26d", "efficientnet_b0", "mobilenetv3_small_050", "cspresnet50", "dla34", "ghostnet_100",
        "repvgg_a0"]


def build_torchvision(name):
    kw = {"aux_logits": False, "init_weights": False} if name == "googlenet" else {}
    return getattr(torchvision.models, name)(**kw)


@pytest.mark.parametrize("name", TORCHVISION)
def test_torchvision(name):
    _check(randomize_bn(build_torchvision(name)).eval())


@pytest.mark.parametrize("name", TIMM)
def test_timm(name):
    _check(randomize_bn(timm.create_model(name, pretrained=False)).eval())


def _check(model):
    x = torch.randn(2, 3, 64, 64)
    fast = optimize(model, x)
    assert count_bn_after_producer(fast) == 0, fast.report
    assert fast.report.count("fold_batchnorm") > 0
    verify(model, fast, torch.randn_like(x), rtol=1e-5)


def test_resnet18_float64_is_exact():
    model = randomize_bn(torchvision.models.resnet18()).double().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    fast = optimize(model, x)
    assert count(fast, ops.batch_norm) == 0
    verify(model, fast, torch.randn_like(x), rtol=1e-10)


def test_timm_batchnormact_is_folded_where_fx_fuse_is_blind():
    # timm's BatchNormAct2d traces into F.batch_norm + act: fx's `fuse` keeps those BNs
    from torch.fx.experimental.optimization import fuse
    model = randomize_bn(timm.create_model("cspresnet50", pretrained=False)).eval()
    x = torch.randn(1, 3, 64, 64)
    fused = fuse(model)
    fx_left = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in fused.modules())
    fx_left += sum(1 for n in fused.graph.nodes if n.target is torch.nn.functional.batch_norm)
    fast = optimize(model, x)
    assert fx_left > 0
    assert count(fast, ops.batch_norm) == 0
    verify(model, fast, x)
