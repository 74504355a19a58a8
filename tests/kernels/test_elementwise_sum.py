"""``fuse_elementwise_sum``: an element-wise chain summed over its trailing dims in one kernel,
against float64 on irregular sizes (values and gradients), through the Triton interpreter (fp32,
fp16; bf16 is wrong there)."""
from __future__ import annotations

import pytest
import torch

from foldcompile.kernels.elementwise_sum import MAX_SUMMED, fuse_elementwise_sum


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _squared_distance(q, k):
    return (q - k) * (q - k)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.float16, 2e-3)])
def test_squared_point_distances_values_and_gradients(dtype, tol):
    """IPA's shape: [N_i, 1, H, P, 3] - [1, N_j, H, P, 3], summed over (P, 3)."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(13, 1, 2, 3, 3, generator=g).to(dtype).requires_grad_()
    k = torch.randn(1, 11, 2, 3, 3, generator=g).to(dtype).requires_grad_()
    fused = fuse_elementwise_sum(_squared_distance, n_summed=2)
    out = fused(q, k)
    q64, k64 = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
    truth = _squared_distance(q64, k64).sum((-1, -2))
    eager = _squared_distance(q, k).sum((-1, -2))
    assert out.shape == truth.shape == (13, 11, 2) and out.dtype == eager.dtype == dtype
    assert _rel(out, truth) <= max(tol, 2 * _rel(eager, truth))
    up = torch.randn(out.shape, generator=g)
    got = torch.autograd.grad(out, (q, k), up.to(dtype))
    ref = torch.autograd.grad(truth, (q64, k64), up.double())
    own = torch.autograd.grad(eager, (q, k), up.to(dtype))
    for a, t, e in zip(got, ref, own):
        assert a.shape == t.shape and _rel(a, t) <= max(tol, 2 * _rel(e, t))


def test_keepdim_broadcast_bias_and_a_transposed_input():
    fused = fuse_elementwise_sum(lambda x, b: torch.sigmoid(x + b) * 2.0, n_summed=1, keepdim=True)
    b = torch.randn(61)
    for x in (torch.randn(37, 61), torch.randn(61, 37).t()):  # contiguous, and read through its strides
        out = fused(x, b)
        assert out.shape == (37, 1)
        assert torch.allclose(out, (torch.sigmoid(x + b) * 2.0).sum(-1, keepdim=True), rtol=1e-5, atol=1e-5)


def test_the_whole_tensor_summed_and_nan_propagates():
    fused = fuse_elementwise_sum(lambda x: x * x, n_summed=2)
    x = torch.randn(5, 7)
    assert torch.allclose(fused(x), (x * x).sum(), rtol=1e-5) and fused(x).shape == ()
    x[2, 3] = float("nan")
    y = fuse_elementwise_sum(lambda x: x * x, n_summed=1)(x)
    assert torch.isnan(y[2]) and not torch.isnan(y[[0, 1, 3, 4]]).any()


def test_empty_rows_and_empty_sums():
    fused = fuse_elementwise_sum(lambda x: x * 2.0, n_summed=1)
    assert fused(torch.randn(0, 5)).shape == (0,)
    assert torch.equal(fused(torch.randn(4, 0)), torch.zeros(4))


def test_refusals_say_why():
    fused = fuse_elementwise_sum(lambda x: x * x, n_summed=1)
    with pytest.raises(ValueError, match="more than one tile holds"):
        fused.output_dtypes(torch.empty(3, MAX_SUMMED + 1, device="meta"))
    with pytest.raises(ValueError, match="dropout"):
        fuse_elementwise_sum(lambda x: torch.nn.functional.dropout(x, 0.1) * x, n_summed=1)
    with pytest.raises(ValueError, match="cannot sum the last 3 dims"):
        fuse_elementwise_sum(lambda x: x * x, n_summed=3).output_dtypes(torch.empty(3, 4, device="meta"))


def test_doctest():
    import doctest
    import importlib

    module = importlib.import_module("foldcompile.kernels.elementwise_sum")
    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0
