"""Registry entries of the layout ops: size queries, indexing, reshapes, permutations, joins and splits.

No FLOPs; a view moves no bytes. A literal size (``view(x, (11, 11, 2, 4))``) is read structurally
first (reshape groups, factors of the input's size), then by value. The rule contract is in
:mod:`foldcompile.passes.shape_rules`.

    >>> import torch
    >>> from foldcompile.passes.registry import lookup
    >>> e = lookup(torch.Tensor.view)
    >>> e.op_class, e.size_arg, lookup(torch.split).views
    ('LAYOUT', 1, True)
"""
from __future__ import annotations

from typing import Any

import sympy
import torch
import torch.fx

from foldcompile.passes import op_samples as S
from foldcompile.passes.meta import rank_of
from foldcompile.passes.registry import LAYOUT, register_op
from foldcompile.passes.shape_rules import NoRule, RuleContext, SymEnv, norm_dim, numel_expr

__all__: list[str] = []


@register_op("size", op_class=LAYOUT, samples=S.shape_query)
def _rule_size(ctx: RuleContext):
    shape, s = ctx.tshape(0)
    d = ctx.arg(1, "dim")
    if d is None:
        return list(s)
    return s[norm_dim(int(d), len(shape))]


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
    a = norm_dim(int(ctx.arg(1, "start_dim", 0)), len(in_c))
    b = norm_dim(int(ctx.arg(2, "end_dim", -1)), len(in_c))
    return tuple(s[:a]) + (numel_expr(s[a:b + 1]),) + tuple(s[b + 1:])


def _argument(node: torch.fx.Node, i: int, name: str, default: Any = None) -> Any:
    """A node's argument at position ``i``, else keyword ``name``, else ``default`` (as written in the graph)."""
    return node.args[i] if i < len(node.args) else node.kwargs.get(name, default)


def _dim_of(node: torch.fx.Node, i: int, name: str = "dim", default: int | None = None) -> int | None:
    """A literal dim argument of a node made non-negative against its input's rank (None if unknown)."""
    d = _argument(node, i, name, default)
    rank = rank_of(node.args[0]) if node.args else None
    return norm_dim(d, rank) if isinstance(d, int) and not isinstance(d, bool) and rank is not None else None


def _meaning(raw: Any, sym: Any) -> Any:
    """A literal size's meaning (its symbolic size); ``-1`` and sizes computed in the graph stay as written."""
    return raw if not isinstance(raw, int) or raw == -1 else sym


def _unflatten_sizes(node: torch.fx.Node, sym: Any) -> dict[int, tuple] | None:
    """``unflatten(x, d, (11, 13))`` -> ``{2: (N_res, N_x)}``: each literal is the output size at ``d + k``."""
    raw, d = _argument(node, 2, "sizes"), _dim_of(node, 1)
    if not isinstance(raw, (list, tuple)) or d is None or not isinstance(sym, tuple):
        return None
    return {2: tuple(_meaning(r, sym[d + k]) for k, r in enumerate(raw))}


@register_op("unflatten", op_class=LAYOUT, literal_sizes=_unflatten_sizes, samples=S.layout)
def _rule_unflatten(ctx: RuleContext):
    in_c, s = ctx.tshape(0)
    d = norm_dim(int(ctx.arg(1, "dim")), len(in_c))
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
    return tuple(s[norm_dim(p, len(in_c))] for p in perm)


@register_op("transpose", "t", op_class=LAYOUT, torch_spelling=True, samples=S.layout)
@register_op("swapaxes", "swapdims", op_class=LAYOUT, samples=S.layout)
def _rule_transpose(ctx: RuleContext):
    in_c, s = ctx.tshape(0)
    if len(in_c) < 2 and ctx.prop.op_name(ctx.node) == "t":
        return s
    a = norm_dim(int(ctx.arg(1, "dim0", 0)), len(in_c))
    b = norm_dim(int(ctx.arg(2, "dim1", 1)), len(in_c))
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
    src = [norm_dim(x, n) for x in src]
    dst = [norm_dim(x, n) for x in dst]
    order: list[int | None] = [None] * n
    for a, b in zip(src, dst):
        order[b] = a
    rest = iter(i for i in range(n) if i not in src)
    order = [o if o is not None else next(rest) for o in order]
    return tuple(s[o] for o in order)


@register_op("unsqueeze", op_class=LAYOUT, torch_spelling=True, samples=S.layout)
def _rule_unsqueeze(ctx: RuleContext):
    in_c, s = ctx.tshape(0)
    d = norm_dim(int(ctx.arg(1, "dim")), len(in_c) + 1)
    return tuple(s[:d]) + (sympy.Integer(1),) + tuple(s[d:])


