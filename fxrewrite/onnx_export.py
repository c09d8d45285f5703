"""Export a model (optimised or not) to ONNX, and check the file against PyTorch in onnxruntime.

    info = export_onnx(fast, x, "model.onnx")          # dynamic batch by default
    result = check_onnx(model, "model.onnx", x2)        # any batch size; VerifyResult

Export goes through PyTorch's own exporter (`torch.onnx.export(..., dynamo=True)`: torch.export
then onnxscript), so the canonical ops become standard ONNX ops: `aten.convolution` -> Conv,
`aten.linear` -> Gemm/MatMul, `aten.layer_norm` -> LayerNormalization, `aten.rms_norm` ->
RMSNormalization at opset >= 23 (the exporter decomposes it into Pow/ReduceMean/Sqrt/Div at
lower opsets). DyT and SmeLU (`fxrewrite.rewrite.nn`) are ordinary elementwise PyTorch code (Tanh, Mul,
Add; Where, Pow, Div), so they export as such. After export every node, including nodes inside
local functions, must be in the standard ONNX domains: anything else raises `OnnxExportError`
instead of writing a file only a custom runtime could load. A Triton-lowered model
(`optimize(..., lower="triton")`) exports its fused regions as their eager meaning
(`lowered_decompositions`), i.e. the same standard ops as the unlowered model.

Default opset: 23 when this onnxruntime can run RMSNormalization (probed once with a one-node
model), otherwise 18.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .rewrite.capture import as_args
from .rewrite.verify import VerificationError, VerifyResult, compare, flatten_outputs

STANDARD_DOMAINS = {"", "ai.onnx", "ai.onnx.ml"}


class OnnxExportError(RuntimeError):
    """The model could not be exported, or the file uses ops outside the standard domains."""


@dataclass
class OnnxExport:
    """What was written: the file, the opset, and the ONNX op types used (with counts)."""

    path: str
    opset: int
    dynamic_batch: bool
    op_counts: dict[str, int] = field(default_factory=dict)
    input_names: list[str] = field(default_factory=list)
    output_names: list[str] = field(default_factory=list)

    def __str__(self):
        ops = ", ".join(f"{k} {v}" for k, v in sorted(self.op_counts.items()))
        return (f"{self.path}: opset {self.opset}, {'dynamic' if self.dynamic_batch else 'static'} batch, "
                f"{sum(self.op_counts.values())} nodes ({ops})")


@functools.cache
def ort_supports_rms_normalization() -> bool:
    """Whether the installed onnxruntime loads an opset-23 RMSNormalization node on CPU."""
    try:
        import onnx
        import onnxruntime as ort
        from onnx import TensorProto, helper
        node = helper.make_node("RMSNormalization", ["x", "g"], ["y"], axis=-1, epsilon=1e-6)
        graph = helper.make_graph([node], "probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4]),
                                                     helper.make_tensor_value_info("g", TensorProto.FLOAT, [4])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return True
    except Exception:
        return False


def default_opset() -> int:
    return 23 if ort_supports_rms_normalization() else 18


def _dynamic_shapes(args, kwargs):
    """Dimension 0 of every tensor input is one shared symbolic batch size."""
    batch = torch.export.Dim("batch")

    def spec(v):
        return {0: batch} if isinstance(v, torch.Tensor) and v.dim() > 0 else None
    if kwargs:
        return {k: spec(v) for k, v in kwargs.items()}
    return tuple(spec(a) for a in args)


def export_onnx(model: nn.Module, example_inputs, path: str | os.PathLike, opset: int | None = None,
                dynamic_batch: bool = True) -> OnnxExport:
    """Write `model` (a user model or the result of `optimize`) to `path` as ONNX.

    `example_inputs`: a tensor, a tuple of positional inputs or a dict of keyword inputs.
    `dynamic_batch=True` makes dimension 0 of every tensor input (and so of the outputs) a
    symbolic `batch`. Raises `OnnxExportError` when export fails or the file would contain a
    non-standard op domain. The model is not modified.
    """
    import onnx

    args, kwargs = as_args(example_inputs)
    opset = default_opset() if opset is None else int(opset)
    path = os.fspath(path)
    dynamic = _dynamic_shapes(args, kwargs) if dynamic_batch else None
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    external = size > 1.8 * 2 ** 30  # a single protobuf file holds at most 2 GiB
    table = lowered_decompositions(model)
    try:
        with torch.no_grad():
            target = model
            if table:  # Triton-lowered regions: export their eager meaning (standard ATen ops)
                target = torch.export.export(model, args, kwargs, dynamic_shapes=dynamic, strict=False)
                target = target.run_decompositions(table)
            torch.onnx.export(target, args, path, kwargs=kwargs or None, dynamo=True, opset_version=opset,
                              dynamic_shapes=None if table else dynamic, verbose=False, external_data=external)
    except Exception as e:
        raise OnnxExportError(f"torch.onnx.export failed for {type(model).__name__}: {_summary(e)}") from e
    proto = onnx.load(path)
    nodes = check_domains(proto, path)
    counts: dict[str, int] = {}
    for n in nodes:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return OnnxExport(path, opset, dynamic_batch, counts, [i.name for i in proto.graph.input],
                      [o.name for o in proto.graph.output])


def _summary(e: BaseException) -> str:
    """The first line of an export error, plus the line naming the op it could not translate."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    detail = [line for line in lines if line.startswith("<class") or "No ONNX function" in line]
    return f"{type(e).__name__}: " + " | ".join(([lines[0]] if lines else []) + detail[:1])


