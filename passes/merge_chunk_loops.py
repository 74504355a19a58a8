"""Chunk loops of a whole layer, merged: the layer runs once, on every row (``merge_chunk_loops_pass``).

Inference code bounds its memory by running a layer on chunks of rows in a Python loop. A capture
unrolls the loop: the graph holds the layer once per chunk and joins the pieces, in one of two
spellings::

    out = res_0.new_zeros((T, ...)); out[s_i:s_i + c] = layer(x[s_i:s_i + c], ...)   (OpenFold's chunk_layer, Boltz)
    torch.cat([layer(x.narrow(d, s_i, c), ...) for s_i in range(0, T, c)], dim=d)   (the zoo's chunk loops)

Every projection, the attention, the gate and the output linear then exist once per chunk, and a
fusion rule sees only one chunk's attention at a time. When the layer is *row-independent* — row
``r`` of the result depends only on row ``r`` of the sliced inputs — the joined result IS the layer
applied once to the unsliced inputs, and this pass writes it so (the attention rule then fuses one
attention for the whole loop; the fused kernel never holds the logits the loop was written to bound).

The proof, node by node on the first chunk, is the DAP sharding rules' (``passes/sharding_rules.py``):
a chunk of rows is a shard of them. Each sliced input is ``Shard(axis)``, everything the chunk reads
whole (parameters, a bias broadcast along the rows) ``Replicate()``; every op of the chunk must have a
strategy that takes exactly these placements and gives a ``Shard`` whose dim keeps the chunk's rows
as one dim of its own. A softmax or layer norm over the rows, a sum or a contraction over them, a view
merging them with another dim, a slice of them, an op without a sharding rule: no such strategy, the
loop stays. The other chunks must be the same ops on the next rows (node for node, the same
arguments; literal sizes differ only where they are the chunk's row count), the chunks must tile the
rows in order, their values must not be used outside the loop, and nothing in between may draw random
numbers, write in place into something the chunks read, or change a mode. The merged layer is the
first chunk's nodes with each slice replaced by its whole tensor and each literal row count by the
total; shape propagation then annotates it again (``foldcompile.optimize`` does, and falls back to the
loop when the merged layer does not run).

A loop of ONE attention on slices of common q / k / v (nothing else per chunk) is left to the
``chunked_attention`` fusion rule, which merges it into one fused call itself.

    >>> import torch, foldcompile
    >>> class ChunkedTransition(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.norm, self.up, self.down = torch.nn.LayerNorm(8), torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)
    ...     def forward(self, x):                         # x [T, L, 8], in chunks of 3 rows
    ...         pieces = [self.down(torch.relu(self.up(self.norm(x[i:i + 3])))) for i in range(0, x.shape[0], 3)]
    ...         return torch.cat(pieces, dim=0)
    >>> x = torch.randn(7, 5, 8)
    >>> fast = foldcompile.optimize(ChunkedTransition(), x)
    >>> fast.report.counts()["chunk_loop"], fast.report.counts()["ln_linear"]  # the layer norm with its up projection
    ({'matched': 1, 'rejected': 0}, {'matched': 1, 'rejected': 0})
    >>> fast.code.count("fused_layer_norm_linear("), "torch.cat(" in fast.code
    (1, False)
    >>> torch.allclose(fast(x), ChunkedTransition.forward(fast.model, x), atol=1e-6)
    True
"""
from __future__ import annotations

import logging
import operator
from dataclasses import dataclass, field
from typing import Any, Iterable

import sympy
import torch
import torch.fx

from foldcompile.distributed.collectives import split_sizes
from foldcompile.passes.base import PassError, PassResult, declare
from foldcompile.passes.meta import DTYPE, EINSUM, EXAMPLE_VALUE, MULTI_OUTPUT, SHAPE, SYM_SHAPE
from foldcompile.passes.placement import Placed, Shard
from foldcompile.passes.registry import FRESH_BUFFER, JOINS, draws_random, entry_of, node_has_trait, op_name, writes_in_place
from foldcompile.passes.rules import _meta as M
from foldcompile.passes.sharding_rules import REPLICATE, strategies, tensor_inputs

