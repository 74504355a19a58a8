"""The attention kernel's second additive term, ``key_bias`` (broadcastable to [..., H, 1, K]),
through the interpreter on CPU, against a float64 formulation written out here (not the
module's reference): output and every gradient, including d key_bias when it requires grad."""
import importlib

import pytest
import torch

from foldcompile.kernels._dispatch import record_launches
from foldcompile.kernels.attention import attention, attention_reference

attn_mod = importlib.import_module("foldcompile.kernels.attention")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 2e-5, torch.float16: 4e-3}


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    """Every kernel output starts as NaN, so an element a kernel forgot to write shows."""
    monkeypatch.setattr(attn_mod, "_empty",
                        lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device))


def _f64(q, k, v, bias, key_bias, mask, gate, scale, fp32_logits=False):
    """float64: softmax over keys of scale·q kᵀ + bias + key_bias with masked entries left out;
    a row that keeps no key gives 0. ``fp32_logits`` rounds the logits to fp32 first (the kernel's
    stated logit precision): a row whose every key has a -1e9 bias is then uniform, as in fp32
    AlphaFold, where float64 would still see the q·k differences 1e9 below."""
    s = torch.einsum("...qd,...kd->...qk", q, k) * scale
    terms = [t for t in (bias, key_bias) if t is not None]
    if fp32_logits:
        s = (s.float() + sum(t.float() for t in terms)).double() if terms else s.float().double()
    else:
        for t in terms:
            s = s + t
    if mask is not None:
        s = torch.where(mask, s, torch.tensor(float("-inf"), dtype=s.dtype))
    m = s.detach().amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)
    z = e.sum(-1, keepdim=True)
    p = e / torch.where(z == 0, torch.ones_like(z), z)
    o = torch.einsum("...qk,...kd->...qd", p, v)
    return o * torch.sigmoid(gate) if gate is not None else o


def _leaf(shape, dtype, grad=True, scale=1.0):
    return (torch.randn(shape, dtype=torch.float64) * scale).to(device=DEV, dtype=dtype).requires_grad_(grad)