def lowered_decompositions(model: nn.Module) -> dict:
    """{op: eager meaning} for this library's own ops found in `model`'s graph, which ONNX has no
    translation for. Today: `fxrewrite.fused_region` (Triton-lowered regions, `codegen`), whose
    meaning is its eager reference (`codegen.reference.run_reference`), made of ATen ops."""
    graph = getattr(model, "graph", None)
    if graph is None or not any(n.op == "call_function" and getattr(n.target, "namespace", None) == "fxrewrite"
                                for n in graph.nodes):
        return {}
    import json

    from .codegen.reference import run_reference
    from .codegen.runtime import OP

    def fused_region(spec, inputs):
        outs = run_reference(json.loads(spec), inputs)
        return [t.clone() if any(t is i for i in inputs) else t for t in outs]  # a graph output may not be an input
    return {OP: fused_region}


def check_domains(proto, path: str) -> list:
    """All nodes of `proto` (graph and local functions); raises `OnnxExportError` if any node or
    opset import is outside the standard ONNX domains."""
    nodes = list(proto.graph.node) + [n for f in proto.functions for n in f.node]
    foreign = sorted({f"{n.domain}::{n.op_type}" for n in nodes if n.domain not in STANDARD_DOMAINS})
    foreign_opsets = sorted({o.domain for o in proto.opset_import if o.domain not in STANDARD_DOMAINS})
    if foreign or foreign_opsets:
        raise OnnxExportError(f"{path} uses non-standard ONNX domains (ops {foreign}, opsets {foreign_opsets}); "
                              "a standard runtime could not run it")
    return nodes


def _flat_inputs(args, kwargs) -> list[torch.Tensor]:
    flat = []
    for v in list(args) + list(kwargs.values()):
        if isinstance(v, torch.Tensor):
            flat.append(v)
        elif isinstance(v, (tuple, list)):
            flat += [t for t in v if isinstance(t, torch.Tensor)]
    return flat


def check_onnx(reference_model: nn.Module, path: str | os.PathLike, inputs, rtol: float = 1e-4,
               atol: float = 1e-5, raise_on_fail: bool = False) -> VerifyResult:
    """Run the ONNX file in onnxruntime (CPU) and compare it with `reference_model` (PyTorch).

    `inputs` may have another batch size than the exported example when it was exported with a
    dynamic batch. Returns a `VerifyResult`: max abs / max rel error per output and `passed`
    (criterion max|a - b| <= atol + rtol * max|ref|; the defaults allow for the different
    summation order of onnxruntime's float32 kernels). `raise_on_fail=True` raises
    `VerificationError` instead of returning a failing result.
    """
    import onnxruntime as ort

    args, kwargs = as_args(inputs)
    session = ort.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
    feeds_in = session.get_inputs()
    if kwargs and all(k in kwargs for k in (i.name for i in feeds_in)):
        feed = {i.name: kwargs[i.name].detach().cpu().numpy() for i in feeds_in}
    else:
        flat = _flat_inputs(args, kwargs)
        if len(flat) != len(feeds_in):
            raise ValueError(f"{path} takes {len(feeds_in)} inputs ({[i.name for i in feeds_in]}), "
                             f"got {len(flat)} tensors")
        feed = {i.name: t.detach().cpu().numpy() for i, t in zip(feeds_in, flat)}
    got = session.run(None, feed)
    with torch.no_grad():
        ref = reference_model(*args, **kwargs)
    names = list(flatten_outputs(ref))
    if len(names) != len(got):
        raise VerificationError(f"{path} has {len(got)} outputs, the reference model {len(names)} ({names})")
    cand = {k: torch.from_numpy(v) for k, v in zip(names, got)}
    result = compare(flatten_outputs(ref), cand, rtol, atol)
    result.outputs = {k.removeprefix("out."): d for k, d in result.outputs.items()}  # undo the dict's prefix
    if raise_on_fail and not result.passed:
        raise VerificationError(f"onnxruntime output differs from PyTorch:\n{result}")
    return result
