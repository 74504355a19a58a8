"""Fused softmax kernels (foldcompile.kernels.softmax) against a float64 reference.

Runs the real Triton kernels: through the interpreter on CPU (conftest sets
TRITON_INTERPRET=1), natively on CUDA.
"""
import pytest
import torch

from foldcompile.kernels._dispatch import record_launches
from foldcompile.kernels.softmax import softmax, softmax_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    assert not torch.isnan(a).any(), "NaN in output"
    return ((a.double() - ref.double()).norm() / ref.double().norm()).item()


def run_both(x, *, scale=None, bias=None, mask=None, dim=-1):
    """Kernel and float64-reference forward + backward with the same upstream gradient."""
    x = x.detach().requires_grad_()
    bias = None if bias is None else bias.detach().requires_grad_()
    with record_launches() as launched:
        y = softmax(x, dim, scale=scale, bias=bias, mask=mask)
        dy = torch.randn_like(y)
        y.backward(dy)
    assert launched == ["softmax_fwd", "softmax_bwd"]
    x64 = x.detach().double().requires_grad_()
    b64 = None if bias is None else bias.detach().double().requires_grad_()
    y64 = softmax_reference(x64, dim, scale=scale, bias=b64, mask=mask)
    y64.backward(dy.double())
    return (y, x.grad, None if bias is None else bias.grad), (y64, x64.grad, None if b64 is None else b64.grad)


def randmask(shape, p=0.3):
    return torch.rand(shape, device=DEVICE) > p


