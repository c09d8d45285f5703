"""Per-block optimization: `partial=` a module class or a predicate optimizes exactly the
submodules it names, each on its own, and keeps the rest of the user's module tree."""
from __future__ import annotations

import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fxrewrite import optimize, verify
from fxrewrite.passes.swaps import norm_to_dyt

t = pytest.importorskip("transformers")
from transformers.models.llama.modeling_llama import LlamaDecoderLayer  # noqa: E402
from conftest import sgd_losses  # noqa: E402

VOCAB = 128


def tiny_llama(**kw) -> nn.Module:
    torch.manual_seed(0)
    cfg = t.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, **kw)
    return t.LlamaForCausalLM(cfg)


def ids(batch=2, seq=8, seed=0):
    return {"input_ids": torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))}


@pytest.fixture(scope="module")
def llama():
    """In training mode, with attention dropout: what a swapped model is trained from."""
    return tiny_llama(attention_dropout=0.1).train()


@pytest.fixture(scope="module")
def per_block(llama):
    before = {k: v.clone() for k, v in llama.state_dict().items()}
    fast = optimize(llama, ids(), passes="swap_dyt", partial=LlamaDecoderLayer)
    return fast, before


def partial_notes(fast):
    return [r.detail for r in fast.report.records if r.pass_name == "partial" and r.node == "LlamaForCausalLM"]


def test_each_block_becomes_a_graph_module_in_the_users_tree(llama, per_block):
    fast, before = per_block
    assert type(fast) is type(llama)
    for name, module in llama.named_modules():
        if re.fullmatch(r"model\.layers\.\d", name):
            block = fast.get_submodule(name)
            assert isinstance(block, torch.fx.GraphModule), name
            assert sum(1 for m in block.modules() if type(m).__name__ == "DyT") == 2, name
        elif not name.startswith("model.layers."):  # embeddings, final norm, lm_head: as they were
            assert type(fast.get_submodule(name)) is type(module), name
    notes = partial_notes(fast)
    assert "optimizing each of the 2 submodule(s) partial=LlamaDecoderLayer matches" in notes[0]
    assert "optimized 2 submodule(s) (model.layers.0, model.layers.1)" in notes[-1] and "left as they are: 0" in notes[-1]
    assert fast.report.count("norm_to_dyt") == 4
    # the user's model: untouched
    assert all(type(m) is LlamaDecoderLayer for m in llama.model.layers)
    assert all(torch.equal(before[k], v) for k, v in llama.state_dict().items())
    assert llama.config.use_cache and not fast.config.use_cache  # the copy's KV cache is off, as for a whole capture


def test_per_block_equals_the_whole_model_swap_on_other_shapes(llama, per_block):
    fast, _ = per_block
    whole = optimize(llama, ids(), passes=["lift_norms", norm_to_dyt(only="model.layers")])
    assert whole.report.count("norm_to_dyt") == 4
    fast.eval(), whole.eval()
    for batch, seq in ((3, 13), (1, 5)):
        x = ids(batch, seq, seed=batch)
        with torch.no_grad():
            torch.testing.assert_close(fast(**x).logits, whole(**x).logits, rtol=1e-5, atol=1e-5)
    fast.train(), whole.train()


def test_per_block_result_follows_train_and_eval_and_trains(per_block):
    fast, _ = per_block
    x = ids(2, 10, seed=3)
    fast.eval()
    with torch.no_grad():
        torch.testing.assert_close(fast(**x).logits, fast(**x).logits)
    fast.train()
    with torch.no_grad():
        assert not torch.equal(fast(**x).logits, fast(**x).logits)  # attention dropout again
    def next_token_loss():
        logits = fast(**x).logits
        return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), x["input_ids"][:, 1:].reshape(-1))
    losses = sgd_losses(fast, next_token_loss, 4, lr=0.1)
    assert losses[-1] < losses[0], losses
    assert all(p.grad is not None for n, p in fast.named_parameters() if "_dyt." in n)


def test_a_predicate_names_the_blocks_and_the_report_says_which_were_left(llama):
    fast = optimize(llama, ids(), passes="swap_dyt", partial=lambda name, module: name in ("model.layers.1", "lm_head"))
    assert isinstance(fast.model.layers[1], torch.fx.GraphModule)
    assert type(fast.model.layers[0]) is LlamaDecoderLayer and type(fast.lm_head) is nn.Linear
    assert any(r.node == "lm_head" and "no pass rewrote anything in it" in r.detail for r in fast.report.records)
    assert "optimized 1 submodule(s) (model.layers.1)" in partial_notes(fast)[-1]
    assert "left as they are: 1 (lm_head)" in partial_notes(fast)[-1]


def test_a_class_that_matches_nothing_is_an_error(llama):
    with pytest.raises(ValueError, match=r"partial=Conv2d matches no submodule of LlamaForCausalLM"):
        optimize(llama, ids(), passes="swap_dyt", partial=nn.Conv2d)
    with pytest.raises(TypeError, match="partial must be"):
        optimize(llama, ids(), passes="swap_dyt", partial="model.layers")


def test_exact_passes_per_block_equal_the_original():
    """RMSNorm weights folded into the projections of each block: the same function."""
    model = tiny_llama().eval()
    with torch.no_grad():  # weights other than 1, so that the fold changes the projections
        for name, p in model.named_parameters():
            if "layernorm" in name:
                p.uniform_(0.5, 1.5)
    fast = optimize(model, ids(), passes=["lift_norms", "fold_norm_affine"], partial=LlamaDecoderLayer)
    assert all(isinstance(b, torch.fx.GraphModule) for b in fast.model.layers)
    assert fast.report.count("fold_norm_affine") >= 4, fast.report
    for batch, seq in ((3, 13), (2, 8)):
        result = verify(model, fast, ids(batch, seq, seed=seq))
        assert result.passed and result.max_rel < 1e-5, result
