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


def _timm(name, size=64, fast=False, batch=2, **kw):
    def build():
        import timm
        return timm.create_model(name, pretrained=False, **kw)
    return ZooModel(f"timm/{name}", "timm", build, lambda: torch.randn(batch, 3, size, size), fast=fast)


def frozen_bn(model: nn.Module) -> nn.Module:
    """`model` with every BatchNorm2d replaced by torchvision's FrozenBatchNorm2d (random
    statistics), as torchvision's detectors are when built from pretrained weights."""
    from torchvision.ops import FrozenBatchNorm2d
    for name, m in list(model.named_modules()):
        for cname, c in list(m.named_children()):
            if type(c) is nn.BatchNorm2d:
                f = FrozenBatchNorm2d(c.num_features, eps=c.eps)
                with torch.no_grad():
                    f.weight.uniform_(0.5, 1.5)
                    f.bias.uniform_(-0.5, 0.5)
                    f.running_mean.uniform_(-0.5, 0.5)
                    f.running_var.uniform_(0.5, 2.0)
                setattr(m, cname, f)
    return model


def _det(name, h, w, frozen=False, **kw):
    def build():
        import torchvision
        model = getattr(torchvision.models.detection, name)(weights=None, weights_backbone=None, **kw)
        return frozen_bn(model) if frozen else model
    return ZooModel(f"tv/{name}", "torchvision", build, lambda: ([torch.rand(3, h, w)],))


def _tv_seg(name, size=128):
    def build():
        import torchvision
        return getattr(torchvision.models.segmentation, name)(weights=None, weights_backbone=None)
    return ZooModel(f"tv/{name}", "torchvision", build, lambda: torch.randn(1, 3, size, size))


def _tv_video(name, t, size, **kw):
    def build():
        import torchvision
        return getattr(torchvision.models.video, name)(weights=None, **kw)
    return ZooModel(f"tv/{name}", "torchvision", build, lambda: torch.randn(1, 3, t, size, size))


def _raft_small():
    import torchvision
    return torchvision.models.optical_flow.raft_small(weights=None)


def _hf(name, config_fn, model_cls, inputs_fn, fast=False):
    def build():
        import transformers
        config = config_fn(transformers)
        return getattr(transformers, model_cls)(config)
    return ZooModel(f"hf/{name}", "transformers", build, inputs_fn, fast=fast)


def _ids(vocab=100, seq=8):
    return lambda: {"input_ids": torch.randint(0, vocab, (2, seq))}


_SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
_ENC_DEC = dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
                encoder_ffn_dim=64, decoder_ffn_dim=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _enc_dec_ids(vocab=100, seq=8, dec_seq=6):
    return lambda: {"input_ids": torch.randint(3, vocab, (2, seq)),
                    "decoder_input_ids": torch.randint(3, vocab, (2, dec_seq))}


