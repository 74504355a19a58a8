"""Registry entries of the ops that create tensors: zeros, ones, full, arange, eye, one_hot, tensor.

Their values never depend on an input's values (``creation``); sizes written as literals are
matched to the named dims by value (``size_arg`` records which argument holds them, so shape
propagation writes their symbolic meaning into ``meta["sym_args"]``). The rule contract is in
:mod:`foldcompile.passes.shape_rules`.

    >>> import torch
    >>> from foldcompile.passes.registry import lookup
    >>> e = lookup(torch.zeros)
    >>> e.op_class, e.creation, e.size_arg
    ('ELEMENTWISE', True, 0)
"""
from __future__ import annotations

import sympy
import torch
import torch.fx

from foldcompile.passes import op_samples as S
from foldcompile.passes.registry import ELEMENTWISE, register_op
from foldcompile.passes.shape_rules import NoRule, RuleContext

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
@register_op("rand", "randn", op_class=ELEMENTWISE, creation=True, size_arg=0, samples=S.creation)
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
