"""The element-wise generator's op vocabulary, as data: one ``_Rule`` per op.

Each rule gives the op's Triton expression, its adjoint expression per operand and its
plain-PyTorch meaning. Adding an op is one rule here plus its spellings in
``elementwise_lowering`` (``_FUNCTIONS`` / ``_METHODS``). Part of the generator behind
``foldcompile.kernels.elementwise`` (see ``elementwise_codegen`` for the map).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F


class UnsupportedElementwiseOp(ValueError):
    """A graph node is not an element-wise op this generator can fuse (the message names it)."""


# ---------------------------------------------------------------------------------
# Op rules: the whole op vocabulary, as data
# ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Rule:
    """One element-wise op.

    ``arg_kinds``: per operand, "f" (float) or "b" (bool). ``triton``: the forward
    expression, with ``{0}``, ``{1}``.. for operands and ``{keep}`` for dropout's
    keep-mask. ``grads``: per operand, the adjoint contribution given the upstream
    gradient ``{g}`` and the op's output ``{y}``, or None (not differentiable).
    ``torch``: the same op in PyTorch, for the reference.
    """

    arg_kinds: str
    result_kind: str
    triton: str
    grads: tuple[str | None, ...]
    torch: Callable[..., Any]


_SQRT1_2 = "0.7071067811865476"
_INV_SQRT_2PI = "0.3989422804014327"
_SQRT_2_OVER_PI = "0.7978845608028654"
_TANH_INNER = f"{_SQRT_2_OVER_PI} * ({{0}} + 0.044715 * {{0}} * {{0}} * {{0}})"
# gelu_tanh(x) = 0.5 x (1 + tanh(z)) = x sigmoid(2z): the sigmoid form has no 1 + tanh(z)
# cancellation for negative x (fp32 tanh(z) rounds to -1 there long before x sigmoid(2z) is 0).
_SIG_2INNER = f"tl.sigmoid(2.0 * ({_TANH_INNER}))"

_RULES: dict[str, _Rule] = {
    "add": _Rule("ff", "f", "{0} + {1}", ("{g}", "{g}"), operator.add),
    "sub": _Rule("ff", "f", "{0} - {1}", ("{g}", "-{g}"), operator.sub),
    "mul": _Rule("ff", "f", "{0} * {1}", ("{g} * {1}", "{g} * {0}"), operator.mul),
    "div": _Rule("ff", "f", "{0} / {1}", ("{g} / {1}", "-{g} * ({y} / {1})"), operator.truediv),
    "neg": _Rule("f", "f", "-{0}", ("-{g}",), operator.neg),
    "sigmoid": _Rule("f", "f", "tl.sigmoid({0})", ("{g} * {y} * (1.0 - {y})",), torch.sigmoid),
    # Special values follow eager PyTorch (checked in tests/kernels/test_elementwise_special.py):
    # relu(NaN) = NaN and its gradient there is g (eager's threshold_backward zeroes only
    # where the result is <= 0); -0.0 stays -0.0.
    "relu": _Rule("f", "f", "tl.where({0} < 0.0, 0.0, {0})", ("tl.where({0} <= 0.0, 0.0, {g})",), torch.relu),
    # silu(x) = x s(x); d/dx = s (1 + x (1 - s)), eager's formula (the same NaN at x = ±inf).
    "silu": _Rule("f", "f", "{0} * tl.sigmoid({0})", ("{g} * (tl.sigmoid({0}) * (1.0 + {0} * (1.0 - tl.sigmoid({0}))))",),
                  F.silu),
    "gelu": _Rule("f", "f", f"0.5 * {{0}} * (1.0 + tl.math.erf({{0}} * {_SQRT1_2}))",
                  (f"{{g}} * (0.5 * (1.0 + tl.math.erf({{0}} * {_SQRT1_2}))"
                   f" + {{0}} * {_INV_SQRT_2PI} * tl.exp(-0.5 * {{0}} * {{0}}))",), F.gelu),
    # d/dx x s(2z) = s + x s (1 - s) 2 z', z' = sqrt(2/pi) (1 + 3 * 0.044715 x^2).
    "gelu_tanh": _Rule("f", "f", f"{{0}} * {_SIG_2INNER}",
                       (f"{{g}} * ({_SIG_2INNER} + {{0}} * {_SIG_2INNER} * (1.0 - {_SIG_2INNER}) * 2.0"
                        f" * {_SQRT_2_OVER_PI} * (1.0 + 0.134145 * {{0}} * {{0}}))",),
                       lambda a: F.gelu(a, approximate="tanh")),
    # _fc_tanh is defined in every generated module (_HEADER): tl has no tanh that runs in the
    # interpreter and on every GPU, and 2 sigmoid(2x) - 1 loses all relative accuracy near 0.
    "tanh": _Rule("f", "f", "_fc_tanh({0})", ("{g} * (1.0 - {y} * {y})",), torch.tanh),
    # Eager's abs gradient is g * sign(x), sign(NaN) = 0: a product, so a NaN g still gives NaN.
    "abs": _Rule("f", "f", "tl.abs({0})", ("{g} * tl.where({0} > 0.0, 1.0, tl.where({0} < 0.0, -1.0, 0.0))",),
                 torch.abs),
    "exp": _Rule("f", "f", "tl.exp({0})", ("{g} * {y}",), torch.exp),
    "log": _Rule("f", "f", "tl.log({0})", ("{g} / {0}",), torch.log),
    "sqrt": _Rule("f", "f", "tl.sqrt({0})", ("{g} * 0.5 / {y}",), torch.sqrt),
    "rsqrt": _Rule("f", "f", "tl.rsqrt({0})", ("{g} * -0.5 * {y} * {y} * {y}",), torch.rsqrt),
    "where": _Rule("bff", "f", "tl.where({0}, {1}, {2})", (None, "tl.where({0}, {g}, 0.0)", "tl.where({0}, 0.0, {g})"),
                   torch.where),
    "masked_fill": _Rule("fbf", "f", "tl.where({1}, {2}, {0})",
                         ("tl.where({1}, 0.0, {g})", None, "tl.where({1}, {g}, 0.0)"),
                         lambda x, m, v: x.masked_fill(m, v)),
    # operands: x, p, scale; {keep} is tl.rand(seed, counter) >= p, drawn by the generator.
    # A multiply by 0 at dropped elements, not a select: torch's dropout is x * mask * scale, so a
    # dropped NaN or ±inf gives NaN (0 * NaN), and so does a NaN upstream gradient there.
    "dropout": _Rule("fff", "f", "{0} * tl.where({keep}, {2}, 0.0)", ("{g} * tl.where({keep}, {2}, 0.0)", None, None),
                     None),
    "cast": _Rule("f", "f", "{0}", ("{g}",), None),
    "gt": _Rule("ff", "b", "{0} > {1}", (None, None), operator.gt),
    "ge": _Rule("ff", "b", "{0} >= {1}", (None, None), operator.ge),
    "lt": _Rule("ff", "b", "{0} < {1}", (None, None), operator.lt),
    "le": _Rule("ff", "b", "{0} <= {1}", (None, None), operator.le),
    "logical_not": _Rule("b", "b", "{0} == 0", (None,), torch.logical_not),
    "logical_and": _Rule("bb", "b", "{0} & {1}", (None, None), torch.logical_and),
    "logical_or": _Rule("bb", "b", "{0} | {1}", (None, None), torch.logical_or),
}

# Casts whose target is narrower than the fp32 registers values are computed in: the
# generated code rounds through the target type (see _gen_kernel).
_ROUNDING_CASTS: dict[torch.dtype, str] = {torch.float16: "tl.float16", torch.bfloat16: "tl.bfloat16"}

# Casting a float to bool is "!= 0": its own tiny rule.
_RULES["ne0"] = _Rule("f", "b", "{0} != 0.0", (None,), lambda a: a != 0)
