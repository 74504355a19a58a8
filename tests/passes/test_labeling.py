"""The min-sum labeling solver: exact against brute force, and valid when it has to condition."""
import itertools

import numpy as np
import pytest

from foldcompile.passes.labeling import Problem


def random_problem(rng, n, max_labels, edges, inf_share=0.1):
    p = Problem()
    for _ in range(n):
        p.add_variable(rng.random(int(rng.integers(1, max_labels + 1))) * 3)
    pairs = set()
    while len(pairs) < edges:
        a, b = sorted(rng.choice(n, 2, replace=False).tolist())
        pairs.add((a, b))
    for a, b in sorted(pairs):
        t = rng.random((len(p.unary[a]), len(p.unary[b]))) * 5
        t[rng.random(t.shape) < inf_share] = np.inf
        t[0, 0] = 0.0  # keep a feasible labeling (all zeros)
        p.add_pair(a, b, t)
    return p


def brute_force(p):
    best = min(itertools.product(*[range(d) for d in p.domains]), key=p.cost_of)
    return p.cost_of(best)


@pytest.mark.parametrize("seed", range(12))
def test_exact_against_brute_force(seed):
    rng = np.random.default_rng(seed)
    p = random_problem(rng, n=7, max_labels=3, edges=10)
    labels, cost, stats = p.solve()
    assert stats["conditioned"] == 0
    assert cost == pytest.approx(brute_force(p)) and cost == pytest.approx(p.cost_of(labels))


def test_conditioning_stays_valid():
    rng = np.random.default_rng(1)
    p = random_problem(rng, n=8, max_labels=3, edges=20)
    labels, cost, stats = p.solve(max_entries=4)
    assert stats["conditioned"] > 0
    assert cost == pytest.approx(p.cost_of(labels)) and cost >= brute_force(p) - 1e-9


def test_a_chain_is_linear_and_exact():
    p = Problem()
    vs = [p.add_variable([0.0, 0.0, 0.0]) for _ in range(2000)]
    for a, b in zip(vs, vs[1:]):
        p.add_pair(a, b, np.ones((3, 3)) - np.eye(3))
    p.add_unary(vs[0], [5.0, 0.0, 5.0])
    labels, cost, stats = p.solve()
    assert cost == 0.0 and set(labels) == {1} and stats["max_table"] <= 9
