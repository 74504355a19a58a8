"""The DAP placement plan: where every tensor lives on the ranks, and where its placement changes.

``shard_pass(gm, world_size)`` plans Dynamic Axial Parallelism over ``world_size`` ranks on a
canonical, annotated graph (normalize -> shape_prop -> classify). It does not lower: the planned
graph is still a single-process graph over global sizes (the contract of
:mod:`foldcompile.passes.placement`):

- every tensor-producing node gets ``node.meta["shard"]`` = ``Placed(Shard(d) | Replicate() |
  Partial())`` (a tuple for a multi-output node), a ``Shard`` with its per-rank split sizes at the
  example size (:func:`foldcompile.distributed.split_sizes`);
- every change of placement is a ``redistribute(x, src, dst)`` node, the identity on one process,
  so the planned graph runs and computes exactly what the unplanned one does.

**Seeds.** An input shaped like the MSA or the pair representation, ``[..., A, B, c]`` with ``A``
and ``B`` model dims (``N_seq``, ``N_res``, ...) and ``c`` a channel size, starts split on ``A``
(its first sequence axis; the template stack's ``[N_templ, N_res, N_res, c]`` on its first N_res).
Masks (inputs used as masks, :func:`foldcompile.passes.cost_model.mask_inputs`) and every other
input start Replicate: every rank receives the full inputs, so slicing a replicated mask for a
sharded consumer is free, while a split mask would have to be gathered wherever an op needs its
axis whole (the column attention's key mask). Parameters are Replicate. ``dap_axes={"m": 1,
"msa_mask": None}`` overrides the seed of an input (by its name, with or without the tracer's
``l_``…``_``): a dim to split, or None for Replicate.

**Rules.** Every op's legal strategies come from its registry entry's sharding rule
(:mod:`foldcompile.passes.sharding_rules`); an op without one runs replicated (all inputs
gathered), never raises, and is listed in the record.

**Objective.** Per-rank time at the sizes ``at`` (default the training crop, ``N_seq=128,
N_res=256``; other dims at their example sizes), from the symbolic cost model:

- communication: bytes each rank sends, over ``costs.link_bytes_per_s``, plus ``costs.latency_s``
  per collective (so that no tiny tensor is sent where computing it again is cheaper): all_to_all
  ``n·(P-1)/P²`` (≈ n/P), all_gather and reduce_scatter ``n·(P-1)/P``, all_reduce twice that, a
  slice of a replicated value 0 (``n``: the tensor's global bytes). Graph outputs are counted
  with the all_gather the lowering gives them;
- compute: each op's roofline time (FLOPs over ``costs.flops_per_s``, bytes over
  ``costs.hbm_bytes_per_s``, the larger), divided by P when its strategy splits the work and
  whole when it runs replicated: replicating is never free.

**Search.** A node's label is its strategy together with at most one extra placement made for
its consumers (one redistribute that several consumers share: the column attention's queries,
keys and values all read the one all_to_all of ``m``); a consumer needing yet another placement
pays its own transition. Unary costs are compute and the shared transition, pairwise costs the
transitions between a producer and each consumer. :class:`~foldcompile.passes.labeling.Problem`
finds the labeling of least total cost exactly by variable elimination (treewidth 3 on the
Evoformer block: no greedy choice, no q/k/v all_to_alls where one of ``m`` suffices), conditioning
on a greedy choice only where a table would grow past ``max_table`` entries (``record["solver"]``).

**Record** (``PassResult.record``): ``transitions`` (kind, tensor, node, src, dst, module,
consumers, per-rank bytes as a sympy expression and at ``at``, position), ``replicated`` (every
op with a model dim that runs replicated, with the reason), ``no_rule`` (ops without a rule),
``seeds``, ``outputs`` (their placement and gather), ``shape_queries`` (nodes reading the size of a
split value), ``objective`` and ``solver``.
:func:`plan_table` prints the transitions; :func:`check_plan` checks a planned graph.

    >>> import foldcompile
    >>> from foldcompile.capture import flat_inputs
    >>> from foldcompile.models import zoo
    >>> from foldcompile.passes import classify_pass, normalize_pass, shape_prop_pass
    >>> block, ex = zoo.get("evoformer_block")
    >>> gm = normalize_pass(foldcompile.trace(block, *ex)).graph_module
    >>> _ = shape_prop_pass(gm, flat_inputs(gm, ex)); _ = classify_pass(gm)
    >>> result = shard_pass(gm, 4, costs=ShardCosts(latency_s=0))  # tiny channels: else replicating wins
    >>> sorted({t["kind"] for t in result.record["transitions"]})
    ['all_gather', 'all_to_all', 'reduce_scatter', 'slice']
    >>> [t["tensor"] for t in result.record["transitions"] if t["kind"] == "all_to_all"]  # m: rows -> columns
    ['m_1', 'z_6']
    >>> check_plan(gm)                                      # every op's inputs meet its rule
    >>> torch.equal(gm(*ex)[1], block(*ex)[1])              # still one process, same function
    True
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import sympy
import torch
import torch.fx

from foldcompile.passes.base import PassError, PassResult, declare, describe_node
from foldcompile.passes.cost_model import mask_inputs
from foldcompile.passes.fuse import DEFAULT_AT  # the training crop: where profitability is judged
from foldcompile.passes.labeling import Problem
from foldcompile.passes.meta import COST, DTYPE, MODULE_PATH, MULTI_OUTPUT, OP_CLASS, SHAPE, SHARD, STACK_TRACE, \
    SYM_SHAPE, memory_of
from foldcompile.passes.placement import Placed, Replicate, Shard, redistribute, transition_kind
from foldcompile.passes.registry import COMM, op_name, writes_in_place
from foldcompile.passes.shape_prop import dim_symbol, numel_expr
from foldcompile.passes.sharding_rules import PARTIAL, REPLICATE, Spec, Strategy, default_shard, \
    ensure_kernel_rules, has_rule, reachable, replace_input, shardable_dims, strategies, tensor_inputs

_log = logging.getLogger(__name__)

__all__ = ["shard_pass", "ShardCosts", "check_plan", "plan_violations", "plan_table", "DEFAULT_AT",
           "transition_volume"]

_INF = math.inf


@dataclass(frozen=True)
class ShardCosts:
    """The machine the objective is written for (per rank). Defaults: an H200-class GPU on NVLink
    (what NCCL reaches for large messages, dense bf16 tensor-core throughput, HBM3e)."""

    link_bytes_per_s: float = 300e9
    flops_per_s: float = 600e12
    hbm_bytes_per_s: float = 4.0e12
    latency_s: float = 10e-6          # per collective, whatever its size (a slice: none)


# per-rank bytes sent, as a fraction of the tensor's global bytes
def _volume_factor(kind: str | None, p: int | sympy.Expr) -> sympy.Expr:
    p = sympy.sympify(p)
    return {"all_to_all": (p - 1) / p ** 2, "all_gather": (p - 1) / p, "reduce_scatter": (p - 1) / p,
            "all_reduce": 2 * (p - 1) / p, "slice": sympy.Integer(0), None: sympy.Integer(0)}[kind]


def transition_volume(node: torch.fx.Node, kind: str | None, world_size: int | sympy.Expr) -> sympy.Expr:
    """Bytes each rank sends to redistribute ``node``'s value by a collective of ``kind``, in the
    graph's symbolic sizes (``world_size`` may be a symbol).

        >>> import torch.fx, sympy
        >>> g = torch.fx.Graph(); x = g.placeholder("z")
        >>> x.meta.update(sym_shape=(sympy.Symbol("N_res"), sympy.Symbol("N_res"), 128), dtype=torch.bfloat16)
        >>> transition_volume(x, "all_gather", 4)
        192*N_res**2
    """
    itemsize = node.meta[DTYPE].itemsize
    return sympy.expand(numel_expr(node.meta[SYM_SHAPE]) * itemsize * _volume_factor(kind, world_size))


def _kind(src: Placed, dst: Placed) -> str | None:
    if src == dst:
        return None
    if isinstance(src.placement, Shard) and isinstance(dst.placement, Shard) and src.dim == dst.dim:
        return "all_gather"  # a re-split of the same dim: gathered, then sliced (two redistributes)
    return transition_kind(src.placement, dst.placement)


class _Sizes:
    """Symbolic sizes evaluated at ``at`` (memoised: the same expressions recur on every node)."""

    def __init__(self, subs: Mapping[sympy.Symbol, int]):
        self.subs = {k: sympy.Integer(v) for k, v in subs.items()}
        self.memo: dict[Any, float] = {}

    def __call__(self, expr: Any) -> float:
        if not isinstance(expr, sympy.Basic):
            return float(expr)
        v = self.memo.get(expr)
        if v is None:
            val = expr.xreplace(self.subs)
            if val.free_symbols:
                raise PassError(f"size {expr} has dims {sorted(map(str, val.free_symbols))} with no value at "
                                f"`at` or in the example")
            v = self.memo[expr] = float(val)
        return v

    def numel(self, sym: Sequence[Any]) -> float:
        return math.prod(self(s) for s in sym)


# ----------------------------------------------------------------------------------------------
# the problem: labels of every value, their costs


@dataclass(frozen=True)
class _Label:
    strategy: Strategy
    extra: Placed | None = None   # one more placement made for (and shared by) the consumers


def _is_value(n: torch.fx.Node) -> bool:
    return n.op in ("placeholder", "get_attr", "call_function", "call_method") and \
        (n.meta.get(SHAPE) is not None or bool(n.meta.get(MULTI_OUTPUT)))


def _clean(name: str) -> str:
    n = name[2:] if name.startswith("l_") else name
    return n.strip("_")


def _seeds(gm: torch.fx.GraphModule, world: int, dap_axes: Mapping[str, int | None] | None
           ) -> dict[torch.fx.Node, tuple[Placed, str]]:
    """Each tensor input's placement and why (see the module docstring)."""
    phs = [n for n in gm.graph.nodes if n.op == "placeholder" and n.meta.get(SHAPE) is not None]
    given = dict(dap_axes or {})
    by_name = {}
    for n in phs:
        by_name[n.name] = n
        by_name.setdefault(_clean(n.name), n)
    unknown = [k for k in given if k not in by_name]
    if unknown:
        raise PassError(f"dap_axes names {unknown}, which are not tensor inputs of the graph; its inputs are "
                        f"{[n.name for n in phs]}")
    chosen = {by_name[k]: v for k, v in given.items()}
    masks = mask_inputs(gm)
    out: dict[torch.fx.Node, tuple[Placed, str]] = {}
    for n in phs:
        sym = n.meta[SYM_SHAPE]
        if n in chosen:
            d = chosen[n]
            if d is None:
                out[n] = (REPLICATE, "dap_axes")
                continue
            if not isinstance(d, int) or isinstance(d, bool) or not -len(sym) <= d < len(sym):
                raise PassError(f"dap_axes[{n.name!r}] = {d!r}: not a dim of its shape {tuple(sym)}")
            d = d % len(sym)
            if d not in shardable_dims(n):
                raise PassError(f"dap_axes[{n.name!r}] = {d}: dim {d} of {tuple(sym)} is {sym[d]}, not a model "
                                "dim (N_seq, N_res, ...): only those are split")
            out[n] = (default_shard(n, d, world), "dap_axes")
        elif n in masks:
            out[n] = (REPLICATE, "mask: replicated, sliced free where a sharded op needs it")
        elif _msa_or_pair_like(n):
            out[n] = (default_shard(n, len(sym) - 3, world), "MSA/pair-like [..., A, B, c]: split on A")
        else:
            out[n] = (REPLICATE, "replicated input")
    return out


