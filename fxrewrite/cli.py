"""The command line: `python -m fxrewrite optimize PACKAGE.MODULE:FACTORY --input-shape 1,3,224,224`.

Builds the model by calling FACTORY with no arguments, puts it in eval mode, optimizes it,
prints the report table, the measured error against the original on a fresh random input, and
the eager latency before/after (median of `--runs` timed runs after one warm-up). `--onnx`
writes the optimized model to ONNX and checks the file in onnxruntime (at the given batch size
and, with a dynamic batch, at another one). `--draw` writes the optimized graph as DOT.

Exit status: 0 on success; 1 when `--check` is given and the optimized model or the ONNX file
differs from the original beyond tolerance; 2, with a one-line message and no traceback, for
bad input (factory path, shape, pass name) or a model that cannot be run or captured.
Progress lines for the long steps go to stderr; results go to stdout.
"""
from __future__ import annotations

import argparse
import importlib
import io
import logging
import os
import shutil
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager, redirect_stderr


class UsageError(Exception):
    """Bad input from the user: reported as one line, exit status 2."""


def parse_shape(text: str) -> tuple[int, ...]:
    """'1,3,224,224' -> (1, 3, 224, 224); every dimension a positive integer."""
    parts = [p.strip() for p in text.replace("x", ",").split(",")]
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        raise UsageError(f"bad --input-shape {text!r}: expected positive integers separated by commas, "
                         "e.g. 1,3,224,224") from None
    if not dims or any(d <= 0 for d in dims):
        raise UsageError(f"bad --input-shape {text!r}: every dimension must be a positive integer")
    return dims


