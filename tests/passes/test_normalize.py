"""normalize_pass alone, on small hand-built (symbolic_trace) graphs."""
from __future__ import annotations

import operator

import pytest
import torch
import torch.fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from foldcompile.passes.base import PassError
from foldcompile.passes.normalize import GEMM_TARGETS, gemm_operands, normalize_pass


def _traced(fn_or_module, *example):
    gm = torch.fx.symbolic_trace(fn_or_module)
    ShapeProp(gm).propagate(*example)  # ranks for concrete einsum letters
    return gm


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln = nn.LayerNorm(6)
        self.mlp = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 6))

    def forward(self, x):
        return self.mlp(self.ln(x)).permute(1, 0, 2) @ x.transpose(1, 2).reshape(4, 6, 3)


def test_call_module_is_refused_naming_the_module():
    # one IR level: a graph of modules (a plain symbolic_trace) is not normalized; the capture inlines them
    gm = torch.fx.symbolic_trace(_Net())
    with pytest.raises(PassError, match="calls module 'ln' \\(LayerNorm\\).*foldcompile.trace"):
        normalize_pass(gm)


def test_captured_modules_normalize_to_ops_on_the_same_parameters():
    from foldcompile.capture import trace

    torch.manual_seed(0)
    net, x = _Net(), torch.randn(3, 4, 6)
    gm = normalize_pass(trace(net, x)).graph_module
    assert not any(n.op in ("call_module", "call_method") for n in gm.graph.nodes)
    paths = {n.meta["module_path"] for n in gm.graph.nodes if n.meta.get("einsum") and n.op == "call_function"
             and n.target is torch.nn.functional.linear}
    assert paths == {"mlp.0", "mlp.2"}
    torch.testing.assert_close(gm(x), net(x), rtol=1e-6, atol=0)


def test_methods_become_torch_functions_with_packed_sizes():
    def f(x):
        a = x.permute(2, 0, 1)
        b = x.view(4, -1)
        c = x.reshape(-1)
        d = x.softmax(-1).sum(dim=0)
        e = x.expand(2, 3, 4, 2)
        return a.contiguous(), b, c, d, e, x.size(1), x.masked_fill(x > 0, 0.0)

    x = torch.randn(3, 4, 2)
    gm = _traced(f, x)
    ref = gm(x)
    res = normalize_pass(gm)
    targets = {n.meta.get("normalized_from"): n for n in gm.graph.nodes if n.op == "call_function"}
    assert targets["permute"].target is torch.permute and targets["permute"].args[1] == (2, 0, 1)
    assert targets["view"].target is torch.Tensor.view and targets["view"].args[1] == (4, -1)
    assert targets["reshape"].args[1] == (-1,)
    assert targets["softmax"].target is torch.softmax and targets["sum"].target is torch.sum
    assert targets["contiguous"].target is torch.Tensor.contiguous
    assert targets["size"].target is torch.Tensor.size
    assert targets["masked_fill"].target is torch.masked_fill
    assert res.record["methods_to_functions"]["permute"] == 1
    for a, b in zip(gm(x), ref):
        if isinstance(a, torch.Tensor):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        else:
            assert a == b


@pytest.mark.parametrize("sa,sb", [
    ((5,), (5,)), ((5,), (5, 3)), ((4, 5), (5,)), ((4, 5), (5, 3)),
    ((2, 4, 5), (5, 3)), ((4, 5), (2, 5, 3)), ((2, 1, 4, 5), (3, 5, 6)), ((2, 3, 4, 5), (2, 3, 5, 6)),
])
def test_matmul_equations_reproduce_matmul(sa, sb):
    a, b = torch.randn(*sa), torch.randn(*sb)
    gm = _traced(lambda a, b: a @ b, a, b)
    res = normalize_pass(gm)
    (node,) = [n for n in gm.graph.nodes if n.op == "call_function"]
    assert node.target is torch.matmul and res.record["operators_to_functions"] == {"matmul": 1}
    torch.testing.assert_close(torch.einsum(node.meta["einsum"], a, b), a @ b)


