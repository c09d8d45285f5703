"""Find fused norm + elementwise regions in a canonical FX graph (FX only: never imports triton).

A region is grown around a seed: one row-wise norm, or (a second kind, after every norm region
has been grown) one gated product of a GLU. Around a norm:

  * the norm: `ops.layer_norm`, `ops.rms_norm` (reduce over trailing dims), a `rewrite.nn.DyT`
    call_module, or an eval `ops.batch_norm` left after folding (per-channel affine, no
    reduction);
  * a prologue, backwards from the norm's input: elementwise producers (residual add, bias add,
    scale, cast, ...). Interior prologue nodes must have no reader outside the region; the norm's
    direct input may have other readers, and then it becomes a second output of the region
    (the updated residual stream of a pre-norm transformer);
  * an epilogue, forwards from the norm's output: elementwise readers whose other operands are
    computed independently of the region (activation, SmeLU, multiply, residual add, cast, ...).
    A region node read outside the region is an output; at most `MAX_OUTPUTS` outputs (the
    latest epilogue nodes are dropped until that holds and the fused call has a place before
    every outside reader).

Around a gated product `act(gate) * up` (act `silu`: SwiGLU; `gelu`, either approximation:
GeGLU), which has no norm (`glu_parts` says which products qualify, `grow_glu` grows them):

  * the seed: the product and its activation. The domain is the product's shape; `gate` must
    have it too (`up` may broadcast to it). The activation's value may be read elsewhere (it is
    then an output). `gate` and `up` are often the two halves of one projection's output
    (`chunk(2, dim=-1)`, `split`, slicing the last dim): the view nodes stay outside, so the
    fused call gets the two views and the kernel reads them in place, never a copy;
  * a prologue backwards from `gate` and `up`: elementwise producers (a cast, a bias add) read
    only inside the region (a GLU region's prologue adds no output);
  * an epilogue forwards from the product and the activation, as for a norm (a cast, a scale,
    a second product of the same activation). The down projection is a matmul: never a member.

Norm regions are grown first and exactly as if there were no GLU seeds: a product already in a
norm's epilogue seeds nothing.

"Elementwise" is whatever `describe` can turn into an IR op of `ir.OPS` whose result has exactly
the domain shape (the norm input's shape) and a floating dtype; other operands must broadcast to
it. Region finding never changes the graph; `codegen.lower_regions` (the pass LOWER_TRITON) does,
using the spec built here (`Region.spec`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn

from ..rewrite import ops
from ..rewrite.shapes import tensor_dtype, tensor_shape
from ..rewrite.nn import ELN, DyT, PartialRMSNorm, SmeLU

from .ir import GLU_ACTS, SpecBuilder, dtype_name, region_name

aten = torch.ops.aten

MAX_OUTPUTS = 2
MAX_PROLOGUE = 8
MAX_EPILOGUE = 16
FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class NotFusable(Exception):
    """Why a node cannot be (part of) a region."""


@dataclass
class Operand:
    """One argument of a region node: an FX node, a module tensor (`attr`), a literal or None."""

    node: fx.Node | None = None
    attr: str | None = None  # get_attr target to create (parameters of DyT/SmeLU modules)
    literal: float | None = None
    channel_view: int = 0
    absent: bool = False


@dataclass
class Described:
    op: str
    operands: list[Operand]
    attrs: dict


@dataclass
class Region:
    seed: fx.Node                   # the norm, or a GLU region's gated product
    nodes: list[fx.Node]            # graph order
    outputs: list[fx.Node]
    spec: dict
    input_keys: list                # per spec input: ("node", fx.Node) or ("attr", target)
    name: str = ""
    ops: list[str] = field(default_factory=list)
    kind: str = "norm"              # "norm" or "glu"

    @property
    def norm(self) -> fx.Node:
        """The seed node (named so for `codegen.lower_regions`; a GLU region's is its product)."""
        return self.seed


def _attr_tensor(node: fx.Node):
    if node.op != "get_attr":
        return None
    obj = node.graph.owning_module
    for part in node.target.split("."):
        obj = getattr(obj, part, None)
    return obj if isinstance(obj, torch.Tensor) else None


def dtype_of(node) -> torch.dtype | None:
    """A node's dtype from shape propagation / export metadata, or from the tensor of a get_attr."""
    if not isinstance(node, fx.Node):
        return None
    known = tensor_dtype(node)
    if known is not None:
        return known
    t = _attr_tensor(node)
    return t.dtype if t is not None else None


def shape_of(node):
    s = tensor_shape(node)
    if s is None and isinstance(node, fx.Node):
        t = _attr_tensor(node)
        s = tuple(t.shape) if t is not None else None
    return s


def _module(gm: fx.GraphModule, node: fx.Node):
    try:
        return gm.get_submodule(node.target)
    except AttributeError:
        return None


def _is(mod, cls) -> bool:
    """Our module class, or a subclass that keeps its forward (a new forward computes else)."""
    return isinstance(mod, cls) and type(mod).forward is cls.forward


def _tensor_or_literal(v) -> Operand:
    if isinstance(v, fx.Node):
        return Operand(node=v)
    if v is None:
        return Operand(absent=True)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise NotFusable(f"operand {v!r} is neither a tensor nor a number")
    if not float("-inf") < float(v) < float("inf"):
        raise NotFusable(f"non-finite literal {v}")
    return Operand(literal=float(v))


_UNARY = {ops.relu: "relu", ops.silu: "silu", ops.sigmoid: "sigmoid", ops.tanh: "tanh",
          ops.hardswish: "hardswish", ops.hardsigmoid: "hardsigmoid", aten.alias.default: "identity"}
_BINARY = {ops.add: "add", ops.sub: "sub", ops.mul: "mul", ops.div: "div"}


def describe(gm: fx.GraphModule, node: fx.Node) -> Described:
    """The IR op for an elementwise node, or NotFusable with the reason."""
    if node.op == "call_module":
        mod = _module(gm, node)
        if _is(mod, SmeLU) and len(node.args) == 1 and not node.kwargs:
            return Described("smelu", [Operand(node=node.args[0]), Operand(attr=f"{node.target}.beta")], {})
        raise NotFusable(f"module {type(mod).__name__} is not an elementwise op the emitter knows")
    if node.op != "call_function":
        raise NotFusable(f"{node.op} node")
    t = node.target
    if t in _UNARY:
        return Described(_UNARY[t], [Operand(node=ops_arg(node, "self"))], {})
    if t in _BINARY:
        attrs = {}
        if t in (ops.add, ops.sub):
            alpha = ops.arg(node, "alpha")
            if alpha not in (None, 1):
                attrs["alpha"] = float(alpha)
        return Described(_BINARY[t], [_tensor_or_literal(ops.arg(node, "self")),
                                      _tensor_or_literal(ops.arg(node, "other"))], attrs)
    if t is ops.gelu:
        return Described("gelu", [Operand(node=ops_arg(node, "self"))], {"approximate": ops.arg(node, "approximate")})
    if t is ops.relu6:
        return Described("hardtanh", [Operand(node=ops_arg(node, "self"))],
                         {"min": float(ops.arg(node, "min_val")), "max": float(ops.arg(node, "max_val"))})
    if t is ops.to_dtype:
        extra = {k: v for k, v in node.kwargs.items() if k not in ("dtype", "memory_format", "non_blocking")
                 and v is not None}
        dt = node.kwargs.get("dtype")
        if extra or dt not in FLOATS:
            raise NotFusable(f"_to_copy with {extra or dt}: only a float dtype change is fused")
        return Described("cast", [Operand(node=ops_arg(node, "self"))], {"dtype": dtype_name(dt)})
    if t is ops.cast:  # x.to(dtype), x.float(), ... on every capture route (LLaMA's RMSNorm casts)
        dt = ops.arg(node, "dtype")
        if dt not in FLOATS or ops.arg(node, "copy") or ops.arg(node, "memory_format") is not None:
            raise NotFusable(f"aten.to with {dt}: only a plain float dtype change is fused")
        return Described("cast", [Operand(node=ops_arg(node, "self"))], {"dtype": dtype_name(dt)})
    raise NotFusable(f"{ops.short_name(t)} is not an elementwise op the emitter knows")


def ops_arg(node, name):
    v = ops.arg(node, name)
    if not isinstance(v, fx.Node):
        raise NotFusable(f"{name} is not a tensor")
    return v


# norm modules the canonicaliser may leave as modules (BatchNorm in training mode, GroupNorm,
# InstanceNorm): reported as norms that were not lowered, so the report names every norm
_OTHER_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.RMSNorm)


