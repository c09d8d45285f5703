"""Results captured through torch.export that follow `.train()` / `.eval()` (swap passes only).

torch.export traces one mode. When no exact fold is asked for, capture also traces the other mode
and, if the two programs differ only in mode arguments (dropout's `train`, batch norm's
`training` and step counter, attention's `dropout_p`, copies one mode makes), merges them into
one graph whose mode-dependent ops follow the module's mode (`rewrite.mode.merge_modes`).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fxrewrite import ModeError, optimize
from fxrewrite.rewrite.mode import FollowMode

from conftest import notes, sgd_losses


class Tokens(nn.Module):
    """Called with keywords (so torch.export captures it): embedding, BatchNorm over features,
    attention with dropout in training mode only, a dropout, a ReLU to swap."""

    def __init__(self, p=0.3):
        super().__init__()
        self.embed, self.bn, self.drop = nn.Embedding(40, 16), nn.BatchNorm1d(16), nn.Dropout(p)
        self.proj, self.p = nn.Linear(16, 16), p

    def forward(self, input_ids):
        x = self.embed(input_ids)
        x = self.bn(x.transpose(1, 2)).transpose(1, 2)
        q = self.proj(x).view(x.shape[0], x.shape[1], 2, 8).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, q, q, dropout_p=self.p if self.training else 0.0)
        return self.drop(torch.relu(a.transpose(1, 2).reshape(x.shape)))


def ids(batch=3, seq=5):
    return {"input_ids": torch.randint(0, 40, (batch, seq))}


def follow_modules(gm):
    return [m for m in gm.modules() if isinstance(m, FollowMode)]


@pytest.mark.parametrize("training", [True, False])
def test_swaps_only_export_result_follows_the_mode(training):
    torch.manual_seed(0)
    model = Tokens().train(training)
    fast = optimize(model, ids(), passes=["swap_smelu"])
    assert fast.report.count("relu_to_smelu") == 1
    # dropout, batch norm, attention dropout, and the batch norm's step counter
    assert len(follow_modules(fast)) == 4, fast.graph
    mode = "training" if training else "eval"
    assert any(n.startswith(f"captured in {mode} mode; torch.export traced both modes and they differ only in 3 "
                            f"mode argument(s)") for n in notes(fast, "capture")), notes(fast, "capture")
    x = ids()
    fast.eval()
    assert not fast.training and all(not m.training for m in follow_modules(fast))
    with torch.no_grad():
        torch.testing.assert_close(fast(**x), fast(**x))  # no dropout, running statistics
        counter = fast.get_buffer("bn.num_batches_tracked").clone()
        stats = fast.get_buffer("bn.running_mean").clone()
        fast(**x)
        assert torch.equal(fast.get_buffer("bn.num_batches_tracked"), counter)  # eval: nothing updates
        assert torch.equal(fast.get_buffer("bn.running_mean"), stats)
    fast.train()
    with torch.no_grad():
        assert not torch.equal(fast(**x), fast(**x))  # dropout drops again
    assert fast.get_buffer("bn.num_batches_tracked").item() == counter.item() + 2
    assert not torch.equal(fast.get_buffer("bn.running_mean"), stats)
    fast.load_state_dict(fast.state_dict())  # FollowMode modules hold no state of their own


def test_eval_mode_of_the_merged_graph_equals_the_eval_model():
    """The merged graph is built from the training trace; in eval mode it computes what the model
    computes in eval mode (here with the swap undone: no pass at all but lift_norms)."""
    torch.manual_seed(0)
    model = Tokens().train()
    fast = optimize(model, ids(), passes=["lift_norms"])
    assert follow_modules(fast)
    x = ids(2, 7)
    model.eval()
    fast.eval()
    with torch.no_grad():
        torch.testing.assert_close(fast(**x), model(**x))


def test_training_a_swapped_decoder_captured_by_export():
    t = pytest.importorskip("transformers")
    cfg = t.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, max_position_embeddings=32, attention_dropout=0.2)
    torch.manual_seed(0)
    model = t.LlamaForCausalLM(cfg).train()
    x = {"input_ids": torch.randint(0, 64, (2, 8))}
    fast = optimize(model, x, passes=["swap_dyt"])  # lift_norms, then norm_to_dyt
    assert follow_modules(fast) and fast.report.count("norm_to_dyt") == 5, fast.report
    fast.eval()
    with torch.no_grad():
        a, b = fast(**x), fast(**x)
    logits = (lambda o: o.logits if hasattr(o, "logits") else o[0])
    torch.testing.assert_close(logits(a), logits(b))
    fast.train()
    target = torch.randint(0, 64, (2 * 8,))
    losses = sgd_losses(fast, lambda: F.cross_entropy(logits(fast(**x)).reshape(-1, 64), target), 5, lr=0.1)
    assert losses[-1] < losses[0], losses
    assert any(p.grad is not None for n, p in fast.named_parameters() if "dyt" in n)


class ModeBranch(nn.Module):
    """Computes something else in training mode: no single graph follows both modes."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(40, 8)

    def forward(self, input_ids):
        x = self.embed(input_ids)
        return torch.relu(x * 2 if self.training else x)


def test_programs_that_differ_beyond_mode_arguments_stay_fixed_and_say_why():
    fast = optimize(ModeBranch().train(), ids(), passes=["swap_smelu"])
    assert any(n.startswith("not made to follow .train()/.eval(): aten.mul") or
               n.startswith("not made to follow .train()/.eval(): the two modes trace to different")
               for n in notes(fast, "capture")), notes(fast, "capture")
    with pytest.raises(ModeError, match="fixed in training mode"):
        fast.eval()


def test_exact_folds_keep_one_traced_mode():
    """With the default exact passes nothing is traced twice: the eval-mode result is inference-only."""
    fast = optimize(Tokens().eval(), ids())
    assert not follow_modules(fast)
    with pytest.raises(ModeError, match="inference-only"):
        fast.train()
