"""The SDPA rule: ``scaled_dot_product_attention`` calls become the fused attention, and the calls
the kernel cannot compute (dropout, causal masking, grouped-query heads, a scale that is a graph
value) are refused by name, the call left as it was.

Every accepted spelling asserts the optimized module computes what the model computes (outputs and
every gradient, fp32); every refusal asserts the reason and that nothing else changed.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from optimize_helpers import assert_same_function  # noqa: E402

import foldcompile  # noqa: E402
from foldcompile.passes import classify_pass, normalize_pass, shape_prop_pass  # noqa: E402
from foldcompile.passes.fuse import fuse_pass  # noqa: E402

B, H, L, D = 3, 2, 7, 8


def _qkv(*, grad: bool = True):
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(B, H, L, D, generator=g).requires_grad_(grad) for _ in range(3))


def _key_mask():
    m = torch.rand(B, 1, 1, L, generator=torch.Generator().manual_seed(1)) > 0.3
    m[..., 0] = True
    return m


class Call(nn.Module):
    """``F.scaled_dot_product_attention(q, k, v, **kwargs)`` with an optional mask argument."""

    def __init__(self, **kwargs):
        super().__init__()
        self.kwargs = kwargs

    def forward(self, q, k, v, mask=None):
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v, **self.kwargs)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **self.kwargs)


def _sdpa_counts(fast) -> dict:
    return fast.report.counts()["sdpa_attention"]


def _rejections(fast) -> list[str]:
    return [r["reason"] for r in fast.report.rejections if r["rule"] == "sdpa_attention"]


@pytest.mark.parametrize("kwargs,mask", [
    ({}, None),
    ({"scale": 0.3}, None),  # an explicit scale, not head_dim ** -0.5
    ({}, "bool"),  # a boolean key mask: True = attend
    ({"scale": 0.5}, "float"),  # a float additive mask broadcast over heads and queries
], ids=["plain", "explicit-scale", "bool-mask", "float-mask"])
def test_spellings_match_and_compute_the_same(kwargs, mask):
    q, k, v = _qkv()
    if mask == "bool":
        inputs = (q, k, v, _key_mask())
    elif mask == "float":
        inputs = (q, k, v, torch.randn(1, H, L, L, generator=torch.Generator().manual_seed(2)).requires_grad_())
    else:
        inputs = (q, k, v)
    model = Call(**kwargs)
    fast = foldcompile.optimize(model, *inputs)
    assert _sdpa_counts(fast) == {"matched": 1, "rejected": 0}
    assert_same_function(model, inputs, fast)


@pytest.mark.parametrize("kwargs,reason", [
    ({"dropout_p": 0.1}, "with dropout"),
    ({"is_causal": True}, "causal"),
], ids=["dropout", "causal"])
def test_calls_the_kernel_cannot_compute_are_refused(kwargs, reason):
    q, k, v = _qkv(grad=False)
    model = Call(**kwargs).eval()
    fast = foldcompile.optimize(model, q, k, v)
    assert _sdpa_counts(fast) == {"matched": 0, "rejected": 1}
    assert any(reason in r for r in _rejections(fast)), _rejections(fast)
    if not kwargs.get("dropout_p"):
        torch.testing.assert_close(fast(q, k, v), model(q, k, v), rtol=0, atol=0)


def test_grouped_query_heads_are_refused():
    q, k, v = _qkv(grad=False)
    k, v = k[:, :1].contiguous(), v[:, :1].contiguous()

    def f(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    gm = normalize_pass(torch.fx.symbolic_trace(f)).graph_module
    shape_prop_pass(gm, (q, k, v), dims={})
    classify_pass(gm)
    result = fuse_pass(gm)
    assert result.record["counts"]["sdpa_attention"] == {"matched": 0, "rejected": 1}
    assert any("grouped-query" in r["reason"] for r in result.record["rejections"])


def test_a_scale_computed_in_the_graph_is_refused_not_crashed_on():
    """symbolic_trace records ``q.size(-1) ** -0.5`` as graph nodes: the rule must refuse the call (the
    kernel's scale is a number fixed at rewrite time), where ``float(node)`` used to raise."""
    q, k, v = _qkv(grad=False)

    def f(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, scale=q.size(-1) ** -0.5)

    gm = normalize_pass(torch.fx.symbolic_trace(f)).graph_module
    shape_prop_pass(gm, (q, k, v), dims={})
    classify_pass(gm)
    result = fuse_pass(gm)
    assert result.record["counts"]["sdpa_attention"] == {"matched": 0, "rejected": 1}
    assert any("scale is a value computed in the graph" in r["reason"] for r in result.record["rejections"])
    torch.testing.assert_close(gm(q, k, v), f(q, k, v), rtol=0, atol=0)
