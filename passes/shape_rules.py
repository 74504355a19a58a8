"""Symbolic-shape rules, one function per op family, each registering its ops in the op registry.

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

Adding an op is one decorated function (or one more name in a decorator when an existing
rule fits), e.g.::

    @register_op("unsqueeze", op_class=LAYOUT, torch_spelling=True, samples=S.layout)
    def _rule_unsqueeze(ctx):
        in_c, s = ctx.tshape(0)                              # concrete and symbolic input shape
        d = _norm_dim(int(ctx.arg(1, "dim")), len(in_c) + 1)
        return tuple(s[:d]) + (sympy.Integer(1),) + tuple(s[d:])
"""
from __future__ import annotations

import operator
from typing import Any, Callable, Protocol, Sequence

import sympy
import torch
import torch.fx

from foldcompile.passes import op_samples as S
from foldcompile.passes.einsum import einsum_operands, letter_sizes, parse
from foldcompile.passes.registry import ELEMENTWISE, GEMM, LAYOUT, REDUCTION, register_op

__all__ = ["RuleContext", "NoRule", "SymEnv", "numel_expr"]


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
# per-node classes, for the ops whose class depends on the call (given to register_op as ``classify``)


def _tensor_arg(a: Any) -> bool:
    return isinstance(a, torch.fx.Node) and a.meta.get("shape") is not None


def _class_gemm(node: torch.fx.Node, mask_only: bool) -> str:
    """A matrix product of mask values only counts unmasked pairs: a REDUCTION, not model GEMM work."""
    return REDUCTION if mask_only else GEMM


def _class_max_min(node: torch.fx.Node, mask_only: bool) -> str:
    """``torch.max(a, b)`` of two tensors is element-wise; ``max(x, dim)`` a reduction."""
    return ELEMENTWISE if len(node.args) > 1 and _tensor_arg(node.args[1]) else REDUCTION


def _class_einsum(node: torch.fx.Node, mask_only: bool) -> str:
    """Two or more operands: a GEMM when a letter is contracted, else element-wise (an outer or
    Hadamard product); one operand: a REDUCTION when it sums a letter, else a LAYOUT (a permutation)."""
    eq, ops = einsum_operands(node.args)
    c = parse(eq, [len(o.meta["shape"]) for o in ops])
    if len(ops) >= 2:
        return _class_gemm(node, mask_only) if c.contracted else ELEMENTWISE
    return REDUCTION if c.contracted else LAYOUT


# ----------------------------------------------------------------------------------------------
# the rules


def _norm_dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def _broadcast(pairs: list[tuple[tuple[int, ...], tuple[sympy.Expr, ...]]]) -> tuple[sympy.Expr, ...]:
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


def _tensor_pairs(ctx: RuleContext) -> list:
    pairs = []
    for v, s in list(zip(ctx.args, ctx.sargs)) + [(ctx.kwargs[k], ctx.skwargs[k]) for k in ctx.kwargs]:
        if isinstance(v, torch.Tensor) and isinstance(s, tuple):
            pairs.append((tuple(v.shape), s))
    return pairs


@register_op(*"""add sub mul div neg abs exp log sqrt rsqrt sigmoid tanh relu masked_fill lt le gt ge logical_and
    logical_or logical_not""".split(), op_class=ELEMENTWISE, flops_per_element=1, torch_spelling=True,
             fusible="pointwise", samples=S.pointwise)
@register_op(*"""pow erf sin cos reciprocal square clamp clamp_min clamp_max eq ne sign nan_to_num
    exp2""".split(), op_class=ELEMENTWISE, flops_per_element=1, torch_spelling=True, samples=S.pointwise)
@register_op(*"truediv true_divide gelu silu where and_ or_ invert dropout".split(), op_class=ELEMENTWISE,
             flops_per_element=1, fusible="pointwise", samples=S.pointwise)
