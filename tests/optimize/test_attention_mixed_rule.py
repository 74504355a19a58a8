"""The attention rule on mixed-precision spellings (``passes/rules/attention.py``): bf16 / fp16 logits with fp32
biases added in place (Boltz / OpenFold ``_attention``: ``a = q @ k; for b in biases: a += b``) or out of place,
the softmax with or without an fp32 round trip, the weights cast to v's dtype before ``@ v``; the near misses it
refuses, with their reasons; and the unmodified Boltz-2 Pairformer under CPU bf16 autocast (every attention).

The Triton interpreter computes bf16 on raw bits (``PITFALLS.md``): bf16 cases run the kernels' PyTorch
references (``reference_kernels``), fp16 cases the Triton kernel through the interpreter.
"""
from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from optimize_helpers import flat, rel  # noqa: E402

import foldcompile  # noqa: E402

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
B, H, N, D = 3, 2, 11, 8


@pytest.fixture
def reference_kernels(monkeypatch):
    """The kernels' PyTorch references on CPU (the interpreter's bf16 is wrong: see the module docstring)."""
    monkeypatch.setattr(importlib.import_module("foldcompile.kernels._dispatch"), "_INTERPRETING", False)


def _inputs(dtype, seed=0):
    """q, k, v [B, H, N, D] in ``dtype``; the pair bias [1, H, N, N] in ``dtype``; the mask bias
    ``1e9·(mask − 1)`` [B, 1, 1, N] in fp32, with row 0 fully masked and two padded keys elsewhere."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, N, D, generator=g).to(dtype) for _ in range(3))
    pair = torch.randn(1, H, N, N, generator=g).to(dtype)
    mask = torch.ones(B, 1, 1, N)
    mask[..., -2:] = 0
    mask[0] = 0
    return q, k, v, pair, 1e9 * (mask - 1)


class Boltz(nn.Module):
    """Boltz's ``_attention`` as it runs under bf16 autocast: in-place adds of an fp32 and a bf16 bias
    into bf16 logits (the result stays bf16), the softmax in bf16, ``@ v`` in bf16."""

    def forward(self, q, k, v, pair, mask_bias):
        q = q / D ** 0.5
        a = torch.matmul(q, k.transpose(-1, -2))
        for b in (mask_bias, pair):
            a += b
        a = torch.softmax(a, -1)
        return torch.matmul(a, v)


class Promoting(nn.Module):
    """Out of place: bf16 / fp16 logits + an fp32 mask bias (promotes to fp32), softmax in fp32, the weights
    cast back to v's dtype (CPU autocast's Boltz-2 single attention, CUDA autocast's softmax)."""

    def __init__(self, softmax: str = "cast"):
        super().__init__()
        self.softmax = softmax

    def forward(self, q, k, v, pair, mask_bias):
        a = torch.einsum("bhqd,bhkd->bhqk", q, k) / D ** 0.5
        if self.softmax == "cast":       # explicit autocast's spelling of CUDA's fp32 softmax
            p = torch.softmax(a.to(FP32) + pair + mask_bias, -1)
        elif self.softmax == "dtype":    # softmax(x, dtype=torch.float32)
            p = torch.softmax(a + pair, -1, dtype=FP32)
        else:                            # promoted by the fp32 bias itself
            p = torch.softmax(a + pair + mask_bias, -1)
        return torch.einsum("bhqk,bhkd->bhqd", p.to(v.dtype), v)


def _optimize(model, inputs):
    fast = foldcompile.optimize(model, *inputs)
    report = foldcompile.verify(model, *inputs, optimized=fast)
    return fast, report


def _attention_match(fast):
    (match,) = [m for m in fast.report.matches if m["rule"] == "attention"]
    return match


def test_boltz_in_place_fp32_bias_into_bf16_logits_is_one_attention(reference_kernels):
    model, inputs = Boltz(), _inputs(BF16)
    fast, report = _optimize(model, inputs)
    counts = fast.report.counts()
    assert counts["attention"] == {"matched": 1, "rejected": 0} and counts["softmax"]["matched"] == 0
    match = _attention_match(fast)
    # the pair bias [1, H, Q, K] and the mask bias [B, 1, 1, K] stay two terms, the logits' bf16 roundings skipped
    assert "biases: bias+key_bias" in match["notes"]
    # a += mask_bias computes in fp32 and stores bf16: skipped; a += pair is bf16 + bf16 (the usual rounding)
    assert sum("skips eager's rounding of the logits to bfloat16" in n for n in match["notes"]) == 1
    assert "iadd" not in fast.code and "fused_attention" in fast.code
    assert report.ok, str(report)
    got, ref = fast(*inputs), model(*inputs)
    assert got.dtype == ref.dtype == BF16 and torch.isfinite(got).all()
    # nearer the fp32 truth than eager's bf16 (the kernel adds the biases to fp32 logits)
    truth = Boltz()(*(t.float() for t in inputs))
    assert rel(got, truth) <= max(rel(ref, truth), 1e-2)


@pytest.mark.xfail(strict=True, reason="not yet: the rule follows `a += b` but not the method spellings "
                                      "a.mul_(s) / a.add_(b) of in-place updates of the logits (refused, not wrong)")