def _msa_or_pair_like(n: torch.fx.Node) -> bool:
    """``[..., A, B, c]`` with A and B model dims and c a channel size."""
    r, split = len(n.meta[SYM_SHAPE]), set(shardable_dims(n))
    return r >= 3 and {r - 3, r - 2} <= split and r - 1 not in split


def _pinned_edges(gm: torch.fx.GraphModule) -> set[tuple[torch.fx.Node, int]]:
    """(consumer, input index) edges that must not get a redistribute: reads of memory that is
    written in place (a redistributed copy would miss the write, or take it alone)."""
    written = [n for n in gm.graph.nodes if writes_in_place(n)]
    if not written:
        return set()
    memories = {memory_of(n.args[0]) for n in written if isinstance(n.args[0], torch.fx.Node)} - {None}
    targets: set[torch.fx.Node] = set()
    for w in written:
        x = w.args[0] if w.args and isinstance(w.args[0], torch.fx.Node) else None
        while x is not None and x not in targets:  # the written value and the values it is a view of
            targets.add(x)
            x = x.args[0] if x.meta.get("aliases_input") and x.args and isinstance(x.args[0], torch.fx.Node) else None
    pinned = set()
    for n in gm.graph.nodes:
        for k, (_, u) in enumerate(tensor_inputs(n)):
            if u in targets or (memory_of(u) is not None and memory_of(u) in memories):
                pinned.add((n, k))
    return pinned


