"""Layer norm kernels (foldcompile.kernels.layer_norm) against a float64 reference.

Runs the real Triton kernels: through the interpreter on CPU (conftest sets
TRITON_INTERPRET=1), natively on CUDA.
"""
import pytest
import torch

from foldcompile.kernels._dispatch import record_launches, use_triton
from foldcompile.kernels.layer_norm import MAX_TRITON_DIM, layer_norm, layer_norm_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Bars relative to the float64 reference (PITFALLS correctness guide).
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    assert not torch.isnan(a).any(), "NaN in output"
    return ((a.double() - ref.double()).norm() / ref.double().norm()).item()


def grad(t):
    return None if t is None else t.grad


def run_both(x, w, b, eps=1e-5):
    """Kernel forward+backward and float64 reference forward+backward; returns both sets."""
    x = x.detach().requires_grad_()
    w = None if w is None else w.detach().requires_grad_()
    b = None if b is None else b.detach().requires_grad_()
    with record_launches() as launched:
        y = layer_norm(x, w, b, eps)
        dy = torch.randn_like(y)
        y.backward(dy)
    assert launched == ["layer_norm_fwd", "layer_norm_bwd"] + (["layer_norm_bwd_reduce"] if w is not None or b is not None else [])
    x64 = x.detach().double().requires_grad_()
    w64 = None if w is None else w.detach().double().requires_grad_()
    b64 = None if b is None else b.detach().double().requires_grad_()
    y64 = layer_norm_reference(x64, w64, b64, eps)
    y64.backward(dy.double())
    return (y, x.grad, grad(w), grad(b)), (y64, x64.grad, grad(w64), grad(b64))


def test_triton_path_is_active():
    assert use_triton(torch.empty(1, device=DEVICE))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(3, 37), (2, 5, 61), (7, 100), (67, 64), (3, 256), (2, 384)])
def test_forward_backward_vs_float64(shape, dtype):
    torch.manual_seed(0)
    n = shape[-1]
    # Offset and spread so the mean subtraction matters.
    x = (torch.randn(shape, device=DEVICE) * 2 + 3).to(dtype)
    w = torch.randn(n, device=DEVICE)
    b = torch.randn(n, device=DEVICE)
    (y, dx, dw, db), (y64, dx64, dw64, db64) = run_both(x, w, b)
    assert y.dtype == dtype and y.shape == x.shape and dx.dtype == dtype
    assert dw.dtype == torch.float32 and db.dtype == torch.float32
    tol = TOL[dtype]
    assert rel(y, y64) < tol
    assert rel(dx, dx64) < tol
    # dweight/dbias accumulate in fp32 from inputs rounded to dtype: same bar.
    assert rel(dw, dw64) < tol
    assert rel(db, db64) < tol


def test_many_rows_two_stage_reduction():
    # More row blocks than stage-one programs, and a ragged last block: 1000 rows of 37.
    torch.manual_seed(1)
    x = torch.randn(1000, 37, device=DEVICE)
    w, b = torch.randn(37, device=DEVICE), torch.randn(37, device=DEVICE)
    (y, dx, dw, db), (y64, dx64, dw64, db64) = run_both(x, w, b)
    for a, r in ((y, y64), (dx, dx64), (dw, dw64), (db, db64)):
        assert rel(a, r) < 1e-5


@pytest.mark.parametrize("with_w,with_b", [(False, False), (True, False), (False, True)])
def test_optional_weight_bias(with_w, with_b):
    torch.manual_seed(2)
    x = torch.randn(9, 61, device=DEVICE)
    w = torch.randn(61, device=DEVICE) if with_w else None
    b = torch.randn(61, device=DEVICE) if with_b else None
    (y, dx, dw, db), (y64, dx64, dw64, db64) = run_both(x, w, b, eps=1e-6)
    assert rel(y, y64) < 1e-5 and rel(dx, dx64) < 1e-5
    if with_w:
        assert rel(dw, dw64) < 1e-5
    if with_b:
        assert rel(db, db64) < 1e-5


def test_half_weights_with_half_input():
    torch.manual_seed(3)
    x = torch.randn(5, 100, device=DEVICE, dtype=torch.float16)
    w = torch.randn(100, device=DEVICE, dtype=torch.float16)
    b = torch.randn(100, device=DEVICE, dtype=torch.float16)
    (y, dx, dw, db), (y64, dx64, dw64, db64) = run_both(x, w, b)
    assert dw.dtype == torch.float16 and db.dtype == torch.float16
    for a, r in ((y, y64), (dx, dx64), (dw, dw64), (db, db64)):
        assert rel(a, r) < 2e-3


def test_non_contiguous_input():
    torch.manual_seed(4)
    base = torch.randn(6, 40, 37, device=DEVICE)
    for x in (base[:, ::2], base.transpose(0, 1), base.transpose(1, 2)):
        assert not x.is_contiguous()
        w, b = torch.randn(x.shape[-1], device=DEVICE), torch.randn(x.shape[-1], device=DEVICE)
        (y, dx, dw, db), (y64, dx64, dw64, db64) = run_both(x, w, b)
        assert dx.shape == x.shape
        for a, r in ((y, y64), (dx, dx64), (dw, dw64), (db, db64)):
            assert rel(a, r) < 1e-5


