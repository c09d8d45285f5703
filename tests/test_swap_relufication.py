"""GELU / SiLU -> ReLU (passes.swaps_activation.relufy, "relufication") and activation sparsity
(fxrewrite.sparsity.activation_sparsity): the formulas, what is swapped on real models (timm
ViT, LLaMA / Qwen2 gated FFNs, GPT-2's written-out GELU), that the swapped graph computes what
the same model built by hand with ReLU computes, that the sparsity it reports is the real count
of zeros, training, state_dict and ONNX export."""
import re
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fxrewrite import check_onnx, export_onnx, optimize
from fxrewrite.passes import REGISTRY
from fxrewrite.passes.swaps_activation import relufy, written_out_activations
from fxrewrite.rewrite.activations import ShiftedReLU, ThresholdReLU
from fxrewrite.sparsity import activation_sparsity

from conftest import (TinyBlock, ids, notes, replace_modules, reported_deviation, rewrote, skipped,
                      state_dict_round_trip, tiny_gpt2, tiny_llama, tiny_vit, train_steps)

warnings.filterwarnings("ignore", message=".*specialized.*")


def sparsity_in(detail, what="activation sparsity on the example inputs"):
    """(before, after) fractions a relufication record printed after `what`."""
    m = re.search(re.escape(what) + r" ([0-9.]+)% -> ([0-9.]+)%", detail)
    assert m, detail
    return float(m[1]) / 100, float(m[2]) / 100


def tiny_qwen2():
    t = pytest.importorskip("transformers")
    cfg = t.Qwen2Config(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                        num_key_value_heads=1, vocab_size=100, use_cache=False)
    return t.Qwen2Model(cfg).eval()


# ---------------------------------------------------------------- formulas

def test_shifted_and_threshold_relu_at_known_points():
    x = torch.tensor([-2.0, -0.5, 0.0, 0.3, 0.5, 0.7, 3.0])
    torch.testing.assert_close(ShiftedReLU(0.5)(x), torch.tensor([0, 0, 0, 0, 0, 0.2, 2.5]), rtol=0, atol=1e-7)
    torch.testing.assert_close(ThresholdReLU(0.5)(x), torch.tensor([0, 0, 0, 0, 0, 0.7, 3.0]), rtol=0, atol=0)
    torch.testing.assert_close(ThresholdReLU(0.0)(x), torch.relu(x), rtol=0, atol=0)
    torch.testing.assert_close(ShiftedReLU(0.0)(x), torch.relu(x), rtol=0, atol=0)
    torch.testing.assert_close(ShiftedReLU(-1.0)(x), torch.relu(x + 1), rtol=0, atol=0)
    with pytest.raises(ValueError, match="threshold >= 0"):
        ThresholdReLU(-0.1)
    with pytest.raises(ValueError, match="not both"):
        relufy(shift=0.1, threshold=0.2)
    # saved, not trained
    assert not list(ShiftedReLU(0.5).parameters()) and set(ShiftedReLU(0.5).state_dict()) == {"shift"}
    assert set(ThresholdReLU(0.5).state_dict()) == {"threshold"}
    assert REGISTRY["relufication"].approximate


# ---------------------------------------------------------------- real models

def test_vit_gelus_become_relus_with_sparsity_and_deviation_reported():
    torch.manual_seed(0)
    model, x = tiny_vit(), torch.randn(2, 3, 32, 32)
    gm = optimize(model, x, passes=["relufication"])
    recs = rewrote(gm, "relufication")
    assert [r.detail.split(" -> ")[0] for r in recs] == ["blocks.0.mlp.act", "blocks.1.mlp.act"]
    assert sum(isinstance(m, nn.ReLU) for m in gm.modules()) == 2
    for r in recs:
        assert "(GELU -> ReLU;" in r.detail
        before, after = sparsity_in(r.detail)
        assert before == 0 and 0.3 < after < 0.7, r.detail  # GELU has no exact zeros on random inputs
        assert reported_deviation(r.detail) > 0
    assert any("model output deviation" in d for d in notes(gm, "relufication"))
    by_hand = replace_modules(model, nn.GELU, lambda _: nn.ReLU())
    torch.testing.assert_close(gm(x), by_hand(x), rtol=1e-5, atol=1e-5)
    assert isinstance(model.blocks[0].mlp.act, nn.GELU)  # the user's model is untouched


