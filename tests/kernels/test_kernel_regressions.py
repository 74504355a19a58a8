"""Regression tests for kernel bugs found in review (each failed on the code before its fix).

CPU tensors run the Triton kernels through the interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 without a GPU); shapes are tiny, dtypes fp32 / fp16.
"""
import importlib

import pytest
import torch

from foldcompile.kernels import _dispatch
from foldcompile.kernels._dispatch import record_launches
from foldcompile.kernels.attention import attention, attention_reference
from foldcompile.kernels.elementwise import fuse_elementwise
from foldcompile.kernels.layer_norm import layer_norm, layer_norm_reference
from foldcompile.kernels.softmax import softmax, softmax_reference

attn_mod = importlib.import_module("foldcompile.kernels.attention")  # the module, not the function

DEV = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not (torch.cuda.is_available() or _dispatch.interpreting()),
                                  reason="needs a GPU or TRITON_INTERPRET=1")
pytestmark = needs_triton


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    assert not torch.isnan(a).any(), "NaN in the kernel's result"
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _randn(*shape, dtype=torch.float32, grad=False):
    return torch.randn(*shape, dtype=torch.float64).to(device=DEV, dtype=dtype).requires_grad_(grad)


# --------------------------------------------------------------------------- 1. layer_norm weight / bias strides


@pytest.mark.parametrize("kind", ["sliced_weight", "expanded_weight", "strided_bias"])
def test_layer_norm_non_contiguous_weight_bias(kind):
    torch.manual_seed(0)
    n = 24
    x = _randn(5, n)
    if kind == "sliced_weight":
        leaf = _randn(n, 3)
        view = lambda p: (p[:, 1], None)  # noqa: E731  stride 3
    elif kind == "expanded_weight":
        leaf = _randn(1)
        view = lambda p: (p.expand(n), None)  # noqa: E731  stride 0
    else:
        leaf = _randn(n, 2)
        view = lambda p: (None, p[:, 1])  # noqa: E731  stride 2
    g = _randn(5, n)
    outs, grads = [], []
    for fn, dtype in ((layer_norm, torch.float32), (layer_norm_reference, torch.float64)):
        p = leaf.detach().to(dtype).requires_grad_()
        xi = x.detach().to(dtype).requires_grad_()
        w, b = view(p)
        with record_launches() as launched:
            y = fn(xi, w, b)
            y.backward(g.to(dtype))
        if fn is layer_norm:
            assert "layer_norm_fwd" in launched and "layer_norm_bwd" in launched, launched
        outs.append(y)
        grads.append((xi.grad, p.grad))
    assert _rel(outs[0], outs[1]) < 1e-5
    assert _rel(grads[0][0], grads[1][0]) < 1e-5
    assert grads[0][1].shape == leaf.shape
    assert _rel(grads[0][1], grads[1][1]) < 1e-5


# --------------------------------------------------------------------------- 2. double backward raises


def _double_backward_cases():
    sig = fuse_elementwise(lambda a, b: torch.sigmoid(a) * b + a)
    return {
        "layer_norm": (lambda t: layer_norm(t, None, None), (3, 16)),
        "softmax": (lambda t: softmax(t), (3, 16)),
        "attention": (lambda t: attention(t, t, t), (1, 5, 8)),
        "fused_elementwise": (lambda t: sig(t, torch.ones(t.shape[-1], device=t.device)), (3, 16)),
    }