def load_factory(spec: str):
    """'torchvision.models:resnet18' -> the callable `torchvision.models.resnet18`."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"bad model {spec!r}: expected PACKAGE.MODULE:FACTORY, e.g. torchvision.models:resnet18")
    if os.getcwd() not in sys.path:  # the installed script does not put the working directory on the path
        sys.path.insert(0, os.getcwd())
    try:
        obj = importlib.import_module(module_name)
    except ImportError as e:
        raise UsageError(f"cannot import module {module_name!r}: {e}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UsageError(f"module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UsageError(f"{spec} is not callable")
    return obj


def _one_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    return f"{type(e).__name__}: {'; '.join(lines)[:500]}"


@contextmanager
def _step(message: str):
    """A progress line on stderr: 'message ...' then the time it took."""
    print(f"[rewrite] {message} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    yield
    print(f"[rewrite] {message}: done in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)


def median_latencies(models: list, inputs, runs: int) -> list[float]:
    """Median wall time (s) of each `model(*inputs)` over `runs` rounds after one warm-up; the
    models run round-robin, so that a slow spell of the machine hits all of them alike."""
    import torch
    times: list[list[float]] = [[] for _ in models]
    with torch.no_grad():
        for model in models:
            model(*inputs)
        for _ in range(runs):
            for i, model in enumerate(models):
                start = time.perf_counter()
                model(*inputs)
                times[i].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def _write_drawing(graph, path: str) -> str:
    """Write `graph` to `path`: DOT text (`fxrewrite.rewrite.graphview.to_dot`), rendered to SVG by
    graphviz's `dot` when the path ends in .svg. Without `dot` the DOT text goes to the same
    name with a .dot suffix, and a line on stderr says so. Returns the path written."""
    from .rewrite.graphview import to_dot
    dot_text = to_dot(graph)
    if path.endswith(".svg"):
        if shutil.which("dot") is None:
            svg, path = path, path[:-4] + ".dot"
            print(f"[rewrite] graphviz 'dot' not found: writing DOT to {path} instead "
                  f"(render it later with: dot -Tsvg {path} -o {svg})", file=sys.stderr)
        else:
            done = subprocess.run(["dot", "-Tsvg", "-o", path], input=dot_text.encode(), capture_output=True)
            if done.returncode != 0:
                raise UsageError(f"graphviz 'dot' failed to draw {path}: "
                                 f"{done.stderr.decode(errors='replace').strip()[:300]}")
            return path
    try:
        with open(path, "w") as f:
            f.write(dot_text)
    except OSError as e:
        raise UsageError(f"cannot write the drawing to {path}: {e.strerror}") from None
    return path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fxrewrite", description="fx-rewrite: optimize a PyTorch model's graph")
    sub = p.add_subparsers(dest="command", required=True)
    o = sub.add_parser("optimize", help="optimize a model built by a factory function")
    o.add_argument("factory", help="PACKAGE.MODULE:FACTORY, called with no arguments (e.g. torchvision.models:resnet18)")
    o.add_argument("--input-shape", action="append", required=True, metavar="N,C,H,W",
                   help="shape of a random float32 input; repeat for models with several inputs")
    o.add_argument("--passes", help="comma-separated pass or preset names (default: the exact passes)")
    o.add_argument("--layout", choices=["channels_last"], help="also store conv weights channels-last (faster "
                   "oneDNN convolutions on CPU; checked, and undone with the reason, if the model needs NCHW)")
    o.add_argument("--onnx", metavar="OUT.onnx", help="write the optimized model to ONNX and check it in onnxruntime")
    o.add_argument("--opset", type=int, help="ONNX opset (default: 23 where onnxruntime runs RMSNormalization, else 18)")
    o.add_argument("--static-batch", action="store_true", help="export ONNX with a fixed batch size")
    o.add_argument("--check", action="store_true", help="exit with status 1 if any result is past tolerance")
    o.add_argument("--draw", metavar="GRAPH.svg", help="draw the optimized graph: .svg is rendered with graphviz "
                   "'dot' (without it the DOT text is written to GRAPH.dot); any other name gets DOT text")
    o.add_argument("--runs", type=int, default=5, help="timed runs for the latency medians (default 5)")
    o.add_argument("--seed", type=int, default=0, help="seed for weights' factory and inputs (default 0)")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _optimize(args)
    except UsageError as e:
        print(f"fxrewrite: error: {e}", file=sys.stderr)
        return 2


def _optimize(args) -> int:
    shapes = [parse_shape(s) for s in args.input_shape]
    factory = load_factory(args.factory)
    if args.runs < 1:
        raise UsageError("--runs must be at least 1")
    for flag, path in (("--onnx", args.onnx), ("--draw", args.draw)):  # fail now, not after the long steps
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise UsageError(f"{flag} {path}: directory {os.path.dirname(os.path.abspath(path))!r} does not exist")
    import torch

    from . import passes as catalogue

    # torch's own warnings while tracing a model that cannot be captured would bury the one-line
    # error this command promises; the capture failure itself is reported below
    torch._logging.set_logs(all=logging.ERROR)

    pass_names = [s.strip() for s in args.passes.split(",") if s.strip()] if args.passes else None
    try:
        catalogue.resolve(pass_names or [])
    except KeyError as e:
        raise UsageError(e.args[0]) from None

    torch.manual_seed(args.seed)
    model, inputs = _build(args.factory, factory, shapes)
    fast = _optimized(model, inputs, pass_names, args.layout)
    print(fast.report.table())

    ok = _measure(model, fast, inputs, shapes, args.runs)
    if args.onnx:
        ok &= _export_and_check(model, fast, inputs, shapes, args)
    if args.draw:
        path = _write_drawing(fast.graph, args.draw)
        print(f"\ngraph drawn to {path}")
    if args.check and not ok:
        print("fxrewrite: check failed: a result is past tolerance", file=sys.stderr)
        return 1
    return 0


def _build(name: str, factory, shapes):
    """The model `factory()` builds, in eval mode, and random inputs of `shapes` it runs on."""
    import torch
    import torch.nn as nn
    with _step(f"building {name}"):
        try:
            model = factory()
        except Exception as e:
            raise UsageError(f"calling {name}() failed: {_one_line(e)}") from None
        if not isinstance(model, nn.Module):
            raise UsageError(f"{name}() returned {type(model).__name__}, not a torch.nn.Module")
        model.eval()
    inputs = tuple(torch.randn(s) for s in shapes)
    with _step("running the original model"):
        try:
            with torch.no_grad():
                model(*inputs)
        except Exception as e:
            raise UsageError(f"the model fails on inputs of shape {[list(s) for s in shapes]}: {_one_line(e)}") \
                from None
    return model, inputs


def _optimized(model, inputs, pass_names, layout):
    from .api import optimize
    from .rewrite.capture import CaptureError, InputError
    with _step("optimizing"):
        chatter = io.StringIO()  # torch.export prints partial graphs to stderr when it fails
        try:
            with redirect_stderr(chatter):
                fast = optimize(model, inputs, passes=pass_names, layout=layout)
        except (CaptureError, InputError) as e:
            raise UsageError(f"cannot capture the model: {_one_line(e)}") from None
        sys.stderr.write(chatter.getvalue())
    return fast


def _measure(model, fast, inputs, shapes, runs: int) -> bool:
    """Print the error on a fresh input and the latencies; whether the error is within tolerance."""
    import torch

    from .rewrite.verify import verify
    fresh = tuple(torch.randn(s) for s in shapes)  # not the inputs it was captured with
    with _step("measuring the error on a fresh random input"):
        result = verify(model, fast, fresh, raise_on_fail=False)
    print(f"\nerror vs original (fresh input): {result}")
    with _step("timing the original and the optimized model"):
        before, after = median_latencies([model, fast], inputs, runs)
    print(f"eager latency, median of {runs}: before {before * 1e3:.2f} ms, after {after * 1e3:.2f} ms "
          f"(speedup {before / after:.2f}x)")
    return result.passed


def _export_and_check(model, fast, inputs, shapes, args) -> bool:
    """Write `fast` to `args.onnx` and compare onnxruntime on it with `model`, at the batch size
    of the inputs and (with a dynamic batch) one more; whether all were within tolerance."""
    import torch

    from .onnx_export import OnnxExportError, check_onnx, export_onnx
    with _step(f"exporting ONNX to {args.onnx}"):
        try:
            info = export_onnx(fast, inputs, args.onnx, opset=args.opset, dynamic_batch=not args.static_batch)
        except OnnxExportError as e:
            raise UsageError(_one_line(e)) from None
    print(f"\nonnx: {info}")
    ok = True
    batches = [shapes[0][0]] if args.static_batch else [shapes[0][0], shapes[0][0] + 1]
    for b in batches:
        with _step(f"checking the ONNX file in onnxruntime at batch {b}"):
            x = tuple(torch.randn((b,) + s[1:]) for s in shapes)
            onnx_result = check_onnx(model, args.onnx, x)
        print(f"onnxruntime vs original, batch {b}: {onnx_result}")
        ok &= onnx_result.passed
    return ok


if __name__ == "__main__":
    sys.exit(main())