_log = logging.getLogger(__name__)

__all__ = ["merge_chunk_loops_pass", "RULE"]

RULE = "chunk_loop"  # the name merges are counted and identified under (``chunk_loop#0``)

_FULL = slice(None, None, None)
# the symbolic size the proof gives a chunk's rows (the sharding rules split dims whose size names one)
_ROWS = sympy.Symbol("chunk_rows", positive=True, integer=True)
_KEYS_TO_DERIVE_AGAIN = (SHAPE, DTYPE, SYM_SHAPE, MULTI_OUTPUT, "sym_value", "sym_args", "aliases_input",
                         "op_class", "cost", EXAMPLE_VALUE, "val")


class _Refused(Exception):
    """A chunk loop that is not merged, with the reason (recorded as a rejection)."""


@dataclass
class _Piece:
    """One chunk: the value joined, the rows it covers, and the nodes computing it."""

    result: torch.fx.Node
    start: int
    stop: int
    store: torch.fx.Node | None = None  # the ``out[s:e] = result`` node (buffer spelling)
    cuts: list[torch.fx.Node] = field(default_factory=list)  # the slices of the chunk's rows it reads
    region: list[torch.fx.Node] = field(default_factory=list)  # nodes reading them, graph order, result last


@dataclass
class _Loop:
    sink: torch.fx.Node  # the cat, or the preallocated buffer
    axis: int  # the joined axis of the result
    total: int  # rows in all
    pieces: list[_Piece]


# ---------------------------------------------------------------------------------------------- slices


def _index_cut(shape: tuple[int, ...], idx: Any) -> tuple[int, int, int] | None:
    """``(axis, start, stop)`` for an index of slices (and one Ellipsis) cutting exactly one axis of a
    tensor of ``shape`` with step 1 (``stop`` clamped to the axis), else None."""
    items = list(idx) if isinstance(idx, tuple) else [idx]
    if sum(i is Ellipsis for i in items) > 1 or not all(i is Ellipsis or isinstance(i, slice) for i in items):
        return None
    rank = len(shape)
    lead = items[:items.index(Ellipsis)] if Ellipsis in items else items
    tail = items[items.index(Ellipsis) + 1:] if Ellipsis in items else []
    if len(lead) + len(tail) > rank:
        return None
    axes = list(enumerate(lead)) + [(rank - len(tail) + j, s) for j, s in enumerate(tail)]
    cut = [(a, s) for a, s in axes if s != _FULL]
    if len(cut) != 1:
        return None
    axis, s = cut[0]
    if s.step not in (None, 1) or not all(isinstance(b, (int, type(None))) for b in (s.start, s.stop)):
        return None
    start, stop = s.start or 0, shape[axis] if s.stop is None else s.stop
    if start < 0 or stop < 0:
        return None
    return axis, start, min(stop, shape[axis])


def _cut_of(n: Any) -> tuple[torch.fx.Node, int, int, int] | None:
    """``(base, axis, start, stop)`` when ``n`` is rows ``[start, stop)`` of ``base`` along one axis
    (``base[..., s:e, :]`` or ``base.narrow(axis, s, length)``)."""
    if not isinstance(n, torch.fx.Node) or n.op != "call_function" or len(n.args) < 2:
        return None
    base = n.args[0]
    if not isinstance(base, torch.fx.Node) or not isinstance(M.shape(base), tuple) or M.dtype(base) is None:
        return None
    shape = M.shape(base)
    name = op_name(n)
    if name == "narrow" and len(n.args) == 4 and all(isinstance(a, int) for a in n.args[1:]):
        axis = n.args[1] % len(shape)
        return base, axis, n.args[2], min(n.args[2] + n.args[3], shape[axis])
    if name == "getitem" and len(n.args) == 2 and not base.meta.get(MULTI_OUTPUT):
        found = _index_cut(shape, n.args[1])
        return (base, *found) if found is not None else None
    return None


# ---------------------------------------------------------------------------------------------- the loop


