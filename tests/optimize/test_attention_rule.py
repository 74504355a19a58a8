"""The attention rule on many spellings of the same math, and on near misses it must refuse.

Every module here is hand-written plain PyTorch (no project code): the rule must see the
math through einsum / matmul / bmm / ``@``, scales anywhere, additive and boolean masks,
gates and K/V without a head dim. Each case asserts the match count and that the optimized
module computes what the model computes (outputs and every gradient, fp32, rel. 1e-5).
Sizes are small and not multiples of the kernel's block size.
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

S, L, H, D = 3, 7, 2, 8  # rows, sequence, heads, head dim
C = H * D


def counts(fast) -> dict:
    return fast.report.counts()


def _x(*shape):
    return torch.randn(*shape)


class MatmulQScaled(nn.Module):
    """AF2-style: scale on q, additive float key mask ``1e9 * (mask - 1)``, pair bias, sigmoid gate."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(C, C, bias=False) for _ in range(3))
        self.g, self.o, self.b = nn.Linear(C, C), nn.Linear(C, C), nn.Linear(5, H, bias=False)

    def forward(self, x, pair, mask):
        heads = lambda t: t.view(*t.shape[:-1], H, D).transpose(-2, -3)  # noqa: E731
        q = heads(self.q(x)) * D ** -0.5
        k, v = heads(self.k(x)), heads(self.v(x))
        bias = self.b(pair).permute(2, 0, 1).unsqueeze(0)  # [1, H, L, L], a strided view
        logits = torch.matmul(q, k.transpose(-1, -2)) + 1e9 * (mask[:, None, None, :] - 1) + bias
        o = torch.matmul(torch.softmax(logits, -1), v).transpose(-2, -3).reshape(*x.shape[:-1], C)
        return self.o(torch.sigmoid(self.g(x)) * o)


