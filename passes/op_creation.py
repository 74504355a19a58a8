"""Registry entries of the ops that create tensors (zeros, ones, full, arange, eye, one_hot, tensor) and
of the random draws.

Creation ops' values never depend on an input's values (``creation``); sizes written as literals are
matched to the named dims by value (``size_arg`` records which argument holds them, so shape
propagation writes their symbolic meaning into ``meta["sym_args"]``).

Every op that draws from torch's random number generator says so (``random=True``; dropout,
``bernoulli`` and ``rand_like`` are registered with the element-wise ops): ``fuse`` never erases one
left without users and names one it leaves unfused as random, ``verify`` replays its draws, the
CUDA-graph executor and the DAP lowering treat it apart (:func:`foldcompile.passes.registry.draws_random`). The rule contract is in
:mod:`foldcompile.passes.shape_rules`.

    >>> import torch
    >>> from foldcompile.passes.registry import lookup
    >>> e = lookup(torch.zeros)
    >>> e.op_class, e.creation, e.size_arg, e.random
    ('ELEMENTWISE', True, 0, False)
    >>> lookup(torch.Tensor.uniform_).random, lookup(torch.randint).random
    (True, True)
"""
from __future__ import annotations

import sympy
import torch
import torch.fx

from foldcompile.kernels.philox import draw_dropout_seed
from foldcompile.passes import op_samples as S
from foldcompile.passes.registry import ELEMENTWISE, register_op
from foldcompile.passes.shape_rules import NoRule, RuleContext, broadcast, tensor_pairs

__all__: list[str] = []


@register_op("one_hot", op_class=ELEMENTWISE, samples=S.creation)
def _rule_one_hot(ctx: RuleContext):
    _, s = ctx.tshape(0)
    return tuple(s) + (sympy.Integer(int(ctx.out.shape[-1])),)  # the class count is a constant


@register_op("tensor", op_class=ELEMENTWISE, creation=True, samples=S.creation)
def _rule_constant(ctx: RuleContext):
    return tuple(sympy.Integer(int(c)) for c in ctx.out.shape)  # torch.tensor(data): sizes of the data


@register_op("eye", "linspace", op_class=ELEMENTWISE, creation=True, samples=S.creation)
def _rule_count_args(ctx: RuleContext):
    # eye(n[, m]), linspace(start, end, steps): sizes written as ints, matched to dims by value
    if ctx.prop.op_name(ctx.node) == "eye":
        raw = list(ctx.node.args[:2])
        syms = [ctx.sargs[i] if isinstance(raw[i], torch.fx.Node) else ctx.match(int(ctx.args[i]))
                for i in range(len(raw))]
        return tuple(syms) if len(syms) == 2 else (syms[0], syms[0])
    steps = ctx.sarg(2, "steps")
    raw = ctx.node.args[2] if len(ctx.node.args) > 2 else ctx.node.kwargs.get("steps")
    return (steps if isinstance(raw, torch.fx.Node) else ctx.match(int(ctx.out.shape[0])),)


@register_op("zeros", "ones", "empty", "full", op_class=ELEMENTWISE, creation=True, size_arg=0, samples=S.creation)
@register_op("new_zeros", "new_ones", "new_empty", "new_full", op_class=ELEMENTWISE, creation=True, size_arg=1,
             samples=S.creation)
@register_op("rand", "randn", op_class=ELEMENTWISE, creation=True, random=True, size_arg=0, samples=S.creation)
def _rule_creation(ctx: RuleContext):
    name = ctx.prop.op_name(ctx.node)
    start = 1 if name.startswith("new_") else 0
    if name in ("full", "new_full"):
        vals, syms = ([int(v) for v in ctx.arg(start, "size")], ctx.sarg(start, "size"))
    else:
        vals, syms = ctx.size_list(start, "size")
    raw_arg = ctx.node.args[start] if len(ctx.node.args) > start else ctx.node.kwargs.get("size")
    raws = list(raw_arg) if isinstance(raw_arg, (list, tuple)) else list(ctx.node.args[start:])
    out = []
    for i, v in enumerate(vals):
        sv = syms[i] if isinstance(syms, (list, tuple)) and i < len(syms) else None
        is_node = i < len(raws) and isinstance(raws[i], torch.fx.Node)
        out.append(sv if is_node and isinstance(sv, sympy.Expr) else ctx.match(v))
    return tuple(out)


@register_op("arange", op_class=ELEMENTWISE, creation=True, samples=S.creation)
def _rule_arange(ctx: RuleContext):
    vals = [a for a in ctx.args]
    syms = [s if isinstance(s, sympy.Expr) else (sympy.sympify(v) if isinstance(v, (int, float)) else None)
            for v, s in zip(vals, ctx.sargs)]
    if len(vals) == 1:
        return (syms[0] if isinstance(ctx.node.args[0], torch.fx.Node) else ctx.match(len(ctx.out)),)
    if len(vals) >= 2 and all(isinstance(x, sympy.Expr) for x in syms[:2]) and (len(vals) == 2 or vals[2] == 1):
        return (syms[1] - syms[0],)
    raise NoRule("arange form")


