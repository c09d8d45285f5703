"""Capture's three fast paths give what the slow, standard ones give:
`copy_model` == `copy.deepcopy`, `_Tracer` == `fx.Tracer`, `propagate_shapes` == `ShapeProp`."""
from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.fx as fx
import torch.nn as nn
import torchvision
from torch.fx.passes.shape_prop import ShapeProp

from fxrewrite.rewrite.capture import _Tracer, capture
from fxrewrite.rewrite.clone import copy_model
from fxrewrite.rewrite.nn import LEAF_MODULES
from fxrewrite.rewrite.report import Report
from fxrewrite.rewrite.shapes import ShapePropagationError, propagate_shapes


class Tied(nn.Module):
    """Everything deepcopy must get right: a module registered twice, a parameter shared by two
    modules, a buffer that views another buffer's storage, a hook, a plain attribute list."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = self.a  # the same module under two names
        self.c = nn.Linear(4, 4)
        self.c.weight = self.a.weight  # a tied parameter
        self.register_buffer("table", torch.arange(8.0))
        self.register_buffer("head", self.table[:4])  # a view of `table`
        self.sizes = [1, 2, 3]
        self.c.register_forward_hook(lambda m, i, o: o * 2)

    def forward(self, x):
        return self.c(self.b(x)) + self.head


class OwnDeepcopy(nn.Linear):
    """A class that copies itself its own way must still be copied its own way."""

    copies = 0

    def __deepcopy__(self, memo):
        OwnDeepcopy.copies += 1
        new = nn.Linear(self.in_features, self.out_features)
        new.load_state_dict(self.state_dict())
        return new


def test_copy_model_keeps_ties_views_and_hooks_and_shares_nothing():
    m = Tied()
    c = copy_model(m)
    assert c.b is c.a and c.c.weight is c.a.weight and c.a.weight is not m.a.weight
    assert c.head.untyped_storage().data_ptr() == c.table.untyped_storage().data_ptr()
    assert c.table.untyped_storage().data_ptr() != m.table.untyped_storage().data_ptr()
    assert c.sizes == m.sizes and c.sizes is not m.sizes
    x = torch.randn(2, 4)
    torch.testing.assert_close(c(x), m(x))  # the hook doubles both
    with torch.no_grad():
        c.a.weight.add_(1.0)
        c.table.add_(1.0)
    assert not torch.equal(c(x), m(x)) and float(m.table[0]) == 0.0 and float(c.head[0]) == 1.0


def test_copy_model_defers_to_a_class_with_its_own_deepcopy():
    m = nn.Sequential(OwnDeepcopy(3, 3), nn.ReLU())
    before = OwnDeepcopy.copies
    c = copy_model(m)
    assert OwnDeepcopy.copies == before + 1 and type(c[0]) is nn.Linear


@pytest.mark.parametrize("build", [lambda: torchvision.models.resnet18(), lambda: timm.create_model("vit_tiny_patch16_224"),
                                   lambda: torchvision.models.mobilenet_v3_small()], ids=["resnet18", "vit", "mnv3"])
def test_copy_model_equals_deepcopy_on_real_models(build):
    m = build().eval()
    a, b = copy.deepcopy(m), copy_model(m)
    assert [type(x) for x in a.modules()] == [type(x) for x in b.modules()]
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert all(p.requires_grad == q.requires_grad for p, q in zip(a.parameters(), b.parameters()))
    assert not {id(p) for p in b.parameters()} & {id(p) for p in m.parameters()}
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(b(x), m(x))


class _FxTracer(fx.Tracer):
    proxy_buffer_attributes = True  # as ours: buffers traced as graph values

    def is_leaf_module(self, m, qualname):
        return isinstance(m, LEAF_MODULES) or super().is_leaf_module(m, qualname)


class Unpacks(nn.Module):
    """Tuple unpacking of proxies: of a method's result, of `.shape`, in a helper function,
    and in a loop (the same instruction many times)."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(8, 24)

    def split(self, t):
        a, b = t.chunk(2, dim=-1)
        return a * b

    def forward(self, x):
        n, length, d = x.shape
        for _ in range(3):
            q, k, v = self.qkv(x).chunk(3, dim=-1)
            x = x + self.split(q).repeat(1, 1, 2) + k * v
        first, second = x.unbind(1)[:2]
        return x.reshape(n, length * d), first + second


