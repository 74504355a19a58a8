"""Schedule the collectives of a lowered rank graph: issue early, wait late, in the order they are needed.

``localize_pass`` leaves each start right before its wait. This pass moves them apart:

- each **wait** goes just before its first consumer;
- each **start** goes as early as its producer allows, but collectives are **issued in the order
  they are needed** (the order of their waits): NCCL runs a communicator's collectives in issue
  order, so a collective started early but needed late would hold up one needed sooner;
- at most ``max_bytes_in_flight`` bytes of collectives are in flight at any point: a start that
  would exceed it waits until an earlier collective has been waited for;
- a pair never leaves the grad-mode / autocast region the lowering put it in (next to its
  producer): run under another grad mode its autograd nodes would not be recorded.

The compute nodes keep their order. Backward mirrors the schedule by itself: a start/wait pair's
backward issues the transposed collective where the wait was and waits for it where the start
was, so the backward of the compute scheduled between them overlaps with it
(docs/DAP.md, "The async pair").

The record says, for each collective, where it is issued and waited, how many compute nodes
(and how many of their FLOPs at the example sizes) run between the two, and how many the graph's
order allows (between its producer and its first consumer) with the reason when fewer were
scheduled. It also measures the overlap against what **any** order allows
(``passes/dependence.py``: the compute independent of the collective, ``independent`` nodes and
their ``flops_independent`` at the stated sizes) in time at the stated sizes (``passes/schedule_model.py``): ``comm_s`` (the
collective on the link), ``between_s`` (the compute between its start and wait), ``independent_s``,
and ``covered``: the share of the collective's time hidden, of what the graph could hide,
``min(between_s, comm_s) / min(independent_s, comm_s)`` (1 where nothing can be hidden). Compute
that already hides a collective issued earlier cannot hide this one as well (one stream, one
link): ``independent_left_s`` leaves it out, ``covered_of_left`` measures against it. The time
model run on the schedule (``simulate``) gives each collective's ``exposed_s`` (how long its wait
blocks) and the totals ``compute_s``, ``comm_s``, ``hidden_s``, ``hideable_s`` (the sum of the
collectives' ``min(independent_s, comm_s)``), ``total_s``. ``passes/overlap_compute.py`` reorders
the compute beforehand so that these shares are high.

    >>> import torch, torch.fx
    >>> from foldcompile.distributed import all_gather_start, wait
    >>> g = torch.fx.Graph()
    >>> x, y = g.placeholder("x"), g.placeholder("y")
    >>> a = g.call_function(torch.sin, (x,), name="a")
    >>> b = g.call_function(torch.cos, (y,), name="b")                 # independent of the gather
    >>> h = g.call_function(all_gather_start, (a, 0), {"grad_placement": "partial"}, name="h_a")
    >>> full = g.call_function(wait, (h,), name="a_full")
    >>> _ = g.output(g.call_function(torch.add, (full, b), name="out"))
    >>> gm = torch.fx.GraphModule(torch.nn.Module(), g)
    >>> for n in gm.graph.nodes:
    ...     n.meta.update(shape=(4, 4), dtype=torch.float32)
    >>> result = schedule_collectives_pass(gm)
    >>> [n.name for n in gm.graph.nodes]
    ['x', 'y', 'a', 'h_a', 'b', 'a_full', 'out', 'output']
    >>> {k: result.record["collectives"][0][k] for k in ("issued_after", "waited_before", "between", "allowed")}
    {'issued_after': 'a', 'waited_before': 'out', 'between': 1, 'allowed': 1}
"""
from __future__ import annotations

import logging
import math
from typing import Any, Mapping, Optional

import sympy
import torch
import torch.fx

from foldcompile.distributed.collectives import wait
from foldcompile.passes.base import PassError, PassResult, declare, describe_node
from foldcompile.passes.dependence import Dependence, pairs_of
from foldcompile.passes.localize import collective_of
from foldcompile.passes.meta import DTYPE, SHAPE
from foldcompile.passes.registry import changes_mode
from foldcompile.passes.schedule_model import ScheduleModel, simulate
from foldcompile.passes.shape_prop import dim_symbol
from foldcompile.passes.shard import ShardCosts

