"""One case: build the program's model, optimise it with one option, check it against an oracle.

Failure classes (a case may have several; the shrinker keeps one):
    grammar_bug          the model fails eagerly on its own inputs (a bug of this fuzzer)
    crash:<Type>         `optimize` (or torch.compile) raised something undocumented
    input_error          InputError on a model that runs eagerly on those inputs
    model_mutated        the user's model changed (weights, BN statistics, flags, hooks)
    inputs_mutated       the user's example inputs changed
    crash_run:<Type>     the optimised model fails on fresh inputs
    mismatch             outputs on fresh inputs past the tolerance rule (`checks`)
    mismatch_repeat      the first call was right and a second call on other inputs is not
    backend_fallback     the torch.compile backend fell back to the unoptimised graph
    layout_false_reject  layout="channels_last" was put back because "outputs moved" (it is exact)
    nondeterministic     optimize twice on the same model gave different code
    not_idempotent       optimize(fast) differs from fast (or crashes: not_idempotent:<Type>)
    verify64             fxrewrite.rewrite.verify(float64=True) (derivations replayed on float64 weights) fails
    meta_plan            optimize on the model built on the meta device gives other code or derivations, or,
                         given the optimised model's tensors, other outputs (options "default" and
                         "quantize_prep" only)
    hang                 (the runner) no answer from the case's worker in `runner.STALL_S` seconds: it hung
                         or died
    grad_mismatch        option "triton": the model lowered alone (its regions' backward kernels) gives
                         other gradients of a fixed random projection of its outputs, with respect to
                         the input and every parameter, than the user's model (the tolerance rule, on
                         fresh inputs; crash_grad:<Type> when only the lowered model's backward raises)
Documented errors (CaptureError, VerificationError, TypeError, ValueError, KeyError) are not
failures: the case is `rejected` with the reason, and the summary counts them.
"""
from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import dataclass, field

import torch

from .blocks import GrammarError
from .checks import compare_outputs, model_changes, same_tensor, snapshot
from fxrewrite.rewrite.verify import flatten_outputs
from .grammar import generate
from .model import build_model, check_runs, make_inputs

ROTATION = ["default", "inplace_off", "channels_last", "triton", "backend", "quantize_prep", "compiled_triton"]
OPTIONS = {"default": {}, "inplace_off": {"inplace": False}, "channels_last": {"layout": "channels_last"},
           "quantize_prep": {"passes": "quantize_prep"},  # the opt-in exact passes: lift_norms, fold_norm_affine
           "triton": {"lower": "triton"}, "backend": {"compiler": "eager"}, "inductor": {"compiler": "inductor"},
           # lowered regions inside AOTAutograd's graphs, where they decompose (`codegen.compiled`)
           "compiled_triton": {"compiler": "aot_eager", "lower": "triton"}}
COMPILED = ("backend", "inductor", "compiled_triton")
LOWERED = ("triton", "compiled_triton")
FRESH = ("fresh", "fresh2")


@dataclass
class CaseResult:
    seed: int
    option: str
    program: dict
    failures: dict = field(default_factory=dict)  # class -> detail
    rejected: str | None = None
    records: list = field(default_factory=list)  # (pass, node, action, detail) from the reports
    tensors: list | None = None  # the optimised model's tensor names (coverage: what was merged away)
    seconds: float = 0.0

    def fail(self, cls: str, detail: str):
        self.failures.setdefault(cls, detail[:500])

    @property
    def ok(self) -> bool:
        return not self.failures


def run_case(seed: int, option: str | None = None, verify64: bool = True, options=ROTATION) -> CaseResult:
    """The case for `seed`: its program, with the option the seed rotates to (or `option`)."""
    return check_program(generate(seed), option or options[seed % len(options)], verify64)


def check_program(program: dict, option: str = "default", verify64: bool = True) -> CaseResult:
    res = CaseResult(program["seed"], option, program)
    t0 = time.perf_counter()
    with quiet_single_thread():
        _check(program, option, verify64, res)
    res.seconds = time.perf_counter() - t0
    return res


