"""The time and memory a schedule of a rank graph is judged by, at stated sizes.

- **Compute**: a node's roofline time, the larger of its FLOPs over the dense throughput and its
  bytes over the HBM bandwidth (``meta["cost"]`` from classify, in the graph's local symbolic sizes,
  evaluated at ``at``). A fused kernel has no cost of its own: :func:`carry_fused_costs` gives it the
  FLOPs of the nodes it replaced and the bytes of its own inputs and outputs.
- **Communication**: a collective's time is a fixed latency plus the bytes its start sends over the
  link (``meta["cost"]["bytes"]`` of the start, written by ``annotate_collectives``).
- **Memory**: a node's output bytes; a view (``meta["aliases_input"]``) allocates nothing and keeps
  its base alive. The live bytes of a schedule are the outputs produced and still to be read
  (parameters and graph inputs not counted: every schedule holds them). The buffers of the
  collectives in flight (the input held from the start to the wait, the result allocated at the
  start) are not counted here: ``max_bytes_in_flight`` bounds them.

The machine is the planner's (:class:`~foldcompile.passes.shard.ShardCosts`); ``at`` defaults to the
training crop, dims not named there at their example values, as the planner and fusion judge.

    >>> import sympy, torch, torch.fx
    >>> from foldcompile.passes.shape_prop import dim_symbol
    >>> g = torch.fx.Graph(); x = g.placeholder("x")
    >>> y = g.call_function(torch.sin, (x,), name="y"); _ = g.output(y)
    >>> gm = torch.fx.GraphModule(torch.nn.Module(), g)
    >>> gm.meta["dims"] = {"N_res": 11}
    >>> N = dim_symbol("N_res")
    >>> y.meta.update(shape=(11, 11), sym_shape=(N, N), dtype=torch.float32, cost={"flops": N**2, "bytes": 8 * N**2})
    >>> model = ScheduleModel(gm, at={"N_res": 1000})
    >>> model.bytes_of(y), round(model.seconds(y) * 1e6, 3)             # 8 MB over 4 TB/s
    (4000000, 2.0)
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Optional, Sequence

import sympy
import torch
import torch.fx

from foldcompile.distributed.collectives import wait
from foldcompile.passes.fuse import DEFAULT_AT
from foldcompile.passes.localize import collective_of, traffic
from foldcompile.passes.meta import ALIASES_INPUT, COST, DTYPE, MULTI_OUTPUT, SHAPE, SYM_SHAPE
from foldcompile.passes.shape_prop import dim_symbol
from foldcompile.passes.shard import ShardCosts

__all__ = ["ScheduleModel", "carry_fused_costs", "live_bytes_peak", "live_bytes_over", "alias_roots", "allocates", "reads", "simulate"]


class ScheduleModel:
    """Times and bytes of ``gm``'s nodes at the sizes ``at`` on the machine ``costs``."""

    def __init__(self, gm: torch.fx.GraphModule, costs: Optional[ShardCosts] = None,
                 at: Optional[Mapping[str, int]] = None):
        self.costs = costs if costs is not None else ShardCosts()
        dims = dict(gm.meta.get("dims", {}))
        stated = {**DEFAULT_AT, **dict(at or {})}
        self.sizes = {**dims, **{k: v for k, v in stated.items() if k in dims}}
        self.subs = {dim_symbol(k): sympy.Integer(v) for k, v in self.sizes.items()}
        self.world = int(gm.meta.get("dap", {}).get("world_size", 1))
        self._memo: dict[Any, float] = {}
        self._seconds: dict[torch.fx.Node, float] = {}
        self._bytes: dict[torch.fx.Node, int] = {}

    def value(self, expr: Any) -> float:
        """A symbolic size or cost at the stated sizes (0 where a dim has no value)."""
        if isinstance(expr, (int, float)):
            return float(expr)
        if not isinstance(expr, sympy.Basic):
            try:
                expr = sympy.sympify(expr)
            except (sympy.SympifyError, TypeError):
                return 0.0
        v = self._memo.get(expr)
        if v is None:
            e = expr.xreplace(self.subs)
            v = self._memo[expr] = float(e) if e.is_number else 0.0
        return v

    def _numel(self, sym: Any, concrete: Any) -> float:
        if isinstance(sym, (tuple, list)) and all(not isinstance(s, (tuple, list)) for s in sym):
            return math.prod(self.value(s) for s in sym)
        if isinstance(concrete, (tuple, list)) and all(isinstance(s, int) for s in concrete):
            return float(math.prod(concrete))
        return 0.0

    def bytes_of(self, n: Any) -> int:
        """The bytes ``n``'s value occupies at the stated sizes (0 for a view, a non-tensor, a parameter)."""
        if not isinstance(n, torch.fx.Node):
            return 0
        if n not in self._bytes:
            self._bytes[n] = self._bytes_of(n)
        return self._bytes[n]

    def _bytes_of(self, n: torch.fx.Node) -> int:
        if n.meta.get(ALIASES_INPUT) or n.op in ("get_attr", "output"):
            return 0
        shape, sym, dtype = n.meta.get(SHAPE), n.meta.get(SYM_SHAPE), n.meta.get(DTYPE)
        if n.meta.get(MULTI_OUTPUT) and isinstance(shape, (tuple, list)):
            dts = dtype if isinstance(dtype, (tuple, list)) else [dtype] * len(shape)
            syms = sym if isinstance(sym, (tuple, list)) and len(sym) == len(shape) else [None] * len(shape)
            return int(sum(self._numel(s, c) * d.itemsize for s, c, d in zip(syms, shape, dts)
                           if isinstance(d, torch.dtype)))
        if not isinstance(dtype, torch.dtype):
            return 0
        return int(self._numel(sym, shape) * dtype.itemsize)

    def flops(self, n: torch.fx.Node) -> float:
        return self.value((n.meta.get(COST) or {}).get("flops", 0))

    def seconds(self, n: torch.fx.Node) -> float:
        """``n``'s roofline time (a collective's start or wait: 0, see :meth:`comm_seconds`)."""
        if n not in self._seconds:
            self._seconds[n] = self._roofline(n)
        return self._seconds[n]

    def _roofline(self, n: torch.fx.Node) -> float:
        if n.op not in ("call_function", "call_method") or collective_of(n) is not None or n.target is wait:
            return 0.0
        cost = n.meta.get(COST)
        if cost is None:
            moved = sum(self.bytes_of(p) for p in n.all_input_nodes) + self.bytes_of(n)
            return moved / self.costs.hbm_bytes_per_s
        return max(self.value(cost.get("flops", 0)) / self.costs.flops_per_s,
                   self.value(cost.get("bytes", 0)) / self.costs.hbm_bytes_per_s)

    def sent_bytes(self, start: torch.fx.Node) -> float:
        """The bytes a collective's start sends from this rank."""
        cost = start.meta.get(COST)
        if cost is not None and cost.get("bytes") is not None:
            return self.value(cost["bytes"])
        x = start.args[0] if start.args else None
        if not isinstance(x, torch.fx.Node) or collective_of(start) is None:
            return 0.0
        return self.value(traffic(collective_of(start), sympy.Integer(self.bytes_of(x)), self.world))

    def comm_seconds(self, start: torch.fx.Node) -> float:
        """The collective's time on the link: latency + bytes sent / link bandwidth."""
        return self.costs.latency_s + self.sent_bytes(start) / self.costs.link_bytes_per_s