@pytest.mark.parametrize("name", ["layer_norm", "softmax", "attention", "fused_elementwise"])
def test_second_order_gradient_raises(name):
    """The backwards return gradients without a graph: create_graph must not give a silently
    wrong second derivative, it must raise when differentiated again."""
    torch.manual_seed(0)
    fn, shape = _double_backward_cases()[name]
    t = _randn(*shape, grad=True)
    y = fn(t)
    w = _randn(*y.shape)
    gx, = torch.autograd.grad((y * w).sum(), t, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        torch.autograd.grad((gx * gx).sum(), t)
    # A gradient penalty plus the task loss: the penalty term must not be dropped silently.
    y = fn(t)
    gx, = torch.autograd.grad((y * w).sum(), t, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        torch.autograd.grad((gx ** 2).sum() + (y * w).sum(), t)
    # First-order gradients are unaffected.
    gx2, = torch.autograd.grad((fn(t) * w).sum(), t)
    assert not gx2.requires_grad and torch.isfinite(gx2).all()


# --------------------------------------------------------------------------- 3. elementwise: expanded grad input


def test_fused_elementwise_expanded_input_gradient():
    torch.manual_seed(0)
    f = fuse_elementwise(lambda x, b, r: r + torch.sigmoid(x + b))
    a = _randn(1, 8, grad=True)
    b = _randn(8)
    r = _randn(4, 8, grad=True)
    g = _randn(4, 8)
    with record_launches() as launched:
        y = f(a.expand(4, 8), b, r)
        y.backward(g)
    assert "fused_elementwise_bwd" in launched, launched
    a2 = a.detach().double().requires_grad_()
    r2 = r.detach().double().requires_grad_()
    y2 = r2 + torch.sigmoid(a2.expand(4, 8) + b.double())
    y2.backward(g.double())
    assert _rel(y, y2) < 1e-6
    assert _rel(a.grad, a2.grad) < 1e-6
    assert _rel(r.grad, r2.grad) < 1e-6


# --------------------------------------------------------------------------- 4. softmax: expanded bias backward


def test_softmax_expanded_bias_backward():
    torch.manual_seed(0)
    b0 = _randn(1, 1, 1, 1, 1, 1, 1, 5, grad=True)
    x = _randn(2, 2, 2, 2, 2, 2, 2, 5, grad=True)
    g = _randn(*x.shape)
    with record_launches() as launched:
        y = softmax(x, bias=b0.expand(1, 2, 1, 2, 1, 2, 1, 5))
        y.backward(g)
    assert {"softmax_fwd", "softmax_bwd"} <= set(launched)
    b0r = b0.detach().double().requires_grad_()
    xr = x.detach().double().requires_grad_()
    yr = softmax_reference(xr, bias=b0r.expand(1, 2, 1, 2, 1, 2, 1, 5))
    yr.backward(g.double())
    assert _rel(y, yr) < 1e-5
    assert _rel(x.grad, xr.grad) < 1e-5
    assert _rel(b0.grad, b0r.grad) < 1e-5


# --------------------------------------------------------------------------- 5. / 6. elementwise dtypes and casts


def test_fused_elementwise_zero_dim_tensor_promotion():
    h = _randn(4, 8, dtype=torch.float16)
    s = torch.tensor(2.0, device=DEV)  # 0-dim fp32: does not promote a dimensioned fp16 tensor
    f = fuse_elementwise(lambda a, b: a * b)
    with record_launches() as launched:
        out = f(h, s)
    assert "fused_elementwise_fwd" in launched
    assert out.dtype == (h * s).dtype == torch.float16
    assert torch.equal(out, h * s)
    # Both 0-dim: ordinary promotion.
    f0 = f(torch.tensor(1.5, dtype=torch.float16, device=DEV), s)
    assert f0.dtype == torch.float32 and f0.item() == 3.0


def test_fused_elementwise_half_cast_rounds():
    torch.manual_seed(0)
    f = fuse_elementwise(lambda a: a.half().float() - a)
    x = _randn(64) * 1.001
    with record_launches() as launched:
        out = f(x)
    assert "fused_elementwise_fwd" in launched
    expected = x.half().float() - x
    assert expected.abs().max() > 0  # the fp16 round trip loses bits
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 is wrong in the Triton interpreter")
def test_fused_elementwise_cast_rounds_bf16_cuda():
    f = fuse_elementwise(lambda a: a.bfloat16().float() - a)
    x = _randn(64) * 1.001
    torch.testing.assert_close(f(x), x.bfloat16().float() - x, rtol=0, atol=0)


# --------------------------------------------------------------------------- 7. TRITON_INTERPRET read once


def test_interpret_flag_read_once_at_import(monkeypatch):
    before = _dispatch.interpreting()
    monkeypatch.setenv("TRITON_INTERPRET", "0" if before else "1")
    assert _dispatch.interpreting() == before
    cpu = torch.zeros(1)
    assert _dispatch.use_triton(cpu) == before


# --------------------------------------------------------------------------- 8. attention with empty dims


@pytest.mark.parametrize("shape", [(2, 0, 5, 8), (0, 2, 5, 8)], ids=["H=0", "B=0"])
def test_attention_empty_heads_or_rows_backward(shape):
    q = _randn(*shape, grad=True)
    k = _randn(*shape[:2], 7, 8, grad=True)
    v = _randn(*shape[:2], 7, 8, grad=True)
    bias = _randn(shape[1], 5, 7, grad=True)
    gate = _randn(*shape, grad=True)
    out = attention(q, k, v, bias=bias, gate=gate)
    assert out.shape == q.shape
    out.sum().backward()
    for t in (q, k, v, gate):
        assert t.grad.shape == t.shape
    assert bias.grad.shape == bias.shape and torch.all(bias.grad == 0)


# --------------------------------------------------------------------------- 9. attention grid slicing


@pytest.fixture
def small_grid(monkeypatch):
    """Grid axes 1 / 2 limited to 3 programs, so B·H launches split into B slices; kernel
    outputs start as NaN so an element a slice forgot to write shows."""
    monkeypatch.setattr(attn_mod, "_MAX_GRID_YZ", 3)
    monkeypatch.setattr(attn_mod, "_empty",
                        lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device))


@pytest.mark.parametrize("case", ["full_bias_gate", "row_bias_mask", "shared_bias_pairs", "kv_one_head"])
def test_attention_grid_slices(small_grid, case):
    torch.manual_seed(0)
    B, H, Q, K, D = 5, 2, 6, 7, 8
    if case == "shared_bias_pairs":
        B = 4
    hkv = 1 if case == "kv_one_head" else H
    q = _randn(B, H, Q, D, grad=True)
    k = _randn(B, hkv, K, D, grad=True)
    v = _randn(B, hkv, K, D, grad=True)
    bias = gate = mask = None
    if case == "full_bias_gate":
        bias = _randn(B, H, Q, K, grad=True)
        gate = _randn(B, H, Q, D, grad=True)
    elif case == "row_bias_mask":
        bias = _randn(B, 1, Q, K, grad=True)  # per row, broadcast over heads: the dbias kernel
        mask = torch.rand(B, 1, 1, K, device=DEV) > 0.3
    elif case == "shared_bias_pairs":
        bias = _randn(H, Q, K, grad=True)  # shared by all rows: two rows per program
    leaves = [t for t in (q, k, v, bias, gate) if t is not None]
    g = _randn(B, H, Q, D)
    with record_launches() as launched:
        out = attention(q, k, v, bias=bias, mask=mask, gate=gate)
        grads = torch.autograd.grad(out, leaves, g)
    assert launched.count("attention_fwd") > 1 and launched.count("attention_bwd_dq") > 1, launched
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    it = iter(ref_leaves)
    rq, rk, rv = next(it), next(it), next(it)
    rbias = next(it) if bias is not None else None
    rgate = next(it) if gate is not None else None
    ref = attention_reference(rq, rk, rv, bias=rbias, mask=mask, gate=rgate)
    ref_grads = torch.autograd.grad(ref, ref_leaves, g.double())
    assert _rel(out, ref) < 2e-5
    for got, want in zip(grads, ref_grads):
        assert got.shape == want.shape
        assert _rel(got, want) < 2e-5


def test_attention_grid_slices_too_many_heads(small_grid):
    q = _randn(1, 4, 5, 8)
    with pytest.raises(ValueError, match="heads exceed the CUDA grid limit"):
        attention(q, q, q)


# --------------------------------------------------------------------------- 10. 32-bit inner offsets


def test_offsets32_check_rejects_huge_inner_strides():
    """A view with an inner stride × length >= 2**31 would overflow the kernels' int32 inner
    offsets; such storage cannot be allocated here, so the host check is tested on meta tensors."""
    huge = torch.empty(0, device="meta").as_strided((2, 4, 8), (8, 2**31, 1))
    with pytest.raises(ValueError, match="strides too large for 32-bit offsets"):
        _dispatch.check_offsets32("attention", "q", huge, (1, 2))
    _dispatch.check_offsets32("attention", "q", huge, (2,))  # the last dim alone is fine
    ok = torch.empty(0, device="meta").as_strided((2, 4, 8), (2**31, 8, 1))  # only a row stride is huge
    _dispatch.check_offsets32("attention", "q", ok, (1, 2))
