"""``softmax(..., empty_rows="nan")``: rows that keep nothing give torch's NaN, written by the forward
kernel itself (one launch, no extra pass), with torch's gradients; other rows are unchanged."""
import pytest
import torch

from foldcompile.kernels._dispatch import record_launches
from foldcompile.kernels.softmax import softmax, softmax_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _case(dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 2, 5, 37, generator=g) * 2).to(dtype).to(DEVICE)
    bias = torch.randn(2, 5, 37, generator=g).to(DEVICE)
    bias[1, 2] = float("-inf")  # a row emptied by the bias alone
    keep = (torch.rand(3, 1, 1, 37, generator=g) > 0.3).to(DEVICE)
    keep[1] = False  # every row of batch 1 keeps nothing
    keep[0, ..., 0] = keep[2, ..., 0] = True
    return x, bias, keep


def _eager(x, bias, keep, scale):
    return torch.softmax((x.float() * scale + bias).masked_fill(~keep, float("-inf")), -1).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_empty_rows_are_nan_in_one_launch_and_the_rest_is_unchanged(dtype):
    x, bias, keep = _case(dtype)
    with record_launches() as launched:
        y = softmax(x, -1, scale=0.5, bias=bias, mask=keep, empty_rows="nan")
    assert launched == ["softmax_fwd"]
    zero = softmax(x, -1, scale=0.5, bias=bias, mask=keep)
    ref = _eager(x, bias, keep, 0.5)
    empty = (zero == 0).all(-1, keepdim=True).expand_as(zero)
    assert torch.equal(torch.isnan(y), torch.isnan(ref)) and torch.equal(torch.isnan(y), empty)
    assert torch.isnan(y[1]).all() and torch.isnan(y[0, 1, 2]).all()
    assert torch.equal(y[~empty], zero[~empty])  # bit for bit the zero-mode values elsewhere
    y64 = softmax_reference(x.double(), -1, scale=0.5, bias=bias.double(), mask=keep, empty_rows="nan")
    assert torch.equal(torch.isnan(y64), torch.isnan(ref))


def test_gradients_are_torch_s_masked_empty_rows_0_bias_emptied_rows_nan():
    x, bias, keep = _case(torch.float32)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    grads = []
    for fn in (lambda a, b: softmax(a, -1, scale=0.5, bias=b, mask=keep, empty_rows="nan"),
               lambda a, b: _eager(a, b, keep, 0.5)):
        a, b = x.clone().requires_grad_(), bias.clone().requires_grad_()
        fn(a, b).backward(dy)
        grads.append((a.grad, b.grad))
    (dx, db), (dx_ref, db_ref) = grads
    for got, want in ((dx, dx_ref), (db, db_ref)):
        assert torch.equal(torch.isnan(got), torch.isnan(want))
        ok = ~torch.isnan(want)
        assert torch.allclose(got[ok], want[ok], rtol=1e-5, atol=1e-6)
    assert not dx[1].any() and torch.isnan(dx[0, 1, 2]).any()  # masked: 0; emptied by the bias: NaN


def test_dim_other_than_last_and_bad_argument():
    x, _, _ = _case(torch.float32)
    keep = torch.rand(3, 2, 5, 1, device=DEVICE) > 0.5
    keep[0, 0] = False  # the softmax runs over dim 2: that column keeps nothing
    y = softmax(x, 2, mask=keep, empty_rows="nan")
    ref = torch.softmax(x.masked_fill(~keep, float("-inf")), 2)
    assert torch.equal(torch.isnan(y), torch.isnan(ref))
    assert torch.allclose(y.nan_to_num(), ref.nan_to_num(), atol=1e-6)
    with pytest.raises(ValueError, match="empty_rows must be one of"):
        softmax(x, -1, empty_rows="ones")
