"""Rules do not fuse across the start or end of a grad-mode region (``torch.no_grad()`` inside a forward):
a kernel spanning the boundary would give the values computed without grad a gradient, or take it from
the ones computed with it. The boundary nodes are the registry's ``changes_mode`` ops."""
from __future__ import annotations

import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from optimize_helpers import assert_same_function  # noqa: E402

import foldcompile  # noqa: E402
from foldcompile.passes.registry import changes_mode  # noqa: E402


class NoGradInTheMiddle(nn.Module):
    """An element-wise chain whose middle runs without grad (a detached statistic, as recycling does)."""

    def forward(self, x):
        a = torch.sigmoid(x) * 2.0
        with torch.no_grad():
            b = a * a + 1.0
        return torch.tanh(a * b) + a


def test_no_fused_kernel_spans_a_grad_mode_change():
    model = NoGradInTheMiddle()
    x = torch.randn(4, 33, requires_grad=True)
    fast = foldcompile.optimize(model, x)
    graph = fast.graph_module.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    changes = [order[n] for n in graph.nodes if changes_mode(n)]
    assert len(changes) == 2, [n.format_node() for n in graph.nodes]
    for m in fast.report.matches:
        # every fused group's traced nodes lie on one side of each change
        spots = [order[n] for n in graph.nodes if n.name in m.get("origin", ())]
        assert all(min(spots, default=0) > c or max(spots, default=0) < c for c in changes), m
    assert_same_function(model, (x,), fast)