def _written_out_dyt(node: fx.Node) -> Described | None:
    """`tanh(alpha * x)` with `alpha` a one-element parameter: a DyT as Dynamo inlines the
    module (`weight * ... + bias` follow as ordinary epilogue ops). The multiply joins the region
    as its prologue, so the norm itself is `tanh(1 * m)`: the same value. Any other tanh is an
    activation, not a region of its own."""
    m = ops.arg(node, "self")
    if not (isinstance(m, fx.Node) and m.op == "call_function" and m.target is ops.mul and len(m.users) == 1):
        return None
    if not any(isinstance(a, fx.Node) and a.op == "get_attr" and _attr_tensor(a) is not None
               and _attr_tensor(a).numel() == 1 for a in m.args[:2]):
        return None
    one = Operand(literal=1.0)
    return Described("dyt", [Operand(node=m), one, one, Operand(absent=True)], {})


def describe_norm(gm: fx.GraphModule, node: fx.Node) -> Described | None:
    """The IR op for a norm node; None if the node is no norm; NotFusable if it cannot be fused."""
    if node.op == "call_module":
        return _describe_norm_module(_module(gm, node), node)
    if node.op != "call_function":
        return None
    if node.target is ops.tanh:
        return _written_out_dyt(node)
    if node.target is ops.layer_norm or node.target is ops.rms_norm:
        return _describe_norm_op(node)
    if node.target is ops.batch_norm:
        return _describe_batch_norm(node)
    return None


