"""Tests for foldcompile.kernels.attention: the Triton kernels (through the
interpreter on CPU) against a float64 reference, forward and every gradient."""
import math

import pytest
import torch

import importlib

attn_mod = importlib.import_module("foldcompile.kernels.attention")  # the module, not the re-exported function
from foldcompile.kernels._dispatch import record_launches, use_triton
from foldcompile.kernels.attention import attention, attention_reference

# CPU tensors run the kernels through the interpreter (tests/conftest.py); on a GPU machine, CUDA.
DEV = "cuda" if torch.cuda.is_available() else "cpu"
FWD = "attention_fwd"
BWD = ("attention_bwd_pre", "attention_bwd_dkdv", "attention_bwd_dq")
TOL = {torch.float32: 2e-5, torch.float16: 4e-3}


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    """Every kernel output starts as NaN, so an element a kernel forgot to write shows."""
    monkeypatch.setattr(attn_mod, "_empty",
                        lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    assert not torch.isnan(a).any(), "NaN in the kernel's result"
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _leaf(shape, dtype, grad=True, scale=1.0):
    return (torch.randn(shape, dtype=torch.float64) * scale).to(device=DEV, dtype=dtype).requires_grad_(grad)


def _check_case(q, k, v, bias=None, mask=None, gate=None, scale=None, tol=None, ref_dtype=torch.float64,
                zero_grads=()):
    """Run kernel and reference on the same inputs; compare output and all gradients
    (by relative error; those named in ``zero_grads`` are mathematically 0 and are
    compared by absolute error instead)."""
    tol = tol if tol is not None else TOL[q.dtype]
    leaves = {"q": q, "k": k, "v": v, "bias": bias, "gate": gate}
    with record_launches() as launched:
        out = attention(q, k, v, bias=bias, mask=mask, gate=gate, scale=scale)
        dout = torch.randn(out.shape, dtype=torch.float64).to(device=DEV, dtype=out.dtype)
        grads = torch.autograd.grad(out, [t for t in leaves.values() if t is not None], dout)
    assert FWD in launched and all(name in launched for name in BWD), launched
    ref_leaves = {n: (t.detach().to(ref_dtype).requires_grad_() if t is not None else None) for n, t in leaves.items()}
    ref = attention_reference(ref_leaves["q"], ref_leaves["k"], ref_leaves["v"], bias=ref_leaves["bias"], mask=mask,
                              gate=ref_leaves["gate"], scale=scale)
    ref_grads = torch.autograd.grad(ref, [t for t in ref_leaves.values() if t is not None], dout.to(ref_dtype))
    assert out.shape == q.shape and out.dtype == q.dtype
    errors = {"out": _rel(out, ref)}
    names = [n for n, t in leaves.items() if t is not None]
    for name, g, rg in zip(names, grads, ref_grads):
        assert g.shape == leaves[name].shape, (name, g.shape)
        if name in zero_grads:
            assert rg.abs().max() < 1e-10 and g.abs().max() < tol, (name, g.abs().max())
        else:
            errors["d" + name] = _rel(g, rg)
    bad = {n: e for n, e in errors.items() if not e < tol}
    assert not bad, f"relative errors above {tol}: {bad} (all: {errors})"
    return out, dict(zip(names, grads)), launched


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("D", [8, 24, 32])
def test_msa_row_attention_pair_bias_mask_gate(dtype, D):
    # MSA row attention: pair bias [1, H, Q, K] shared by every MSA row, key mask, gate.
    torch.manual_seed(D)
    S, H, L = 3, 2, 37
    q, k, v = (_leaf((S, H, L, D), dtype) for _ in range(3))
    bias = _leaf((1, H, L, L), torch.float32)
    mask = (torch.rand(S, 1, 1, L) > 0.2).to(DEV)
    gate = _leaf((S, H, L, D), dtype)
    _, _, launched = _check_case(q, k, v, bias=bias, mask=mask, gate=gate)
    assert "attention_bwd_dbias" in launched


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triangle_attention_shape_q_neq_k(dtype):
    # Triangle attention layout ([N_res, H, N_res, c] with bias [1, H, Q, K]); Q != K, both tails.
    torch.manual_seed(1)
    q = _leaf((2, 2, 37, 32), dtype)
    k, v = _leaf((2, 2, 61, 32), dtype), _leaf((2, 2, 61, 32), dtype)
    bias = _leaf((1, 2, 37, 61), torch.float32)
    mask = (torch.rand(2, 1, 1, 61) > 0.3).to(DEV)
    _check_case(q, k, v, bias=bias, mask=mask)


@pytest.mark.parametrize("bias_shape", [
    (2, 1, 37, 20),   # shared by heads
    (2, 2, 37, 20),   # not broadcast at all: dS written by the dq kernel
    (1, 1, 1, 20),    # a key bias shared by rows, heads and queries
    (2, 1, 37, 1),    # a per-query bias (its gradient is 0: softmax ignores row constants)
    (20,),            # fewer dims than the logits
])
def test_bias_gradient_over_broadcast_dims(bias_shape):
    torch.manual_seed(2)
    q = _leaf((2, 2, 37, 8), torch.float32)
    k, v = _leaf((2, 2, 20, 8), torch.float32), _leaf((2, 2, 20, 8), torch.float32)
    bias = _leaf(bias_shape, torch.float32)
    _, _, launched = _check_case(q, k, v, bias=bias, zero_grads=("bias",) if bias_shape[-1] == 1 else ())
    full = math.prod(bias_shape) == 2 * 2 * 37 * 20
    assert ("attention_bwd_dbias" in launched) != full


def test_mixed_leading_broadcast_bias_and_extra_leading_dims():
    # Leading dims (2, 3); the bias varies over the second only: expanded then summed back.
    torch.manual_seed(3)
    q, k, v = (_leaf((2, 3, 2, 17, 8), torch.float32) for _ in range(3))
    bias = _leaf((1, 3, 2, 17, 17), torch.float32)
    mask = (torch.rand(2, 1, 1, 1, 17) > 0.2).to(DEV)
    _check_case(q, k, v, bias=bias, mask=mask)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_shared_kv_head_global_column_attention(dtype):
    # AF2 global column attention: H query heads read one K/V head; dk, dv sum over heads.
    torch.manual_seed(4)
    q = _leaf((3, 4, 5, 8), dtype)
    k, v = _leaf((3, 1, 37, 8), dtype), _leaf((3, 1, 37, 8), dtype)
    mask = (torch.rand(3, 1, 1, 37) > 0.3).to(DEV)
    gate = _leaf((3, 4, 5, 8), dtype)
    bias = _leaf((1, 4, 5, 37), torch.float32)
    _check_case(q, k, v, bias=bias, mask=mask, gate=gate)


def test_no_leading_dims_and_custom_scale():
    torch.manual_seed(5)
    q, k, v = (_leaf((2, 33, 24), torch.float32) for _ in range(3))
    _check_case(q, k, v, scale=0.37)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fully_masked_rows_give_zero_and_zero_gradient(dtype):
    torch.manual_seed(6)
    B, H, L, D = 2, 2, 37, 8
    q, k, v = (_leaf((B, H, L, D), dtype) for _ in range(3))
    bias = _leaf((1, H, L, L), torch.float32)
    gate = _leaf((B, H, L, D), dtype)
    mask = (torch.rand(B, 1, L, L) > 0.3).to(DEV)
    mask[0, 0, 5] = False            # one query row with nothing to attend to
    mask[1, 0, :, :] = False         # a whole batch row masked
    out, grads, _ = _check_case(q, k, v, bias=bias, mask=mask, gate=gate)
    assert torch.all(out[0, :, 5] == 0) and torch.all(out[1] == 0)
    assert torch.all(grads["q"][0, :, 5] == 0) and torch.all(grads["q"][1] == 0)
    # Query row 5 is masked in batch row 0 and batch row 1 is masked whole, so the
    # shared bias's gradient for query row 5 sums nothing but zeros.
    assert torch.all(grads["bias"][0, :, 5] == 0)
    assert torch.all(grads["k"][1] == 0) and torch.all(grads["v"][1] == 0) and torch.all(grads["gate"][1] == 0)


def test_minus_1e9_bias_rows_match_fp32_reference():
    # AlphaFold masks with additive (mask - 1) * 1e9 biases: a row masked only that
    # way averages v uniformly in fp32; the kernel must do exactly what fp32 does.
    torch.manual_seed(7)
    B, H, L, D = 2, 2, 37, 24
    q, k, v = (_leaf((B, H, L, D), torch.float32) for _ in range(3))
    key_ok = (torch.rand(B, 1, 1, L, device=DEV) > 0.3).float()
    key_ok[1] = 0.0  # batch row 1: every key masked by -1e9 only
    mask_bias = ((key_ok - 1.0) * 1e9).expand(B, H, L, L).contiguous().requires_grad_()
    pair = _leaf((1, H, L, L), torch.float32)
    with record_launches() as launched:
        out = attention(q, k, v, bias=mask_bias + pair)
    assert FWD in launched
    ref = attention_reference(q, k, v, bias=mask_bias + pair)  # the fp32 reference
    assert _rel(out, ref) < 2e-5
    uniform = v[1].mean(dim=-2, keepdim=True).expand(H, L, D)
    assert _rel(out[1], uniform) < 1e-6
    # Gradients against the fp32 reference too (float64 would not round the -1e9 away).
    _check_case(q, k, v, bias=(mask_bias + pair).detach().requires_grad_(), ref_dtype=torch.float32)


def test_non_contiguous_inputs():
    torch.manual_seed(8)
    B, H, L, D = 2, 2, 37, 24
    q = _leaf((B, L, H, D), torch.float32, grad=False).transpose(1, 2).requires_grad_()  # inner dims strided
    k = _leaf((B, H, D, L), torch.float32, grad=False).transpose(2, 3).requires_grad_()  # d stride != 1
    v = _leaf((H, B, L, D), torch.float32, grad=False).transpose(0, 1).requires_grad_()  # leading dims permuted
    bias = _leaf((1, H, L, L), torch.float32, grad=False).transpose(2, 3).requires_grad_()
    gate = _leaf((B, L, H, D), torch.float32, grad=False).transpose(1, 2).requires_grad_()
    mask = (torch.rand(B, 1, L, 1) > 0.2).to(DEV).transpose(2, 3)
    assert not any(t.is_contiguous() for t in (q, k, v, bias, gate))
    _check_case(q, k, v, bias=bias, mask=mask, gate=gate)


def test_only_needed_gradients_and_no_bias_kernel_without_bias_grad():
    torch.manual_seed(9)
    q, k, v = (_leaf((2, 2, 19, 8), torch.float32) for _ in range(3))
    bias = _leaf((1, 2, 19, 19), torch.float32, grad=False)
    with record_launches() as launched:
        attention(q, k, v, bias=bias).sum().backward()
    assert "attention_bwd_dbias" not in launched and "attention_bwd_dq" in launched
    assert q.grad is not None and not torch.isnan(q.grad).any()


def test_float64_runs_reference_not_triton():
    q, k, v = (torch.randn(2, 9, 8, dtype=torch.float64, device=DEV) for _ in range(3))
    with record_launches() as launched:
        out = attention(q, k, v)
    assert launched == []
    torch.testing.assert_close(out, attention_reference(q, k, v))


def test_dispatch_rule_under_interpreter():
    # tests/conftest.py sets TRITON_INTERPRET=1 without a GPU, so CPU tensors take Triton there.
    assert use_triton(torch.zeros(1, device=DEV))


def test_matmul_precision_follows_torch_setting():
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert attn_mod._precision(torch.float32) == "ieee"
        torch.set_float32_matmul_precision("high")
        assert attn_mod._precision(torch.float32) == "tf32"
        torch.set_float32_matmul_precision("medium")
        assert attn_mod._precision(torch.float32) == "tf32"
    finally:
        torch.set_float32_matmul_precision(before)


@pytest.mark.parametrize("kwargs, match", [
    (dict(q=(2, 3, 9, 8), k=(2, 3, 9, 16), v=(2, 3, 9, 16)), "k/v shape"),
    (dict(q=(2, 3, 9, 8), k=(2, 2, 9, 8), v=(2, 2, 9, 8)), "k/v shape"),
    (dict(q=(2, 3, 9, 8), k=(3, 3, 9, 8), v=(3, 3, 9, 8)), "k/v shape"),
    (dict(q=(2, 3, 9, 8), k=(2, 3, 9, 8), v=(2, 3, 7, 8)), "k and v"),
    (dict(q=(2, 3, 9, 4), k=(2, 3, 9, 4), v=(2, 3, 9, 4)), "head dim D=4"),
    (dict(q=(2, 1, 9, 160), k=(2, 1, 9, 160), v=(2, 1, 9, 160)), "head dim D=160"),
    (dict(q=(9, 8), k=(9, 8), v=(9, 8)), r"q must be \[..., H, L, D\]"),
    (dict(bias=(2, 3, 9, 5)), "bias shape"),
    (dict(mask=(4, 1, 1, 9)), "mask shape"),
    (dict(gate=(2, 3, 9, 4)), "gate shape"),
])
def test_bad_shapes_raise_naming_the_argument(kwargs, match):
    shapes = dict(q=(2, 3, 9, 8), k=(2, 3, 9, 8), v=(2, 3, 9, 8))
    shapes.update({n: kwargs[n] for n in ("q", "k", "v") if n in kwargs})
    q, k, v = (torch.randn(shapes[n]) for n in ("q", "k", "v"))
    extra = {}
    if "bias" in kwargs:
        extra["bias"] = torch.randn(kwargs["bias"])
    if "mask" in kwargs:
        extra["mask"] = torch.ones(kwargs["mask"], dtype=torch.bool)
    if "gate" in kwargs:
        extra["gate"] = torch.randn(kwargs["gate"])
    with pytest.raises(ValueError, match=match):
        attention(q, k, v, **extra)


def test_bad_dtypes_raise():
    q = torch.randn(2, 9, 8)
    with pytest.raises(TypeError, match="mask must be bool"):
        attention(q, q, q, mask=torch.ones(9, 9))
    with pytest.raises(TypeError, match="share a dtype"):
        attention(q, q.half(), q)
    with pytest.raises(TypeError, match="unsupported dtype"):
        attention(q.int(), q.int(), q.int())
    with pytest.raises(TypeError, match="bias must be floating"):
        attention(q, q, q, bias=torch.ones(9, 9, dtype=torch.int64))


def test_gradcheck_reference_float64():
    torch.manual_seed(10)
    q, k, v = (torch.randn(2, 2, 5, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    bias = torch.randn(1, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    gate = torch.randn(2, 2, 5, 8, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(2, 1, 5, 5) > 0.3
    mask[0, 0, 2] = False  # a fully masked row: its gradient must be 0, not NaN
    fn = lambda q, k, v, b, g: attention_reference(q, k, v, bias=b, mask=mask, gate=g)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v, bias, gate))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 is wrong in the Triton interpreter; needs CUDA")
@pytest.mark.parametrize("D", [24, 64])
def test_bf16_on_cuda(D):
    torch.manual_seed(11)
    dev = "cuda"
    B, H, L = 4, 4, 100
    mk = lambda *s: torch.randn(*s, device=dev, dtype=torch.bfloat16, requires_grad=True)  # noqa: E731
    q, k, v, gate = mk(B, H, L, D), mk(B, H, L, D), mk(B, H, L, D), mk(B, H, L, D)
    bias = torch.randn(1, H, L, L, device=dev, requires_grad=True)
    mask = torch.rand(B, 1, 1, L, device=dev) > 0.2
    with record_launches() as launched:
        out = attention(q, k, v, bias=bias, mask=mask, gate=gate)
        dout = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v, bias, gate), dout)
    assert FWD in launched
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v, bias, gate)]
    ref = attention_reference(*leaves[:3], bias=leaves[3], mask=mask, gate=leaves[4])
    ref_grads = torch.autograd.grad(ref, leaves, dout.double())
    plain = attention_reference(q, k, v, bias=bias, mask=mask, gate=gate)  # the PyTorch op in bf16 I/O
    plain_err = _rel(plain, ref)
    assert _rel(out, ref) < max(1e-2, 3 * plain_err)
    for g, rg in zip(grads, ref_grads):
        assert _rel(g, rg) < 2e-2