class _Planner:
    def __init__(self, gm: torch.fx.GraphModule, world: int, sizes: _Sizes, costs: ShardCosts,
                 seeds: dict[torch.fx.Node, tuple[Placed, str]]):
        self.gm, self.world, self.sizes, self.costs, self.seeds = gm, world, sizes, costs, seeds
        self.values = [n for n in gm.graph.nodes if _is_value(n)]
        self.strats: dict[torch.fx.Node, list[Strategy]] = {}
        self.inputs: dict[torch.fx.Node, list[torch.fx.Node]] = {}
        self.no_rule: dict[torch.fx.Node, str] = {}
        self.pinned = _pinned_edges(gm)
        self._kind_memo: dict[tuple, str | None] = {}
        self._bytes: dict[torch.fx.Node, float] = {}
        self._factor = {k: float(_volume_factor(k, world)) for k in ("all_to_all", "all_gather", "reduce_scatter",
                                                                     "all_reduce")}

    # -- strategies, with each input's candidate placements propagated forward
    def enumerate(self) -> None:
        offered: dict[torch.fx.Node, list[Spec]] = {}
        for n in self.values:
            if n.op == "placeholder":
                seed = self.seeds[n][0]
                self.strats[n] = [Strategy(seed, (), divided=seed != REPLICATE)]
            elif n.op == "get_attr":
                self.strats[n] = [Strategy(tuple(REPLICATE for _ in n.meta[SHAPE]) if n.meta.get(MULTI_OUTPUT)
                                           else REPLICATE, (), divided=False)]
            else:
                ins = [u for _, u in tensor_inputs(n)]
                self.inputs[n] = ins
                cands = [offered.get(u, []) for u in ins]
                try:
                    self.strats[n] = strategies(n, self.world, cands)
                except PassError:
                    raise
                except Exception as e:  # a rule that breaks is a bug: name it, never guess
                    raise PassError(f"the sharding rule of {op_name(n)!r} failed on {describe_node(n)}: "
                                    f"{type(e).__name__}: {e}") from e
                if not has_rule(n):
                    self.no_rule[n] = f"no sharding rule for {op_name(n)!r}"
            own = list(dict.fromkeys(s.out for s in self.strats[n]))
            offered[n] = own + [c for c in reachable(n, self.world) if c not in own]

    # -- costs
    def compute_time(self, n: torch.fx.Node) -> float:
        cost = n.meta.get(COST)
        if n.op not in ("call_function", "call_method"):
            return 0.0
        if cost is None:
            raise PassError(f"{describe_node(n)} has no meta['cost']: run classify_pass before shard_pass")
        return max(self.sizes(cost["flops"]) / self.costs.flops_per_s,
                   self.sizes(cost["bytes"]) / self.costs.hbm_bytes_per_s)

    def share(self, s: Strategy) -> float:
        """The part of an op's work one rank does under strategy ``s`` at ``at``: its largest shard of
        the split dim (``ceil(n/P)/n``: four templates over eight ranks leave four idle), 1 when
        replicated or working on whole Partial values."""
        if not s.divided:
            return 1.0
        out = s.out[0] if isinstance(s.out, tuple) else s.out
        split = [out] if isinstance(out, Placed) and out.dim is not None else \
            [i for i in s.inputs if isinstance(i, Placed) and i.dim is not None]
        if not split:
            return 1.0
        n = self.sizes(split[0].global_size)
        return math.ceil(n / self.world) / n if n >= 1 else 1.0

    def trans_time(self, u: torch.fx.Node, src: Spec, dst: Spec) -> float:
        """Seconds to take ``u``'s value from ``src`` to ``dst`` (inf: no collective does it)."""
        pair = (src, dst)
        kind = self._kind_memo.get(pair, False)
        if kind is False:
            if isinstance(src, tuple) or isinstance(dst, tuple):
                kind = None if src == dst else "impossible"
            else:
                try:
                    kind = _kind(src, dst)
                except ValueError:
                    kind = "impossible"
            self._kind_memo[pair] = kind
        if kind == "impossible":
            return _INF
        if kind in (None, "slice"):
            return 0.0
        nbytes = self._bytes.get(u)
        if nbytes is None:
            nbytes = self._bytes[u] = self.sizes.numel(u.meta[SYM_SHAPE]) * u.meta[DTYPE].itemsize
        return nbytes * self._factor[kind] / self.costs.link_bytes_per_s + self.costs.latency_s

    # -- the labeling problem
    def build(self) -> tuple[Problem, dict, dict, float]:
        consumers: dict[torch.fx.Node, list[tuple[torch.fx.Node, int]]] = {n: [] for n in self.values}
        for c, ins in self.inputs.items():
            for k, u in enumerate(ins):
                if u in consumers:
                    consumers[u].append((c, k))
        labels: dict[torch.fx.Node, list[_Label]] = {}
        for u in self.values:
            base = [_Label(s) for s in self.strats[u]]
            demanded: list[Placed] = []
            if len(consumers[u]) >= 2 and not u.meta.get(MULTI_OUTPUT):
                for c, k in consumers[u]:
                    if (c, k) in self.pinned:
                        continue
                    for s in self.strats[c]:
                        r = s.inputs[k]
                        if isinstance(r, Placed) and r != PARTIAL and r not in demanded:
                            demanded.append(r)
            extra = [_Label(s, r) for s in self.strats[u] for r in demanded
                     if r != s.out and isinstance(s.out, Placed) and self.trans_time(u, s.out, r) < _INF]
            labels[u] = base + extra
        problem = Problem()
        var: dict[torch.fx.Node, int] = {}
        const = 0.0
        unary_of: dict[torch.fx.Node, np.ndarray] = {}
        for u in self.values:
            t = self.compute_time(u)
            unary = np.array([t * self.share(lab.strategy) for lab in labels[u]])
            unary += np.array([self.trans_time(u, lab.strategy.out, lab.extra) if lab.extra is not None else 0.0
                               for lab in labels[u]])
            # graph outputs: the lowering gathers them
            outs = sum(1 for c in u.users if c.op == "output" and _returns(c, u))
            if outs:
                unary += outs * np.array([self._gather_out(u, lab.strategy.out) for lab in labels[u]])
            unary_of[u] = unary
            if len(labels[u]) > 1:
                var[u] = problem.add_variable(unary)
            else:
                const += float(unary[0])
        for u in self.values:
            lu = labels[u]
            for c, k in consumers[u]:
                if c not in labels:
                    continue
                lc = labels[c]
                reqs = [lab.strategy.inputs[k] for lab in lc]
                cols: dict[Any, np.ndarray] = {}
                pinned = (c, k) in self.pinned
                for r in dict.fromkeys(reqs):
                    cols[r] = np.array([self._edge(u, lab, r, pinned) for lab in lu])
                table = np.stack([cols[r] for r in reqs], axis=1)
                if u in var and c in var:
                    problem.add_pair(var[u], var[c], table)
                elif u in var:
                    problem.add_unary(var[u], table[:, 0])
                elif c in var:
                    problem.add_unary(var[c], table[0, :])
                else:
                    const += float(table[0, 0])
        return problem, var, labels, const

    def _edge(self, u: torch.fx.Node, lab: _Label, req: Spec | None, pinned: bool) -> float:
        out = lab.strategy.out
        if req is None or req == out:
            return 0.0
        if pinned or isinstance(out, tuple) or isinstance(req, tuple):
            return _INF
        if lab.extra is not None and req == lab.extra:
            return 0.0
        return self.trans_time(u, out, req)

    def _gather_out(self, u: torch.fx.Node, out: Spec) -> float:
        if isinstance(out, tuple):
            return 0.0 if all(o == REPLICATE for o in out) else _INF
        return self.trans_time(u, out, REPLICATE)


