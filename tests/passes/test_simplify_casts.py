"""simplify_casts_pass alone, on small hand-built graphs: casts that change no value go, rounding casts stay."""
from __future__ import annotations

import pytest
import torch
import torch.fx

from foldcompile.passes import normalize_pass, shape_prop_pass
from foldcompile.passes.registry import cast_target
from foldcompile.passes.simplify_casts import simplify_casts_pass

BF16, FP16, FP32, FP64 = torch.bfloat16, torch.float16, torch.float32, torch.float64


def _prepared(fn, *ex):
    gm = normalize_pass(torch.fx.symbolic_trace(fn)).graph_module
    shape_prop_pass(gm, ex, dims={})
    return gm


def _casts(gm):
    return [n.name for n in gm.graph.nodes if n.op == "call_function" and cast_target(n) is not None]


def _check_same(fn, gm, *ex):
    """The simplified graph computes exactly ``fn``: values and gradients, bit for bit."""
    a = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in ex]
    b = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in ex]
    out_a, out_b = fn(*a), gm(*b)
    assert out_a.dtype == out_b.dtype and torch.equal(out_a, out_b)
    g = torch.randn(out_a.shape).to(out_a.dtype)
    out_a.backward(g)
    out_b.backward(g)
    for ta, tb in zip(a, b):
        if ta.requires_grad:
            assert (ta.grad is None) == (tb.grad is None)
            if ta.grad is not None:
                assert ta.grad.dtype == tb.grad.dtype and torch.equal(ta.grad, tb.grad)


UP = {"float()": lambda t: t.float(), "to(fp32)": lambda t: t.to(torch.float32),
      "to(dtype=fp32)": lambda t: t.to(dtype=torch.float32)}
DOWN = {"bfloat16()": lambda t: t.bfloat16(), "to(bf16)": lambda t: t.to(torch.bfloat16),
        "to(dtype=bf16)": lambda t: t.to(dtype=torch.bfloat16)}


@pytest.mark.parametrize("up", UP)
@pytest.mark.parametrize("down", DOWN)
def test_bf16_through_fp32_and_back_is_removed_in_every_spelling(up, down):
    def f(x, w):
        return torch.sigmoid(DOWN[down](UP[up](x))) * w
    ex = (torch.randn(4, 6).to(BF16), torch.randn(4, 6).to(BF16))
    gm = _prepared(f, *ex)
    res = simplify_casts_pass(gm)
    assert res.changed and res.record["round_trips"] == 1 and res.record["noop_casts"] == 0
    assert _casts(gm) == []
    _check_same(f, gm, *ex)


@pytest.mark.parametrize("route", [(FP16, FP32), (BF16, FP64), (FP32, FP64), (BF16, FP32, FP64), (FP16, FP64, FP32)])
def test_every_exact_widening_route_and_back_is_removed(route):
    narrow, *wide = route

    def f(x):
        y = x
        for d in wide:
            y = y.to(d)
        return y.to(narrow) * 2
    ex = (torch.randn(3, 5).to(narrow),)
    gm = _prepared(f, *ex)
    res = simplify_casts_pass(gm)
    assert res.record["round_trips"] == 1 and _casts(gm) == []
    assert res.record["removed"][0].endswith(f"({' -> '.join(str(d)[6:] for d in (narrow, *wide, narrow))})")
    _check_same(f, gm, *ex)


def test_casts_to_the_dtype_a_tensor_has_are_removed():
    def f(x):
        return x.float().to(torch.float32).to(dtype=torch.float32) + x.to(torch.float32, False)
    ex = (torch.randn(3, 4),)
    gm = _prepared(f, *ex)
    res = simplify_casts_pass(gm)
    assert res.record["noop_casts"] == 4 and _casts(gm) == []
    _check_same(f, gm, *ex)


def test_boltz_chunk_of_a_float_cast_cast_back_for_the_einsum():
    # triangular_mult.py: a, b = torch.chunk(x.float(), 2, dim=-1); the einsum under autocast casts both back
    def f(x):
        a, b = torch.chunk(x.float(), 2, dim=-1)
        return torch.einsum("bikd,bjkd->bijd", a.to(BF16), b.to(BF16))
    ex = (torch.randn(1, 5, 5, 8).to(BF16),)
    gm = _prepared(f, *ex)
    res = simplify_casts_pass(gm)
    assert res.record["round_trips"] == 2 and _casts(gm) == []
    chunks = [n for n in gm.graph.nodes if n.target is torch.chunk]
    assert len(chunks) == 1 and chunks[0].args[0].op == "placeholder" and chunks[0].meta["dtype"] == (BF16, BF16)
    _check_same(f, gm, *ex)


def test_element_moves_between_the_casts_are_applied_to_the_narrow_tensor():
    def f(x):
        return x.float().permute(1, 0, 2).reshape(6, 4)[1:].to(BF16).sin()
    ex = (torch.randn(2, 3, 4).to(BF16),)
    gm = _prepared(f, *ex)
    assert simplify_casts_pass(gm).record["round_trips"] == 1 and _casts(gm) == []
    assert all(n.meta["dtype"] == BF16 for n in gm.graph.nodes if n.op == "call_function")
    _check_same(f, gm, *ex)


