"""Shared test helpers: real BN statistics, op counts, report records, small models and the
weights that make a swap visible."""
from __future__ import annotations

import copy
import io
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fxrewrite.rewrite import ops


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def randomize_bn(model: nn.Module) -> nn.Module:
    """Non-trivial BN statistics and affine parameters, so folding is really tested (fresh
    models have mean 0, var 1, weight 1, bias 0, which hide most folding mistakes)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                if m.running_mean is not None:
                    m.running_mean.uniform_(-0.5, 0.5)
                    m.running_var.uniform_(0.5, 2.0)
                if m.weight is not None:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.5, 0.5)
    return model


def count(gm, target) -> int:
    """How many call_function nodes of `target` the graph has."""
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is target)


def count_bn_after_producer(gm) -> int:
    """BatchNorms whose input is a conv or linear: after folding there must be none."""
    return sum(1 for n in gm.graph.nodes if n.target is ops.batch_norm
               and getattr(n.args[0], "target", None) in (ops.conv, ops.linear))


class ConvBNReadElsewhere(nn.Module):
    """conv -> BN where the conv's output is also read elsewhere: added to the BN's output
    (`add=True`) or returned beside it."""

    def __init__(self, channels=4, add=False):
        super().__init__()
        self.conv, self.bn, self.add = nn.Conv2d(3, channels, 1), nn.BatchNorm2d(channels), add

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y if self.add else (self.bn(y), y)


@pytest.fixture
def launches(monkeypatch):
    """Count generated-kernel launches (calls of codegen.runtime.run_triton through the op)."""
    from fxrewrite.codegen import runtime
    calls = []
    real = runtime.run_triton

    def spy(spec, inputs, config=None):
        outs = real(spec, inputs, config)
        if outs is not None:  # None: these inputs take the reference, nothing launched
            calls.append(spec)
        return outs

    monkeypatch.setattr(runtime, "run_triton", spy)
    return calls


# ---------------------------------------------------------------- report records

def rewrote(gm, pass_name):
    return [r for r in gm.report.records if r.pass_name == pass_name and r.action == "rewrote"]


def skipped(gm, pass_name):
    return [r for r in gm.report.records if r.pass_name == pass_name and r.action == "skipped"]


def notes(gm, pass_name):
    return [r.detail for r in gm.report.records if r.pass_name == pass_name and r.action == "note"]


def reported_deviation(detail, what="layer output deviation on the example inputs"):
    """The `max abs` value a swap printed after `what` in a report line."""
    return float(re.search(what + r": max abs ([0-9.e+-]+|inf|nan)", detail)[1])


# ---------------------------------------------------------------- models and weights

def randomise_norms(model, key="norm", scale=0.3):
    """Non-trivial weights and biases of every parameter whose name contains `key` (the norms),
    so that dropping or mishandling them shows."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if key in name:
                p.add_(torch.randn_like(p) * scale)
    return model


def replace_modules(model, cls, make):
    """A deep copy of `model` with every `cls` module `mod` replaced by `make(mod)`, in eager mode."""
    out = copy.deepcopy(model)
    for name, mod in list(out.named_modules()):
        if isinstance(mod, cls):
            parent, _, leaf = name.rpartition(".")
            setattr(out.get_submodule(parent) if parent else out, leaf, make(mod))
    return out


class TinyBlock(nn.Module):
    def __init__(self, norm):
        super().__init__()
        self.norm, self.fc = norm, nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(self.norm(x))


class WrittenOutRMSNorm(nn.Module):
    """transformers' LlamaRMSNorm; `gemma` scales by (1 + weight) as Gemma does, `dims` normalises
    over other dims, `leak` also returns the variance (an intermediate read elsewhere)."""

    def __init__(self, d=8, eps=1e-6, gemma=False, dims=-1, leak=False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d) * 0.3 + 1)
        self.eps, self.gemma, self.dims, self.leak = eps, gemma, dims, leak

    def forward(self, x):
        dtype = x.dtype
        x = x.to(torch.float32)
        var = x.pow(2).mean(self.dims, keepdim=True)
        x = x * torch.rsqrt(var + self.eps)
        out = ((1 + self.weight) if self.gemma else self.weight) * x.to(dtype)
        return (out, var) if self.leak else out


class RMSNormBlock(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.fc, self.norm, self.out = nn.Linear(8, 8), WrittenOutRMSNorm(**kw), nn.Linear(8, 8)

    def forward(self, x):
        y = self.norm(self.fc(x))
        return self.out(y[0]) + y[1] if isinstance(y, tuple) else self.out(y)


def tiny_vit(**kw):
    import timm
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2, embed_dim=32,
                             num_heads=2, num_classes=10, **kw).eval()


def timm_model(name, num_classes=10):
    import timm
    return timm.create_model(name, pretrained=False, num_classes=num_classes).eval()


def ids(batch=1, n=8):
    return {"input_ids": torch.randint(0, 100, (batch, n))}


def _transformers():
    return pytest.importorskip("transformers")


def tiny_gpt2(head=False):
    t = _transformers()
    cfg = t.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=32)
    return (t.GPT2LMHeadModel if head else t.GPT2Model)(cfg).eval()


def tiny_bert(**kw):
    t = _transformers()
    cfg = t.BertConfig(**{**dict(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                 vocab_size=100), **kw})
    return t.BertModel(cfg).eval()


def tiny_llama():
    t = _transformers()
    cfg = t.LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                        num_key_value_heads=2, vocab_size=100)
    return t.LlamaModel(cfg).eval()


def sgd_losses(model, loss_fn, steps: int, lr: float) -> list[float]:
    """`steps` SGD steps on `loss_fn()` (a loss computed by `model`); the losses."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = loss_fn()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def train_steps(model, x, steps=5):
    """A few SGD steps towards a fixed random target; the losses."""
    torch.manual_seed(1)
    target = torch.randn_like(model(x))
    model.train()
    return sgd_losses(model, lambda: F.mse_loss(model(x), target), steps, lr=0.05)


def state_dict_round_trip(gm, fresh):
    """Load `gm`'s saved state_dict into `fresh` (through torch.save / torch.load); `fresh`."""
    buf = io.BytesIO()
    torch.save(gm.state_dict(), buf)
    buf.seek(0)
    fresh.load_state_dict(torch.load(buf))
    return fresh