@pytest.mark.parametrize("build", [Unpacks, lambda: timm.create_model("vit_tiny_patch16_224"),
                                   lambda: torchvision.models.resnet18(), lambda: timm.create_model("convnext_atto")],
                         ids=["unpacks", "vit", "resnet18", "convnext"])
def test_tracer_builds_the_graph_fx_builds(build):
    m = build().eval()
    ours, theirs = fx.GraphModule(m, _Tracer().trace(m)), fx.GraphModule(m, _FxTracer().trace(m))
    assert ours.code == theirs.code


def test_tracer_still_refuses_to_iterate_a_proxy():
    class Loop(nn.Module):
        def forward(self, x):
            return sum(t for t in x)

    with pytest.raises(fx.proxy.TraceError):
        _Tracer().trace(Loop())


@pytest.mark.parametrize("build,shape", [(torchvision.models.resnet18, (2, 3, 64, 64)), (Unpacks, (2, 5, 8))],
                         ids=["resnet18", "unpacks"])
def test_propagate_shapes_records_what_shapeprop_records(build, shape):
    m = build().eval()
    x = torch.randn(*shape)
    ours, theirs = fx.symbolic_trace(m), fx.symbolic_trace(m)
    propagate_shapes(ours, x)
    ShapeProp(theirs).propagate(x)
    for a, b in zip(ours.graph.nodes, theirs.graph.nodes):
        assert a.meta.get("type") == b.meta.get("type"), a.name
        ta, tb = a.meta.get("tensor_meta"), b.meta.get("tensor_meta")
        assert (ta is None) == (tb is None), a.name
        if ta is None:
            continue
        flat_a = ta if isinstance(ta, (tuple, list)) and not hasattr(ta, "shape") else [ta]
        flat_b = tb if isinstance(tb, (tuple, list)) and not hasattr(tb, "shape") else [tb]
        assert [(t.shape, t.dtype, t.stride) for t in flat_a] == [(t.shape, t.dtype, t.stride) for t in flat_b]


def test_propagate_shapes_uses_defaults_and_names_the_failing_node():
    class Defaults(nn.Module):
        def forward(self, x, scale: float = 2.0):
            return x.view(3, -1) * scale

    gm = fx.symbolic_trace(Defaults())
    propagate_shapes(gm, torch.randn(6))
    assert tuple(next(n for n in gm.graph.nodes if n.name == "mul").meta["tensor_meta"].shape) == (3, 2)
    with pytest.raises(ShapePropagationError, match="view"):
        propagate_shapes(gm, torch.randn(7))


def test_capture_leaves_the_model_alone_and_generates_code_only_when_asked():
    m = Tied()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    gm = capture(m, torch.randn(2, 4), Report())
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert not {id(p) for p in gm.parameters()} & {id(p) for p in m.parameters()}
    x = torch.randn(2, 4)
    torch.testing.assert_close(gm(x), m(x))  # code generated on this first call


def test_capture_parts_bench_runs(capsys):
    import importlib.util
    import sys
    from pathlib import Path
    bench_dir = Path(__file__).resolve().parent.parent / "bench"
    sys.path.insert(0, str(bench_dir))
    try:
        spec = importlib.util.spec_from_file_location("capture_parts", bench_dir / "capture_parts.py")
        bench = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bench)
        bench.main(["--blocks", "2", "--repeat", "1", "--no-timm"])
    finally:
        sys.path.remove(str(bench_dir))
    rows = [line.split("|") for line in capsys.readouterr().out.splitlines() if line.startswith("| 2 blocks")]
    assert [r[3].strip() for r in rows] == ["copy", "trace", "shapes"]
    assert all(r[6].strip().endswith("x") and float(r[6].strip()[:-1]) > 0 for r in rows)


