"""Compare two models' outputs on the same inputs, output by output.

Outputs may be tensors or any nesting of tuples, lists, dicts and HF `ModelOutput`s. Each tensor
output is judged norm-wise on max|cand - ref| (element-wise relative error is meaningless where
the reference crosses zero), against one of these tolerances, recorded per output:

- rtol/atol given: max|cand - ref| <= atol + rtol * max|ref|.
- by default, for float32/float16/bfloat16 outputs: the rounding eager itself shows in that
  dtype. A float64 copy of the reference runs on the same inputs (upcast), and with
  eager_rounding = max|ref - ref64| the output passes when
  max|cand - ref| <= max(K * eager_rounding, FLOOR_ULPS[dtype] * eps(dtype) * max|ref|).
  K = 8: an exact rewrite rounds differently from eager, not more. |cand - ref| is at most
  |cand - exact| + |ref - exact|, about twice eager's rounding, and folded weights round once
  more; measured on conv+BN, RepVGG, ACNet, ResNet-18 and Linear+BN1d in all three dtypes the
  ratio was at most 2.6. 8 leaves 3x for the spread of a maximum, while real mistakes stay far
  beyond it (float32: ~1e4 x; bfloat16, with its ~3 significant digits, flags errors of a few
  per cent of the output's range). The floor covers an eager run that happens to be nearly
  exact: in float32 a long reduction (a BN folded into a 3x3x3 conv) can round to 1e-6 of the
  output's scale, 13 x eager's own error on that input, and stay exact in float64, so 16 ulps;
  in bfloat16 merged weights are rounded once to 8 bits, and an input on which eager happens to
  be nearly exact showed 4 ulps (fuzzer seed 6328, exact in float64), so 4 ulps there.
- float64 outputs, or when the float64 copy cannot run: a fixed rtol per dtype (float64 1e-10,
  float32 1e-5, half types 4 eps), said so in the result's notes.

Integer and bool outputs must match exactly. `verify` leaves the models and the inputs as they
were (see `_run`).

For a partially optimized model, the result also gives each optimized part's deviation (its
outputs in both models, in the same runs: `parts`): where the model sorts, thresholds or
suppresses (top-k, NMS), outputs that tie in the reference can come out in another order after a
rewrite that changed the parts by 1e-15, and the parts' figures say where the change came from.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn

from .capture import as_args
from .clone import clone_inputs, copy_model, preserved_state

K = 8  # multiples of eager's own rounding an exact rewrite may show (see the module docstring)
FLOOR_ULPS = {torch.float32: 16, torch.float16: 4, torch.bfloat16: 4}  # ulps of max|ref| always allowed
_SEED = 0  # every model run starts from it: dropout draws the same masks in both models


class VerificationError(AssertionError):
    """The candidate's outputs differ from the reference's beyond tolerance."""


@dataclass
class OutputDiff:
    max_abs: float
    max_rel: float  # max|a - b| / max|ref|
    passed: bool
    shape: tuple
    tolerance: str = ""  # which criterion applied, e.g. "rtol 1e-05"


@dataclass
class VerifyResult:
    outputs: dict[str, OutputDiff] = field(default_factory=dict)
    rtol: float = 0.0  # as given; 0 with the default (per-output) tolerances
    atol: float = 0.0
    dtype: str = ""
    fixed: bool = True  # rtol/atol were given
    notes: list[str] = field(default_factory=list)  # fallbacks, how the float64 replay went
    replay_partial: bool = False  # float64: some derived weights were not recomputed from the reference
    parts: dict[str, float] = field(default_factory=dict)  # partially optimized: each part's max rel deviation

    @property
    def passed(self) -> bool:
        return all(d.passed for d in self.outputs.values())

    @property
    def max_abs(self) -> float:
        return max((d.max_abs for d in self.outputs.values()), default=0.0)

    @property
    def max_rel(self) -> float:
        return max((d.max_rel for d in self.outputs.values()), default=0.0)

    def as_dict(self) -> dict:
        return {k: {"max_abs": d.max_abs, "max_rel": d.max_rel, "tolerance": d.tolerance}
                for k, d in self.outputs.items()}

    def __str__(self):
        given = f", rtol={self.rtol:g}, atol={self.atol:g}" if self.fixed else ""
        lines = [f"{'PASS' if self.passed else 'FAIL'} ({self.dtype}{given})"]
        for k, d in self.outputs.items():
            lines.append(f"  {k}: shape {list(d.shape)}, max abs {d.max_abs:.3g}, max rel {d.max_rel:.3g}"
                         f"{'' if self.fixed else f', within {d.tolerance}'}{'' if d.passed else '  <-- FAIL'}")
        lines += [f"  optimized part {k}: max rel {v:.3g}" for k, v in self.parts.items()]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def flatten_outputs(out, prefix: str = "out") -> dict[str, torch.Tensor]:
    """Name every tensor in a nested output: out, out[0], out.logits, ..."""
    if isinstance(out, torch.Tensor):
        return {prefix: out}
    flat: dict[str, torch.Tensor] = {}
    if isinstance(out, dict):  # includes HF ModelOutput (an OrderedDict)
        for k, v in out.items():
            flat.update(flatten_outputs(v, f"{prefix}.{k}"))
    elif isinstance(out, (tuple, list)):
        for i, v in enumerate(out):
            flat.update(flatten_outputs(v, f"{prefix}[{i}]"))
    return flat


def _run(model: nn.Module, args, kwargs, double: bool = False):
    """One run of `model` that leaves no trace (`preserved_state`: buffers put back, RNG forked)
    on its own copies of the inputs (a model may write into them), with the RNG seeded with
    `_SEED`, so that every run draws the same dropout masks."""
    args, kwargs = clone_inputs(args, double), clone_inputs(kwargs, double)
    with torch.no_grad(), preserved_state(model):
        torch.manual_seed(_SEED)
        return model(*args, **kwargs)


def optimized_parts(model: nn.Module) -> list[str]:
    """The names of the optimized submodules (GraphModules, outermost) of a partially optimized
    model; [] for a model optimized whole."""
    if isinstance(model, fx.GraphModule):
        return []
    names: list[str] = []
    for name, m in model.named_modules():
        if name and isinstance(m, fx.GraphModule) and not any(name.startswith(p + ".") for p in names):
            names.append(name)
    return names


@contextmanager
def recording(model: nn.Module, names: list[str], into: dict):
    """Record into `into[name]` the outputs of every call of each named submodule of `model`
    (forward hooks, removed on exit). A call the module makes of itself is not a call of its
    own (a lazily compiled GraphModule's first call compiles, then calls itself again)."""
    handles = []
    try:
        for name in names:
            try:
                sub = model.get_submodule(name)
            except AttributeError:
                continue
            depth = [0]

            def enter(mod, args, depth=depth):
                depth[0] += 1

            def leave(mod, args, out, depth=depth, name=name):
                depth[0] -= 1
                if depth[0] == 0:
                    into.setdefault(name, []).append(out)
            handles += [sub.register_forward_pre_hook(enter), sub.register_forward_hook(leave)]
        yield into
    finally:
        for h in handles:
            h.remove()


def _part_deviations(names: list[str], ref: dict, cand: dict) -> dict[str, float]:
    """Each part's max relative deviation over all its calls (parts whose calls do not pair up
    are left out)."""
    out = {}
    for name in names:
        if name in ref and name in cand and len(ref[name]) == len(cand[name]):
            try:
                out[name] = deviation(ref[name], cand[name])[1]
            except ValueError:  # outputs differ in structure
                continue
    return out


def _amax(t: torch.Tensor) -> float:
    return float(t.abs().max()) if t.numel() else 0.0


def deviation(ref, cand) -> tuple[float, float]:
    """(max|cand - ref|, that / max|ref|) in float64: the one deviation this package reports,
    here per output, by the swaps per layer and per model, by `calibrate` per model. `ref` and
    `cand` are tensors or matching nestings of them (`flatten_outputs`); over several tensors
    both maxima are taken over all their floating elements. The relative deviation of an all-zero
    reference is 0 when the candidate is zero too, else inf."""
    refs = [t for t in flatten_outputs(ref).values() if t.is_floating_point()]
    cands = [t for t in flatten_outputs(cand).values() if t.is_floating_point()]
    if len(refs) != len(cands):
        raise ValueError("outputs differ in structure")
    max_abs, scale = 0.0, 0.0
    for r, c in zip(refs, cands):
        r64, c64 = r.detach().double(), c.detach().double()
        max_abs = max(max_abs, _max_difference(r64, c64))
        scale = max(scale, _amax(torch.where(torch.isfinite(r64), r64, 0.0)))
    return max_abs, (max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf")))


def _max_difference(r: torch.Tensor, c: torch.Tensor) -> float:
    """max|c - r|, with a NaN or infinity that the other side does not have at the same place
    counting as an infinite difference (Python's max() would silently drop a NaN)."""
    if r.shape != c.shape:
        r, c = torch.broadcast_tensors(r, c)
    same = (r == c) | (torch.isnan(r) & torch.isnan(c))  # equal, including the same inf or both NaN
    d = torch.where(same, 0.0, (r - c).abs())
    if d.numel() and bool(torch.isnan(d).any() | torch.isinf(d).any()):
        return float("inf")
    return _amax(d)


def default_rtol(dtype: torch.dtype) -> float:
    """The fixed rtol used where eager's own rounding is not measured."""
    return {torch.float64: 1e-10, torch.float32: 1e-5}.get(dtype, 4 * torch.finfo(dtype).eps)


def _criterion(dtype: torch.dtype, scale: float, rtol, atol, eager: float | None) -> tuple[float, str]:
    """The largest max|cand - ref| allowed for one output of max|ref| = `scale`, and why."""
    name = str(dtype).replace("torch.", "")
    if rtol is not None or atol is not None:
        rtol, atol = (default_rtol(dtype) if rtol is None else rtol), (atol or 0.0)
        return atol + rtol * scale, f"rtol {rtol:g}" + (f", atol {atol:g}" if atol else "")
    if eager is None:
        rtol = default_rtol(dtype)
        return rtol * scale, f"rtol {rtol:g}" + ("" if dtype == torch.float64 else f" ({name} default)")
    ulps = FLOOR_ULPS.get(dtype, 1)
    floor = ulps * torch.finfo(dtype).eps * scale
    if K * eager >= floor:
        return K * eager, f"{K} x eager's own {name} rounding (max abs {eager:.1e} vs float64)"
    return floor, (f"{ulps} x {name} eps x max|ref| = {floor:.1e} (eager's own rounding: max abs {eager:.1e} "
                   f"vs float64)")


def compare(ref_out, cand_out, rtol: float | None = None, atol: float | None = None,
            rounding: dict[str, float] | None = None) -> VerifyResult:
    """Compare outputs; `rounding` (output name -> eager's own max abs rounding) gives the
    default tolerance of those outputs when neither rtol nor atol is given."""
    ref, cand = flatten_outputs(ref_out), flatten_outputs(cand_out)
    if ref.keys() != cand.keys():
        raise VerificationError(f"outputs differ in structure: {sorted(ref)} vs {sorted(cand)}")
    fixed = rtol is not None or atol is not None
    result = VerifyResult(rtol=rtol or 0.0, atol=atol or 0.0, fixed=fixed)
    for k, r in ref.items():
        c = cand[k]
        if r.shape != c.shape:
            raise VerificationError(f"{k}: shape {list(r.shape)} vs {list(c.shape)}")
        if not r.is_floating_point():
            diff = float((r != c).sum())
            result.outputs[k] = OutputDiff(diff, diff, diff == 0, tuple(r.shape), "exact")
            continue
        eager = None if fixed or rounding is None else rounding.get(k)
        r64, c64 = r.detach().double(), c.detach().double()
        if not (torch.isfinite(r64).all() and torch.isfinite(c64).all()):
            # the same non-finite values (nan, +inf, -inf) at the same places, the rest within tolerance
            fin = torch.isfinite(r64)
            same_place = bool(torch.equal(fin, torch.isfinite(c64))) and bool(torch.equal(r64.isnan(), c64.isnan()))
            same_inf = same_place and bool(torch.equal(r64[~fin & ~r64.isnan()], c64[~fin & ~c64.isnan()]))
            scale = _amax(r64[fin]) if fin.any() else 0.0
            allowed, text = _criterion(r.dtype, scale, rtol, atol, eager)
            close = same_inf and (not fin.any() or _amax(r64[fin] - c64[fin]) <= allowed)
            result.outputs[k] = OutputDiff(float("nan"), float("nan"), close, tuple(r.shape), text)
            continue
        max_abs, max_rel = deviation(r64, c64)
        allowed, text = _criterion(r.dtype, _amax(r64), rtol, atol, eager)
        result.outputs[k] = OutputDiff(max_abs, max_rel, max_abs <= allowed, tuple(r.shape), text)
    result.dtype = str(next(iter(ref.values())).dtype).replace("torch.", "") if ref else ""
    return result


def _eager_rounding(reference: nn.Module, ref_out, args, kwargs) -> tuple[dict[str, float], list[str]]:
    """max|ref - ref64| per floating output below float64, from a float64 copy of `reference`."""
    flat = {k: r for k, r in flatten_outputs(ref_out).items() if r.is_floating_point() and r.dtype != torch.float64}
    if not flat:
        return {}, []
    try:
        out64 = flatten_outputs(_run(copy_model(reference).double(), args, kwargs, double=True))
    except Exception as e:  # noqa: BLE001 - any failure means: no float64 reference
        first = (str(e).strip().splitlines() or [""])[0][:200]
        return {}, [f"the float64 copy of the reference failed ({type(e).__name__}: {first}): "
                    f"fixed rtol per dtype instead"]
    rounding = {}
    for k, r in flat.items():
        r64 = out64.get(k)
        if r64 is not None and r64.shape == r.shape and r64.is_floating_point():
            a, b = r.detach().double(), r64.detach().double()
            rounding[k] = _amax((a - b)[torch.isfinite(a) & torch.isfinite(b)])
    return rounding, []


def _attr(model: nn.Module, target: str, kind: type = torch.Tensor):
    """The tensor (or other `kind`) `target` ("a.b.weight") of `model`, None when there is none (any more)."""
    obj = model
    for part in target.split("."):
        obj = getattr(obj, part, None)
    return obj if isinstance(obj, kind) else None


def _replay(derivations, ref64: nn.Module, cand64: nn.Module) -> tuple[list[str], bool]:
    """Recompute the derived weights of `cand64` from the reference's own float64 tensors.

    Without this the float64 candidate holds weights already rounded to the model's dtype, and
    an exact rewrite of a float32 model differs by ~1e-8 instead of ~1e-12. Each derivation is
    `target = fn(*sources)`, sources named as in the reference; later ones may read earlier
    targets. A source the reference lacks is taken from the candidate (upcast): partial."""
    env = dict(ref64.named_parameters(remove_duplicate=False))
    env.update(ref64.named_buffers(remove_duplicate=False))
    borrowed, failed = [], []
    with torch.no_grad():
        for d in derivations:
            for s in d.sources:
                if isinstance(s, str) and s not in env and isinstance(_attr(ref64, s, nn.Module), nn.Module):
                    env[s] = _attr(ref64, s, nn.Module)  # a parametrization, called with its originals
                elif isinstance(s, str) and s not in env and _attr(cand64, s) is not None:
                    env[s] = _attr(cand64, s)
                    borrowed.append(s)
            try:  # a source found nowhere raises KeyError here
                env[d.target] = d.fn(*(env[s] if isinstance(s, str) else s for s in d.sources))
            except Exception as e:  # noqa: BLE001 - keep the candidate's own value, and say so
                failed.append(f"{d.target} ({type(e).__name__}: {str(e)[:100]})")
        for d in derivations:
            t = _attr(cand64, d.target)  # None: an intermediate deleted since
            if t is None or d.target not in env:
                continue
            if t.shape != env[d.target].shape:
                failed.append(f"{d.target} (shape {list(env[d.target].shape)} vs {list(t.shape)})")
                continue
            t.copy_(env[d.target])
    notes = []
    if borrowed:
        notes.append(f"float64 replay partial: {len(borrowed)} source(s) not in the reference "
                     f"({', '.join(borrowed[:3])}{', ...' if len(borrowed) > 3 else ''}): the candidate's own, upcast")
    if failed:
        notes.append(f"float64 replay partial: not recomputed, the candidate's own upcast: {'; '.join(failed[:3])}"
                     f"{' ...' if len(failed) > 3 else ''}")
    if not notes:
        notes.append(f"float64: {len(derivations)} derived weights recomputed from the reference's float64 tensors")
    return notes, bool(borrowed or failed)


def _lowered(model: nn.Module) -> bool:
    graph = getattr(model, "graph", None)
    return graph is not None and any("fused_region" in n.meta for n in graph.nodes)


def _drop_dtype_checks(model: nn.Module) -> list[str]:
    """Remove torch.export's `_assert_tensor_metadata` checks from the graphs of a float64 copy:
    they assert the capture's dtypes, which a float64 run changes on purpose (the casts the
    graph recorded stay: where the model cast to a fixed dtype, so does the copy)."""
    check = torch.ops.aten._assert_tensor_metadata.default
    dropped = 0
    for gm in [m for m in model.modules() if isinstance(m, fx.GraphModule)]:
        for node in list(gm.graph.find_nodes(op="call_function", target=check)):
            gm.graph.erase_node(node)
            dropped += 1
        if dropped:
            gm.recompile()
    return [f"float64: {dropped} dtype checks of the exported graph left out"] if dropped else []


def verify(reference: nn.Module, candidate: nn.Module, inputs, rtol: float | None = None,
           atol: float | None = None, float64: bool = False, raise_on_fail: bool = True) -> VerifyResult:
    """Run both models on `inputs` and compare every output (tolerances: the module docstring).

    float64=True runs float64 copies of both models, which separates a rewrite's real error
    from rounding. The candidate's derived weights (`.derivations`, from `optimize`) are
    recomputed from the reference's float64 weights, so exact rewrites agree to ~1e-12 (default
    rtol 1e-10). Neither the models (buffers included) nor the inputs are changed.
    """
    args, kwargs = as_args(inputs)
    notes, partial = [], False
    ref_model, cand_model = reference, candidate
    if float64 and _lowered(candidate):
        raise ValueError("verify(float64=True) checks exact rewrites, but the candidate has lowered Triton regions, "
                         "which compute in the dtypes they were generated for (exactness 'rounding'): verify it in "
                         "its own dtype, or verify in float64 the model optimized without lower=")
    if float64:
        ref_model, cand_model = copy_model(reference).double(), copy_model(candidate).double()
        notes = _drop_dtype_checks(cand_model)
        derivations = getattr(candidate, "derivations", None)
        if derivations:
            replayed, partial = _replay(derivations, ref_model, cand_model)
            notes += replayed
    parts, ref_parts, cand_parts = optimized_parts(candidate), {}, {}
    with recording(ref_model, parts, ref_parts):
        ref_out = _run(ref_model, args, kwargs, double=float64)
    with recording(cand_model, parts, cand_parts):
        cand_out = _run(cand_model, args, kwargs, double=float64)
    rounding = None
    if rtol is None and atol is None and not float64:
        rounding, why = _eager_rounding(reference, ref_out, args, kwargs)
        notes += why
    result = compare(ref_out, cand_out, rtol, atol, rounding)
    result.notes, result.replay_partial = notes, partial
    result.parts = _part_deviations(parts, ref_parts, cand_parts)
    if raise_on_fail and not result.passed:
        raise VerificationError(str(result))
    return result
