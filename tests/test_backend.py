"""torch.compile(backend="rewrite"): what reaches the final compiler, and that it is still right.

A recording compiler (`options={"compiler": record}`) stands in for Inductor in most tests, so
the graph Inductor would receive can be inspected (conv / batch-norm counts) cheaply; one test
goes through Inductor itself.
"""
import copy
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch._dynamo
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from conftest import randomize_bn
from fxrewrite import backend
from fxrewrite.codegen import runtime
from fxrewrite.rewrite import ops


class Net(nn.Module):
    """conv-BN-ReLU, conv-BN, an in-place residual add (Dynamo writes operator.iadd), a functional BN."""

    def __init__(self, c=4):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, c, 1)
        self.register_buffer("mean3", torch.randn(c))
        self.register_buffer("var3", torch.rand(c) + 0.5)
        for bn in (self.bn1, self.bn2):
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.data.normal_()
            bn.bias.data.normal_()

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        z = self.bn2(self.conv2(y))
        z += y
        return F.batch_norm(self.conv3(z), self.mean3, self.var3, training=False, eps=1e-3)


class Recorder:
    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return gm.forward

    def count(self, *targets, i=-1):
        return sum(1 for n in self.graphs[i].graph.nodes if n.op == "call_function" and n.target in targets)


BN_TARGETS = (ops.batch_norm, F.batch_norm, torch.batch_norm)
CONV_TARGETS = (ops.conv, torch.conv2d, F.conv2d)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _compile(model, **options):
    return torch.compile(model, backend="rewrite", options=options)


def test_eval_graph_reaches_compiler_with_bn_folded_and_equal_outputs():
    torch.manual_seed(0)
    model = Net().double().eval()
    state = copy.deepcopy(model.state_dict())
    rec = Recorder()
    x = torch.randn(2, 3, 9, 7, dtype=torch.float64)
    with torch.no_grad():
        out = _compile(model, compiler=rec)(x)
        ref = model(x)
    # three BNs folded; conv2 and the identity branch of `z += y` merged into one conv (as `optimize` does)
    assert rec.count(*CONV_TARGETS) == 2
    assert rec.count(*BN_TARGETS) == 0
    assert (out - ref).abs().max() / ref.abs().max() < 1e-12
    report = backend.last_report()
    assert report.count("fold_batchnorm") == 3 and report.count("merge_branches") == 1
    # the user's model is untouched
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    # the frozen weights are constants now: only the image is a graph input
    assert [n.name for n in rec.graphs[-1].graph.nodes if n.op == "placeholder"] == ["l_x_"]
    with torch.no_grad():  # a second call with another batch size still agrees
        x2 = torch.randn(3, 3, 9, 7, dtype=torch.float64)
        assert torch.allclose(_compile(model, compiler=rec)(x2), model(x2), rtol=1e-12, atol=1e-12)


def test_training_graph_passes_through_and_gradients_match():
    torch.manual_seed(0)
    model = Net().eval()  # eval BN but grad enabled: weights are being trained, not constants
    rec = Recorder()
    x = torch.randn(2, 3, 8, 8)
    out = _compile(model, compiler=rec)(x)
    assert rec.count(*BN_TARGETS) == 3  # nothing folded
    assert "passed through unchanged" in str(backend.last_report())
    out.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model(x).sum().backward()
    for g, p in zip(grads, model.parameters()):
        assert torch.allclose(g, p.grad, rtol=1e-5, atol=1e-6)


def test_batchnorm_in_training_mode_is_not_folded_and_updates_stats():
    torch.manual_seed(0)
    model = Net().train()
    twin = copy.deepcopy(model)
    rec = Recorder()
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        out = _compile(model, compiler=rec)(x)
        ref = twin(x)
    assert rec.count(*BN_TARGETS) == 3
    assert "training mode" in str(backend.last_report())
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5)
    assert torch.allclose(model.bn1.running_mean, twin.bn1.running_mean)