def test_in_place_add_on_a_view_and_an_in_place_scale_of_the_logits(reference_kernels):
    class InPlace(nn.Module):
        def forward(self, q, k, v, pair, mask_bias):
            a = q @ k.transpose(-1, -2)
            a.mul_(D ** -0.5)
            a.add_(mask_bias)
            a += pair
            return torch.softmax(a, -1) @ v

    model, inputs = InPlace(), _inputs(BF16, seed=1)
    fast, report = _optimize(model, inputs)
    assert fast.report.counts()["attention"] == {"matched": 1, "rejected": 0}
    assert report.ok, str(report)


@pytest.mark.parametrize("softmax", ["cast", "dtype", "promoted"])
def test_fp16_logits_softmax_in_fp32_weights_cast_to_v_through_the_interpreter(softmax):
    model, inputs = Promoting(softmax), _inputs(FP16)
    fast, report = _optimize(model, inputs)
    counts = fast.report.counts()
    assert counts["attention"] == {"matched": 1, "rejected": 0} and counts["softmax"]["matched"] == 0
    assert any("the weights' cast to float16" in n for n in _attention_match(fast)["notes"])
    assert report.ok, str(report)
    got, ref = fast(*inputs), model(*inputs)
    assert got.dtype == ref.dtype == FP16
    assert rel(got, ref) <= 1e-2


def test_bf16_promoting_spelling(reference_kernels):
    model, inputs = Promoting("promoted"), _inputs(BF16, seed=2)
    fast, report = _optimize(model, inputs)
    assert fast.report.counts()["attention"] == {"matched": 1, "rejected": 0}
    assert report.ok, str(report)


# ----------------------------------------------------------------------------- near misses

class Fp16InPlace(nn.Module):
    """CUDA's spelling of Boltz's ``_attention`` in fp16: ``a += mask_bias`` rounds -1e9 to -inf."""

    def forward(self, q, k, v, pair, mask_bias):
        a = q @ k.transpose(-1, -2)
        a += mask_bias
        a += pair
        return torch.softmax(a, -1) @ v


class NarrowedLogits(nn.Module):
    """fp32 logits with the mask bias, then rounded to fp16 before the softmax."""

    def forward(self, q, k, v, pair, mask_bias):
        a = (q.float() @ k.float().transpose(-1, -2) + mask_bias).to(FP16)
        return torch.softmax(a + pair, -1) @ v


class WeightsThroughFp16(nn.Module):
    """bf16 attention whose weights are rounded to fp16 on the way to a bf16 v."""

    def forward(self, q, k, v, pair, mask_bias):
        p = torch.softmax((q @ k.transpose(-1, -2)).float() + mask_bias, -1)
        return p.to(FP16).to(BF16) @ v


class Float64Logits(nn.Module):
    def forward(self, q, k, v, pair, mask_bias):
        p = torch.softmax((q @ k.transpose(-1, -2)).double() + mask_bias, -1)
        return p.float() @ v


@pytest.mark.parametrize("model, dtype, reason", [
    (Fp16InPlace(), FP16, "the logits are rounded to float16 at"),
    (NarrowedLogits(), FP16, "the logits are rounded to float16 at"),
    (WeightsThroughFp16(), BF16, "the attention weights are rounded to torch.float16"),
    (Float64Logits(), FP32, "the logits are widened to float64"),
], ids=["fp16_in_place_fp32_bias", "fp32_logits_to_fp16", "weights_through_fp16", "float64_logits"])
def test_near_misses_are_refused_with_the_reason(model, dtype, reason, reference_kernels):
    inputs = _inputs(dtype, seed=3)
    fast = foldcompile.optimize(model, *inputs)
    assert fast.report.counts()["attention"] == {"matched": 0, "rejected": 1}, fast.report
    (rej,) = [r for r in fast.report.rejections if r["rule"] == "attention"]
    assert reason in rej["reason"], rej["reason"]
    got, ref = fast(*inputs), model(*inputs)
    assert rel(got, ref) <= 1e-2   # NaN positions equal too (rel asserts it)
    if dtype == FP16:
        # why: eager's fp16 rounding makes the fully masked row's -1e9 -inf, its weights NaN
        assert torch.isnan(ref[0]).all() and torch.isfinite(ref[1:]).all()


# ----------------------------------------------------------------------------- the unmodified Boltz-2 Pairformer

def test_unmodified_boltz2_pairformer_under_bf16_autocast_fuses_every_attention(reference_kernels):
    tb = importlib.import_module("third_party.test_boltz")
    pf = tb._pairformer()
    model = tb._module(pf, training=False, checkpointing=False)
    s, z, mask, pair_mask = tb._inputs(0, requires_grad=False)
    inputs = (s, z, mask, pair_mask)
    with torch.autocast("cpu", dtype=BF16):
        fast = foldcompile.optimize(model, *inputs)
        ref, got = flat(model(*inputs)), flat(fast(*inputs))
        report = foldcompile.verify(model, *inputs, optimized=fast)
    counts = fast.report.counts()
    # 2 blocks: two triangle attentions (in-place fp32 mask bias into bf16 logits) and one single attention
    # (bf16 logits + fp32 bias, fp32 softmax, the weights cast back to bf16) each
    assert counts["attention"] == {"matched": 6, "rejected": 0}, counts
    assert counts["softmax"]["matched"] == 0
    assert report.ok, str(report)
    for g, r in zip(got, ref):
        assert g.dtype == r.dtype and rel(g, r) <= 2e-2