def test_wide_rows():
    # One row per program at the widest AF-relevant widths (2048 keeps the interpreter quick).
    torch.manual_seed(5)
    x = torch.randn(3, 2048, device=DEVICE)
    w, b = torch.randn(2048, device=DEVICE), torch.randn(2048, device=DEVICE)
    (y, dx, dw, db), (y64, dx64, dw64, db64) = run_both(x, w, b)
    for a, r in ((y, y64), (dx, dx64), (dw, dw64), (db, db64)):
        assert rel(a, r) < 1e-5


def test_constant_rows_are_finite():
    # var = 0: output is bias, no NaN/inf in forward or backward.
    x = torch.full((4, 37), 2.5, device=DEVICE)
    w, b = torch.randn(37, device=DEVICE), torch.randn(37, device=DEVICE)
    (y, dx, dw, db), _ = run_both(x, w, b)
    assert torch.allclose(y, b.expand_as(y), atol=1e-6)
    assert torch.isfinite(dx).all() and torch.isfinite(dw).all()


def test_float64_runs_reference():
    x = torch.randn(3, 37, device=DEVICE, dtype=torch.float64)
    with record_launches() as launched:
        y = layer_norm(x, None, None)
    assert launched == []
    assert torch.allclose(y, layer_norm_reference(x, None, None))


def test_gradcheck_reference():
    torch.manual_seed(6)
    x = torch.randn(3, 2, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: layer_norm_reference(x, w, b, 1e-5), (x, w, b))


def test_reference_matches_torch():
    torch.manual_seed(7)
    x, w, b = torch.randn(4, 37), torch.randn(37), torch.randn(37)
    assert torch.allclose(layer_norm_reference(x, w, b), torch.nn.functional.layer_norm(x, (37,), w, b), atol=1e-5)


def test_rows_are_independent():
    # A NaN input row must poison its own output row and no other (masking and row indexing).
    torch.manual_seed(8)
    x = torch.randn(33, 61, device=DEVICE)
    x[17] = float("nan")
    y = layer_norm(x, None, None)
    nan_rows = torch.isnan(y).any(dim=1)
    assert nan_rows.tolist() == [i == 17 for i in range(33)]


def test_bad_inputs():
    x = torch.randn(4, 8, device=DEVICE)
    with pytest.raises(ValueError, match=r"weight has shape \(7,\), expected \(8,\)"):
        layer_norm(x, torch.randn(7, device=DEVICE), None)
    with pytest.raises(ValueError, match=r"bias has shape \(1, 8\)"):
        layer_norm(x, None, torch.randn(1, 8, device=DEVICE))
    with pytest.raises(TypeError, match="x has dtype torch.int64"):
        layer_norm(torch.ones(4, 8, dtype=torch.long, device=DEVICE), None, None)
    with pytest.raises(TypeError, match="weight has dtype torch.int32"):
        layer_norm(x, torch.ones(8, dtype=torch.int32, device=DEVICE), None)
    with pytest.raises(ValueError, match="non-empty last dim"):
        layer_norm(torch.randn(4, 0, device=DEVICE), None, None)
    with pytest.raises(ValueError, match="eps"):
        layer_norm(x, None, None, eps=-1.0)


def test_empty_leading_dim():
    x = torch.randn(0, 37, device=DEVICE, requires_grad=True)
    w = torch.randn(37, device=DEVICE, requires_grad=True)
    y = layer_norm(x, w, None)
    y.sum().backward()
    assert y.shape == (0, 37) and torch.equal(w.grad, torch.zeros_like(w))


def test_max_dim_constant():
    assert MAX_TRITON_DIM >= 4096


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 is wrong in the Triton interpreter; CUDA only")
def test_bf16_cuda():
    torch.manual_seed(9)
    x = torch.randn(4, 128, 256, device="cuda", dtype=torch.bfloat16)
    w, b = torch.randn(256, device="cuda"), torch.randn(256, device="cuda")
    (y, dx, dw, db), (y64, dx64, dw64, db64) = run_both(x, w, b)
    # No worse than 3x torch's own bf16 layer norm.
    torch_err = rel(torch.nn.functional.layer_norm(x, (256,), w.bfloat16(), b.bfloat16()), y64)
    assert rel(y, y64) < max(1e-2, 3 * torch_err)
    assert rel(dx, dx64) < 1e-2 and rel(dw, dw64) < 1e-2 and rel(db, db64) < 1e-2


@pytest.fixture
def poisoned_empty(monkeypatch):
    """Make torch.empty / empty_like hand out NaN-filled float buffers, so unwritten outputs show."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def fill(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: fill(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: fill(real_empty_like(*a, **k)))


def test_every_output_element_written(poisoned_empty):
    torch.manual_seed(10)
    x = torch.randn(45, 37, device=DEVICE)
    w, b = torch.randn(37, device=DEVICE), torch.randn(37, device=DEVICE)
    (y, dx, dw, db), (y64, dx64, dw64, db64) = run_both(x, w, b)
    for a, r in ((y, y64), (dx, dx64), (dw, dw64), (db, db64)):
        assert rel(a, r) < 1e-5  # rel() fails on any NaN