def _returns(output: torch.fx.Node, u: torch.fx.Node) -> bool:
    return u in output.all_input_nodes


# ----------------------------------------------------------------------------------------------
# the pass


@declare(requires=(SHAPE, SYM_SHAPE, DTYPE, COST), ensures=(SHARD,))
def shard_pass(gm: torch.fx.GraphModule, world_size: int, *, dap_axes: Mapping[str, int | None] | None = None,
               at: Mapping[str, int] | None = None, costs: ShardCosts | None = None,
               max_table: int = 1 << 20) -> PassResult:
    """Plan DAP over ``world_size`` ranks (see the module docstring); the graph is changed in place
    (``node.meta["shard"]`` everywhere, ``redistribute`` nodes where a placement changes)."""
    t0 = time.perf_counter()
    if not isinstance(gm, torch.fx.GraphModule):
        raise PassError(f"shard_pass needs a torch.fx.GraphModule, got {type(gm).__name__}")
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise PassError(f"shard_pass: world_size must be an int >= 1, got {world_size!r}")
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target is redistribute:
            raise PassError(f"{describe_node(n)}: the graph is already planned")
        if n.op in ("call_function", "call_method") and "shape" not in n.meta:
            raise PassError(f"{describe_node(n)} has no meta['shape']: run shape_prop_pass before shard_pass")
    if any(n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)
           and n.target.namespace == "foldcompile" for n in gm.graph.nodes):
        ensure_kernel_rules()
    costs = costs or ShardCosts()
    dims = dict(gm.meta.get("dims", {}))
    stated = {**DEFAULT_AT, **dict(at or {})}
    values = {**dims, **{k: v for k, v in stated.items() if k in dims}}
    sizes = _Sizes({dim_symbol(k): v for k, v in values.items()})
    seeds = _seeds(gm, world_size, dap_axes) if world_size > 1 else \
        {n: (REPLICATE, "one rank") for n in gm.graph.nodes if n.op == "placeholder" and n.meta.get(SHAPE) is not None}
    planner = _Planner(gm, world_size, sizes, costs, seeds)
    if world_size == 1:
        chosen = {n: _Label(Strategy(tuple(REPLICATE for _ in n.meta[SHAPE]) if n.meta.get(MULTI_OUTPUT)
                                     else REPLICATE, (None,) * len(tensor_inputs(n)), False))
                  for n in planner.values}
        solver = {"variables": 0, "max_table": 0, "conditioned": 0}
        planner.enumerate()
    else:
        planner.enumerate()
        t_rules = time.perf_counter()
        problem, var, labels, _ = planner.build()
        t_build = time.perf_counter()
        result_labels, _, solver = problem.solve(problem.greedy(), max_entries=max_table)
        solver = dict(solver, rules_seconds=round(t_rules - t0, 3), costs_seconds=round(t_build - t_rules, 3))
        chosen = {u: (labels[u][result_labels[var[u]]] if u in var else labels[u][0]) for u in planner.values}
    t_solve = time.perf_counter() - t0
    record = _materialize(gm, planner, chosen, values, stated)
    record["solver"] = dict(solver, seconds=round(time.perf_counter() - t0, 3), until_solved_seconds=round(t_solve, 3),
                            nodes=len(gm.graph.nodes))
    record["seeds"] = {n.name: {"placement": repr(p), "reason": why} for n, (p, why) in seeds.items()}
    gm.meta["shard_plan"] = record  # explain prints it (plan_table) for a planned graph
    gm.recompile()
    _log.info("shard: %d ranks, %d transitions, %d replicated ops, %.2f s", world_size,
              len(record["transitions"]), len(record["replicated"]), record["solver"]["seconds"])
    return PassResult(gm, bool(record["transitions"]), record)