@register_op(*"""floordiv mod rsub log1p relu_ elu leaky_relu softplus maximum minimum dropout_ alpha_dropout
    feature_alpha_dropout floor ceil round trunc sub_ add_ mul_ div_ iadd imul isub itruediv bitwise_and bitwise_or
    bitwise_not logsigmoid masked_fill_ lerp addcmul addcdiv hardtanh threshold""".split(), op_class=ELEMENTWISE,
             flops_per_element=1, samples=S.pointwise)
@register_op("isnan", "isinf", op_class=ELEMENTWISE, flops_per_element=1, torch_spelling=True, samples=S.pointwise)
@register_op("fill_", "zero_", "copy_", op_class=ELEMENTWISE, flops_per_element=0, samples=S.pointwise)
def _rule_pointwise(ctx: RuleContext):
    if not isinstance(ctx.out, torch.Tensor):
        return _rule_int_arith(ctx)
    pairs = _tensor_pairs(ctx)
    if not pairs:
        raise NoRule("no tensor operand")
    return _broadcast(pairs)


@register_op("float", "half", "bfloat16", "bool", "to", op_class=ELEMENTWISE, fusible="pointwise",
             samples=S.same_as_first)
@register_op(*"double int long type type_as cpu requires_grad_ rand_like randn_like".split(),
             op_class=ELEMENTWISE, samples=S.same_as_first)
@register_op("zeros_like", "ones_like", "empty_like", "full_like", op_class=ELEMENTWISE, creation=True,
             samples=S.same_as_first)
@register_op("bernoulli", op_class=ELEMENTWISE, flops_per_element=1, samples=S.same_as_first)
@register_op("contiguous", "clone", "detach", op_class=LAYOUT, samples=S.same_as_first)
@register_op("triu", "tril", "flip", "roll", op_class=LAYOUT, torch_spelling=True, samples=S.same_as_first)
@register_op("cumsum", op_class=REDUCTION, flops_per_element=1, torch_spelling=True, samples=S.same_as_first)
@register_op("cumprod", op_class=REDUCTION, flops_per_element=1, samples=S.same_as_first)
@register_op("normalize", "rms_norm", op_class=REDUCTION, flops_per_element=4, samples=S.same_as_first)
@register_op("softmax", "log_softmax", op_class=REDUCTION, flops_per_element=5, torch_spelling=True,
             fusible="kernel", samples=S.same_as_first)
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


@register_op("size", op_class=LAYOUT, samples=S.shape_query)
def _rule_size(ctx: RuleContext):
    shape, s = ctx.tshape(0)
    d = ctx.arg(1, "dim")
    if d is None:
        return list(s)
    return s[_norm_dim(int(d), len(shape))]


@register_op("getattr", op_class=LAYOUT, samples=S.shape_query)
def _rule_getattr(ctx: RuleContext):
    attr = ctx.args[1]
    if attr == "shape" and isinstance(ctx.sargs[0], tuple):
        return list(ctx.sargs[0])
    if attr == "ndim":
        return sympy.Integer(ctx.out)
    return None


@register_op("dim", op_class=LAYOUT, samples=S.shape_query)
def _rule_dim(ctx: RuleContext):
    return sympy.Integer(ctx.out)


@register_op("numel", op_class=LAYOUT, samples=S.shape_query)
def _rule_numel(ctx: RuleContext):
    _, s = ctx.tshape(0)
    return numel_expr(s)


def _slice_len(sl: slice, ssl: tuple, L: sympy.Expr, Lc: int) -> sympy.Expr:
    start, stop, step = sl.start, sl.stop, sl.step
    sstart, sstop, sstep = ssl
    step = 1 if step is None else int(step)
    if step <= 0:
        raise NoRule("non-positive slice step")
    sstep = sympy.Integer(step) if sstep is None else sstep

    def norm(v, sv, default_c, default_s):
        if v is None:
            return default_c, default_s
        v = int(v)
        sv = sympy.Integer(v) if sv is None else sv
        if v < 0:
            vc, vs = v + Lc, L + sv
            if vc < 0:
                return 0, sympy.Integer(0)
            return vc, vs
        if v >= Lc:
            return Lc, L
        return v, sv

    c0, s0 = norm(start, sstart, 0, sympy.Integer(0))
    c1, s1 = norm(stop, sstop, Lc, L)
    if c1 <= c0:
        return sympy.Integer(0)
    return s1 - s0 if step == 1 else sympy.ceiling((s1 - s0) / sstep)


