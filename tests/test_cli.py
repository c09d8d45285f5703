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
