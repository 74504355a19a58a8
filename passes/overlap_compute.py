"""Reorder a rank graph's compute so that independent work runs while each collective is in flight.

The lowering keeps the model's order of compute, so a collective overlaps only what the model happens
to run between the producer of its input and the first reader of its result: in the triangle
multiplication the output gate is computed after the product that needs the gathered operand, and
the other operand's projection before the gathered one's. This pass lists the compute again, by
simulating one compute stream and one link at the stated sizes (``passes/schedule_model.py``):

- the collectives go in the order they are needed (the order their first readers have in the
  model's order: NCCL runs a communicator's collectives in issue order), each issued as soon as its
  input exists and at most ``max_bytes_in_flight`` bytes are in flight; the link runs them one after
  another;
- the compute that leads to the next collective's input runs first (so it is issued early); while
  a collective is in flight, the ready compute runs in the model's order, until the collective is
  done by the time model (more would only take work a later collective could hide behind); then it
  is waited for. A wait whose collective is not done is taken only when nothing else is ready;
- such filling work is taken only while the live bytes stay within the model order's peak plus
  ``max_extra_live_bytes`` (hoisting a node keeps its output alive longer); if the finished order
  still peaks above that, only work that frees at least what it allocates fills the windows, and
  failing that the model's order is kept (``record["fill"]`` says which). The collectives' own
  buffers are bounded by ``max_bytes_in_flight``, not counted here;
- every constraint of ``passes/dependence.py`` holds: data edges, the order of random draws and
  unknown ops, barriers (grad mode, autocast, in-place writes) crossed by nothing.

It moves compute only; ``schedule_collectives_pass`` then puts each start and wait where it belongs
in the new order (as early as the producer allows / just before the first reader). The backward
follows by itself: autograd runs the backward in the reverse order of the forward, so the backward
of the compute placed between a start and its wait runs between the wait's backward (which issues
the transposed collective) and the start's backward (which waits for it).

Record: ``moved`` (compute nodes whose position among the compute changed), ``reordered`` and
``fill``, ``collectives`` (in issue order, per collective: the estimated link time, the compute
time the simulation put in its window), and the peak live bytes of the model's order and of the
new one.

    >>> import torch, torch.fx
    >>> from foldcompile.distributed import all_gather_start, wait
    >>> g = torch.fx.Graph()
    >>> x = g.placeholder("x")
    >>> b = g.call_function(torch.sin, (x,), name="b")                 # the gathered operand
    >>> h = g.call_function(all_gather_start, (b, 0), {"grad_placement": "partial"}, name="h_b")
    >>> full = g.call_function(wait, (h,), name="b_full")
    >>> p = g.call_function(torch.mul, (full, x), name="product")       # needs the gather
    >>> gate = g.call_function(torch.sigmoid, (x,), name="gate")        # independent, after it
    >>> _ = g.output(g.call_function(torch.mul, (p, gate), name="out"))
    >>> gm = torch.fx.GraphModule(torch.nn.Module(), g)
    >>> for n in gm.graph.nodes:
    ...     n.meta.update(shape=(64, 64), dtype=torch.float32)
    >>> result = overlap_compute_pass(gm)
    >>> [n.name for n in gm.graph.nodes]
    ['x', 'b', 'h_b', 'gate', 'b_full', 'product', 'out', 'output']
    >>> result.record["moved"]
    ['gate']
"""
from __future__ import annotations

import bisect
import heapq
import logging
from typing import Any, Mapping, Optional

import torch
import torch.fx

from foldcompile.passes.base import PassError, PassResult, declare, describe_node
from foldcompile.passes.dependence import Dependence
from foldcompile.passes.meta import DTYPE, SHAPE
from foldcompile.passes.schedule_collectives import DEFAULT_MAX_BYTES_IN_FLIGHT, need_order
from foldcompile.passes.schedule_model import ScheduleModel, alias_roots, allocates, live_bytes_peak, reads
from foldcompile.passes.shard import ShardCosts

_log = logging.getLogger(__name__)  # foldcompile.passes.<name>: progress of this pass

__all__ = ["overlap_compute_pass"]


