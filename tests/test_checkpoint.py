"""Rewriting a safetensors checkpoint shard by shard (`fxrewrite.checkpoint`): the module loaded
back computes exactly what `optimize` makes of the model in memory, the source is only read,
and a checkpoint that lacks what the plan needs is refused before anything is written."""
import hashlib
import json
import os
import textwrap

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

import fxrewrite
from fxrewrite.checkpoint import CheckpointError, load_rewritten, params_on_meta, rewrite_checkpoint
from fxrewrite.cli import main

from conftest import randomize_bn

transformers = pytest.importorskip("transformers")
torchvision = pytest.importorskip("torchvision")

LLAMA = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2)


def llama(tie=False):
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA, tie_word_embeddings=tie))


def trained_llama(tie=False):
    """Norm weights away from 1, so that folding them into the linears changes the weights."""
    model = llama(tie).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def save_sharded(state_dict: dict, directory, shards: int):
    """The layout transformers writes: model-0000i-of-0000n.safetensors and the index."""
    os.makedirs(directory, exist_ok=True)
    keys, weight_map = list(state_dict), {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[i * len(keys) // shards:(i + 1) * len(keys) // shards]
        save_file({k: state_dict[k].contiguous() for k in part}, os.path.join(directory, name))
        weight_map.update(dict.fromkeys(part, name))
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)


def fingerprint(directory) -> dict:
    out = {}
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        with open(path, "rb") as f:
            out[name] = (os.stat(path).st_mtime_ns, hashlib.sha256(f.read()).hexdigest())
    return out


def logits(out):
    return out.logits if hasattr(out, "logits") else out[0] if isinstance(out, (tuple, list)) else out


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_llama_quantize_prep_sharded_matches_in_memory(tmp_path, tie):
    model = trained_llama(tie)
    src, out = tmp_path / "src", tmp_path / "out"
    model.save_pretrained(src, max_shard_size="40KB")  # tied: lm_head.weight is left out of the files
    shards = [f for f in os.listdir(src) if f.endswith(".safetensors")]
    assert len(shards) >= 3
    before = fingerprint(src)
    example = {"input_ids": torch.randint(0, 128, (2, 8))}
    expected = fxrewrite.optimize(model, example, passes=["quantize_prep"])

    manifest = rewrite_checkpoint(lambda: llama(tie), example, src, out, passes=["quantize_prep"], progress=False)
    assert fingerprint(src) == before  # the user's checkpoint is only read
    assert any(d["pass_name"] == "fold_norm_affine" for d in manifest["derivations"])
    assert len(manifest["sources_read"]) == len(set(manifest["sources_read"]))  # each source read once
    written = {k for keys in manifest["shards"].values() for k in keys}
    assert "model.rotary_emb.inv_freq" in written  # non-persistent: not in the source, still written
    with open(out / "model.safetensors.index.json") as f:
        assert set(json.load(f)["weight_map"]) == written
    assert len(manifest["shards"]) >= 3

    fast = load_rewritten(lambda: llama(tie), out)
    fresh = {"input_ids": torch.randint(0, 128, (3, 11))}
    with torch.no_grad():
        assert torch.equal(logits(fast(**fresh)), logits(expected(**fresh)))


@pytest.mark.parametrize("shards", [1, 4])
def test_resnet18_default_passes_matches_in_memory(tmp_path, shards):
    model = randomize_bn(torchvision.models.resnet18()).eval()
    src, out = tmp_path / "src", tmp_path / "out"
    if shards == 1:
        os.makedirs(src)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, src / "model.safetensors")
    else:
        save_sharded(model.state_dict(), src, shards)
    example = torch.randn(2, 3, 32, 32)
    expected = fxrewrite.optimize(model, example)

    manifest = rewrite_checkpoint(torchvision.models.resnet18, example, src, out, progress=False)
    assert any(d["pass_name"] == "fold_batchnorm" for d in manifest["derivations"])
    files = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    if shards == 1:  # the source's layout: one file stays one file
        assert files == ["model.safetensors"] and not os.path.exists(out / "model.safetensors.index.json")
    else:
        # shards of at most the largest source shard's size
        assert len(files) >= 2 and os.path.exists(out / "model.safetensors.index.json")

    fast = load_rewritten(torchvision.models.resnet18, out)
    fresh = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fast(fresh), expected(fresh))