def carry_fused_costs(gm: torch.fx.GraphModule, before: Mapping[str, Mapping[str, Any]]) -> int:
    """Give each fused node without a cost the FLOPs of the nodes it replaced (``before``: node name ->
    ``meta["cost"]`` taken before fusion) and the bytes of its own tensor inputs and output: a kernel
    reads and writes those once. Returns how many nodes got a cost."""
    done = 0
    for n in gm.graph.nodes:
        if n.op != "call_function" or n.meta.get(COST) is not None or not n.meta.get("origin"):
            continue
        flops = sum((sympy.sympify((before.get(o) or {}).get("flops", 0)) for o in n.meta["origin"]), sympy.Integer(0))
        moved = sum((_sym_bytes(p) for p in n.all_input_nodes), sympy.Integer(0)) + _sym_bytes(n)
        n.meta[COST] = {"flops": sympy.expand(flops), "bytes": sympy.expand(moved)}
        done += 1
    return done


def _sym_bytes(n: torch.fx.Node) -> sympy.Expr:
    sym, dtype = n.meta.get(SYM_SHAPE), n.meta.get(DTYPE)
    if n.meta.get(MULTI_OUTPUT) or not isinstance(dtype, torch.dtype) or not isinstance(sym, (tuple, list)):
        return sympy.Integer(0)
    return sympy.Mul(*[sympy.sympify(s) for s in sym]) * dtype.itemsize


