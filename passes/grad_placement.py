"""Where the GRADIENT of every Replicate value of a planned graph lives: the analysis the lowering needs.

A planned graph (``passes/placement.py``) says where each value lives. Its gradient's placement
follows from it for sharded values (a ``Shard(d)`` value's gradient is ``Shard(d)``) but not for
Replicate ones (docs/DAP.md, "Placements of values and of gradients"): a Replicate value's
gradient is **Replicate** when every consumer ran replicated (each rank holds the same, whole
contribution) and **Partial** when some consumer ran on a shard (each rank holds its part).
The collectives that produce or consume Replicate values need that placement as their
``grad_placement``, and the parameters' gradients need it to know which to all-reduce.

:func:`gradient_placements` walks the graph backwards. A consumer contributes

- ``"partial"`` when its own output is ``Shard``/``Partial`` (sharded compute), or it is
  Replicate with a Partial gradient;
- ``"replicate"`` when it is Replicate with a Replicate gradient, or it is the graph's output
  (the replicated-loss contract: every rank computes the same loss from the same outputs);
- nothing decided yet when it is a slice ``redistribute(x, Replicate(), Shard(d))``, whose
  backward can give either (``shard(grad_placement=...)``): it follows the others.

A value whose consumers give both kinds gets a Partial gradient, and its replicated consumers'
edges are listed in ``keep_edges``: the lowering puts ``keep_grad_on_rank`` there (identity
forward; backward keeps the replicated contribution on rank 0 and zeros elsewhere), so the sum
over ranks counts it once, exactly. A value whose only consumers are slices is Replicate if it
is a graph input (the caller gets the whole ``x.grad``: the slices' gradients are gathered) and
Partial otherwise (no traffic; whoever holds it sums it). Values that need no gradient
(``requires_grad`` False, integer and boolean values, ``grad_enabled=False``) get none.

    >>> import torch, torch.fx
    >>> from foldcompile.passes.placement import Placed, Replicate, Shard, redistribute
    >>> g = torch.fx.Graph()
    >>> w, x = g.placeholder("w"), g.placeholder("x")            # w replicated, x sharded by rows
    >>> sin = g.call_function(torch.sin, (w,), name="sin")
    >>> rows_use = g.call_function(torch.mul, (sin, x), name="rows_use")     # sharded compute
    >>> sliced = g.call_function(redistribute, (w, Replicate(), Shard(0)), name="sliced")
    >>> whole_use = g.call_function(torch.mul, (w, 2), name="whole_use")     # replicated compute
    >>> _ = g.output((rows_use, sliced, whole_use))
    >>> gm = torch.fx.GraphModule(torch.nn.Module(), g)
    >>> rows, whole = Placed(Shard(0), (3, 2), 5), Placed(Replicate())
    >>> for n, p in zip(gm.graph.nodes, [whole, rows, whole, rows, rows, whole]):
    ...     n.meta.update(shard=p, dtype=torch.float32)
    >>> places = gradient_placements(gm)
    >>> places.of["w"], places.of["sin"], places.keep_edges, places.slice_grad["sliced"]
    ('partial', 'partial', [('w', 'whole_use')], 'partial')
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional

import torch
import torch.fx
from torch.distributed.tensor import Replicate

from foldcompile.passes.meta import DTYPE, SHARD
from foldcompile.passes.placement import Placed, redistribute

__all__ = ["GradPlacements", "gradient_placements", "PARTIAL", "REPLICATE"]

PARTIAL, REPLICATE = "partial", "replicate"


@dataclass
class GradPlacements:
    """The analysis' answer, by node name.

    ``of``: the gradient placement (``"partial"`` / ``"replicate"``) of every Replicate value that
    needs a gradient; ``keep_edges``: ``(value, consumer)`` edges whose replicated contribution must
    be kept on one rank; ``slice_grad``: the ``grad_placement`` of each Replicate -> Shard
    redistribute; ``requires_grad``: the nodes a gradient reaches.
    """

    of: dict[str, str] = field(default_factory=dict)
    keep_edges: list[tuple[str, str]] = field(default_factory=list)
    slice_grad: dict[str, str] = field(default_factory=dict)
    requires_grad: set[str] = field(default_factory=set)


def _placed_all(n: torch.fx.Node) -> tuple[Placed, ...]:
    p = n.meta.get(SHARD)
    if isinstance(p, Placed):
        return (p,)
    if isinstance(p, tuple):
        return tuple(x for x in p if isinstance(x, Placed))
    return ()


def is_replicate(n: torch.fx.Node) -> bool:
    """Every tensor ``n`` produces is Replicate (and it produces at least one)."""
    ps = _placed_all(n)
    return bool(ps) and all(isinstance(p.placement, Replicate) for p in ps)


def is_sharded(n: torch.fx.Node) -> bool:
    """``n`` produces a Shard or Partial tensor."""
    return any(not isinstance(p.placement, Replicate) for p in _placed_all(n))


def _differentiable(n: torch.fx.Node) -> bool:
    dt = n.meta.get(DTYPE)
    dts = dt if isinstance(dt, tuple) else (dt,)
    return any(isinstance(d, torch.dtype) and (d.is_floating_point or d.is_complex) for d in dts)


def _is_slice(n: torch.fx.Node) -> bool:
    """A ``redistribute(x, Replicate(), Shard(d))``: its backward's placement is ours to choose."""
    return (n.op == "call_function" and n.target is redistribute and len(n.args) >= 3
            and isinstance(n.args[1], Replicate) and not isinstance(n.args[2], Replicate))