def _sym_slice(prop: SymEnv, sl: Any) -> tuple:
    if isinstance(sl, slice):
        return tuple(prop.sym_of(x) if isinstance(x, torch.fx.Node) else None for x in (sl.start, sl.stop, sl.step))
    return (None, None, None)


@register_op("getitem", op_class=LAYOUT, samples=S.layout)
def _rule_getitem(ctx: RuleContext):
    base, idx = ctx.args[0], ctx.args[1]
    sbase = ctx.sargs[0]
    if not isinstance(base, torch.Tensor):
        if isinstance(sbase, (list, tuple)):
            if isinstance(idx, int):
                return sbase[idx]
            if isinstance(idx, slice):
                return list(sbase[idx])
        raise NoRule("getitem on a non-tensor without symbols")
    raw_idx = ctx.node.args[1]
    items = list(idx) if isinstance(idx, tuple) else [idx]
    raw_items = list(raw_idx) if isinstance(raw_idx, tuple) else [raw_idx]
    if any(isinstance(i, (torch.Tensor, list)) or (isinstance(i, bool)) for i in items):
        raise NoRule("advanced indexing")
    shape, s = tuple(base.shape), sbase
    n_consume = sum(1 for i in items if i is not None and i is not Ellipsis)
    out: list[sympy.Expr] = []
    d = 0
    for i, raw in zip(items, raw_items):
        if i is None:
            out.append(sympy.Integer(1))
        elif i is Ellipsis:
            skip = len(shape) - n_consume
            out.extend(s[d:d + skip])
            d += skip
        elif isinstance(i, int):
            d += 1
        elif isinstance(i, slice):
            out.append(_slice_len(i, _sym_slice(ctx.prop, raw), s[d], shape[d]))
            d += 1
        else:
            raise NoRule(f"index {i!r}")
    out.extend(s[d:])
    return tuple(out)


def _factors(expr: sympy.Expr) -> list[sympy.Expr]:
    out: list[sympy.Expr] = []
    for f in sympy.Mul.make_args(expr):
        if f.is_Pow and f.exp.is_Integer and f.exp > 0:
            out.extend([f.base] * int(f.exp))
        elif f.is_Integer:
            out.extend([sympy.Integer(p) for p, k in sympy.factorint(int(f)).items() for _ in range(k)]
                       if f != 1 else [])
        else:
            out.append(f)
    return out


def _reshape_syms(ctx: RuleContext, in_c: tuple[int, ...], in_s: tuple, out_c: list[int],
                  out_known: list) -> tuple:
    """Symbolic output sizes of a reshape; ``out_known[i]`` is a sym (from a graph node) or None."""
    subs = ctx.prop.example_subs
    unknown = [i for i, k in enumerate(out_known) if k is None]
    if not unknown:
        return tuple(out_known)
    if len(unknown) == 1:
        known = sympy.Mul(*[k for k in out_known if k is not None])
        res = list(out_known)
        res[unknown[0]] = sympy.simplify(numel_expr(in_s) / known)
        return tuple(res)
    # align non-1 dims into groups of equal concrete product
    res: list[Any] = [k if k is not None else (sympy.Integer(1) if c == 1 else None)
                      for k, c in zip(out_known, out_c)]
    ins = [(c, s) for c, s in zip(in_c, in_s) if c != 1]
    outs = [i for i, c in enumerate(out_c) if c != 1]
    a = b = 0
    while b < len(outs):
        gi, go = [], []
        pi = pj = 1
        while True:
            if pi <= pj and a < len(ins) and (not gi or pi != pj):
                gi.append(ins[a]); pi *= ins[a][0]; a += 1
            elif b < len(outs) and (not go or pi != pj):
                go.append(outs[b]); pj *= out_c[outs[b]]; b += 1
            else:
                break
            if gi and go and pi == pj:
                break
        total = sympy.Mul(*[s for _, s in gi])
        missing = [i for i in go if res[i] is None]
        if len(missing) == 1:
            known = sympy.Mul(*[res[i] for i in go if res[i] is not None])
            res[missing[0]] = sympy.simplify(total / known)
            continue
        pool = _factors(total)
        for i in missing:
            for f in pool:
                if int(f.subs(subs)) == out_c[i]:
                    res[i] = f
                    pool.remove(f)
                    break
            else:
                res[i] = ctx.match(out_c[i])
    return tuple(ctx.match(out_c[i]) if r is None else r for i, r in enumerate(res))