def test_reported_sparsity_is_the_count_of_zeros():
    """The record's 'after' is the fraction of exact zeros of ReLU on the GELU's recorded input:
    recount it with activation_sparsity on the eager model built by hand with ReLU."""
    torch.manual_seed(0)
    model, x = tiny_vit(), torch.randn(2, 3, 32, 32)
    gm = optimize(model, x, passes=[relufy(only="blocks.0")])  # block 0 sees the same input in both
    [r] = rewrote(gm, "relufication")
    [s] = skipped(gm, "relufication")
    assert "not selected by only='blocks.0'" in s.detail
    by_hand = replace_modules(model, nn.GELU, lambda _: nn.ReLU())
    counted = activation_sparsity(by_hand, [x])["blocks.0.mlp.act"]
    assert counted.kind == "ReLU" and counted.total == 2 * 17 * 128
    assert sparsity_in(r.detail)[1] == pytest.approx(counted.sparsity, abs=5e-5)  # printed to 0.01%
    assert activation_sparsity(gm, [x])["blocks.0.mlp.act_relu"].zeros == counted.zeros


@pytest.mark.parametrize("make", [tiny_llama, tiny_qwen2], ids=["llama", "qwen2"])
def test_gated_ffn_silu_swapped_and_product_sparsity_reported(make):
    torch.manual_seed(0)
    model = make()
    x = ids(batch=2)
    gm = optimize(model, x, passes=["relufication"])
    recs = rewrote(gm, "relufication")
    assert [r.detail.split(" -> ")[0] for r in recs] == ["layers.0.mlp.act_fn", "layers.1.mlp.act_fn"]
    for r in recs:
        assert "(SiLU -> ReLU;" in r.detail
        before, after = sparsity_in(r.detail)
        p_before, p_after = sparsity_in(r.detail, "gated product act(gate) * up")
        assert before == p_before == 0 and 0.3 < after <= p_after < 0.7, r.detail
    # the same model with its act_fn replaced by ReLU, in eager mode
    by_hand = replace_modules(model, type(model.layers[0].mlp.act_fn), lambda _: nn.ReLU())
    with torch.no_grad():
        torch.testing.assert_close(gm(**x)[0], by_hand(**x)[0], rtol=1e-5, atol=1e-5)
    stats = activation_sparsity(by_hand, [x, ids(batch=2)])
    names = [r.name for r in stats]
    assert names == ["layers.0.mlp.act_fn", "layers.1.mlp.act_fn"], names
    for r in stats:  # on 2 batches: every row of the FFN counted
        assert r.total == 2 * 2 * 8 * 64 and r.product_total == r.total
        assert r.product_zeros >= r.zeros and 0.3 < r.sparsity < 0.7
    eager = activation_sparsity(model, [x])
    assert all(r.kind == "SiLU" and r.zeros == 0 and r.product_sparsity == 0 for r in eager)


