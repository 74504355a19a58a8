"""A DAP plan as data: made once (on one rank, or in a parent process), replayed on every rank's capture.

Every rank captures the model itself (its graph must hold its own parameters), but the analysis
and the plan need not be repeated: :func:`export_plan` writes a planned graph (``shard_pass``'s
result) as picklable data — every node's name, op and arguments (other nodes by name), the meta
the later passes read (shapes, symbolic sizes, classes, costs, placements) and the
``redistribute`` nodes the planner inserted — and :func:`import_plan` replays it on another
capture of the same model: it checks that the capture has the same nodes in the same order with
the same arguments and keyword arguments (a capture is deterministic; anything else is refused,
naming the first difference) and, where they are given, the same world size and inputs (each
input's name, shape and dtype; a non-tensor input's value) as the plan was made for, copies the
meta and inserts the redistributes where the plan has them. Every rank
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
    >>> plan = export_plan(planned, world_size=2, example_inputs=[torch.randn(5, 4)])
    >>> replayed = import_plan(capture(), plan, world_size=2)   # another capture of the same function
    >>> [(n.name, n.meta.get("shard")) for n in replayed.graph.nodes][1:4]
    [('sin', Shard(0, sizes=[3, 2])), ('redistribute', Replicate()), ('sum_1', Replicate())]
    >>> import_plan(capture(), plan, world_size=3)
    Traceback (most recent call last):
      ...
    foldcompile.passes.base.PassError: import_plan: the plan was made for world_size=2, it is applied to 3 ranks
    >>> import_plan(capture(), plan, example_inputs=[torch.randn(6, 4)])
    Traceback (most recent call last):
      ...
    foldcompile.passes.base.PassError: import_plan: input 0 (z) has shape (6, 4) here, (5, 4) in the plan; make the plan with the inputs it is applied to
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.fx

from foldcompile.passes.base import PassError
from foldcompile.passes.meta import (ALIASES_INPUT, COST, DTYPE, EINSUM, MULTI_OUTPUT, OP_CLASS, SHAPE, SHARD,
                                     SYM_ARGS, SYM_SHAPE, SYM_VALUE)
from foldcompile.passes.placement import Placed, redistribute
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
    name, args, kwargs, meta)`` in graph order; ``record``: the planner's record, where picklable;
    ``world_size``: the ranks it was made for; ``inputs``: ``(name, kind, shape or value, dtype)`` of
    each example input (kind ``"tensor"`` or ``"value"``), None where not given."""

    nodes: list[tuple[str, str, str, Any, Any, dict]]
    gm_meta: dict[str, Any] = field(default_factory=dict)
    record: dict[str, Any] = field(default_factory=dict)
    world_size: int | None = None
    inputs: list[tuple[str, str, Any, str | None]] | None = None


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


def _input_specs(gm: torch.fx.GraphModule, values: Sequence[Any]) -> list[tuple[str, str, Any, str | None]]:
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    if len(values) != len(names):
        raise PassError(f"export_plan: {len(values)} example inputs for a graph of {len(names)} inputs {names}")
    return [(name, "tensor", tuple(v.shape), str(v.dtype)) if isinstance(v, torch.Tensor) else
            (name, "value", repr(v), None) for name, v in zip(names, values)]


def _world_of(planned: torch.fx.GraphModule, record: dict[str, Any]) -> int | None:
    if isinstance(record.get("world_size"), int):
        return record["world_size"]
    for n in planned.graph.nodes:
        p = n.meta.get(SHARD)
        if isinstance(p, Placed) and p.split_sizes is not None:
            return len(p.split_sizes)
    return None


def export_plan(planned: torch.fx.GraphModule, record: dict[str, Any] | None = None, *,
                world_size: int | None = None, example_inputs: Sequence[Any] | None = None) -> PlanExport:
    """The plan of ``planned`` as data (see the module docstring). ``world_size``: the ranks it is
    for (default: the record's, else the split sizes'); ``example_inputs``: one value per placeholder,
    the inputs it was planned on (recorded so that :func:`import_plan` can refuse other ones)."""
    nodes = []
    for n in planned.graph.nodes:
        meta = {k: _export_arg(n.meta[k]) for k in _CARRIED if k in n.meta}
        nodes.append((n.name, n.op, _kind(n), _export_arg(n.args), _export_arg(dict(n.kwargs)), meta))
    gm_meta = {k: planned.meta[k] for k in _GM_CARRIED if k in getattr(planned, "meta", {})}
    rec = {k: v for k, v in (record or {}).items() if _picklable(v)}
    world = world_size if world_size is not None else _world_of(planned, record or {})
    inputs = _input_specs(planned, example_inputs) if example_inputs is not None else None
    out = PlanExport(nodes, gm_meta, rec, world, inputs)
    pickle.dumps(out)   # fail here, naming nothing sent, rather than inside a broadcast
    return out


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b) or repr(a) == repr(b)
    except Exception:
        return repr(a) == repr(b)


def _check_inputs(gm: torch.fx.GraphModule, plan: PlanExport, values: Sequence[Any]) -> None:
    mine = _input_specs(gm, values)
    if len(mine) != len(plan.inputs):
        raise PassError(f"import_plan: this call has {len(mine)} inputs, the plan's {len(plan.inputs)}")
    for i, ((name, kind, what, dtype), (pname, pkind, pwhat, pdtype)) in enumerate(zip(mine, plan.inputs,
                                                                                        strict=True)):
        where = f"import_plan: input {i} ({pname})"
        if name != pname:
            raise PassError(f"{where} is named {name} here")
        if kind != pkind:
            raise PassError(f"{where} is a {kind} here, a {pkind} in the plan")
        if kind == "tensor" and what != pwhat:
            raise PassError(f"{where} has shape {what} here, {pwhat} in the plan; make the plan with the inputs "
                            "it is applied to")
        if kind == "tensor" and dtype != pdtype:
            raise PassError(f"{where} has dtype {dtype} here, {pdtype} in the plan; make the plan with the inputs "
                            "it is applied to")
        if kind == "value" and what != pwhat:
            raise PassError(f"{where} is {what} here, {pwhat} in the plan; make the plan with the inputs it is "
                            "applied to")


def import_plan(gm: torch.fx.GraphModule, plan: PlanExport, *, world_size: int | None = None,
                example_inputs: Sequence[Any] | None = None) -> torch.fx.GraphModule:
    """Replay ``plan`` on ``gm`` (a capture of the same model, normalized): the same nodes, the
    plan's meta, its redistributes. Refuses a capture whose nodes, arguments or keyword arguments
    differ, a ``world_size`` other than the plan's, and ``example_inputs`` (one value per placeholder)
    whose names, shapes, dtypes or values differ from those the plan was made on."""
    if world_size is not None and plan.world_size is not None and world_size != plan.world_size:
        raise PassError(f"import_plan: the plan was made for world_size={plan.world_size}, it is applied to "
                        f"{world_size} ranks")
    if example_inputs is not None and plan.inputs is not None:
        _check_inputs(gm, plan, example_inputs)
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
        if kind != "redistribute" and not _same(_export_arg(dict(node.kwargs)), _export_arg(new_kwargs)) \
                and not (set(node.kwargs) == set(new_kwargs)
                         and _planned_use([node.kwargs[k] for k in sorted(node.kwargs)],
                                          [new_kwargs[k] for k in sorted(new_kwargs)], made)):
            raise PassError(f"import_plan: node {name} has other keyword arguments here ({dict(node.kwargs)}) than "
                            f"in the plan ({new_kwargs})")
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