def test_missing_keys_are_named_and_nothing_is_written(tmp_path):
    state = torchvision.models.resnet18().state_dict()
    del state["fc.weight"], state["layer1.0.bn1.running_var"]
    save_sharded(state, tmp_path / "src", 3)
    with pytest.raises(CheckpointError, match=r"lacks 2 tensor\(s\).*fc\.weight, layer1\.0\.bn1\.running_var"):
        rewrite_checkpoint(torchvision.models.resnet18, torch.randn(2, 3, 32, 32), tmp_path / "src",
                           tmp_path / "out", progress=False)
    assert not os.path.exists(tmp_path / "out")


def test_output_directory_is_new_empty_or_an_earlier_output(tmp_path):
    src, out, x = tmp_path / "src", tmp_path / "out", torch.randn(2, 3, 32, 32)
    save_sharded(torchvision.models.resnet18().state_dict(), src, 3)
    with pytest.raises(CheckpointError, match="is the source"):
        rewrite_checkpoint(torchvision.models.resnet18, x, src, src)
    first = rewrite_checkpoint(torchvision.models.resnet18, x, src, out, progress=False, max_shard_bytes=4 << 20)
    again = rewrite_checkpoint(torchvision.models.resnet18, x, src, out, progress=False)  # replaces the first
    assert len(first["shards"]) > len(again["shards"])
    assert sorted(os.listdir(out)) == sorted([*again["shards"], "fxrewrite_manifest.json",
                                              "model.safetensors.index.json"])  # no stale shards
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("the user's")
    with pytest.raises(CheckpointError, match="not empty"):
        rewrite_checkpoint(torchvision.models.resnet18, x, src, tmp_path / "mine", progress=False)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "the user's"


def test_params_on_meta_keeps_buffers_real():
    with params_on_meta():
        model = llama()
        bn = nn.BatchNorm1d(3)
    assert all(p.is_meta and isinstance(p, nn.Parameter) for p in model.parameters())
    assert not model.model.rotary_emb.inv_freq.is_meta and not bn.running_var.is_meta
    assert bn.weight.requires_grad and not nn.Linear(2, 2).weight.is_meta  # patch undone on leaving


FACTORIES = textwrap.dedent(f"""
    import transformers

    def llama():
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**{LLAMA!r}))
""")