def test_weights_changed_after_compile_are_not_served_stale():
    torch.manual_seed(0)
    model = Net().eval()
    compiled = _compile(model, compiler="eager")
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        compiled(x)
        model.conv2.weight.mul_(2.0)  # e.g. an optimizer step or load_state_dict
        with pytest.warns(UserWarning, match="frozen weight changed"):
            out = compiled(x)
        assert torch.allclose(out, model(x), rtol=1e-5, atol=1e-6)


def test_instances_of_one_class_each_get_their_own_folded_weights():
    """Dynamo shares one compiled graph between two instances of a class; each gets a variant
    frozen for its own weights (two folded graphs reach the compiler), neither falls back, and an
    in-place change to one instance's weights sends only that instance to the unoptimised graph."""
    torch.manual_seed(0)
    a, b = Net().eval(), Net().eval()
    rec = Recorder()
    ca, cb = _compile(a, compiler=rec), _compile(b, compiler=rec)
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")  # no "frozen weight changed" fallback
        for _ in range(2):
            for compiled, model in ((ca, a), (cb, b), (ca, a)):
                torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    assert len(rec.graphs) == 2 and all(rec.count(*BN_TARGETS, i=i) == 0 for i in (0, 1))
    with torch.no_grad():
        a.conv2.weight.mul_(2.0)
        with pytest.warns(UserWarning, match="frozen weight changed"):
            torch.testing.assert_close(ca(x), a(x), rtol=1e-5, atol=1e-5)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            torch.testing.assert_close(cb(x), b(x), rtol=1e-5, atol=1e-5)
    assert len(rec.graphs) == 2


def test_layers_compiled_one_by_one_past_the_variant_limit():
    """Layer-wise compilation (`layer.compile(backend="rewrite")` on each of MAX_VARIANTS + 2
    identical blocks): the first MAX_VARIANTS layers get folded variants, the rest run the
    unoptimised graph with one warning, and every output is right."""
    torch.manual_seed(0)
    blocks = nn.Sequential(*[nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
                             for _ in range(backend.MAX_VARIANTS + 2)]).eval()
    for block in blocks:
        randomize_bn(block)
    x = torch.randn(1, 4, 6, 6)
    with torch.no_grad():
        want = blocks(x)
    rec = Recorder()
    for block in blocks:
        block.compile(backend="rewrite", options={"compiler": rec})
    with torch.no_grad():
        with pytest.warns(UserWarning, match=f"more than {backend.MAX_VARIANTS} sets of weights"):
            got = blocks(x)
        again = blocks(x)
    assert len(rec.graphs) == backend.MAX_VARIANTS and all(
        rec.count(*BN_TARGETS, i=i) == 0 for i in range(len(rec.graphs)))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, want, rtol=1e-5, atol=1e-5)


def test_discarded_instances_free_their_variant_slots():
    """Models compiled, used and discarded one after another (more of them than the variant
    limit): each gets its own folded graph, no limit warning (a dead instance's variant is
    dropped, and never matched by a new tensor at the same address)."""
    import gc
    rec = Recorder()
    x = torch.randn(1, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(backend.MAX_VARIANTS + 3):
            model = Net().eval()
            with torch.no_grad():
                torch.testing.assert_close(_compile(model, compiler=rec)(x), model(x), rtol=1e-5, atol=1e-5)
            del model
            gc.collect()
    assert len(rec.graphs) == backend.MAX_VARIANTS + 3


def test_a_dropped_variant_frees_its_compiled_graph():
    """When the guard drops a variant (its instance was discarded), nothing else in the backend
    keeps that variant's compiled graph, which holds the instance's frozen weights: not the
    first variant either (the closure that builds later variants keeps only the frozen indices)."""
    import gc
    import weakref
    torch._dynamo.reset()
    graphs, guards = [], []

    def compiler(gm, example_inputs):
        graphs.append(weakref.ref(gm))
        return gm.forward

    def capturing(gm, example_inputs):  # the backend, with its result kept for the test
        guards.append(backend.rewrite_backend(gm, example_inputs, options={"compiler": compiler}))
        return guards[-1]
    a = Net().eval()
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(a, backend=capturing)(x), a(x), rtol=1e-5, atol=1e-5)
    [guard] = guards
    assert len(graphs) == 1 and graphs[0]() is not None
    guard.variants.clear()  # what dropping a discarded instance's variant does
    gc.collect()
    assert graphs[0]() is None
    torch._dynamo.reset()