def test_tanh_gelu_in_every_spelling():
    """nn.GELU('tanh'), F.gelu(approximate='tanh') and GPT-2's written-out tanh GELU; a
    written-out SiLU and erf GELU."""

    class Spellings(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2, self.fc3, self.fc4 = (nn.Linear(8, 8) for _ in range(4))
            self.act = nn.GELU(approximate="tanh")

        def forward(self, x):
            h = self.act(self.fc1(x))
            h = F.gelu(self.fc2(h), approximate="tanh")
            h = self.fc3(h)
            h = torch.sigmoid(h) * h  # SiLU written out
            h = self.fc4(h)
            return 0.5 * h * (1 + torch.erf(h / 2 ** 0.5)) + h  # exact GELU written out, plus a residual

    torch.manual_seed(0)
    model, x = Spellings().eval(), torch.randn(4, 8)
    gm = optimize(model, x, passes=["relufication"])
    kinds = [re.search(r"\((.*?) -> ReLU", r.detail)[1] for r in rewrote(gm, "relufication")]
    assert kinds == ["GELU (tanh approximation)", "GELU (tanh approximation)", "SiLU", "GELU"]
    assert any("2 written-out GELU/SiLU" in d for d in notes(gm, "relufication"))

    def by_hand(x):
        h = torch.relu(model.fc1(x))
        h = torch.relu(model.fc2(h))
        h = model.fc4(torch.relu(model.fc3(h)))
        return torch.relu(h) + h
    torch.testing.assert_close(gm(x), by_hand(x), rtol=1e-6, atol=1e-6)
    assert not any(n.target in (torch.erf, torch.sigmoid, torch.ops.aten.sigmoid.default) for n in gm.graph.nodes)
    # selection: the written-out ones are skipped with a reason too, and stay as written
    gm = optimize(model, x, passes=[relufy(only="act")])
    assert [r.detail.split(" -> ")[0] for r in rewrote(gm, "relufication")] == ["act"]
    reasons = [r.detail for r in skipped(gm, "relufication")]
    assert len(reasons) == 3 and all("not selected by only='act'" in d for d in reasons), reasons
    assert sum("a written-out" in d for d in reasons) == 2
    assert any(n.target is torch.erf for n in gm.graph.nodes)


def test_gpt2_written_out_gelu_recognised():
    torch.manual_seed(0)
    model, x = tiny_gpt2(), ids()
    gm = optimize(model, x, passes=["relufication"])
    recs = rewrote(gm, "relufication")
    assert [r.detail.split(" -> ")[0] for r in recs] == ["h.0.mlp.act", "h.1.mlp.act"]
    assert all("GELU (tanh approximation) -> ReLU" in r.detail for r in recs)
    by_hand = replace_modules(model, type(model.h[0].mlp.act), lambda _: nn.ReLU())
    with torch.no_grad():
        torch.testing.assert_close(gm(**x)[0], by_hand(**x)[0], rtol=1e-5, atol=1e-5)


def test_look_alikes_are_not_lifted():
    """tanh(x) * x, 0.5 x (1 + tanh(x)) and x * sigmoid(1.702 x) (QuickGELU) are not GELU/SiLU;
    an intermediate value read elsewhere keeps a true GELU as written."""

    class LookAlikes(nn.Module):
        def forward(self, x):
            a = torch.tanh(x) * x
            b = 0.5 * x * (1 + torch.tanh(x))
            c = x * torch.sigmoid(1.702 * x)
            s = torch.sigmoid(x)
            return a + b + c + x * s + s  # sigmoid(x) read elsewhere

    gm = optimize(LookAlikes().eval(), torch.randn(3, 4), passes=[])
    assert written_out_activations(gm) == []
    gm = optimize(LookAlikes().eval(), torch.randn(3, 4), passes=["relufication"])
    assert rewrote(gm, "relufication") == []
    assert any("nothing to swap" in d for d in notes(gm, "relufication"))


# ---------------------------------------------------------------- shift and threshold

def test_shift_and_threshold_raise_sparsity_and_match_by_hand():
    torch.manual_seed(0)
    model, x = tiny_vit(), torch.randn(2, 3, 32, 32)
    plain = sparsity_in(rewrote(optimize(model, x, passes=["relufication"]), "relufication")[0].detail)[1]
    for swap, cls, make in [(relufy(shift=0.3), ShiftedReLU, lambda: ShiftedReLU(0.3)),
                            (relufy(threshold=0.3), ThresholdReLU, lambda: ThresholdReLU(0.3))]:
        gm = optimize(model, x, passes=[swap])
        recs = rewrote(gm, "relufication")
        assert len(recs) == 2 and sum(isinstance(m, cls) for m in gm.modules()) == 2
        assert f"{cls.__name__}:" in recs[0].detail
        assert sparsity_in(recs[0].detail)[1] > plain  # same input, more of it cut to 0
        torch.testing.assert_close(gm(x), replace_modules(model, nn.GELU, lambda _: make())(x), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- activation_sparsity is honest

class Gated(nn.Module):
    """act(x) * up, with a functional ReLU after it in the same module (named '#2')."""

    def __init__(self, act):
        super().__init__()
        self.act = act

    def forward(self, x, up):
        return F.relu(self.act(x) * up - 1)


def test_activation_sparsity_counts_exact_zeros():
    x = torch.tensor([[-3.0, -1.0, 0.0, 0.0, 0.5, 2.0, -0.0, 4.0]])  # 5 of 8 <= 0, 3 of them (signed) zeros
    up = torch.tensor([[1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.0]])  # zeros at 1, 4, 7
    for act, zeros in [(nn.ReLU(), 5), (nn.GELU(), 3), (nn.SiLU(), 3), (ThresholdReLU(1.0), 6),
                       (ShiftedReLU(0.5), 6)]:
        stats = activation_sparsity(Gated(act), [(x, up), (x, up)])
        assert [r.name for r in stats] == ["act", "<model>"]
        r = stats["act"]
        assert (r.kind, r.zeros, r.total) == (type(act).__name__, 2 * zeros, 16)
        assert r.sparsity == zeros / 8
        # the product is 0 where the activation is or up is: positions 1, 4, 7 and the act's zeros
        expected = int(((act(x) == 0) | (up == 0)).sum())
        assert (r.product_zeros, r.product_total) == (2 * expected, 16)
    # the functional ReLU inside the module: relu(act * up - 1), no product after it
    r = activation_sparsity(Gated(nn.ReLU()), [(x, up)])["<model>"]
    assert (r.kind, r.zeros, r.product_sparsity) == ("ReLU", int((torch.relu(x) * up - 1 <= 0).sum()), None)


def test_activation_sparsity_on_graph_and_two_functional_calls():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return F.gelu(self.fc(F.relu(x)))

    x = torch.tensor([[-1.0, 0.0, 1.0, 2.0], [0.0, 0.0, -5.0, 3.0]])
    model = Two().eval()
    with torch.no_grad():
        model.fc.weight.copy_(torch.eye(4))
        model.fc.bias.zero_()
    eager = activation_sparsity(model, [x])
    assert [(r.name, r.kind, r.zeros) for r in eager] == [("<model>", "ReLU", 5), ("<model>#2", "GELU", 5)]
    gm = optimize(model, x, passes=[])  # canonical aten ops in a graph
    graph = activation_sparsity(gm, [x])
    assert [(r.kind, r.zeros, r.total) for r in graph] == [("ReLU", 5, 8), ("GELU", 5, 8)]
    assert "62.50%" in str(graph)
    with pytest.raises(ValueError, match="at least one batch"):
        activation_sparsity(model, [])


# ---------------------------------------------------------------- nothing to do, train, save, export

def test_model_without_gelu_or_silu_says_so():
    model, x = TinyBlock(nn.LayerNorm(8)).eval(), torch.randn(2, 8)
    gm = optimize(model, x, passes=["relufication"])
    assert rewrote(gm, "relufication") == [] and any("nothing to swap" in d for d in notes(gm, "relufication"))
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)


def test_swapped_vit_trains_and_round_trips():
    torch.manual_seed(0)
    model, x = tiny_vit(), torch.randn(2, 3, 32, 32)
    swap = relufy(shift=0.1)
    gm = optimize(model, x, passes=[swap])
    losses = train_steps(gm, x)
    assert losses[-1] < losses[0]
    gm.eval()
    fresh = optimize(model, x, passes=[swap])
    assert "blocks.0.mlp.act_relu.shift" in fresh.state_dict()
    state_dict_round_trip(gm, fresh)
    torch.testing.assert_close(fresh(x), gm(x), rtol=0, atol=0)


class GatedMLP(nn.Module):
    """A LLaMA-style gated FFN and a GELU MLP."""

    def __init__(self, d=16):
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.act, self.fc, self.gelu = nn.SiLU(), nn.Linear(d, d), nn.GELU(approximate="tanh")

    def forward(self, x):
        h = x + self.down(self.act(self.gate(x)) * self.up(x))
        return self.gelu(self.fc(h))


@pytest.mark.parametrize("swap, op_type", [(relufy(), "Relu"), (relufy(shift=0.2), "Relu"),
                                           (relufy(threshold=0.2), "Where")], ids=["relu", "shifted", "threshold"])
def test_onnx_export_of_relufied_model(swap, op_type, tmp_path):
    torch.manual_seed(0)
    model, x = GatedMLP().eval(), torch.randn(4, 16)
    gm = optimize(model, x, passes=[swap])
    assert len(rewrote(gm, "relufication")) == 2
    path = tmp_path / "relu.onnx"
    export_onnx(gm, x, path)
    import onnx
    types = [n.op_type for n in onnx.load(path).graph.node]
    assert op_type in types and "Sigmoid" not in types and "Erf" not in types and "Tanh" not in types, types
    for batch in (4, 7):
        result = check_onnx(gm, path, torch.randn(batch, 16))
        assert result.passed, str(result)