@register_op("view", op_class=LAYOUT, size_arg=1, samples=S.layout)
@register_op("reshape", op_class=LAYOUT, torch_spelling=True, size_arg=1, samples=S.layout)
def _rule_reshape(ctx: RuleContext):
    in_c, in_s = ctx.tshape(0)
    out_c = list(ctx.out.shape)
    _, syms = ctx.size_list(1, "shape")
    known = [s if isinstance(s, sympy.Expr) and not _is_literal(ctx, i) else None
             for i, s in enumerate(syms)]
    known = [None if (k is not None and int(out_c[i]) != int(k.subs(ctx.prop.example_subs))) else k
             for i, k in enumerate(known)]
    return _reshape_syms(ctx, in_c, in_s, out_c, known)


def _is_literal(ctx: RuleContext, i: int) -> bool:
    """Is reshape size ``i`` written literally (an int constant, not computed from a node)?"""
    raw = list(ctx.node.args[1:]) if len(ctx.node.args) > 1 else [ctx.node.kwargs.get("shape")]
    if len(raw) == 1 and isinstance(raw[0], (list, tuple)):
        raw = list(raw[0])
    return not isinstance(raw[i], torch.fx.Node) if i < len(raw) else True


@register_op("view_as", "reshape_as", "expand_as", op_class=LAYOUT, samples=S.layout)
def _rule_like_other(ctx: RuleContext):
    _, s = ctx.tshape(1, "other")
    return s


@register_op("flatten", op_class=LAYOUT, torch_spelling=True, samples=S.layout)
def _rule_flatten(ctx: RuleContext):
    in_c, s = ctx.tshape(0)
    if len(in_c) == 0:
        return (sympy.Integer(1),)
    a = _norm_dim(int(ctx.arg(1, "start_dim", 0)), len(in_c))
    b = _norm_dim(int(ctx.arg(2, "end_dim", -1)), len(in_c))
    return tuple(s[:a]) + (numel_expr(s[a:b + 1]),) + tuple(s[b + 1:])


@register_op("unflatten", op_class=LAYOUT, samples=S.layout)
def _rule_unflatten(ctx: RuleContext):
    in_c, s = ctx.tshape(0)
    d = _norm_dim(int(ctx.arg(1, "dim")), len(in_c))
    sizes = list(ctx.arg(2, "sizes"))
    ssizes = ctx.sarg(2, "sizes")
    raw = ctx.node.args[2] if len(ctx.node.args) > 2 else ctx.node.kwargs.get("sizes")
    known = [ss if isinstance(r, torch.fx.Node) else None for ss, r in zip(ssizes, raw)]
    out_c = list(ctx.out.shape)[d:d + len(sizes)]
    mid = _reshape_syms(ctx, (in_c[d],), (s[d],), out_c, known)
    return tuple(s[:d]) + mid + tuple(s[d + 1:])


@register_op("permute", op_class=LAYOUT, torch_spelling=True, samples=S.layout)
def _rule_permute(ctx: RuleContext):
    in_c, s = ctx.tshape(0)
    perm, _ = ctx.size_list(1, "dims")
    return tuple(s[_norm_dim(p, len(in_c))] for p in perm)