def _describe_norm_module(mod: nn.Module, node: fx.Node) -> Described | None:
    """DyT, ELN and pRMSNorm, which the swaps insert as modules."""
    if isinstance(mod, _OTHER_NORMS):
        what = "in training mode" if mod.training else "not canonicalised to a norm op"
        raise NotFusable(f"{type(mod).__name__} kept as a module ({what}): no kernel template for it")
    kind = "ELN" if _is(mod, ELN) else "pRMSNorm" if _is(mod, PartialRMSNorm) else "DyT" if _is(mod, DyT) else None
    if kind is None:
        return None
    if len(node.args) != 1 or node.kwargs:
        raise NotFusable(f"{kind} called with extra arguments")
    x = Operand(node=node.args[0])
    bias = Operand(attr=f"{node.target}.bias") if getattr(mod, "bias", None) is not None else Operand(absent=True)
    if kind == "ELN":
        return Described("eln", [x, Operand(attr=f"{node.target}.beta"), Operand(attr=f"{node.target}.weight"), bias],
                         {"channels": mod.normalized_shape})
    if kind == "DyT":
        return Described("dyt", [x, Operand(attr=f"{node.target}.alpha"), Operand(attr=f"{node.target}.weight"),
                                 bias], {})
    dt = dtype_of(node.args[0])
    if dt is None:
        raise NotFusable("input dtype unknown")
    # eager's eps when None: RMSNorm's (float32's for half types) over the whole row, else the
    # input dtype's machine epsilon (`rewrite.nn.partial_rms_norm`)
    eps = mod.eps if mod.eps is not None else float(torch.finfo(
        dt if mod.k < mod.normalized_shape or dt == torch.float64 else torch.float32).eps)
    w = Operand(attr=f"{node.target}.weight") if mod.weight is not None else Operand(absent=True)
    return Described("prms_norm", [x, w], {"k": mod.k, "eps": float(eps), "eps_arg": mod.eps, "reduce_ndim": 1})


