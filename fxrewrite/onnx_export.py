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

Dynamic axes: the batch (dimension 0 of every input) and, for integer inputs such as token ids,
the sequence (dimension 1); inputs of equal example size share a symbol, an encoder-decoder's
target ids get their own. Attention that torch.onnx cannot translate as called (5-D inputs, fewer
key/value heads than query heads) is exported in the 4-D form it can (`sdpa_as_4d`). Export works on a copy when it must change something: weights with
row-major strides, and a transformers model's KV cache off. The user's model is left as it is.

Default opset: 23 when this onnxruntime can run RMSNormalization (probed once with a one-node
model), otherwise 18.
"""
from __future__ import annotations

import copy
import functools
import os
import re
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .rewrite.capture import as_args, disable_cache, recompile
from .rewrite.dynamic import is_token_tensor, sizes_of_two
from .rewrite.report import Report
from .rewrite.shapes import row_major_strides
from .rewrite.verify import VerificationError, VerifyResult, compare, flatten_outputs

STANDARD_DOMAINS = {"", "ai.onnx", "ai.onnx.ml"}


class OnnxExportError(RuntimeError):
    """The model could not be exported, or the file uses ops outside the standard domains."""


@dataclass
class OnnxExport:
    """What was written: the file, the opset, whether its batch axis (and the sequence axis of
    its token inputs) is symbolic, and the ONNX op types used (with counts)."""

    path: str
    opset: int
    dynamic_batch: bool
    op_counts: dict[str, int] = field(default_factory=dict)
    input_names: list[str] = field(default_factory=list)
    output_names: list[str] = field(default_factory=list)
    dynamic_seq: bool = False  # dimension 1 of the integer (token) inputs

    def __str__(self):
        ops = ", ".join(f"{k} {v}" for k, v in sorted(self.op_counts.items()))
        axes = f"{'dynamic' if self.dynamic_batch else 'static'} batch"
        if self.dynamic_seq:
            axes = "dynamic batch and sequence" if self.dynamic_batch else "static batch, dynamic sequence"
        return (f"{self.path}: opset {self.opset}, {axes}, "
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
    """Dimension 0 of every tensor input is a symbolic batch size, and dimension 1 of every
    integer input of rank >= 2 (token ids, attention masks) a symbolic sequence length. Inputs
    whose example sizes are equal share one symbol (`batch`, `seq`); a different size gets a
    symbol of its own (an encoder-decoder's `decoder_input_ids` has its own length: one shared
    `seq` would make export refuse the example as a constraint violation)."""
    names: dict[tuple[str, int], torch.export.Dim] = {}

    def dim(kind, size, key):
        if (kind, size) not in names:
            first = not any(k == kind for k, _ in names)
            names[kind, size] = torch.export.Dim(kind if first else f"{kind}_{_identifier(key)}")
        return names[kind, size]

    def spec(key, v):
        if not isinstance(v, torch.Tensor) or v.dim() == 0:
            return None
        axes = {0: dim("batch", v.shape[0], key)}
        if is_token_tensor(v):
            axes[1] = dim("seq", v.shape[1], key)
        return axes
    if kwargs:
        return {k: spec(k, v) for k, v in kwargs.items()}
    return tuple(spec(f"input{i}", a) for i, a in enumerate(args))


def _identifier(key) -> str:
    return re.sub(r"\W", "_", str(key))


def _canonical(t: torch.Tensor) -> bool:
    """Whether `t` has row-major strides. With a 1x1 conv weight of channels-last strides (still
    `is_contiguous()`) the exporter's fake convolution picks its memory format by a test that
    depends on whether the batch is 1 (a guard `batch <= 1`), which fixes at 1 a dynamic batch
    traced at 1 (mobilenet_v3_small after merge_branches)."""
    return tuple(t.stride()) == row_major_strides(t.shape)


def _export_view(model: nn.Module) -> nn.Module:
    """`model`, or a copy of it sharing every tensor it can, in the form export needs: weights
    with row-major strides, and a transformers model's KV cache off (export refuses a
    `DynamicCache` output). The user's model is never changed."""
    tensors = {id(t): t for m in model.modules()
               for t in [*m._parameters.values(), *m._buffers.values(), *vars(m).values()]
               if isinstance(t, torch.Tensor)}
    memo = {k: t if _canonical(t) else _restrided(t) for k, t in tensors.items()}
    config = getattr(model, "config", None)
    if all(memo[k] is t for k, t in tensors.items()) and not getattr(config, "use_cache", False):
        return model
    view = copy.deepcopy(model, memo)
    disable_cache(view, Report())
    if isinstance(view, torch.fx.GraphModule):
        recompile(view)  # a lazy GraphModule's copy takes *args until its code is generated
    return view


