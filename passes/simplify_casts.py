"""Remove dtype casts that change no value: casts to the dtype a tensor has, and exact round trips.

Mixed-precision code casts a lot, and many casts compute nothing. Boltz's triangle multiplication writes
``a, b = torch.chunk(x.float(), 2, dim=-1)`` on a bf16 ``x`` and the einsum after it runs under autocast,
which casts ``a`` and ``b`` back to bf16: ``x.to(fp32).chunk(2)[i].to(bf16)`` is ``x.chunk(2)[i]``, value
for value, because fp32 holds every bf16 value. The fusion rules see the einsum's operands as they are.

``simplify_casts_pass(gm)`` needs ``meta["dtype"]`` (shape_prop) and, for the top-level graph and every
subgraph (checkpoint bodies):

- a cast to the dtype its input already has (``x.to(x.dtype)``, ``x.float()`` on an fp32 ``x``) is
  replaced by its input (eager returns the input itself: nothing changes, aliasing included);
- a cast ``c(v, d)`` whose input ``v`` is reached from an earlier tensor ``x`` of dtype ``d`` through casts
  to dtypes that hold every value of ``d`` (:func:`~foldcompile.passes.registry.holds_every_value`: bf16 /
  fp16 -> fp32 or fp64, fp32 -> fp64) and ops that only move elements
  (:data:`~foldcompile.passes.registry.CAST_COMMUTES`: views, chunk / split and their getitem, permute, ...)
  is replaced by those element-moving ops applied to ``x`` itself (new nodes where the old ones have other
  readers; the old ones go when nothing reads them). The gradient is the same too: the backward of a
  widening cast and back is the same pair of casts, exact on the narrow gradient.

Never removed: a narrowing cast followed by a widening one (``x_fp32.to(bf16).to(fp32)`` rounds x), a
round trip through a dtype that does not hold every value (fp16 -> bf16 -> fp16 loses mantissa bits),
casts with a device, ``copy=True`` or another tensor's dtype. A round trip is also kept, with the reason
in ``record["kept"]``, where taking it out would make a fresh copy an alias of ``x``, which someone could
tell: an in-place write anywhere in the graph that may touch either value, or the value (or a view of it)
being a graph output; where a grad-mode switch lies between the casts, or the edge of an autocast region
(fusion matches within one region: Boltz's ``q.float()`` as the first op of an ``autocast(enabled=False)``
region marks where the fused attention's inputs enter it); and where a wide value on the way
has other readers (``w = x.float(); w.exp() + w.to(bf16)``): the forward would still be exact, but the
gradients its readers send back, summed in fp32 before one rounding to bf16, would be summed in bf16, each
sum rounded. (The pieces of a ``chunk`` / ``split`` are disjoint: their readers' gradients are not summed.)

The record: ``noop_casts`` and ``round_trips`` (counts), ``removed`` (the cast nodes taken out, by name,
with their source dtype route), ``kept`` (reason -> count)::

    >>> import torch, torch.fx
    >>> from foldcompile.passes import normalize_pass, shape_prop_pass
    >>> def f(x, w):
    ...     a, b = torch.chunk(x.float(), 2, dim=-1)                 # bf16 -> fp32, split
    ...     return torch.einsum("ik,jk->ij", a.to(torch.bfloat16), b.to(torch.bfloat16)) * w.float()
    >>> ex = (torch.randn(5, 8).to(torch.bfloat16), torch.randn(5, 5))
    >>> gm = normalize_pass(torch.fx.symbolic_trace(f)).graph_module
    >>> _ = shape_prop_pass(gm, ex, dims={})
    >>> res = simplify_casts_pass(gm)
    >>> res.record["noop_casts"], res.record["round_trips"], res.record["removed"]
    (1, 2, ['to (bfloat16 -> float32 -> bfloat16)', 'to_1 (bfloat16 -> float32 -> bfloat16)', 'float_2 (float32)'])
    >>> print(gm.code.strip())
    def forward(self, x, w):
        chunk_1 = torch.chunk(x, 2, dim = -1);  x = None
        getitem_2 = chunk_1[0]
        getitem_3 = chunk_1[1];  chunk_1 = None
        einsum = torch.functional.einsum('ik,jk->ij', getitem_2, getitem_3);  getitem_2 = getitem_3 = None
        mul = einsum * w;  einsum = w = None
        return mul
    >>> torch.equal(gm(*ex), f(*ex))
    True
"""
from __future__ import annotations