class EinsumDivided(nn.Module):
    """einsum products, the scale divides the logits, ``F.softmax``, no gate."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(C, 3 * C, bias=False)

    def forward(self, x, mask):
        q, k, v = self.qkv(x).view(S, L, 3, H, D).unbind(2)  # [S, L, H, D]
        logits = torch.einsum("sqhd,skhd->shqk", q, k) / (D ** 0.5)
        logits = logits + (mask[:, None, None, :] - 1.0) * 1e9
        w = F.softmax(logits, dim=-1)
        return torch.einsum("shqk,skhd->sqhd", w, v).reshape(S, L, C)


class BmmScaleOnK(nn.Module):
    """bmm over flattened (rows·heads), the scale applied to k, ``@`` for the second product."""

    def forward(self, q, k, v):
        b = q.shape[0] * q.shape[1]
        qf, kf, vf = q.reshape(b, L, D), (k * D ** -0.5).reshape(b, L, D), v.reshape(b, L, D)
        w = torch.bmm(qf, kf.transpose(1, 2)).softmax(-1)
        return (w @ vf).view(q.shape)


class BoolMaskFill(nn.Module):
    """``masked_fill(~m, fill)`` with a boolean mask; ``fill`` -inf or finfo.min."""

    def __init__(self, fill: str):
        super().__init__()
        self.fill = fill

    def forward(self, q, k, v, keep):
        logits = q @ k.transpose(-1, -2) * D ** -0.5
        fill = float("-inf") if self.fill == "-inf" else torch.finfo(logits.dtype).min
        logits = logits.masked_fill(~keep, fill)
        return torch.softmax(logits, dim=-1) @ v


class WhereMask(nn.Module):
    """``torch.where(m, logits, -inf)`` after a bias term."""

    def forward(self, q, k, v, keep, bias):
        logits = (q @ k.transpose(-1, -2)) * (D ** -0.5) + bias
        return torch.softmax(torch.where(keep, logits, float("-inf")), -1) @ v


class OneMinusMask(nn.Module):
    """Additive ``(1 - mask) * -1e9`` float mask: stays an additive bias."""

    def forward(self, q, k, v, mask):
        logits = q @ k.transpose(-1, -2) * D ** -0.5 + (1.0 - mask)[:, None, None, :] * -1e9
        return logits.softmax(-1) @ v


class GlobalColumn(nn.Module):
    """K/V without a head dim: one query per head attends over shared keys (AF2's global attention)."""

    def forward(self, q, k, v, mask):
        # q [B, H, D], k/v [B, K, D]
        logits = torch.einsum("bhd,bkd->bhk", q * D ** -0.5, k) + 1e9 * (mask[:, None, :] - 1)
        return torch.einsum("bhk,bkd->bhd", torch.softmax(logits, -1), v)


class Sdpa(nn.Module):
    def forward(self, q, k, v, bias):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


def _qkv():
    return _x(S, H, L, D), _x(S, H, L, D), _x(S, H, L, D)


def _mask(n=S):
    m = (torch.rand(n, L) > 0.3).float()
    m[:, 0] = 1
    return m


def test_matmul_scale_on_q_with_pair_bias_mask_and_gate():
    model = MatmulQScaled()
    inputs = (_x(S, L, C), _x(L, L, 5), _mask())
    fast = foldcompile.optimize(model, *inputs)
    assert counts(fast)["attention"] == {"matched": 1, "rejected": 0}
    code = fast.code
    assert "fused_attention(" in code and "gate = " in code and "sigmoid" not in code.split("fused_attention(")[1]
    assert_same_function(model, inputs, fast)
    # fresh random inputs, same shapes: the same variant
    assert_same_function(model, (_x(S, L, C), _x(L, L, 5), _mask()), fast)
    assert len(fast.variants) == 1


def test_einsum_spelling_divided_scale():
    model = EinsumDivided()
    inputs = (_x(S, L, C), _mask())
    fast = foldcompile.optimize(model, *inputs)
    assert counts(fast)["attention"] == {"matched": 1, "rejected": 0}
    assert_same_function(model, inputs, fast)


def test_bmm_spelling_scale_on_k():
    model = BmmScaleOnK()
    inputs = tuple(t.requires_grad_() for t in _qkv())
    fast = foldcompile.optimize(model, *inputs)
    assert counts(fast)["attention"] == {"matched": 1, "rejected": 0}
    assert_same_function(model, inputs, fast)


@pytest.mark.parametrize("fill", ["-inf", "finfo.min"])
def test_boolean_mask_fill_including_fully_masked_rows(fill):
    model = BoolMaskFill(fill)
    keep = torch.rand(S, 1, 1, L) > 0.4
    keep[0] = False  # a row that keeps nothing: eager gives NaN (-inf) or the mean of v (finfo.min)
    keep[1, ..., 0] = True
    q, k, v = (t.requires_grad_() for t in _qkv())
    inputs = (q, k, v, keep)
    fast = foldcompile.optimize(model, *inputs)
    assert counts(fast)["attention"] == {"matched": 1, "rejected": 0}
    assert "mask = " in fast.code
    # -inf: the kernel writes eager's NaN itself (empty_rows='nan'); finfo.min: the mean of v is put back
    assert ("fill_fully_masked_rows(" in fast.code) == (fill == "finfo.min")
    assert ("empty_rows = 'nan'" in fast.code) == (fill == "-inf")
    out, ref = fast(*inputs), model(*inputs)
    assert torch.isnan(ref[0]).all() == (fill == "-inf")
    if fill == "-inf":  # NaN in the same places; gradients of NaN rows are NaN in eager too
        assert torch.equal(torch.isnan(out), torch.isnan(ref))
        assert torch.allclose(out[1:], ref[1:], rtol=1e-5, atol=1e-6)
    else:
        assert_same_function(model, inputs, fast)


def test_where_mask_after_bias():
    model = WhereMask()
    keep = torch.rand(S, 1, L, L) > 0.3
    keep[..., 0] = True
    inputs = (*_qkv(), keep, _x(1, H, L, L).requires_grad_())
    fast = foldcompile.optimize(model, *inputs)
    assert counts(fast)["attention"] == {"matched": 1, "rejected": 0}
    assert_same_function(model, inputs, fast)


def test_one_minus_mask_stays_additive():
    model = OneMinusMask()
    mask = _mask()
    mask[2] = 0.0  # fully masked by an additive -1e9: eager averages v uniformly, so must the kernel
    inputs = (*(t.requires_grad_() for t in _qkv()), mask)
    fast = foldcompile.optimize(model, *inputs)
    assert counts(fast)["attention"] == {"matched": 1, "rejected": 0}
    assert "mask = None" in fast.code and "bias = " in fast.code
    assert_same_function(model, inputs, fast)


def test_global_attention_kv_without_head_dim():
    model = GlobalColumn()
    inputs = (_x(5, H, D).requires_grad_(), _x(5, L, D).requires_grad_(), _x(5, L, D).requires_grad_(), _mask(5))
    fast = foldcompile.optimize(model, *inputs)
    assert counts(fast)["attention"] == {"matched": 1, "rejected": 0}
    assert_same_function(model, inputs, fast)


def test_sdpa_with_float_bias():
    model = Sdpa()
    inputs = (*(t.requires_grad_() for t in _qkv()), _x(1, H, L, L))
    fast = foldcompile.optimize(model, *inputs)
    assert counts(fast)["sdpa_attention"] == {"matched": 1, "rejected": 0}
    assert_same_function(model, inputs, fast)


# ------------------------------------------------------------------ near misses: left alone, with a reason
class SoftmaxOverQueries(nn.Module):
    def forward(self, q, k, v):
        return torch.softmax(q @ k.transpose(-1, -2), dim=-2) @ v  # normalised over queries: not attention


class LogitsReturned(nn.Module):
    def forward(self, q, k, v):
        logits = q @ k.transpose(-1, -2) * D ** -0.5
        return torch.softmax(logits, -1) @ v, logits


class WeightsTwice(nn.Module):
    def forward(self, q, k, v):
        w = torch.softmax(q @ k.transpose(-1, -2), -1)
        return w @ v, w.sum(-2)


class SmallHeads(nn.Module):
    def forward(self, q, k, v):
        return torch.softmax(q @ k.transpose(-1, -2) * 0.5, -1) @ v


class TensorScaled(nn.Module):
    """The logits multiplied by a tensor (not a scalar): not the kernel's scale."""

    def forward(self, q, k, v, t):
        return torch.softmax((q @ k.transpose(-1, -2)) * t, -1) @ v


@pytest.mark.parametrize("model,inputs,reason", [
    (SoftmaxOverQueries(), _qkv(), "does not contract the key axis with v"),
    (LogitsReturned(), _qkv(), "multiple users of an interior value"),
    (WeightsTwice(), _qkv(), "the attention weights have 2 users"),
    (SmallHeads(), (_x(S, H, L, 4), _x(S, H, L, 4), _x(S, H, L, 4)), "head dim 4 < 8"),
])
def test_near_misses_are_rejected_with_a_reason(model, inputs, reason):
    fast = foldcompile.optimize(model, *inputs)
    assert counts(fast)["attention"] == {"matched": 0, "rejected": 1}
    assert reason in fast.report.rejections[0]["reason"]
    assert "fused_attention" not in fast.code
    assert_same_function(model, inputs, fast)


def test_tensor_scaled_logits_are_not_an_attention():
    model = TensorScaled()
    inputs = (*_qkv(), _x(S, H, L, L))
    fast = foldcompile.optimize(model, *inputs)
    assert counts(fast)["attention"]["matched"] == 0
    assert "fused_attention" not in fast.code
    assert_same_function(model, inputs, fast)


def test_every_rewritten_node_keeps_its_origin():
    model = MatmulQScaled()
    fast = foldcompile.optimize(model, _x(S, L, C), _x(L, L, 5), _mask())
    traced_names = {n.name for n in fast._last.traced.graph.nodes}
    new = [n for n in fast.graph_module.graph.nodes if n.meta.get("fused_by")]
    assert new
    for n in new:
        assert n.meta["origin"] and set(n.meta["origin"]) <= traced_names
    kernel = next(n for n in new if n.target.__name__ == "fused_attention")
    assert {"softmax", "matmul_1"} <= set(kernel.meta["origin"])