def test_cli_rewrites_and_reports_bad_input(tmp_path, monkeypatch, capsys):
    (tmp_path / "ckpt_factories.py").write_text(FACTORIES)
    monkeypatch.chdir(tmp_path)
    model = trained_llama()
    model.save_pretrained(tmp_path / "src", max_shard_size="40KB")
    code = main(["rewrite-checkpoint", "ckpt_factories:llama", "src", "out", "--passes", "quantize_prep",
                 "--tokens", "128", "--input-shape", "2,8", "--no-progress"])
    assert code == 0
    assert "fold_norm_affine" in capsys.readouterr().out
    with open(tmp_path / "out" / "fxrewrite_manifest.json") as f:
        assert json.load(f)["example_inputs"] == {"kind": "args", "inputs": [{"shape": [2, 8], "dtype": "int64"}]}
    fast = load_rewritten(lambda: llama(), tmp_path / "out")
    expected = fxrewrite.optimize(model, (torch.randint(0, 128, (2, 8)),), passes=["quantize_prep"])
    fresh = torch.randint(0, 128, (3, 5))
    with torch.no_grad():
        assert torch.equal(logits(fast(fresh)), logits(expected(fresh)))

    for argv, message in [(["ckpt_factories:llama", "nowhere", "out2", "--tokens", "128", "--input-shape", "2,8"],
                           "does not exist"),
                          (["ckpt_factories:llama", "src", "out2"], "--input-shape is required"),
                          (["ckpt_factories:llama", "src", "out2", "--passes", "nope", "--input-shape", "2,8"],
                           "nope")]:
        assert main(["rewrite-checkpoint", *argv, "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and err.count("\n") == 1


def conv_bn():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())


def test_sources_in_another_dtype_are_cast_to_the_models_as_load_state_dict_does(tmp_path):
    state = {k: v.to(torch.bfloat16) if v.is_floating_point() else v
             for k, v in randomize_bn(conv_bn()).state_dict().items()}
    save_sharded(state, tmp_path / "src", 1)
    model = conv_bn().eval()
    model.load_state_dict(state)  # copied into float32
    x = torch.randn(2, 3, 8, 8)
    rewrite_checkpoint(conv_bn, x, tmp_path / "src", tmp_path / "out", progress=False)
    fast = load_rewritten(conv_bn, tmp_path / "out")
    assert all(t.dtype == torch.float32 for t in fast.parameters())
    with torch.no_grad():
        assert torch.equal(fast(x), fxrewrite.optimize(model, x)(x))


def test_bfloat16_llama_folds_its_norm_weights_applied_after_the_cast(tmp_path):
    """transformers' RMSNorm in bfloat16 multiplies its weight after casting back from float32; the
    fold still applies (into the linears), on the checkpoint's own bfloat16 tensors."""
    model = trained_llama().to(torch.bfloat16)
    src, out = tmp_path / "src", tmp_path / "out"
    model.save_pretrained(src, max_shard_size="40KB")
    example = {"input_ids": torch.randint(0, 128, (2, 8))}
    expected = fxrewrite.optimize(model, example, passes=["quantize_prep"])
    assert expected.report.count("fold_norm_affine") == 5

    def factory():
        return llama().to(torch.bfloat16)

    manifest = rewrite_checkpoint(factory, example, src, out, passes=["quantize_prep"], progress=False)
    assert sum(d["pass_name"] == "fold_norm_affine" for d in manifest["derivations"]) >= 5
    fast = load_rewritten(factory, out)
    assert all(p.dtype == torch.bfloat16 for p in fast.parameters())
    fresh = {"input_ids": torch.randint(0, 128, (3, 11))}
    with torch.no_grad():
        assert torch.equal(logits(fast(**fresh)), logits(expected(**fresh)))


class RepBlock(nn.Module):
    """RepVGG: 3x3 conv + BN, 1x1 conv + BN and a BN alone, summed; twice. The merged conv's
    weight is derived from weights that are themselves derived (the BN folds): a chain."""

    def __init__(self, c=8):
        super().__init__()
        self.stages = nn.ModuleList()
        for _ in range(2):
            self.stages.append(nn.ModuleDict({
                "k3": nn.Conv2d(c, c, 3, padding=1, bias=False), "bn3": nn.BatchNorm2d(c),
                "k1": nn.Conv2d(c, c, 1, bias=False), "bn1": nn.BatchNorm2d(c), "bn_id": nn.BatchNorm2d(c)}))

    def forward(self, x):
        for s in self.stages:
            x = torch.relu(s["bn3"](s["k3"](x)) + s["bn1"](s["k1"](x)) + s["bn_id"](x))
        return x


def test_derivation_chains_are_computed_through(tmp_path):
    torch.manual_seed(0)
    model = randomize_bn(RepBlock()).eval()
    src, out = tmp_path / "src", tmp_path / "out"
    save_sharded(model.state_dict(), src, 3)
    example = torch.randn(2, 8, 12, 12)
    expected = fxrewrite.optimize(model, example)
    assert expected.report.count("merge_branches") == 2, expected.report

    manifest = rewrite_checkpoint(RepBlock, example, src, out, progress=False)
    derived = {d["target"] for d in manifest["derivations"]}
    chained = [d for d in manifest["derivations"] if set(d["sources"]) & derived]
    assert chained, manifest["derivations"]  # some tensor is computed from a derived one
    written = {k for keys in manifest["shards"].values() for k in keys}
    assert written == set(expected.state_dict())  # the intermediate (folded, then merged) ones are not written

    fast = load_rewritten(RepBlock, out)
    fresh = torch.randn(3, 8, 12, 12)
    with torch.no_grad():
        assert torch.equal(fast(fresh), expected(fresh))