def _is_store(n: torch.fx.Node, buffer: torch.fx.Node) -> bool:
    return n.op == "call_function" and n.target is operator.setitem and n.args and n.args[0] is buffer


def _loop_of(sink: torch.fx.Node, order: dict[torch.fx.Node, int]) -> _Loop | None:
    """The pieces a ``cat`` joins, or that are stored into a fresh buffer; None when ``sink`` is neither."""
    if sink.op != "call_function" or not isinstance(M.shape(sink), tuple):
        return None
    if node_has_trait(sink, JOINS):  # the registry's JOINS: cat, concat, concatenate
        pieces = sink.args[0] if sink.args else sink.kwargs.get("tensors")
        dim = sink.args[1] if len(sink.args) > 1 else sink.kwargs.get("dim", 0)
        if (not isinstance(pieces, (list, tuple)) or len(pieces) < 2 or not isinstance(dim, int)
                or not all(isinstance(p, torch.fx.Node) and isinstance(M.shape(p), tuple) for p in pieces)):
            return None
        axis = dim % len(M.shape(sink))
        out, start = [], 0
        for p in pieces:
            out.append(_Piece(p, start, start + M.shape(p)[axis]))
            start += M.shape(p)[axis]
        return _Loop(sink, axis, M.shape(sink)[axis], out)
    if not node_has_trait(sink, FRESH_BUFFER):  # a preallocated buffer: zeros, new_zeros, empty, ...
        return None
    stores = sorted((u for u in sink.users if _is_store(u, sink)), key=order.get)
    if len(stores) < 2:
        return None
    shape = M.shape(sink)
    cuts = [_index_cut(shape, s.args[1]) for s in stores]
    if any(c is None for c in cuts) or len({c[0] for c in cuts}) != 1:
        return None
    axis = cuts[0][0]
    pieces = [_Piece(s.args[2], c[1], c[2], store=s) for s, c in zip(stores, cuts)]
    if not all(isinstance(p.result, torch.fx.Node) for p in pieces):
        return None
    return _Loop(sink, axis, shape[axis], pieces)


def _ancestors_through(result: torch.fx.Node, is_cut) -> set[torch.fx.Node]:
    seen, stack = {result}, [result]
    while stack:
        n = stack.pop()
        if is_cut(n):
            continue
        for a in n.all_input_nodes:
            if a not in seen:
                seen.add(a)
                stack.append(a)
    return seen


def _fill_region(loop: _Loop, piece: _Piece, graph_nodes: list[torch.fx.Node]) -> None:
    """The piece's cuts (slices of its rows of a tensor with ``total`` rows) and the nodes that read
    them on the way to its result."""
    def is_cut(n: torch.fx.Node) -> bool:
        c = _cut_of(n)
        return (c is not None and (c[2], c[3]) == (piece.start, piece.stop)
                and M.shape(c[0])[c[1]] == loop.total)

    anc = _ancestors_through(piece.result, is_cut)
    reads_rows: set[torch.fx.Node] = set()
    for n in graph_nodes:
        if n not in anc:
            continue
        if is_cut(n):
            piece.cuts.append(n)
            reads_rows.add(n)
        elif any(a in reads_rows for a in n.all_input_nodes):
            reads_rows.add(n)
            piece.region.append(n)


def _draws(n: torch.fx.Node) -> bool:
    """Whether ``n`` draws random numbers (a dropout with ``training=False`` or ``p=0`` draws none)."""
    name = op_name(n)
    if not draws_random(n):
        return False
    if name in ("dropout", "alpha_dropout", "feature_alpha_dropout"):
        p = n.args[1] if len(n.args) > 1 else n.kwargs.get("p", 0.5)
        training = n.args[2] if len(n.args) > 2 else n.kwargs.get("training", True)
        return not (training is False or (isinstance(p, (int, float)) and p == 0))
    return True


