"""Chunked attention: a Python chunk loop of one attention, concatenated -> ONE fused attention.

OpenFold's ``_attention_chunked_trainable`` and Protenix's chunked inference cut an attention
into pieces along one axis and concatenate the results::

    torch.cat([attention(q[s_i], k[s_i] or k, v[s_i] or v, bias[s_i] or bias) for s_i in chunks], dim)

Each row of an attention's output (one batch index, one query) reads only its own q row, the
k / v of its batch index and its own bias / mask row. So when every piece is the same attention
(the rule of :mod:`~foldcompile.passes.rules.attention` recognises each, with the same scale,
letters, terms and masks) and its operands are either slices of ONE tensor along the letter the
``cat`` joins — a batch letter or the query letter — or one unsliced tensor (size 1 along that
letter, or without it), and the slices cover that axis in order without gap or overlap, the
concatenation IS the attention on the unsliced tensors, and one kernel call computes it. The
merged call reads k and v once instead of once per chunk and launches once; it never holds the
logits whose size the loop was written to bound.

Seen through between the pieces and their common tensors: no-op casts (``q.to(torch.float32)``
on float32) and slices that keep a whole axis (``b[:, :, :]``). Not merged (left to the
attention rule, one fused call per chunk, with the reason): pieces that differ in any of the
above, a piece that folds its own gate, slices that do not tile the axis, a concatenation along
the value axis. A loop that slices the layer's INPUT and runs its projections per chunk (OpenFold's
``chunk_layer``, the zoo's ``chunk_rows``) is not this pattern: its pieces' q, k, v are different
products. :mod:`foldcompile.passes.merge_chunk_loops` merges such a loop into the layer run once
(proving it row-independent) before the rules run, and leaves this pattern to this rule.

    >>> import torch, foldcompile
    >>> class Chunked(torch.nn.Module):
    ...     def forward(self, q, k, v, bias):        # q, k, v [B, H, L, D]; bias [1, H, L, L]
    ...         pieces = [torch.softmax(q[:, :, i:i + 3] @ k.transpose(-1, -2) + bias[:, :, i:i + 3], -1) @ v
    ...                   for i in range(0, q.shape[2], 3)]
    ...         return torch.cat(pieces, dim=2)
    >>> q, k, v, bias = torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 8), torch.randn(1, 2, 7, 7)
    >>> fast = foldcompile.optimize(Chunked(), q, k, v, bias)
    >>> fast.report.counts()["chunked_attention"], fast.report.counts()["attention"]
    ({'matched': 1, 'rejected': 0}, {'matched': 0, 'rejected': 0})
    >>> fast.code.count("fused_attention(")
    1
    >>> torch.allclose(fast(q, k, v, bias), Chunked()(q, k, v, bias), atol=1e-5)
    True
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx

from foldcompile.passes.rules import Candidate, Context, Reject, Rule
from foldcompile.passes.rules import _meta as M
from foldcompile.passes.rules import attention as A
from foldcompile.passes.rules._values import is_noop_cast

__all__ = ["RULES"]

_FULL = slice(None, None, None)


def _single_slice(n: Any) -> tuple[torch.fx.Node, int, int] | None | bool:
    """For ``base[idx]`` with slices only: ``(base, axis, start)`` for one cut axis, True when no axis
    is cut (a view of the whole), None for anything else (an int or None index, a step, two cuts)."""
    if not isinstance(n, torch.fx.Node) or n.op != "call_function":
        return None
    if M.op_name(n) == "narrow" and len(n.args) == 4 and all(isinstance(a, int) for a in n.args[1:]):
        base, dim, start, _ = n.args
        return (base, dim % len(M.shape(base)), start) if M.shape(base) is not None else None
    if M.op_name(n) != "getitem" or len(n.args) != 2 or M.shape(n.args[0]) is None:
        return None
    base, idx = n.args
    idx = idx if isinstance(idx, tuple) else (idx,)
    rank = len(M.shape(base))
    if sum(i is Ellipsis for i in idx) > 1 or not all(i is Ellipsis or isinstance(i, slice) for i in idx):
        return None
    lead = list(idx[:idx.index(Ellipsis)]) if Ellipsis in idx else list(idx)
    tail = list(idx[idx.index(Ellipsis) + 1:]) if Ellipsis in idx else []
    if len(lead) + len(tail) > rank:
        return None
    axes = list(enumerate(lead)) + [(rank - len(tail) + j, s) for j, s in enumerate(tail)]
    cut = [(a, s) for a, s in axes if s != _FULL]
    if not cut:
        return True
    if len(cut) > 1:
        return None
    axis, s = cut[0]
    if s.step not in (None, 1) or not isinstance(s.start, (int, type(None))) or (s.start or 0) < 0:
        return None
    return base, axis, s.start or 0


def _strip(n: Any) -> Any:
    """``n`` without no-op casts and whole-axis slices around it (the same values, the same layout)."""
    while isinstance(n, torch.fx.Node):
        if is_noop_cast(n):
            n = n.args[0]
        elif _single_slice(n) is True:
            n = n.args[0]
        else:
            break
    return n


def _source(n: Any) -> tuple[Any, int | None, int, int]:
    """``(tensor, cut axis or None, start, length)``: where a piece's operand comes from."""
    s = _strip(n)
    cut = _single_slice(s)
    if isinstance(cut, tuple):
        base, axis, start = cut
        return _strip(base), axis, start, M.shape(s)[axis]
    return s, None, 0, 0


