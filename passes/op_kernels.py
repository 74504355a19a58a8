"""Registry entries of foldcompile's own kernels as ``torch.library`` ops
(:mod:`foldcompile.kernels.ops`): the fused attention is a GEMM (its two products, as SDPA's), and so
is the outer product mean (the outer product over the sequences, then the projection); the layer
norm and the softmax reductions with the same FLOPs per element as the torch ops.

    >>> import torch
    >>> from foldcompile.passes.registry import lookup
    >>> lookup(torch.ops.foldcompile.attention.default).op_class
    'GEMM'
"""
from __future__ import annotations

import torch

import foldcompile.kernels.ops  # noqa: F401  (defines torch.ops.foldcompile.*)
from foldcompile.passes.registry import GEMM, REDUCTION, register_op
from foldcompile.passes.shape_rules import RuleContext

__all__: list[str] = []

_K = torch.ops.foldcompile


def _x(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(len(shape) + sum(shape)))


def _gemm_class(node: torch.fx.Node, mask_only: bool) -> str:
    return GEMM


@register_op(_K.attention.default, name="foldcompile.attention", op_class=GEMM, gemm=True, fusible="kernel",
             classify=_gemm_class,
             samples=lambda: [((_x(2, 5, 8), _x(2, 7, 8), _x(2, 7, 8)), {}),
                              ((_x(3, 2, 5, 8), _x(3, 2, 7, 8), _x(3, 2, 7, 8), _x(1, 2, 5, 7)), {})])
def _rule_attention(ctx: RuleContext):
    """The queries' shape (the products' FLOPs come from the einsum pair written by normalize)."""
    return ctx.tshape(0, "q")[1]


@register_op(_K.layer_norm.default, name="foldcompile.layer_norm", op_class=REDUCTION, flops_per_element=8,
             fusible="kernel", samples=lambda: [((_x(5, 7, 3), _x(3), _x(3)), {})])
@register_op(_K.softmax.default, name="foldcompile.softmax", op_class=REDUCTION, flops_per_element=5,
             fusible="kernel", samples=lambda: [((_x(5, 7, 3), -1), {}), ((_x(5, 7, 3), 1, 0.5, _x(7, 1)), {})])
def _rule_same_as_input(ctx: RuleContext):
    """The input's shape."""
    return ctx.tshape(0, "x")[1]


@register_op(_K.outer_product_mean.default, name="foldcompile.outer_product_mean", op_class=GEMM, gemm=True,
             fusible="kernel", classify=_gemm_class,
             samples=lambda: [((_x(5, 7, 4), _x(5, 9, 3), _x(6, 12)), {}),
                              ((_x(2, 5, 7, 4), _x(2, 5, 7, 3), _x(6, 12), _x(6)), {})])
def _rule_outer_product_mean(ctx: RuleContext):
    """``[..., I, J, Z]``: a's leading dims and residues, b's residues, the weight's output channels (the
    two products' FLOPs come from the einsum pair written by normalize)."""
    a, b, w = ctx.tshape(0, "a")[1], ctx.tshape(1, "b")[1], ctx.tshape(2, "weight")[1]
    return (*a[:-3], a[-2], b[-2], w[0])