@pytest.mark.parametrize("fn", [lambda x: (lambda w: w.exp() + w.to(BF16).sigmoid())(x.float()),
                                lambda x: (lambda w: w.to(BF16).sin() * w.to(BF16).cos())(x.float()),
                                lambda x: (lambda c: c[0].to(BF16) * c[0].to(BF16).cos())(x.float().chunk(2, -1))])
def test_a_wide_value_with_other_readers_is_kept(fn):
    # forward-exact, but the readers' gradients are summed in fp32 and rounded to bf16 once in eager; without the
    # casts they would be summed in bf16 (each sum rounded): the backward would differ
    ex = (torch.randn(3, 4).to(BF16),)
    gm = _prepared(fn, *ex)
    res = simplify_casts_pass(gm)
    assert not res.changed and "other readers" in next(iter(res.record["kept"]))


def test_the_pieces_of_a_chunk_are_disjoint_one_may_stay_wide():
    def f(x):
        a, b = torch.chunk(x.float(), 2, dim=-1)
        return a.to(BF16).sigmoid() * b.exp()  # b is read in fp32: the wide chunk stays for it
    ex = (torch.randn(3, 8).to(BF16),)
    gm = _prepared(f, *ex)
    assert simplify_casts_pass(gm).record["round_trips"] == 1
    assert len([n for n in gm.graph.nodes if n.target is torch.chunk]) == 2
    _check_same(f, gm, *ex)


@pytest.mark.parametrize("name,dtype,fn", [
    ("narrowing first (rounds)", FP32, lambda x: x.to(BF16).to(FP32) * 2),
    ("fp16 through bf16 (mantissa)", FP16, lambda x: x.to(BF16).to(FP16) * 2),
    ("bf16 through fp16 (range)", BF16, lambda x: x.to(FP16).to(BF16) * 2),
    ("fp32 through bf16 through fp64", FP32, lambda x: x.to(BF16).to(FP64).to(FP32) * 2),
])
def test_a_round_trip_that_rounds_is_kept(name, dtype, fn):
    ex = (torch.randn(3, 4).to(dtype) * 1e4,)
    gm = _prepared(fn, *ex)
    before = _casts(gm)
    res = simplify_casts_pass(gm)
    assert not res.changed and _casts(gm) == before
    _check_same(fn, gm, *ex)


@pytest.mark.parametrize("fn", [lambda x: x.float().to(BF16, copy=True) * 2,
                                lambda x: x.float().to(torch.bfloat16, False, True) * 2,  # (dtype, non_blocking, copy)
                                lambda x: x.float().to("cpu").to(BF16) * 2])
def test_a_cast_with_a_device_or_a_copy_is_not_a_cast_here(fn):
    ex = (torch.randn(3, 4).to(BF16),)
    gm = _prepared(fn, *ex)
    assert not simplify_casts_pass(gm).changed


def test_a_round_trip_returned_as_an_output_is_kept_with_its_reason():
    # without the casts the output would be the input's own memory (a caller writing into it writes into x)
    def f(x):
        return x.float().to(BF16).view(12)
    ex = (torch.randn(3, 4).to(BF16),)
    gm = _prepared(f, *ex)
    res = simplify_casts_pass(gm)
    assert not res.changed
    assert list(res.record["kept"]) == ["its value is a graph output: without the casts it would be the input's memory"]


def test_a_round_trip_in_a_graph_with_an_in_place_write_is_kept():
    def f(x, y):
        z = x.float().to(BF16)
        y.mul_(2)   # a write whose memory the hand-built graph does not know
        return z * y
    ex = (torch.randn(3, 4).to(BF16), torch.randn(3, 4).to(BF16))
    gm = _prepared(f, *ex)
    res = simplify_casts_pass(gm)
    assert not res.changed and "in-place write" in next(iter(res.record["kept"]))


def test_fuse_pass_runs_it_first_and_records_it():
    from foldcompile.passes import classify_pass, fuse_pass

    def f(x):
        return torch.softmax(x.float().to(BF16) * 3.0, dim=-1)
    ex = (torch.randn(4, 8).to(BF16),)
    gm = _prepared(f, *ex)
    classify_pass(gm)
    record = fuse_pass(gm).record
    assert record["simplify_casts"]["round_trips"] == 1 and _casts(gm) == []


def test_casts_at_the_edge_of_an_autocast_region_are_kept():
    # Boltz's attentionv2: q.float() first inside autocast(enabled=False), o.to(v.dtype) last. Fusion matches within
    # one region; without these no-op casts a match inside would reach across the region's edge
    from foldcompile.capture import trace

    class Region(torch.nn.Module):
        def forward(self, x):
            y = x * 2
            with torch.autocast("cpu", enabled=False):
                z = y.float().sin().float()  # the second .float() is inside: removed
                o = z.to(y.dtype)
            return o + 1
    x = torch.randn(3, 4)
    gm = normalize_pass(trace(Region(), x)).graph_module
    shape_prop_pass(gm, [x], dims={})
    res = simplify_casts_pass(gm)
    assert res.record["noop_casts"] == 1 and res.record["kept"] == {"at the edge of an autocast region": 2}
    assert torch.equal(gm(x), Region()(x))