def _restrided(t: torch.Tensor) -> torch.Tensor:
    data = t.detach().clone(memory_format=torch.contiguous_format)
    return nn.Parameter(data, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else data


def export_onnx(model: nn.Module, example_inputs, path: str | os.PathLike, opset: int | None = None,
                dynamic_batch: bool = True) -> OnnxExport:
    """Write `model` (a user model or the result of `optimize`) to `path` as ONNX.

    `example_inputs`: a tensor, a tuple of positional inputs or a dict of keyword inputs.
    `dynamic_batch=True` makes dimension 0 of every tensor input (and so of the outputs) a
    symbolic `batch`, and dimension 1 of integer inputs (token ids, masks) a symbolic `seq`;
    an example batch of 1 is fine. A transformers model is exported with its KV cache off.
    Raises `OnnxExportError` when export fails or the file would contain a non-standard op
    domain. The model is not modified (export works on a copy where it must change something).
    """
    import onnx

    args, kwargs = as_args(example_inputs)
    opset = default_opset() if opset is None else int(opset)
    path = os.fspath(path)
    dynamic = _dynamic_shapes(args, kwargs) if dynamic_batch else None
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    external = size > 1.8 * 2 ** 30  # a single protobuf file holds at most 2 GiB
    try:
        view = _export_view(model)
        if dynamic:
            args, kwargs = (sizes_of_two(view, args, kwargs, dynamic) or (args, kwargs))[:2]
        _export(view, args, kwargs, path, opset, dynamic, external)
    except Exception as e:
        raise OnnxExportError(f"torch.onnx.export failed for {type(model).__name__}: {_summary(e)}") from e
    proto = onnx.load(path)
    nodes = check_domains(proto, path)
    counts: dict[str, int] = {}
    for n in nodes:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    batch, seq = _symbolic_axes(proto) if dynamic else (False, False)
    return OnnxExport(path, opset, batch, counts, [i.name for i in proto.graph.input],
                      [o.name for o in proto.graph.output], dynamic_seq=seq)


def _symbolic_axes(proto) -> tuple[bool, bool]:
    """Whether the file's batch axis, and the sequence axis of its integer (token) inputs, are
    symbolic: a graph captured at batch 1 (by `optimize`) can keep a batch of 1 whatever export
    asks for."""
    from onnx.helper import tensor_dtype_to_np_dtype

    def symbolic(value_info, axis):
        dims = value_info.type.tensor_type.shape.dim
        return len(dims) > axis and not dims[axis].dim_value
    inputs = [v for v in proto.graph.input if len(v.type.tensor_type.shape.dim) > 0]
    tokens = [v for v in inputs if len(v.type.tensor_type.shape.dim) >= 2
              and tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).kind in "iub"]  # as is_token_tensor
    return all(symbolic(v, 0) for v in inputs), bool(tokens) and all(symbolic(v, 1) for v in tokens)


def _export(model, args, kwargs, path, opset, dynamic, external):
    """torch.onnx.export; through torch.export first for a Triton-lowered model (whose fused
    regions are exported as their eager meaning, standard ATen ops), and again that way, with
    attention brought to the form the exporter translates (`sdpa_as_4d`), when the direct route
    fails (the first error is the one raised if both do). Size-oblivious shapes, as torch.onnx
    uses itself, so that an example batch of 1 does not fix the batch at 1."""
    table = lowered_decompositions(model)
    with torch.no_grad(), torch.fx.experimental._config.patch(backed_size_oblivious=True):
        if table:
            program = _via_export(model, args, kwargs, opset, dynamic, table)
        else:
            try:
                program = torch.onnx.export(model, args, kwargs=kwargs or None, dynamo=True, opset_version=opset,
                                            dynamic_shapes=dynamic, verbose=False, optimize=False)
            except Exception as first:
                try:
                    program = _via_export(model, args, kwargs, opset, dynamic, {})
                except Exception:
                    raise first from None
    _optimize_onnx(program.model, opset)
    program.save(path, external_data=external)


