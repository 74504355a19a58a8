"""Registry entries of the matrix products: linear, matmul, bmm, mm, addmm, baddbmm, einsum, SDPA.

Their FLOPs come from the einsum equation normalize writes (``gemm=True``,
:mod:`foldcompile.passes.einsum`); a product of mask values only is a REDUCTION (a count of
unmasked pairs), an einsum without a contracted letter element-wise or a layout. The rule
contract is in :mod:`foldcompile.passes.shape_rules`.

    >>> import torch
    >>> from foldcompile.passes.registry import lookup
    >>> e = lookup(torch.nn.functional.linear)
    >>> e.op_class, e.gemm
    ('GEMM', True)
"""
from __future__ import annotations

import torch
import torch.fx

from foldcompile.passes import op_samples as S
from foldcompile.passes.einsum import einsum_operands, letter_sizes, parse
from foldcompile.passes.meta import rank_of
from foldcompile.passes.registry import ELEMENTWISE, GEMM, LAYOUT, REDUCTION, register_op
from foldcompile.passes.shape_rules import RuleContext, broadcast

__all__: list[str] = []


def _class_gemm(node: torch.fx.Node, mask_only: bool) -> str:
    """A matrix product of mask values only counts unmasked pairs: a REDUCTION, not model GEMM work."""
    return REDUCTION if mask_only else GEMM


def _class_einsum(node: torch.fx.Node, mask_only: bool) -> str:
    """Two or more operands: a GEMM when a letter is contracted, else element-wise (an outer or
    Hadamard product); one operand: a REDUCTION when it sums a letter, else a LAYOUT (a permutation)."""
    eq, ops = einsum_operands(node.args)
    c = parse(eq, [rank_of(o) for o in ops])
    if len(ops) >= 2:
        return _class_gemm(node, mask_only) if c.contracted else ELEMENTWISE
    return REDUCTION if c.contracted else LAYOUT


@register_op("linear", op_class=GEMM, gemm=True, classify=_class_gemm, samples=S.gemm)
def _rule_linear(ctx: RuleContext):
    _, sx = ctx.tshape(0)
    _, sw = ctx.tshape(1, "weight")
    return tuple(sx[:-1]) + (sw[0],)


@register_op("matmul", "bmm", "mm", op_class=GEMM, gemm=True, torch_spelling=True, classify=_class_gemm,
             samples=S.gemm)
@register_op("addmm", "baddbmm", op_class=GEMM, gemm=True, classify=_class_gemm, samples=S.gemm)
def _rule_matmul(ctx: RuleContext):
    name = ctx.prop.op_name(ctx.node)
    off = 1 if name in ("addmm", "baddbmm", "addbmm") else 0
    ac, a = ctx.tshape(off, "mat1" if off else "input")
    bc, b = ctx.tshape(off + 1, "mat2" if off else "other")
    if len(ac) == 1 and len(bc) == 1:
        return ()
    if len(ac) == 1:
        return tuple(b[:-2]) + (b[-1],)
    if len(bc) == 1:
        return tuple(a[:-1])
    batch = broadcast([(ac[:-2], a[:-2]), (bc[:-2], b[:-2])])
    return batch + (a[-2], b[-1])

@register_op("einsum", op_class=GEMM, gemm=True, flops_per_element=1, classify=_class_einsum, samples=S.gemm)
def _rule_einsum(ctx: RuleContext):
    eq, ops = einsum_operands(ctx.args)
    _, sops = einsum_operands(ctx.sargs)
    c = parse(eq, [o.dim() for o in ops])
    sizes = letter_sizes(c.inputs, sops, [tuple(o.shape) for o in ops])
    return tuple(sizes[ch] for ch in c.output)


@register_op("scaled_dot_product_attention", op_class=GEMM, gemm=True, classify=_class_gemm,
             samples=S.gemm)
def _rule_sdpa(ctx: RuleContext):
    _, q = ctx.tshape(0, "query")
    _, v = ctx.tshape(2, "value")
    return tuple(q[:-1]) + (v[-1],)
