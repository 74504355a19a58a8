"""Registry entries of the reductions over dims: sum, mean, max, var, logsumexp, norms.

FLOPs are per *input* element (``flops_per_element``). ``torch.max(a, b)`` of two tensors is
element-wise (its ``classify``). The rule contract is in :mod:`foldcompile.passes.shape_rules`.

    >>> import torch
    >>> from foldcompile.passes.registry import lookup
    >>> lookup(torch.sum).op_class, lookup(torch.var).flops_per_element
    ('REDUCTION', 3)
"""
from __future__ import annotations

from typing import Any

import sympy
import torch
import torch.fx

from foldcompile.passes import op_samples as S
from foldcompile.passes.registry import ELEMENTWISE, REDUCTION, register_op
from foldcompile.passes.shape_rules import RuleContext, broadcast, norm_dim, tensor_pairs

__all__: list[str] = []


def _tensor_arg(a: Any) -> bool:
    return isinstance(a, torch.fx.Node) and a.meta.get("shape") is not None


def _class_max_min(node: torch.fx.Node, mask_only: bool) -> str:
    """``torch.max(a, b)`` of two tensors is element-wise; ``max(x, dim)`` a reduction."""
    return ELEMENTWISE if len(node.args) > 1 and _tensor_arg(node.args[1]) else REDUCTION


@register_op(*"sum mean amax amin prod all any argmax argmin".split(), op_class=REDUCTION, flops_per_element=1,
             torch_spelling=True, samples=S.reduce)
@register_op("max", "min", op_class=REDUCTION, flops_per_element=1, torch_spelling=True, classify=_class_max_min,
             samples=S.reduce)
@register_op("nansum", op_class=REDUCTION, flops_per_element=1, samples=S.reduce)
@register_op("var", "std", op_class=REDUCTION, flops_per_element=3, torch_spelling=True, samples=S.reduce)
@register_op("logsumexp", op_class=REDUCTION, flops_per_element=4, torch_spelling=True, samples=S.reduce)
def _rule_reduce(ctx: RuleContext):
    in_c, s = ctx.tshape(0)
    d = ctx.arg(1, "dim")
    if isinstance(d, torch.Tensor):  # torch.max(a, b): element-wise
        return broadcast(tensor_pairs(ctx))
    if ctx.prop.op_name(ctx.node) in ("var", "std"):  # var(x, dim, unbiased, keepdim)
        keep = bool(ctx.arg(3, "keepdim", False))
    else:
        keep = bool(ctx.arg(2, "keepdim", False))
    if d is None:
        dims = set(range(len(in_c)))
    else:
        ds = [d] if isinstance(d, int) else list(d)
        dims = {norm_dim(int(x), len(in_c)) for x in ds}
    out = tuple(sympy.Integer(1) if i in dims else x for i, x in enumerate(s) if keep or i not in dims)
    if isinstance(ctx.out, tuple):  # (values, indices)
        return (out, out)
    return out


@register_op("linalg_vector_norm", op_class=REDUCTION, flops_per_element=2, samples=S.reduce)
@register_op("norm", op_class=REDUCTION, flops_per_element=2, torch_spelling=True, samples=S.reduce)
def _rule_vector_norm(ctx: RuleContext):
    # linalg_vector_norm(x, ord=2, dim=None, keepdim=False) and norm(x, p, dim, keepdim): dim and
    # keepdim sit one place later than in sum
    in_c, s = ctx.tshape(0)
    d, keep = ctx.arg(2, "dim"), bool(ctx.arg(3, "keepdim", False))
    dims = set(range(len(in_c))) if d is None else {norm_dim(int(x), len(in_c))
                                                     for x in ([d] if isinstance(d, int) else d)}
    return tuple(sympy.Integer(1) if i in dims else x for i, x in enumerate(s) if keep or i not in dims)
