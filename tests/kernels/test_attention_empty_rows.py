"""``attention(..., empty_rows=)``: a row whose kept logits are all -inf (a -inf bias or key bias, or a mask
keeping nothing) gives what torch gives, forward and backward, written by the kernels themselves.

``"nan"`` is ``torch.softmax`` of the masked logits (NaN row; NaN dq / dbias at the row's kept entries, NaN
dk at its kept keys, NaN dv at every key); ``"nan_cleaned"`` is ``torch.nan_to_num`` of those weights (0,
the same NaN gradients but none in dv). Compared against that eager spelling on every output and gradient,
with the kernels' own broadcast paths: a bias shared by rows (two rows a program, the dbias reduction
kernel), a full bias (dS stored by the dq kernel), a key bias, a gate, K = 37 (not a block multiple).
"""
import pytest
import torch

from foldcompile.kernels._dispatch import record_launches
from foldcompile.kernels.attention import attention, attention_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
B, H, Q, K, D = 2, 2, 5, 37, 8
SCALE = D ** -0.5


def _case(dtype, layout: str):
    """q, k, v, gate, bias, key_bias, keep with rows emptied by the bias, the key bias and the mask."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, Q, D, generator=g)
    k, v = (torch.randn(B, H, K, D, generator=g) for _ in range(2))
    gate = torch.randn(B, H, Q, D, generator=g)
    if layout == "shared":  # a pair bias shared by the rows, a boolean key mask
        bias = torch.randn(1, H, Q, K, generator=g)
        bias[0, 1, 2] = float("-inf")  # emptied by the bias in every row
        key_bias = None
        keep = torch.rand(B, 1, 1, K, generator=g) > 0.3
        keep[0, ..., 0] = True
        keep[1] = False  # every row of batch 1 keeps nothing
        bias[0, 0, 3, keep[0, 0, 0]] = float("-inf")  # row (0, 0, 3): every kept key -inf, masked ones not
    else:  # a full bias and a key bias mask.log(), no boolean mask
        bias = torch.randn(B, H, Q, K, generator=g)
        bias[1, 0, 4] = float("-inf")
        key_mask = (torch.rand(B, 1, 1, K, generator=g) > 0.3).float()
        key_mask[1] = 0.0  # mask.log(): every row of batch 1 is -inf
        key_mask[0, ..., 0] = 1.0
        key_bias = key_mask.log()
        keep = None
    to = lambda t: None if t is None else (t.to(dtype) if t.is_floating_point() else t).to(DEVICE)  # noqa: E731
    return [to(t) for t in (q, k, v, gate, bias, key_bias)] + [to(keep)]


def _eager(q, k, v, gate, bias, key_bias, keep, mode):
    """The spelling a model writes, in q's dtype: softmax of the masked logits [then nan_to_num]."""
    s = q @ k.transpose(-1, -2) * SCALE + bias + (key_bias if key_bias is not None else 0.0)
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    w = torch.softmax(s, -1)
    if mode == "nan_cleaned":
        w = torch.nan_to_num(w)
    return (w @ v) * torch.sigmoid(gate)


def _run(fn, tensors, dout):
    leaves = [t.detach().clone().requires_grad_() if t is not None and t.is_floating_point() else t
              for t in tensors]
    out = fn(*leaves)
    wrt = [t for t in leaves if t is not None and t.requires_grad]
    return [out] + list(torch.autograd.grad(out, wrt, dout))


def _assert_close(got, want, tol, what):
    assert torch.equal(torch.isnan(got), torch.isnan(want)), f"{what}: NaN positions differ"
    ok = ~torch.isnan(want)
    err = (got[ok].double() - want[ok].double()).norm() / want[ok].double().norm().clamp_min(1e-30)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("layout", ["shared", "full_and_key_bias"])
