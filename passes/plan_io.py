"""A DAP plan as data: made once (on one rank, or in a parent process), replayed on every rank's capture.

Every rank captures the model itself (its graph must hold its own parameters), but the analysis
and the plan need not be repeated: :func:`export_plan` writes a planned graph (``shard_pass``'s
result) as picklable data — every node's name, op and arguments (other nodes by name), the meta
the later passes read (shapes, symbolic sizes, classes, costs, placements) and the
``redistribute`` nodes the planner inserted — and :func:`import_plan` replays it on another
capture of the same model: it checks that the capture has the same nodes in the same order with
the same arguments (a capture is deterministic; anything else is refused, naming the first
difference), copies the meta and inserts the redistributes where the plan has them. Every rank
then lowers the very same plan (no rank plans differently) and only one process pays for shape
propagation, classification and the placement search.

    >>> import torch, torch.fx
    >>> from foldcompile.passes.placement import Placed, Replicate, Shard, redistribute
    >>> def capture():                                    # one capture of a small function
    ...     g = torch.fx.Graph()
    ...     z = g.placeholder("z")
    ...     _ = g.output(g.call_function(torch.sum, (g.call_function(torch.sin, (z,)), 0)))
    ...     return torch.fx.GraphModule(torch.nn.Module(), g)
    >>> planned = capture()
    >>> z, sin, total, out = planned.graph.nodes
    >>> with planned.graph.inserting_after(sin):
    ...     whole = planned.graph.call_function(redistribute, (sin, Shard(0), Replicate()))
    >>> total.replace_input_with(sin, whole)
    >>> for n, p in [(z, Shard(0)), (sin, Shard(0)), (whole, Replicate()), (total, Replicate())]:
    ...     n.meta.update(shard=Placed(p, (3, 2) if p == Shard(0) else None, 5), shape=(5, 4), dtype=torch.float32)
    >>> plan = export_plan(planned)
    >>> replayed = import_plan(capture(), plan)                 # another capture of the same function
    >>> [(n.name, n.meta.get("shard")) for n in replayed.graph.nodes][1:4]
    [('sin', Shard(0, sizes=[3, 2])), ('redistribute', Replicate()), ('sum_1', Replicate())]
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx

from foldcompile.passes.base import PassError
from foldcompile.passes.meta import (ALIASES_INPUT, COST, DTYPE, EINSUM, MULTI_OUTPUT, OP_CLASS, SHAPE, SHARD,
                                     SYM_ARGS, SYM_SHAPE, SYM_VALUE)
from foldcompile.passes.placement import redistribute
from foldcompile.passes.registry import op_name

__all__ = ["PlanExport", "export_plan", "import_plan"]

# the meta the lowering and the passes after it read; everything else (fake example values, module
# stacks) is the capture's own and stays as the rank's capture wrote it
_CARRIED = (SHAPE, DTYPE, SYM_SHAPE, SYM_VALUE, SYM_ARGS, MULTI_OUTPUT, ALIASES_INPUT, OP_CLASS, COST, EINSUM, SHARD)
_GM_CARRIED = ("dims", "shape_fallbacks", "named_dims_unavailable")


@dataclass(frozen=True)
class _Ref:
    """Another node, by name, in an exported argument."""
    name: str


@dataclass
class PlanExport:
    """A planned graph as picklable data (see the module docstring). ``nodes``: ``(name, op, op
    name, args, kwargs, meta)`` in graph order; ``record``: the planner's record, where picklable."""

    nodes: list[tuple[str, str, str, Any, Any, dict]]
    gm_meta: dict[str, Any] = field(default_factory=dict)
    record: dict[str, Any] = field(default_factory=dict)


def _export_arg(a: Any) -> Any:
    return torch.fx.node.map_aggregate(a, lambda x: _Ref(x.name) if isinstance(x, torch.fx.Node) else x)


def _kind(n: torch.fx.Node) -> str:
    return "redistribute" if n.op == "call_function" and n.target is redistribute else \
        (op_name(n) if n.op in ("call_function", "call_method") else str(n.target))


