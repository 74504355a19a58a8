"""The orders a graph's nodes may run in: its data edges and the order it must keep.

A scheduling pass may run a node anywhere after its inputs and before its users, except that:

- **barriers** keep their place and nothing crosses one: grad-mode and autocast changes (a node moved
  across runs under another mode: a start or wait run under ``no_grad`` records no autograd node),
  in-place writes (a read moved across one reads another value) and the nodes torch.fx calls impure;
- **ordered** nodes keep their order among themselves: random draws (every rank must draw what one
  process draws, in the same order: ``docs/DAP.md``, "Random ops"), a fused kernel with a dropout
  (it draws its seed from torch's generator), a checkpoint region (it may draw inside), and any op the
  registry does not know (it may touch state no edge shows);
- placeholders stay first, the output last; ``get_attr`` nodes (parameters, the process group) are
  free and go before their first user.

:class:`Dependence` holds that as a ``networkx`` DAG over the graph's nodes (an edge per data edge
and one between consecutive ordered nodes) with the region of each node (the stretch between two
barriers), and answers which compute nodes are **independent** of a collective: in its region,
neither an ancestor of its start nor a descendant of its wait. That is what any schedule may put
between the two, the bound an overlap is measured against.

    >>> import torch, torch.fx
    >>> from foldcompile.distributed import all_gather_start, wait
    >>> g = torch.fx.Graph()
    >>> x = g.placeholder("x")
    >>> a = g.call_function(torch.sin, (x,), name="a")
    >>> h = g.call_function(all_gather_start, (a, 0), {"grad_placement": "partial"}, name="h_a")
    >>> full = g.call_function(wait, (h,), name="a_full")
    >>> b = g.call_function(torch.cos, (x,), name="b")                  # independent of the gather
    >>> c = g.call_function(torch.add, (full, b), name="c")             # needs it
    >>> _ = g.output(c)
    >>> dep = Dependence(torch.fx.GraphModule(torch.nn.Module(), g))
    >>> [n.name for n in dep.independent(h, full)]
    ['b']
"""
from __future__ import annotations

from typing import Iterable, Optional

import networkx as nx
import torch
import torch.fx

from foldcompile.distributed.collectives import wait
from foldcompile.distributed.sharded_random import draw_global, draw_global_like, sharded_dropout
from foldcompile.passes.base import PassError, describe_node
from foldcompile.passes.localize import collective_of, is_runtime_call
from foldcompile.passes.registry import changes_mode, draws_random, entry_of, op_name, writes_in_place

__all__ = ["Dependence", "is_barrier", "is_ordered", "pairs_of"]

_DRAWS = {sharded_dropout, draw_global, draw_global_like}


def _impure(n: torch.fx.Node) -> bool:
    try:
        return bool(n.is_impure(impure_random=False))
    except TypeError:   # torch builds whose is_impure takes no impure_random
        return bool(n.is_impure()) and not draws_random(n)
    except Exception:
        return True


def is_barrier(n: torch.fx.Node) -> bool:
    """A node nothing may cross (see the module docstring)."""
    if n.op == "call_method":        # (normalize leaves none; a method call is an in-place write by its name)
        return str(n.target).endswith("_") and not str(n.target).endswith("__")
    if n.op != "call_function":
        return n.op == "call_module"
    if is_runtime_call(n) or n.target in _DRAWS or draws_random(n):
        return False   # random draws are ordered, not barriers (torch calls some of them impure)
    return changes_mode(n) or writes_in_place(n) or _impure(n)


def is_ordered(n: torch.fx.Node) -> bool:
    """A node that keeps its order among the ordered nodes: it draws random numbers, or may touch state."""
    if n.op == "call_method":
        return not is_barrier(n)
    if n.op != "call_function" or is_barrier(n):
        return False
    if n.target in _DRAWS or draws_random(n):
        return True
    if is_runtime_call(n):
        return False
    kernel = getattr(n.target, "kernel", None)
    if n.meta.get("fused_by") is not None:
        return bool(getattr(kernel, "has_dropout", False)) or "dropout" in op_name(n)
    return entry_of(n) is None or op_name(n) == "checkpoint"


def pairs_of(gm: torch.fx.GraphModule) -> list[tuple[torch.fx.Node, torch.fx.Node]]:
    """The (start, wait) pairs of a lowered graph, in graph order."""
    out = []
    for s in gm.graph.nodes:
        if collective_of(s) is None:
            continue
        users = list(s.users)
        if len(users) != 1 or users[0].target is not wait:
            raise PassError(f"{describe_node(s)}: a start must have exactly one user, its wait "
                            f"(has {[u.name for u in users]})")
        out.append((s, users[0]))
    return out


class Dependence:
    """The DAG of ``gm``'s nodes with the edges a schedule must respect (see the module docstring)."""

    def __init__(self, gm: torch.fx.GraphModule):
        self.gm = gm
        self.nodes = list(gm.graph.nodes)
        self.index = {n: i for i, n in enumerate(self.nodes)}
        self.dag = nx.DiGraph()
        self.barriers = [n for n in self.nodes if is_barrier(n)]
        self.region: dict[torch.fx.Node, int] = {}
        self._up: dict[torch.fx.Node, frozenset] = {}
        self._down: dict[torch.fx.Node, frozenset] = {}
        r = 0
        last_ordered: Optional[torch.fx.Node] = None
        for n in self.nodes:
            self.dag.add_node(n)
            for p in n.all_input_nodes:
                self.dag.add_edge(p, n)
            if n in self.barriers:
                r += 1
                self.region[n] = r
                r += 1
                last_ordered = None
                continue
            self.region[n] = r
            if is_ordered(n):
                if last_ordered is not None:
                    self.dag.add_edge(last_ordered, n)
                last_ordered = n

    def is_compute(self, n: torch.fx.Node) -> bool:
        """A node a scheduler places: not a graph end, a parameter, a barrier or a collective's start/wait."""
        return n.op in ("call_function", "call_method") and n not in self.barriers and collective_of(n) is None \
            and n.target is not wait

    def _within(self, nodes: Iterable[torch.fx.Node], region: int) -> set[torch.fx.Node]:
        return {n for n in nodes if self.region.get(n) == region}

    def ancestors(self, n: torch.fx.Node) -> set[torch.fx.Node]:
        """The nodes of ``n``'s region that must run before it."""
        if n not in self._up:
            self._up[n] = frozenset(self._within(nx.ancestors(self.dag, n), self.region[n]))
        return set(self._up[n])

    def descendants(self, n: torch.fx.Node) -> set[torch.fx.Node]:
        """The nodes of ``n``'s region that must run after it."""
        if n not in self._down:
            self._down[n] = frozenset(self._within(nx.descendants(self.dag, n), self.region[n]))
        return set(self._down[n])

    def independent(self, start: torch.fx.Node, wait_node: torch.fx.Node) -> list[torch.fx.Node]:
        """The compute nodes any schedule may put between ``start`` and ``wait_node`` (graph order)."""
        region = self.region[start]
        if self.region[wait_node] != region:
            raise PassError(f"{describe_node(start)}: its wait {wait_node.name} lies in another grad-mode region")
        excluded = self.ancestors(start) | self.descendants(wait_node)
        return [n for n in self.nodes if self.region[n] == region and n not in excluded and self.is_compute(n)]