def test_copy_model_honours_a_deepcopy_set_on_the_instance():
    m = nn.Sequential(nn.Linear(2, 2))
    m[0].__deepcopy__ = lambda memo: nn.Identity()  # as a wrapping library might do
    assert type(copy_model(m)[0]) is nn.Identity and type(copy.deepcopy(m)[0]) is nn.Identity


def test_gc_thresholds_come_back_after_overlapping_optimizations():
    import gc

    from fxrewrite.api import no_full_collections
    before = gc.get_threshold()
    try:
        first, second = no_full_collections(), no_full_collections()
        first.__enter__()
        second.__enter__()
        assert gc.get_threshold()[0] >= 50_000
        first.__exit__(None, None, None)  # threads: the first to enter may leave first
        assert gc.get_threshold()[0] >= 50_000
        second.__exit__(None, None, None)
        assert gc.get_threshold() == before
        gc.set_threshold(0)  # automatic collection off: optimize must not switch it on
        with no_full_collections():
            assert gc.get_threshold()[0] == 0
    finally:
        gc.set_threshold(*before)


def test_batch_two_trace_that_rejects_the_example_batch_of_one_is_exported_static():
    """Captured at batch 2 (export would fix a batch of 1), a model that branches on `batch != 1`
    gets a graph of the batch-2 branch that export lets run at batch 1 unguarded (torchvision's
    RAFT keeps a guard instead, and fails). Capture compares the graph with the model on the
    user's own batch-1 example, exports at batch 1 with static shapes, and says so."""
    from fxrewrite import optimize

    class BatchBranch(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            if x.shape[0] != 1:  # data-dependent for symbolic_trace: captured by torch.export
                return self.lin(x) * 2
            return self.lin(x)

    model, x = BatchBranch().eval(), torch.randn(1, 4)
    fast = optimize(model, x)
    notes = [r.detail for r in fast.report.records if r.pass_name == "capture"]
    assert "the size-2 trace computes another out at the example's size 1 (input 0 axis 0): exported at the " \
           "example's sizes, static, instead" in notes, notes
    axes = [n for n in notes if n.startswith("x [")]
    assert axes and "size-2 trace differs at size 1" in axes[0] and "dynamic=False" not in axes[0], axes
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x))


def test_an_axis_whose_size_one_takes_another_path_is_guarded():
    """export assumes a dynamic size is never 1 and keeps no guard for `seq != 1`, and its module
    does not check input sizes: optimized at sequence length 8, this model would silently take
    the other branch at length 1. Capture runs the model and the graph at size 1 on each dynamic
    axis, and where they differ the graph refuses size 1 with an error that says why."""
    from fxrewrite import optimize

    class SeqBranch(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)

        def forward(self, input_ids):
            h = self.emb(input_ids)
            if input_ids.shape[1] != 1:  # a decode-time special case
                return h * 2
            return h

    model = SeqBranch().eval()
    fast = optimize(model, {"input_ids": torch.randint(0, 10, (2, 8))})
    notes = [r.detail for r in fast.report.records if r.pass_name == "capture"]
    assert any(n.startswith("at size 1 the model takes another path than the traced graph on input_ids axis 1")
               for n in notes), notes
    for shape in ((3, 5), (1, 9)):  # other sizes, batch 1 included (that axis behaves)
        x = torch.randint(0, 10, shape)
        torch.testing.assert_close(fast(input_ids=x), model(input_ids=x))
    with pytest.raises(RuntimeError, match="traced for sizes >= 2 of axis 1, and got 1"):
        fast(input_ids=torch.randint(0, 10, (2, 1)))