def _copy_meta(src: torch.fx.Node, dst: torch.fx.Node) -> None:
    for key in (SHAPE, DTYPE, SYM_SHAPE):
        dst.meta[key] = src.meta.get(key)
    dst.meta["aliases_input"] = False
    dst.meta[OP_CLASS] = COMM
    dst.meta[COST] = {"flops": sympy.Integer(0), "bytes": sympy.Integer(0)}


def _why_replicated(u: torch.fx.Node, planner: _Planner, chosen: dict[torch.fx.Node, _Label]) -> str:
    if not any(s.divided for s in planner.strats[u]):
        return "its rule splits none of its model dims here"
    needs = [chosen[c].strategy.inputs[k] for c in u.users if c in chosen and c in planner.inputs
             for k, x in enumerate(planner.inputs[c]) if x is u]
    if needs and all(r is None or r == REPLICATE for r in needs):
        return "its consumers need it whole"
    return "cheaper replicated than split, at `at`"


def _materialize(gm: torch.fx.GraphModule, planner: _Planner, chosen: dict[torch.fx.Node, _Label],
                 values: dict[str, int], stated: dict[str, int]) -> dict[str, Any]:
    graph, world, sizes = gm.graph, planner.world, planner.sizes
    for u, lab in chosen.items():
        u.meta[SHARD] = lab.strategy.out
    first_op = next(n for n in graph.nodes if n.op != "placeholder")
    made: dict[tuple[torch.fx.Node, Placed], torch.fx.Node] = {}
    users: dict[torch.fx.Node, list[torch.fx.Node]] = {}

    def make(u: torch.fx.Node, dst: Placed) -> torch.fx.Node:
        if (u, dst) in made:
            return made[(u, dst)]
        src = u.meta[SHARD]
        if isinstance(src.placement, Shard) and isinstance(dst.placement, Shard) and src.dim == dst.dim:
            base = make(u, REPLICATE)  # a re-split of the same dim: gather, then slice
            src_node, src = base, REPLICATE
        else:
            src_node = u
        where = first_op if src_node.op == "placeholder" else src_node.next
        with graph.inserting_before(where):
            r = graph.call_function(redistribute, (src_node, src.placement, dst.placement))
        _copy_meta(u, r)
        r.meta[SHARD] = dst
        r.meta["redistribute_of"] = u.name
        made[(u, dst)] = r
        users[r] = []
        return r

    for c in list(graph.nodes):
        if c not in planner.inputs or c not in chosen:
            continue
        reqs = chosen[c].strategy.inputs
        for k, (path, u) in enumerate(tensor_inputs(c)):
            req = reqs[k] if k < len(reqs) else None
            if req is None or req == u.meta.get(SHARD):
                continue
            r = make(u, req)
            replace_input(c, path, r)
            users[r].append(c)
    position = {n: i for i, n in enumerate(graph.nodes)}
    transitions = []
    for (u, dst), r in sorted(made.items(), key=lambda kv: position[kv[1]]):
        src_node = r.args[0]
        src = src_node.meta[SHARD]
        kind = transition_kind(src.placement, dst.placement)
        readers = users[r] or [x for x in r.users]
        module = next((str(x.meta.get(MODULE_PATH) or "") for x in readers), "")
        for x in readers:
            if x.meta.get(STACK_TRACE):
                r.meta[STACK_TRACE] = x.meta[STACK_TRACE]
                break
        r.meta[MODULE_PATH] = module
        vol = transition_volume(u, kind, world)
        transitions.append({
            "kind": kind, "tensor": u.name, "node": r.name, "src": repr(src), "dst": repr(dst),
            "module": module, "producer_module": str(u.meta.get(MODULE_PATH) or ""),
            "consumers": [x.name for x in readers], "volume": vol, "volume_at": int(round(sizes(vol))),
            "position": position[r]})
    replicated = []
    replicated_flops = 0.0
    for u, lab in chosen.items():
        if u.op not in ("call_function", "call_method") or lab.strategy.divided:
            continue
        if not shardable_dims(u) and not (u.meta.get(MULTI_OUTPUT) and any(
                isinstance(s, sympy.Expr) and s.free_symbols for sh in u.meta[SYM_SHAPE] for s in sh)):
            continue  # nothing to split (a parameter's transpose, a scalar)
        flops = sizes(u.meta[COST]["flops"]) if COST in u.meta else 0.0
        replicated_flops += flops
        reason = planner.no_rule.get(u) or _why_replicated(u, planner, chosen)
        replicated.append({"node": u.name, "op": op_name(u), "module": str(u.meta.get(MODULE_PATH) or ""),
                           "reason": reason, "flops_at": int(flops)})
    out_node = next(n for n in graph.nodes if n.op == "output")
    outputs = []
    for u in out_node.all_input_nodes:
        p = u.meta.get(SHARD)
        if isinstance(p, Placed):
            kind = transition_kind(p.placement, Replicate()) if p != REPLICATE else None
            vol = transition_volume(u, kind, world)
            outputs.append({"node": u.name, "placement": repr(p), "gather": kind, "volume": vol,
                            "volume_at": int(round(sizes(vol)))})
    shape_queries = [n.name for n in graph.nodes if n.op in ("call_function", "call_method") and not _is_value(n)
                     and any(isinstance(u.meta.get(SHARD), Placed) and u.meta[SHARD].dim is not None
                             for _, u in tensor_inputs(n))]
    comm_bytes = sum(t["volume_at"] for t in transitions)
    compute_s = sum(planner.compute_time(u) * planner.share(lab.strategy) for u, lab in chosen.items())
    no_rule: dict[str, int] = {}
    for u in planner.no_rule:
        no_rule[op_name(u)] = no_rule.get(op_name(u), 0) + 1
    return {
        "world_size": world, "at": {k: v for k, v in values.items() if k in stated},
        "transitions": transitions, "replicated": replicated, "no_rule": no_rule, "outputs": outputs,
        "shape_queries": shape_queries,
        "objective": {"comm_bytes_at": comm_bytes,
                      "comm_s": comm_bytes / planner.costs.link_bytes_per_s,
                      "output_gather_bytes_at": sum(o["volume_at"] for o in outputs),
                      "compute_s": compute_s, "replicated_flops_at": int(replicated_flops)},
    }


