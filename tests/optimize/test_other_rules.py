"""Layer norm, softmax and element-wise rules: several spellings each, a near miss each, and the
element-wise grouping's convexity check."""
from __future__ import annotations

import os
import sys

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from optimize_helpers import assert_same_function  # noqa: E402

import foldcompile  # noqa: E402
from foldcompile.passes.rules.elementwise import _convex, _dag  # noqa: E402


class Norms(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln = nn.LayerNorm(13)
        self.w, self.b = nn.Parameter(torch.randn(13)), nn.Parameter(torch.randn(13))

    def forward(self, x):
        return self.ln(x) + F.layer_norm(x, (13,), self.w, self.b, 1e-6) + F.layer_norm(x, x.shape[-1:])


class TwoDimNorm(nn.Module):
    def forward(self, x):
        return F.layer_norm(x, x.shape[-2:])  # over two dims: the kernel normalises one


def test_layer_norm_spellings_and_a_two_dim_near_miss():
    model, x = Norms(), torch.randn(3, 7, 13, requires_grad=True)
    fast = foldcompile.optimize(model, x)
    assert fast.report.counts()["layer_norm"] == {"matched": 3, "rejected": 0}
    assert_same_function(model, (x,), fast)
    near = foldcompile.optimize(TwoDimNorm(), x)
    assert near.report.counts()["layer_norm"] == {"matched": 0, "rejected": 1}
    assert "2 trailing dims" in near.report.rejections[0]["reason"]
    assert_same_function(TwoDimNorm(), (x,), near)


class SharedWeights(nn.Module):
    """The weights are used twice (returned too): not an attention, but a biased, masked softmax."""

    def forward(self, logits, bias, keep):
        w = torch.softmax(torch.where(keep, logits * 0.5 + bias, float("-inf")), dim=-1)
        return w, w.sum(-2)


def test_softmax_with_scale_bias_and_mask_including_a_row_that_keeps_nothing():
    keep = torch.rand(2, 3, 5, 11) > 0.3
    keep[0, 0, 0] = False  # eager: NaN in that row; the kernel gives 0, the rewrite puts NaN back
    inputs = (torch.randn(2, 3, 5, 11, requires_grad=True), torch.randn(3, 1, 11, requires_grad=True), keep)
    model = SharedWeights()
    fast = foldcompile.optimize(model, *inputs)
    assert fast.report.counts()["softmax"] == {"matched": 1, "rejected": 0}
    assert "fused_softmax(" in fast.code and "scale = 0.5" in fast.code
    out, ref = fast(*inputs)[0], model(*inputs)[0]
    assert torch.equal(torch.isnan(out), torch.isnan(ref)) and torch.isnan(ref[0, 0, 0]).all()
    keep[0, 0, 0] = True
    assert_same_function(model, inputs, fast)


class Chains(nn.Module):
    """bias + residual, sigmoid gating with a broadcast mask: element-wise chains of one shape."""

    def __init__(self):
        super().__init__()
        self.a, self.g = nn.Linear(12, 12), nn.Linear(12, 12)

    def forward(self, x, mask):
        gated = torch.sigmoid(self.g(x)) * self.a(x) * mask[..., None]
        return x + gated * 0.5


def test_elementwise_chain_into_one_kernel():
    model = Chains()
    inputs = (torch.randn(3, 9, 12, requires_grad=True), (torch.rand(3, 9) > 0.2).float())
    fast = foldcompile.optimize(model, *inputs)
    assert fast.report.counts()["elementwise"]["matched"] == 1
    names = [n.target.__name__ for n in fast.graph_module.graph.nodes if n.meta.get("fused_by") == "elementwise"]
    assert names == ["fused_elementwise_sigmoid_mul_add"]
    assert "fused_elementwise_sigmoid_mul_add(" in fast.code
    assert_same_function(model, inputs, fast)


class InteriorUsedTwice(nn.Module):
    def forward(self, x):
        y = torch.sigmoid(x)
        return y * 2.0 + 1.0, y.sum()  # y is needed outside the chain


def test_an_interior_value_with_another_user_stays_out_of_the_group():
    model = InteriorUsedTwice()
    x = torch.randn(4, 10, requires_grad=True)
    fast = foldcompile.optimize(model, x)
    group = next(m for m in fast.report.matches if m["rule"] == "elementwise")
    assert "sigmoid" not in group["origin"]
    assert any(u["op"] == "sigmoid" and u["reason"].startswith("multiple users of an interior value")
               for u in fast.report.unfused)
    assert_same_function(model, (x,), fast)


def test_convexity_refuses_a_group_with_a_path_through_an_unfused_node():
    def f(x, w):
        a = x + 1.0
        m = a @ w  # not element-wise
        return a * m
    gm = torch.fx.symbolic_trace(f)
    nodes = {n.name: n for n in gm.graph.nodes}
    dag = _dag(gm.graph)
    assert not _convex(dag, {nodes["add"], nodes["mul"]})
    assert _convex(dag, {nodes["mul"]}) and _convex(dag, {nodes["add"]})