def _effectful(n: torch.fx.Node) -> bool:
    """A node whose running matters beyond its value: an in-place write, a random draw, a collective or
    autocast marker, or a call that returns nothing (a mode switch)."""
    if n.op != "call_function":
        return False
    if writes_in_place(n) or _draws(n) or M.is_barrier(n):
        return True
    return (n.meta.get(SHAPE) is None and not n.meta.get(MULTI_OUTPUT) and n.meta.get("sym_value") is None
            and n.meta.get("example_value") is None)


def _check_piece(loop: _Loop, i: int, piece: _Piece) -> None:
    where = f"chunk {i} (rows {piece.start}:{piece.stop})"
    if piece.stop <= piece.start:
        raise _Refused(f"{where} is empty")
    if not piece.region or piece.region[-1] is not piece.result:
        raise _Refused(f"{where} reads no slice of the rows it fills")
    inside = set(piece.region) | set(piece.cuts)
    allowed = inside | {loop.sink} | ({piece.store} if piece.store is not None else set())
    for n in piece.region:
        name = op_name(n)
        if _draws(n):
            raise _Refused(f"{where} draws random numbers ({n.name}: {name}): one draw over all rows gives other "
                           "values than one per chunk")
        if M.is_barrier(n):
            raise _Refused(f"{where} holds a collective or autocast boundary ({n.name})")
        if writes_in_place(n) and n.args and n.args[0] not in piece.region:
            raise _Refused(f"{where} writes in place into a value it does not compute ({n.name}: {name})")
        if n.meta.get(SHAPE) is None and not n.meta.get(MULTI_OUTPUT):
            raise _Refused(f"{where} computes a non-tensor value from its rows ({n.name}: {name})")
    for n in inside:
        for u in n.users:
            if u not in allowed:
                raise _Refused(f"{where}'s value {n.name} is used outside the loop (by {u.name})")


# ---------------------------------------------------------------------------------------------- the proof


def _symbolic(n: torch.fx.Node, rows: Iterable[int] | tuple) -> tuple:
    """``n``'s sizes as the proof reads them: ``_ROWS`` at the given dims, every other size a constant."""
    shape = n.meta[SHAPE]
    if n.meta.get(MULTI_OUTPUT):
        return tuple(tuple(_ROWS if d in r else sympy.Integer(s) for d, s in enumerate(sh))
                     for sh, r in zip(shape, rows))
    rows = set(rows)
    return tuple(_ROWS if d in rows else sympy.Integer(s) for d, s in enumerate(shape))


def _dims_of(spec: Any) -> Any:
    return tuple((s.dim,) for s in spec) if isinstance(spec, tuple) else (spec.dim,)


def _row_dims(piece: _Piece, chunk: int) -> dict[torch.fx.Node, Any]:
    """Each node of the first chunk -> where its rows are (``Placed(Shard(d))``, a tuple of them for an op
    with several outputs), proved op by op by the sharding rules; raises ``_Refused`` naming the op
    that does not keep the rows independent."""
    splits = tuple(split_sizes(chunk, 2))
    spec: dict[torch.fx.Node, Any] = {}
    saved: dict[torch.fx.Node, Any] = {}

    def set_rows(n: torch.fx.Node, rows: Any) -> None:
        saved.setdefault(n, n.meta.get(SYM_SHAPE))
        n.meta[SYM_SHAPE] = _symbolic(n, rows)

    try:
        for cut in piece.cuts:
            axis = _cut_of(cut)[1]
            set_rows(cut, (axis,))
            spec[cut] = Placed(Shard(axis), splits, _ROWS)
        for n in piece.region:
            shape = n.meta[SHAPE]
            multi = bool(n.meta.get(MULTI_OUTPUT))
            candidates = ([tuple(d for d, s in enumerate(sh) if s == chunk) for sh in shape] if multi
                          else tuple(d for d, s in enumerate(shape) if s == chunk))
            set_rows(n, candidates)
            inputs = [a for _, a in tensor_inputs(n)]
            want = [spec.get(a, REPLICATE) for a in inputs]
            try:
                found = strategies(n, 2, [[w] for w in want])
            except (PassError, KeyError, TypeError, ValueError, IndexError) as e:
                raise _Refused(f"{n.name} ({op_name(n)}): its sharding rule failed ({type(e).__name__}: {e})")
            outs = set()
            for st in found:
                reads = [st.inputs[k] for k in range(len(inputs))]
                if not all(r is None or r == w for r, w in zip(reads, want)):
                    continue
                if not any(a in spec and r == w for a, r, w in zip(inputs, reads, want)):
                    continue  # the op does not read the rows (new_zeros(x) reads only its dtype)
                outs_ok = (all(isinstance(o, Placed) and o.dim is not None and o.global_size == _ROWS for o in st.out)
                           if isinstance(st.out, tuple)
                           else isinstance(st.out, Placed) and st.out.dim is not None and st.out.global_size == _ROWS)
                if outs_ok:
                    outs.add(st.out)
            if len(outs) != 1:
                why = "no rule shows its rows independent" if not outs else "its rows could be in several dims"
                raise _Refused(f"{n.name} ({op_name(n)}) at {M.site(n)}: {why}, so the chunks are not one "
                               "layer applied to the rows")
            spec[n] = outs.pop()
            set_rows(n, _dims_of(spec[n]))
    finally:
        for n, sym in saved.items():
            n.meta[SYM_SHAPE] = sym
    return spec


