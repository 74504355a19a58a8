"""The einsum/contraction module (passes/einsum.py): one equation per GEMM-like node, ``...`` and
implicit outputs expanded as torch does, letter roles (what sharding reads), letter sizes and FLOPs."""
from __future__ import annotations

import pytest
import sympy
import torch
import torch.fx as fx

from foldcompile.passes.base import PassError
from foldcompile.passes.einsum import contractions_of, equation_of, expand_equation, parse
from foldcompile.passes.normalize import normalize_pass
from foldcompile.passes.shape_prop import dim_symbol, shape_prop_pass


@pytest.mark.parametrize("eq,shapes", [
    ("ij,jk", [(5, 7), (7, 3)]),
    ("ba,ca", [(5, 7), (3, 7)]),                      # implicit output: once-used letters, sorted
    ("...ij,...jk", [(2, 1, 5, 7), (4, 7, 3)]),       # batch dims broadcast, right-aligned
    ("i...,i...->...", [(5, 2, 3), (5, 3)]),
    ("bhqd,bhkd->bhqk", [(2, 3, 5, 4), (2, 3, 7, 4)]),
    ("ii->i", [(5, 5)]),
])
def test_expanded_equations_compute_what_torch_computes(eq, shapes):
    ops = [torch.randn(*s, dtype=torch.float64) for s in shapes]
    full = expand_equation(eq, [o.dim() for o in ops])
    assert "..." not in full and "->" in full
    torch.testing.assert_close(torch.einsum(full, *ops), torch.einsum(eq, *ops))


def test_letter_roles():
    linear = parse("abc,dc->abd")                      # the weight has no batch letters
    assert (linear.batch, linear.free, linear.contracted) == ("", "abd", "c")
    bmm = parse("abcd,abde->abce")
    assert (bmm.batch, bmm.free, bmm.contracted) == ("ab", "ce", "d")
    outer = parse("si,sj->ij")                         # the outer product mean's sum over sequences
    assert (outer.batch, outer.free, outer.contracted) == ("", "ij", "s")


def test_bad_equations_are_errors():
    with pytest.raises(PassError, match="names 2 operands, got 1"):
        expand_equation("ij,jk->ik", [2])
    with pytest.raises(PassError, match="unknown rank"):
        parse("...ij,jk->...ik")


def test_every_gemm_spelling_gives_one_equation_whose_flops_torch_agrees_with():
    from torch.utils.flop_counter import FlopCounterMode

    def f(x, w, b, q, k, v):
        y = torch.nn.functional.linear(x, w, b)                   # linear with a bias epilogue
        z = x @ w.t()                                              # operator.matmul
        a = torch.bmm(q.flatten(0, 1), k.flatten(0, 1).transpose(1, 2))
        s = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        e = torch.einsum("bhqd,bhkd->bhqk", q, k)
        return y, z, a, s, e

    ex = (torch.randn(5, 7, 4), torch.randn(6, 4), torch.randn(6), torch.randn(2, 3, 5, 8),
          torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 8))
    gm = normalize_pass(fx.symbolic_trace(f)).graph_module
    shape_prop_pass(gm, ex, dims={"N_q": 5, "N_k": 7})
    gemms = [n for n in gm.graph.nodes if "einsum" in n.meta]
    # a symbolic trace has no ranks: normalize keeps '...', expanded once shape propagation knows them
    assert gemms[0].meta["einsum"] == "...k,nk->...n"
    assert [equation_of(n) for n in gemms] == [
        "abc,dc->abd", "abc,cd->abd", "abc,acd->abd", ("able,abse->abls", "abls,absf->ablf"), "bhqd,bhkd->bhqk"]
    values = _values(gm, ex)
    subs = {dim_symbol("N_q"): 5, dim_symbol("N_k"): 7}
    for n in gemms:
        cons, sizes = contractions_of(n)
        ours = int(sympy.Add(*[c.flops(sizes) for c in cons]).subs(subs))
        args, kwargs = fx.node.map_arg((n.args, n.kwargs), lambda a: values[a])
        with FlopCounterMode(display=False) as fc:
            if n.target is torch.nn.functional.scaled_dot_product_attention:  # CPU's fused path is not counted:
                q, k, v = args                                                # its two products
                torch.matmul(torch.matmul(q, k.transpose(-1, -2)).softmax(-1), v)
            else:
                n.target(*args, **kwargs)
        assert ours == fc.get_total_flops() > 0, n.name


def _values(gm: fx.GraphModule, ex: tuple) -> dict:
    """Every node's value on ``ex``."""
    values = dict(zip([n for n in gm.graph.nodes if n.op == "placeholder"], ex))
    for n in gm.graph.nodes:
        if n.op == "call_function":
            args, kwargs = fx.node.map_arg((n.args, n.kwargs), lambda a: values[a])
            values[n] = n.target(*args, **kwargs)
    return values