_log = logging.getLogger(__name__)  # foldcompile.passes.<name>: progress of this pass

__all__ = ["schedule_collectives_pass", "need_order", "DEFAULT_MAX_BYTES_IN_FLIGHT"]

DEFAULT_MAX_BYTES_IN_FLIGHT = 512 * 2 ** 20


def _bytes(n: Any) -> int:
    if not isinstance(n, torch.fx.Node):
        return 0
    shape, dtype = n.meta.get(SHAPE), n.meta.get(DTYPE)
    if not isinstance(shape, tuple) or not isinstance(dtype, torch.dtype) or any(not isinstance(s, int) for s in shape):
        return 0
    return math.prod(shape) * dtype.itemsize


def _flops(n: torch.fx.Node, subs: dict) -> int:
    cost = n.meta.get("cost") or {}
    try:
        return int(sympy.sympify(cost.get("flops", 0)).subs(subs))
    except (TypeError, ValueError):
        return 0


@declare(requires=(SHAPE, DTYPE), ensures=())
def schedule_collectives_pass(gm: torch.fx.GraphModule, *,
                              max_bytes_in_flight: int = DEFAULT_MAX_BYTES_IN_FLIGHT,
                              costs: Optional[ShardCosts] = None,
                              at: Optional[Mapping[str, int]] = None, keep_order: bool = False) -> PassResult:
    """Reorder the starts and waits of ``gm`` (see the module docstring); ``costs`` and ``at``: the
    machine and the sizes the overlap is measured at (default: the planner's, the training crop).

    ``keep_order``: issue and wait the collectives in the order their starts already have (after
    ``overlap_compute_pass``, which orders them by need in the model's order) instead of the need
    order of ``gm``'s compute: a compute order chosen from a rank's local sizes may differ between
    ranks, the order of the collectives must not (every rank issues the same collectives in the
    same order, forward and, through the waits' order, backward)."""
    graph = gm.graph
    nodes = list(graph.nodes)
    pairs = pairs_of(gm)
    if not pairs:
        _log.info("schedule_collectives: no collectives")
        return PassResult(gm, False, {"collectives": [], "max_bytes_in_flight": max_bytes_in_flight})
    slots = _Slots(nodes, pairs)
    compute, pos, need, earliest, need_cache = slots.compute, slots.pos, slots.need, slots.earliest, slots.cache

    if keep_order:
        # the starts' order is the issue order (set by overlap_compute_pass, the same on every rank);
        # waits follow it (first in, first out), each no later than the next one's need
        order = list(range(len(pairs)))
        for i in order:
            need(pairs[i][1])
        for i in reversed(order[:-1]):
            w, later = pairs[i][1], pairs[i + 1][1]
            need_cache[w] = min(need_cache[w], need_cache[later])
    else:
        index = {n: i for i, n in enumerate(nodes)}
        order = sorted(range(len(pairs)), key=lambda i: (need(pairs[i][1]), index[pairs[i][0]]))
    slot_of: dict[int, int] = {}
    why: dict[int, Optional[str]] = {}
    last = 0
    for i in order:
        s, w = pairs[i]
        lo, hi = earliest(s), need(w)
        slot = max(lo, last)
        reason = "issued after the collectives needed before it" if slot > lo else None
        size = max(_bytes(s.args[0]), _bytes(w))

        def in_flight(k: int) -> list[int]:
            return [j for j in slot_of if slot_of[j] <= k < need(pairs[j][1])]

        while slot < hi:
            flying = in_flight(slot)
            if not flying or sum(max(_bytes(pairs[j][0].args[0]), _bytes(pairs[j][1])) for j in flying) + size \
                    <= max_bytes_in_flight:
                break
            slot = min(hi, min(need(pairs[j][1]) for j in flying))
            reason = f"waits for bytes in flight (at most {max_bytes_in_flight})"
        slot_of[i], why[i] = slot, reason
        last = slot
    # the new order: at each slot, its starts and waits, then the compute node. Within a slot a start
    # comes before its own wait, after a wait it reads (a chain) or waits for (bytes in flight), and
    # after the starts needed before it; otherwise starts first (their transfer runs while we wait)
    rank_in_order = {i: k for k, i in enumerate(order)}
    new: list[torch.fx.Node] = []
    for k, c in enumerate(compute):
        here_w = [i for i in range(len(pairs)) if need(pairs[i][1]) == k]
        here_s = sorted((i for i in slot_of if slot_of[i] == k), key=rank_in_order.get)
        items = [("s", i) for i in here_s] + [("w", i) for i in here_w]
        before: dict[tuple, set] = {it: set() for it in items}
        for i in here_s:
            if ("w", i) in before:
                before[("w", i)].add(("s", i))
            deps = {j for j in here_w if pairs[j][1] in pairs[i][0].all_input_nodes}
            if why[i] and why[i].startswith("waits for bytes"):
                deps |= {j for j in here_w if j != i}
            before[("s", i)] |= {("w", j) for j in deps}
        for a, b in zip(here_s, here_s[1:]):
            before[("s", b)].add(("s", a))
        done: set = set()
        while len(done) < len(items):
            ready = [it for it in items if it not in done and before[it] <= done]
            if not ready:
                raise PassError(f"schedule_collectives: the collectives at {describe_node(c)} depend on each other "
                                "in a cycle")
            pick = min(ready, key=lambda it: (it[0] != "s", rank_in_order[it[1]]))
            done.add(pick)
            new.append(pairs[pick[1]][0 if pick[0] == "s" else 1])
        new.append(c)
    if len(new) != len(nodes):
        raise PassError(f"schedule_collectives: scheduled {len(new)} of {len(nodes)} nodes")
    for a, b in zip(new, new[1:]):
        a.append(b)
    graph.lint()
    gm.recompile()
    subs = {dim_symbol(k): v for k, v in dict(gm.meta.get("dims", {})).items()}
    dep, model = Dependence(gm), ScheduleModel(gm, costs, at)
    where = {n: j for j, n in enumerate(graph.nodes)}
    timeline = simulate(list(graph.nodes), model)
    record: list[dict[str, Any]] = []
    overlap: dict[int, dict[str, Any]] = {}
    taken: set[torch.fx.Node] = set()       # compute in the windows of the collectives issued before
    for i in sorted(order, key=lambda i: where[pairs[i][0]]):
        s, w = pairs[i]
        free = dep.independent(s, w)
        inside = {n for n in free if where[s] < where[n] < where[w]}
        left = [n for n in free if n in inside or n not in taken]
        taken |= inside
        comm_s = model.comm_seconds(s)
        between_s, free_s = sum(map(model.seconds, inside)), sum(map(model.seconds, free))
        left_s = sum(map(model.seconds, left))
        overlap[i] = {
            "independent": len(free), "flops_independent": int(sum(model.flops(c) for c in free)),
            "comm_s": comm_s, "between_s": between_s, "independent_s": free_s, "independent_left_s": left_s,
            "covered": _share(between_s, free_s, comm_s), "covered_of_left": _share(between_s, left_s, comm_s),
            "exposed_s": timeline["exposed_s"].get(s.name, 0.0)}
    for i in order:
        s, w = pairs[i]
        lo, k, hi = earliest(s), slot_of[i], need(w)
        record.append({
            "kind": collective_of(s), "start": s.name, "wait": w.name,
            "issued_after": compute[k - 1].name if k > 0 else None, "waited_before": compute[hi].name,
            "between": hi - k, "allowed": hi - lo,
            "flops_between": sum(_flops(c, subs) for c in compute[k:hi]),
            "flops_allowed": sum(_flops(c, subs) for c in compute[lo:hi]),
            "bytes": max(_bytes(s.args[0]), _bytes(w)), "delayed": why[i], **overlap[i]})
    changed = [n.name for n in nodes] != [n.name for n in graph.nodes]
    hideable = sum(min(c["independent_s"], c["comm_s"]) for c in record)
    hidden = sum(c["comm_s"] - c["exposed_s"] for c in record)
    _log.info("schedule_collectives: %d start/wait pairs scheduled, at most %d bytes in flight", len(pairs),
              max_bytes_in_flight)
    return PassResult(gm, changed, {"collectives": record, "max_bytes_in_flight": max_bytes_in_flight,
                                    "at": dict(model.sizes), "compute_s": timeline["compute_s"],
                                    "total_s": timeline["total_s"], "comm_s": sum(c["comm_s"] for c in record),
                                    "hidden_s": hidden, "hideable_s": hideable})


