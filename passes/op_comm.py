"""Registry entries of the collectives (``torch.ops._c10d_functional``): class COMM, no FLOPs,
shape rules in the split sizes and group size, so a sharded graph is annotated on fake tensors.

    >>> import torch
    >>> from foldcompile.passes.registry import lookup
    >>> lookup(torch.ops._c10d_functional.all_to_all_single.default).op_class
    'COMM'
"""
from __future__ import annotations

import sympy
import torch
import torch.distributed as dist

from foldcompile.passes.registry import COMM, register_op
from foldcompile.passes.shape_rules import RuleContext

__all__: list[str] = []

_C = torch.ops._c10d_functional


def _group() -> str:
    """The default group's name (the registry tests run a one-process gloo group)."""
    return dist.distributed_c10d._get_default_group().group_name


def _x() -> torch.Tensor:
    return torch.randn(6, 5, generator=torch.Generator().manual_seed(0))


def _split_total(ctx: RuleContext, i: int, name: str) -> sympy.Expr:
    """The sum of a collective's split sizes. Literal splits (a sharding pass writes them at the
    example sizes, uneven where the dim does not divide) total the named dim of that example
    value, the way literal view sizes are read; splits computed in the graph keep their expressions."""
    vals, syms = ctx.arg(i, name), ctx.sarg(i, name)
    syms = list(syms) if isinstance(syms, (list, tuple)) else [None] * len(vals)
    if all(not isinstance(s, sympy.Expr) or s.is_Integer for s in syms):
        return ctx.match(sum(int(v) for v in vals))
    return sympy.Add(*[s if isinstance(s, sympy.Expr) else sympy.Integer(int(v)) for v, s in zip(vals, syms)])


@register_op(_C.all_to_all_single.default, name="all_to_all_single", op_class=COMM,
             samples=lambda: [((_x(), [6], [6], _group()), {})])
def _rule_all_to_all_single(ctx: RuleContext):
    """Dim 0 becomes the sum of the output split sizes (uneven splits allowed)."""
    _, s = ctx.tshape(0)
    return (_split_total(ctx, 1, "output_split_sizes"),) + tuple(s[1:])


@register_op(_C.all_gather_into_tensor.default, name="all_gather_into_tensor", op_class=COMM,
             samples=lambda: [((_x(), 1, _group()), {})])
def _rule_all_gather(ctx: RuleContext):
    """Dim 0 grows by the group size."""
    _, s = ctx.tshape(0)
    g = ctx.sarg(1, "group_size")
    return (s[0] * (g if isinstance(g, sympy.Expr) else sympy.Integer(int(ctx.arg(1, "group_size")))),) + tuple(s[1:])


@register_op(_C.reduce_scatter_tensor.default, name="reduce_scatter_tensor", op_class=COMM,
             samples=lambda: [((_x(), "sum", 1, _group()), {})])
def _rule_reduce_scatter(ctx: RuleContext):
    """Dim 0 shrinks by the group size."""
    _, s = ctx.tshape(0)
    g = ctx.sarg(2, "group_size")
    return (s[0] / (g if isinstance(g, sympy.Expr) else sympy.Integer(int(ctx.arg(2, "group_size")))),) + tuple(s[1:])


@register_op(_C.all_reduce.default, name="all_reduce", op_class=COMM,
             samples=lambda: [((_x(), "sum", _group()), {})])
@register_op(_C.broadcast.default, name="broadcast", op_class=COMM, samples=lambda: [((_x(), 0, _group()), {})])
@register_op(_C.wait_tensor.default, name="wait_tensor", op_class=COMM, samples=lambda: [((_x(),), {})])
def _rule_same_shape(ctx: RuleContext):
    """The input's shape."""
    return ctx.tshape(0)[1]