import logging
import operator
from collections import Counter
from typing import Any

import torch
import torch.fx

from foldcompile.passes.base import PassResult, declare
from foldcompile.passes.meta import DTYPE, EXAMPLE_VALUE, MULTI_OUTPUT, memory_of
from foldcompile.passes.registry import (CAST_COMMUTES, cast_target, has_trait, holds_every_value, target_of,
                                         writes_in_place)

_log = logging.getLogger(__name__)  # foldcompile.passes.<name>: progress of this pass

__all__ = ["simplify_casts_pass"]


def _dtype(n: Any) -> Any:
    return n.meta.get(DTYPE) if isinstance(n, torch.fx.Node) else None


def _moves_elements(n: torch.fx.Node) -> bool:
    """``n`` only moves its first argument's elements, and reads no other tensor."""
    return (n.op == "call_function" and bool(n.args) and isinstance(n.args[0], torch.fx.Node)
            and has_trait(target_of(n), CAST_COMMUTES) and not writes_in_place(n)
            and not any(isinstance(a, torch.fx.Node) for a in [*n.args[1:], *n.kwargs.values()]))


def _round_trip(c: torch.fx.Node, d: torch.dtype) -> tuple[torch.fx.Node, list[torch.fx.Node], list] | None:
    """``(x, moves, route)`` when cast ``c`` (to ``d``) reads, through element moves and casts to dtypes that
    hold every value of ``d``, a tensor ``x`` of dtype ``d``: ``moves`` are the element moves from ``x`` on
    (first to last), ``route`` the dtypes in between."""
    moves: list[torch.fx.Node] = []
    route: list[Any] = []
    v = c.args[0]
    while isinstance(v, torch.fx.Node) and v.op == "call_function":
        t = cast_target(v)
        if t is not None:
            if not holds_every_value(t, d):
                return None  # rounds on the way (a narrowing cast, or fp16 through bf16)
            route.append(t)
            v = v.args[0]
            if _dtype(v) == d and isinstance(v, torch.fx.Node):
                return v, moves[::-1], [d, *route[::-1], d]
        elif _moves_elements(v):
            moves.append(v)
            v = v.args[0]
        else:
            return None
    return None


def _reaches_output(n: torch.fx.Node) -> bool:
    """``n``'s value, or a view of it (any element move may return one), is a graph output."""
    work, seen = [n], set()
    while work:
        m = work.pop()
        for u in m.users:
            if u.op == "output":
                return True
            if u not in seen and _moves_elements(u) and u.args[0] is m:
                seen.add(u)
                work.append(u)
    return False


def _wide_part(c: torch.fx.Node, x: torch.fx.Node) -> list[torch.fx.Node]:
    """The nodes between ``x`` and the cast ``c`` (the widening cast, and the casts and moves after it)."""
    path, v = [], c.args[0]
    while v is not x:
        path.append(v)
        v = v.args[0]
    return path


def _why_kept(c: torch.fx.Node, x: torch.fx.Node, writes: list[torch.fx.Node], modes: list[int],
              order: dict[torch.fx.Node, int]) -> str | None:
    for v in _wide_part(c, x):
        if v.meta.get(MULTI_OUTPUT):  # distinct pieces only (getitem of an int each)
            pieces = [u.args[1] for u in v.users if u.target is operator.getitem and isinstance(u.args[1], int)]
            summed = len(pieces) != len(v.users) or len(set(pieces)) != len(pieces)
        else:
            summed = len(v.users) != 1
        if summed:
            return (f"the wide value {v.name} has other readers: their gradients, summed in the wide dtype, would be "
                    "summed in the narrow one")
    if _reaches_output(c):
        return "its value is a graph output: without the casts it would be the input's memory"
    mem = {memory_of(x), memory_of(c)}
    for w in writes:
        written = memory_of(w.args[0]) if w.args and isinstance(w.args[0], torch.fx.Node) else None
        if written is None or None in mem or written in mem:
            return f"an in-place write ({w.name}) may touch the value: without the casts it would alias the input"
    if x not in order or c not in order:  # a node this pass made: number the graph again
        order.clear()
        order.update({n: i for i, n in enumerate(c.graph.nodes)})
        modes[:] = [order[n] for n in c.graph.nodes if n.op == "call_function" and n.target is torch._C._set_grad_enabled]
    if any(order[x] < i < order[c] for i in modes):
        return "a grad-mode switch lies between the casts"
    return None


