"""The symbolic-shape rule contract, and the helpers the rule families share.

The rules themselves live with their ops' registry entries, one module per op family:
:mod:`~foldcompile.passes.op_pointwise` (element-wise and same-shape ops),
:mod:`~foldcompile.passes.op_layout` (views, indexing, joins, splits),
:mod:`~foldcompile.passes.op_reduction`, :mod:`~foldcompile.passes.op_gemm`,
:mod:`~foldcompile.passes.op_creation` (and the random ops),
:mod:`~foldcompile.passes.op_comm` (collectives) and :mod:`~foldcompile.passes.op_kernels`
(foldcompile's own ``torch.library`` ops).

``shape_prop_pass`` (:mod:`foldcompile.passes.shape_prop`) runs the graph and, for every
``call_function`` / ``call_method`` node, applies the shape rule of the node's registry entry
(:func:`foldcompile.passes.registry.entry_of`: ``torch.reshape``, ``torch.Tensor.view`` and
``x.view(...)`` find their entries by callable). Each rule carries ``@register_op`` decorators
that register the ops it serves with their other facts (class, FLOPs per element, the
spelling normalize writes, sample inputs).

The rule contract
-----------------
A rule is a function ``rule(ctx: RuleContext) -> sym``. It receives, in ``ctx``:

- ``ctx.node``: the fx node (read it, never change it);
- ``ctx.args`` / ``ctx.kwargs``: the *concrete* arguments the op was just called with
  (tensors, ints, slices, ...), and ``ctx.out``: the concrete result;
- ``ctx.sargs`` / ``ctx.skwargs``: the same arguments *symbolically*: a tensor argument is
  the tuple of its sizes as sympy expressions over named dims (``(N_seq, N_res, 16)``),
  an integer computed in the graph (``x.shape[0] // 2``) is its expression, a literal
  int is a ``sympy.Integer``, lists and tuples are mapped item by item, anything else
  is ``None``;
- ``ctx.prop``: the running pass, seen through :class:`SymEnv` (``sym_of``,
  ``match_value``, ``example_subs``, ``op_name``);
- helpers: ``arg``/``sarg`` (positional-or-keyword lookup), ``tshape`` (concrete and
  symbolic shape of a tensor argument), ``size_list`` (size varargs or one sequence),
  ``match`` (a literal size to the named dim with that example value, else the int).

It returns the output's sizes, shaped like the output:

- a tensor: a tuple with one sympy expression per dim (``()`` for a scalar);
- several tensors (``split``, ``unbind``, ``max(x, dim)``): a tuple of such tuples;
- an integer (``size(x, 0)``, ``a // b``): one sympy expression;
- a size list (``x.shape``, ``x.size()``): a list of expressions;
- ``None`` where there is nothing to derive (a Python comparison, a flag).

It fails by raising :class:`NoRule` with a reason when the call form is not covered
(advanced indexing, ``arange`` with a float step, ...). The pass then falls back to
matching sizes by value and lists the node, with the reason, in its record
(``record["fallback"]``); ``TypeError``, ``ValueError``, ``IndexError``, ``KeyError`` and
``AttributeError`` raised in a rule are treated the same way, and so is ``None`` for
a tensor output. A ``PassError`` (a malformed einsum equation) stops the pass. Whatever a
rule returns is checked against the concrete result at the example dims, and a
mismatch raises ``PassError``: a wrong rule fails loudly, it never yields a wrong
expression. Rules are pure: they read ``ctx`` and return a value, nothing else.

Adding an op is one decorated function in its family's module (or one more name in a
decorator when an existing rule fits), e.g. in ``op_layout.py``::

    @register_op("unsqueeze", op_class=LAYOUT, torch_spelling=True, samples=S.layout)
    def _rule_unsqueeze(ctx):
        in_c, s = ctx.tshape(0)                              # concrete and symbolic input shape
        d = norm_dim(int(ctx.arg(1, "dim")), len(in_c) + 1)
        return tuple(s[:d]) + (sympy.Integer(1),) + tuple(s[d:])

The helpers::

    >>> import sympy
    >>> N = sympy.Symbol("N_res", positive=True, integer=True)
    >>> broadcast([((13, 1, 4), (N, 1, 4)), ((13, 4), (N, 4))]), numel_expr((N, N, 4)), norm_dim(-1, 3)
    ((N_res, N_res, 4), 4*N_res**2, 2)
"""
from __future__ import annotations

from typing import Any, Callable, Protocol, Sequence

import sympy
import torch
import torch.fx

__all__ = ["RuleContext", "NoRule", "SymEnv", "numel_expr", "norm_dim", "broadcast", "tensor_pairs"]


