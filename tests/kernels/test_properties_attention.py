"""Property tests: flash-style attention (bias, mask, gate, shared K/V head, any scale) against a
float64 formulation written here, on generated shapes, broadcasts, dtypes and special values,
forward and every gradient (dq, dk, dv, dbias, dgate).

See property_support.py for the comparison rule. The CI profile (25 derandomized examples)
runs by default; ``-m slow`` runs the larger sweep.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from foldcompile.kernels import _dispatch
from foldcompile.kernels._dispatch import record_launches
from foldcompile.kernels.attention import attention
from property_support import (assert_close_special, broadcast_shape, dtypes, finite_upstream, plain_bar, inject,
                              randn, random_mask, seeds, specials)

pytestmark = [pytest.mark.skipif(not (torch.cuda.is_available() or _dispatch.interpreting()),
                                 reason="needs a GPU or TRITON_INTERPRET=1"),
              pytest.mark.filterwarnings("ignore::RuntimeWarning")]

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}
INF = float("inf")


def attention_truth(q, k, v, bias, mask, gate, scale, plain: bool = False):
    """sigmoid(gate) * softmax(scale q k^T + bias, masked) v in float64, with the logits rounded
    to fp32 once formed (the kernel's contract: logits and bias in fp32, so rows masked only by
    -1e9 biases average v uniformly as the fp32 reference does). A row with nothing kept (or
    only -inf logits) has probabilities 0 and passes no gradient; every other row is
    torch.softmax's. ``plain``: the same in the inputs' own dtype (eager, for the 16-bit bar)."""
    d = q.shape[-1]
    scale = d ** -0.5 if scale is None else scale
    s = q @ k.transpose(-1, -2)
    if plain:
        s = s * scale + (0 if bias is None else bias.to(s.dtype))
    else:
        s = s.float() * scale
        s = (s if bias is None else s + bias.float()).double()
    if mask is not None:
        s = s.masked_fill(~mask, -INF)
    dead = (s == -INF).all(-1, keepdim=True)
    p = torch.softmax(torch.where(dead, torch.zeros_like(s), s), -1)
    p = torch.where(dead, torch.zeros_like(p), p)
    o = p @ v
    return o if gate is None else o * torch.sigmoid(gate)


@st.composite
def attention_case(draw, dtype_st=dtypes):
    lead = tuple(draw(st.lists(st.integers(1, 3), max_size=2)))
    h = draw(st.integers(1, 3))
    lq, lk = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    d = draw(st.sampled_from([8, 12, 16, 24]))
    logits = lead + (h, lq, lk)
    bias_shape = draw(st.none() | broadcast_shape(logits))
    mask_shape = draw(st.none() | broadcast_shape(logits))
    return dict(lead=lead, h=h, lq=lq, lk=lk, d=d, kv_heads=draw(st.sampled_from([h, 1])),
                bias_shape=bias_shape, mask_shape=mask_shape, gate=draw(st.booleans()),
                scale=draw(st.sampled_from([None, 0.3, -0.2])), dtype=draw(dtype_st),
                bias_dtype=draw(st.sampled_from([torch.float32, torch.float16])),
                # -1e9 is a masking bias: only the bias gets it (in q, k or v its products make
                # every mathematically-0 gradient the noise of terms of size 1e9).
                specials={n: draw(specials(2, kinds=("nan", "inf", "-inf", "zero") if n != "bias" else
                                           ("nan", "inf", "-inf", "-1e9", "zero")))
                          for n in ("q", "k", "v", "bias", "gate")},
                clean=draw(st.booleans()), dead_row=draw(st.booleans()), seed=draw(seeds))


def check_attention(case):
    gen = torch.Generator().manual_seed(case["seed"])
    dtype, lead, h, lq, lk, d = (case[n] for n in ("dtype", "lead", "h", "lq", "lk", "d"))
    # Half the cases are clean: special values poison whole rows, and the values elsewhere
    # need checking too.
    sp = case["specials"] if not case["clean"] else {n: [] for n in case["specials"]}
    q = inject(gen, randn(gen, lead + (h, lq, d), dtype), sp["q"])
    k = inject(gen, randn(gen, lead + (case["kv_heads"], lk, d), dtype), sp["k"])
    v = inject(gen, randn(gen, lead + (case["kv_heads"], lk, d), dtype), sp["v"])
    named = {"q": q, "k": k, "v": v}
    if case["bias_shape"] is not None:
        named["bias"] = inject(gen, randn(gen, case["bias_shape"], case["bias_dtype"]), sp["bias"])
    if case["gate"]:
        named["gate"] = inject(gen, randn(gen, lead + (h, lq, d), dtype), sp["gate"])
    mask = None
    if case["mask_shape"] is not None:
        mask = random_mask(gen, case["mask_shape"])
        if case["dead_row"] and mask.dim() > 0:
            mask.view(-1, mask.shape[-1])[0] = False  # query row(s) with nothing to attend to
    dout = finite_upstream(gen, lead + (h, lq, d), dtype)
    leaves = {n: t.to(DEV).requires_grad_() for n, t in named.items()}
    with record_launches() as launched:
        out = attention(leaves["q"], leaves["k"], leaves["v"], bias=leaves.get("bias"),
                        mask=None if mask is None else mask.to(DEV), gate=leaves.get("gate"), scale=case["scale"])
        grads = torch.autograd.grad(out, list(leaves.values()), dout.to(DEV))
    assert "attention_fwd" in launched and "attention_bwd_dq" in launched, launched
    assert out.dtype == dtype and all(g.dtype == t.dtype for g, t in zip(grads, leaves.values()))
    # K/V with one head shared by every query head: the truth broadcasts it explicitly.
    ref = {n: t.detach().cpu().double().requires_grad_() for n, t in leaves.items()}
    truth = attention_truth(ref["q"], ref["k"], ref["v"], ref.get("bias"), mask, ref.get("gate"), case["scale"])
    ref_grads = torch.autograd.grad(truth, list(ref.values()), dout.double())
    # The plain op's own error in this dtype widens the bar (plain_bar).
    pl = {n: t.detach().cpu().clone().requires_grad_() for n, t in leaves.items()}
    plain = attention_truth(pl["q"], pl["k"], pl["v"], pl.get("bias"), mask, pl.get("gate"), case["scale"],
                            plain=True)
    plain_grads = torch.autograd.grad(plain, list(pl.values()), dout)
    assert_close_special("out", out.cpu(), truth, plain_bar(TOL[dtype], plain, truth), plain=plain)
    for name, g, rg, pg in zip(leaves, grads, ref_grads, plain_grads):
        # a gradient summed over broadcast copies (a bias, a shared K/V head) sums their noise too
        copies = (out.numel() // out.shape[-1] * lk) // g.numel() if name == "bias" else h // case["kv_heads"]
        # floor: the size of the terms a 0 gradient's noise comes from. dS = P (dP - delta) with
        # delta = rowsum(dO * O) read from the stored output: in fp16 O's rounding leaves dS
        # ~ 5e-4 |dP| where it is 0 (one key), |dP| ~ sqrt(D) for the values drawn.
        floor = 0.1 if g.dtype == torch.float32 else 0.3
        assert_close_special("d" + name, g.cpu(), rg, plain_bar(TOL[g.dtype], pg, rg), floor=floor,
                             summed_over=max(1, copies) if name in ("bias", "k", "v") else 1, plain=pg)


@given(attention_case())
def test_attention_property(case):
    check_attention(case)


@pytest.mark.slow
@settings(max_examples=200)
@given(attention_case())
def test_attention_property_large(case):
    check_attention(case)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 is wrong in the Triton interpreter; CUDA only")
@given(attention_case(dtype_st=st.just(torch.bfloat16)))
def test_attention_property_bf16_cuda(case):
    check_attention(case)