def _via_export(model, args, kwargs, opset, dynamic, table):
    """torch.export as torch.onnx calls it (non-strict, a size check the model makes, such as
    `seq != 1`, kept as a runtime assert rather than a guard that fixes the size), the
    decompositions, then torch.onnx on the program."""
    exported = torch.export.export(model, args, kwargs, dynamic_shapes=dynamic, strict=False,
                                   prefer_deferred_runtime_asserts_over_guards=True)
    exported = exported.run_decompositions(table | {torch.ops.aten.scaled_dot_product_attention.default: sdpa_as_4d})
    return torch.onnx.export(exported, args, kwargs=kwargs or None, dynamo=True, opset_version=opset,
                             verbose=False, optimize=False)


def sdpa_as_4d(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """Scaled dot-product attention in the one form torch.onnx translates (at opset 23 and below):
    4-D query, key and value with as many key/value heads as query heads. timm's NesT calls it on
    5-D blocks, Falcon with one key/value head broadcast over the query heads: the leading axes are
    broadcast and flattened into the batch, the key/value heads repeated, the mask broadcast to the
    scores' shape. The same attention, exactly; a call already in that form is left to the
    exporter (NotImplemented)."""
    heads = q.shape[-3]
    if q.dim() == 4 and k.dim() == 4 and k.shape[-3] == heads and v.shape[-3] == heads and \
            (attn_mask is None or attn_mask.dim() == 4):
        return NotImplemented
    if k.shape[-3] != heads:  # broadcast (1 head) or grouped-query attention (enable_gqa)
        k = k.repeat_interleave(heads // k.shape[-3], dim=-3)
        v = v.repeat_interleave(heads // v.shape[-3], dim=-3)
    lead = q.shape[:-3]
    k = k.expand(*lead, *k.shape[-3:])
    v = v.expand(*lead, *v.shape[-3:])
    if attn_mask is not None:
        attn_mask = attn_mask.expand(*q.shape[:-1], k.shape[-2]).reshape(-1, heads, q.shape[-2], k.shape[-2])
    out = torch.ops.aten.scaled_dot_product_attention.default(
        q.reshape(-1, *q.shape[-3:]), k.reshape(-1, *k.shape[-3:]), v.reshape(-1, *v.shape[-3:]), attn_mask,
        dropout_p, is_causal, scale=scale)
    return out.reshape(*lead, *out.shape[-3:])


def _optimize_onnx(model, opset: int):
    """What torch.onnx's own `optimize=True` does (onnxscript's constant folding and clean-up,
    then its opset-23 fusions), keeping only the RMSNormalization fusion. Its RotaryEmbedding
    fusion builds a cos/sin cache for the traced batch, which onnxruntime rejects at any dynamic
    sequence length ("cos_cache ... expected to have the same shape as input 'x', got 1 and 8",
    transformers' Llama at opset 23); its GQA fusion builds on that one, so it goes too. Without
    the RMSNormalization rule in this onnxscript the norm stays as Pow/ReduceMean/Sqrt/Div, which
    computes the same."""
    import onnxscript.optimizer
    onnxscript.optimizer.optimize_ir(model)
    if opset < 23:
        return
    try:
        from onnxscript.rewriter.rules.fusion._rms_normalization import fuse_rms_normalization
    except ImportError:
        return
    fuse_rms_normalization(model)


def _summary(e: BaseException) -> str:
    """The first line of an export error, plus the line naming the op it could not translate."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    detail = [line for line in lines if line.startswith("<class") or "No ONNX function" in line]
    return f"{type(e).__name__}: " + " | ".join(([lines[0]] if lines else []) + detail[:1])


def lowered_decompositions(model: nn.Module) -> dict:
    """{op: eager meaning} for this library's own ops found in `model`'s graph, which ONNX has no
    translation for. Today: `fxrewrite.fused_region` (Triton-lowered regions, `codegen`), whose
    meaning is its eager reference (`codegen.compiled.traced_reference`), made of ATen ops."""
    graph = getattr(model, "graph", None)
    if graph is None or not any(n.op == "call_function" and _is_region_target(n.target) for n in graph.nodes):
        return {}
    from .codegen.compiled import traced_reference
    from .codegen.runtime import OP

    def fused_region(spec, inputs, build=""):
        return traced_reference(spec, inputs)  # (outputs never alias inputs: a graph output may not be an input)
    return {OP: fused_region}


def _is_region_target(t) -> bool:
    """The fused-region op, or `codegen.runtime.call_region` that lowered graphs call (told apart
    without importing codegen, which models without lowered regions never need)."""
    return getattr(t, "namespace", None) == "fxrewrite" or getattr(t, "__module__", None) == "fxrewrite.codegen.runtime"


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
    options = ort.SessionOptions()
    options.log_severity_level = 4  # a failing run raises with the same message; no extra log line
    session = ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])
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
