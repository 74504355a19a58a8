"""The hand-written layer norm rule: several spellings of ``(x - mean) / sqrt(biased var + eps) * w + b``,
and the near misses it must refuse (unbiased variance, eps outside the root, a variance over
another dim or of another tensor, an interior value used elsewhere, an RMS norm)."""
from __future__ import annotations

import os
import sys

import pytest
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from optimize_helpers import assert_same_function  # noqa: E402

import foldcompile  # noqa: E402

C = 13


class ByHand(nn.Module):
    def __init__(self, spelling: str, eps: float = 1e-5):
        super().__init__()
        self.spelling, self.eps = spelling, eps
        g = torch.Generator().manual_seed(0)
        self.w = nn.Parameter(1.0 + 0.2 * torch.randn(C, generator=g))
        self.b = nn.Parameter(0.2 * torch.randn(C, generator=g))

    def forward(self, x, x2):
        s, eps, w, b = self.spelling, self.eps, self.w, self.b
        mu = x.mean(-1, keepdim=True)
        if s == "pow_rsqrt_two_subs":  # the centred value computed twice, as Protenix-style code does
            return (x - mu) * torch.rsqrt(((x - mu) ** 2).mean(-1, keepdim=True) + eps) * w + b
        d = x - mu
        if s == "var_unbiased_false_sqrt":
            return d / torch.sqrt(x.var(-1, keepdim=True, unbiased=False) + eps) * w + b
        if s == "pow_method_power_no_affine":
            return d * (d.pow(2).mean(dim=-1, keepdim=True) + eps) ** -0.5
        if s == "square_sqrt_weight_first":
            return w * (d / (eps + d.square().mean(-1, keepdim=True)).sqrt()) + b
        if s == "correction0_mul_bias_only":
            var = torch.var(x, dim=x.dim() - 1, correction=0, keepdim=True)
            return d * torch.rsqrt(var + eps) + b
        if s == "self_product_dim_list":
            return d * torch.rsqrt((d * d).mean([-1], keepdim=True) + eps) * w
        # near misses
        if s == "unbiased":
            return d / torch.sqrt(x.var(-1, keepdim=True) + eps) * w + b
        if s == "eps_outside_root":
            return d / (torch.sqrt((d ** 2).mean(-1, keepdim=True)) + eps) * w + b
        if s == "variance_over_another_dim":
            return d * torch.rsqrt((d ** 2).mean(-2, keepdim=True) + eps) * w + b
        if s == "variance_of_another_tensor":
            d2 = x2 - x2.mean(-1, keepdim=True)
            return d * torch.rsqrt((d2 ** 2).mean(-1, keepdim=True) + eps) * w + b
        if s == "variance_returned":
            var = (d ** 2).mean(-1, keepdim=True)
            return d * torch.rsqrt(var + eps) * w + b, var
        if s == "rms":
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w + b
        raise ValueError(s)

    def as_layer_norm(self, x):
        """What the rule would compute if it matched (the near misses must differ from it)."""
        return nn.functional.layer_norm(x, (C,), self.w, self.b, self.eps)


def _x(seed: int):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(3, 7, C, generator=g) * 1.5 + 0.7).requires_grad_(), torch.randn(3, 7, C, generator=g)


POSITIVE = ["pow_rsqrt_two_subs", "var_unbiased_false_sqrt", "pow_method_power_no_affine",
            "square_sqrt_weight_first", "correction0_mul_bias_only", "self_product_dim_list"]


@pytest.mark.parametrize("spelling", POSITIVE)
def test_spellings_of_a_layer_norm_become_one_fused_layer_norm(spelling):
    model = ByHand(spelling)
    fast = foldcompile.optimize(model, *_x(0))
    assert fast.report.counts()["hand_layer_norm"] == {"matched": 1, "rejected": 0}, fast.report
    assert "fused_layer_norm(" in fast.code
    for op in ("mean", "rsqrt", "sqrt", "var", "pow"):
        assert f"torch.{op}(" not in fast.code and f".{op}(" not in fast.code, op
    assert_same_function(model, _x(1), fast)


@pytest.mark.parametrize("spelling, reason", [
    ("unbiased", "unbiased variance"),
    ("eps_outside_root", "eps added outside the root"),
    ("variance_over_another_dim", "not the variance of x over the last dim"),
    ("variance_of_another_tensor", "not the variance of x over the last dim"),
    ("variance_returned", "multiple users of an interior value"),
])
def test_near_misses_are_refused_with_the_reason(spelling, reason):
    model = ByHand(spelling, eps=0.1)  # a large eps: eps outside the root differs visibly
    x, x2 = _x(0)
    fast = foldcompile.optimize(model, x, x2)
    counts = fast.report.counts()
    assert counts["hand_layer_norm"] == {"matched": 0, "rejected": 1}, fast.report
    assert reason in next(r["reason"] for r in fast.report.rejections if r["rule"] == "hand_layer_norm")
    assert "fused_layer_norm(" not in fast.code
    if spelling != "variance_returned":  # (that one is a layer norm, its variance needed elsewhere)
        with torch.no_grad():
            real = model(x, x2)
            assert (real - model.as_layer_norm(x)).norm() > 1e-3 * real.norm()  # a real trap
    assert_same_function(model, _x(1), fast)


def test_an_rms_norm_is_not_a_candidate():
    model = ByHand("rms")
    fast = foldcompile.optimize(model, *_x(0))
    assert fast.report.counts()["hand_layer_norm"] == {"matched": 0, "rejected": 0}
    assert "fused_layer_norm(" not in fast.code
    assert_same_function(model, _x(1), fast)