# ---------------------------------------------------------------------------------------------- same chunks


def _sizes(n: torch.fx.Node) -> tuple[int, list[Any]] | None:
    """``(position, sizes)`` of a node's literal size list (view, reshape, expand, ...), else None."""
    entry = entry_of(n)
    if entry is None or entry.size_arg is None or len(n.args) <= entry.size_arg:
        return None
    i = entry.size_arg
    raw = n.args[i] if len(n.args) == i + 1 and isinstance(n.args[i], (list, tuple)) else n.args[i:]
    return i, list(raw)


def _same_common(a: Any, b: Any, depth: int = 0) -> bool:
    """Whether two values a chunk reads whole are the same: one node, or the same pure op on the same."""
    if isinstance(a, torch.fx.Node) or isinstance(b, torch.fx.Node):
        if a is b:
            return True
        if not (isinstance(a, torch.fx.Node) and isinstance(b, torch.fx.Node)) or depth > 8:
            return False
        if a.op != "call_function" or a.op != b.op or a.target is not b.target or _effectful(a) or _effectful(b):
            return False
        return _same_common(a.args, b.args, depth + 1) and _same_common(a.kwargs, b.kwargs, depth + 1)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same_common(x, y, depth) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_common(a[k], b[k], depth) for k in a)
    return type(a) is type(b) and a == b


def _row_position(n: torch.fx.Node, spec: dict[torch.fx.Node, Any]) -> int | None:
    s = spec.get(n)
    return s.dim if isinstance(s, Placed) else None


