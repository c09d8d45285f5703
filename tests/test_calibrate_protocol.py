"""The calibration protocol (fxrewrite.calibrate): any module with `fit_to(x, target, **options)` and a
recorded reference is fitted by the same loop, whatever its type, in graph order; modules without
`fit_to` are listed, a fit that would make a layer worse is undone, options reach every `fit_to`.
DyT / ELN / PartialRMSNorm `fit_to` called directly."""
import warnings

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

from fxrewrite import calibrate, optimize
from fxrewrite.rewrite import ops
from fxrewrite.rewrite.nn import DyT, ELN, PartialRMSNorm, relative_error

warnings.filterwarnings("ignore", message=".*specialized.*")


class Quadratic(nn.Module):
    """a x^2 + b x + c elementwise (a stand-in for a fitted polynomial activation), starting as the
    identity; `fit_to` solves the least squares for (a, b, c) in float64."""

    def __init__(self):
        super().__init__()
        self.coef = nn.Parameter(torch.tensor([0.0, 1.0, 0.0]))
        self.options = []

    def forward(self, x):
        a, b, c = self.coef
        return (a * x + b) * x + c

    def fit_to(self, x, target, **options):
        self.options.append(options)
        self.shapes = getattr(self, "shapes", []) + [tuple(x.shape)]
        v, t = x.reshape(-1), target.reshape(-1)
        basis = torch.stack([v * v, v, torch.ones_like(v)], 1)
        sol = torch.linalg.lstsq(basis, t[:, None]).solution[:, 0]
        with torch.no_grad():
            self.coef.copy_(sol)
        return f"least squares on {v.numel()} values"


class Worse(Quadratic):
    def fit_to(self, x, target, **options):
        with torch.no_grad():
            self.coef.copy_(torch.tensor([5.0, -3.0, 2.0]))
        return "a bad fit"


class Net(nn.Module):
    def __init__(self, act=None):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(8, 16), act if act is not None else nn.ReLU(), nn.Linear(16, 8)
        self.norm, self.head = nn.LayerNorm(8), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.norm(self.fc2(self.act(self.fc1(x)))))


def _batches(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 8, generator=g) for _ in range(n)]


_RELU = (ops.relu, torch.ops.aten.relu_.default)  # the finishing steps may make it in place


def _with_quadratic(gm: fx.GraphModule, cls=Quadratic) -> fx.GraphModule:
    """Replace the graph's ReLU by a call to a `cls` module and record nn.ReLU() as its reference,
    after the records already there (so the record order is not the graph order)."""
    [relu] = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in _RELU]
    gm.add_submodule("act_poly", cls())
    with gm.graph.inserting_after(relu):
        new = gm.graph.call_module("act_poly", (relu.args[0],))
    relu.replace_all_uses_with(new)
    gm.graph.erase_node(relu)
    gm.recompile()
    gm.meta.setdefault("swapped_norms", {})["act_poly"] = nn.ReLU()
    return gm


def test_toy_module_and_dyt_fitted_by_one_loop_in_graph_order():
    torch.manual_seed(0)
    model = Net().eval()
    gm = _with_quadratic(optimize(model, torch.randn(4, 8), passes=["norm_to_dyt"]))
    assert list(gm.meta["swapped_norms"]) == ["norm_dyt", "act_poly"]  # recorded in this order
    rep = calibrate(gm, _batches(3, 1), holdout=_batches(2, 2), reference=model, fit_options={"degree": 2})
    print("\n" + str(rep))
    assert [r.name for r in rep.layers] == ["act_poly", "norm_dyt"]  # fitted in graph order
    poly, dyt = rep.layers
    assert poly.kind == "Quadratic" and dyt.kind == "DyT"
    assert poly.note == "least squares on 192 values" and poly.rows == 12
    assert poly.error_after < 0.6 * poly.error_before and poly.holdout_after < poly.holdout_before
    assert dyt.error_after < dyt.error_before and dyt.alpha_after != dyt.alpha_before
    assert rep.output_after < rep.output_before
    # every fit_to gets the same options, the extra ones included
    [opts] = gm.get_submodule("act_poly").options
    assert opts == {"fit_affine": False, "min_affine_rows": 64, "degree": 2}