def _plain_mask(cond: torch.fx.Node, keep_if: bool) -> tuple[torch.fx.Node, bool]:
    """``(~c, keep_if)`` as ``(c, not keep_if)``: a per-chunk ``~keep[s]`` is a slice of ``keep``, negated."""
    while M.op_name(cond) == "logical_not" and isinstance(cond.args[0], torch.fx.Node):
        cond, keep_if = cond.args[0], not keep_if
    return cond, keep_if


def _to_pv(t: torch.fx.Node) -> tuple[torch.fx.Node, list[torch.fx.Node]]:
    """Walk back from a concatenated piece through single-user transposes / permutes."""
    chain = []
    while (isinstance(t, torch.fx.Node) and M.op_name(t) in ("transpose", "permute") and len(t.users) == 1
           and isinstance(t.args[0], torch.fx.Node)):
        chain.insert(0, t)
        t = t.args[0]
    return t, chain


def _softmax_of(pv: torch.fx.Node) -> torch.fx.Node | None:
    """The softmax whose weights (through their casts / NaN clean-up) ``pv`` multiplies with v."""
    seen, frontier = set(), list(pv.all_input_nodes)
    for _ in range(5):
        nxt = []
        for n in frontier:
            if n in seen:
                continue
            seen.add(n)
            if A._softmax_dim(n) is not None:
                w = A._weights_epilogue(n)[0]
                if set(w.users) == {pv}:
                    return n
            nxt.extend(n.all_input_nodes)
        frontier = nxt
    return None


def _back_through(chain: list[torch.fx.Node], pos: int) -> int | None:
    """The axis of the first chain input that becomes axis ``pos`` of the last chain output."""
    for u in reversed(chain):
        rank = len(M.shape(u))
        if M.op_name(u) == "transpose":
            i, j = (a % rank for a in u.args[1:3])
            pos = j if pos == i else i if pos == j else pos
        else:
            pos = u.args[1][pos] % rank
    return pos


def _same_layout_op(a: torch.fx.Node, b: torch.fx.Node) -> bool:
    return a.target is b.target and tuple(a.args[1:]) == tuple(b.args[1:]) and a.kwargs == b.kwargs