def _describe_norm_op(node: fx.Node) -> Described:
    """aten.layer_norm / aten.rms_norm over the trailing dims."""
    x = ops_arg(node, "input")
    shape, nshape = shape_of(x), list(ops.arg(node, "normalized_shape"))
    if shape is None:
        raise NotFusable("input shape unknown")
    if list(shape[len(shape) - len(nshape):]) != nshape or not nshape:
        raise NotFusable(f"normalized_shape {nshape} is not the trailing dims of {list(shape)}")
    w = _tensor_or_literal(ops.arg(node, "weight"))
    attrs = {"reduce_ndim": len(nshape)}
    if node.target is ops.layer_norm:
        attrs["eps"] = float(ops.arg(node, "eps"))
        return Described("layer_norm", [Operand(node=x), w, _tensor_or_literal(ops.arg(node, "bias"))], attrs)
    eps = ops.arg(node, "eps")
    dt = dtype_of(x)
    attrs["eps_arg"] = None if eps is None else float(eps)
    attrs["eps"] = float(eps) if eps is not None else float(torch.finfo(
        torch.float64 if dt == torch.float64 else torch.float32).eps)
    return Described("rms_norm", [Operand(node=x), w], attrs)


def _describe_batch_norm(node: fx.Node) -> Described:
    """Eval-mode aten.batch_norm: per-channel parameters along axis 1."""
    if ops.arg(node, "training") is not False:
        raise NotFusable("batch_norm in training mode (it updates running statistics)")
    x = ops_arg(node, "input")
    shape = shape_of(x)
    if shape is None or len(shape) < 2:
        raise NotFusable("batch_norm input shape unknown or under 2-D")
    cv = len(shape) - 2
    params = []
    for name in ("weight", "bias", "running_mean", "running_var"):
        v = ops.arg(node, name)
        if v is None:
            if name.startswith("running"):
                raise NotFusable("batch_norm without running statistics")
            params.append(Operand(absent=True))
        elif isinstance(v, fx.Node):
            params.append(Operand(node=v, channel_view=cv))
        else:
            raise NotFusable(f"batch_norm {name} is not a tensor")
    return Described("batch_norm", [Operand(node=x)] + params, {"eps": float(ops.arg(node, "eps"))})


# ---------------------------------------------------------------- growing a region

def positions(graph: fx.Graph) -> dict[fx.Node, float]:
    """Each node's position in graph order (kept valid across rewrites by `codegen._replace`)."""
    return {n: float(i) for i, n in enumerate(graph.nodes)}


def is_meta_check(node: fx.Node) -> bool:
    """torch.export's `_assert_tensor_metadata(x, dtype=...)`: a check, not a reader of x's value
    (a region keeps every value's dtype, so the check is dropped with the node it checks)."""
    return node.op == "call_function" and node.target is aten._assert_tensor_metadata.default


def readers(node: fx.Node) -> list[fx.Node]:
    """Users that read `node`'s value (metadata checks left out)."""
    return [u for u in node.users if not is_meta_check(u)]


def _broadcasts(shape, domain) -> bool:
    if len(shape) > len(domain):
        return False
    return all(s in (1, d) for s, d in zip(reversed(shape), reversed(domain)))


def _norm_domain(norm: fx.Node, nd: Described):
    """The shape a region around `norm` computes over (its input's), or NotFusable: the kernels
    need known shapes and float dtypes on the norm, its input and its tensor operands."""
    x = nd.operands[0].node
    domain = shape_of(x)
    if domain is None or shape_of(norm) != domain:
        raise NotFusable("shapes unknown (no shape propagation reached this norm)")
    if dtype_of(x) not in FLOATS or dtype_of(norm) not in FLOATS:
        raise NotFusable(f"dtype {dtype_of(x)} is not a float dtype the kernels handle")
    if len(domain) == 0:
        raise NotFusable("0-d input")
    for o in nd.operands[1:]:
        if o.node is not None and (shape_of(o.node) is None or dtype_of(o.node) not in FLOATS):
            raise NotFusable(f"norm operand {o.node.name} has unknown shape or a non-float dtype")
    return domain


