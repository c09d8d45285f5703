"""The command line: a full run on a tiny model, and one-line errors (exit 2) for bad input."""
import os
import subprocess
import sys
import textwrap

import pytest

from fxrewrite.cli import main

TINYNETS = textwrap.dedent("""
    import torch, torch.nn as nn

    def convnet():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(3))
        for bn in (m[1], m[4]):
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
        m(torch.randn(1, 3, 8, 8))  # materialise the lazy layer
        return m

    class Branchy(nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # control flow on a value: neither symbolic_trace nor export
                return x.relu()
            return x

    def branchy():
        return Branchy()

    def broken():
        raise RuntimeError("no weights here")

    not_a_model = 3

    def returns_int():
        return 3

    def normnet():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 4))

    def llama():
        from transformers import LlamaConfig, LlamaModel
        torch.manual_seed(0)
        return LlamaModel(LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                                      num_attention_heads=2, num_key_value_heads=2, vocab_size=100))

    def gpt2_and_inputs():
        from transformers import GPT2Config, GPT2Model
        torch.manual_seed(0)
        model = GPT2Model(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=32,
                                     bos_token_id=0, eos_token_id=0))
        return model, {"input_ids": torch.randint(0, 100, (2, 8))}

    def mobilenet():
        import torchvision
        torch.manual_seed(0)
        return torchvision.models.mobilenet_v3_small(num_classes=10)
""")


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    (tmp_path / "tinynets.py").write_text(TINYNETS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("tinynets", None)
    return tmp_path


def test_full_run(tiny, capsys):
    rc = main(["optimize", "tinynets:convnet", "--input-shape", "1,3,8,8", "--onnx", "net.onnx", "--check",
               "--draw", "graph.dot", "--runs", "2"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "fold_bn_into_conv" in out and "summary: " in out  # the report table
    assert "error vs original (fresh input): PASS" in out
    assert "eager latency, median of 2: before" in out
    assert "onnx: net.onnx: opset" in out and "Conv" in out and "BatchNormalization" not in out
    assert "onnxruntime vs original, batch 1: PASS" in out
    assert "onnxruntime vs original, batch 2: PASS" in out  # dynamic batch
    assert "[rewrite] optimizing: done" in err  # progress on stderr
    assert (tiny / "net.onnx").stat().st_size > 0
    assert (tiny / "graph.dot").read_text().lstrip().startswith("digraph")


@pytest.mark.parametrize("argv, message", [
    (["tinynets"], "expected PACKAGE.MODULE:FACTORY"),
    (["no_such_module_xyz:f"], "cannot import module 'no_such_module_xyz'"),
    (["tinynets:nope"], "has no attribute 'nope'"),
    (["tinynets:not_a_model"], "is not callable"),
    (["tinynets:broken"], "calling tinynets:broken() failed: RuntimeError: no weights here"),
    (["tinynets:returns_int"], "returned int, not a torch.nn.Module"),
    (["tinynets:convnet", "--input-shape", "1,3,x,8"], "bad --input-shape '1,3,x,8'"),
    (["tinynets:convnet", "--input-shape", "1,3,0,8"], "every dimension must be a positive integer"),
    (["tinynets:convnet", "--input-shape", "1,5,8,8"], "the model fails on inputs of shape [[1, 5, 8, 8]]"),
    (["tinynets:convnet", "--passes", "fold_everything"], "unknown pass or preset 'fold_everything'"),
    (["tinynets:branchy", "--input-shape", "1,4"], "cannot capture the model"),
    (["tinynets:convnet", "--draw", "no_such_dir/graph.svg"], "--draw no_such_dir/graph.svg: directory"),
    (["tinynets:convnet", "--runs", "0"], "--runs must be at least 1"),
    (["tinynets:convnet", "--tokens", "0"], "--tokens must be at least 1"),
])
def test_bad_input_is_one_line_exit_2(tiny, capsys, argv, message):
    if "--input-shape" not in argv:
        argv = argv + ["--input-shape", "1,3,8,8"]
    rc = main(["optimize"] + argv)
    out, err = capsys.readouterr()
    assert rc == 2
    errors = [line for line in err.splitlines() if not line.startswith("[rewrite]")]
    assert len(errors) == 1 and errors[0].startswith("fxrewrite: error: "), err
    assert message in errors[0]
    assert "Traceback" not in err + out


@pytest.mark.parametrize("extra, message", [
    ([], "--input-shape is required: tinynets:convnet() returned no example inputs"),
    (["--tokens", "100"], "--tokens needs --input-shape"),
])
def test_inputs_are_needed(tiny, capsys, extra, message):
    rc = main(["optimize", "tinynets:convnet"] + extra)
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err


def test_python_dash_m(tiny):
    done = subprocess.run([sys.executable, "-m", "fxrewrite", "optimize", "tinynets:convnet", "--input-shape",
                           "2,3,8,8", "--runs", "1", "--check"], capture_output=True, text=True, timeout=300,
                          cwd=tiny)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "error vs original (fresh input): PASS" in done.stdout


def test_draw_svg_without_graphviz_writes_dot_and_says_so(tiny, capsys, monkeypatch):
    monkeypatch.setattr("fxrewrite.cli.shutil.which", lambda name: None)
    rc = main(["optimize", "tinynets:convnet", "--input-shape", "1,3,8,8", "--runs", "1", "--draw", "graph.svg"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "graphviz 'dot' not found: writing DOT to graph.dot" in err
    assert "graph drawn to graph.dot" in out and not (tiny / "graph.svg").exists()
    dot = (tiny / "graph.dot").read_text()
    assert dot.lstrip().startswith("digraph")
    assert dot.count("convolution") == 2 and "batch_norm" not in dot  # the optimized graph: BNs folded


def test_draw_svg_pipes_dot_text_to_graphviz(tiny, capsys, monkeypatch):
    """A stand-in `dot` on PATH copies its stdin to the -o file: the DOT text reaches graphviz."""
    bin_dir = tiny / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "dot"
    fake.write_text('#!/bin/sh\n[ "$1" = "-Tsvg" ] && [ "$2" = "-o" ] && cat > "$3"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    rc = main(["optimize", "tinynets:convnet", "--input-shape", "1,3,8,8", "--runs", "1", "--draw", "graph.svg"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "graph drawn to graph.svg" in out and not (tiny / "graph.dot").exists()
    assert (tiny / "graph.svg").read_text().lstrip().startswith("digraph")


def test_check_fails_with_status_1_when_past_tolerance(tiny, capsys):
    """An approximate swap changes the function: --check turns the failed comparison into status 1."""
    rc = main(["optimize", "tinynets:convnet", "--input-shape", "1,3,8,8", "--runs", "1", "--passes",
               "relu_to_smelu", "--check"])
    out, err = capsys.readouterr()
    assert rc == 1
    assert "error vs original (fresh input): FAIL" in out
    assert "check failed" in err
    rc = main(["optimize", "tinynets:convnet", "--input-shape", "1,3,8,8", "--runs", "1", "--passes",
               "relu_to_smelu"])  # without --check the same run succeeds, reporting the error
    assert rc == 0


def test_layout_channels_last_is_passed_through(capsys):
    from fxrewrite.cli import main
    code = main(["optimize", "torchvision.models:resnet18", "--input-shape", "1,3,32,32", "--layout", "channels_last",
                 "--runs", "1", "--check"])
    out = capsys.readouterr().out
    assert code == 0
    assert "layout" in out and "stored channels-last" in out


def _torch_chatter(err: str) -> list[str]:
    """stderr lines that are not this command's own progress lines."""
    return [line for line in err.splitlines() if line.strip() and not line.startswith("[rewrite]")]


def test_token_model(tiny, capfd):
    """--tokens: int64 ids for an embedding; torch's logs stay out of stdout/stderr without --verbose."""
    pytest.importorskip("transformers")
    rc = main(["optimize", "tinynets:llama", "--tokens", "100", "--input-shape", "1,8", "--runs", "1", "--check"])
    out, err = capfd.readouterr()
    assert rc == 0, err
    assert "error vs original (fresh input): PASS" in out
    assert _torch_chatter(err) == [], err[-2000:]


def test_factory_returning_inputs_exports_dynamic_batch_and_sequence(tiny, capfd):
    """A factory's own example inputs (a dict of token ids); ONNX with dynamic batch and sequence
    axes, checked in onnxruntime at another batch size and sequence length."""
    pytest.importorskip("transformers")
    rc = main(["optimize", "tinynets:gpt2_and_inputs", "--runs", "1", "--check", "--onnx", "tok.onnx"])
    out, err = capfd.readouterr()
    assert rc == 0, err
    assert "dynamic batch and sequence" in out
    assert "onnxruntime vs original, batch 2, sequence 8: PASS" in out
    assert "onnxruntime vs original, batch 3, sequence 11: PASS" in out
    assert _torch_chatter(err) == [], err[-2000:]


def test_lower_triton(tiny, capsys):
    """--lower triton reaches optimize; the fused region exports as its eager meaning, batch 1 dynamic."""
    rc = main(["optimize", "tinynets:normnet", "--input-shape", "1,8", "--lower", "triton", "--runs", "1", "--check",
               "--onnx", "lowered.onnx"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "lower_triton rewrote 1" in out and "error vs original (fresh input): PASS" in out
    assert "LayerNormalization 1" in out and "onnxruntime vs original, batch 2: PASS" in out


def test_batch_1_onnx_after_merged_branches(tiny, capfd):
    """The README's pattern at batch 1 on a model where merge_branches composes two 1x1 convs."""
    pytest.importorskip("torchvision")
    rc = main(["optimize", "tinynets:mobilenet", "--input-shape", "1,3,32,32", "--runs", "1", "--check",
               "--onnx", "m.onnx"])
    out, err = capfd.readouterr()
    assert rc == 0, err
    assert "merge_branches" in out and "dynamic batch" in out
    assert "onnxruntime vs original, batch 1: PASS" in out and "onnxruntime vs original, batch 2: PASS" in out
    assert _torch_chatter(err) == [], err[-2000:]


def test_verbose_lets_torch_logs_through(tiny, capfd):
    rc = main(["optimize", "tinynets:branchy", "--input-shape", "1,4", "--verbose"])
    out, err = capfd.readouterr()
    assert rc == 2 and "cannot capture the model" in err
    assert _torch_chatter(err)[:-1], "torch's own output should be shown with --verbose"