@register_op("squeeze", op_class=LAYOUT, torch_spelling=True, samples=S.layout)
def _rule_squeeze(ctx: RuleContext):
    in_c, s = ctx.tshape(0)
    d = ctx.arg(1, "dim")
    if d is None:
        drop = {i for i, c in enumerate(in_c) if c == 1}
    else:
        ds = [d] if isinstance(d, int) else list(d)
        drop = {norm_dim(x, len(in_c)) for x in ds if in_c[norm_dim(x, len(in_c))] == 1}
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
    d = norm_dim(d, nd)
    base = list(items[0][1])
    base[d] = sympy.Add(*[st[d] for _, st in items])
    return tuple(base)


@register_op("stack", op_class=LAYOUT, samples=S.layout)
def _rule_stack(ctx: RuleContext):
    tensors, stensors = ctx.arg(0, "tensors"), ctx.sarg(0, "tensors")
    d = norm_dim(int(ctx.arg(1, "dim", 0)), tensors[0].dim() + 1)
    s = list(stensors[0])
    return tuple(s[:d]) + (sympy.Integer(len(tensors)),) + tuple(s[d:])


def _split_sections(node: torch.fx.Node, sym: Any) -> dict[int, tuple] | None:
    """``split(x, [11, 13], d)`` -> ``{1: (N_res, N_x)}``: each literal section is its output's size along
    ``d`` (a split by one size, or ``chunk``, has no list to read)."""
    raw, d = _argument(node, 1, "split_size_or_sections"), _dim_of(node, 2, default=0)
    if not isinstance(raw, (list, tuple)) or d is None or not isinstance(sym, tuple) or len(sym) != len(raw):
        return None
    return {1: tuple(_meaning(r, out[d]) for r, out in zip(raw, sym))}


@register_op("split", "chunk", op_class=LAYOUT, views=True, torch_spelling=True, literal_sizes=_split_sections,
             samples=S.layout)
def _rule_split(ctx: RuleContext):
    in_c, s = ctx.tshape(0)
    name = ctx.prop.op_name(ctx.node)
    d = norm_dim(int(ctx.arg(2, "dim", 0)), len(in_c))
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
            # a literal section is read like a literal view size: the named dim of that example value
            raw = ctx.node.args[1] if len(ctx.node.args) > 1 else ctx.node.kwargs.get("split_size_or_sections")
            raw = list(raw) if isinstance(raw, (list, tuple)) else [None] * len(spec)
            sizes = [x if isinstance(r, torch.fx.Node) and isinstance(x, sympy.Expr) else ctx.match(int(v))
                     for v, x, r in zip(spec, sspec, raw)]
    outs = []
    for sz in sizes:
        o = list(s)
        o[d] = sz
        outs.append(tuple(o))
    return tuple(outs)


@register_op("unbind", op_class=LAYOUT, views=True, torch_spelling=True, samples=S.layout)
def _rule_unbind(ctx: RuleContext):
    in_c, s = ctx.tshape(0)
    d = norm_dim(int(ctx.arg(1, "dim", 0)), len(in_c))
    return tuple(tuple(s[:d]) + tuple(s[d + 1:]) for _ in range(in_c[d]))


@register_op("select", op_class=LAYOUT, torch_spelling=True, samples=S.layout)
def _rule_select(ctx: RuleContext):
    in_c, s = ctx.tshape(0)
    d = norm_dim(int(ctx.arg(1, "dim")), len(in_c))
    return tuple(s[:d]) + tuple(s[d + 1:])


def _narrow_length(node: torch.fx.Node, sym: Any) -> dict[int, Any] | None:
    """``narrow(x, d, 0, 11)`` -> ``{3: N_res}``: a literal length is the output's size along ``d``."""
    raw, d = _argument(node, 3, "length"), _dim_of(node, 1)
    if not isinstance(raw, int) or d is None or not isinstance(sym, tuple):
        return None
    return {3: sym[d]}


@register_op("narrow", op_class=LAYOUT, torch_spelling=True, literal_sizes=_narrow_length, samples=S.layout)
def _rule_narrow(ctx: RuleContext):
    in_c, s = ctx.tshape(0)
    d = norm_dim(int(ctx.arg(1, "dim")), len(in_c))
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


@register_op("index_select", op_class=LAYOUT, torch_spelling=True, samples=S.layout)
def _rule_index_select(ctx: RuleContext):
    in_c, s = ctx.tshape(0)
    d = norm_dim(int(ctx.arg(1, "dim")), len(in_c))
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
    a = norm_dim(int(ctx.arg(2, "dim1", 0)), len(in_c))
    b = norm_dim(int(ctx.arg(3, "dim2", 1)), len(in_c))
    la, lb = (s[a], s[b] - off) if off >= 0 else (s[a] + off, s[b])
    n = la if la == lb else sympy.Max(0, sympy.Min(la, lb))
    return tuple(x for i, x in enumerate(s) if i not in (a, b)) + (n,)
