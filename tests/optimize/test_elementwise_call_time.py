"""An element-wise group is fused only if its generated kernel takes the graph's operands: it never
fails, or computes another dtype than eager, at call time.

Regression: ``x + torch.where(m > 0, 0., -inf).to(x.dtype)`` was fused and then failed on every
call ("eager PyTorch computes it in torch.bool"): the kernel's dtype inference read a ``where`` of
two Python numbers as bool, where eager gives the default float dtype.
"""
from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from optimize_helpers import assert_same_function  # noqa: E402

import foldcompile  # noqa: E402
from foldcompile.kernels.elementwise import fuse_elementwise  # noqa: E402

INF = float("inf")


class WhereBias(nn.Module):
    """An additive mask built from two Python numbers, cast to the features' dtype."""

    def forward(self, x, m):
        return x + torch.where(m > 0, 0.0, -INF).to(x.dtype)


class WhereBiasBool(nn.Module):
    """The same with a boolean mask argument and no cast (fp32 result, as eager gives)."""

    def forward(self, x, keep):
        return torch.sigmoid(x) * 2.0 + torch.where(keep, 0.0, -1e9)


def _inputs(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, 5, 7, generator=g).to(dtype).requires_grad_(), torch.randn(3, 5, 7, generator=g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_where_of_two_numbers_is_fused_and_runs(dtype):
    model = WhereBias()
    fast = foldcompile.optimize(model, *_inputs(dtype))
    assert fast.report.counts()["elementwise"]["matched"] == 1, fast.report
    assert "fused_elementwise_where" in fast.code
    x, m = _inputs(dtype, seed=1)
    out, ref = fast(x, m), model(x, m)
    assert out.dtype == ref.dtype == dtype
    assert torch.equal(torch.isinf(out), torch.isinf(ref)) and torch.isinf(ref).any()
    finite = torch.isfinite(ref)
    assert torch.allclose(out[finite], ref[finite], rtol=1e-3 if dtype == torch.float16 else 1e-6)
    (g,) = torch.autograd.grad(out.masked_fill(~finite, 0).sum(), x)
    (g_ref,) = torch.autograd.grad(ref.masked_fill(~finite, 0).sum(), x)
    assert torch.equal(g, g_ref)


def test_where_of_two_numbers_with_a_boolean_mask_gives_eagers_dtype():
    model = WhereBiasBool()
    x = torch.randn(4, 9, requires_grad=True).half()
    keep = torch.rand(4, 9) > 0.5
    fast = foldcompile.optimize(model, x, keep)
    assert fast.report.counts()["elementwise"]["matched"] == 1, fast.report
    out, ref = fast(x, keep), model(x, keep)
    assert out.dtype == ref.dtype == torch.float32  # fp16 + a float32 tensor: float32
    assert torch.allclose(out, ref, rtol=1e-3)
    assert_same_function(model, (torch.randn(4, 9, requires_grad=True), keep))


def test_the_kernel_itself_computes_where_of_two_numbers_in_the_default_dtype():
    fused = fuse_elementwise(lambda x, m: x + torch.where(m, 0.0, -INF))
    x, m = torch.randn(37, 5, dtype=torch.float16), torch.rand(37, 5) > 0.4
    ref = x + torch.where(m, 0.0, -INF)
    out = fused(x, m)
    assert out.dtype == ref.dtype == torch.float32 and torch.equal(out, ref)


def _patched_output_dtypes(monkeypatch, fake):
    module = importlib.import_module("foldcompile.kernels.elementwise")
    monkeypatch.setattr(module.FusedElementwise, "output_dtypes", fake)


def test_a_group_the_kernel_refuses_is_left_unfused_at_optimize_time_with_the_reason(monkeypatch):
    """Whatever the generated kernel cannot take is found when the variant is built: the group is
    rejected with the kernel's words, and the call runs the ops as they were."""
    def refuse(self, *inputs):
        raise ValueError("node 'where' (where): an operand the kernels do not take")

    _patched_output_dtypes(monkeypatch, refuse)
    model = WhereBias()
    fast = foldcompile.optimize(model, *_inputs(torch.float32))
    assert fast.report.counts()["elementwise"]["matched"] == 0, fast.report
    reasons = [r["reason"] for r in fast.report.rejections if r["rule"] == "elementwise"]
    assert any("the generated kernel cannot take these operands: node 'where'" in r for r in reasons), reasons
    assert "fused_elementwise" not in fast.code
    x, m = _inputs(torch.float32, seed=2)
    assert torch.equal(fast(x, m), model(x, m))


def test_a_group_whose_kernel_would_compute_another_dtype_is_left_unfused(monkeypatch):
    _patched_output_dtypes(monkeypatch, lambda self, *inputs: [torch.float64])
    fast = foldcompile.optimize(WhereBias(), *_inputs(torch.float32))
    assert fast.report.counts()["elementwise"]["matched"] == 0, fast.report
    reasons = [r["reason"] for r in fast.report.rejections if r["rule"] == "elementwise"]
    assert any("would compute torch.float64 where eager gives torch.float32" in r for r in reasons), reasons
    unfused = {u["op"]: u["reason"] for u in fast.report.unfused}
    assert unfused["add"].startswith("unsupported dtype"), unfused
