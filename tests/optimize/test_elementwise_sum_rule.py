"""The ``elementwise_sum`` rule: an element-wise chain summed over its trailing dims is one kernel
that never writes the summed values (the invariant point attention's squared point distances, a
squared norm); sums it must not take stay as they were, with the reason."""
from __future__ import annotations

import os
import sys

import pytest
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from optimize_helpers import assert_same_function  # noqa: E402

import foldcompile  # noqa: E402


class PointDistances(nn.Module):
    """IPA's point term: ``((q_i - k_j) ** 2).sum over points and xyz``, then a softplus weight."""

    def __init__(self, spelling: str = "mul"):
        super().__init__()
        self.spelling = spelling
        self.head_weights = nn.Parameter(torch.rand(2) + 0.5)

    def forward(self, q_pts, k_pts):  # [N, H, P, 3]
        diff = q_pts.unsqueeze(-4) - k_pts.unsqueeze(-5)  # [N_i, N_j, H, P, 3]
        if self.spelling == "mul":
            dist2 = (diff * diff).sum(dim=(-1, -2))
        else:  # over xyz with keepdim (the kernel), then over the points (a plain sum of its result)
            dist2 = (diff * diff).sum(-1, keepdim=True)[..., 0].sum(-1)
        return dist2 * torch.nn.functional.softplus(self.head_weights)


def _pts(seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(9, 2, 3, 3, generator=g).requires_grad_(), torch.randn(9, 2, 3, 3, generator=g).requires_grad_())


@pytest.mark.parametrize("spelling", ["mul", "keepdim"])
def test_squared_point_distances_are_one_kernel(spelling):
    model = PointDistances(spelling)
    fast = foldcompile.optimize(model, *_pts(0))
    counts = fast.report.counts()
    assert counts["elementwise_sum"] == {"matched": 1, "rejected": 0}, fast.report
    assert "fused_elementwise_sub_mul_sum(" in fast.code
    assert fast.code.count("torch.sum(") == (1 if spelling == "keepdim" else 0)  # the second sum is of a sum
    assert_same_function(model, _pts(1), fast)


class NotTrailing(nn.Module):
    def forward(self, x, y):
        p = torch.sigmoid(x) * y
        return (x - y).sum(0), (x - y).sum(-1, dtype=torch.float64), p.sum(-1, keepdim=True) + p


def test_sums_it_must_not_take():
    """A sum over a leading dim, one with a dtype, and one whose summed values are read elsewhere too."""
    model = NotTrailing()
    g = torch.Generator().manual_seed(0)
    inputs = (torch.randn(5, 7, generator=g).requires_grad_(), torch.randn(5, 7, generator=g).requires_grad_())
    fast = foldcompile.optimize(model, *inputs)
    counts = fast.report.counts()
    assert counts["elementwise_sum"] == {"matched": 0, "rejected": 1}, fast.report
    (why,) = [r["reason"] for r in fast.report.rejections if r["rule"] == "elementwise_sum"]
    assert why.startswith("multiple users of an interior value")
    sums = [u for u in fast.report.unfused if u["op"] == "sum"]
    assert len(sums) == 3
    assert_same_function(model, inputs, fast)