def _recognise(cat: torch.fx.Node, ctx: Context) -> Candidate | Reject | None:
    if cat.op != "call_function" or M.op_name(cat) not in ("cat", "concat", "concatenate") or not cat.args:
        return None
    pieces = cat.args[0]
    dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
    if not isinstance(pieces, (list, tuple)) or len(pieces) < 2 or not isinstance(dim, int) or M.shape(cat) is None:
        return None
    cands, chains = [], []
    for t in pieces:
        pv, chain = _to_pv(t)
        sm = _softmax_of(pv) if isinstance(pv, torch.fx.Node) else None
        if sm is None:
            return None  # not a concatenation of attentions
        c = A._recognise(sm, ctx)
        if not isinstance(c, Candidate):
            return None  # the attention rule says why, per piece
        if c.output is not pv:
            return Reject("a chunk folds its own gate: merge the loop after the gate is not built")
        cands.append(c)
        chains.append(chain)
    why = A._check(cands[0], ctx)
    if why is not None:
        return Reject(f"the chunks' attention: {why}")
    if any(len(ch) != len(chains[0]) or not all(map(_same_layout_op, ch, chains[0])) for ch in chains):
        return Reject("the chunks are laid out differently before the concatenation")
    p0 = cands[0].parts
    for c in cands[1:]:
        p = c.parts
        same = all(p[k] == p0[k] for k in ("lo", "qL", "kL", "dL", "batch", "q_letters", "k_letters", "v_letters",
                                          "out_letters", "scale", "finite_fill", "nan_cleaned", "D", "Dv"))
        if not same or [f for _, f in p["terms"]] != [f for _, f in p0["terms"]] \
                or [k for _, k in p["masks"]] != [k for _, k in p0["masks"]]:
            return Reject("the chunks are not the same attention (letters, scale, terms or masks differ)")
    pos = _back_through(chains[0], dim % len(M.shape(cat)))
    letter = p0["out_letters"][pos]
    if letter not in p0["batch"] and letter != p0["qL"]:
        return Reject("the chunks are joined along the value axis, not a batch or query axis")
    lo = p0["lo"]

    # every operand, term and mask: per role, either one tensor sliced along `letter` or one whole tensor
    roles: list[tuple[str, list[Any], str]] = [
        ("q", [c.parts["q"] for c in cands], p0["q_letters"]),
        ("k", [c.parts["k"] for c in cands], p0["k_letters"]),
        ("v", [c.parts["v"] for c in cands], p0["v_letters"])]
    for j in range(len(p0["terms"])):
        roles.append((f"bias term {j}", [c.parts["terms"][j][0] for c in cands], lo[len(lo) - len(M.shape(
            cands[0].parts["terms"][j][0])):]))
    masks = [[_plain_mask(*m) for m in c.parts["masks"]] for c in cands]
    if any([keep for _, keep in ms] != [keep for _, keep in masks[0]] for ms in masks):
        return Reject("the chunks are not the same attention (their masks keep other values)")
    for j in range(len(p0["masks"])):
        roles.append((f"mask {j}", [ms[j][0] for ms in masks], lo[len(lo) - len(M.shape(masks[0][j][0])):]))
    tiles: list[tuple[int, int]] | None = None
    total = None
    whole: list[Any] = []
    for name, nodes, letters in roles:
        srcs = [_source(n) for n in nodes]
        bases = {id(s[0]) for s in srcs}
        if len(bases) != 1:
            return Reject(f"the chunks' {name} are not slices of one tensor")
        base, axes = srcs[0][0], {s[1] for s in srcs}
        want = letters.index(letter) if letter in letters else None
        if axes == {None}:
            if want is not None and M.shape(base)[want] != 1:
                return Reject(f"the chunks share one {name} that varies along the joined axis")
        elif axes != {want}:
            return Reject(f"the chunks' {name} are cut along another axis than the one they are joined on")
        else:
            here = [(s[2], s[3]) for s in srcs]
            if tiles is None:
                tiles, total = here, M.shape(base)[want]
            if here != tiles or M.shape(base)[want] != total:
                return Reject(f"the chunks' {name} are cut into other pieces than the queries'")
        whole.append(base)
    if tiles is None:
        return Reject("no operand is cut into the chunks")
    start = 0
    for s, n in tiles:
        if s != start or n <= 0:
            return Reject("the chunks do not tile the axis in order (a gap or an overlap)")
        start += n
    if start != total:
        return Reject(f"the chunks cover {start} of {total} rows")

    parts = dict(p0)
    parts.update(q=whole[0], k=whole[1], v=whole[2])
    n_terms = len(p0["terms"])
    parts["terms"] = [[b, f] for b, (_, f) in zip(whole[3:3 + n_terms], p0["terms"])]
    parts["masks"] = [(b, keep) for b, (_, keep) in zip(whole[3 + n_terms:], masks[0])]
    parts["bias_terms"], parts["key_terms"], parts["biases"] = A._split_terms(
        parts["terms"], lo, p0["qL"], p0["batch"] + [p0["qL"], p0["kL"]])
    parts["chain"] = chains[0]
    region_set = {n for c in cands for n in c.region} | {n for ch in chains for n in ch} | {cat}
    order = {n: i for i, n in enumerate(cat.graph.nodes)}
    notes = [f"{len(cands)} chunks along {'the queries' if letter == p0['qL'] else 'a batch axis'} merged"]
    if len(parts["terms"]) > 1:
        notes.append(f"biases: {parts['biases']}")
    return Candidate("chunked_attention", cat, sorted(region_set, key=order.get), cat, parts,
                     notes + [n for n in cands[0].notes if not n.startswith("biases")])


def _check(c: Candidate, ctx: Context) -> str | None:
    return A._check(c, ctx)


def _profitable(c: Candidate, ctx: Context) -> str | None:
    return A._profitable(c, ctx)


def _shapes_before(chain: list[torch.fx.Node], shape: tuple) -> list[tuple]:
    """The shapes of the chain's input and of each op's output, given the last output's ``shape``."""
    shapes = [tuple(shape)]
    for u in reversed(chain):
        s = list(shapes[0])
        if M.op_name(u) == "transpose":
            i, j = (a % len(s) for a in u.args[1:3])
            s[i], s[j] = s[j], s[i]
        else:
            inv = [0] * len(s)
            for k, pk in enumerate(u.args[1]):
                inv[pk % len(s)] = k
            s = [shapes[0][inv[a]] for a in range(len(s))]
        shapes.insert(0, tuple(s))
    return shapes


def _replace(c: Candidate, ctx: Context) -> torch.fx.Node:
    shapes = _shapes_before(c.parts["chain"], M.shape(c.output))
    out = A._replace(c, ctx)  # the whole attention, laid out as one piece's product was
    out.meta["shape"] = shapes[0]
    graph = ctx.gm.graph
    for u, shape in zip(c.parts["chain"], shapes[1:]):  # the pieces' layout before the cat, replayed once
        with graph.inserting_before(c.output):
            out = graph.node_copy(u, lambda a, u=u, out=out: out if a is u.args[0] else a)
        out.meta.update({"origin": [n.name for n in c.region], "module_path": M.module_path(c.anchor),
                         "fused_by": c.rule, "shape": shape, "dtype": M.dtype(c.output)})
    return out


RULES = [Rule("chunked_attention", "attention", 105, _recognise, _check, _profitable, _replace,
              "cat of one attention's chunks along a batch or query axis -> one fused_attention")]
