"""Registry entries of the element-wise ops and of the ops whose output has their first input's shape.

Element-wise arithmetic broadcasts its tensor operands (``_rule_pointwise``; on Python numbers it is
integer arithmetic on sizes, ``x.shape[0] // 2``); casts, copies, softmax, layer norm, cumulative
sums and ``triu`` keep the first input's shape (``_rule_same_as_first``). The rule contract is in
:mod:`foldcompile.passes.shape_rules`.

    >>> import torch
    >>> from foldcompile.passes.registry import lookup
    >>> e = lookup(torch.sigmoid)
    >>> e.op_class, e.flops_per_element, e.fusible
    ('ELEMENTWISE', 1, 'pointwise')
"""
from __future__ import annotations

import operator
from typing import Callable

import sympy
import torch

from foldcompile.passes import op_samples as S
from foldcompile.passes.registry import ELEMENTWISE, LAYOUT, REDUCTION, register_op
from foldcompile.passes.shape_rules import NoRule, RuleContext, broadcast, tensor_pairs

__all__: list[str] = []


@register_op(*"""add sub mul div neg abs exp log sqrt rsqrt sigmoid tanh relu masked_fill lt le gt ge logical_and
    logical_or logical_not""".split(), op_class=ELEMENTWISE, flops_per_element=1, torch_spelling=True,
             fusible="pointwise", samples=S.pointwise)
@register_op(*"""pow erf sin cos reciprocal square clamp clamp_min clamp_max eq ne sign nan_to_num
    exp2""".split(), op_class=ELEMENTWISE, flops_per_element=1, torch_spelling=True, samples=S.pointwise)
@register_op(*"truediv true_divide gelu silu where and_ or_ invert".split(), op_class=ELEMENTWISE,
             flops_per_element=1, fusible="pointwise", samples=S.pointwise)
@register_op("dropout", op_class=ELEMENTWISE, flops_per_element=1, random=True, fusible="pointwise",
             samples=S.pointwise)
@register_op(*"""floordiv mod rsub log1p relu_ elu leaky_relu softplus maximum minimum
    floor ceil round trunc sub_ add_ mul_ div_ iadd imul isub itruediv bitwise_and bitwise_or
    bitwise_not logsigmoid masked_fill_ lerp addcmul addcdiv hardtanh threshold""".split(), op_class=ELEMENTWISE,
             flops_per_element=1, samples=S.pointwise)
@register_op("dropout_", "alpha_dropout", "feature_alpha_dropout", op_class=ELEMENTWISE, flops_per_element=1,
             random=True, samples=S.pointwise)
@register_op("isnan", "isinf", op_class=ELEMENTWISE, flops_per_element=1, torch_spelling=True, samples=S.pointwise)
@register_op("fill_", "zero_", "copy_", op_class=ELEMENTWISE, flops_per_element=0, samples=S.pointwise)
def _rule_pointwise(ctx: RuleContext):
    if not isinstance(ctx.out, torch.Tensor):
        return _rule_int_arith(ctx)
    pairs = tensor_pairs(ctx)
    if not pairs:
        raise NoRule("no tensor operand")
    return broadcast(pairs)


@register_op("float", "half", "bfloat16", "bool", "to", op_class=ELEMENTWISE, fusible="pointwise",
             samples=S.same_as_first)
@register_op(*"double int long type type_as cpu requires_grad_".split(), op_class=ELEMENTWISE,
             samples=S.same_as_first)
@register_op("rand_like", "randn_like", op_class=ELEMENTWISE, random=True, samples=S.same_as_first)
@register_op("zeros_like", "ones_like", "empty_like", "full_like", op_class=ELEMENTWISE, creation=True,
             samples=S.same_as_first)
@register_op("bernoulli", op_class=ELEMENTWISE, flops_per_element=1, random=True, samples=S.same_as_first)
@register_op("contiguous", "clone", "detach", op_class=LAYOUT, samples=S.same_as_first)
@register_op("triu", "tril", "flip", "roll", op_class=LAYOUT, torch_spelling=True, samples=S.same_as_first)
@register_op("cumsum", op_class=REDUCTION, flops_per_element=1, torch_spelling=True, samples=S.same_as_first)
@register_op("cumprod", op_class=REDUCTION, flops_per_element=1, samples=S.same_as_first)
@register_op("normalize", "rms_norm", op_class=REDUCTION, flops_per_element=4, samples=S.same_as_first)
@register_op("softmax", op_class=REDUCTION, flops_per_element=5, torch_spelling=True, fusible="kernel",
             samples=S.same_as_first)
@register_op("log_softmax", op_class=REDUCTION, flops_per_element=5, torch_spelling=True, samples=S.same_as_first)
@register_op("_softmax", op_class=REDUCTION, flops_per_element=5, samples=S.same_as_first)
@register_op("layer_norm", op_class=REDUCTION, flops_per_element=8, fusible="kernel", samples=S.same_as_first)
@register_op("group_norm", op_class=REDUCTION, flops_per_element=8, samples=S.same_as_first)
def _rule_same_as_first(ctx: RuleContext):
    _, s = ctx.tshape(0)
    return s


# Python's integer operators on sizes (``x.shape[0] // 2``), by the callable, as sympy arithmetic
_INT_OPS: dict[Callable, Callable] = {
    operator.add: operator.add, operator.sub: operator.sub, operator.mul: operator.mul,
    operator.floordiv: lambda a, b: sympy.floor(a / b), operator.truediv: lambda a, b: a / b,
    operator.mod: lambda a, b: sympy.Mod(a, b), operator.neg: operator.neg, operator.pow: operator.pow,
}


def _rule_int_arith(ctx: RuleContext):
    if isinstance(ctx.out, bool) or ctx.out is None:
        return None  # a Python comparison (a tracer's assertion on a flag): no size to derive
    fn = _INT_OPS.get(ctx.node.target) if ctx.node.op == "call_function" else None
    if fn is None or not isinstance(ctx.out, (int, float)) or isinstance(ctx.out, bool):
        raise NoRule("not integer arithmetic")
    operands = []
    for v, s in zip(ctx.args, ctx.sargs):
        if isinstance(s, sympy.Expr):
            operands.append(s)
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            operands.append(sympy.sympify(v))
        else:
            raise NoRule("non-numeric operand")
    return sympy.sympify(fn(*operands))