# ----------------------------------------------------------------------------------------------
# checking a planned graph


def _world_of(gm: torch.fx.GraphModule) -> int:
    for n in gm.graph.nodes:
        p = n.meta.get(SHARD)
        for q in (p if isinstance(p, tuple) else (p,)):
            if isinstance(q, Placed) and q.split_sizes is not None:
                return len(q.split_sizes)
    return 1


def plan_violations(gm: torch.fx.GraphModule, world_size: int | None = None) -> list[str]:
    """Every way a planned graph breaks the contract (empty when it holds): a tensor without a
    placement, a redistribute whose ``src`` is not its input's placement or whose ``dst`` is not
    its own, a write in place into a redistributed copy, an op whose input placements no strategy
    of its rule accepts."""
    world = world_size or _world_of(gm)
    if any(n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)
           and n.target.namespace == "foldcompile" for n in gm.graph.nodes):
        ensure_kernel_rules()
    bad: list[str] = []
    for n in gm.graph.nodes:
        if not _is_value(n):
            continue
        p = n.meta.get(SHARD)
        multi = bool(n.meta.get(MULTI_OUTPUT))
        if (multi and not (isinstance(p, tuple) and all(isinstance(q, Placed) for q in p))) or \
                (not multi and not isinstance(p, Placed)):
            bad.append(f"{n.name}: no placement (meta['shard'] = {p!r})")
            continue
        shapes = n.meta[SHAPE] if multi else (n.meta[SHAPE],)
        for q, shape in zip(p if multi else (p,), shapes):
            if q.split_sizes is not None and (len(q.split_sizes) != world or sum(q.split_sizes) != shape[q.dim]):
                bad.append(f"{n.name}: split sizes {list(q.split_sizes)} do not split its dim {q.dim} "
                           f"({shape[q.dim]}) over {world} ranks")
        if n.op in ("placeholder", "get_attr"):
            continue
        ins = tensor_inputs(n)
        actual = [u.meta.get(SHARD) for _, u in ins]
        if n.target is redistribute:
            src, dst = n.args[1], n.args[2]
            if not isinstance(actual[0], Placed) or actual[0].placement != src:
                bad.append(f"{n.name}: redistribute from {src!r} but its input {n.args[0].name} is {actual[0]!r}")
            if p.placement != dst:
                bad.append(f"{n.name}: redistribute to {dst!r} but placed {p!r}")
            try:
                if transition_kind(src, dst) is None:
                    bad.append(f"{n.name}: redistribute from {src!r} to itself")
            except ValueError as e:
                bad.append(f"{n.name}: {e}")
            continue
        if writes_in_place(n) and ins and ins[0][1].op == "call_function" and ins[0][1].target is redistribute:
            bad.append(f"{n.name}: writes in place into {ins[0][1].name}, a redistributed copy")
        if any(a is None for a in actual):
            continue  # reported at the producer
        options = strategies(n, world, [[a] for a in actual])
        if not any(s.out == p and all(r is None or r == a for r, a in zip(s.inputs, actual)) for s in options):
            bad.append(f"{n.name} ({op_name(n)}): placed {p!r} with inputs {actual!r}, which no strategy of its "
                       "rule gives")
    return bad