def _clone(graph: torch.fx.Graph, m: torch.fx.Node, src: torch.fx.Node, d: torch.dtype,
           made: dict[torch.fx.Node, torch.fx.Node], before: torch.fx.Node) -> torch.fx.Node:
    """The element move ``m`` applied to ``src`` (a node of dtype ``d``) instead of ``m``'s input, once."""
    if m in made:
        return made[m]
    with graph.inserting_before(before):
        new = graph.call_function(m.target, (src, *m.args[1:]), dict(m.kwargs))
    new.meta = {k: v for k, v in m.meta.items() if k not in (EXAMPLE_VALUE, "val", "tensor_meta", "cost")}
    old = m.meta.get(DTYPE)
    new.meta[DTYPE] = tuple(d for _ in old) if isinstance(old, tuple) else d
    made[m] = new
    return new


def _simplify(graph: torch.fx.Graph, record: dict) -> bool:
    changed = False
    order = {n: i for i, n in enumerate(graph.nodes)}
    writes = [n for n in graph.nodes if writes_in_place(n)]
    modes = [order[n] for n in graph.nodes if n.op == "call_function" and n.target is torch._C._set_grad_enabled]
    made: dict[torch.fx.Node, torch.fx.Node] = {}  # element moves re-applied to the narrow tensor
    from foldcompile.passes.fuse import _autocast_regions  # (fuse imports this pass)
    regions = _autocast_regions(graph)
    for c in list(graph.nodes):
        d = cast_target(c) if c.op == "call_function" else None
        if d is None or _dtype(c) != d or not isinstance(c.args[0], torch.fx.Node):
            continue
        src = c.args[0]
        if any(regions.get(v) != regions.get(c) for v in [src, *c.users]):
            # a cast at an autocast region's edge (Boltz's ``q.float()`` first thing inside ``autocast(enabled=False)``,
            # ``o.to(v.dtype)`` last): fusion matches within one region, the cast is where this one starts or ends
            record["kept"]["at the edge of an autocast region"] += 1
            continue
        if _dtype(src) == d and src.meta.get("shape") == c.meta.get("shape"):
            c.replace_all_uses_with(src)
            _erase(graph, c)
            record["noop_casts"] += 1
            record["removed"].append(f"{c.name} ({str(d).removeprefix('torch.')})")
            changed = True
            continue
        found = _round_trip(c, d)
        if found is None:
            continue
        x, moves, route = found
        why = ("at the edge of an autocast region" if any(regions.get(v) != regions.get(c)
                                                           for v in [x, *_wide_part(c, x), *c.users])
               else _why_kept(c, x, writes, modes, order))
        if why is not None:
            record["kept"][why] += 1
            continue
        value = x
        for m in moves:
            value = _clone(graph, m, value, d, made, c)
        c.replace_all_uses_with(value)
        _erase(graph, c)
        record["round_trips"] += 1
        record["removed"].append(f"{c.name} ({' -> '.join(str(t).removeprefix('torch.') for t in route)})")
        changed = True
    return changed


def _erase(graph: torch.fx.Graph, c: torch.fx.Node) -> None:
    """Erase the cast ``c`` (no readers left) and the casts and element moves above it nothing reads any more."""
    work = [c]
    while work:
        n = work.pop()
        if n.users or n.op != "call_function" or not (n is c or cast_target(n) is not None or _moves_elements(n)):
            continue
        inputs = n.all_input_nodes
        graph.erase_node(n)
        work.extend(inputs)


@declare(requires=(DTYPE,), ensures=())
def simplify_casts_pass(gm: torch.fx.GraphModule) -> PassResult:
    """Remove the casts that change no value (see the module docstring)."""
    record: dict[str, Any] = {"noop_casts": 0, "round_trips": 0, "removed": [], "kept": Counter()}
    changed = False
    for owner in [gm] + [m for _, m in gm.named_modules() if isinstance(m, torch.fx.GraphModule) and m is not gm]:
        if _simplify(owner.graph, record):
            owner.graph.lint()
            owner.recompile()
            changed = True
    record["kept"] = dict(record["kept"])
    if changed:
        _log.info("simplify_casts: %d no-op casts and %d round trips removed", record["noop_casts"],
                  record["round_trips"])
    return PassResult(gm, changed, record)