class _Slots:
    """Where each wait is needed and each start may go, as slots of the compute order (slot k: before
    the k-th compute node). Grad-mode and autocast changes split the graph into regions; a pair stays
    in the region where the lowering put it (a start or wait run under no_grad records no autograd
    node: the gradient is lost)."""

    def __init__(self, nodes: list[torch.fx.Node], pairs: list[tuple[torch.fx.Node, torch.fx.Node]]):
        moving = {n for p in pairs for n in p}
        self.compute = [n for n in nodes if n not in moving]
        self.pos = {n: i for i, n in enumerate(self.compute)}
        self.wait_of = {s: w for s, w in pairs}
        self.start_of = {w: s for s, w in pairs}
        region_at_slot = [0]
        for c in self.compute:
            region_at_slot.append(region_at_slot[-1] + changes_mode(c))
        original = {n: i for i, n in enumerate(nodes)}
        self.region_of: dict[torch.fx.Node, tuple[int, int]] = {}
        for s, _w in pairs:
            r = sum(1 for n in nodes[:original[s]] if n in self.pos and changes_mode(n))
            slots = [k for k in range(len(self.compute)) if region_at_slot[k] == r]
            self.region_of[s] = (slots[0], slots[-1])
        self.cache: dict[torch.fx.Node, int] = {}

    def need(self, w: torch.fx.Node) -> int:
        """The slot where wait ``w`` is needed: before its first reader (for a start reading it: where
        that start's own wait is needed), at the latest at the end of its region."""
        if w not in self.cache:
            slots = [self.pos[u] if u in self.pos else self.need(self.wait_of[u]) for u in w.users]
            end = self.region_of[self.start_of[w]][1]
            self.cache[w] = min(min(slots) if slots else self.pos[self.compute[-1]], end)
        return self.cache[w]

    def earliest(self, s: torch.fx.Node) -> int:
        """The first slot start ``s`` may go to: after its inputs, in its region."""
        slots = [self.region_of[s][0]]
        for p in s.all_input_nodes:
            slots.append(self.pos[p] + 1 if p in self.pos else self.need(p))
        return max(slots)


def need_order(gm: torch.fx.GraphModule) -> list[tuple[torch.fx.Node, torch.fx.Node]]:
    """The (start, wait) pairs of ``gm`` in the order their results are needed in its compute order
    (ties: graph order), the order :func:`schedule_collectives_pass` issues them in."""
    nodes = list(gm.graph.nodes)
    pairs = pairs_of(gm)
    if not pairs:
        return []
    slots = _Slots(nodes, pairs)
    index = {n: i for i, n in enumerate(nodes)}
    return sorted(pairs, key=lambda p: (slots.need(p[1]), index[p[0]]))


def _share(between_s: float, allowed_s: float, comm_s: float) -> float:
    """The share of a collective's time hidden, of what ``allowed_s`` of compute could hide."""
    can = min(allowed_s, comm_s)
    return min(between_s, comm_s) / can if can > 0 else 1.0