def check_plan(gm: torch.fx.GraphModule, world_size: int | None = None) -> None:
    """Raise :class:`PassError` listing every violation :func:`plan_violations` finds."""
    bad = plan_violations(gm, world_size)
    if bad:
        raise PassError(f"the plan breaks its contract at {len(bad)} node(s):\n  " + "\n  ".join(bad[:40]))


# ----------------------------------------------------------------------------------------------
# a printable plan


def plan_table(record: Mapping[str, Any], max_rows: int | None = None) -> str:
    """The transitions of a ``shard_pass`` record as a table (kind, tensor, src -> dst, module,
    per-rank bytes: symbolic and at the record's size), then the totals and the replicated ops.

        >>> print(plan_table({"world_size": 2, "at": {"N_res": 256}, "transitions": [{"kind": "all_gather",
        ...     "tensor": "linear", "src": "Shard(0, sizes=[6, 5])", "dst": "Replicate()", "module": "msa_att_row",
        ...     "volume": sympy.Symbol("N_res") ** 2 * 16, "volume_at": 1048576}], "replicated": [], "outputs": []}))
        DAP plan over 2 ranks at N_res=256: 1 transitions, 1.049 MB sent per rank (forward)
        kind        tensor                              placement       module  bytes per rank  MB at size
        ----------  ------  -------------------------------------  -----------  --------------  ----------
        all_gather  linear  Shard(0, sizes=[6, 5]) -> Replicate()  msa_att_row     16*N_res**2       1.049
    """
    from foldcompile.tables import format_table  # a leaf module of plain-text helpers

    rows = [[t["kind"], t["tensor"], f"{t['src']} -> {t['dst']}", t["module"] or "(root)", str(t["volume"]),
             round(t["volume_at"] / 1e6, 4)] for t in record["transitions"]]
    shown = rows if max_rows is None else rows[:max_rows]
    at = ", ".join(f"{k}={v}" for k, v in record.get("at", {}).items())
    total = sum(t["volume_at"] for t in record["transitions"])
    lines = [f"DAP plan over {record['world_size']} ranks at {at}: {len(rows)} transitions, "
             f"{total / 1e6:.4g} MB sent per rank (forward)"]
    lines += format_table(["kind", "tensor", "placement", "module", "bytes per rank", "MB at size"], shown)
    if len(shown) < len(rows):
        lines.append(f"... ({len(rows) - len(shown)} more)")
    if record.get("outputs"):
        gathered = [o for o in record["outputs"] if o["gather"]]
        if gathered:
            lines.append(f"outputs gathered by the lowering: " + ", ".join(
                f"{o['node']} ({o['placement']})" for o in gathered))
    if record.get("replicated"):
        by_reason: dict[str, list[str]] = {}
        for r in record["replicated"]:
            by_reason.setdefault(r["reason"], []).append(f"{r['op']}@{r['module'] or '(root)'}")
        lines.append("replicated ops:")
        for reason, items in by_reason.items():
            lines.append(f"  {reason}: " + ", ".join(items[:8]) + (f", ... ({len(items)} in all)"
                                                                  if len(items) > 8 else ""))
    return "\n".join(lines)
