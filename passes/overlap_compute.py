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
  ``max_extra_live_bytes`` (hoisting a node keeps its output alive longer). That check is made
  when the node is taken; if the finished order still passes the bound, the values alive where it
  does that ran before a node preceding them in the model's order are pinned (they then run no earlier than
  every node before them in the model's order) and the compute is listed again, a few times at
  most; failing that the model's order is kept (``record["fill"]`` says which). The collectives'
  own buffers are bounded by ``max_bytes_in_flight``, not counted here;
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
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.fx

from foldcompile.passes.base import PassError, PassResult, declare, describe_node
from foldcompile.passes.dependence import Dependence
from foldcompile.passes.meta import DTYPE, SHAPE
from foldcompile.passes.schedule_collectives import DEFAULT_MAX_BYTES_IN_FLIGHT, need_order
from foldcompile.passes.schedule_model import (ScheduleModel, alias_roots, allocates, live_bytes_over,
                                                live_bytes_peak, reads)
from foldcompile.passes.shard import ShardCosts

_log = logging.getLogger(__name__)  # foldcompile.passes.<name>: progress of this pass

__all__ = ["overlap_compute_pass", "propose_issue_order"]


class _Region:
    """The list scheduler of one region (the nodes between two barriers)."""

    def __init__(self, dep: Dependence, nodes: list[torch.fx.Node], pairs: list, model: ScheduleModel,
                 cap: float, live_cap: float, roots: Mapping[torch.fx.Node, torch.fx.Node],
                 pinned: frozenset = frozenset(), early: bool = False):
        """``pairs``: the region's collectives in need order (``early=False``: the issue order);
        ``early``: a collective needed later may be issued first if its input exists before that of
        the one needed next, and it leaves the link before that one can be issued; ``cap``: the bytes
        in flight; ``live_cap``: the live bytes a window's filling work may reach; ``pinned``: nodes
        that run no earlier than every node before them in the model's order (hoisting them raised
        the peak)."""
        self.dep, self.nodes, self.model, self.cap, self.live_cap = dep, nodes, model, cap, live_cap
        self.pinned, self.early = pinned, early
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

    def run(self) -> tuple[list[torch.fx.Node], dict[torch.fx.Node, float], list[torch.fx.Node]]:
        """The region's new order, each collective's window (compute seconds), the issue order."""
        left = {n: len(self.preds[n]) for n in self.nodes}
        ready: list[tuple[int, torch.fx.Node]] = []
        for n in self.nodes:
            if not left[n] and self.dep.is_compute(n):
                heapq.heappush(ready, (self.index[n], n))
        done: set[torch.fx.Node] = set()
        prefix = [0]          # how many of the region's first nodes (model order) have run
        allocated: set[torch.fx.Node] = set()
        out: list[torch.fx.Node] = []
        window: dict[torch.fx.Node, float] = {s: 0.0 for s, _ in self.order}
        pending = list(self.order)          # not issued yet, in need order
        issued: list = []                   # issued, in issue order (waited first in, first out)
        clock = link_free = 0.0
        waited = 0
        end: dict[torch.fx.Node, float] = {}
        flying_bytes = 0.0
        live = 0.0
        readers = dict(self.readers)

        def emit(n: torch.fx.Node) -> None:
            nonlocal live
            out.append(n)
            done.add(n)
            while prefix[0] < len(self.nodes) and self.nodes[prefix[0]] in done:
                prefix[0] += 1
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
            return live + grow - freed <= self.live_cap

        def next_to_issue():
            if not pending:
                return None
            if not left[pending[0][0]]:
                return pending[0]
            if not self.early:
                return None
            # the one needed next is not ready: one needed later may go first if it leaves the link
            # before the compute toward the one needed next is done
            todo = sum(self.model.seconds(n) for n in self.towards[pending[0][0]] if n not in done)
            free_at = max(clock, link_free)
            for p in pending[1:]:
                if not left[p[0]] and free_at + self.model.comm_seconds(p[0]) <= clock + todo:
                    return p
            return None

        while len(out) < len(self.nodes):
            # issue what may go now, within the bytes in flight
            while True:
                p = next_to_issue()
                if p is None or (waited < len(issued) and flying_bytes + self.size[p[0]] > self.cap):
                    break
                s = p[0]
                emit(s)
                end[s] = max(clock, link_free) + self.model.comm_seconds(s)
                link_free = end[s]
                flying_bytes += self.size[s]
                pending.remove(p)
                issued.append(p)
            head = issued[waited] if waited < len(issued) else None
            if head is not None and clock >= end[head[0]]:
                emit(head[1])
                flying_bytes -= self.size[head[0]]
                waited += 1
                continue
            target = pending[0][0] if pending else None
            pick = self._pick(ready, target, head is not None, fits, prefix[0])
            if pick is None and head is None:      # nothing else can run: a pinned node may
                pick = self._pick(ready, target, False, fits, len(self.nodes))
            if pick is not None:
                emit(pick)
                t = self.model.seconds(pick)
                clock += t
                for s, _w in issued[waited:]:
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
        return out, window, [s for s, _ in issued]

    def _pick(self, ready: list, target: Optional[torch.fx.Node], flying: bool, fits,
              prefix: int) -> Optional[torch.fx.Node]:
        """The next compute node: toward the input of ``target`` (the collective needed next) first,
        else the model's order (while a collective flies, only work that keeps the live bytes within
        the bound); a pinned node only once every node before it in the model's order has run."""
        if not ready:
            return None
        towards = self.towards[target] if target is not None else set()
        candidates = [(i, n) for i, n in sorted(ready) if n not in self.pinned or i <= prefix]
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
                         max_extra_live_bytes: int = 0, early_issue: bool = False,
                         issue_order: Optional[Sequence[str]] = None) -> PassResult:
    """Reorder ``gm``'s compute for overlap with its collectives (see the module docstring).

    The collectives are issued in need order (the same on every rank), or in ``issue_order`` (their
    starts' names). ``early_issue``: the pass may issue a collective needed later first, when its
    input exists before that of the one needed next and it leaves the link before that one can go
    (it helps across blocks, where the next block's work waits for such a collective, when the live
    bytes may grow: ``max_extra_live_bytes``). The order it chooses then depends on the rank's local
    sizes: on several ranks, one rank's :func:`propose_issue_order` must be given to every rank as
    ``issue_order`` (the collectives' order must be the same on every rank)."""
    plan = _Plan(gm, costs, at, max_bytes_in_flight, max_extra_live_bytes, issue_order,
                 early_issue and issue_order is None)
    if not plan.pairs:
        _log.info("overlap_compute: no collectives")
        return PassResult(gm, False, {"moved": [], "reordered": False, "fill": None, "collectives": [],
                                      "issue_order": [], "peak_live_bytes": None})
    nodes, placed = plan.dep.nodes, plan.placed
    old_compute = [n for n in nodes if plan.dep.is_compute(n)]
    new_compute = [n for n in placed if plan.dep.is_compute(n)]
    moved = _moved(old_compute, new_compute, plan.rank_old)
    changed = placed != nodes
    if changed:
        for a, b in zip(placed, placed[1:]):
            a.append(b)
        gm.graph.lint()
        gm.recompile()
    model = plan.model
    record: dict[str, Any] = {
        "moved": moved, "reordered": plan.fill is not None,
        "fill": plan.fill or f"none: every order tried raised the live bytes above {plan.live_cap}: the model's "
                             "order kept",
        "issue_order": [s.name for s in plan.issued],
        "collectives": [{"start": s.name, "comm_s": model.comm_seconds(s), "window_s": plan.windows.get(s, 0.0)}
                        for s in plan.issued],
        "peak_live_bytes": {"model_order": plan.before, "scheduled": live_bytes_peak(placed, model)},
        "at": dict(model.sizes), "max_extra_live_bytes": max_extra_live_bytes,
    }
    _log.info("overlap_compute: %d collectives, %d compute nodes moved (fill: %s)", len(plan.issued), len(moved),
              record["fill"])
    return PassResult(gm, changed, record)


