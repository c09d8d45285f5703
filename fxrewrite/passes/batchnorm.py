"""Fold eval-mode BatchNorm into the convolution or linear layer that feeds it.

Math (exact up to float rounding). With s = gamma / sqrt(running_var + eps), per output channel c:

    BN(conv(x, W, b))[c] = s[c] * (conv(x, W, b)[c] - mean[c]) + beta[c]
                         = conv(x, W * s[c], (b[c] - mean[c]) * s[c] + beta[c])[c]

For a transposed convolution the output channels are the weight's second axis, per group.
For Linear followed by BatchNorm1d the output features are the rows of W; this holds when the
linear output is (N, C), where BatchNorm1d's channel axis is the feature axis.

Each use of a shared conv gets its own folded weights; the original weights stay for other uses.
The folded weights are computed in float64 and cast back to the weight's dtype, as a pure
function of the old tensors (`fold_weight`, `fold_bias`), so the transform can be replayed on
other storage.

Through views (`fold_bn_through_views`): timm's LeViT writes Linear -> flatten(0, 1) ->
BatchNorm1d -> reshape_as, and models write conv -> flatten(2) -> BatchNorm1d or
linear -> transpose(1, 2) -> BatchNorm1d. Views (reshape, flatten, permute, ...) move elements
without changing them, and eval BatchNorm is a per-channel affine map of axis 1 of its input.
So when every slice along axis 1 of the BatchNorm's input V(y) holds elements of one producer
output channel p[c], with p a permutation,

    BN(V(y))[.., c, ..] = s[c] * (V(y)[.., c, ..] - mean[c]) + beta[c] = V(y')[.., c, ..]

where y' is the producer with the BatchNorm folded in as above, its parameters taken in producer
order (producer channel p[c] gets gamma[c], beta[c], mean[c], var[c]). The BatchNorm goes and the
views read the folded producer. Exact, as the direct fold. p is found concretely: an integer
tensor of the producer's output shape holding each element's channel index is run through the
views (`channel_order`).
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ..rewrite import ops
from ..rewrite.shapes import tensor_shape
from ..rewrite.passmanager import Pass, Rule, describe_node
from ..rewrite.pattern import Any, Lit, Op, Param


def bn_scale(gamma, var, eps):
    """s = gamma / sqrt(var + eps), in float64."""
    s = torch.rsqrt(var.double() + eps)
    return s * gamma.double() if gamma is not None else s


def fold_weight(w, gamma, var, eps, *, transposed=False, groups=1):
    """W' = W * s along the output-channel axis (axis 0; for transposed convs axis 1 per group)."""
    s = bn_scale(gamma, var, eps)
    w64 = w.double()
    if not transposed:
        out = w64 * s.reshape(-1, *([1] * (w.dim() - 1)))
    else:
        cin, cout_g = w.shape[0], w.shape[1]
        grouped = w64.reshape(groups, cin // groups, cout_g, *w.shape[2:])
        out = (grouped * s.reshape(groups, 1, cout_g, *([1] * (w.dim() - 2)))).reshape(w.shape)
    return out.to(w.dtype)


def fold_bias(b, gamma, beta, mean, var, eps, dtype=None):
    """b' = (b - mean) * s + beta, in `dtype` (the conv's weight dtype: a bf16 conv after an
    fp32 BN keeps a bf16 bias)."""
    s = bn_scale(gamma, var, eps)
    b64 = b.double() if b is not None else torch.zeros_like(mean, dtype=torch.float64)
    out = (b64 - mean.double()) * s
    if beta is not None:
        out = out + beta.double()
    return out.to(dtype or mean.dtype)


def _bn(producer, where=None):
    return Op(ops.batch_norm, input=producer, weight=Param("gamma", optional=True),
              bias=Param("beta", optional=True), running_mean=Param("mean"), running_var=Param("var"),
              training=Lit(False, what="training"), eps=Lit(name="eps"), name="bn", where=where)


CONV_BN = _bn(Op(ops.conv, input=Any("x"), weight=Param("w"), bias=Param("b", optional=True),
                 stride=Any("stride"), padding=Any("padding"), dilation=Any("dilation"),
                 transposed=Any("transposed"), output_padding=Any("output_padding"), groups=Any("groups"),
                 name="conv"))

LINEAR_BN = _bn(Op(ops.linear, input=Any("x"), weight=Param("w"), bias=Param("b", optional=True), name="linear"))


def _permuted(t, order):
    """t[order] (None stays None; no order, no change): BN parameters in producer channel order."""
    if t is None or order is None:
        return t
    return t[torch.as_tensor(order, device=t.device)]


def folded_params(rw, hint, w, b, gamma, beta, mean, var, eps, *, transposed=False, groups=1, order=None):
    """The folded (W', b') of a producer (`fold_weight`, `fold_bias`) as recorded functions of the
    old tensors; `order[j]` is the BN channel that producer channel j gets (None: the same j)."""
    def weight(w_, g_, v_):
        return fold_weight(w_, _permuted(g_, order), _permuted(v_, order), eps, transposed=transposed, groups=groups)

    def bias(b_, w_, g_, be_, m_, v_):
        g_, be_, m_, v_ = (_permuted(t, order) for t in (g_, be_, m_, v_))
        return fold_bias(b_, g_, be_, m_, v_, eps, dtype=w_.dtype)

    return (rw.param(f"{hint}_bn_weight", weight, w, gamma, var),
            rw.param(f"{hint}_bn_bias", bias, b, w, gamma, beta, mean, var))


def fold_bn_into_conv(rw, x, w, b, stride, padding, dilation, transposed, output_padding, groups,
                      gamma, beta, mean, var, eps, conv, bn):
    """BN(conv(x; W, b)) = conv(x; W s, (b - mean) s + beta). Exact."""
    w2, b2 = folded_params(rw, conv.name, w, b, gamma, beta, mean, var, eps, transposed=transposed, groups=groups)
    return rw.call(ops.conv, input=x, weight=w2, bias=b2, stride=stride, padding=padding, dilation=dilation,
                   transposed=transposed, output_padding=output_padding, groups=groups)


def linear_output_is_2d(linear, **_):
    shape = tensor_shape(linear)
    if shape is None:
        return "the linear output's shape is unknown (no example inputs reached it)"
    if len(shape) != 2:
        return f"linear output has shape {list(shape)}: BatchNorm1d normalises axis 1, not the feature axis"
    return None


def fold_bn_into_linear(rw, x, w, b, gamma, beta, mean, var, eps, linear, bn):
    """BN1d(linear(x; W, b)) = linear(x; s W, (b - mean) s + beta) for an (N, C) output. Exact."""
    w2, b2 = folded_params(rw, linear.name, w, b, gamma, beta, mean, var, eps)
    return rw.call(ops.linear, input=x, weight=w2, bias=b2)


# ---- through views

VIEW_METHODS = {"view", "reshape", "flatten", "unflatten", "unsqueeze", "squeeze", "reshape_as", "view_as",
                "contiguous", "permute", "transpose", "swapaxes", "t"}
_aten = torch.ops.aten
REORDERING = {"permute", "transpose", "swapaxes", "t", torch.permute, torch.transpose, torch.swapaxes, torch.t,
              _aten.permute.default, _aten.transpose.int, _aten.swapaxes.default, _aten.t.default}
VIEW_FUNCTIONS = (REORDERING - VIEW_METHODS) | {
    torch.flatten, torch.reshape, torch.unflatten, torch.unsqueeze, torch.squeeze, _aten.view.default,
    _aten.reshape.default, _aten._unsafe_view.default, _aten.flatten.using_ints, _aten.unflatten.int,
    _aten.unsqueeze.default, _aten.squeeze.default, _aten.squeeze.dim, _aten.squeeze.dims,
    _aten.contiguous.default, _aten.alias.default, _aten.clone.default, _aten.reshape_as.default,
    _aten.view_as.default}
SHAPE_READERS = {"size", "dim"}  # methods that read a tensor's shape, not its values
SHAPE_OF_OTHER = {"reshape_as", "view_as", "expand_as", _aten.reshape_as.default, _aten.view_as.default,
                  _aten.expand_as.default}  # read their first argument's values, the second's shape


def is_rearrangement(node) -> bool:
    """An op that rearranges its first argument's elements (a view, a reshape, a clone: the same
    values, maybe reordered), which a BatchNorm can be replayed through; not `x.view(dtype)`,
    which reinterprets the bits. (Broader than `effects.is_view`, which asks about aliasing.)"""
    if not (isinstance(node, fx.Node) and node.args and isinstance(node.args[0], fx.Node)):
        return False
    if node.op == "call_method":
        return node.target in VIEW_METHODS and not any(isinstance(a, torch.dtype) for a in node.args[1:])
    return node.op == "call_function" and node.target in VIEW_FUNCTIONS


def value_readers(node: fx.Node) -> list[fx.Node]:
    """The readers of `node`'s values: not those that read only its shape (`y.size()`, `y.shape`,
    `x.reshape_as(y)`), which a fold that keeps the shape leaves right."""
    def reads_values(u):
        if u.op not in ("call_method", "call_function"):
            return True
        if u.target in SHAPE_OF_OTHER and u.args[0] is not node:
            return False
        if u.op == "call_method":
            return u.target not in SHAPE_READERS
        if u.target is getattr:
            return u.args[1] not in ("shape", "ndim", "dtype", "device")
        return u.target is not _aten.sym_size.int
    return [u for u in node.users if reads_values(u)]


def _describe(node) -> str:
    return f"{node.name} ({ops.short_name(node.target)})" if isinstance(node, fx.Node) else repr(node)


def view_chain(bn_input: fx.Node, bn: fx.Node):
    """(producer, views from the producer to the BN) when the BN reads a conv or linear output
    through views that nothing else reads, else the reason there is none."""
    views, node = [], bn_input
    while is_rearrangement(node):
        views.append(node)
        node = node.args[0]
    path = " <- ".join(v.name for v in views)
    if not (isinstance(node, fx.Node) and node.target in (ops.conv, ops.linear)):
        return f"the BatchNorm reads {_describe(node)} through {path}: not a convolution or linear output"
    for reader, value in zip([bn] + views, views + [node]):
        others = [u.name for u in value_readers(value) if u is not reader]
        if others:
            return f"{value.name} has other readers ({', '.join(others)}): its value is needed elsewhere"
    for name in ("weight", "bias"):
        param = ops.arg(node, name)
        if not (param is None and name == "bias") and getattr(param, "op", None) != "get_attr":
            return f"the {name} of {node.name} is {_describe(param)}, not a constant parameter"
    return node, views[::-1]


def run_view(view: fx.Node, t: torch.Tensor):
    """`view` applied to `t`: a reordering op is called with its own (literal) arguments; any other
    keeps the row-major order, so it is a reshape to the view's recorded shape."""
    if view.target not in REORDERING:
        shape = tensor_shape(view)
        return shape_problem(view, shape) or t.reshape(shape)
    computed = []
    fx.node.map_arg((view.args[1:], view.kwargs), computed.append)
    if computed:
        return f"{view.name}'s arguments are computed ({', '.join(a.name for a in computed)}), not literals"
    fn = getattr(torch.Tensor, view.target) if view.op == "call_method" else view.target
    try:
        return fn(t, *view.args[1:], **view.kwargs)
    except (RuntimeError, TypeError, IndexError) as e:
        return f"{view.name} failed on the channel map: {type(e).__name__}: {e}"


def shape_problem(node: fx.Node, shape) -> str | None:
    """Why `shape`, `node`'s, cannot decide the channel map: unknown, or symbolic (a dynamic axis,
    where one example size would not prove the map for the others)."""
    if shape is None:
        return f"the shape of {node.name} is unknown (no example inputs reached it)"
    symbolic = [str(d) for d in shape if not isinstance(d, int)]
    return f"the shape of {node.name} is symbolic ({', '.join(symbolic)})" if symbolic else None


def channel_order(producer: fx.Node, views: list[fx.Node]):
    """p with BN channel c = producer output channel p[c], or why there is none: the views run on
    an integer tensor of the producer's output shape holding each element's channel index (conv:
    axis 1; linear: the last axis), and each slice along axis 1 of the result must hold one index,
    a different one for each slice."""
    shape = tensor_shape(producer)
    problem = shape_problem(producer, shape)
    if problem:
        return problem
    axis = 1 if producer.target is ops.conv else len(shape) - 1
    t = torch.arange(shape[axis]).reshape([-1 if i == axis else 1 for i in range(len(shape))]).expand(shape)
    for view in views:
        t = run_view(view, t)
        if isinstance(t, str):
            return t
    rows = t.movedim(1, 0).reshape(t.shape[1], -1)
    if rows.shape[1] > 0 and bool((rows == rows[:, :1]).all()) and rows[:, 0].unique().numel() == rows.shape[0]:
        return rows[:, 0].tolist()
    where = "axis 1" if producer.target is ops.conv else f"axis {axis}, its features"
    return (f"the BatchNorm's channel axis (axis 1 of {views[-1].name}, shape {list(t.shape)}) mixes the "
            f"{ops.short_name(producer.target)} output's channel axis ({where} of {list(shape)}) with other axes")


def bn_reads_a_view(bn: fx.Node) -> bool:
    return is_rearrangement(ops.arg(bn, "input"))


def views_map_channels(x, bn, **_):
    """None when the BN reads a conv or linear through views that map its channels onto the
    producer's output channels (`view_chain`, `channel_order`), else the reason."""
    found = view_chain(x, bn)
    if isinstance(found, str):
        return found
    order = channel_order(*found)
    return order if isinstance(order, str) else None


def fold_bn_through_views(rw, x, gamma, beta, mean, var, eps, bn):
    """BN(V(producer(x; W, b))) = V(producer(x; W', b')) for views V that map the BN's channel
    axis onto the producer's output channels by a permutation p (module docstring). Exact."""
    producer, views = view_chain(x, bn)
    p = channel_order(producer, views)
    order = [0] * len(p)  # producer channel j gets BN channel order[j]
    for c, j in enumerate(p):
        order[j] = c
    order = None if order == sorted(order) else order
    kw = {name: ops.arg(producer, name) for name in ops.arg_names(producer.target)}
    conv = producer.target is ops.conv
    kw["weight"], kw["bias"] = folded_params(
        rw.at(producer), producer.name, kw["weight"], kw["bias"], gamma, beta, mean, var, eps, order=order,
        transposed=kw["transposed"] if conv else False, groups=kw["groups"] if conv else 1)
    folded = rw.call(producer.target, **kw)
    rw.redirect(producer, folded)
    rw.replace(bn, x, f"fold_bn_through_views: [{bn.name} <- {' <- '.join(v.name for v in views[::-1])} <- "
                      f"{producer.name}] -> {describe_node(folded)} read through the views"
                      + (f" (channels permuted: {p[:8]}{'...' if len(p) > 8 else ''})" if order else ""))
    return None


VIEWS_BN = _bn(Any("x"), where=bn_reads_a_view)

BATCHNORM_FOLDING = Pass(
    "fold_batchnorm", "exact",
    rules=[Rule("fold_bn_into_conv", CONV_BN, fold_bn_into_conv),
           Rule("fold_bn_into_linear", LINEAR_BN, fold_bn_into_linear, check=linear_output_is_2d),
           # last: a check's reason replaces an earlier rule's near miss, so a BN behind views is
           # described by this rule, not as "input is flatten_1, not aten.convolution"
           Rule("fold_bn_through_views", VIEWS_BN, fold_bn_through_views, check=views_map_channels)],
    doc=__doc__,
    miss_note="the BatchNorm stays as it is (one aten.batch_norm)",
)
