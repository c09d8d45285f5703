"""The swap modules: formulas, continuity, gradients (gradcheck in float64), state_dict, export."""
import io

import pytest
import torch

from fxrewrite.rewrite.nn import DyT, GeneralizedSmeLU, SmeLU


def smelu_ref(x, beta):
    return torch.where(x >= beta, x, torch.where(x <= -beta, torch.zeros_like(x), (x + beta) ** 2 / (4 * beta)))


def test_smelu_formula_and_limits():
    x = torch.linspace(-3, 3, 601, dtype=torch.float64)
    m = SmeLU(beta=0.7).double()
    y = m(x)
    assert torch.equal(y, smelu_ref(x, m.beta))  # beta is stored as a float32 scalar, then cast
    assert torch.all(y[x <= -0.7] == 0) and torch.equal(y[x >= 0.7], x[x >= 0.7])
    assert torch.all(torch.diff(y) >= 0)  # monotone


def test_generalized_smelu_reduces_to_smelu():
    x = torch.randn(1000, dtype=torch.float64) * 3
    g = GeneralizedSmeLU(alpha=0.8, beta=0.8, g_left=0.0, g_right=1.0).double()
    torch.testing.assert_close(g(x), SmeLU(0.8).double()(x), rtol=0, atol=1e-14)


@pytest.mark.parametrize("alpha,beta,gl,gr", [(0.5, 1.5, 0.1, 1.2), (2.0, 0.25, -0.2, 0.9), (0.0, 1.0, 0.05, 1.0)])
def test_generalized_smelu_continuity(alpha, beta, gl, gr):
    """Value and slope agree from both sides at -alpha and beta."""
    m = GeneralizedSmeLU(alpha, beta, gl, gr).double()
    h = 1e-6
    for p in (-alpha, beta):
        pts = torch.tensor([p - h, p, p + h], dtype=torch.float64)
        lo, mid, hi = m(pts)
        assert abs(float(hi - mid) - float(mid - lo)) < 1e-9  # no kink
        assert abs(float(hi - lo)) < 1e-5  # no jump
    far = torch.tensor([-50.0, 50.0], dtype=torch.float64)
    slopes = (m(far + 1e-3) - m(far)) / 1e-3
    torch.testing.assert_close(slopes, torch.stack([m.g_left, m.g_right]), rtol=0, atol=1e-8)


def _away_from(x, points, gap=1e-3):
    for p in points:
        x = torch.where((x - p).abs() < gap, x + 2 * gap, x)
    return x


def test_gradcheck_smelu_learnable():
    m = SmeLU(beta=0.9, learnable=True).double()
    x = _away_from(torch.randn(40, dtype=torch.float64) * 2, [-0.9, 0.9]).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: m(x), (x,))

    def f(x, b):  # the module's forward with beta as an input, so gradcheck checks d/dbeta too
        g = SmeLU(1.0, learnable=True).double()
        del g.beta
        g.beta = b
        return g(x)

    assert torch.autograd.gradcheck(f, (x, m.beta.detach().clone().requires_grad_()))
    # and the parameter gradient equals the closed form (x + beta)(beta - x) / (4 beta^2)
    m(x.detach()).sum().backward()
    xd, b = x.detach(), float(m.beta.detach())
    inside = (xd > -b) & (xd < b)
    expected = ((xd + b) * (b - xd) / (4 * b * b))[inside].sum()
    torch.testing.assert_close(m.beta.grad, expected.reshape(1), rtol=1e-12, atol=1e-12)


def test_gradcheck_generalized_smelu_all_parameters():
    m = GeneralizedSmeLU(0.6, 1.3, 0.1, 1.1, learnable=True).double()
    x = _away_from(torch.randn(40, dtype=torch.float64) * 2, [-0.6, 1.3]).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: m(x), (x,))
    params = [p.detach().clone().requires_grad_() for p in (m.alpha, m.beta, m.g_left, m.g_right)]

    def f(x, al, be, gl, gr):
        g = GeneralizedSmeLU(1.0, 1.0, learnable=True).double()
        del g.alpha, g.beta, g.g_left, g.g_right
        g.alpha, g.beta, g.g_left, g.g_right = al, be, gl, gr
        return g(x)

    assert torch.autograd.gradcheck(f, (x, *params))


def test_gradcheck_dyt():
    m = DyT(5, alpha_init=0.7).double()
    with torch.no_grad():
        m.weight.copy_(torch.randn(5))
        m.bias.copy_(torch.randn(5))
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: m(x), (x,))

    def f(x, a, w, b):
        return w * torch.tanh(a * x) + b

    args = [p.detach().clone().requires_grad_() for p in (m.alpha, m.weight, m.bias)]
    assert torch.autograd.gradcheck(f, (x, *args))
    # the module's parameter gradients equal the formula's
    out = m(x.detach())
    g = torch.randn_like(out)
    out.backward(g)
    ref = f(x.detach(), *args)
    ref.backward(g)
    for p, r in zip((m.alpha, m.weight, m.bias), args):
        torch.testing.assert_close(p.grad, r.grad)


@pytest.mark.parametrize("make", [lambda: SmeLU(0.5, learnable=True), lambda: GeneralizedSmeLU(0.3, 0.6, 0.1, 0.9, True),
                                  lambda: DyT(8, 0.3)])
def test_state_dict_round_trip_and_export(make):
    m = make()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1)
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    fresh = make()
    fresh.load_state_dict(torch.load(buf))
    x = torch.randn(2, 8)
    torch.testing.assert_close(fresh(x), m(x), rtol=0, atol=0)
    ep = torch.export.export(m, (x,))
    torch.testing.assert_close(ep.module()(x), m(x))


def test_bad_arguments():
    with pytest.raises(ValueError, match="beta > 0"):
        SmeLU(0.0)
    with pytest.raises(ValueError, match="alpha \\+ beta > 0"):
        GeneralizedSmeLU(0.0, 0.0)