class _Grower:
    """One region being grown around a seed (a norm, or a GLU's gated product, whose `domain`
    the caller gives): `members` is its node set, `described` the IR op of each member.
    Growing reads the graph and never changes it."""

    def __init__(self, gm: fx.GraphModule, claimed: set, order: dict | None, norm: fx.Node, nd: Described,
                 domain: tuple | None = None):
        self.gm = gm
        self.claimed = claimed
        self.order = positions(gm.graph) if order is None else order
        self.domain = _norm_domain(norm, nd) if domain is None else domain
        self.members: set[fx.Node] = {norm}
        self.described: dict[fx.Node, Described] = {norm: nd}

    def fits(self, node: fx.Node) -> Described | None:
        """The description of `node` if it can join a region of the norm's domain shape."""
        if node in self.claimed or not isinstance(node, fx.Node):
            return None
        try:
            d = describe(self.gm, node)
        except NotFusable:
            return None
        if shape_of(node) != self.domain or dtype_of(node) not in FLOATS:
            return None
        for o in d.operands:
            if o.node is not None:
                s = shape_of(o.node)
                if s is None or dtype_of(o.node) not in FLOATS or not _broadcasts(s, self.domain):
                    return None
        return d

    def _add(self, node: fx.Node, d: Described):
        self.members.add(node)
        self.described[node] = d

    def depends_on(self, node: fx.Node, first: float) -> bool:
        """Whether `node` is computed from a member (then it cannot be an outside operand: the
        fused call would have to run before its own input). `first`: the earliest member's
        position; nothing before it can depend on the region."""
        stack, seen = [node], set()
        while stack:
            n = stack.pop()
            if n in self.members:
                return True
            if n in seen or self.order[n] < first:
                continue
            seen.add(n)
            stack += list(n.all_input_nodes)
        return False

    def grow_prologue(self, x: fx.Node, *more: fx.Node, open_root: bool = True):
        """Take elementwise producers backwards from the norm's input `x` (and from `more`).
        Only `x` may have readers outside the region (it becomes an output), and not even `x`
        with `open_root=False`; an interior producer read elsewhere would have to be computed
        twice, so it stays out."""
        taken = 0
        stack = [*reversed(more), x]
        while stack and taken < MAX_PROLOGUE:
            p = stack.pop()
            if p in self.members:
                continue
            d = self.fits(p)
            if d is None:
                continue
            if (p is not x or not open_root) and any(u not in self.members for u in readers(p)):
                continue
            self._add(p, d)
            taken += 1
            stack += [o.node for o in d.operands if o.node is not None]

    def grow_epilogue(self, norm: fx.Node, *more: fx.Node) -> list[fx.Node]:
        """Take elementwise readers forwards from the norm (and from `more`), in graph order,
        whose other operands do not depend on the region. Returns them in the order taken (the
        trimming order)."""
        first = min(self.order[n] for n in self.members)
        epilogue: list[fx.Node] = []
        frontier = sorted({u for n in (norm, *more) for u in readers(n)}, key=self.order.get)
        while frontier and len(epilogue) < MAX_EPILOGUE:
            c = frontier.pop(0)
            if c in self.members:
                continue
            d = self.fits(c)
            if d is None:
                continue
            if any(o.node is not None and o.node not in self.members and self.depends_on(o.node, first)
                   for o in d.operands):
                continue
            self._add(c, d)
            epilogue.append(c)
            frontier = sorted(set(frontier) | set(readers(c)), key=self.order.get)
        return epilogue

    def outputs(self) -> list[fx.Node]:
        """Members read outside the region, in graph order."""
        return [n for n in sorted(self.members, key=self.order.get)
                if any(u not in self.members for u in readers(n))]

    def placeable(self) -> bool:
        """Whether the fused call has a place: 1 to MAX_OUTPUTS outputs, and a member after all
        outside inputs (where the call goes) that comes before every outside reader."""
        outs = self.outputs()
        if not outs or len(outs) > MAX_OUTPUTS:
            return False
        ext = [o.node for n in self.members for o in self.described[n].operands
               if o.node is not None and o.node not in self.members]
        last_input = max((self.order[e] for e in ext), default=-1)
        anchor = min((self.order[n] for n in self.members if self.order[n] > last_input), default=None)
        if anchor is None:
            return False
        return all(self.order[u] >= anchor for o in outs for u in readers(o) if u not in self.members)

    def trim(self, epilogue: list[fx.Node]):
        """Drop the latest epilogue nodes until the region is placeable (NotFusable if never)."""
        while not self.placeable() and epilogue:
            self.members.discard(epilogue.pop())
        if not self.placeable():
            raise NotFusable("no placement satisfies the region's inputs and readers")