def _check_same(first: _Piece, other: _Piece, i: int, spec: dict[torch.fx.Node, Any]) -> None:
    """``other`` runs the first chunk's ops on its own rows: node for node, the same op and arguments,
    the same tensors read whole, slices of the same tensors along the same axes, and literal sizes
    that differ only at the rows' dim (the chunk's own row count there)."""
    if len(other.region) != len(first.region) or len(other.cuts) != len(first.cuts):
        raise _Refused(f"chunk {i} does not run the same ops as chunk 0")
    pair: dict[torch.fx.Node, torch.fx.Node] = dict(zip(first.region, other.region))
    cut0 = {c: _cut_of(c) for c in first.cuts}
    cuti = {c: _cut_of(c) for c in other.cuts}
    n0_rows, ni_rows = first.stop - first.start, other.stop - other.start

    def same_arg(a: Any, b: Any) -> bool:
        if isinstance(a, torch.fx.Node):
            if a in pair:
                return pair[a] is b
            if a in cut0:
                return b in cuti and cut0[a][:2] == cuti[b][:2]
            return _same_common(a, b)
        if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
            return type(a) is type(b) and len(a) == len(b) and all(same_arg(x, y) for x, y in zip(a, b))
        if isinstance(a, dict) and isinstance(b, dict):
            return a.keys() == b.keys() and all(same_arg(a[k], b[k]) for k in a)
        return type(a) is type(b) and a == b

    for n0, ni in pair.items():
        if n0.op != ni.op or n0.target is not ni.target or n0.kwargs.keys() != ni.kwargs.keys():
            raise _Refused(f"chunk {i} does not run the same ops as chunk 0 ({ni.name} vs {n0.name})")
        sizes0, sizesi = _sizes(n0), _sizes(ni)
        args0, argsi = list(n0.args), list(ni.args)
        if sizes0 is not None and sizesi is not None:
            p, lit0 = sizes0
            litsi = sizesi[1]
            q = _row_position(n0, spec)
            if len(lit0) != len(litsi) or q is None or q >= len(lit0):
                raise _Refused(f"chunk {i}: {ni.name} has other sizes than chunk 0's {n0.name}")
            for k, (x, y) in enumerate(zip(lit0, litsi)):
                if k == q and isinstance(x, int) and isinstance(y, int) and (x, y) in ((n0_rows, ni_rows), (-1, -1)):
                    continue
                if not same_arg(x, y):
                    raise _Refused(f"chunk {i}: {ni.name} has other sizes than chunk 0's {n0.name}")
            args0, argsi = args0[:p], argsi[:p]
        if not same_arg(args0, argsi) or not same_arg(dict(n0.kwargs), dict(ni.kwargs)):
            raise _Refused(f"chunk {i}: {ni.name} reads other values than chunk 0's {n0.name}")


# ---------------------------------------------------------------------------------------------- rewrite


def _merge(graph: torch.fx.Graph, loop: _Loop, spec: dict[torch.fx.Node, Any], match_id: str) -> torch.fx.Node:
    first = loop.pieces[0]
    rows = first.stop - first.start
    at = loop.sink if loop.pieces[0].store is None else loop.pieces[-1].store
    whole = {c: _cut_of(c)[0] for c in first.cuts}
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    replaced = [n.name for p in loop.pieces for n in p.cuts + p.region]
    for n in first.region:
        with graph.inserting_before(at):
            new = graph.node_copy(n, lambda a: env.get(a, whole.get(a, a)))
        sizes = _sizes(n)
        if sizes is not None:
            p, lit = sizes
            q = _row_position(n, spec)
            if lit[q] == rows:  # the chunk's row count, written literally by the capture
                lit = list(lit)
                lit[q] = loop.total
                args = list(new.args)
                if len(n.args) == p + 1 and isinstance(n.args[p], (list, tuple)):
                    args[p] = type(n.args[p])(lit)
                else:
                    args[p:] = lit
                new.args = tuple(args)
        for key in _KEYS_TO_DERIVE_AGAIN:
            new.meta.pop(key, None)
        new.meta["merged_by"] = match_id
        env[n] = new
    out = env[first.result]
    example = first.result.meta.get("example_value")
    if not (isinstance(example, torch.Tensor) and example.is_contiguous()):
        # a cat and a fresh buffer are contiguous; the layer's own result may be a view
        with graph.inserting_before(at):
            out = graph.call_function(torch.Tensor.contiguous, (out,))
        out.meta.update(module_path=M.module_path(first.result), stack_trace=first.result.meta.get("stack_trace"),
                        merged_by=match_id)
    _fake_example_values([*env.values(), out])
    out.meta["origin"] = replaced
    out.meta["replaces"] = loop.sink.name  # verify compares the loop's value through it
    if first.store is None:
        loop.sink.replace_all_uses_with(out)
    else:
        for u in list(loop.sink.users):
            if not _is_store(u, loop.sink):
                u.replace_input_with(loop.sink, out)
        for p in loop.pieces:
            graph.erase_node(p.store)
    order = {x: i for i, x in enumerate(graph.nodes)}
    dead = {loop.sink} | {n for p in loop.pieces for n in p.cuts + p.region}
    for n in sorted(dead, key=order.get, reverse=True):  # users before what they read
        if not n.users:
            graph.erase_node(n)
    return out