@register_op("transpose", "t", op_class=LAYOUT, torch_spelling=True, samples=S.layout)
@register_op("swapaxes", "swapdims", op_class=LAYOUT, samples=S.layout)
def _rule_transpose(ctx: RuleContext):
    in_c, s = ctx.tshape(0)
    if len(in_c) < 2 and ctx.prop.op_name(ctx.node) == "t":
        return s
    a = _norm_dim(int(ctx.arg(1, "dim0", 0)), len(in_c))
    b = _norm_dim(int(ctx.arg(2, "dim1", 1)), len(in_c))
    out = list(s)
    out[a], out[b] = out[b], out[a]
    return tuple(out)


@register_op("movedim", op_class=LAYOUT, torch_spelling=True, samples=S.layout)
@register_op("moveaxis", op_class=LAYOUT, samples=S.layout)
def _rule_movedim(ctx: RuleContext):
    in_c, s = ctx.tshape(0)
    src, dst = ctx.arg(1, "source"), ctx.arg(2, "destination")
    src = [src] if isinstance(src, int) else list(src)
    dst = [dst] if isinstance(dst, int) else list(dst)
    n = len(in_c)
    src = [_norm_dim(x, n) for x in src]
    dst = [_norm_dim(x, n) for x in dst]
    order: list[int | None] = [None] * n
    for a, b in zip(src, dst):
        order[b] = a
    rest = iter(i for i in range(n) if i not in src)
    order = [o if o is not None else next(rest) for o in order]
    return tuple(s[o] for o in order)


@register_op("unsqueeze", op_class=LAYOUT, torch_spelling=True, samples=S.layout)
def _rule_unsqueeze(ctx: RuleContext):
    in_c, s = ctx.tshape(0)
    d = _norm_dim(int(ctx.arg(1, "dim")), len(in_c) + 1)
    return tuple(s[:d]) + (sympy.Integer(1),) + tuple(s[d:])


@register_op("squeeze", op_class=LAYOUT, torch_spelling=True, samples=S.layout)
def _rule_squeeze(ctx: RuleContext):
    in_c, s = ctx.tshape(0)
    d = ctx.arg(1, "dim")
    if d is None:
        drop = {i for i, c in enumerate(in_c) if c == 1}
    else:
        ds = [d] if isinstance(d, int) else list(d)
        drop = {_norm_dim(x, len(in_c)) for x in ds if in_c[_norm_dim(x, len(in_c))] == 1}
    return tuple(x for i, x in enumerate(s) if i not in drop)


@register_op("expand", "broadcast_to", op_class=LAYOUT, size_arg=1, samples=S.layout)
def _rule_expand(ctx: RuleContext):
    in_c, s = ctx.tshape(0)
    vals, syms = ctx.size_list(1, "size")
    off = len(vals) - len(in_c)
    out = []
    for i, (v, sv) in enumerate(zip(vals, syms)):
        j = i - off
        if v == -1 or (j >= 0 and in_c[j] == v and in_c[j] != 1):
            out.append(s[j])
        elif isinstance(sv, sympy.Expr) and _node_sized(ctx, i):
            out.append(sv)
        else:
            out.append(ctx.match(int(ctx.out.shape[i])))
    return tuple(out)


def _node_sized(ctx: RuleContext, i: int) -> bool:
    return not _is_literal(ctx, i)


@register_op("repeat", op_class=LAYOUT, samples=S.layout)
def _rule_repeat(ctx: RuleContext):
    in_c, s = ctx.tshape(0)
    vals, syms = ctx.size_list(1, "repeats")
    off = len(vals) - len(in_c)
    out = []
    for i, v in enumerate(vals):
        rep = syms[i] if isinstance(syms[i], sympy.Expr) else sympy.Integer(v)
        out.append(rep * (s[i - off] if i >= off else 1))
    return tuple(out)