def _pixels(size):
    return lambda: {"pixel_values": torch.randn(2, 3, size, size)}


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
    # torchvision detection (a list of images in; lists of dicts out; data-dependent post-processing, so
    # these go through partial capture). The resnet50-FPN detectors use FrozenBatchNorm2d when built
    # from pretrained weights; built from random weights they get BatchNorm2d, so the backbone's norms
    # are swapped back to FrozenBatchNorm2d (random statistics) to keep the structure users have.
    _det("fasterrcnn_mobilenet_v3_large_320_fpn", 240, 320),
    _det("retinanet_resnet50_fpn", 192, 256, frozen=True, min_size=192, max_size=256),
    _det("maskrcnn_resnet50_fpn", 192, 256, frozen=True, min_size=192, max_size=256),
    _det("fcos_resnet50_fpn", 192, 256, frozen=True, min_size=192, max_size=256),
    _det("ssd300_vgg16", 240, 240),
    _det("ssdlite320_mobilenet_v3_large", 240, 240),
    # torchvision segmentation (dict output)
    _tv_seg("fcn_resnet50"), _tv_seg("deeplabv3_mobilenet_v3_large"), _tv_seg("lraspp_mobilenet_v3_large"),
    # torchvision video and optical flow
    _tv_video("r3d_18", 8, 64), _tv_video("s3d", 16, 224),
    _tv_video("mvit_v2_s", 16, 224),  # its builder fixes spatial_size (224, 224) and temporal_size 16
    ZooModel("tv/raft_small", "torchvision", _raft_small,
             lambda: (torch.rand(1, 3, 128, 128), torch.rand(1, 3, 128, 128))),
    # more transformers from small configs: encoders, decoders, encoder-decoders, vision, audio
    _hf("albert", lambda t: t.AlbertConfig(vocab_size=100, embedding_size=16, **_SMALL), "AlbertModel", _ids()),
    _hf("electra", lambda t: t.ElectraConfig(vocab_size=100, embedding_size=16, **_SMALL), "ElectraModel", _ids()),
    _hf("deberta_v2", lambda t: t.DebertaV2Config(vocab_size=100, **_SMALL), "DebertaV2Model", _ids()),
    _hf("gpt_neox", lambda t: t.GPTNeoXConfig(vocab_size=100, **_SMALL), "GPTNeoXModel", _ids()),
    _hf("falcon", lambda t: t.FalconConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2),
        "FalconModel", _ids()),
    _hf("phi", lambda t: t.PhiConfig(vocab_size=100, **_SMALL), "PhiModel", _ids()),
    _hf("opt", lambda t: t.OPTConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     ffn_dim=64, word_embed_proj_dim=32), "OPTModel", _ids()),
    _hf("bloom", lambda t: t.BloomConfig(vocab_size=100, hidden_size=32, n_layer=2, n_head=2), "BloomModel", _ids()),
    _hf("gptj", lambda t: t.GPTJConfig(vocab_size=100, n_embd=32, n_layer=2, n_head=2, rotary_dim=8), "GPTJModel",
        _ids()),
    _hf("gemma", lambda t: t.GemmaConfig(vocab_size=100, head_dim=16, num_key_value_heads=1, **_SMALL), "GemmaModel",
        _ids()),
    _hf("stablelm", lambda t: t.StableLmConfig(vocab_size=100, num_key_value_heads=1, **_SMALL), "StableLmModel",
        _ids()),
    _hf("bart", lambda t: t.BartConfig(vocab_size=100, **_ENC_DEC), "BartModel", _enc_dec_ids()),
    _hf("t5", lambda t: t.T5Config(vocab_size=100, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
                                   decoder_start_token_id=0), "T5Model", _enc_dec_ids()),
    _hf("marian", lambda t: t.MarianConfig(vocab_size=100, decoder_start_token_id=0, **_ENC_DEC), "MarianModel",
        _enc_dec_ids()),
    _hf("resnet", lambda t: t.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1]),
        "ResNetModel", _pixels(64)),
    _hf("convnext", lambda t: t.ConvNextConfig(hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1]), "ConvNextModel",
        _pixels(64)),
    _hf("swin", lambda t: t.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2],
                                       window_size=4), "SwinModel", _pixels(32)),
    _hf("segformer", lambda t: t.SegformerConfig(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1],
                                                 hidden_sizes=[16, 32], num_attention_heads=[1, 2],
                                                 decoder_hidden_size=32, num_labels=4),
        "SegformerForSemanticSegmentation", _pixels(64)),
    _hf("wav2vec2", lambda t: t.Wav2Vec2Config(vocab_size=32, conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3),
                                               num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2, **_SMALL),
        "Wav2Vec2Model", lambda: {"input_values": torch.randn(2, 1600)}),
]

# timm: one model per family, drawn (not hand-picked) once with this rule, with timm 1.0.31:
#   family = the leading letters of the name (re.match(r"[a-z]+", name)); the families of
#   sorted(timm.list_models()) that are not among the timm entries above, sorted, are shuffled with
#   random.Random(0).shuffle; in that order, each family's model is the name holding the earliest of
#   ("atto", "femto", "pico", "nano", "xxs", "tiny", "xs", "small", "_s") (ties: alphabetical), else its
#   first name alphabetically; a model that fails to build or has > 60M parameters is skipped (dpn107,
#   resnext101_32x16d, beitv2_base_patch16_224, qwen3_vit_306m, seresnextaa101d_32x8d were); the first
#   34 kept. Input size: the smallest of 64, 96, 128, 160, 224 (else the default) that the model runs at
#   (tried on the meta device), batch 1.
TIMM_SAMPLE = [
    ("densenetblur121d", 64), ("gcvit_tiny", 224), ("ghostnetv2_100", 64), ("seresnet101", 64), ("pvt_v2_b0", 64),
    ("convnextv2_atto", 64), ("lcnet_035", 64), ("test_byobnet", 64), ("selecsls42", 64),
    ("gc_efficientnetv2_rw_t", 64), ("resnetblur101d", 64), ("darknet17", 64), ("xcit_nano_12_p16_224", 64),
    ("davit_tiny", 64), ("tresnet_l", 64), ("repghostnet_050", 64), ("hardcorenas_a", 64), ("ecaresnetlight", 64),
    ("vitamin_small_224", 224), ("rexnetr_100", 64), ("sam2_hiera_tiny", 64), ("cait_xxs24_224", 224),
    ("gmixer_12_224", 224), ("cspresnext50", 64), ("nest_tiny", 224), ("regnetx_002", 64), ("cspnext_tiny", 64),
    ("mobilevitv2_050", 64), ("focalnet_tiny_lrf", 64), ("darknetaa53", 64), ("nf_seresnet101", 64),
    ("shvit_s1", 64), ("starnet_s050", 64), ("maxxvit_rmlp_nano_rw_256", 256),
]
ZOO += [_timm(name, size=size, batch=1) for name, size in TIMM_SAMPLE]

BY_NAME = {m.name: m for m in ZOO}