def test_capture_checks_never_write_into_the_user_inputs():
    """A model that adds into its input in place, captured by torch.export: the checks capture
    runs (the graph at size 1 on each dynamic axis, against the model) work on copies, so the
    user's example is unchanged and the in-place write raises no false alarm. (The fuzzer found
    the first version of the size-1 check running on a view of the example.)"""
    from fxrewrite import optimize

    class AddsIntoInput(nn.Module):
        def forward(self, x):
            x.add_(1.0)
            if x.shape[-1] > 4:  # data-dependent for symbolic_trace: captured by torch.export
                return x * 2
            return x

    x = torch.randn(2, 3, 6)
    before = x.clone()
    fast = optimize(AddsIntoInput(), x)
    assert torch.equal(x, before)
    notes = [r.detail for r in fast.report.records if r.pass_name == "capture"]
    assert not any("at size 1" in n for n in notes), notes


def test_buffers_are_traced_as_graph_values_so_computed_weights_have_derivations():
    """torchvision's FrozenBatchNorm2d computes its scale and shift from buffers in forward. Read
    as plain tensors (fx's default) that ran once at trace time into anonymous constants, which
    neither the float64 replay nor a meta-device plan could recompute; traced, the fold is
    recorded from the buffers."""
    from torchvision.ops import FrozenBatchNorm2d
    from fxrewrite import optimize, verify
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), FrozenBatchNorm2d(4), nn.ReLU()).eval()
    with torch.no_grad():
        for b in model[1].buffers():
            b.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 8, 8)
    fast = optimize(model, x)
    assert not any("_tensor_constant" in n.target for n in fast.graph.nodes if n.op == "get_attr")
    sources = {s for d in fast.derivations for s in d.sources if isinstance(s, str)}
    assert {"1.weight", "1.bias", "1.running_mean", "1.running_var"} <= sources, sources
    result = verify(model, fast, torch.randn(3, 3, 8, 8), float64=True)
    assert result.max_rel < 1e-12 and not result.replay_partial, str(result)
    with torch.device("meta"):
        meta_model = nn.Sequential(nn.Conv2d(3, 4, 3), FrozenBatchNorm2d(4), nn.ReLU()).eval()
    plan = optimize(meta_model, x.to("meta"))
    assert [(d.target, d.sources) for d in plan.derivations] == [(d.target, d.sources) for d in fast.derivations]


class _Counter(nn.Module):
    """Counts its calls in a buffer, written in place (`add_`) or by `+=` (which assigns)."""

    def __init__(self, how):
        super().__init__()
        self.conv, self.bn, self.how = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), how
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        if self.how == "add_":
            self.calls.add_(1)
        else:
            self.calls += 1
        return self.bn(self.conv(x)) * self.calls


@pytest.mark.parametrize("how", ["add_", "iadd"])
def test_a_buffer_the_model_writes_is_state_not_a_constant(how):
    """With buffers traced as graph values, a written buffer reaches the graph as an attribute the
    passes would take for a constant (fold_scale_shift folded `* calls` into the norm): such a
    trace is refused, and torch.export, which tracks the writes, captures the model."""
    from fxrewrite import optimize
    torch.manual_seed(0)
    model, x = _Counter(how).eval(), torch.randn(1, 3, 4, 4)
    fast = optimize(model, x)
    capture_notes = [r.detail for r in fast.report.records if r.pass_name == "capture"]
    assert any(d.startswith("torch.export:") and "calls" in d for d in capture_notes), capture_notes
    for _ in range(3):  # the count goes on in both
        torch.testing.assert_close(fast(x), model(x))


def test_a_write_through_a_view_of_a_buffer_is_state_too():
    class Slot(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.register_buffer("seen", torch.zeros(2))

        def forward(self, x):
            self.seen[0].add_(1)
            return self.fc(x) * self.seen[0]

    from fxrewrite import optimize
    model, x = Slot().eval(), torch.randn(2, 4)
    fast = optimize(model, x)
    for _ in range(3):
        torch.testing.assert_close(fast(x), model(x))
