"""Exact LayerNorm -> RMSNorm for pre-LN transformers (passes.prenorm), proven in float64 on
GPT-2 and a pre-LN ViT against the original model on fresh inputs; and the cases where it does
not apply, each with its reason."""
import warnings

import pytest
import timm
import torch
import torch.nn as nn

from fxrewrite import optimize, verify
from fxrewrite.rewrite import ops

warnings.filterwarnings("ignore", message=".*specialized.*")
transformers = pytest.importorskip("transformers")


def randomise_norms(model, scale=0.3, key="norm"):
    """Non-trivial LayerNorm weights and biases, so that dropping or mishandling them shows."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if key in name:
                p.add_(torch.randn_like(p) * scale)
    return model


def tiny_vit(**kw):
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2, embed_dim=32,
                             num_heads=2, num_classes=10, **kw).eval()


def records(gm, action):
    return [r for r in gm.report.records if r.pass_name == "prenorm_rmsnorm" and r.action == action]


def count(gm, target):
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is target)


def test_vit_float64_exact():
    torch.manual_seed(0)
    model = randomise_norms(tiny_vit()).double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    gm = optimize(model, x, passes=["prenorm_rmsnorm"])
    assert count(gm, ops.layer_norm) == 0 and count(gm, ops.rms_norm) == 5
    detail = " ".join(r.detail for r in records(gm, "rewrote"))
    for writer in ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.1.mlp.fc2.bias"):
        assert f"re-centred {writer}" in detail or f", {writer}" in detail
    fresh = torch.randn(3, 3, 32, 32, dtype=torch.float64) * 3 + 1  # other batch size, shifted inputs
    result = verify(model, gm, fresh, rtol=1e-10)
    assert result.max_rel < 1e-12
    # and in float32, equal up to rounding
    verify(model.float(), gm.float(), fresh.float(), rtol=1e-5)


@pytest.mark.parametrize("head", [False, True])
def test_gpt2_float64_exact(head):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=32)
    model = (transformers.GPT2LMHeadModel if head else transformers.GPT2Model)(cfg).eval()
    model = randomise_norms(model, key="ln").double()
    gm = optimize(model, {"input_ids": torch.randint(0, 100, (1, 8))}, passes=["prenorm_rmsnorm"])
    assert count(gm, ops.layer_norm) == 0 and count(gm, ops.rms_norm) == 5
    assert len(records(gm, "rewrote")) == 5 + 2 + 4  # 5 norms, wte + wpe, 4 c_proj
    for _ in range(2):
        result = verify(model, gm, {"input_ids": torch.randint(0, 100, (1, 8))}, rtol=1e-10)
        assert result.max_rel < 1e-12


def test_post_ln_bert_is_left_alone_with_the_reason():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                  vocab_size=100)
    model = transformers.BertModel(cfg).eval()
    x = {"input_ids": torch.randint(0, 100, (1, 8))}
    gm = optimize(model, x, passes=["prenorm_rmsnorm"])
    skips = records(gm, "skipped")
    assert len(skips) == 3 and not records(gm, "rewrote")
    assert all("post-LN block" in s.detail for s in skips)
    verify(model, gm, x, rtol=0, atol=0)


def test_layer_scale_stops_it():
    model = tiny_vit(init_values=0.1)  # LayerScale: a per-channel multiply writes into the stream
    x = torch.randn(1, 3, 32, 32)
    gm = optimize(model, x, passes=["prenorm_rmsnorm"])
    assert not records(gm, "rewrote") and count(gm, ops.layer_norm) == 5
    assert any("produced by mul" in s.detail for s in records(gm, "skipped"))


class ReturnsStream(nn.Module):
    """A pre-LN block that also returns its residual stream (like output_hidden_states)."""

    def __init__(self):
        super().__init__()
        self.emb, self.ln1, self.fc, self.ln2 = nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 8), nn.LayerNorm(8)

    def forward(self, x):
        h = self.emb(x)
        h = h + self.fc(self.ln1(h))
        return self.ln2(h), h


class StreamFromInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln, self.fc = nn.LayerNorm(8), nn.Linear(8, 8)

    def forward(self, x):
        return self.ln(x + self.fc(x))


@pytest.mark.parametrize("model,reason", [(ReturnsStream(), "returned by the model"),
                                          (StreamFromInput(), "it is a model input")])
def test_not_applicable_cases(model, reason):
    x = torch.randn(2, 3, 4 if isinstance(model, ReturnsStream) else 8)
    gm = optimize(model.eval(), x, passes=["prenorm_rmsnorm"])
    assert not records(gm, "rewrote")
    assert all(reason in s.detail for s in records(gm, "skipped")) and records(gm, "skipped")
    verify(model, gm, x, rtol=0, atol=0)


def test_toy_pre_ln_applies_and_second_run_is_a_no_op():
    class PreLN(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.ln1, self.fc, self.ln2 = nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 8), nn.LayerNorm(8)

        def forward(self, x):
            h = self.emb(x)
            h = h + self.fc(self.ln1(h)) * 0.5
            return self.ln2(h)

    torch.manual_seed(0)
    model = randomise_norms(PreLN().eval(), key="ln").double()
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    gm = optimize(model, x, passes=["prenorm_rmsnorm"])
    assert count(gm, ops.rms_norm) == 2
    verify(model, gm, torch.randn(5, 3, 4, dtype=torch.float64) + 3, rtol=1e-12)
    again = optimize(gm, x, passes=["prenorm_rmsnorm"])
    assert [r.detail for r in again.report.records if r.pass_name == "prenorm_rmsnorm"] == \
        ["nothing to do: no LayerNorm in the graph"]