class SymEnv(Protocol):
    """What a rule may ask of the running pass (``ctx.prop``)."""

    example_subs: dict[sympy.Symbol, int]  # each named dim's symbol -> its example value
    op_name: Callable[[torch.fx.Node], str]  # the op's name (registry.op_name), for rules serving several ops

    def sym_of(self, a: Any) -> Any:
        """The symbolic value of an argument (a node's sizes or expression; an int as sympy)."""

    def match_value(self, v: int) -> sympy.Expr:
        """The named dim whose example value is ``v``, else ``sympy.Integer(v)``."""


class NoRule(Exception):
    """Raised by a rule whose call form it does not cover: the pass falls back to value matching."""


class RuleContext:
    """What a rule sees: concrete args, symbolic args, the concrete result (see the module docstring).

    ``args``/``kwargs`` are the node's arguments as the interpreter fetched them (concrete
    values); ``sargs``/``skwargs`` are built here from the node's own arguments through
    ``prop.sym_of``.
    """

    def __init__(self, prop: SymEnv, node: torch.fx.Node, args: Sequence[Any], kwargs: dict[str, Any],
                 out: Any) -> None:
        self.prop, self.node, self.args, self.kwargs, self.out = prop, node, args, dict(kwargs), out
        self.sargs = [prop.sym_of(a) for a in node.args]
        self.skwargs = {k: prop.sym_of(v) for k, v in node.kwargs.items()}

    def arg(self, i: int, name: str, default: Any = None) -> Any:
        """The concrete argument at position ``i``, else keyword ``name``, else ``default``."""
        if i < len(self.args):
            return self.args[i]
        return self.kwargs.get(name, default)

    def sarg(self, i: int, name: str, default: Any = None) -> Any:
        """The symbolic argument at position ``i``, else keyword ``name``, else ``default``."""
        if i < len(self.sargs):
            return self.sargs[i]
        return self.skwargs.get(name, default)

    def tshape(self, i: int, name: str = "input") -> tuple[tuple[int, ...], tuple[sympy.Expr, ...]]:
        """(concrete shape, symbolic shape) of tensor argument ``i``/``name``; ``NoRule`` if it is none."""
        t, s = self.arg(i, name), self.sarg(i, name)
        if not isinstance(t, torch.Tensor) or not isinstance(s, tuple):
            raise NoRule(f"argument {i} is not a tensor with a symbolic shape")
        return tuple(t.shape), s

    def size_list(self, start: int, name: str) -> tuple[list[int], list[Any]]:
        """Size arguments given as varargs (``x.view(a, b)``) or one sequence (``reshape(x, (a, b))``)."""
        vals = list(self.args[start:]) if len(self.args) > start else [self.kwargs.get(name)]
        syms = list(self.sargs[start:]) if len(self.args) > start else [self.skwargs.get(name)]
        if len(vals) == 1 and isinstance(vals[0], (list, tuple, torch.Size)):
            vals = list(vals[0])
            syms = list(syms[0]) if isinstance(syms[0], (list, tuple)) else [None] * len(vals)
        return [int(v) for v in vals], syms

    def match(self, value: int) -> sympy.Expr:
        """A literal size: the named dim with that example value, else the integer."""
        return self.prop.match_value(value)


# ----------------------------------------------------------------------------------------------
# helpers shared with other passes (re-exported by foldcompile.passes.shape_prop)


def numel_expr(sym_shape: Sequence[sympy.Expr]) -> sympy.Expr:
    """Product of a symbolic shape (1 for a scalar)."""
    return sympy.Mul(*[sympy.sympify(s) for s in sym_shape]) if len(sym_shape) else sympy.Integer(1)


# ----------------------------------------------------------------------------------------------
# helpers shared by the rule families


def norm_dim(d: int, ndim: int) -> int:
    """A dim index made non-negative (``-1`` of a rank-3 tensor is ``2``)."""
    return d + ndim if d < 0 else d


def broadcast(pairs: list[tuple[tuple[int, ...], tuple[sympy.Expr, ...]]]) -> tuple[sympy.Expr, ...]:
    """The broadcast symbolic shape of ``(concrete shape, symbolic shape)`` pairs, torch's rule: per
    trailing dim, the first operand whose size there is not 1 gives it."""
    ndim = max((len(c) for c, _ in pairs), default=0)
    out = []
    for k in range(ndim, 0, -1):
        chosen = sympy.Integer(1)
        for c, s in pairs:
            if k <= len(c) and c[-k] != 1:
                chosen = s[-k]
                break
        out.append(chosen)
    return tuple(out)


def tensor_pairs(ctx: RuleContext) -> list:
    """``(concrete shape, symbolic shape)`` of every tensor argument of the call, positional then keyword."""
    pairs = []
    for v, s in list(zip(ctx.args, ctx.sargs)) + [(ctx.kwargs[k], ctx.skwargs[k]) for k in ctx.kwargs]:
        if isinstance(v, torch.Tensor) and isinstance(s, tuple):
            pairs.append((tuple(v.shape), s))
    return pairs
