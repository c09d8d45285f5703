"""Decoder language models under `torch.compile(backend="rewrite", options={"lower": "triton"})`:
Dynamo inlines transformers' RMSNorm modules into pow/mean/rsqrt/to calls; the canonicaliser
and `lift_norms` make each one norm op again, and the lowering fuses one region per norm, as
`optimize` does on the torch.export route (kernels run in Triton's interpreter on CPU)."""
import pytest
import torch
import torch._dynamo

from fxrewrite import backend

transformers = pytest.importorskip("transformers")

FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    "gemma": (transformers.GemmaConfig, transformers.GemmaForCausalLM),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
}


def tiny_decoder(family: str, layers: int = 2):
    config_cls, model_cls = FAMILIES[family]
    config = config_cls(num_hidden_layers=layers, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                        num_key_value_heads=1, head_dim=16, vocab_size=96, max_position_embeddings=64)
    torch.manual_seed(0)
    model = model_cls(config).eval()
    with torch.no_grad():  # norms start at weight 1 (0 for Gemma): give them something to scale
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
    return model


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_backend_fuses_one_region_per_rmsnorm(family):
    torch._dynamo.reset()
    model = tiny_decoder(family)
    ids = torch.randint(0, 96, (2, 8))
    norms = sum(1 for m in model.modules() if type(m).__name__.endswith("RMSNorm"))
    fast = torch.compile(model, backend="rewrite", options={"lower": "triton", "compiler": "eager"})
    with torch.no_grad():
        want, got = model(ids).logits, fast(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    report = backend.last_report()
    assert report.count("lift_norms") == norms, str(report)
    # one region per RMSNorm, and one per layer's gated MLP (SwiGLU; Gemma's GeGLU)
    assert report.count("lower_triton") == norms + model.config.num_hidden_layers, str(report)
    glu = [r for r in report.records if r.pass_name == "lower_triton" and r.action == "rewrote"
           and r.detail.startswith("glu region:")]  # the kind a region line starts with
    assert len(glu) == model.config.num_hidden_layers, str(report)