class _Region:
    """The list scheduler of one region (the nodes between two barriers)."""

    def __init__(self, dep: Dependence, nodes: list[torch.fx.Node], pairs: list, model: ScheduleModel,
                 cap: float, live_cap: float, roots: Mapping[torch.fx.Node, torch.fx.Node], fill: str):
        """``pairs``: the region's collectives in the order they are issued; ``fill``: which work may fill
        a window, ``"bounded"`` (the live bytes after it within ``live_cap``) or ``"no_growth"`` (work
        that frees at least what it allocates)."""
        self.dep, self.nodes, self.model, self.cap, self.live_cap = dep, nodes, model, cap, live_cap
        self.fill = fill
        self.index = {n: i for i, n in enumerate(nodes)}
        self.members = set(nodes)
        self.order = list(pairs)
        self.size = {s: max(model.bytes_of(s.args[0]) if s.args else 0, model.bytes_of(w)) for s, w in pairs}
        self.preds = {n: {p for p in dep.dag.predecessors(n) if p in self.members} for n in nodes}
        self.succs = {n: [u for u in dep.dag.successors(n) if u in self.members] for n in nodes}
        self.towards = {s: dep.ancestors(s) & self.members for s, _ in self.order}
        # liveness: each storage owner is freed when its last reader in the region has run
        self.roots = roots
        self.readers: dict[torch.fx.Node, int] = {}
        self.outside: set[torch.fx.Node] = set()   # owners read after the region (or by the output)
        for n in nodes:
            for r in reads(n, roots):
                self.readers[r] = self.readers.get(r, 0) + 1
            if any(u not in self.members for u in n.users):
                self.outside.add(roots.get(n, n))

    def run(self) -> tuple[list[torch.fx.Node], dict[torch.fx.Node, float]]:
        left = {n: len(self.preds[n]) for n in self.nodes}
        ready: list[tuple[int, torch.fx.Node]] = []
        for n in self.nodes:
            if not left[n] and self.dep.is_compute(n):
                heapq.heappush(ready, (self.index[n], n))
        done: set[torch.fx.Node] = set()
        allocated: set[torch.fx.Node] = set()
        out: list[torch.fx.Node] = []
        window: dict[torch.fx.Node, float] = {s: 0.0 for s, _ in self.order}
        clock = link_free = 0.0
        issued = waited = 0
        end: dict[torch.fx.Node, float] = {}
        flying_bytes = 0.0
        live = 0.0
        readers = dict(self.readers)

        def emit(n: torch.fx.Node) -> None:
            nonlocal live
            out.append(n)
            done.add(n)
            if allocates(n):
                live += self.model.bytes_of(n)
                allocated.add(n)
            for r in reads(n, self.roots):
                readers[r] -= 1
                if not readers[r] and r in allocated and r not in self.outside:
                    live -= self.model.bytes_of(r)
            for u in self.succs[n]:
                left[u] -= 1
                if not left[u] and self.dep.is_compute(u):
                    heapq.heappush(ready, (self.index[u], u))

        def fits(n: torch.fx.Node) -> bool:
            grow = self.model.bytes_of(n) if allocates(n) else 0
            freed = sum(self.model.bytes_of(r) for r in reads(n, self.roots)
                        if readers.get(r) == 1 and r in allocated and r not in self.outside)
            return live + grow - freed <= (self.live_cap if self.fill == "bounded" else live)

        while len(out) < len(self.nodes):
            # issue every collective whose turn it is, whose input exists and that fits in flight
            while issued < len(self.order):
                s, _w = self.order[issued]
                if left[s] or (issued > waited and flying_bytes + self.size[s] > self.cap):
                    break
                emit(s)
                end[s] = max(clock, link_free) + self.model.comm_seconds(s)
                link_free = end[s]
                flying_bytes += self.size[s]
                issued += 1
            head = self.order[waited] if waited < issued else None
            if head is not None and clock >= end[head[0]]:
                emit(head[1])
                flying_bytes -= self.size[head[0]]
                waited += 1
                continue
            pick = self._pick(ready, issued, head is not None, fits)
            if pick is not None:
                emit(pick)
                t = self.model.seconds(pick)
                clock += t
                for s, _w in self.order[waited:issued]:
                    window[s] += t
                continue
            if head is None:
                stuck = [n.name for n in self.nodes if n not in done][:5]
                raise PassError(f"overlap_compute: nothing can run next in the region before {stuck} "
                                "(a cycle through a collective?)")
            clock = max(clock, end[head[0]])
            emit(head[1])
            flying_bytes -= self.size[head[0]]
            waited += 1
        return out, window

    def _pick(self, ready: list, issued: int, flying: bool, fits) -> Optional[torch.fx.Node]:
        """The next compute node: toward the next collective's input first, else the model's order
        (while a collective flies, only work that keeps the live bytes within the bound)."""
        if not ready:
            return None
        towards = self.towards[self.order[issued][0]] if issued < len(self.order) else set()
        candidates = sorted(ready)
        for _, n in candidates:
            if n in towards:
                ready.remove((self.index[n], n))
                heapq.heapify(ready)
                return n
        for _, n in candidates:
            if not flying or fits(n):
                ready.remove((self.index[n], n))
                heapq.heapify(ready)
                return n
        return None