def _fake_example_values(nodes: list[torch.fx.Node]) -> None:
    """The merged nodes' ``example_value`` (a fake tensor at the full row count, as the tracer records
    one): the rules read which values share memory from it. Left out where an input has none."""
    fakes = [a.meta.get(EXAMPLE_VALUE) for n in nodes for a in n.all_input_nodes]
    mode = next((getattr(v, "fake_mode", None) for v in fakes if getattr(v, "fake_mode", None) is not None), None)
    if mode is None:
        return
    with mode:
        for n in nodes:
            args, kwargs = torch.fx.node.map_arg((n.args, n.kwargs), lambda a: a.meta.get(EXAMPLE_VALUE, _MISSING))
            if _MISSING in torch.utils._pytree.tree_leaves((args, kwargs)):
                continue
            try:
                n.meta[EXAMPLE_VALUE] = n.target(*args, **kwargs)
            except Exception:  # noqa: BLE001 - no example value: the rules then take the memory as unknown
                continue


_MISSING = object()


def _check_between(loop: _Loop, graph_nodes: list[torch.fx.Node], order: dict[torch.fx.Node, int]) -> None:
    """Nothing outside the loop's own nodes, between its first node and where the merged layer goes,
    writes in place, draws random numbers, switches a mode or crosses a collective."""
    own = {loop.sink} | {n for p in loop.pieces for n in p.cuts + p.region} | \
        {p.store for p in loop.pieces if p.store is not None}
    lo = min(order[n] for p in loop.pieces for n in p.cuts + p.region)
    hi = order[loop.sink if loop.pieces[0].store is None else loop.pieces[-1].store]
    for n in graph_nodes[lo:hi]:
        if n not in own and _effectful(n):
            raise _Refused(f"{n.name} ({op_name(n)}) runs between the chunks: merging them would move their "
                           "ops past it")
    if loop.pieces[0].store is not None:
        for u in loop.sink.users:
            if not _is_store(u, loop.sink) and order[u] < hi:
                raise _Refused(f"{u.name} reads the buffer before every chunk is stored into it")


def _recognise(loop: _Loop, graph_nodes: list[torch.fx.Node], order: dict[torch.fx.Node, int]
               ) -> tuple[dict[torch.fx.Node, Any], int]:
    """The proof that ``loop`` is one row-independent layer: its first chunk's rows per node, and its
    row count; raises ``_Refused`` with the reason."""
    first = loop.pieces[0]
    rows = first.stop - first.start
    if rows < 2:
        raise _Refused("chunks of one row: the rows' dim cannot be told from a dim of size 1")
    start = 0
    for i, p in enumerate(loop.pieces):
        if p.start != start:
            raise _Refused(f"the chunks do not tile the rows in order (chunk {i} starts at {p.start}, not {start})")
        start = p.stop
    if start != loop.total:
        raise _Refused(f"the chunks cover {start} of {loop.total} rows")
    if loop.pieces[0].store is not None:
        if any(M.dtype(p.result) != M.dtype(loop.sink) for p in loop.pieces):
            raise _Refused("a chunk is stored into a buffer of another dtype (a cast)")
        want = list(M.shape(loop.sink))
        for p in loop.pieces:
            want[loop.axis] = p.stop - p.start
            if list(M.shape(p.result)) != want:
                raise _Refused(f"a chunk of shape {list(M.shape(p.result))} is stored into rows of shape {want}")
    for i, p in enumerate(loop.pieces):
        _check_piece(loop, i, p)
    spec = _row_dims(first, rows)
    if _row_position(first.result, spec) != loop.axis:
        raise _Refused(f"the chunks' rows end up in dim {_row_position(first.result, spec)} of each piece, but "
                       f"the pieces are joined along dim {loop.axis}")
    for i, p in enumerate(loop.pieces[1:], 1):
        _check_same(first, p, i, spec)
    _check_between(loop, graph_nodes, order)
    return spec, rows


