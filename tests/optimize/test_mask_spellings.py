"""The attention rule on the mask spellings of Protenix-style and other AF3-style code: fill values
built as 0-dim tensors, no-op casts around the logits and the weights, a NaN clean-up of the
weights after an ``-inf`` fill; and the near misses it must refuse (a fill that is not ``-inf``
or the lowest value, a clean-up to a value other than 0, a cast that changes the dtype, a fill
read from a buffer).

Every case runs rows that keep no key (the clean-up's reason to exist): eager's value there is
0 after a clean-up, which is the kernel's own; the optimized module must equal eager on outputs
and every gradient.
"""
from __future__ import annotations

import doctest
import importlib
import os
import sys

import pytest
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from optimize_helpers import assert_same_function  # noqa: E402

import foldcompile  # noqa: E402

S, L, H, D = 3, 7, 2, 8


def _inputs(seed: int = 0, fully_masked: bool = True):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(S, H, L, D, generator=g).requires_grad_() for _ in range(3))
    keep = torch.rand(S, 1, 1, L, generator=g) > 0.4
    keep[1:, ..., 0] = True
    if fully_masked:
        keep[0] = False  # a row that keeps no key
    else:
        keep[0, ..., 0] = True
    return q, k, v, keep


class Fill(nn.Module):
    """``spelling`` picks how the masked logits are written."""

    def __init__(self, spelling: str):
        super().__init__()
        self.spelling = spelling
        self.register_buffer("neg", torch.tensor(float("-inf")))

    def forward(self, q, k, v, keep):
        logits = (q @ k.transpose(-1, -2)).to(torch.float32) * D ** -0.5
        s = self.spelling
        if s == "where_tensor":
            logits = torch.where(keep, logits, torch.tensor(float("-inf"), dtype=logits.dtype))
        elif s == "where_scalar_tensor":
            logits = torch.where(~keep, torch.scalar_tensor(float("-inf")), logits)
        elif s == "masked_fill_full":
            logits = logits.masked_fill(~keep, torch.full((), float("-inf")))
        elif s == "masked_fill_finfo_tensor":
            logits = logits.masked_fill(~keep, torch.tensor(torch.finfo(logits.dtype).min))
        elif s == "where_tensor_finite":  # near miss: -2 keeps weight on masked keys
            logits = torch.where(keep, logits, torch.tensor(-2.0))
        elif s == "where_buffer":  # near miss: a buffer's value is not a constant (it may change)
            logits = torch.where(keep, logits, self.neg)
        w = torch.softmax(logits, dim=-1)
        if s == "masked_fill_finfo_tensor":
            return w @ v
        return torch.nan_to_num(w) @ v if s != "where_tensor_finite" else w @ v


@pytest.mark.parametrize("spelling", ["where_tensor", "where_scalar_tensor", "masked_fill_full",
                                      "masked_fill_finfo_tensor"])
def test_fill_values_built_as_0_dim_tensors(spelling):
    model, inputs = Fill(spelling), _inputs(0)
    fast = foldcompile.optimize(model, *inputs)
    assert fast.report.counts()["attention"] == {"matched": 1, "rejected": 0}, fast.report
    assert_same_function(model, _inputs(1), fast)


def test_a_finite_0_dim_tensor_fill_is_refused():
    model, inputs = Fill("where_tensor_finite"), _inputs(0, fully_masked=False)
    fast = foldcompile.optimize(model, *inputs)
    assert fast.report.counts()["attention"] == {"matched": 0, "rejected": 1}
    assert "neither -inf nor the dtype's lowest value" in fast.report.rejections[0]["reason"]
    assert_same_function(model, _inputs(1, fully_masked=False), fast)


def test_a_fill_read_from_a_buffer_is_not_taken_as_a_mask():
    model, inputs = Fill("where_buffer"), _inputs(0)
    fast = foldcompile.optimize(model, *inputs)
    assert fast.report.counts()["attention"]["matched"] == 0
    model.neg.fill_(-3.0)  # the buffer changes after capture: the graph reads it, as eager does
    assert_same_function(model, _inputs(1, fully_masked=False), fast)


class CleanUp(nn.Module):
    """``masked_fill(~keep, -inf)``, softmax, then one NaN clean-up spelling, through no-op casts."""

    def __init__(self, spelling: str):
        super().__init__()
        self.spelling = spelling

    def forward(self, q, k, v, keep):
        logits = (q.float() @ k.to(dtype=torch.float32).transpose(-1, -2)) / D ** 0.5
        w = torch.softmax(logits.masked_fill(~keep, float("-inf")), -1)
        s = self.spelling
        if s == "nan_to_num":
            w = torch.nan_to_num(w)
        elif s == "nan_to_num_kw":
            w = w.nan_to_num(nan=0.0)
        elif s == "where_isnan":
            w = torch.where(torch.isnan(w), 0.0, w)
        elif s == "where_isnan_zeros_like":
            w = torch.where(w.isnan(), torch.zeros_like(w), w)
        elif s == "masked_fill_isnan":
            w = w.masked_fill(torch.isnan(w), 0)
        elif s == "nan_to_num_half":  # near miss: a row that keeps nothing gets weights 0.5
            w = torch.nan_to_num(w, nan=0.5)
        elif s == "where_isnan_one":  # near miss
            w = torch.where(torch.isnan(w), 1.0, w)
        elif s == "cast_to_double":  # near miss: a real cast of the weights
            return (torch.nan_to_num(w).double() @ v.double()).float()
        return w.to(v.dtype) @ v


@pytest.mark.parametrize("spelling", ["nan_to_num", "nan_to_num_kw", "where_isnan", "where_isnan_zeros_like",
                                      "masked_fill_isnan"])
def test_nan_clean_up_of_the_weights_is_folded_and_rows_that_keep_nothing_give_0(spelling):
    model, inputs = CleanUp(spelling), _inputs(0)
    fast = foldcompile.optimize(model, *inputs)
    assert fast.report.counts()["attention"] == {"matched": 1, "rejected": 0}, fast.report
    (match,) = [m for m in fast.report.matches if m["rule"] == "attention"]
    assert any("NaN clean-up folded" in note for note in match["notes"])
    assert "fill_fully_masked_rows(" not in fast.code  # the kernel's 0 is eager's value here
    assert "isnan" not in fast.code and "nan_to_num" not in fast.code
    out = fast(*inputs)
    assert torch.isfinite(out).all() and not out[0].any()
    assert_same_function(model, _inputs(1), fast)


@pytest.mark.parametrize("spelling, reason", [
    ("nan_to_num_half", "feed nan_to_num, not a product with v"),
    ("where_isnan_one", "the attention weights have 2 users"),
    ("cast_to_double", "the attention weights are widened to float64"),
])
def test_a_clean_up_to_another_value_or_a_real_cast_is_refused(spelling, reason):
    model, inputs = CleanUp(spelling), _inputs(0)
    fast = foldcompile.optimize(model, *inputs)
    assert fast.report.counts()["attention"] == {"matched": 0, "rejected": 1}, fast.report
    assert reason in fast.report.rejections[0]["reason"]
    out, ref = fast(*inputs), model(*inputs)
    assert torch.isfinite(ref).all()
    if spelling != "cast_to_double":
        assert ref[0].abs().sum() > 0  # the rows that keep nothing are not 0 in eager
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-6)
    assert_same_function(model, _inputs(1), fast)


def test_values_doctest():
    module = importlib.import_module("foldcompile.passes.rules._values")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
