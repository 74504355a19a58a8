"""The attention rule where a bias can make a whole softmax row -inf: ``optimize(model)`` gives eager's
values there, and eager's gradients, NaN included (``empty_rows`` of the fused kernel), in every spelling
of such a bias; the spellings whose eager value in such a row no kernel mode gives are refused.

Whether a bias holds -inf is known only at run time, so the examples the model is optimized with are
finite, and the calls compared afterwards empty rows through the bias.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import foldcompile

S, H, L, D = 2, 2, 7, 8


class BiasAttention(nn.Module):
    """``softmax(q kᵀ / √D + pair_bias + <mask bias>) v`` with the mask bias spelled ``spelling``."""

    def __init__(self, spelling: str):
        super().__init__()
        self.spelling = spelling

    def forward(self, q, k, v, pair_bias, mask):
        logits = q @ k.transpose(-1, -2) * D ** -0.5
        s = self.spelling
        if s == "log":  # a float key mask as a log-bias: log(0) = -inf
            logits = logits + pair_bias + mask.log()[:, None, None, :]
        elif s == "where":  # a boolean mask as a bias via where
            m = mask[:, None, None, :]
            logits = logits + torch.where(m > 0, torch.zeros_like(m), float("-inf")) + pair_bias
        elif s == "masked_fill_bias":  # a bias built by masked_fill
            logits = logits + pair_bias + torch.zeros_like(mask).masked_fill(mask == 0, float("-inf"))[:, None, None]
        elif s == "pair_bias_only":  # the pair bias itself holds -inf
            logits = logits + pair_bias
        elif s == "log_then_mask":  # a -inf log-bias, then a boolean -inf fill
            logits = (logits + pair_bias + mask.log()[:, None, None, :]).masked_fill(pair_bias.detach() < -1.5,
                                                                                    float("-inf"))
        elif s == "log_nan_to_num":  # the weights' NaNs cleaned up: 0 in eager, NaN gradients
            w = torch.nan_to_num(torch.softmax(logits + pair_bias + mask.log()[:, None, None, :], -1))
            return w @ v
        elif s == "sdpa_float":  # SDPA with a float -inf mask: torch gives 0 in a row with nothing left
            return F.scaled_dot_product_attention(q, k, v, attn_mask=pair_bias + mask.log()[:, None, None, :])
        elif s == "sdpa_bool":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :] > 0)
        return torch.softmax(logits, -1) @ v


def _inputs(dtype, empty: bool, seed: int = 0):
    """q, k, v, pair bias [1, H, L, L], float key mask [S, L]; ``empty``: rows emptied by the bias."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(S, H, L, D, generator=g).to(dtype).requires_grad_() for _ in range(3))
    pair_bias = torch.randn(1, H, L, L, generator=g)
    mask = torch.ones(S, L)
    if empty:
        pair_bias[0, 1, 3] = float("-inf")  # one query row of head 1, in every batch row
        mask[1, :] = 0.0  # batch row 1: every key masked
        mask[0, 2] = 0.0
    return q, k, v, pair_bias.to(dtype).requires_grad_(), mask.to(dtype)


def _outputs_and_grads(model, inputs):
    out = model(*inputs)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
    leaves = [t for t in inputs if t.requires_grad]
    grads = torch.autograd.grad(out, leaves, dout, allow_unused=True)
    return [out.detach()] + [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads)]


def _assert_same_with_nans(got, want, tol):
    for i, (a, b) in enumerate(zip(got, want)):
        assert torch.equal(torch.isnan(a), torch.isnan(b)), f"tensor {i}: NaN positions differ from eager"
        ok = ~torch.isnan(b)
        if not ok.any():
            continue  # e.g. a pair bias's gradient summed over a batch row that is NaN
        diff, ref = (a[ok].double() - b[ok].double()).norm().item(), b[ok].double().norm().item()
        err = diff / ref if ref else diff  # the finite entries may all be exact zeros (masked ones)
        assert err <= tol, f"tensor {i}: relative error {err:.3g} > {tol}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("spelling, mode, nan_out", [
    ("log", "nan", True), ("where", "nan", True), ("masked_fill_bias", "nan", True), ("pair_bias_only", "nan", True),
    ("log_then_mask", "nan", True), ("log_nan_to_num", "nan_cleaned", False),
    ("sdpa_float", None, False), ("sdpa_bool", None, False)])
def test_rows_a_bias_empties_match_eager_forward_and_backward(spelling, mode, nan_out, dtype):
    model = BiasAttention(spelling)
    fast = foldcompile.optimize(model, *_inputs(dtype, empty=False))
    family = "sdpa_attention" if spelling.startswith("sdpa") else "attention"
    assert fast.report.counts()[family] == {"matched": 1, "rejected": 0}, fast.report
    assert "fill_fully_masked_rows(" not in fast.code  # the kernel writes eager's value itself
    if mode is not None:
        assert f"empty_rows = '{mode}'" in fast.code
    inputs = _inputs(dtype, empty=True)
    want = _outputs_and_grads(model, inputs)
    got = _outputs_and_grads(fast, inputs)
    assert torch.isnan(want[0]).any() == nan_out
    assert torch.isnan(want[1]).any() == (mode is not None)  # eager's dq: NaN in the rows the bias empties
    _assert_same_with_nans(got, want, 1e-5 if dtype == torch.float32 else 2e-2)


class MaskThenBias(nn.Module):
    """Near miss: a -inf fill BEFORE a bias is added; eager passes that bias NaN at the masked entries of a
    row left with only -inf logits, where the kernel leaves masked entries out (gradient 0)."""

    def forward(self, q, k, v, pair_bias, mask):
        logits = (q @ k.transpose(-1, -2)).masked_fill(mask[:, None, None, :] == 0, float("-inf"))
        return torch.softmax(logits + pair_bias, -1) @ v


class FiniteFillWithBias(nn.Module):
    """Near miss: a bias then a finite lowest fill; where the bias leaves only -inf among the kept keys,
    eager averages v over the masked keys (their finite logits win), which no kernel mode gives."""

    def forward(self, q, k, v, pair_bias, mask):
        logits = (q @ k.transpose(-1, -2) + pair_bias).masked_fill(mask[:, None, None, :] == 0,
                                                                   torch.finfo(q.dtype).min)
        return torch.softmax(logits, -1) @ v


@pytest.mark.parametrize("model, reason", [(MaskThenBias(), "added after a -inf mask fill"),
                                           (FiniteFillWithBias(), "finite mask fill")])
def test_spellings_without_a_kernel_value_for_such_rows_are_refused(model, reason):
    fast = foldcompile.optimize(model, *_inputs(torch.float32, empty=False))
    assert fast.report.counts()["attention"] == {"matched": 0, "rejected": 1}, fast.report
    (rejection,) = [r for r in fast.report.rejections if r["rule"] == "attention"]
    assert reason in rejection["reason"]
    inputs = _inputs(torch.float32, empty=True)
    _assert_same_with_nans(_outputs_and_grads(fast, inputs), _outputs_and_grads(model, inputs), 1e-5)
