"""The softmax rule in mixed precision: ``softmax(x.to(fp32) [* s] [+ bias] [masked]).to(x.dtype)`` with x fp16 is
the kernel on x itself (it computes in fp32 and rounds once, where eager's cast back rounds). Spellings of the
casts, and the near misses: a cast back to another dtype, an up-cast to fp64, a softmax whose fp32 weights are
also read; and a narrowing-then-widening pair after the softmax, which is the model's own rounding. fp16 (the Triton interpreter's bf16 is wrong). Every case:
optimized == eager, outputs and gradients."""
from __future__ import annotations

import os
import sys

import pytest
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from optimize_helpers import assert_same_function  # noqa: E402

import foldcompile  # noqa: E402

H = torch.float16


class MixedSoftmax(nn.Module):
    def __init__(self, spelling: str):
        super().__init__()
        self.spelling = spelling

    def forward(self, x, bias, keep):
        s = self.spelling
        if s == "float_then_to":
            return torch.softmax(x.float() * 0.25 + bias, dim=-1).to(H)
        if s == "to_fp32_then_half":
            return torch.softmax(x.to(torch.float32), -1).half()
        if s == "dtype_keywords":
            z = x.to(dtype=torch.float32).masked_fill(~keep, float("-inf"))
            return z.softmax(dim=-1).to(dtype=H)
        if s == "fp16_bias":  # an fp16 bias promoted to fp32 by the add: the kernel loads it as fp32
            return torch.softmax(x.float() + bias.half(), dim=-1).to(H)
        # near misses
        if s == "back_to_another_dtype":  # the kernel would round to fp16, eager rounds to bf16
            return torch.softmax(x.float(), -1).to(torch.bfloat16).float()
        if s == "up_to_fp64":  # eager's softmax in fp64
            return torch.softmax(x.double(), -1).to(H)
        if s == "fp32_weights_read_too":
            p = torch.softmax(x.float(), -1)
            return p.to(H), p.sum(-1)
        if s == "narrowing_in_the_middle":  # softmax(x).to(fp16).to(fp32): eager rounds to fp16, so must we
            return torch.softmax(x.float(), -1).to(H).to(torch.float32) * 2
        raise ValueError(s)


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(2, 3, 5, 37, generator=g) * 3).to(H).requires_grad_()
    bias = torch.randn(3, 1, 37, generator=g).requires_grad_()
    keep = torch.rand(2, 1, 5, 37, generator=g) > 0.3
    keep[0, 0, 1] = False  # a row that keeps nothing: NaN in eager and in the kernel
    return x, bias, keep


def _softmaxes(fast):
    return [m for m in fast.report.matches if m["rule"] == "softmax"]


@pytest.mark.parametrize("spelling", ["float_then_to", "to_fp32_then_half", "dtype_keywords", "fp16_bias"])
def test_the_kernel_reads_fp16_and_writes_fp16(spelling):
    model = MixedSoftmax(spelling)
    fast = foldcompile.optimize(model, *_inputs())
    (m,) = _softmaxes(fast)
    assert m["notes"] and m["notes"][0].startswith("mixed precision: reads torch.float16 ")
    assert "torch.float32" not in fast.code and "float()" not in fast.code  # no cast left around the softmax
    assert_same_function(model, _inputs(1), fast, tol=2e-3)


@pytest.mark.parametrize("spelling, tol", [("back_to_another_dtype", 1e-2),  # bf16 output: a flipped ulp is 4e-3
                                           ("up_to_fp64", 2e-3), ("fp32_weights_read_too", 2e-3)])
def test_near_misses_keep_their_casts(spelling, tol):
    model = MixedSoftmax(spelling)
    fast = foldcompile.optimize(model, *_inputs())
    assert all(not m["notes"] for m in _softmaxes(fast))  # at most the plain softmax, on the wide value
    assert_same_function(model, _inputs(1), fast, tol=tol)


def test_a_narrowing_cast_after_the_cast_back_is_the_models_own_rounding():
    # softmax(x.float()).to(fp16).to(fp32): the kernel takes the softmax and its cast back; the widening after
    # it stays (simplify_casts removes no narrowing-then-widening pair: that pair rounds)
    model = MixedSoftmax("narrowing_in_the_middle")
    fast = foldcompile.optimize(model, *_inputs())
    (m,) = _softmaxes(fast)
    assert m["notes"] and m["origin"][-1] == "to"
    assert fast.report.record["simplify_casts"]["round_trips"] == 0
    assert "fused_elementwise" in fast.code  # the widening cast and the * 2, on the kernel's fp16 weights
    assert_same_function(model, _inputs(1), fast, tol=2e-3)
