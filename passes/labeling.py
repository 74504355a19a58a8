"""Minimum-cost labeling by variable elimination: the exact solver under the DAP placement search.

A problem has variables, each with a finite list of labels; a cost per label (unary) and a cost per
pair of labels of two variables (pairwise, ``inf`` for a forbidden pair). :func:`solve` finds the
labeling of least total cost by eliminating one variable at a time (min-sum dynamic programming
on the graph): eliminating ``x`` adds up every cost table that mentions ``x``, keeps, for each
labeling of ``x``'s neighbours, the best label of ``x`` and its cost, and hands that table on to
the neighbours. The order is chosen greedily (smallest table first), so graphs of small treewidth
— the Evoformer block is a chain of residual updates, treewidth 3 — solve exactly in linear time.

Where a table would grow past ``max_entries`` the solver conditions instead: it fixes one
neighbour to its label in the ``fallback`` labeling and goes on. The result is then exact given
those choices only; ``stats["conditioned"]`` counts them.

    >>> import numpy as np
    >>> p = Problem()
    >>> a, b, c = p.add_variable([0.0, 1.0]), p.add_variable([1.0, 0.0]), p.add_variable([0.0, 0.0])
    >>> p.add_pair(a, b, [[0, 5], [5, 0]])      # a and b disagree at a cost of 5
    >>> p.add_pair(b, c, [[0, 1], [1, 0]])
    >>> labels, cost, stats = p.solve()
    >>> labels, cost, stats["conditioned"]
    ([0, 0, 0], 1.0, 0)
"""
from __future__ import annotations

import heapq
from math import prod
from typing import Sequence

import numpy as np

__all__ = ["Problem"]


class Problem:
    """Variables with unary costs and pairwise cost tables (see the module docstring)."""

    def __init__(self) -> None:
        self.unary: list[np.ndarray] = []
        self.pairs: list[tuple[int, int, np.ndarray]] = []

    @property
    def domains(self) -> list[int]:
        return [len(u) for u in self.unary]

    def add_variable(self, costs: Sequence[float]) -> int:
        """A variable with one label per entry of ``costs`` (its unary cost); returns its index."""
        arr = np.asarray(costs, dtype=np.float64)
        if arr.ndim != 1 or arr.size == 0:
            raise ValueError("a variable needs at least one label")
        self.unary.append(arr.copy())
        return len(self.unary) - 1

    def add_unary(self, v: int, costs: Sequence[float]) -> None:
        """Add to variable ``v``'s unary costs."""
        self.unary[v] += np.asarray(costs, dtype=np.float64)

    def add_pair(self, a: int, b: int, table: Sequence[Sequence[float]]) -> None:
        """A cost ``table[label of a][label of b]`` (``a != b``)."""
        arr = np.asarray(table, dtype=np.float64)
        if a == b or arr.shape != (len(self.unary[a]), len(self.unary[b])):
            raise ValueError(f"pair table of shape {arr.shape} for variables {a}, {b} "
                             f"with {len(self.unary[a])} and {len(self.unary[b])} labels")
        self.pairs.append((a, b, arr))

    def cost_of(self, labels: Sequence[int]) -> float:
        """The total cost of a labeling."""
        total = sum(float(u[labels[v]]) for v, u in enumerate(self.unary))
        return total + sum(float(t[labels[a], labels[b]]) for a, b, t in self.pairs)

    def greedy(self) -> list[int]:
        """Each variable in turn (index order) its cheapest label given the earlier ones'."""
        n = len(self.unary)
        by_var: list[list[tuple[int, np.ndarray, bool]]] = [[] for _ in range(n)]
        for a, b, t in self.pairs:
            if a < b:
                by_var[b].append((a, t, True))
            else:
                by_var[a].append((b, t, False))
        labels: list[int] = []
        for v in range(n):
            cost = self.unary[v].copy()
            for u, t, u_first in by_var[v]:
                cost += t[labels[u], :] if u_first else t[:, labels[u]]
            labels.append(int(np.argmin(cost)))
        return labels

    def solve(self, fallback: Sequence[int] | None = None, max_entries: int = 1 << 20
              ) -> tuple[list[int], float, dict[str, int]]:
        """``(labels, total cost, stats)``; ``fallback`` labels are used where the solver
        conditions (default: each variable's cheapest unary label)."""
        n = len(self.unary)
        dom = self.domains
        if fallback is None:
            fallback = [int(np.argmin(u)) for u in self.unary]
        factors: dict[int, tuple[tuple[int, ...], np.ndarray]] = {}
        var_factors: list[set[int]] = [set() for _ in range(n)]
        nbrs: list[set[int]] = [set() for _ in range(n)]

        next_id = iter(range(1 << 62))

        def add_factor(scope: tuple[int, ...], arr: np.ndarray) -> None:
            fid = next(next_id)
            factors[fid] = (scope, arr)
            for v in scope:
                var_factors[v].add(fid)
                nbrs[v].update(u for u in scope if u != v)

        for v in range(n):
            add_factor((v,), self.unary[v])
        for a, b, t in self.pairs:
            add_factor((a, b), t)

        fixed: dict[int, int] = {}
        alive = set(range(n))
        steps: list[tuple[int, tuple[int, ...], np.ndarray]] = []
        stats = {"variables": n, "max_table": 0, "conditioned": 0}

        def weight(v: int) -> int:
            return prod(dom[u] for u in nbrs[v]) * dom[v]

        heap = [(weight(v), v) for v in range(n)]
        heapq.heapify(heap)

        def condition(y: int) -> None:
            label = int(fallback[y])
            fixed[y] = label
            alive.discard(y)
            for fid in list(var_factors[y]):
                scope, arr = factors.pop(fid)
                for u in scope:
                    var_factors[u].discard(fid)
                rest = tuple(u for u in scope if u != y)
                add_factor(rest, np.take(arr, label, axis=scope.index(y)))
            for u in nbrs[y]:
                nbrs[u].discard(y)
                heapq.heappush(heap, (weight(u), u))
            nbrs[y] = set()
            stats["conditioned"] += 1

        while heap:
            w, x = heapq.heappop(heap)
            if x not in alive or w != weight(x):
                continue
            if w > max_entries and nbrs[x]:
                condition(max(nbrs[x], key=lambda u: (dom[u] * len(nbrs[u]), u)))
                heapq.heappush(heap, (weight(x), x))
                continue
            rest = tuple(sorted(nbrs[x]))
            axes = (x,) + rest
            total = np.zeros([dom[a] for a in axes])
            for fid in list(var_factors[x]):
                scope, arr = factors.pop(fid)
                for u in scope:
                    var_factors[u].discard(fid)
                order = sorted(range(len(scope)), key=lambda k: axes.index(scope[k]))
                shape = [dom[a] if a in scope else 1 for a in axes]
                total = total + np.transpose(arr, order).reshape(shape)
            stats["max_table"] = max(stats["max_table"], total.size)
            steps.append((x, rest, np.argmin(total, axis=0)))
            alive.discard(x)
            for u in rest:
                nbrs[u].discard(x)
            add_factor(rest, np.min(total, axis=0))
            for u in rest:
                heapq.heappush(heap, (weight(u), u))
            nbrs[x] = set()

        labels = [0] * n
        for v, lab in fixed.items():
            labels[v] = lab
        for x, rest, best in reversed(steps):
            labels[x] = int(best[tuple(labels[u] for u in rest)]) if rest else int(best)
        return labels, self.cost_of(labels), stats