def _left_to_chunked_attention(gm: torch.fx.GraphModule, sink: torch.fx.Node) -> bool:
    """A cat of one attention's chunks on slices of common q / k / v: the ``chunked_attention`` rule's."""
    from foldcompile.passes.rules import Candidate, Context
    from foldcompile.passes.rules import attention_chunks

    try:
        return isinstance(attention_chunks.RULES[0].recognise(sink, Context(gm, {}, {})), Candidate)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError):
        return False


def _looks_like_a_loop(loop: _Loop) -> bool:
    """Whether every piece reads a slice of its rows from some tensor (else the cat just joins values)."""
    return all(p.cuts for p in loop.pieces)


@declare(requires=(SHAPE, DTYPE, SYM_SHAPE, EINSUM), ensures=())
def merge_chunk_loops_pass(gm: torch.fx.GraphModule, *, disabled: Iterable[str] = ()) -> PassResult:
    """Merge every row-independent chunk loop of ``gm`` (and of its checkpoint bodies) into one layer.

    Needs normalize and shape_prop. The merged nodes carry no shape meta (it is re-derived at the full
    row count): run shape_prop and classify again before any pass that reads it. ``disabled`` takes
    match ids (``chunk_loop#0``) to leave alone, as ``fuse_pass`` does.

    Record: ``matches`` (``id``, ``rule`` = ``"chunk_loop"``, ``site``, ``origin``: the nodes replaced,
    ``notes``), ``rejections`` (a loop left as it was, with the reason), ``counts``, ``disabled``.
    """
    disabled = set(disabled)
    record: dict[str, Any] = {"matches": [], "rejections": [], "disabled": [],
                              "counts": {RULE: {"matched": 0, "rejected": 0}}}
    changed = False
    n = 0
    owners = [gm] + [m for _, m in gm.named_modules() if isinstance(m, torch.fx.GraphModule) and m is not gm]
    for owner in owners:
        graph = owner.graph
        nodes, order = [], {}
        for sink in list(graph.nodes):
            if sink.op != "call_function" or not (node_has_trait(sink, JOINS) or node_has_trait(sink, FRESH_BUFFER)):
                continue
            if not order or sink not in order:  # first candidate, or the graph changed (a merge)
                nodes = list(graph.nodes)
                order = {x: i for i, x in enumerate(nodes)}
                if sink not in order:  # erased by an earlier merge
                    continue
            loop = _loop_of(sink, order)
            if loop is None:
                continue
            for p in loop.pieces:
                _fill_region(loop, p, nodes)
            if not _looks_like_a_loop(loop):
                continue
            if loop.pieces[0].store is None and _left_to_chunked_attention(owner, sink):
                continue
            site = M.site(loop.pieces[0].result)
            try:
                spec, rows = _recognise(loop, nodes, order)
            except _Refused as why:
                record["rejections"].append({"rule": RULE, "site": site, "node": sink.name, "reason": str(why),
                                             "source": M.source_line(loop.pieces[0].result)})
                record["counts"][RULE]["rejected"] += 1
                continue
            mid = f"{RULE}#{n}"
            n += 1
            if mid in disabled:
                record["disabled"].append({"id": mid, "rule": RULE, "site": site})
                continue
            origin = [x.name for p in loop.pieces for x in p.cuts + p.region] + [sink.name]
            source = M.source_line(loop.pieces[0].result)
            _merge(graph, loop, spec, mid)
            order = {}  # positions moved
            record["matches"].append({
                "id": mid, "rule": RULE, "site": site, "origin": origin, "source": source,
                "notes": [f"{len(loop.pieces)} chunks of {rows} rows merged: the layer runs once on all "
                          f"{loop.total} rows ({'stored into a buffer' if loop.pieces[0].store is not None else 'cat'}"
                          f" along dim {loop.axis})"],
                "graph": "" if owner is gm else owner.__class__.__name__})
            record["counts"][RULE]["matched"] += 1
            changed = True
        if changed:
            graph.lint()
            owner.recompile()
    _log.info("merge_chunk_loops: %d merged, %d left", record["counts"][RULE]["matched"],
              record["counts"][RULE]["rejected"])
    return PassResult(gm, changed, record)
