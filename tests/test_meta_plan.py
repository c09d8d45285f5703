"""Planning on the meta device: `optimize` on a model built under `torch.device("meta")` makes the
same rewrites as on the materialised model, and loading the real weights into the plan gives the
optimized model's outputs (what `fxrewrite.checkpoint` relies on to rewrite shard by shard).

Two differences are allowed, and only these: a decision that reads weight values is skipped with
`NEEDS_VALUES` (or its measurement is left out), and torch.export may keep a `contiguous` on meta
that it elides on CPU (meta kernels lay out some outputs, e.g. attention's, differently), which
shifts the numbers of generated node names.
"""
import re

import pytest
import torch
import torch.nn as nn
import torchvision

import fxrewrite
from fxrewrite.rewrite.devices import retarget_graph, to_device
from fxrewrite.rewrite.values import NEEDS_VALUES

from conftest import tiny_gpt2, tiny_llama

timm = pytest.importorskip("timm")


def _on_meta(factory):
    with torch.device("meta"):
        return factory().eval()


def _meta_inputs(example):
    if isinstance(example, dict):
        return {k: v.to("meta") for k, v in example.items()}
    return tuple(v.to("meta") for v in example)


def _records(gm):
    """The report without what may legitimately differ: generated node numbers, the node count of
    the capture, measurements (on meta: 'not measured')."""
    out = []
    for r in gm.report.records:
        if r.pass_name == "capture" and r.detail.startswith("torch.export:"):
            continue
        detail = re.sub(r"(;\s*)?((layer|model) output deviation on the example inputs|not measured): .*$", "",
                        r.detail)
        out.append((r.pass_name, re.sub(r"_\d+$", "", r.node), r.action, re.sub(r"\b([a-z]+)_\d+\b", r"\1", detail)))
    return sorted(out)


def _ops(gm):
    return [(n.op, str(n.target)) for n in gm.graph.nodes
            if n.op in ("call_function", "call_module") and "contiguous" not in str(n.target)]


def _materialise(plan, real):
    """The plan with the optimized model's tensors put in (parameters, persistent and
    non-persistent buffers), moved to the CPU."""
    tensors = dict(real.named_parameters(remove_duplicate=False)) | dict(real.named_buffers(remove_duplicate=False))
    assert set(tensors) == set(dict(plan.named_parameters(remove_duplicate=False))
                               | dict(plan.named_buffers(remove_duplicate=False)))
    for name, t in tensors.items():
        owner, _, leaf = name.rpartition(".")
        module = plan.get_submodule(owner)
        (module._parameters if leaf in module._parameters else module._buffers)[leaf] = t
    return to_device(plan, "cpu")


def _llama_lm():
    return tiny_llama()


CASES = {
    "resnet18 (fold_batchnorm)": (lambda: torchvision.models.resnet18(num_classes=10),
                                  lambda: (torch.randn(2, 3, 32, 32),), None),
    "repvgg_a0 (merge_branches)": (lambda: timm.create_model("repvgg_a0", num_classes=10),
                                   lambda: (torch.randn(2, 3, 32, 32),), None),
    "llama (quantize_prep)": (_llama_lm, lambda: {"input_ids": torch.randint(0, 100, (2, 8))}, "quantize_prep"),
    "gpt2 (prenorm_rmsnorm)": (tiny_gpt2, lambda: {"input_ids": torch.randint(0, 100, (2, 8))},
                               ["exact", "prenorm_rmsnorm"]),
    "llama (swap_dyt)": (_llama_lm, lambda: {"input_ids": torch.randint(0, 100, (2, 8))}, "swap_dyt"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_meta_plan_matches_the_materialised_one(name):
    factory, inputs, passes = CASES[name]
    torch.manual_seed(0)
    model = factory().eval()
    example = inputs()
    real = fxrewrite.optimize(model, example, passes=passes)
    plan = fxrewrite.optimize(_on_meta(factory), _meta_inputs(example), passes=passes)

    assert any(r.action == "rewrote" for r in real.report.records)
    assert _records(plan) == _records(real)
    assert _ops(plan) == _ops(real)
    assert not any(t.device.type != "meta" for t in plan.parameters())  # nothing was allocated

    # derivations name the same targets and sources: replaying them later gives the same tensors
    assert [(d.target, d.sources) for d in plan.derivations] == [(d.target, d.sources) for d in real.derivations]

    loaded = _materialise(plan, real)
    fresh = inputs()
    with torch.no_grad():
        want, got = real(**fresh) if isinstance(fresh, dict) else real(*fresh), \
            loaded(**fresh) if isinstance(fresh, dict) else loaded(*fresh)
    want, got = [t for t in torch.utils._pytree.tree_leaves(want) if isinstance(t, torch.Tensor)], \
        [t for t in torch.utils._pytree.tree_leaves(got) if isinstance(t, torch.Tensor)]
    assert len(want) == len(got) and all(torch.equal(w, g) for w, g in zip(want, got))


class PaddedAfterBiased(nn.Module):
    """conv1x1 (with a bias) then a zero-padded conv3x3: merging them is exact only where the
    first bias is zero, a fact of the weights' values."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(4, 4, 1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.b(self.a(x))


def test_a_decision_that_needs_weight_values_is_skipped_on_meta_and_says_why():
    torch.manual_seed(0)
    real_zero = PaddedAfterBiased().eval()
    nn.init.zeros_(real_zero.a.bias)
    x = torch.randn(2, 4, 8, 8)
    merged = fxrewrite.optimize(real_zero, (x,), passes=["merge_branches"])
    assert any(r.action == "rewrote" for r in merged.report.records)  # zero bias: merged

    plan = fxrewrite.optimize(_on_meta(PaddedAfterBiased), (x.to("meta"),), passes=["merge_branches"])
    skipped = [r for r in plan.report.records if r.pass_name == "merge_branches" and r.action == "skipped"]
    assert skipped and all(NEEDS_VALUES in r.detail for r in skipped)
    assert not any(r.action == "rewrote" for r in plan.report.records)


def test_bias_free_conv_before_a_padded_conv_still_merges_on_meta():
    """A conv without bias has a zero bias by construction: no value needs reading."""
    class BiasFree(PaddedAfterBiased):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(4, 4, 1, bias=False)
    x = torch.randn(2, 4, 8, 8)
    plan = fxrewrite.optimize(_on_meta(BiasFree), (x.to("meta"),), passes=["merge_branches"])
    assert any(r.pass_name == "merge_branches" and r.action == "rewrote" for r in plan.report.records)


def test_to_device_rewrites_the_devices_written_into_the_graph():
    torch.manual_seed(0)
    model = tiny_llama()
    ids = torch.randint(0, 100, (2, 8))
    real = fxrewrite.optimize(model, {"input_ids": ids})
    plan = fxrewrite.optimize(_on_meta(tiny_llama), {"input_ids": ids.to("meta")})
    written = [n for n in plan.graph.nodes if n.kwargs.get("device") == torch.device("meta")]
    assert written, "export writes the capture's device into the graph (arange)"
    with pytest.raises(ValueError, match="meta device"):
        to_device(plan, "cpu")  # no values yet
    loaded = _materialise(plan, real)
    assert not [n for n in loaded.graph.nodes if n.kwargs.get("device") == torch.device("meta")]
    assert retarget_graph(loaded.graph, torch.device("cpu")) == 0
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids)[0], real(input_ids=ids)[0])
