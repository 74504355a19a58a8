"""Property test: the fused outer product mean against a float64 formulation written here, on
generated shapes (none a power of two unless drawn so), masks with residues no sequence keeps,
eps 0 (a zero count divides by 0, as in eager), both bias placements, both weight layouts, fp32
and fp16, and special values (NaN, ±inf, -1e9, 0) in a, b and the weight.

See property_support.py for the comparison rule (NaN / inf positions exactly, the rest by
relative error, 16-bit bars no tighter than 3x the plain op's own error). The CI profile
(tests/conftest.py) draws 12 derandomized examples; ``-m slow`` runs the larger sweep.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from foldcompile.kernels import _dispatch
from foldcompile.kernels._dispatch import record_launches
from foldcompile.kernels.outer_product_mean import outer_product_mean
from property_support import assert_close_special, dtypes, finite_upstream, inject, plain_bar, randn, seeds, specials

pytestmark = [pytest.mark.skipif(not (torch.cuda.is_available() or _dispatch.interpreting()),
                                 reason="needs a GPU or TRITON_INTERPRET=1"),
              pytest.mark.filterwarnings("ignore::RuntimeWarning")]

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def opm_truth(a, b, w, bias, mask_a, mask_b, eps, bias_divided, o_dtype=None):
    """``(flatten(Σ_s a_s ⊗ b_s) @ Wᵀ [+ bias]) / (eps + Σ_s m_a m_b)`` in the inputs' dtype.

    ``o_dtype``: round the outer product to it before the projection, as eager PyTorch holds it
    in the input dtype (the kernel does the same); the float64 truth keeps it exact."""
    *lead, S, I, C = a.shape
    J, E = b.shape[-2], b.shape[-1]
    o = torch.einsum("...sic,...sje->...ijce", a, b)
    if o_dtype is not None:
        o = o.to(o_dtype).to(a.dtype)
    p = o.reshape(*lead, I, J, C * E) @ w.reshape(w.shape[0], C * E).T
    if mask_a is None:
        den = torch.full((), eps + S, dtype=a.dtype)
    else:
        den = (eps + torch.einsum("...si,...sj->...ij", mask_a.to(a.dtype), mask_b.to(a.dtype)))[..., None]
    if bias is None:
        return p / den
    return (p + bias) / den if bias_divided else p / den + bias


@st.composite
def opm_case(draw, dtype_st=dtypes):
    return dict(lead=tuple(draw(st.lists(st.integers(1, 2), max_size=1))),
                S=draw(st.integers(1, 6)), I=draw(st.integers(1, 9)), J=draw(st.integers(1, 9)),
                C=draw(st.integers(1, 5)), E=draw(st.integers(1, 5)), Z=draw(st.integers(1, 7)),
                masked=draw(st.booleans()), mask_dtype=draw(st.sampled_from([torch.float32, torch.bool])),
                empty_residue=draw(st.booleans()), eps=draw(st.sampled_from([1e-3, 0.0])),
                bias=draw(st.booleans()), bias_divided=draw(st.booleans()), weight_3d=draw(st.booleans()),
                dtype=draw(dtype_st), seed=draw(seeds),
                a_specials=draw(specials(2)), b_specials=draw(specials(1)), w_specials=draw(specials(1)),
                clean=draw(st.booleans()))


def check_opm(case):
    gen = torch.Generator().manual_seed(case["seed"])
    dtype, lead, S, I, J, C, E, Z = (case[k] for k in ("dtype", "lead", "S", "I", "J", "C", "E", "Z"))
    sp = {k: [] if case["clean"] else case[k] for k in ("a_specials", "b_specials", "w_specials")}
    a = inject(gen, randn(gen, lead + (S, I, C), dtype), sp["a_specials"])
    b = inject(gen, randn(gen, lead + (S, J, E), dtype), sp["b_specials"])
    w = inject(gen, randn(gen, (Z, C * E), dtype, scale=0.5), sp["w_specials"])
    bias = randn(gen, (Z,), dtype) if case["bias"] else None
    mask_a = mask_b = None
    if case["masked"]:
        mask_a, mask_b = (torch.rand(lead + (S, n), generator=gen) < 0.7 for n in (I, J))
        if case["empty_residue"]:
            mask_a[..., 0] = False  # residue 0 of a: no sequence keeps it, the count is 0 for its pairs
        mask_a, mask_b = mask_a.to(case["mask_dtype"]), mask_b.to(case["mask_dtype"])
    w_in = w.reshape(Z, C, E) if case["weight_3d"] else w
    dout = finite_upstream(gen, lead + (I, J, Z), dtype)

    leaves = [t.to(DEV).requires_grad_() for t in (a, b, w_in) + ((bias,) if bias is not None else ())]
    kw = dict(mask_a=None if mask_a is None else mask_a.to(DEV), mask_b=None if mask_b is None else mask_b.to(DEV),
              eps=case["eps"], bias_divided=case["bias_divided"])
    with record_launches() as launched:
        out = outer_product_mean(*leaves[:3], leaves[3] if bias is not None else None, **kw)
        grads = torch.autograd.grad(out, leaves, dout.to(DEV))
    assert launched[:1] == ["opm_fwd"] and "opm_bwd_dw" in launched, launched
    assert out.dtype == dtype and out.shape == lead + (I, J, Z)

    def run(leaf_dtype, o_dtype=None):
        ls = [t.detach().cpu().to(leaf_dtype).requires_grad_() for t in leaves]
        res = opm_truth(ls[0], ls[1], ls[2], ls[3] if bias is not None else None, mask_a, mask_b, case["eps"],
                        case["bias_divided"], o_dtype)
        return res, torch.autograd.grad(res, ls, dout.to(leaf_dtype))

    truth, truth_grads = run(torch.float64)
    # the plain op in the kernel's dtype (o rounded to it too), for the 16-bit bar
    plain, plain_grads = run(dtype, dtype) if dtype != torch.float32 else run(torch.float32)
    assert_close_special("opm", out.cpu(), truth, plain_bar(TOL[dtype], plain, truth), plain=plain)
    names = ("da", "db", "dweight", "dbias")
    for name, g, tg, pg in zip(names, grads, truth_grads, plain_grads):
        assert g.dtype == dtype
        assert_close_special(name, g.cpu(), tg, plain_bar(TOL[dtype], pg, tg), floor=0.1,
                             summed_over=max(1, out.numel() // g.numel()), plain=pg)


@settings(max_examples=max(12, settings().max_examples // 2))
@given(opm_case())
def test_outer_product_mean_property(case):
    check_opm(case)


@pytest.mark.slow
@settings(max_examples=200)
@given(opm_case())
def test_outer_product_mean_property_large(case):
    check_opm(case)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 is wrong in the Triton interpreter; CUDA only")
@given(opm_case(dtype_st=st.just(torch.bfloat16)))
def test_outer_product_mean_property_bf16_cuda(case):
    check_opm(case)