@declare(requires=(SHAPE, DTYPE), ensures=())
def overlap_compute_pass(gm: torch.fx.GraphModule, *, costs: Optional[ShardCosts] = None,
                         at: Optional[Mapping[str, int]] = None,
                         max_bytes_in_flight: int = DEFAULT_MAX_BYTES_IN_FLIGHT,
                         max_extra_live_bytes: int = 0) -> PassResult:
    """Reorder ``gm``'s compute for overlap with its collectives (see the module docstring)."""
    graph = gm.graph
    pairs = need_order(gm)      # the issue order: by need in the model's order, the same on every rank
    if not pairs:
        _log.info("overlap_compute: no collectives")
        return PassResult(gm, False, {"moved": [], "reordered": False, "fill": None, "collectives": [],
                                      "peak_live_bytes": None})
    dep = Dependence(gm)
    model = ScheduleModel(gm, costs, at)
    nodes = dep.nodes
    roots = alias_roots(nodes)
    before = live_bytes_peak(nodes, model)
    live_cap = before + max_extra_live_bytes
    for s, w in pairs:
        if dep.region[s] != dep.region[w]:
            raise PassError(f"{describe_node(s)}: its wait {w.name} lies in another grad-mode region")
    placed, windows, fill = nodes, {}, None
    for mode in _FILLS:
        order, win = _schedule(dep, model, pairs, max_bytes_in_flight, live_cap, roots, mode)
        if live_bytes_peak(order, model) <= live_cap:
            placed, windows, fill = order, win, mode
            break
    old_compute = [n for n in nodes if dep.is_compute(n)]
    new_compute = [n for n in placed if dep.is_compute(n)]
    rank_old = {n: i for i, n in enumerate(old_compute)}
    moved = _moved(old_compute, new_compute, rank_old)
    changed = placed != nodes
    if changed:
        for a, b in zip(placed, placed[1:]):
            a.append(b)
        graph.lint()
        gm.recompile()
    record: dict[str, Any] = {
        "moved": moved, "reordered": fill is not None,
        "fill": fill or f"none: every order tried raised the live bytes above {live_cap}: the model's order kept",
        "collectives": [{"start": s.name, "comm_s": model.comm_seconds(s), "window_s": windows.get(s, 0.0)}
                        for s, _ in pairs],            # in issue order
        "peak_live_bytes": {"model_order": before, "scheduled": live_bytes_peak(placed, model)},
        "at": dict(model.sizes), "max_extra_live_bytes": max_extra_live_bytes,
    }
    _log.info("overlap_compute: %d collectives, %d compute nodes moved (fill: %s)", len(pairs), len(moved),
              fill or "none")
    return PassResult(gm, changed, record)


_FILLS = ("bounded", "no_growth")


def _schedule(dep: Dependence, model: ScheduleModel, pairs: list, cap: float, live_cap: float,
              roots: Mapping, fill: str) -> tuple[list[torch.fx.Node], dict[torch.fx.Node, float]]:
    """The whole graph's new order: placeholders first, each region scheduled, barriers in place,
    parameters right before their first reader, the output last; and each collective's window."""
    nodes = dep.nodes
    heads = [n for n in nodes if n.op == "placeholder"]
    params = [n for n in nodes if n.op == "get_attr"]
    tail = [n for n in nodes if n.op == "output"]
    body = [n for n in nodes if n.op not in ("placeholder", "get_attr", "output")]
    new_body: list[torch.fx.Node] = []
    windows: dict[torch.fx.Node, float] = {}
    k = 0
    while k < len(body):
        n = body[k]
        if n in dep.barriers:
            new_body.append(n)
            k += 1
            continue
        region = [m for m in body[k:] if dep.region[m] == dep.region[n]]
        k += len(region)
        rpairs = [(s, w) for s, w in pairs if dep.region[s] == dep.region[n]]
        order, window = _Region(dep, region, rpairs, model, cap, live_cap, roots, fill).run()
        new_body += order
        windows.update(window)
    position = {n: i for i, n in enumerate(new_body)}
    waiting: dict[torch.fx.Node, list[torch.fx.Node]] = {}
    placed: list[torch.fx.Node] = list(heads)
    for p in params:
        readers = [u for u in p.users if u in position]
        if readers:
            waiting.setdefault(min(readers, key=position.get), []).append(p)
        else:
            placed.append(p)
    for n in new_body:
        placed += waiting.get(n, [])
        placed.append(n)
    placed += tail
    if len(placed) != len(nodes) or set(placed) != set(nodes):
        raise PassError(f"overlap_compute: scheduled {len(placed)} of {len(nodes)} nodes")
    return placed, windows


def _moved(old: list, new: list, rank_old: Mapping) -> list[str]:
    """The nodes not on a longest run kept in the model's relative order (what a reader sees moved)."""
    seq = [rank_old[n] for n in new]
    # longest increasing subsequence, O(n log n), with back-pointers
    tails: list[int] = []
    tails_at: list[int] = []
    back = [-1] * len(seq)
    for i, v in enumerate(seq):
        j = bisect.bisect_left(tails, v)
        if j == len(tails):
            tails.append(v)
            tails_at.append(i)
        else:
            tails[j] = v
            tails_at[j] = i
        back[i] = tails_at[j - 1] if j > 0 else -1
    keep = set()
    i = tails_at[-1] if tails_at else -1
    while i >= 0:
        keep.add(i)
        i = back[i]
    return [new[i].name for i in range(len(new)) if i not in keep]
