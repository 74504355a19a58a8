"""The element-wise rule's convexity test on the live graph (passes/rules/elementwise.py ``_Flow``):
the same answers as the definition (no path from the group through an outside node back into it), a
search bounded by the group's last member, and one numbering per graph rather than a new data-flow
graph after every match (which made fusing a 48-block trunk quadratic in its size)."""
from __future__ import annotations

import random

import networkx as nx
import torch

import foldcompile
import foldcompile.passes.rules.elementwise as E


def _reference_convex(graph: torch.fx.Graph, group: set) -> bool:
    dag = nx.DiGraph()
    for n in graph.nodes:
        dag.add_node(n)
        for u in n.users:
            dag.add_edge(n, u)
    return not any(s not in group and nx.descendants(dag, s) & group for n in group for s in dag.successors(n))


def _random_graph(rng: random.Random, size: int) -> torch.fx.Graph:
    g = torch.fx.Graph()
    nodes = [g.placeholder("x")]
    for _ in range(size):
        args = rng.sample(nodes[-6:], k=min(len(nodes[-6:]), rng.choice([1, 2])))
        nodes.append(g.call_function(torch.add if len(args) == 2 else torch.neg, tuple(args)))
    g.output(nodes[-1])
    return g


def test_convexity_agrees_with_its_definition_on_random_graphs():
    rng = random.Random(0)
    for _ in range(40):
        graph = _random_graph(rng, 30)
        ops = [n for n in graph.nodes if n.op == "call_function"]
        for _ in range(10):
            group = set(rng.sample(ops, k=rng.randint(1, 5)))
            assert E._convex(E._dag(graph), group) == _reference_convex(graph, group)


def test_the_search_stops_at_the_groups_last_member():
    rng = random.Random(1)
    graph = _random_graph(rng, 400)
    ops = [n for n in graph.nodes if n.op == "call_function"]
    flow = E._dag(graph)
    seen = []
    successors = flow.successors
    flow.successors = lambda n: seen.append(n) or successors(n)
    group = {ops[3], ops[5]}
    E._convex(flow, group)
    assert all(flow.position(n) <= flow.position(ops[5]) for n in seen)  # the 395 nodes after it: not visited


class _Chain(torch.nn.Module):
    """Many element-wise groups, each between two matmuls."""

    def __init__(self, n: int = 12):
        super().__init__()
        self.w = torch.nn.ParameterList(torch.nn.Parameter(torch.randn(8, 8) / 3) for _ in range(n))

    def forward(self, x):
        for w in self.w:
            x = torch.sigmoid(x * 1.5 + 0.25) * x
            x = x @ w
        return x


def test_one_numbering_per_graph_not_one_per_match(monkeypatch):
    made = []
    real_init = E._Flow.__init__
    monkeypatch.setattr(E._Flow, "__init__", lambda self, graph: made.append(graph) or real_init(self, graph))
    model, x = _Chain(), torch.randn(4, 8)
    fast = foldcompile.optimize(model, x)
    assert fast.report.counts()["elementwise"]["matched"] == 12
    assert len(made) == 1  # before: a new data-flow graph after every one of the 12 matches
    torch.testing.assert_close(fast(x), model(x))