@register_op("cat", "concat", "concatenate", op_class=LAYOUT, samples=S.layout)
def _rule_cat(ctx: RuleContext):
    tensors, stensors = ctx.arg(0, "tensors"), ctx.sarg(0, "tensors")
    d = int(ctx.arg(1, "dim", 0))
    items = [(t, st) for t, st in zip(tensors, stensors) if not (t.dim() == 1 and t.shape[0] == 0)]
    if not items or any(not isinstance(st, tuple) for _, st in items):
        raise NoRule("cat of tensors without symbolic shapes")
    nd = items[0][0].dim()
    d = _norm_dim(d, nd)
    base = list(items[0][1])
    base[d] = sympy.Add(*[st[d] for _, st in items])
    return tuple(base)


@register_op("stack", op_class=LAYOUT, samples=S.layout)
def _rule_stack(ctx: RuleContext):
    tensors, stensors = ctx.arg(0, "tensors"), ctx.sarg(0, "tensors")
    d = _norm_dim(int(ctx.arg(1, "dim", 0)), tensors[0].dim() + 1)
    s = list(stensors[0])
    return tuple(s[:d]) + (sympy.Integer(len(tensors)),) + tuple(s[d:])


@register_op("split", "chunk", op_class=LAYOUT, views=True, torch_spelling=True, samples=S.layout)
def _rule_split(ctx: RuleContext):
    in_c, s = ctx.tshape(0)
    name = ctx.prop.op_name(ctx.node)
    d = _norm_dim(int(ctx.arg(2, "dim", 0)), len(in_c))
    L = s[d]
    n = len(ctx.out)
    if name == "chunk":
        chunks = int(ctx.arg(1, "chunks"))
        size = sympy.ceiling(L / chunks)
        sizes = [size] * (n - 1) + [L - (n - 1) * size]
    else:
        spec, sspec = ctx.arg(1, "split_size_or_sections"), ctx.sarg(1, "split_size_or_sections")
        if isinstance(spec, int):
            size = sspec if isinstance(sspec, sympy.Expr) else sympy.Integer(spec)
            sizes = [size] * (n - 1) + [L - (n - 1) * size]
        else:
            sizes = [x if isinstance(x, sympy.Expr) else sympy.Integer(v) for v, x in zip(spec, sspec)]
    outs = []
    for sz in sizes:
        o = list(s)
        o[d] = sz
        outs.append(tuple(o))
    return tuple(outs)


@register_op("unbind", op_class=LAYOUT, views=True, torch_spelling=True, samples=S.layout)
def _rule_unbind(ctx: RuleContext):
    in_c, s = ctx.tshape(0)
    d = _norm_dim(int(ctx.arg(1, "dim", 0)), len(in_c))
    return tuple(tuple(s[:d]) + tuple(s[d + 1:]) for _ in range(in_c[d]))


@register_op("select", op_class=LAYOUT, torch_spelling=True, samples=S.layout)
def _rule_select(ctx: RuleContext):
    in_c, s = ctx.tshape(0)
    d = _norm_dim(int(ctx.arg(1, "dim")), len(in_c))
    return tuple(s[:d]) + tuple(s[d + 1:])


@register_op("narrow", op_class=LAYOUT, torch_spelling=True, samples=S.layout)
def _rule_narrow(ctx: RuleContext):
    in_c, s = ctx.tshape(0)
    d = _norm_dim(int(ctx.arg(1, "dim")), len(in_c))
    start, length = int(ctx.arg(2, "start")), int(ctx.arg(3, "length"))
    sstart, slength = ctx.sarg(2, "start"), ctx.sarg(3, "length")
    raw_len = ctx.node.args[3] if len(ctx.node.args) > 3 else ctx.node.kwargs.get("length")
    out = list(s)
    if isinstance(raw_len, torch.fx.Node):
        out[d] = slength
    elif start % in_c[d] + length == in_c[d]:
        # a literal length reaching the end of the dim (a specialised chunk loop's last or only
        # chunk) is the rest of the dim, not a constant
        out[d] = s[d] - (sstart if start >= 0 else s[d] + sstart)
    else:
        out[d] = sympy.Integer(length)
    return tuple(out)