@pytest.mark.parametrize("mode", ["nan", "nan_cleaned"])
def test_empty_rows_give_torch_s_values_and_gradients(mode, layout, dtype):
    q, k, v, gate, bias, key_bias, keep = _case(dtype, layout)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(dtype).to(DEVICE)
    tensors = (q, k, v, gate, bias, key_bias, keep)
    got = _run(lambda q, k, v, g, b, kb, m: attention(q, k, v, bias=b, key_bias=kb, mask=m, gate=g, scale=SCALE,
                                                      empty_rows=mode), tensors, dout)
    # eager in fp32 on the same (rounded) inputs: fp16 eager would round every step
    up = [t.float() if t is not None and t.is_floating_point() else t for t in tensors]
    want = _run(lambda *a: _eager(*a, mode), up, dout.float())
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for name, a, b in zip(("out", "dq", "dk", "dv", "dgate", "dbias", "dkey_bias"), got, want):
        _assert_close(a.float(), b, tol, name)
    out, dq, dk, dv = got[:4]
    assert torch.isnan(out).any() == (mode == "nan") and torch.isnan(dq).any() and torch.isnan(dk).any()
    assert torch.isnan(dv).any() == (mode == "nan")
    # the plain-PyTorch reference gives the same, in float64
    ref = _run(lambda q, k, v, g, b, kb, m: attention_reference(q, k, v, bias=b, key_bias=kb, mask=m, gate=g,
                                                                scale=SCALE, empty_rows=mode),
               [t.double() if t is not None and t.is_floating_point() else t for t in tensors], dout.double())
    for name, a, b in zip(("out", "dq", "dk", "dv", "dgate", "dbias", "dkey_bias"), ref, want):
        _assert_close(a, b.double(), 1e-5, f"reference {name}")


def test_one_forward_launch_and_other_rows_bit_for_bit_the_zero_mode():
    q, k, v, gate, bias, key_bias, keep = _case(torch.float32, "shared")
    with record_launches() as launched:
        nan = attention(q, k, v, bias=bias, mask=keep, gate=gate, empty_rows="nan")
    assert launched == ["attention_fwd"]
    zero = attention(q, k, v, bias=bias, mask=keep, gate=gate)
    empty = torch.isnan(nan).all(-1)
    assert empty[1].all() and empty[:, 1, 2].all() and empty[0, 0, 3] and empty.sum() == H * Q + 2
    assert not zero[empty].any() and torch.equal(nan[~empty], zero[~empty])
    cleaned = attention(q, k, v, bias=bias, mask=keep, gate=gate, empty_rows="nan_cleaned")
    assert torch.equal(cleaned, zero)  # the same forward values; only the gradients differ


def test_bad_empty_rows_is_refused():
    q, k, v, *_ = _case(torch.float32, "shared")
    for fn in (attention, attention_reference):
        with pytest.raises(ValueError, match="empty_rows must be one of"):
            fn(q, k, v, empty_rows="ones")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the compiled kernels' NaN handling")
@pytest.mark.parametrize("mode", ["nan", "nan_cleaned"])
def test_empty_rows_on_cuda_bf16(mode):
    """The compiled kernels (bf16, autotuned blocks) put NaN in the same places as torch."""
    q, k, v, gate, bias, key_bias, keep = _case(torch.bfloat16, "shared")
    dout = torch.randn(q.shape, device=DEVICE, dtype=torch.bfloat16)
    tensors = (q, k, v, gate, bias, key_bias, keep)
    got = _run(lambda q, k, v, g, b, kb, m: attention(q, k, v, bias=b, mask=m, gate=g, scale=SCALE,
                                                      empty_rows=mode), tensors, dout)
    up = [t.float() if t is not None and t.is_floating_point() else t for t in tensors]
    want = _run(lambda *a: _eager(*a, mode), up, dout.float())
    for name, a, b in zip(("out", "dq", "dk", "dv", "dgate", "dbias"), got, want):
        _assert_close(a.float(), b, 3e-2, name)