def test_a_failure_for_another_instance_is_remembered(monkeypatch):
    """If optimising for a second instance's weights fails, that instance runs Dynamo's graph
    (right values, one warning), and later calls do not try again."""
    a, b = Net().eval(), Net().eval()
    ca, cb = _compile(a, compiler="eager"), _compile(b, compiler="eager")
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        ca(x)
        calls = []

        def failing(*args, **kwargs):
            calls.append(1)
            raise RuntimeError("planted")
        monkeypatch.setattr(backend, "run_pipeline", failing)
        with pytest.warns(UserWarning, match="planted.*unoptimised for these weights"):
            torch.testing.assert_close(cb(x), b(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cb(x), b(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ca(x), a(x), rtol=1e-5, atol=1e-5)
    assert calls == [1]


def test_a_dynamic_graph_is_not_refrozen_per_instance():
    """A graph compiled for dynamic sizes keeps one variant: another instance runs Dynamo's
    graph (one warning saying why), right for every batch size. dynamic=True also passes the
    BatchNorms' float eps in as a graph value: those folds are skipped with the reason, the
    functional BN's literal eps still folds, and the pipeline does not fail."""
    torch._dynamo.reset()
    a, b = Net().eval(), Net().eval()
    rec = Recorder()
    ca = torch.compile(a, backend="rewrite", dynamic=True, options={"compiler": rec})
    cb = torch.compile(b, backend="rewrite", dynamic=True, options={"compiler": rec})
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        for n in (2, 3):
            x = torch.randn(n, 3, 8, 8)
            torch.testing.assert_close(ca(x), a(x), rtol=1e-5, atol=1e-5)
    details = [r.detail for r in backend.last_report().records if r.pass_name == "fold_batchnorm"]
    assert sum("eps is computed" in d for d in details) == 2 and any(d.startswith("fold_bn_into_conv: [") for d in details)
    with torch.no_grad():
        x = torch.randn(2, 3, 8, 8)
        with pytest.warns(UserWarning, match="dynamic shapes"):
            got = cb(x)
        torch.testing.assert_close(got, b(x), rtol=1e-5, atol=1e-5)
        for n in (2, 5):
            x = torch.randn(n, 3, 8, 8)
            torch.testing.assert_close(cb(x), b(x), rtol=1e-5, atol=1e-5)
    assert len(rec.graphs) == 1
    torch._dynamo.reset()


def test_passes_option_and_resnet18_counts():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    rec = Recorder()
    with torch.no_grad():
        out = _compile(model, compiler=rec)(x)
        ref = model(x)
        assert rec.count(*CONV_TARGETS) == 20 and rec.count(*BN_TARGETS) == 0
        assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()
        torch._dynamo.reset()
        _compile(model, compiler=rec, passes=[])(x)  # no passes: canonicalised, nothing folded
        assert rec.count(ops.conv) == 20 and rec.count(ops.batch_norm) == 20


def test_graph_reaching_inductor_is_folded_and_inductor_output_equals_eager():
    from torch._inductor.compile_fx import compile_fx

    seen = []

    def inductor(gm, example_inputs):  # what Inductor receives, then Inductor itself
        seen.append(gm)
        return compile_fx(gm, example_inputs)

    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        out = _compile(model, compiler=inductor)(x)
        ref = model(x)
    nodes = [n for n in seen[-1].graph.nodes if n.op == "call_function"]
    assert sum(n.target in CONV_TARGETS for n in nodes) == 2
    assert sum(n.target in BN_TARGETS for n in nodes) == 0
    assert backend.last_report().count("fold_batchnorm") == 3
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_default_compiler_is_inductor():
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        out = torch.compile(model, backend="rewrite")(x)
        ref = model(x)
    assert backend.last_report().count("fold_batchnorm") == 3
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_repvgg_branches_merged_also_for_a_dynamic_batch():
    """Dynamo's graph: the three branches of every timm RepVGG block become one conv; after a
    second batch size Dynamo recompiles with a symbolic batch, and that graph is merged too."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("repvgg_a0", pretrained=False, num_classes=10).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
    rec = Recorder()
    compiled = _compile(model, compiler=rec)
    with torch.no_grad():
        for batch in (1, 2, 3):
            x = torch.randn(batch, 3, 32, 32)
            out, ref = compiled(x), model(x)
            assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert len(rec.graphs) == 2  # static batch 1, then one graph for any batch
    dynamic = [n for n in rec.graphs[-1].graph.nodes if n.op == "placeholder"]
    assert any(isinstance(n.meta.get("example_value"), torch.SymInt) for n in dynamic)
    for i in (0, 1):
        assert rec.count(*CONV_TARGETS, i=i) == 22 and rec.count(*BN_TARGETS, i=i) == 0
    assert backend.last_report().count("merge_branches") == 22


class NormNet(nn.Module):
    """RMSNorm and LayerNorm after residual adds: Dynamo writes `torch.rms_norm` and `F.layer_norm`."""

    def __init__(self, d=16):
        super().__init__()
        self.rms, self.fc, self.ln = nn.RMSNorm(d, eps=1e-6), nn.Linear(d, d), nn.LayerNorm(d)

    def forward(self, x):
        x = x + self.fc(self.rms(x))
        return self.ln(x + 1.0)


def test_lower_option_reaches_compiler_as_fused_regions():
    torch.manual_seed(0)
    model = NormNet().eval()
    x = torch.randn(2, 5, 16)
    rec = Recorder()
    with torch.no_grad():
        out = _compile(model, compiler=rec, lower="triton")(x)
        ref = model(x)
    nodes = [n for n in rec.graphs[-1].graph.nodes if n.op == "call_function"]
    assert sum(map(runtime.is_region_call, nodes)) == 2
    assert not any(n.target in (ops.rms_norm, ops.layer_norm, torch.rms_norm, F.layer_norm) for n in nodes)
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_pipeline_failure_compiles_the_graph_unchanged():
    from fxrewrite.rewrite.passmanager import Pass

    def explode(rw):
        raise RuntimeError("pass bug")

    broken = Pass("broken", "exact", analysis=explode)
    torch.manual_seed(0)
    model = Net().eval()
    rec = Recorder()
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad(), pytest.warns(UserWarning, match="pipeline failed.*pass bug"):
        out = _compile(model, compiler=rec, passes=[broken])(x)
    assert rec.count(*BN_TARGETS) == 3  # Dynamo's own graph, weights still inputs
    assert "passed through unchanged" in str(backend.last_report())
    with torch.no_grad():
        assert torch.allclose(out, model(x), rtol=1e-5, atol=1e-6)


def test_bad_options_are_refused():
    gm = fx.symbolic_trace(nn.ReLU())
    with pytest.raises(ValueError, match="unknown option"):
        backend.rewrite_backend(gm, [torch.randn(2)], options={"pases": []})
    with pytest.raises(ValueError, match="compiler must be"):
        backend.rewrite_backend(gm, [torch.randn(2)], options={"compiler": "tvm"})


def test_registered_through_entry_point_without_import():
    code = textwrap.dedent("""
        import sys, torch, torch.nn as nn
        assert "rewrite" not in sys.modules
        m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
        x = torch.randn(1, 3, 6, 6)
        with torch.no_grad():
            out = torch.compile(m, backend="rewrite", options={"compiler": "eager"})(x)
            assert torch.allclose(out, m(x), atol=1e-5)
        from fxrewrite.backend import last_report
        assert last_report().count("fold_batchnorm") == 1
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("ok")


def test_the_backend_builds_its_pipeline_as_optimize_does_layout_and_a_single_pass_name():
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(2, 3, 9, 7)
    with torch.no_grad():
        out = _compile(model, compiler="eager", layout="channels_last", passes="exact")(x)
        ref = model(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    report = backend.last_report()
    assert report.count("fold_batchnorm") == 3 and report.count("layout") == 1, report.table()
