"""Property tests: fused softmax (scale, bias, mask, any dim) and layer norm against float64
formulations written here, on generated shapes, broadcasts, dtypes and special values.

See property_support.py for the comparison rule (NaN / inf positions exactly, the rest by
relative error). The CI profile (tests/conftest.py, 25 derandomized examples) runs by
default; ``-m slow`` runs the larger sweep.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from foldcompile.kernels import _dispatch
from foldcompile.kernels._dispatch import record_launches
from foldcompile.kernels.layer_norm import layer_norm
from foldcompile.kernels.softmax import softmax
from property_support import (assert_close_special, broadcast_shape, dtypes, finite_upstream, plain_bar, inject,
                              randn, random_mask, seeds, specials)

pytestmark = [pytest.mark.skipif(not (torch.cuda.is_available() or _dispatch.interpreting()),
                                 reason="needs a GPU or TRITON_INTERPRET=1"),
              pytest.mark.filterwarnings("ignore::RuntimeWarning")]  # interpreter: masked lanes compute inf - inf

DEV = "cuda" if torch.cuda.is_available() else "cpu"
SOFTMAX_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
LN_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
INF = float("inf")


# --------------------------------------------------------------------------- softmax


def softmax_truth(x, dim, scale, bias, mask, plain: bool = False):
    """softmax(scale·x + bias) over ``dim``, masked entries left out, in float64 after forming
    the logits in fp32 (the kernel's contract: "adds the bias in fp32", so a row masked only by
    -1e9 biases is uniform, as in the fp32 reference); rows with nothing kept (or only -inf)
    are 0 with 0 gradient, every other row is torch.softmax's (NaN with a NaN or +inf kept).

    ``plain``: the same formulation in x's own dtype, as eager PyTorch would run it (for the
    16-bit error bar)."""
    if plain:
        z = x * (1.0 if scale is None else scale)
        z = z if bias is None else z + bias.to(x.dtype)
    else:
        z = x.float() * (1.0 if scale is None else scale)
        if bias is not None:
            z = z + bias.float()
        z = z.double()
    if mask is not None:
        z = z.masked_fill(~mask, -INF)
    dead = (z == -INF).all(dim, keepdim=True)
    p = torch.softmax(torch.where(dead, torch.zeros_like(z), z), dim)  # no NaN enters dead rows' backward
    return torch.where(dead, torch.zeros_like(p), p)


@st.composite
def softmax_case(draw, dtype_st=dtypes):
    lead = tuple(draw(st.lists(st.integers(1, 6), max_size=3)))
    n = draw(st.integers(1, 40))
    shape = lead + (n,)
    dim = draw(st.sampled_from([-1] + list(range(len(lead)))))
    bias_shape = draw(st.none() | broadcast_shape(shape))
    mask_shape = draw(st.none() | broadcast_shape(shape))
    case = dict(shape=shape, dim=dim, bias_shape=bias_shape, mask_shape=mask_shape,
                scale=draw(st.sampled_from([None, 0.125, 1.7, -0.5])), dtype=draw(dtype_st),
                bias_dtype=draw(st.sampled_from([None, torch.float32, torch.float16])),
                x_specials=draw(specials()), bias_specials=draw(specials(2)),
                dead_row=draw(st.booleans()), seed=draw(seeds))
    if draw(st.booleans()):  # half the cases clean: special values poison whole rows
        case["x_specials"], case["bias_specials"] = [], []
    return case


def check_softmax(case):
    gen = torch.Generator().manual_seed(case["seed"])
    dtype = case["dtype"]
    x = inject(gen, randn(gen, case["shape"], dtype, scale=3.0), case["x_specials"])
    bias = mask = None
    if case["bias_shape"] is not None:
        bias = inject(gen, randn(gen, case["bias_shape"], case["bias_dtype"] or dtype), case["bias_specials"])
    if case["mask_shape"] is not None:
        mask = random_mask(gen, case["mask_shape"])
        if case["dead_row"] and mask.dim() > 0:
            mask.view(-1, mask.shape[-1])[0] = False  # a row (or rows, if broadcast) with nothing kept
    dy = finite_upstream(gen, case["shape"], dtype)
    leaves = [x.to(DEV).requires_grad_()] + ([bias.to(DEV).requires_grad_()] if bias is not None else [])
    with record_launches() as launched:
        y = softmax(leaves[0], case["dim"], scale=case["scale"], bias=leaves[1] if bias is not None else None,
                    mask=None if mask is None else mask.to(DEV))
        grads = torch.autograd.grad(y, leaves, dy.to(DEV))
    assert launched[:1] == ["softmax_fwd"] and "softmax_bwd" in launched, launched
    assert y.dtype == dtype and all(g.dtype == t.dtype for g, t in zip(grads, leaves))
    ref_leaves = [t.detach().cpu().double().requires_grad_() for t in leaves]
    truth = softmax_truth(ref_leaves[0], case["dim"], case["scale"], ref_leaves[1] if bias is not None else None, mask)
    ref_grads = torch.autograd.grad(truth, ref_leaves, dy.double())
    # The plain op's own error in this dtype widens the bar (plain_bar).
    plain_leaves = [t.detach().cpu().clone().requires_grad_() for t in leaves]
    plain = softmax_truth(plain_leaves[0], case["dim"], case["scale"],
                          plain_leaves[1] if bias is not None else None, mask, plain=True)
    plain_grads = torch.autograd.grad(plain, plain_leaves, dy)
    assert_close_special("softmax", y.cpu(), truth, plain_bar(SOFTMAX_TOL[dtype], plain, truth), plain=plain)
    for name, g, rg, pg in zip(("dx", "dbias"), grads, ref_grads, plain_grads):
        # a bias's gradient sums its broadcast copies, and their rounding noise with them
        assert_close_special(name, g.cpu(), rg, plain_bar(SOFTMAX_TOL[g.dtype], pg, rg), floor=0.1,
                             summed_over=max(1, y.numel() // max(g.numel(), 1)), plain=pg)


@given(softmax_case())
def test_softmax_property(case):
    check_softmax(case)


@pytest.mark.slow
@settings(max_examples=300)
@given(softmax_case())
def test_softmax_property_large(case):
    check_softmax(case)


# --------------------------------------------------------------------------- layer norm


@st.composite
def layer_norm_case(draw, dtype_st=dtypes):
    lead = tuple(draw(st.lists(st.integers(1, 7), max_size=3)))
    n = draw(st.integers(1, 40))
    return dict(shape=lead + (n,), dtype=draw(dtype_st), affine=draw(st.sampled_from(["both", "weight", "none"])),
                param_dtype=draw(st.sampled_from([torch.float32, torch.float16])),
                eps=draw(st.sampled_from([1e-5, 1e-3, 0.0])), offset=draw(st.sampled_from([0.0, 3.0, -50.0])),
                x_specials=draw(specials()),
                # No ±inf in the weight: then dx is non-finite in every entry of the row either
                # way, and which entries read NaN rather than ±inf depends on how the sums are
                # arranged (torch's CPU kernel forms dx = a·w·dy + b·x + c); NaN propagates.
                # nor -1e9 (-inf once in an fp16 weight; in fp32 every dx term is 1e9 and cancels).
                w_specials=draw(specials(1, kinds=("nan", "zero"))), seed=draw(seeds),
                clean=draw(st.booleans()))


def check_layer_norm(case):
    gen = torch.Generator().manual_seed(case["seed"])
    dtype, n = case["dtype"], case["shape"][-1]
    x = randn(gen, case["shape"], torch.float64) * 2 + case["offset"]
    x = inject(gen, x.to(dtype), [] if case["clean"] else case["x_specials"])
    w = b = None
    if case["affine"] in ("both", "weight"):
        w = inject(gen, randn(gen, (n,), case["param_dtype"]), [] if case["clean"] else case["w_specials"])
    if case["affine"] == "both":
        b = randn(gen, (n,), case["param_dtype"])
    dy = finite_upstream(gen, case["shape"], dtype)
    leaves = [t.to(DEV).requires_grad_() for t in (x, w, b) if t is not None]
    with record_launches() as launched:
        y = layer_norm(leaves[0], leaves[1] if w is not None else None, leaves[-1] if b is not None else None,
                       case["eps"])
        grads = torch.autograd.grad(y, leaves, dy.to(DEV))
    assert launched[:2] == ["layer_norm_fwd", "layer_norm_bwd"], launched
    ref = [t.detach().cpu().double().requires_grad_() for t in leaves]
    truth = F.layer_norm(ref[0], (n,), ref[1] if w is not None else None, ref[-1] if b is not None else None,
                         case["eps"])
    ref_grads = torch.autograd.grad(truth, ref, dy.double())
    assert_close_special("layer_norm", y.cpu(), truth, LN_TOL[dtype])
    for name, g, rg, t in zip(("dx", "dweight", "dbias"), grads, ref_grads, leaves):
        assert g.dtype == t.dtype
        assert_close_special(name, g.cpu(), rg, LN_TOL[g.dtype], floor=0.1,
                             summed_over=max(1, y.numel() // g.numel()))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 is wrong in the Triton interpreter; CUDA only")
@given(softmax_case(dtype_st=st.just(torch.bfloat16)))
def test_softmax_property_bf16_cuda(case):
    check_softmax(case)


@given(layer_norm_case())
def test_layer_norm_property(case):
    check_layer_norm(case)


@pytest.mark.slow
@settings(max_examples=300)
@given(layer_norm_case())
def test_layer_norm_property_large(case):
    check_layer_norm(case)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 is wrong in the Triton interpreter; CUDA only")
@given(layer_norm_case(dtype_st=st.just(torch.bfloat16)))
def test_layer_norm_property_bf16_cuda(case):
    check_layer_norm(case)