def test_gemm_equations_for_linear_bmm_addmm_einsum():
    def f(x, w, b3, c3, m, n, bias):
        return (
            torch.nn.functional.linear(x, w),
            torch.bmm(b3, c3),
            torch.addmm(bias, m, n),
            torch.einsum("...ik,...jk", b3, b3),
            torch.einsum("bij, bjk -> bik", b3, c3),
        )

    args = (torch.randn(2, 3, 4, 5), torch.randn(7, 5), torch.randn(2, 3, 4), torch.randn(2, 4, 6),
            torch.randn(3, 4), torch.randn(4, 6), torch.randn(6))
    gm = _traced(f, *args)
    res = normalize_pass(gm)
    assert res.record["gemms"] == {"linear": 1, "bmm": 1, "addmm": 1, "einsum": 2}
    gemms = [n for n in gm.graph.nodes if n.target in GEMM_TARGETS]
    eqs = [n.meta["einsum"] for n in gemms]
    assert eqs[0] == "abcd,ed->abce"
    assert eqs[1] == "abc,acd->abd" and eqs[2] == "ab,bc->ac"
    assert eqs[3] == "aik,ajk->aij"  # implicit output made explicit, '...' expanded
    assert eqs[4] == "bij,bjk->bik"
    env = dict(zip([n for n in gm.graph.nodes if n.op == "placeholder"], args))
    for n in gemms:
        ops = [env[o] for o in gemm_operands(n)]
        want = n.target(*[env.get(a, a) for a in n.args])
        if n.target is torch.addmm:
            want = want - env[n.args[0]]
        torch.testing.assert_close(torch.einsum(n.meta["einsum"], *ops), want)


def test_rank_unknown_keeps_ellipsis_and_pass_is_idempotent():
    gm = torch.fx.symbolic_trace(lambda x, w: torch.nn.functional.linear(x, w) @ x.transpose(-1, -2))
    res = normalize_pass(gm)  # no shape propagation: ranks unknown
    lin, mm = [n for n in gm.graph.nodes if n.target in GEMM_TARGETS]
    assert lin.meta["einsum"] == "...k,nk->...n" and mm.meta["einsum"] == "...ij,...jk->...ik"
    assert res.changed
    again = normalize_pass(gm)
    assert not again.changed and again.record["gemms"] == {"linear": 1, "matmul": 1}


def test_operator_arithmetic_is_kept():
    gm = _traced(lambda x: 1 - x * 2, torch.randn(3))
    res = normalize_pass(gm)
    assert {n.target for n in gm.graph.nodes if n.op == "call_function"} == {operator.sub, operator.mul}
    assert not res.changed


def test_bad_graphs_raise_naming_the_node():
    g = torch.fx.Graph()
    x = g.placeholder("x")
    y = g.call_method("no_such_method", (x,))
    g.output(y)
    with pytest.raises(PassError, match="no_such_method"):
        normalize_pass(torch.fx.GraphModule(nn.Module(), g))

    g = torch.fx.Graph()
    x = g.placeholder("x")
    eq = g.placeholder("eq")
    g.output(g.call_function(torch.einsum, (eq, x, x)))
    with pytest.raises(PassError, match="not a constant string"):
        normalize_pass(torch.fx.GraphModule(nn.Module(), g))


def test_parameters_are_named_after_the_model_attribute_paths():
    import foldcompile
    from foldcompile.models import zoo

    block, inputs = zoo.get("evoformer_block")
    result = normalize_pass(foldcompile.trace(block, *inputs))
    gm = result.graph_module
    params = [n for n in gm.graph.nodes if n.op == "get_attr"]
    assert params and all(n.name.startswith(n.target.replace(".", "_")) for n in params)
    assert "l__self" not in gm.code
    assert result.record["parameters_renamed"]["get_attr"] == len(params)
    assert normalize_pass(gm).changed is False