def _requires_grad(gm: torch.fx.GraphModule, inputs_requiring_grad: Optional[Mapping[str, bool]],
                   grad_enabled: bool) -> set[str]:
    if not grad_enabled:
        return set()
    out: set[str] = set()
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            if inputs_requiring_grad is not None and n.name in inputs_requiring_grad:
                rg = bool(inputs_requiring_grad[n.name])
            else:
                ev = n.meta.get("example_value")
                rg = bool(ev.requires_grad) if isinstance(ev, torch.Tensor) else _differentiable(n)
        elif n.op == "get_attr":
            try:
                obj = gm.get_parameter(str(n.target))
            except AttributeError:
                obj = None
            rg = isinstance(obj, torch.Tensor) and obj.requires_grad
        elif n.op == "output":
            continue
        else:
            rg = _differentiable(n) and any(a.name in out for a in n.all_input_nodes)
        if rg:
            out.add(n.name)
    return out


def gradient_placements(gm: torch.fx.GraphModule, *, inputs_requiring_grad: Optional[Mapping[str, bool]] = None,
                        grad_enabled: bool = True) -> GradPlacements:
    """The gradient placement of every Replicate value of a planned graph (see the module docstring).

    ``inputs_requiring_grad``: placeholder name -> whether the caller's input requires grad (default:
    the capture's example value, else any floating input); parameters are read from ``gm``.
    """
    result = GradPlacements(requires_grad=_requires_grad(gm, inputs_requiring_grad, grad_enabled))
    needs = result.requires_grad
    for v in reversed(list(gm.graph.nodes)):
        if v.name not in needs or not is_replicate(v) or v.op == "output":
            continue
        contributions: list[tuple[torch.fx.Node, str]] = []
        slices: list[torch.fx.Node] = []
        for u in v.users:
            if u.op == "output":
                contributions.append((u, REPLICATE))
            elif _is_slice(u) and u.args[0] is v:
                slices.append(u)
            elif u.name not in needs:
                continue                     # no gradient flows back through this use
            elif is_sharded(u):
                contributions.append((u, PARTIAL))
            elif u.name in result.of:
                contributions.append((u, result.of[u.name]))
        kinds = {k for _, k in contributions}
        if PARTIAL in kinds:
            place = PARTIAL
            result.keep_edges += [(v.name, u.name) for u, k in contributions if k == REPLICATE]
        elif kinds:
            place = REPLICATE
        elif slices:
            place = REPLICATE if v.op == "placeholder" else PARTIAL
        else:
            continue                          # nothing reaches a loss through v
        result.of[v.name] = place
        for s in slices:
            result.slice_grad[s.name] = place
    _one_placement_per_parameter(gm, result)
    result.keep_edges.reverse()               # in graph order
    return result


def _one_placement_per_parameter(gm: torch.fx.GraphModule, result: GradPlacements) -> None:
    """A parameter read by several get_attr nodes has one gradient: if one node's is Partial and
    another's Replicate, the Replicate node's uses are kept on one rank too (the whole is Partial)."""
    by_target: dict[str, list[torch.fx.Node]] = {}
    for n in gm.graph.nodes:
        if n.op == "get_attr" and n.name in result.of:
            by_target.setdefault(str(n.target), []).append(n)
    for nodes in by_target.values():
        if {result.of[n.name] for n in nodes} != {PARTIAL, REPLICATE}:
            continue
        for n in nodes:
            if result.of[n.name] == REPLICATE:
                result.of[n.name] = PARTIAL
                result.keep_edges += [(n.name, u.name) for u in reversed(list(n.users))
                                      if u.op == "output" or u.name in result.requires_grad]