def _picklable(x: Any) -> bool:
    try:
        pickle.dumps(x)
        return True
    except Exception:
        return False


def export_plan(planned: torch.fx.GraphModule, record: dict[str, Any] | None = None) -> PlanExport:
    """The plan of ``planned`` as data (see the module docstring)."""
    nodes = []
    for n in planned.graph.nodes:
        meta = {k: _export_arg(n.meta[k]) for k in _CARRIED if k in n.meta}
        nodes.append((n.name, n.op, _kind(n), _export_arg(n.args), _export_arg(dict(n.kwargs)), meta))
    gm_meta = {k: planned.meta[k] for k in _GM_CARRIED if k in getattr(planned, "meta", {})}
    rec = {k: v for k, v in (record or {}).items() if _picklable(v)}
    out = PlanExport(nodes, gm_meta, rec)
    pickle.dumps(out)   # fail here, naming nothing sent, rather than inside a broadcast
    return out


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b) or repr(a) == repr(b)
    except Exception:
        return repr(a) == repr(b)


def import_plan(gm: torch.fx.GraphModule, plan: PlanExport) -> torch.fx.GraphModule:
    """Replay ``plan`` on ``gm`` (a capture of the same model, normalized): the same nodes, the
    plan's meta, its redistributes. Refuses a capture whose nodes or arguments differ."""
    graph = gm.graph
    mine = list(graph.nodes)
    by_name = {n.name: n for n in mine}
    originals = [rec for rec in plan.nodes if rec[2] != "redistribute"]
    if [(n.name, n.op, _kind(n)) for n in mine] != [(r[0], r[1], r[2]) for r in originals]:
        for i, (n, r) in enumerate(zip(mine, originals)):
            if (n.name, n.op, _kind(n)) != (r[0], r[1], r[2]):
                raise PassError(f"import_plan: this capture differs from the plan's at node {i}: "
                                f"{n.name} ({_kind(n)}) here, {r[0]} ({r[2]}) in the plan")
        raise PassError(f"import_plan: this capture has {len(mine)} nodes, the plan's {len(originals)}")
    made: dict[str, torch.fx.Node] = {}
    prev: torch.fx.Node | None = None
    for name, op, kind, args, kwargs, meta in plan.nodes:
        if kind == "redistribute":
            with graph.inserting_after(prev):
                node = graph.create_node("call_function", redistribute, (), {}, name=name)
            made[name] = node
            by_name[name] = node
        else:
            node = by_name[name]
        prev = node

    def resolve(a: Any) -> Any:
        return torch.fx.node.map_aggregate(a, lambda x: by_name[x.name] if isinstance(x, _Ref) else x)

    for name, op, kind, args, kwargs, meta in plan.nodes:
        node = by_name[name]
        node.meta.update({k: resolve(v) for k, v in meta.items()})
        new_args, new_kwargs = resolve(args), resolve(kwargs)
        if kind != "redistribute" and not _same(_export_arg(node.args), _export_arg(new_args)) \
                and not _planned_use(node.args, new_args, made):
            raise PassError(f"import_plan: node {name} has other arguments here ({node.args}) than in the plan "
                            f"({new_args})")
        node.args, node.kwargs = new_args, new_kwargs
    for k, v in plan.gm_meta.items():
        gm.meta[k] = v
    graph.lint()
    gm.recompile()
    return gm


def _planned_use(mine: Any, planned: Any, made: dict[str, torch.fx.Node]) -> bool:
    """The plan's arguments are this node's, except where it reads a redistribute of one of them."""
    flat_mine: list = []
    flat_plan: list = []
    torch.fx.node.map_aggregate(mine, flat_mine.append)
    torch.fx.node.map_aggregate(planned, flat_plan.append)
    if len(flat_mine) != len(flat_plan):
        return False
    inserted = set(made.values())
    for a, b in zip(flat_mine, flat_plan):
        if isinstance(b, torch.fx.Node) and b in inserted:
            src = b
            while src in inserted:      # a chain of redistributes ends at the value itself
                src = src.args[0]
            if src is not a:
                return False
        elif not _same(a, b):
            return False
    return True