def propose_issue_order(gm: torch.fx.GraphModule, *, costs: Optional[ShardCosts] = None,
                        at: Optional[Mapping[str, int]] = None,
                        max_bytes_in_flight: int = DEFAULT_MAX_BYTES_IN_FLIGHT,
                        max_extra_live_bytes: int = 0) -> list[str]:
    """The issue order ``overlap_compute_pass(gm, early_issue=True)`` would choose (its starts' names),
    without changing ``gm``: one rank proposes it, every rank then passes it as ``issue_order``."""
    plan = _Plan(gm, costs, at, max_bytes_in_flight, max_extra_live_bytes, None, True)
    return [s.name for s in plan.issued]


class _Plan:
    """The new order of ``gm``'s nodes (not applied), within the live-bytes bound."""

    def __init__(self, gm, costs, at, cap, extra, issue_order, early):
        self.pairs = need_order(gm)      # by need in the model's order: the same on every rank
        self.placed, self.windows, self.fill, self.issued = list(gm.graph.nodes), {}, None, []
        if not self.pairs:
            return
        self.dep = dep = Dependence(gm)
        self.model = model = ScheduleModel(gm, costs, at)
        nodes = dep.nodes
        for s, w in self.pairs:
            if dep.region[s] != dep.region[w]:
                raise PassError(f"{describe_node(s)}: its wait {w.name} lies in another grad-mode region")
        if issue_order is not None:
            by_name = {s.name: (s, w) for s, w in self.pairs}
            if sorted(issue_order) != sorted(by_name):
                raise PassError(f"overlap_compute: issue_order must name each of this graph's collectives once; "
                                f"missing {sorted(set(by_name) - set(issue_order))[:6]}, not collectives here "
                                f"{sorted(set(issue_order) - set(by_name))[:6]}")
            self.pairs = [by_name[name] for name in issue_order]
        roots = alias_roots(nodes)
        self.before = live_bytes_peak(nodes, model)
        self.live_cap = self.before + extra
        self.issued = [s for s, _ in self.pairs]
        self.rank_old = {n: i for i, n in enumerate(n for n in nodes if dep.is_compute(n))}
        pinned: set[torch.fx.Node] = set()
        for attempt in range(_MAX_ATTEMPTS):
            order, win, issued = _schedule(dep, model, self.pairs, cap, self.live_cap, roots, frozenset(pinned), early)
            peak, hoisted = live_bytes_over(order, model, self.live_cap, ahead=self.rank_old)
            if peak <= self.live_cap:
                self.placed, self.windows, self.issued = order, win, issued
                self.fill = f"within the bound, {len(pinned)} node(s) pinned after {attempt} retries" if pinned \
                    else "within the bound"
                return
            # the values alive where the bound is passed that ran before a node preceding them in the
            # model's order (hoisted, or left in place while what they wait for was hoisted): pin them
            hoisted -= pinned
            if not hoisted:
                break
            pinned |= hoisted


_MAX_ATTEMPTS = 8


def _schedule(dep: Dependence, model: ScheduleModel, pairs: list, cap: float, live_cap: float, roots: Mapping,
              pinned: frozenset, early: bool) -> tuple[list[torch.fx.Node], dict[torch.fx.Node, float], list]:
    """The whole graph's new order: placeholders first, each region scheduled, barriers in place,
    parameters right before their first reader, the output last; each collective's window; the
    issue order."""
    nodes = dep.nodes
    heads = [n for n in nodes if n.op == "placeholder"]
    params = [n for n in nodes if n.op == "get_attr"]
    tail = [n for n in nodes if n.op == "output"]
    body = [n for n in nodes if n.op not in ("placeholder", "get_attr", "output")]
    new_body: list[torch.fx.Node] = []
    windows: dict[torch.fx.Node, float] = {}
    issued: list[torch.fx.Node] = []
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
        order, window, starts = _Region(dep, region, rpairs, model, cap, live_cap, roots, pinned, early).run()
        new_body += order
        windows.update(window)
        issued += starts
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
    return placed, windows, issued


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