@register_op("pad", op_class=LAYOUT, samples=S.layout)
def _rule_pad(ctx: RuleContext):
    in_c, s = ctx.tshape(0)
    pad, spad = list(ctx.arg(1, "pad")), ctx.sarg(1, "pad")
    spad = list(spad) if isinstance(spad, (list, tuple)) else [None] * len(pad)
    out = list(s)
    for k in range(len(pad) // 2):
        d = len(in_c) - 1 - k
        lo = spad[2 * k] if isinstance(spad[2 * k], sympy.Expr) else sympy.Integer(pad[2 * k])
        hi = spad[2 * k + 1] if isinstance(spad[2 * k + 1], sympy.Expr) else sympy.Integer(pad[2 * k + 1])
        out[d] = s[d] + lo + hi
    return tuple(out)


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
        return _broadcast(_tensor_pairs(ctx))
    if ctx.prop.op_name(ctx.node) in ("var", "std"):  # var(x, dim, unbiased, keepdim)
        keep = bool(ctx.arg(3, "keepdim", False))
    else:
        keep = bool(ctx.arg(2, "keepdim", False))
    if d is None:
        dims = set(range(len(in_c)))
    else:
        ds = [d] if isinstance(d, int) else list(d)
        dims = {_norm_dim(int(x), len(in_c)) for x in ds}
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
    dims = set(range(len(in_c))) if d is None else {_norm_dim(int(x), len(in_c))
                                                     for x in ([d] if isinstance(d, int) else d)}
    return tuple(sympy.Integer(1) if i in dims else x for i, x in enumerate(s) if keep or i not in dims)


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
    batch = _broadcast([(ac[:-2], a[:-2]), (bc[:-2], b[:-2])])
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




@register_op("index_select", op_class=LAYOUT, torch_spelling=True, samples=S.layout)
def _rule_index_select(ctx: RuleContext):
    in_c, s = ctx.tshape(0)
    d = _norm_dim(int(ctx.arg(1, "dim")), len(in_c))
    _, si = ctx.tshape(2, "index")
    return tuple(s[:d]) + (si[0] if len(si) else sympy.Integer(1),) + tuple(s[d + 1:])


@register_op("gather", op_class=LAYOUT, torch_spelling=True, samples=S.layout)
def _rule_gather(ctx: RuleContext):
    _, si = ctx.tshape(2, "index")  # the output has the index's shape
    return si


@register_op("tile", op_class=LAYOUT, torch_spelling=True, samples=S.layout)
def _rule_tile(ctx: RuleContext):
    in_c, s = ctx.tshape(0)
    vals, syms = ctx.size_list(1, "dims")
    n = max(len(vals), len(in_c))  # the shorter of dims and shape is padded with leading ones
    reps = [sympy.Integer(1)] * (n - len(vals)) + [x if isinstance(x, sympy.Expr) else sympy.Integer(v)
                                                   for v, x in zip(vals, syms)]
    base = [sympy.Integer(1)] * (n - len(in_c)) + list(s)
    return tuple(r * b for r, b in zip(reps, base))


@register_op("diagonal", op_class=LAYOUT, torch_spelling=True, samples=S.layout)
def _rule_diagonal(ctx: RuleContext):
    in_c, s = ctx.tshape(0)
    off = int(ctx.arg(1, "offset", 0))
    a = _norm_dim(int(ctx.arg(2, "dim1", 0)), len(in_c))
    b = _norm_dim(int(ctx.arg(3, "dim2", 1)), len(in_c))
    la, lb = (s[a], s[b] - off) if off >= 0 else (s[a] + off, s[b])
    n = la if la == lb else sympy.Max(0, sympy.Min(la, lb))
    return tuple(x for i, x in enumerate(s) if i not in (a, b)) + (n,)