def alias_roots(nodes: Iterable[torch.fx.Node]) -> dict[torch.fx.Node, torch.fx.Node]:
    """Each node's storage owner: itself, or for a view the owner of its first tensor input."""
    root: dict[torch.fx.Node, torch.fx.Node] = {}
    for n in nodes:
        base = n.all_input_nodes[0] if n.meta.get(ALIASES_INPUT) and n.all_input_nodes else None
        root[n] = root.get(base, base) if base is not None else n
    return root


def reads(n: torch.fx.Node, roots: Mapping[torch.fx.Node, torch.fx.Node]) -> set[torch.fx.Node]:
    """The storage owners ``n`` reads."""
    return {roots.get(p, p) for p in n.all_input_nodes}


def allocates(n: torch.fx.Node) -> bool:
    """Whether ``n``'s output is memory of its own (not a view, not a start's handle)."""
    return n.op in ("call_function", "call_method") and collective_of(n) is None and not n.meta.get(ALIASES_INPUT)


def live_bytes_peak(order: Sequence[torch.fx.Node], model: ScheduleModel) -> int:
    """The largest live bytes over the schedule ``order`` (see the module docstring)."""
    return live_bytes_over(order, model, float("inf"))[0]


def live_bytes_over(order: Sequence[torch.fx.Node], model: ScheduleModel, above: float,
                    ahead: Optional[Mapping[torch.fx.Node, int]] = None) -> tuple[int, set[torch.fx.Node]]:
    """The largest live bytes over ``order``, and the nodes whose outputs are alive wherever the live
    bytes exceed ``above``. With ``ahead`` (each node's position in another order, e.g. the model's),
    only the nodes that run there before a node that precedes them in that order."""
    roots = alias_roots(order)
    last: dict[torch.fx.Node, int] = {}
    for i, n in enumerate(order):
        for r in reads(n, roots):
            last[r] = i if n.op != "output" else len(order)
    # the earliest position (in ``ahead``) of the nodes from each position on
    later = [float("inf")] * (len(order) + 1)
    for i in range(len(order) - 1, -1, -1):
        later[i] = min(later[i + 1], ahead.get(order[i], float("inf"))) if ahead is not None else 0
    live, peak = 0, 0
    alive: dict[torch.fx.Node, int] = {}
    frees: dict[int, list[torch.fx.Node]] = {}
    over: set[torch.fx.Node] = set()
    for i, n in enumerate(order):
        b = model.bytes_of(n) if allocates(n) else 0
        if b:
            live += b
            alive[n] = b
            frees.setdefault(max(last.get(n, i), i), []).append(n)
        peak = max(peak, live)
        if live > above:
            over |= {m for m in alive if ahead is None or ahead.get(m, -1) > later[i]}
        for m in frees.pop(i, ()):
            live -= alive.pop(m)
    return peak, over


def simulate(order: Sequence[torch.fx.Node], model: ScheduleModel) -> dict[str, Any]:
    """Run the schedule ``order`` on the time model: one compute stream, one link that carries the
    collectives one after another in issue order; a wait blocks the stream until its collective is
    done. Returns ``compute_s`` (the stream's busy time), ``exposed_s`` (per start name: how long its
    wait blocked the stream) and ``total_s`` (the forward's estimated time)."""
    clock = link_free = busy = 0.0
    end: dict[torch.fx.Node, float] = {}
    exposed: dict[str, float] = {}
    for n in order:
        if collective_of(n) is not None:
            end[n] = max(clock, link_free) + model.comm_seconds(n)
            link_free = end[n]
        elif n.op == "call_function" and n.target is wait and n.args and n.args[0] in end:
            start = n.args[0]
            exposed[start.name] = max(0.0, end[start] - clock)
            clock = max(clock, end[start])
        else:
            t = model.seconds(n)
            clock += t
            busy += t
    return {"compute_s": busy, "exposed_s": exposed, "total_s": clock}