@contextlib.contextmanager
def quiet_single_thread():
    """One intra-op thread (tiny tensors; two cores shared by workers) and no warnings."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        torch.set_num_threads(threads)


def _check(program: dict, option: str, verify64: bool, res: CaseResult):
    try:
        check_runs(program)
    except GrammarError as e:
        res.fail("grammar_bug", str(e))
        return
    model, example = build_model(program), make_inputs(program, "example")
    before, example_before = snapshot(model), example.clone()
    if option in COMPILED:
        fast, seen = _compiled(program, option, res), ("example",)  # compiling ran it on the example
    else:
        fast, seen = _optimized(model, example, OPTIONS[option], res), ()
    changed = model_changes(model, before)
    if changed:
        res.fail("model_mutated", changed)
    if not same_tensor(example, example_before):
        res.fail("inputs_mutated", "optimize changed the example inputs")
    if fast is None:
        return
    # lowered kernels round ('rounding', not 'exact'); a cast to a fixed dtype stays one in the
    # float64 replay (and in the float64 reference), which rounds there. Before any call of
    # `fast`: a model that writes its buffers is compared from the same state as the user's
    if verify64 and option not in COMPILED and option not in LOWERED and not _casts(program):
        _verify64(model, fast, program, res)
    if not _outputs_ok(fast, program, _expected(program, seen), res, "mismatch", "crash_run"):
        return
    if option not in COMPILED:
        _determinism(model, program, fast, option, res)
        _idempotence(fast, program, _expected(program, FRESH), option, res)
        if option in ("default", "quantize_prep"):  # (the passes a checkpoint is rewritten with)
            _meta_plan(program, fast, res, OPTIONS[option])
    if option == "triton":
        _gradients(program, res)


def _expected(program: dict, seen: tuple = ()) -> dict:
    """{stream: (float64 reference, eager in the model's dtype)} for the fresh inputs in turn, on
    one build of each that has first run on the inputs in `seen`: the calls the candidate has
    already made (a model that writes its own buffers answers according to its history)."""
    ref, eager = build_model(program).double(), build_model(program)
    out = {}
    with torch.no_grad():
        for stream in seen:
            x = make_inputs(program, stream)
            ref(x.double()), eager(x.clone())
        for stream in FRESH:
            x = make_inputs(program, stream)
            out[stream] = ref(x.double()), eager(x.clone())
    return out


DOCUMENTED = ("CaptureError", "VerificationError", "TypeError", "ValueError", "KeyError")


def _optimized(model, example, kwargs: dict, res: CaseResult, cls: str = "crash"):
    from fxrewrite import InputError, optimize
    try:
        fast = optimize(model, example, **kwargs)
    except InputError as e:
        res.fail("input_error" if cls == "crash" else f"{cls}:InputError", _line(e))
        return None
    except Exception as e:  # noqa: BLE001 - every escape is classified
        name = type(e).__name__
        if name in DOCUMENTED and cls == "crash":
            res.rejected = f"{name}: {_line(e)}"
        else:
            res.fail(f"{cls}:{name}", _line(e))
        return None
    if cls == "crash":
        res.records += [(r.pass_name, r.node, r.action, r.detail) for r in fast.report.records]
        res.tensors = sorted(fast.state_dict().keys())
        for r in fast.report.skipped("layout"):
            if "outputs moved" in r.detail:  # a layout change is exact: its own check was too strict
                res.fail("layout_false_reject", r.detail.replace("\n", " "))
    return fast


def _line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else ""


def _compiled(program: dict, option: str, res: CaseResult):
    """torch.compile(backend="rewrite") on a separate build (inference: no grad), compiled on the
    example inputs; the backend never raises, so its reports say whether it fell back."""
    import torch._dynamo
    from fxrewrite import backend
    torch._dynamo.reset()
    seen = {id(r) for r in backend.REPORTS}
    compiled = torch.compile(build_model(program), backend="rewrite", options=dict(OPTIONS[option]))
    try:
        with torch.no_grad():
            compiled(make_inputs(program, "example"))
    except Exception as e:  # noqa: BLE001
        peer = _peer_error(program, option)
        if peer is not None and _cause(peer) == _cause(e):
            res.rejected = f"PyTorch's own torch.compile(backend={PEERS[option]!r}) fails too: {_line(peer)}"
        else:
            res.fail(f"crash:{type(e).__name__}", _line(e))
        return None
    finally:
        for report in [r for r in backend.REPORTS if id(r) not in seen]:
            res.records += [(r.pass_name, r.node, r.action, r.detail) for r in report.records]
            for r in report.records:
                if r.pass_name == "backend" and "the pipeline failed" in r.detail:
                    res.fail("backend_fallback", r.detail)
    return compiled


PEERS = {"backend": "eager", "inductor": "inductor", "compiled_triton": "aot_eager"}  # the final compiler alone


def _peer_error(program: dict, option: str) -> Exception | None:
    """What torch.compile with the option's final compiler alone (no rewrite) raises on the
    program's example (None: it runs). A crash both raise is PyTorch's, not the library's
    (`aot_eager` replays some CPU bfloat16 BatchNorm graphs with a view its own kernel's output
    layout does not allow, for one)."""
    import torch._dynamo
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            torch.compile(build_model(program), backend=PEERS[option])(make_inputs(program, "example"))
    except Exception as e:  # noqa: BLE001
        return e
    finally:
        torch._dynamo.reset()
    return None


def _cause(e: Exception) -> tuple[type, str]:
    """(type, first line) of the error under a compiler's wrapper (`BackendCompilerFailed` wraps
    whatever any final compiler raised, so its own type says nothing)."""
    inner = getattr(e, "inner_exception", None) or e
    return type(inner), _line(inner)


def _outputs_ok(fast, program: dict, expected: dict, res: CaseResult, cls: str, crash: str) -> bool:
    """Run `fast` on each fresh input set in turn (the same object: a second call must not reuse
    the first call's state) and compare with the reference."""
    for i, stream in enumerate(FRESH):
        try:
            with torch.no_grad():
                out = fast(make_inputs(program, stream))
        except Exception as e:  # noqa: BLE001
            res.fail(f"{crash}:{type(e).__name__}", _line(e))
            return False
        diff = compare_outputs(out, *expected[stream], rounds_in=_rounds_in(program, res.option))
        if diff:
            res.fail(cls if i == 0 else f"{cls}_repeat", f"{stream}: {diff}")
            return False
    return True


def _rounds_in(program: dict, option: str) -> torch.dtype | None:
    """float32 for a lowered float64 program that casts to float32 (a norm block computed in
    float32): the kernel computes that norm in float32 too, rounding its own way there."""
    if option in LOWERED and program["dtype"] == "float64" and _casts(program):
        return torch.float32
    return None


def _casts(program: dict) -> bool:
    """Whether a block of the program casts to a fixed dtype (the norm block's "cast")."""
    return any(b.get("cast") for b in program["blocks"])


def _determinism(model, program: dict, fast, option: str, res: CaseResult):
    again = _optimized(model, make_inputs(program, "example"), OPTIONS[option], res, "nondeterministic")
    if again is not None and again.code != fast.code:
        res.fail("nondeterministic", "optimize twice on the same model gave different code")


def _idempotence(fast, program: dict, expected: dict, option: str, res: CaseResult):
    twice = _optimized(fast, make_inputs(program, "example"), OPTIONS[option], res, "not_idempotent")
    if twice is not None:
        _outputs_ok(twice, program, expected, res, "not_idempotent", "not_idempotent")


def _verify64(model, fast, program: dict, res: CaseResult):
    from fxrewrite import verify
    try:
        result = verify(model, fast, make_inputs(program, "fresh"), float64=True, raise_on_fail=False)
    except Exception as e:  # noqa: BLE001
        res.fail(f"verify64:{type(e).__name__}", _line(e))
        return
    if not result.passed:
        res.fail("verify64", str(result).replace("\n", " "))


def _gradients(program: dict, res: CaseResult):
    """The lowered regions' backward (`codegen.backward`): the model lowered with no other pass
    (its parameters keep their names and values) against the user's, in float64 and in its own
    dtype. Nothing to check when no region was lowered; the main check judges optimize's errors."""
    from fxrewrite import optimize
    from fxrewrite.codegen import runtime
    try:
        lowered = optimize(build_model(program), make_inputs(program, "example"), passes=[], lower="triton",
                           inplace=False)
    except Exception:  # noqa: BLE001
        return
    if not any(runtime.is_region_call(n) for n in lowered.graph.nodes):
        return
    x, user = make_inputs(program, "fresh"), build_model(program)
    try:
        ref, eager = _grads(build_model(program).double(), x.double(), x.dtype), _grads(user, x, x.dtype)
    except Exception:  # noqa: BLE001 - the user's model has no gradient here (an in-place write to a view, ...)
        return
    try:
        got = _grads(lowered, x, x.dtype)
    except Exception as e:  # noqa: BLE001
        res.fail(f"crash_grad:{type(e).__name__}", _line(e))
        return
    extra = sorted(got.keys() - ref.keys())
    tied: dict = {}
    for name, p in user.named_parameters(remove_duplicate=False):
        tied.setdefault(id(p), []).append(name)
    missing = [names[0] for names in [["input"], *tied.values()] if not any(n in got for n in names)]
    if extra or missing:
        res.fail("grad_mismatch", f"gradients for parameters the user's model does not have: {extra}" if extra
                 else f"no gradient for {missing}")
        return
    # a parameter tied to another may be named once, by either name: compare the names it has
    ref = {k: v for k, v in ref.items() if k in got}
    eager = {k: v for k, v in eager.items() if k in got}
    diff = compare_outputs(got, ref, eager, rounds_in=_rounds_in(program, "triton"), common_scale=True)
    if diff:
        res.fail("grad_mismatch", diff)


def _grads(model, x: torch.Tensor, dtype: torch.dtype) -> dict:
    """{"input": d/dx, parameter name: d/dp} (every name of a tied parameter) of sum(w * output)
    over the floating outputs, w a fixed random weight per output (drawn in float64, rounded to
    the model's `dtype`: the same numbers for every model, the float64 reference's included);
    zeros where a gradient does not reach (everywhere when no output carries one).
    Gradients are compared with a floor on the scale of the largest (`compare_outputs(
    common_scale=True)`): a conv bias before a training-mode BatchNorm has an exactly zero
    gradient, computed as a sum of terms of that scale that cancel to rounding noise."""
    leaf = x.detach().clone().requires_grad_()
    outs = flatten_outputs(model(leaf.clone()))  # (a clone: the model may write its input in place)
    gen = torch.Generator().manual_seed(0)
    loss = 0
    for key in sorted(outs):
        o = outs[key]
        if o.is_floating_point():
            w = torch.randn(o.shape, generator=gen, dtype=torch.float64).to(dtype).to(o.dtype)
            if o.requires_grad:
                loss = loss + (o * w).sum()
    params = dict(model.named_parameters(remove_duplicate=False))
    wrt = [leaf, *params.values()]
    if not torch.is_tensor(loss):
        return {name: torch.zeros_like(t) for name, t in zip(["input", *params], wrt)}
    grads = torch.autograd.grad(loss, wrt, allow_unused=True)
    return {name: torch.zeros_like(t) if g is None else g for name, t, g in zip(["input", *params], wrt, grads)}


def _meta_plan(program: dict, fast, res: CaseResult, kwargs: dict):
    """The same model built on the meta device plans the same rewrite: the same code (the devices
    written into the graph aside) and derivations; with `fast`'s tensors put in, the same outputs."""
    from fxrewrite import optimize
    from fxrewrite.rewrite.devices import retarget_graph
    with torch.device("meta"):
        meta_model = build_model(program)
    try:
        plan = optimize(meta_model, make_inputs(program, "example").to("meta"), **kwargs)
    except Exception as e:  # noqa: BLE001 - the materialised model optimised: so must its plan
        res.fail(f"meta_plan:{type(e).__name__}", _line(e))
        return
    if retarget_graph(plan.graph, torch.device("cpu")):
        plan.recompile()
    if plan.code != fast.code:
        diff = next((a, b) for a, b in zip(plan.code.splitlines() + [""], fast.code.splitlines() + [""]) if a != b)
        res.fail("meta_plan", f"other code: {diff[0].strip()[:140]!r} vs {diff[1].strip()[:140]!r}")
        return
    if [(d.target, d.sources) for d in plan.derivations] != [(d.target, d.sources) for d in fast.derivations]:
        res.fail("meta_plan", "other derivations")
        return
    for name, t in [*fast.named_parameters(remove_duplicate=False), *fast.named_buffers(remove_duplicate=False)]:
        owner, _, leaf = name.rpartition(".")
        module = plan.get_submodule(owner)
        if leaf in module._parameters:
            module._parameters[leaf] = t
        else:  # a copy: a model that writes its buffers would see the other model's call
            module._buffers[leaf] = t.clone()
    x = make_inputs(program, "fresh")
    with torch.no_grad():
        got, want = flatten_outputs(plan(x.clone())), flatten_outputs(fast(x.clone()))
    if got.keys() != want.keys() or not all(same_tensor(got[k], want[k]) for k in want):
        res.fail("meta_plan", "the plan given the optimised model's tensors computes other outputs")