def _rel(a, b):
    assert not torch.isnan(a).any(), "NaN in the kernel's result"
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _run(q, k, v, *, bias=None, key_bias=None, mask=None, gate=None, tol=None, fp32_logits=False):
    tol = tol if tol is not None else TOL[q.dtype]
    scale = q.shape[-1] ** -0.5
    leaves = {n: t for n, t in dict(q=q, k=k, v=v, bias=bias, key_bias=key_bias, gate=gate).items()
              if t is not None and t.requires_grad}
    with record_launches() as launched:
        out = attention(q, k, v, bias=bias, key_bias=key_bias, mask=mask, gate=gate)
        dout = torch.randn(out.shape, dtype=torch.float64).to(device=DEV, dtype=out.dtype)
        grads = torch.autograd.grad(out, list(leaves.values()), dout)
    assert "attention_fwd" in launched and "attention_bwd_dkdv" in launched, launched
    d = lambda t: None if t is None else t.detach().double().requires_grad_(t.requires_grad)  # noqa: E731
    r = {n: d(t) for n, t in dict(q=q, k=k, v=v, bias=bias, key_bias=key_bias, gate=gate).items()}
    ref = _f64(r["q"], r["k"], r["v"], r["bias"], r["key_bias"], mask, r["gate"], scale, fp32_logits)
    ref_grads = torch.autograd.grad(ref, [r[n] for n in leaves], dout.double())
    errors = {"out": _rel(out, ref)}
    for (name, t), g, rg in zip(leaves.items(), grads, ref_grads):
        assert g.shape == t.shape and g.dtype == t.dtype, (name, g.shape, g.dtype)
        if rg.abs().max() < 1e-10:  # 0 in exact arithmetic (a key bias constant along keys): compare absolutely
            assert not torch.isnan(g).any() and g.abs().max() < tol, (name, g.abs().max())
        else:
            errors["d" + name] = _rel(g, rg)
    bad = {n: e for n, e in errors.items() if not e < tol}
    assert not bad, f"relative errors above {tol}: {bad} (all: {errors})"
    return out, dict(zip(leaves, grads)), launched


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("kb_grad", [False, True])
def test_triangle_shapes_pair_bias_plus_key_bias(dtype, kb_grad):
    # Triangle attention: rows B = N, pair bias [1, H, N, N], key (mask) bias [B, 1, 1, N], gate.
    torch.manual_seed(1 + kb_grad)
    B, H, N, D = 4, 2, 37, 16  # B even: the forward takes row pairs
    q, k, v, gate = (_leaf((B, H, N, D), dtype) for _ in range(4))
    bias = _leaf((1, H, N, N), torch.float32)
    key_bias = _leaf((B, 1, 1, N), torch.float32, grad=kb_grad)
    _, grads, launched = _run(q, k, v, bias=bias, key_bias=key_bias, gate=gate)
    assert ("key_bias" in grads) == kb_grad
    assert "attention_bwd_dbias" in launched


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_msa_row_mask_bias_with_bool_mask_and_fully_masked_rows(dtype):
    # MSA row attention: [S, 1, 1, K] -1e9 key bias + [1, H, Q, K] pair bias + a bool mask that
    # empties some query rows, and rows whose keys are all -1e9 (uniform weights, as the float64 math).
    torch.manual_seed(3)
    S, H, L, D = 3, 2, 61, 8
    q, k, v, gate = (_leaf((S, H, L, D), dtype) for _ in range(4))
    bias = _leaf((1, H, L, L), torch.float32)
    keep = torch.rand(S, L) > 0.3
    keep[1] = False  # every key of MSA row 1 masked by the additive bias alone
    key_bias = (1e9 * (keep.double() - 1)).to(torch.float32)[:, None, None, :].to(DEV).requires_grad_()
    mask = (torch.rand(S, 1, L, 1) > 0.2).to(DEV)  # query rows with no key at all
    mask[0, 0, :5] = False
    out, _, _ = _run(q, k, v, bias=bias, key_bias=key_bias, mask=mask, gate=gate, fp32_logits=True)
    assert (out[0, :, :5] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_key_bias_alone_per_head_and_shared_kv_head(dtype):
    # No bias; a per-(row, head) key bias [S, H, 1, K]; one K/V head shared by all query heads
    # (global-column style), Q != K, neither a multiple of the block.
    torch.manual_seed(4)
    S, H, Q, K, D = 3, 3, 29, 45, 8
    q = _leaf((S, H, Q, D), dtype)
    k, v = _leaf((S, 1, K, D), dtype), _leaf((S, 1, K, D), dtype)
    key_bias = _leaf((S, H, 1, K), torch.float32)
    _, grads, launched = _run(q, k, v, key_bias=key_bias)
    assert "attention_bwd_dbias" not in launched and "key_bias" in grads


@pytest.mark.parametrize("kb_shape", [(1, 1, 1, 37), (2, 1, 1, 1, 37), (37,), (2, 3, 2, 1, 1), (3, 1, 1, 37)])
def test_key_bias_broadcast_shapes_and_leading_dims(kb_shape):
    # Two leading dims (2, 3); key biases broadcast over rows, heads, keys, or given as a bare K-vector.
    torch.manual_seed(5)
    H, L, D = 2, 37, 8
    q, k, v = (_leaf((2, 3, H, L, D), torch.float32) for _ in range(3))
    bias = _leaf((3, H, 1, L), torch.float32)  # mixed leading dims: expanded by the wrapper
    key_bias = _leaf(kb_shape, torch.float32)
    _run(q, k, v, bias=bias, key_bias=key_bias, mask=(torch.rand(2, 1, 1, 1, L) > 0.1).to(DEV))


def test_key_bias_fp16_bias_and_odd_rows():
    # fp16 q/k/v, fp16 key bias, odd B (no row pairs), bias per row [B, H, Q, K] (dS stored by dq).
    torch.manual_seed(6)
    B, H, L, D = 3, 2, 37, 8
    q, k, v = (_leaf((B, H, L, D), torch.float16) for _ in range(3))
    bias = _leaf((B, H, L, L), torch.float16)
    key_bias = _leaf((B, 1, 1, L), torch.float16)
    _run(q, k, v, bias=bias, key_bias=key_bias)


def test_reference_takes_key_bias_and_matches_kernel():
    torch.manual_seed(7)
    q, k, v = (torch.randn(2, 2, 13, 8) for _ in range(3))
    bias, kb = torch.randn(1, 2, 13, 13), torch.randn(2, 1, 1, 13)
    ref = attention_reference(q, k, v, bias=bias, key_bias=kb)
    torch.testing.assert_close(ref, attention_reference(q, k, v, bias=bias + kb), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(attention(q, k, v, bias=bias, key_bias=kb), ref, rtol=1e-5, atol=1e-5)


def test_key_bias_errors_name_the_argument():
    q, k, v = (torch.randn(2, 2, 13, 8) for _ in range(3))
    with pytest.raises(ValueError, match="key_bias shape"):
        attention(q, k, v, key_bias=torch.randn(2, 1, 13, 13))  # varies along queries
    with pytest.raises(ValueError, match="key_bias shape"):
        attention(q, k, v, key_bias=torch.randn(2, 1, 1, 12))
    with pytest.raises(TypeError, match="key_bias must be floating"):
        attention(q, k, v, key_bias=torch.ones(2, 1, 1, 13, dtype=torch.bool))
    with pytest.raises(TypeError, match="key_bias must be a tensor"):
        attention(q, k, v, key_bias=1.0)


def test_library_op_takes_key_bias():
    # torch.ops.foldcompile.attention (kernels/ops.py) threads key_bias through: schema, fake
    # implementation and autograd registration, and its gradients against the float64 math.
    import foldcompile.kernels.ops  # noqa: F401

    op = torch.ops.foldcompile.attention.default
    g = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(2, 2, 37, 8, generator=g, requires_grad=True) for _ in range(3))
    bias = torch.randn(1, 2, 37, 37, generator=g, requires_grad=True)
    kb = torch.randn(2, 1, 1, 37, generator=g, requires_grad=True)
    args = (q, k, v, bias, None, None, None, kb)
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    out = op(*args)
    dout = torch.randn(out.shape, generator=g)
    grads = torch.autograd.grad(out, [q, k, v, bias, kb], dout)
    r = [t.detach().double().requires_grad_() for t in (q, k, v, bias, kb)]
    ref = _f64(r[0], r[1], r[2], r[3], r[4], None, None, 8 ** -0.5)
    ref_grads = torch.autograd.grad(ref, r, dout.double())
    assert _rel(out, ref) < 2e-5
    for a, b in zip(grads, ref_grads):
        assert _rel(a, b) < 2e-5


def test_key_bias_with_launches_split_along_rows(monkeypatch):
    # Launches split into row slices (the CUDA grid limit, lowered here): the per-row key bias and
    # its gradient must follow each slice, and the shared pair bias's reduction spans all rows.
    monkeypatch.setattr(attn_mod, "_MAX_GRID_YZ", 4)
    torch.manual_seed(9)
    B, H, L, D = 6, 2, 19, 8
    q, k, v = (_leaf((B, H, L, D), torch.float32) for _ in range(3))
    bias = _leaf((1, H, L, L), torch.float32)
    key_bias = _leaf((B, 1, 1, L), torch.float32)
    _, _, launched = _run(q, k, v, bias=bias, key_bias=key_bias, mask=(torch.rand(B, 1, 1, L) > 0.2).to(DEV))
    assert launched.count("attention_fwd") > 1 and launched.count("attention_bwd_dkdv") > 1, launched
