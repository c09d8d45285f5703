"""Partial capture: a model that does not capture whole is optimized in the parts that do."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from fxrewrite import CaptureError, optimize, verify

from conftest import randomize_bn


class Backbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.layer = nn.Sequential(nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU())

    def forward(self, x):
        a = self.stem(x)
        return [a, self.layer(a)]  # two "levels"


class Head(nn.Module):
    """Called once per level, at two shapes."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x))


class Detector(nn.Module):
    """A backbone and a shared head that capture, then post-processing that does not (a branch on
    values, as NMS thresholds are)."""

    def __init__(self):
        super().__init__()
        self.backbone = Backbone()
        self.head = Head()

    def forward(self, images: list):
        x = torch.stack(images)
        outs = [self.head(f) for f in self.backbone(x)]
        scores = outs[0].amax(dim=(1, 2, 3))
        if scores.sum() > 0:  # data-dependent: neither symbolic_trace nor export follows it
            return {"scores": scores, "maps": outs}
        return {"scores": -scores, "maps": outs}


def images(n=2, size=12):
    return [torch.randn(3, size, size) for _ in range(n)]


def test_a_model_that_does_not_capture_is_optimized_in_parts():
    torch.manual_seed(0)
    model = randomize_bn(Detector()).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = optimize(model, (images(),))
    notes = [r.detail for r in fast.report.records if r.pass_name == "partial" and r.node == "Detector"]
    assert "does not capture whole" in notes[0] and "if scores.sum() > 0" in notes[0]  # the reason, its line
    assert "optimized 2 submodule(s) (backbone, head)" in notes[-1] and "100.0% of the parameters" in notes[-1]
    assert isinstance(fast, Detector)  # the user's module tree, parts replaced
    assert isinstance(fast.backbone, torch.fx.GraphModule) and isinstance(fast.head, torch.fx.GraphModule)
    assert any(r.node.startswith("backbone.") and r.pass_name == "fold_batchnorm" for r in fast.report.records)
    assert not [n for part in (fast.backbone, fast.head) for n in part.graph.nodes if "batch_norm" in str(n.target)]
    for size in (12, 16):  # the whole model, exact, at the example's size and another
        result = verify(model, fast, (images(2, size),), float64=True)
        assert result.max_rel < 1e-10, result
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_submodule_called_at_several_shapes_is_checked_on_each_call():
    torch.manual_seed(0)
    fast = optimize(randomize_bn(Detector()).eval(), (images(),))
    assert any(r.node == "head" and r.action == "rewrote" for r in fast.report.records)
    assert not [r for r in fast.report.records if r.node == "head" and "left as it is" in r.detail]


def test_partial_false_raises_the_capture_error():
    with pytest.raises(CaptureError):
        optimize(Detector().eval(), (images(),), partial=False)


def test_partial_true_keeps_the_module_tree_of_a_model_that_captures_whole():
    torch.manual_seed(0)
    model = randomize_bn(nn.Sequential(Backbone(), nn.Identity())).eval()
    whole = optimize(model, torch.randn(2, 3, 12, 12))
    assert isinstance(whole, torch.fx.GraphModule)
    parts = optimize(model, torch.randn(2, 3, 12, 12), partial=True)
    assert isinstance(parts, nn.Sequential) and isinstance(parts[0], torch.fx.GraphModule)
    [note] = [r.detail for r in parts.report.records if r.pass_name == "partial" and r.node == "Sequential"]
    assert "optimized 1 submodule(s) (0)" in note and "100.0% of the parameters" in note
    assert verify(model, parts, torch.randn(2, 3, 12, 12), float64=True).max_rel < 1e-10


def test_check_verifies_the_whole_model():
    fast = optimize(randomize_bn(Detector()).eval(), (images(),), check=True)
    assert fast.report.error is not None


def test_parts_that_capture_but_have_nothing_to_rewrite_stay_as_they_are():
    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(x) if x.sum() > 0 else -self.lin(x)

    model = Plain().eval()
    fast = optimize(model, torch.ones(2, 4))
    assert type(fast.lin) is nn.Linear
    assert any("no pass rewrote anything" in r.detail for r in fast.report.records if r.node == "lin")


def test_torch_compile_route_needs_no_partial_capture():
    """Dynamo breaks the graph at the data-dependent branch itself; each piece goes through the
    backend, and the BatchNorms of the backbone and head are folded there."""
    from fxrewrite.backend import REPORTS
    torch.manual_seed(0)
    model = randomize_bn(Detector()).eval()
    REPORTS.clear()
    compiled = torch.compile(model, backend="rewrite", options={"compiler": "eager"})
    x = images()
    with torch.no_grad():
        out, ref = compiled(x), model(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert sum(r.count("fold_batchnorm") for r in REPORTS) >= 3
