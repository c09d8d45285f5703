"""LayerNorm -> RMSNorm, the approximate swap (passes.swaps.layernorm_to_rmsnorm): the weight is
copied, the mean subtraction and the bias are dropped and the report says so. The exact Pre-LN
version is in test_swaps_prenorm.py."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fxrewrite import optimize
from fxrewrite.passes.swaps import layernorm_to_rmsnorm

from conftest import TinyBlock, randomise_norms, rewrote


@pytest.mark.parametrize("keep_bias", [False, True])
def test_layernorm_to_rmsnorm_is_rmsnorm_with_the_weight(keep_bias):
    torch.manual_seed(0)
    model = randomise_norms(TinyBlock(nn.LayerNorm(8)).eval())
    x = torch.randn(3, 8) + 2.0  # a non-zero mean: the swap is visible
    gm = optimize(model, x, passes=[layernorm_to_rmsnorm(keep_bias=keep_bias)])
    [r] = rewrote(gm, "layernorm_to_rmsnorm")
    assert "dropped: the mean subtraction" in r.detail
    assert ("the bias" in r.detail) != keep_bias
    assert any(isinstance(m, nn.RMSNorm) for m in gm.modules())
    ln = model.norm
    expected = F.rms_norm(x, (8,), ln.weight, ln.eps) + (ln.bias if keep_bias else 0)
    torch.testing.assert_close(gm(x), model.fc(expected), rtol=1e-6, atol=1e-6)


def test_layernorm_without_affine_to_rmsnorm():
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8, elementwise_affine=False)).eval()
    x = torch.randn(3, 8) + 1
    gm = optimize(model, x, passes=["layernorm_to_rmsnorm"])
    [r] = rewrote(gm, "layernorm_to_rmsnorm")
    assert "had no weight: RMSNorm without one" in r.detail and "the bias" not in r.detail
    torch.testing.assert_close(gm(x), F.rms_norm(model[0](x), (8,), None, 1e-5), rtol=1e-6, atol=1e-6)