# ----------------------------------------------------------------------------------------------
# random draws


def _size_arg(ctx: RuleContext, start: int) -> int | None:
    """The position of a call's size list: the first sequence argument from ``start`` on."""
    for i in range(start, len(ctx.args)):
        if isinstance(ctx.args[i], (list, tuple, torch.Size)):
            return i
    return None


def _sizes(ctx: RuleContext, i: int | None) -> tuple:
    """Symbolic sizes of a size list at position ``i`` (else keyword ``size``): a size computed in the
    graph keeps its expression, a literal is matched to the named dim of that example value."""
    vals = ctx.args[i] if i is not None else ctx.kwargs.get("size")
    syms = ctx.sargs[i] if i is not None else ctx.skwargs.get("size")
    raws = ctx.node.args[i] if i is not None else ctx.node.kwargs.get("size")
    if not isinstance(vals, (list, tuple, torch.Size)):
        raise NoRule("no size list")
    syms = list(syms) if isinstance(syms, (list, tuple)) else [None] * len(vals)
    raws = list(raws) if isinstance(raws, (list, tuple)) else [None] * len(vals)
    return tuple(s if isinstance(r, torch.fx.Node) and isinstance(s, sympy.Expr) else ctx.match(int(v))
                 for v, s, r in zip(vals, syms, raws))


def _count(ctx: RuleContext, i: int, name: str) -> sympy.Expr:
    """An integer count argument: its expression when computed in the graph, else matched by value."""
    raw = ctx.node.args[i] if i < len(ctx.node.args) else ctx.node.kwargs.get(name)
    s = ctx.sarg(i, name)
    return s if isinstance(raw, torch.fx.Node) and isinstance(s, sympy.Expr) else ctx.match(int(ctx.arg(i, name)))


@register_op("uniform_", "normal_", "exponential_", "random_", "cauchy_", "geometric_", "log_normal_",
             op_class=ELEMENTWISE, creation=True, random=True, samples=S.random)
@register_op("randint_like", op_class=ELEMENTWISE, creation=True, random=True, samples=S.random)
@register_op("bernoulli_", "poisson", "rrelu", "rrelu_", "feature_dropout", "alpha_dropout_", "feature_alpha_dropout_",
             "dropout1d", "dropout2d", "dropout3d", op_class=ELEMENTWISE, flops_per_element=1, random=True,
             samples=S.random)
def _rule_draw_like_first(ctx: RuleContext):
    """The first input's shape (an in-place fill, a dropout, a draw per element of its rates)."""
    return ctx.tshape(0)[1]


@register_op("binomial", op_class=ELEMENTWISE, flops_per_element=1, random=True, samples=S.random)
@register_op("normal", op_class=ELEMENTWISE, flops_per_element=1, random=True, samples=S.random)
def _rule_draw_broadcast(ctx: RuleContext):
    """Tensor parameters broadcast (``normal(mean, std)``, ``binomial(count, prob)``); with numbers
    only, ``normal(mean, std, size)`` has the sizes given."""
    pairs = tensor_pairs(ctx)
    return broadcast(pairs) if pairs else _sizes(ctx, _size_arg(ctx, 2))


@register_op("randint", op_class=ELEMENTWISE, creation=True, random=True, samples=S.random)
def _rule_randint(ctx: RuleContext):
    """``randint([low,] high, size)``: the sizes given."""
    return _sizes(ctx, _size_arg(ctx, 1))


@register_op("randperm", op_class=ELEMENTWISE, creation=True, random=True, samples=S.random)
def _rule_randperm(ctx: RuleContext):
    """``randperm(n)``: ``(n,)``."""
    return (_count(ctx, 0, "n"),)


@register_op("multinomial", op_class=ELEMENTWISE, flops_per_element=1, random=True, samples=S.random)
def _rule_multinomial(ctx: RuleContext):
    """``multinomial(probs [..., K], n)``: ``[..., n]`` indices."""
    _, s = ctx.tshape(0)
    return tuple(s[:-1]) + (_count(ctx, 1, "num_samples"),)


@register_op(draw_dropout_seed, name="foldcompile.draw_dropout_seed", op_class=ELEMENTWISE, creation=True,
             random=True, samples=lambda: [((torch.randn(3, 4),), {})])
def _rule_dropout_state(ctx: RuleContext):
    """The generated kernels' dropout state ``[seed, offset]``: two int64 words, whatever the input."""
    return (sympy.Integer(2),)
