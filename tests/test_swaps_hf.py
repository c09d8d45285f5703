"""Swaps on transformers models (captured with torch.export): LLaMA's decomposed RMSNorm lifted
exactly, DyT with the LLM alpha rule and calibration, GPT-2 / BERT LayerNorm swaps selected by
type and regex."""
import io
import re
import warnings

import pytest
import torch
import torch.nn as nn

from fxrewrite import calibrate, optimize, verify
from fxrewrite.rewrite import ops
from fxrewrite.rewrite.nn import DyT
from fxrewrite.passes.swaps import norm_to_dyt

warnings.filterwarnings("ignore", message=".*specialized.*")
transformers = pytest.importorskip("transformers")


def ids(n=8):
    return {"input_ids": torch.randint(0, 100, (1, n))}


def tiny_llama():
    cfg = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                   num_key_value_heads=2, vocab_size=100)
    return transformers.LlamaModel(cfg).eval()


def test_llama_lift_norms_is_exact():
    torch.manual_seed(0)
    model = tiny_llama()
    gm = optimize(model, ids(), passes=["lift_norms"])
    assert gm.report.count("lift_norms") == 5
    assert sum(n.target is ops.rms_norm for n in gm.graph.nodes) == 5
    assert not any(n.target is torch.ops.aten.rsqrt.default for n in gm.graph.nodes)
    verify(model, gm, ids(), rtol=0, atol=0)


def test_llama_dyt_llm_rule_and_calibration():
    torch.manual_seed(0)
    model = tiny_llama()
    gm = optimize(model, ids(), passes=["lift_norms", norm_to_dyt(alpha="llm")])
    alphas = {n: round(float(m.alpha.detach()), 3) for n, m in gm.named_modules() if isinstance(m, DyT)}
    assert alphas == {"layers.0.input_layernorm_dyt": 0.8, "layers.0.post_attention_layernorm_dyt": 0.2,
                      "layers.1.input_layernorm_dyt": 0.8, "layers.1.post_attention_layernorm_dyt": 0.2,
                      "norm_dyt": 0.2}
    assert all("layer output deviation" in r.detail for r in gm.report.records
               if r.pass_name == "norm_to_dyt" and r.action == "rewrote")
    result = calibrate(gm, [ids() for _ in range(3)], holdout=[ids() for _ in range(2)], reference=model)
    for row in result.layers:
        assert row.holdout_after < 0.6 * row.holdout_before, row
    assert result.output_after < result.output_before


def test_gpt2_dyt_selected_by_type_and_regex_round_trip():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=32)
    model = transformers.GPT2Model(cfg).eval()
    x = ids()
    gm = optimize(model, x, passes=[norm_to_dyt(only=nn.LayerNorm)])  # export records the class by name
    assert gm.report.count("norm_to_dyt") == 5
    gm = optimize(model, x, passes=[norm_to_dyt(only=re.compile(r"ln_2$"))])
    assert gm.report.count("norm_to_dyt") == 2 and len(gm.report.skipped("norm_to_dyt")) == 3
    buf = io.BytesIO()
    torch.save(gm.state_dict(), buf)
    buf.seek(0)
    fresh = optimize(model, x, passes=[norm_to_dyt(only=re.compile(r"ln_2$"))])
    with torch.no_grad():
        fresh.get_submodule("h.0.ln_2_dyt").alpha.fill_(3.0)
    fresh.load_state_dict(torch.load(buf))
    torch.testing.assert_close(fresh(**x), gm(**x), rtol=0, atol=0)


def test_bert_all_layernorms_to_dyt():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                  vocab_size=100)
    model = transformers.BertModel(cfg).eval()
    gm = optimize(model, ids(), passes=["swap_dyt"])
    assert gm.report.count("norm_to_dyt") == 5
    out = gm(**ids())
    assert out[0].shape == (1, 8, 32)