# (x shape, bias shape, mask shape, scale): AlphaFold layouts in miniature, plus odd ones.
CASES = [
    ((3, 37), None, None, None),
    ((2, 3, 61), None, (2, 3, 61), 0.5),
    ((5, 2, 7, 37), (2, 7, 37), (5, 1, 1, 37), 0.25),  # MSA row attention: pair bias + key mask
    ((4, 3, 100), (100,), None, 2.0),  # bias broadcast over every leading dim
    ((2, 4, 3, 8, 37), (4, 1, 8, 37), (2, 1, 3, 1, 37), None),  # alternating broadcast dims
    ((3, 5, 61), (3, 1, 61), (5, 1), 1.0),  # mask broadcast over the softmax dim
    ((6, 64), (6, 64), None, None),  # full-size bias: no reduction
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("xs,bs,ms,scale", CASES)
def test_forward_backward_vs_float64(xs, bs, ms, scale, dtype):
    torch.manual_seed(0)
    x = (torch.randn(xs, device=DEVICE) * 3).to(dtype)
    bias = None if bs is None else torch.randn(bs, device=DEVICE)
    mask = None if ms is None else randmask(ms)
    (y, dx, db), (y64, dx64, db64) = run_both(x, scale=scale, bias=bias, mask=mask)
    assert y.shape == x.shape and y.dtype == dtype and dx.dtype == dtype
    tol = TOL[dtype]
    assert rel(y, y64) < tol
    assert rel(dx, dx64) < tol
    if bias is not None:
        assert db.shape == bias.shape and db.dtype == bias.dtype
        assert rel(db, db64) < tol


def test_bias_broadcast_over_softmax_dim_gets_zero_grad():
    # A per-row constant bias does not change the softmax: its true gradient is 0.
    torch.manual_seed(1)
    x = torch.randn(2, 3, 61, device=DEVICE)
    bias = torch.randn(3, 1, device=DEVICE)
    (y, dx, db), (y64, dx64, db64) = run_both(x, bias=bias)
    assert db.shape == (3, 1)
    assert db.abs().max() < 1e-5 and db64.abs().max() < 1e-12
    assert rel(y, y64) < 1e-5 and rel(dx, dx64) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_half_bias_grad_dtype(dtype):
    torch.manual_seed(2)
    x = torch.randn(4, 2, 5, 37, device=DEVICE, dtype=dtype)
    bias = torch.randn(2, 5, 37, device=DEVICE, dtype=torch.float16)
    (y, dx, db), (y64, dx64, db64) = run_both(x, bias=bias, scale=0.7)
    assert db.dtype == torch.float16
    assert rel(db, db64) < 2e-3


def test_fully_masked_rows_give_zero_and_zero_grad():
    torch.manual_seed(3)
    x = torch.randn(4, 3, 37, device=DEVICE)
    bias = torch.randn(3, 37, device=DEVICE)
    mask = randmask((4, 1, 37))
    mask[1] = False  # every row of batch 1 masked out
    (y, dx, db), (y64, dx64, db64) = run_both(x, bias=bias, mask=mask)
    assert torch.isfinite(y).all() and torch.isfinite(dx).all() and torch.isfinite(db).all()
    assert torch.equal(y[1], torch.zeros_like(y[1]))
    assert torch.equal(dx[1], torch.zeros_like(dx[1]))
    assert torch.equal(y64[1], torch.zeros_like(y64[1])) and torch.equal(dx64[1], torch.zeros_like(dx64[1]))
    # Masked entries of other rows are exactly 0 and pass exactly 0 gradient.
    keep = mask.expand_as(x)
    assert torch.equal(y[~keep], torch.zeros_like(y[~keep])) and torch.equal(dx[~keep], torch.zeros_like(dx[~keep]))
    assert rel(y, y64) < 1e-5 and rel(dx, dx64) < 1e-5 and rel(db, db64) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_minus_1e9_bias_masking_matches_fp32_reference(dtype):
    # AlphaFold masks with bias = 1e9 * (mask - 1). In fp32, -1e9 + x rounds to -1e9 for small
    # x, so a row masked entirely that way averages uniformly: the kernel must do the same
    # (a float64 computation would not, so the bar here is the fp32 reference).
    torch.manual_seed(4)
    x = (torch.randn(3, 4, 61, device=DEVICE) * 4).to(dtype).requires_grad_()
    keep = randmask((3, 1, 61))
    keep[0, 0, :] = False
    bias = (1e9 * (keep.float() - 1)).requires_grad_()  # [3, 1, 61]
    dy = torch.randn(3, 4, 61, device=DEVICE, dtype=dtype)
    with record_launches() as launched:
        y = softmax(x, scale=0.125, bias=bias)
        y.backward(dy)
    assert launched == ["softmax_fwd", "softmax_bwd"]
    x32 = x.detach().float().requires_grad_()
    b32 = bias.detach().clone().requires_grad_()
    y32 = softmax_reference(x32, scale=0.125, bias=b32)
    y32.backward(dy.float())
    assert torch.allclose(y[0].float(), torch.full_like(y32[0], 1.0 / 61), rtol=1e-3, atol=0)
    assert torch.allclose(y32[0], torch.full_like(y32[0], 1.0 / 61), rtol=1e-6, atol=0)
    tol = 1e-6 if dtype == torch.float32 else 2e-3
    assert rel(y, y32) < tol and rel(x.grad, x32.grad) < tol and rel(bias.grad, b32.grad) < tol
    # Entries carrying -1e9 in partly kept rows get exactly 0 weight, as in the reference.
    dropped = (~keep[1:]).expand(2, 4, 61)
    assert torch.equal(y[1:][dropped], torch.zeros_like(y[1:][dropped]))


def test_non_contiguous_inputs():
    torch.manual_seed(5)
    base = torch.randn(6, 8, 37, device=DEVICE)
    for x in (base[:, ::2], base.transpose(0, 1), base.transpose(1, 2)):
        assert not x.is_contiguous()
        bias = torch.randn(x.shape[-1], x.shape[-2], device=DEVICE).t()  # transposed bias
        mask = randmask(x.shape).transpose(0, 1).contiguous().transpose(0, 1)
        assert not bias.is_contiguous() and not mask.is_contiguous()
        (y, dx, db), (y64, dx64, db64) = run_both(x, bias=bias, mask=mask, scale=0.3)
        assert rel(y, y64) < 1e-5 and rel(dx, dx64) < 1e-5 and rel(db, db64) < 1e-5


@pytest.mark.parametrize("dim", [0, 1, -2])
def test_other_dims(dim):
    torch.manual_seed(6)
    x = torch.randn(5, 37, 6, device=DEVICE)
    bias = torch.randn(5, 37, 1, device=DEVICE)  # varies along dims 0 and 1, broadcast over 2
    mask = randmask((5, 37, 1))
    mask[2] = False
    (y, dx, db), (y64, dx64, db64) = run_both(x, dim=dim, bias=bias, mask=mask, scale=1.5)
    assert y.shape == x.shape and db.shape == bias.shape
    assert rel(y, y64) < 1e-5 and rel(dx, dx64) < 1e-5 and rel(db, db64) < 1e-5
    assert torch.equal(y64.float().sum(dim).gt(0.5), y.sum(dim).gt(0.5))


def test_no_bias_grad_when_bias_frozen():
    torch.manual_seed(7)
    x = torch.randn(4, 37, device=DEVICE, requires_grad=True)
    bias = torch.randn(37, device=DEVICE)  # requires_grad False
    y = softmax(x, bias=bias)
    y.backward(torch.randn_like(y))
    assert bias.grad is None
    x64 = x.detach().double().requires_grad_()
    y64 = softmax_reference(x64, bias=bias)
    assert rel(y, y64) < 1e-5


def test_bias_only_grad():
    torch.manual_seed(8)
    x = torch.randn(3, 5, 37, device=DEVICE)
    bias = torch.randn(5, 37, device=DEVICE, requires_grad=True)
    with record_launches() as launched:
        softmax(x, bias=bias).pow(2).sum().backward()
    assert launched == ["softmax_fwd", "softmax_bwd"]
    b64 = bias.detach().double().requires_grad_()
    softmax_reference(x.double(), bias=b64).pow(2).sum().backward()
    assert rel(bias.grad, b64.grad) < 1e-5


def test_many_broadcast_copies_split_reduction():
    # Bias broadcast over 200 rows: the backward splits the reduction into several shares.
    torch.manual_seed(9)
    x = torch.randn(200, 37, device=DEVICE)
    bias = torch.randn(37, device=DEVICE)
    (y, dx, db), (y64, dx64, db64) = run_both(x, bias=bias)
    assert rel(y, y64) < 1e-5 and rel(dx, dx64) < 1e-5 and rel(db, db64) < 1e-5


@pytest.mark.parametrize("bs", [(2, 1, 2, 1, 2, 1, 37), (1, 2, 1, 2, 1, 2, 37)])
def test_more_broadcast_patterns_than_kernel_indexes(bs):
    # 6 alternating broadcast dims: more than the kernels index, so bias/mask are materialised.
    torch.manual_seed(14)
    x = torch.randn(2, 2, 2, 2, 2, 2, 37, device=DEVICE)
    bias = torch.randn(bs, device=DEVICE)
    mask = randmask(tuple(1 if s == 2 else 2 for s in bs[:-1]) + (37,))
    (y, dx, db), (y64, dx64, db64) = run_both(x, bias=bias, mask=mask)
    assert db.shape == bias.shape
    assert rel(y, y64) < 1e-5 and rel(dx, dx64) < 1e-5 and rel(db, db64) < 1e-5


@pytest.fixture
def poisoned_empty(monkeypatch):
    """Make torch.empty hand out NaN-filled float buffers, so unwritten outputs show."""
    real_empty = torch.empty

    def empty(*a, **k):
        t = real_empty(*a, **k)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", empty)


def test_every_output_element_written(poisoned_empty):
    torch.manual_seed(10)
    x = torch.randn(7, 3, 61, device=DEVICE)
    bias = torch.randn(3, 61, device=DEVICE)
    mask = randmask((7, 1, 61))
    (y, dx, db), (y64, dx64, db64) = run_both(x, bias=bias, mask=mask)
    assert rel(y, y64) < 1e-5 and rel(dx, dx64) < 1e-5 and rel(db, db64) < 1e-5


def test_gradcheck_reference():
    torch.manual_seed(11)
    x = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(2, 1, 7) > 0.3
    mask[0] = False
    assert torch.autograd.gradcheck(
        lambda x, b: softmax_reference(x, scale=0.5, bias=b, mask=mask), (x, bias))


def test_reference_matches_torch():
    torch.manual_seed(12)
    x, b = torch.randn(4, 37), torch.randn(37)
    m = torch.rand(4, 37) > 0.2
    expect = torch.softmax((0.3 * x + b).masked_fill(~m, float("-inf")), -1)
    assert torch.allclose(softmax_reference(x, scale=0.3, bias=b, mask=m), expect, atol=1e-6)


def test_float64_runs_reference():
    x = torch.randn(3, 37, dtype=torch.float64, device=DEVICE)
    with record_launches() as launched:
        y = softmax(x)
    assert launched == [] and torch.allclose(y, torch.softmax(x, -1))


def test_bad_inputs():
    x = torch.randn(4, 8, device=DEVICE)
    with pytest.raises(ValueError, match=r"bias of shape \(3, 8\) does not broadcast to x of shape \(4, 8\)"):
        softmax(x, bias=torch.randn(3, 8, device=DEVICE))
    with pytest.raises(ValueError, match=r"mask of shape \(2, 4, 8\) does not broadcast"):
        softmax(x, mask=torch.ones(2, 4, 8, dtype=torch.bool, device=DEVICE))
    with pytest.raises(TypeError, match="mask must be torch.bool"):
        softmax(x, mask=torch.ones(4, 8, device=DEVICE))
    with pytest.raises(TypeError, match="x has dtype torch.int64"):
        softmax(torch.ones(4, 8, dtype=torch.long, device=DEVICE))
    with pytest.raises(TypeError, match="bias has dtype torch.int32"):
        softmax(x, bias=torch.ones(8, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="dim=2 is out of range"):
        softmax(x, 2)
    with pytest.raises(TypeError, match="scale must be a Python number"):
        softmax(x, scale=torch.tensor(2.0))


@pytest.mark.parametrize("xs,bs", [((0, 3, 37), (3, 37)), ((4, 0, 37), (37,))])
def test_empty_leading_dims(xs, bs):
    x = torch.randn(xs, device=DEVICE, requires_grad=True)
    bias = torch.randn(bs, device=DEVICE, requires_grad=True)
    y = softmax(x, bias=bias)
    y.sum().backward()
    assert y.shape == x.shape and x.grad.shape == x.shape
    assert torch.equal(bias.grad, torch.zeros_like(bias))


def test_empty_softmax_dim_is_an_error():
    with pytest.raises(ValueError, match="dim=-1 of x has size 0"):
        softmax(torch.randn(3, 0, device=DEVICE))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 is wrong in the Triton interpreter; CUDA only")
def test_bf16_cuda():
    torch.manual_seed(13)
    x = torch.randn(8, 4, 64, 64, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(4, 64, 64, device="cuda", dtype=torch.bfloat16)
    mask = randmask((8, 1, 1, 64))
    (y, dx, db), (y64, dx64, db64) = run_both(x, bias=bias, mask=mask, scale=0.2)
    assert rel(y, y64) < 1e-2 and rel(dx, dx64) < 1e-2 and rel(db, db64) < 1e-2