def test_record_under_swapped_references_and_plain_module():
    torch.manual_seed(0)
    model = Net().eval()
    swapped = Net(Quadratic()).eval()
    swapped.load_state_dict(model.state_dict(), strict=False)
    swapped.meta = {"swapped_references": {"act": nn.ReLU()}}  # not a GraphModule: named_modules order
    rep = calibrate(swapped, _batches(3, 1), reference=model)
    [row] = rep.layers
    assert row.name == "act" and row.error_after < row.error_before
    assert rep.output_after < rep.output_before


def test_inputs_arrive_in_the_module_layout():
    """NCHW activations reach fit_to as NCHW (batches concatenated along dim 0, subsampled along
    it), so a per-channel module can find its channels; DyT/ELN view theirs as (rows, last dim)."""
    torch.manual_seed(0)

    class ConvNet(nn.Module):
        def __init__(self, act):
            super().__init__()
            self.conv1, self.act, self.conv2 = nn.Conv2d(3, 4, 3, padding=1), act, nn.Conv2d(4, 2, 1)

        def forward(self, x):
            return self.conv2(self.act(self.conv1(x)))

    model = ConvNet(nn.ReLU()).eval()
    swapped = ConvNet(Quadratic()).eval()
    swapped.load_state_dict(model.state_dict(), strict=False)
    swapped.meta = {"swapped_norms": {"act": nn.ReLU()}}
    batches = [torch.randn(2, 3, 5, 5) for _ in range(3)]
    rep = calibrate(swapped, batches, reference=model)
    assert swapped.act.shapes == [(6, 4, 5, 5)] and rep.layers[0].rows == 6 * 4 * 5
    assert rep.layers[0].error_after < rep.layers[0].error_before
    swapped.act.shapes = []
    rep = calibrate(swapped, batches, max_rows=50)  # 20 rows of the last dim per image: 2 images
    assert swapped.act.shapes == [(2, 4, 5, 5)] and rep.layers[0].rows == 40


def test_modules_without_fit_to_are_listed_and_bad_fits_undone():
    torch.manual_seed(0)
    model = Net().eval()
    gm = _with_quadratic(optimize(model, torch.randn(4, 8)), cls=Worse)
    gm.meta["swapped_norms"]["fc2"] = nn.Linear(16, 8)  # a recorded module with nothing to fit
    before = gm.get_submodule("act_poly").coef.detach().clone()
    rep = calibrate(gm, _batches(2, 1))
    assert rep.skipped == {"fc2": "a Linear has no fit_to"} and "fc2" in str(rep)
    [row] = rep.layers
    assert row.error_after == row.error_before and "initial parameters kept" in row.note
    assert torch.equal(gm.get_submodule("act_poly").coef.detach(), before)

    gm.meta["swapped_norms"] = {"fc2": nn.Linear(16, 8)}
    with pytest.raises(ValueError, match="none of the recorded swapped layers"):
        calibrate(gm, _batches(1, 1))


def test_fit_to_of_dyt_eln_and_prmsnorm_directly():
    torch.manual_seed(0)
    c = 16
    x = (torch.randn(500, c) * 2 + 0.3).double()
    ln = nn.LayerNorm(c).double()
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
        ln.bias.normal_(0, 0.2)
    t = ln(x).detach()
    rel = {}
    for name, m in (("dyt", DyT(c)), ("eln", ELN(c)), ("eln_affine", ELN(c))):
        with torch.no_grad():
            m.weight.copy_(ln.weight)
            m.bias.copy_(ln.bias)
        m = m.double()
        e0 = relative_error(m(x).detach(), t)
        note = m.fit_to(x, t, fit_affine=name.endswith("affine"), unknown_option=1)  # unknown options ignored
        rel[name] = relative_error(m(x).detach(), t)
        assert note == "" and rel[name] < e0
    assert rel["eln_affine"] <= rel["eln"] + 1e-12  # more freedom, same inputs
    # few rows: scalar only, said in the note
    assert "beta only" in ELN(c).double().fit_to(x[:10], t[:10], fit_affine=True)
    assert "alpha only" in DyT(c).double().fit_to(x[:10], t[:10], fit_affine=True)
    p = PartialRMSNorm(c, p=0.25).double()
    r = nn.RMSNorm(c).double()
    tr = r(x).detach()
    e0 = relative_error(p(x).detach(), tr)
    assert p.fit_to(x, tr) == "" and relative_error(p(x).detach(), tr) < e0
    assert "common factor" in PartialRMSNorm(c, p=0.25).double().fit_to(x[:10], tr[:10])
