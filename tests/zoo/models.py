"""The zoo: real architectures built offline with random weights, and inputs for each.

Each entry builds a fresh eval-mode model with random BatchNorm statistics and gives example
inputs. `fast=True` entries run in CI's default test run; the rest are marked slow and run with
`python bench/zoo_coverage.py` (or `pytest tests/zoo -m slow`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn


def randomize_bn(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model


@dataclass
class ZooModel:
    name: str
    family: str  # torchvision / timm / transformers
    build: Callable[[], nn.Module]
    inputs: Callable[[], object]
    rtol: float = 1e-4  # float32, norm-wise (max|a-b| <= rtol * max|ref|)
    fast: bool = False


def _tv(name, size=64, fast=False, **kw):
    def build():
        import torchvision
        return getattr(torchvision.models, name)(**kw)
    return ZooModel(f"tv/{name}", "torchvision", build, lambda: torch.randn(2, 3, size, size), fast=fast)


def _timm(name, size=64, fast=False, **kw):
    def build():
        import timm
        return timm.create_model(name, pretrained=False, **kw)
    return ZooModel(f"timm/{name}", "timm", build, lambda: torch.randn(2, 3, size, size), fast=fast)


def _hf(name, config_fn, model_cls, inputs_fn, fast=False):
    def build():
        import transformers
        config = config_fn(transformers)
        return getattr(transformers, model_cls)(config)
    return ZooModel(f"hf/{name}", "transformers", build, inputs_fn, fast=fast)


def _ids(vocab=100, seq=8):
    return lambda: {"input_ids": torch.randint(0, vocab, (2, seq))}


_SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)

def _whisper_encoder():
    import transformers
    config = transformers.WhisperConfig(
        vocab_size=100, d_model=32, encoder_layers=2, encoder_attention_heads=2, decoder_layers=1,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=16, max_source_positions=32,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    return transformers.WhisperModel(config).get_encoder()


ZOO: list[ZooModel] = [
    # torchvision classification
    _tv("resnet18", fast=True), _tv("resnet50"), _tv("resnext50_32x4d"), _tv("wide_resnet50_2"),
    _tv("mobilenet_v2", fast=True), _tv("mobilenet_v3_large"), _tv("efficientnet_b0"),
    _tv("efficientnet_v2_s"), _tv("regnet_y_400mf"), _tv("densenet121"), _tv("shufflenet_v2_x1_0"),
    _tv("squeezenet1_1"), _tv("mnasnet1_0"), _tv("googlenet", aux_logits=False, init_weights=False),
    _tv("vgg11_bn"), _tv("convnext_tiny"), _tv("swin_t", size=64), _tv("vit_b_16", size=32, image_size=32),
    # timm: re-parameterisable families and others
    _timm("repvgg_a0", fast=True), _timm("mobileone_s0"), _timm("fastvit_t8"), _timm("repvit_m0_9"),
    _timm("cspresnet50"), _timm("cspdarknet53"), _timm("dla34"), _timm("ghostnet_100"),
    _timm("hrnet_w18_small"), _timm("efficientvit_b0"), _timm("efficientvit_m0", size=64),
    _timm("vit_tiny_patch16_224", size=32, img_size=32),
    # transformers from small configs
    _hf("bert", lambda t: t.BertConfig(vocab_size=100, **_SMALL), "BertModel", _ids(), fast=True),
    _hf("roberta", lambda t: t.RobertaConfig(vocab_size=100, **_SMALL), "RobertaModel", _ids()),
    _hf("gpt2", lambda t: t.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2), "GPT2Model", _ids()),
    _hf("llama", lambda t: t.LlamaConfig(vocab_size=100, num_key_value_heads=1, **_SMALL), "LlamaModel", _ids(),
        fast=True),
    _hf("mistral", lambda t: t.MistralConfig(vocab_size=100, num_key_value_heads=1, **_SMALL), "MistralModel",
        _ids()),
    _hf("t5_encoder", lambda t: t.T5Config(vocab_size=100, d_model=32, d_kv=16, d_ff=64, num_layers=2,
                                           num_heads=2), "T5EncoderModel", _ids()),
    _hf("vit", lambda t: t.ViTConfig(image_size=32, patch_size=8, **_SMALL), "ViTModel",
        lambda: {"pixel_values": torch.randn(2, 3, 32, 32)}),
    ZooModel("hf/whisper_encoder", "transformers", lambda: _whisper_encoder(),
             lambda: {"input_features": torch.randn(2, 16, 64)}),
    _hf("distilbert", lambda t: t.DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=2, hidden_dim=64),
        "DistilBertModel", _ids()),
    _hf("qwen2", lambda t: t.Qwen2Config(vocab_size=100, num_key_value_heads=1, **_SMALL), "Qwen2Model", _ids()),
]

BY_NAME = {m.name: m for m in ZOO}