def grow(gm: fx.GraphModule, norm: fx.Node, nd: Described, claimed: set, order: dict | None = None) -> Region:
    """The region around `norm` (raises NotFusable with the reason); nodes in `claimed` stay out.
    `order`: `positions` of the graph's nodes, when the caller keeps them (growing many regions,
    it should)."""
    g = _Grower(gm, claimed, order, norm, nd)
    g.grow_prologue(nd.operands[0].node)
    g.trim(g.grow_epilogue(norm))
    nodes = sorted(g.members, key=g.order.get)
    return _build(gm, norm, nodes, g.outputs(), g.described)


def glu_parts(node: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """(activation node, up) if `node` is a gated product `act(gate) * up` (either operand
    order; act `silu` or `gelu`), else None. Says nothing of shapes: `grow_glu` checks them."""
    if node.op != "call_function" or node.target is not ops.mul:
        return None
    a, b = ops.arg(node, "self"), ops.arg(node, "other")
    for act, up in ((a, b), (b, a)):
        if (isinstance(act, fx.Node) and act.op == "call_function" and _GLU_ACT.get(act.target) in GLU_ACTS
                and isinstance(up, fx.Node)):
            return act, up
    return None


_GLU_ACT = {ops.silu: "silu", ops.gelu: "gelu"}


def _glu_domain(product: fx.Node, act: fx.Node, up: fx.Node) -> tuple:
    """The shape a GLU region computes over (the product's), or NotFusable: known float shapes,
    `gate` (the activation's input) of exactly that shape, `up` broadcasting to it."""
    gate = ops.arg(act, "self")
    shapes = {"product": shape_of(product), "gate": shape_of(gate), "activation": shape_of(act),
              "up": shape_of(up)}
    if any(s is None for s in shapes.values()):
        raise NotFusable("shapes unknown (no shape propagation reached this gated product)")
    domain = tuple(shapes["product"])
    if len(domain) == 0:
        raise NotFusable("0-d gated product")
    if tuple(shapes["gate"]) != domain or tuple(shapes["activation"]) != domain:
        raise NotFusable(f"gate {list(shapes['gate'])} is not of the product's shape {list(domain)} "
                         f"(only up may broadcast)")
    if not _broadcasts(shapes["up"], domain):
        raise NotFusable(f"up {list(shapes['up'])} does not broadcast to the product's shape {list(domain)}")
    for what, n in (("product", product), ("gate", gate), ("activation", act), ("up", up)):
        if dtype_of(n) not in FLOATS:
            raise NotFusable(f"{what} dtype {dtype_of(n)} is not a float dtype the kernels handle")
    return domain


def grow_glu(gm: fx.GraphModule, product: fx.Node, claimed: set, order: dict | None = None) -> Region:
    """The GLU region seeded by the gated product `product` (see the module docstring); raises
    NotFusable with the reason, or ValueError if `product` is no gated product."""
    parts = glu_parts(product)
    if parts is None:
        raise ValueError(f"{product.name} is not a gated product act(gate) * up")
    act, up = parts
    domain = _glu_domain(product, act, up)
    try:
        dp, da = describe(gm, product), describe(gm, act)
    except NotFusable as e:
        raise NotFusable(f"gated product: {e}") from None
    g = _Grower(gm, claimed, order, product, dp, domain)
    if g.fits(act) is None or g.fits(product) is None:
        raise NotFusable("the activation or the product is not an elementwise op of the domain")
    g._add(act, da)
    gate = da.operands[0].node
    g.grow_prologue(gate, up, open_root=False)
    g.trim(g.grow_epilogue(product, act))
    nodes = sorted(g.members, key=g.order.get)
    return _build(gm, product, nodes, g.outputs(), g.described, kind="glu")


def _build(gm, norm, nodes, outputs, described, kind: str = "norm") -> Region:
    b = SpecBuilder()
    index: dict[fx.Node, list] = {}
    for n in nodes:
        args = []
        for o in described[n].operands:
            if o.absent:
                args.append(None)
            elif o.literal is not None:
                args.append(["lit", o.literal])
            elif o.node is not None and o.node in index:
                args.append(index[o.node])
            elif o.node is not None:
                args.append(b.input(("node", o.node), dtype_of(o.node), o.channel_view))
            else:
                t = gm.get_parameter(o.attr) if _has_param(gm, o.attr) else gm.get_buffer(o.attr)
                args.append(b.input(("attr", o.attr), t.dtype, o.channel_view))
        index[n] = b.node(described[n].op, args, described[n].attrs, dtype_of(n))
    outs = [index[o][1] for o in outputs]
    spec = b.build(outs, index[norm][1]) if kind == "norm" else b.build(outs, None, glu=index[norm][1])
    return Region(norm, nodes, outputs, spec, [k[0] for k in b.input_keys()], region_name(spec),
                  [described[n].op for n in nodes], kind)


def _has_param(gm: nn.Module, target: str) -> bool:
    try:
        gm.get_parameter(target)
        return True
    except AttributeError:
        return False


def norms(gm: fx.GraphModule):
    """(node, description or NotFusable) for every norm node of the graph, in order."""
    for node in gm.graph.nodes:
        try:
            d = describe_norm(gm, node)
        except NotFusable as e:
            yield node, e
            continue
        if d is not None:
            yield node, d


def _live(node: fx.Node, gm: fx.GraphModule) -> bool:
    """Whether `node` is still in `gm`'s graph (a region lowered before may have erased it)."""
    return node.graph is gm.graph and not getattr(node, "_erased", False)


def grow_regions(gm: fx.GraphModule, order: dict[fx.Node, float], claimed: set):
    """(seed node, its Region or the NotFusable saying why it has none) for every norm of `gm`,
    first norm first, then for every gated product (GLU) left, first first.

    The norms are listed up front, but each is described and grown only when the iteration
    reaches it, so a caller may rewrite the graph between steps (keeping `order` valid, as
    `codegen.lower_regions` does). The gated products are listed when the norms are done (a
    norm region may have taken them), and each is checked again when reached: an earlier GLU
    region may have taken it or its activation. Nodes in `claimed` join no region; the caller
    adds to it."""
    for node in [n for n, _ in norms(gm)]:
        if not _live(node, gm):  # an earlier region took it in (a written-out DyT's tanh as its epilogue)
            continue
        try:
            described = describe_norm(gm, node)
            if described is None:  # no norm any more: an earlier region rewrote what it read
                continue
            found = grow(gm, node, described, claimed, order)
        except NotFusable as e:
            found = e
        yield node, found
    for node in [n for n in gm.graph.nodes if glu_parts(n) is not None]:
        parts = glu_parts(node) if _live(node, gm) and node not in claimed else None
        if parts is None or parts[0] in claimed:
            continue
        try:
            found = grow_glu(gm, node, claimed, order)
        except NotFusable as e:
            found = e
        yield node, found


def find_regions(gm: fx.GraphModule) -> list[tuple[fx.Node, Region | NotFusable]]:
    """Regions for every norm of `gm`, then for every gated product left (non-overlapping, in
    that order); the graph is unchanged."""
    claimed: set = set()
    found_all = []
    for node, found in grow_regions(gm, positions(gm.graph), claimed):
        if isinstance(found, Region):
            claimed |= set(found.nodes)
        found_all.append((node, found))
    return found_all
