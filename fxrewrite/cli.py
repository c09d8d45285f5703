"""The command line: `python -m fxrewrite optimize PACKAGE.MODULE:FACTORY --input-shape 1,3,224,224`.

Builds the model by calling FACTORY with no arguments, puts it in eval mode, optimizes it,
prints the report table, the measured error against the original on a fresh random input, and
the eager latency before/after (median of `--runs` timed runs after one warm-up). `--onnx`
writes the optimized model to ONNX and checks the file in onnxruntime (at the given batch size
and, with a dynamic batch, at another one). `--draw` writes the optimized graph as DOT.

Inputs are random float32 tensors of the `--input-shape`s; with `--tokens VOCAB` they are
token ids (int64 in [0, VOCAB)), e.g. `--tokens 32000 --input-shape 1,128` for a language
model. FACTORY may also return `(model, example_inputs)` (a tensor, a tuple or a dict of
keyword inputs): then `--input-shape` is optional, and fresh inputs are drawn like the
examples (same shapes and dtypes; integers within the examples' range). torch's own log
output while capturing and exporting is kept out of the way unless `--verbose`.

Exit status: 0 on success; 1 when `--check` is given and the optimized model or the ONNX file
differs from the original beyond tolerance; 2, with a one-line message and no traceback, for
bad input (factory path, shape, pass name) or a model that cannot be run or captured.
Progress lines for the long steps go to stderr; results go to stdout.

`python -m fxrewrite rewrite-checkpoint PACKAGE.MODULE:FACTORY SRC_DIR OUT_DIR --tokens 32000
--input-shape 2,8 --passes quantize_prep` rewrites a safetensors checkpoint too large for memory:
FACTORY is called under the meta device, the plan made there, and the checkpoint's tensors read
and written a few at a time (`fxrewrite.checkpoint`); load the result with
`fxrewrite.checkpoint.load_rewritten`. Same inputs and exit statuses (a checkpoint lacking
tensors the plan needs is bad input: 2).
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
import warnings
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass


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


@contextmanager
def _quiet(verbose: bool):
    """Keep torch's own output (torch.export's guard tracebacks, the ONNX exporter's progress and
    warnings, about 150 lines for a real model) out of the results, unless --verbose. Errors
    still surface as exceptions, which the caller turns into one line."""
    if verbose:
        yield
        return
    sink, disabled = io.StringIO(), logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        with warnings.catch_warnings(), redirect_stdout(sink), redirect_stderr(sink):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(disabled)


@dataclass
class InputSpec:
    """How to draw one input afresh: float inputs from N(0, 1), integer ones (token ids, masks)
    uniformly from [low, high). `seq` is dimension 1 of an integer input of rank >= 2."""

    shape: tuple
    dtype: object = None  # a torch dtype; None is float32
    low: int = 0
    high: int = 1

    @property
    def tokens(self) -> bool:
        return self.dtype is not None and not self.dtype.is_floating_point and len(self.shape) >= 2

    def draw(self, batch: int | None = None, seq: int | None = None):
        import torch
        shape = list(self.shape)
        if batch is not None and shape:
            shape[0] = batch
        if seq is not None and self.tokens:
            shape[1] = seq
        if self.dtype is None or self.dtype.is_floating_point:
            return torch.randn(shape, dtype=self.dtype)
        return torch.randint(self.low, self.high, shape).to(self.dtype)

    @classmethod
    def like(cls, t) -> "InputSpec":
        if t.is_floating_point():
            return cls(tuple(t.shape), t.dtype)
        low, high = (int(t.min()), int(t.max()) + 1) if t.numel() else (0, 1)
        return cls(tuple(t.shape), t.dtype, low, high)


def _draw(specs, batch: int | None = None, seq: int | None = None):
    """Fresh inputs for `specs` (a tuple, or a dict of keyword inputs), optionally at another
    batch size and sequence length."""
    if isinstance(specs, dict):
        return {k: v.draw(batch, seq) for k, v in specs.items()}
    return tuple(v.draw(batch, seq) for v in specs)


def _call(model, inputs):
    return model(**inputs) if isinstance(inputs, dict) else model(*inputs)


def median_latencies(models: list, inputs, runs: int) -> list[float]:
    """Median wall time (s) of each `model(*inputs)` (`model(**inputs)` for a dict) over `runs`
    rounds after one warm-up; the models run round-robin, so that a slow spell of the machine
    hits all of them alike."""
    import torch
    times: list[list[float]] = [[] for _ in models]
    with torch.no_grad():
        for model in models:
            _call(model, inputs)
        for _ in range(runs):
            for i, model in enumerate(models):
                start = time.perf_counter()
                _call(model, inputs)
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


def _model_args(p: argparse.ArgumentParser, factory: str, shape: str, token_shape: str, *positional) -> None:
    """What both commands take: the factory (and further positionals), example input shapes, token
    ids, passes."""
    p.add_argument("factory", help=factory)
    for name, help_text in positional:
        p.add_argument(name, help=help_text)
    p.add_argument("--input-shape", action="append", metavar="N,C,H,W",
                   help=f"{shape}; required unless FACTORY returns example inputs")
    p.add_argument("--tokens", type=int, metavar="VOCAB", help="the inputs are token ids: int64 in [0, VOCAB), "
                   f"e.g. --tokens 32000 --input-shape {token_shape}")
    p.add_argument("--passes", help="comma-separated pass or preset names (default: the exact passes)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fxrewrite", description="fx-rewrite: optimize a PyTorch model's graph")
    sub = p.add_subparsers(dest="command", required=True)
    o = sub.add_parser("optimize", help="optimize a model built by a factory function")
    _model_args(o, "PACKAGE.MODULE:FACTORY, called with no arguments (e.g. torchvision.models:resnet18); it "
                "returns the model, or (model, example_inputs)",
                "shape of a random float32 input (token ids with --tokens); repeat for models with several inputs",
                "1,128 (batch, sequence)")
    o.add_argument("--lower", choices=["triton"], help="replace fused norm + activation regions with generated "
                   "Triton kernels (optimize(..., lower='triton'))")
    o.add_argument("--layout", choices=["channels_last"], help="also store conv weights channels-last (faster "
                   "oneDNN convolutions on CPU; checked, and undone with the reason, if the model needs NCHW)")
    o.add_argument("--onnx", metavar="OUT.onnx", help="write the optimized model to ONNX and check it in onnxruntime")
    o.add_argument("--opset", type=int, help="ONNX opset (default: 23 where onnxruntime runs RMSNormalization, else 18)")
    o.add_argument("--static-batch", action="store_true", help="export ONNX with a fixed batch size "
                   "(and, for token inputs, a fixed sequence length)")
    o.add_argument("--check", action="store_true", help="exit with status 1 if any result is past tolerance")
    o.add_argument("--draw", metavar="GRAPH.svg", help="draw the optimized graph: .svg is rendered with graphviz "
                   "'dot' (without it the DOT text is written to GRAPH.dot); any other name gets DOT text")
    o.add_argument("--runs", type=int, default=5, help="timed runs for the latency medians (default 5)")
    o.add_argument("--seed", type=int, default=0, help="seed for weights' factory and inputs (default 0)")
    o.add_argument("--verbose", action="store_true", help="let torch's own log output (torch.export, the ONNX "
                   "exporter) through")
    r = sub.add_parser("rewrite-checkpoint", help="rewrite a (sharded) safetensors checkpoint shard by shard, "
                       "planning on the meta device: for models too large for memory")
    _model_args(r, "PACKAGE.MODULE:FACTORY, called with no arguments under the meta device; it returns the "
                "model, or (model, example_inputs)",
                "shape of an example input (token ids with --tokens); repeat for several inputs",
                "2,8 (batch, sequence)",
                ("src_dir", "the checkpoint: model-0000i-of-0000n.safetensors shards and "
                 "model.safetensors.index.json, or one model.safetensors (only read)"),
                ("out_dir", "where the rewritten shards, index and fxrewrite_manifest.json go"))
    r.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    r.add_argument("--verbose", action="store_true", help="let torch's own log output (torch.export) through")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _rewrite_checkpoint(args) if args.command == "rewrite-checkpoint" else _optimize(args)
    except UsageError as e:
        print(f"fxrewrite: error: {e}", file=sys.stderr)
        return 2


def _input_specs(args) -> list | None:
    """The specs the command line gives (None without --input-shape: the factory's examples)."""
    if args.tokens is not None and args.tokens < 1:
        raise UsageError("--tokens must be at least 1 (the vocabulary size)")
    if not args.input_shape:
        if args.tokens is not None:
            raise UsageError("--tokens needs --input-shape BATCH,SEQUENCE")
        return None
    shapes = [parse_shape(s) for s in args.input_shape]
    if args.tokens is None:
        return [InputSpec(s) for s in shapes]
    import torch
    return [InputSpec(s, torch.int64, 0, args.tokens) for s in shapes]


def _quiet_and_passes(args) -> list[str] | None:
    """Keep torch's own logs out of the way unless --verbose (its warnings while tracing a model
    that cannot be captured would bury the one-line error this command promises), and the pass
    names of --passes, checked now (a typo is bad input, not a failure after the long steps)."""
    import torch

    from . import passes as catalogue
    from .rewrite import capture
    capture.QUIET_EXPORT = not args.verbose
    if not args.verbose:
        torch._logging.set_logs(all=logging.ERROR)
    pass_names = [s.strip() for s in args.passes.split(",") if s.strip()] if args.passes else None
    try:
        catalogue.resolve(pass_names or [])
    except KeyError as e:
        raise UsageError(e.args[0]) from None
    return pass_names


def _optimize(args) -> int:
    specs = _input_specs(args)
    factory = load_factory(args.factory)
    if args.runs < 1:
        raise UsageError("--runs must be at least 1")
    for flag, path in (("--onnx", args.onnx), ("--draw", args.draw)):  # fail now, not after the long steps
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise UsageError(f"{flag} {path}: directory {os.path.dirname(os.path.abspath(path))!r} does not exist")
    import torch
    pass_names = _quiet_and_passes(args)
    torch.manual_seed(args.seed)
    model, inputs, specs = _build(args.factory, factory, specs)
    fast = _optimized(model, inputs, pass_names, args)
    print(fast.report.table())

    ok = _measure(model, fast, inputs, specs, args.runs)
    if args.onnx:
        ok &= _export_and_check(model, fast, inputs, specs, args)
    if args.draw:
        path = _write_drawing(fast.graph, args.draw)
        print(f"\ngraph drawn to {path}")
    if args.check and not ok:
        print("fxrewrite: check failed: a result is past tolerance", file=sys.stderr)
        return 1
    return 0


def _rewrite_checkpoint(args) -> int:
    """`rewrite-checkpoint`: `fxrewrite.checkpoint.rewrite_checkpoint`, with the inputs the
    command line gives (only their shapes and dtypes matter), and a summary on stdout."""
    specs = _input_specs(args)
    factory = load_factory(args.factory)
    if not os.path.isdir(args.src_dir):
        raise UsageError(f"source checkpoint directory {args.src_dir} does not exist")
    from .checkpoint import CheckpointError, rewrite_checkpoint
    from .rewrite.capture import CaptureError, InputError
    pass_names = _quiet_and_passes(args)

    def build():  # a failing factory is the user's input: one line, not a traceback
        try:
            built = factory()
        except Exception as e:
            raise UsageError(f"calling {args.factory}() failed: {_one_line(e)}") from None
        _, examples = _model_and_examples(args.factory, built)
        if specs is None and examples is None:
            raise UsageError(f"--input-shape is required: {args.factory}() returned no example inputs "
                             "(it may return (model, example_inputs))")
        return built
    inputs = None if specs is None else _draw(specs)
    start = time.perf_counter()
    try:
        manifest = rewrite_checkpoint(build, inputs, args.src_dir, args.out_dir, passes=pass_names,
                                      progress=not args.no_progress)
    except (CheckpointError, CaptureError, InputError) as e:
        raise UsageError(_one_line(e)) from None
    keys = sum(len(k) for k in manifest["shards"].values())
    by_pass: dict[str, int] = {}
    for d in manifest["derivations"]:
        by_pass[d["pass_name"]] = by_pass.get(d["pass_name"], 0) + 1
    derived = ", ".join(f"{n} by {p}" for p, n in by_pass.items()) or "none"
    print(f"wrote {keys} tensors in {len(manifest['shards'])} shard(s) to {args.out_dir} "
          f"in {time.perf_counter() - start:.1f} s; derived tensors: {derived}; "
          f"{len(manifest['sources_read'])} source tensors read")
    return 0


def _build(name: str, factory, specs):
    """The model `factory()` builds, in eval mode, the inputs it runs on (random ones drawn from
    `specs`, or the factory's own examples), and the specs to draw fresh inputs from."""
    import torch
    with _step(f"building {name}"):
        try:
            built = factory()
        except Exception as e:
            raise UsageError(f"calling {name}() failed: {_one_line(e)}") from None
        model, examples = _model_and_examples(name, built)
        model.eval()
    if specs is None:
        if examples is None:
            raise UsageError(f"--input-shape is required: {name}() returned no example inputs "
                             "(it may return (model, example_inputs))")
        specs = _specs_like(name, examples)
    inputs = _draw(specs)
    with _step("running the original model"):
        try:
            with torch.no_grad():
                _call(model, inputs)
        except Exception as e:
            shapes = [list(v.shape) for v in (inputs.values() if isinstance(inputs, dict) else inputs)]
            raise UsageError(f"the model fails on inputs of shape {shapes}: {_one_line(e)}") from None
    return model, inputs, specs


def _model_and_examples(name: str, built):
    """`built` is a model, or (model, example_inputs)."""
    import torch.nn as nn
    if isinstance(built, tuple) and len(built) == 2 and isinstance(built[0], nn.Module):
        return built
    if not isinstance(built, nn.Module):
        raise UsageError(f"{name}() returned {type(built).__name__}, not a torch.nn.Module "
                         "or (torch.nn.Module, example_inputs)")
    return built, None


def _specs_like(name: str, examples):
    """Specs to draw inputs like the factory's examples: a tensor, a tuple/list or a dict of tensors."""
    import torch
    if isinstance(examples, torch.Tensor):
        examples = (examples,)
    values = list(examples.values()) if isinstance(examples, dict) else list(examples) \
        if isinstance(examples, (tuple, list)) else None
    if values is None or not all(isinstance(v, torch.Tensor) for v in values):
        raise UsageError(f"{name}() returned example inputs that are not a tensor, a tuple or a dict of tensors")
    if isinstance(examples, dict):
        return {k: InputSpec.like(v) for k, v in examples.items()}
    return [InputSpec.like(v) for v in values]


def _optimized(model, inputs, pass_names, args):
    from .api import optimize
    from .rewrite.capture import CaptureError, InputError
    with _step("optimizing"):
        try:
            with _quiet(args.verbose):  # torch.export prints partial graphs to stderr when it fails
                fast = optimize(model, inputs, passes=pass_names, layout=args.layout, lower=args.lower)
        except (CaptureError, InputError) as e:
            raise UsageError(f"cannot capture the model: {_one_line(e)}") from None
    return fast


def _measure(model, fast, inputs, specs, runs: int) -> bool:
    """Print the error on a fresh input and the latencies; whether the error is within tolerance."""
    from .rewrite.verify import verify
    fresh = _draw(specs)  # not the inputs it was captured with
    with _step("measuring the error on a fresh random input"):
        result = verify(model, fast, fresh, raise_on_fail=False)
    print(f"\nerror vs original (fresh input): {result}")
    with _step("timing the original and the optimized model"):
        before, after = median_latencies([model, fast], inputs, runs)
    print(f"eager latency, median of {runs}: before {before * 1e3:.2f} ms, after {after * 1e3:.2f} ms "
          f"(speedup {before / after:.2f}x)")
    return result.passed


def _export_and_check(model, fast, inputs, specs, args) -> bool:
    """Write `fast` to `args.onnx` and compare onnxruntime on it with `model`, at the batch size
    of the inputs and (with a dynamic batch) one more, at another sequence length for token
    inputs; whether all were within tolerance."""
    from .onnx_export import OnnxExportError, check_onnx, export_onnx
    with _step(f"exporting ONNX to {args.onnx}"):
        try:
            with _quiet(args.verbose):
                info = export_onnx(fast, inputs, args.onnx, opset=args.opset, dynamic_batch=not args.static_batch)
        except OnnxExportError as e:
            raise UsageError(_one_line(e)) from None
    print(f"\nonnx: {info}")
    ok = True
    for batch, seq in _check_points(specs, info, args.static_batch):
        where = f"batch {batch}" + (f", sequence {seq}" if seq is not None else "")
        with _step(f"checking the ONNX file in onnxruntime at {where}"):
            try:
                with _quiet(args.verbose):
                    result = check_onnx(model, args.onnx, _draw(specs, batch, seq))
            except Exception as e:  # e.g. onnxruntime refuses a shape the file was meant to take
                result = f"FAIL (onnxruntime: {_one_line(e)})"
        print(f"onnxruntime vs original, {where}: {result}")
        ok &= not isinstance(result, str) and result.passed
    return ok


def _check_points(specs, info, static: bool) -> list[tuple]:
    """(batch, sequence) pairs to run the file at: the example's, and one more of each axis the
    file left symbolic (sequence: token inputs only). A graph captured at batch 1 can keep its
    batch fixed in the file: that is said, not run into."""
    values = list(specs.values()) if isinstance(specs, dict) else list(specs)
    batch = values[0].shape[0] if values[0].shape else 1
    token = next((v for v in values if v.tokens), None)
    seq = token.shape[1] if token is not None else None
    if not static and not info.dynamic_batch:
        print(f"onnx: the batch is fixed at {batch} in the captured graph (capture at batch 2 or more "
              "for a dynamic batch)")
    other = (batch + 1 if info.dynamic_batch else batch, seq + 3 if info.dynamic_seq else seq)
    return [(batch, seq)] + ([other] if other != (batch, seq) else [])


if __name__ == "__main__":
    sys.exit(main())
