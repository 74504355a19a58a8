"""Op classification and the symbolic cost model."""
import pytest
import sympy
import torch
import torch.fx as fx
import torch.nn.functional as F

from foldcompile.passes.base import PassError
from foldcompile.passes.classify import check_flops_against_flop_counter, classify_pass
from foldcompile.passes.cost_model import cost_totals
from foldcompile.passes.normalize import normalize_pass
from foldcompile.passes.shape_prop import dim_symbol, shape_prop_pass

S, R = dim_symbol("N_seq"), dim_symbol("N_res")


class TinyRowAttention(torch.nn.Module):
    """Zoo-like MSA row attention with pair bias and gating, written functionally."""

    def __init__(self, c_m=6, c_z=4, heads=2, c=3):
        super().__init__()
        self.heads, self.c = heads, c
        self.ln_w = torch.nn.Parameter(torch.randn(c_m))
        self.ln_b = torch.nn.Parameter(torch.randn(c_m))
        self.w_qkv = torch.nn.Parameter(torch.randn(3 * heads * c, c_m) * 0.3)
        self.w_b = torch.nn.Parameter(torch.randn(heads, c_z) * 0.3)
        self.w_g = torch.nn.Parameter(torch.randn(heads * c, c_m) * 0.3)
        self.b_g = torch.nn.Parameter(torch.randn(heads * c))
        self.w_o = torch.nn.Parameter(torch.randn(c_m, heads * c) * 0.3)
        self.b_o = torch.nn.Parameter(torch.randn(c_m))

    def forward(self, m, z, msa_mask):
        s, r = m.shape[0], m.shape[1]
        x = F.layer_norm(m, (m.shape[-1],), self.ln_w, self.ln_b)
        qkv = F.linear(x, self.w_qkv).view(s, r, 3, self.heads, self.c)
        q, k, v = qkv.unbind(2)
        bias = torch.einsum("ijc,hc->hij", z, self.w_b)
        logits = torch.einsum("sihc,sjhc->shij", q, k) * (self.c ** -0.5) + bias
        logits = logits.masked_fill(msa_mask[:, None, None, :] == 0, -1e9)
        a = torch.softmax(logits, dim=-1)
        o = torch.einsum("shij,sjhc->sihc", a, v).reshape(s, r, -1)
        g = torch.sigmoid(F.linear(x, self.w_g, self.b_g))
        count = torch.einsum("si,sj->ij", msa_mask, msa_mask)  # a mask-only product
        return m + F.linear(g * o, self.w_o, self.b_o), count


def _inputs(s=11, r=13):
    g = torch.Generator().manual_seed(0)
    mask = (torch.rand(s, r, generator=g) > 0.2).float()
    return torch.randn(s, r, 6, generator=g), torch.randn(r, r, 4, generator=g), mask


def _prepared(module, inputs, dims=None):
    gm = normalize_pass(fx.symbolic_trace(module)).graph_module
    shape_prop_pass(gm, inputs, dims=dims)
    res = classify_pass(gm)
    return gm, res


def _node(gm, name):
    return next(n for n in gm.graph.nodes if n.name == name)


def test_classes_and_costs_of_a_zoo_like_module():
    gm, res = _prepared(TinyRowAttention(), _inputs())
    assert res.changed is False
    cls = {n.name: n.meta["op_class"] for n in gm.graph.nodes}
    assert cls["m"] == "INPUT" and cls["ln_w"] == "INPUT" and cls["output"] == "OUTPUT"
    assert cls["layer_norm"] == "REDUCTION" and cls["softmax"] == "REDUCTION"
    assert cls["linear"] == "GEMM" and cls["einsum"] == "GEMM" and cls["einsum_1"] == "GEMM"
    assert cls["sigmoid"] == "ELEMENTWISE" and cls["masked_fill"] == "ELEMENTWISE" and cls["add"] == "ELEMENTWISE"
    assert cls["view"] == "LAYOUT" and cls["unbind"] == "LAYOUT" and cls["getitem"] == "LAYOUT"
    assert cls["einsum_3"] == "REDUCTION" and res.record["mask_products"] == ["einsum_3"]
    assert res.record["other"] == []
    # linear: 2 * rows * in * out, bias apart
    assert _node(gm, "linear").meta["cost"]["flops"] == 2 * S * R * 6 * 18
    assert _node(gm, "linear_1").meta["cost"]["bias_flops"] == S * R * 6
    assert "bias_flops" not in _node(gm, "linear").meta["cost"]
    # QK^T: 2 * s * h * i * j * c
    assert _node(gm, "einsum_1").meta["cost"]["flops"] == 2 * S * 2 * R * R * 3
    # bytes: inputs + output, fp32
    assert _node(gm, "softmax").meta["cost"]["bytes"] == 2 * (4 * S * 2 * R * R)
    assert _node(gm, "softmax").meta["cost"]["flops"] == 5 * S * 2 * R * R
    assert _node(gm, "view").meta["cost"]["bytes"] == 0  # a view moves nothing
    assert _node(gm, "sigmoid").meta["cost"]["flops"] == S * R * 6


@pytest.mark.parametrize("fn,inputs", [
    (lambda a, b: torch.matmul(a, b), (torch.randn(3, 1, 5, 7), torch.randn(4, 7, 2))),  # broadcast batch
    (lambda a, b: a @ b.transpose(-1, -2), (torch.randn(5, 7), torch.randn(3, 7))),
    (lambda a, b: torch.bmm(a, b), (torch.randn(3, 5, 7), torch.randn(3, 7, 2))),
    (lambda c, a, b: torch.addmm(c, a, b), (torch.randn(5, 2), torch.randn(5, 7), torch.randn(7, 2))),
    (lambda a, b, c: torch.einsum("ij,jk,kl->il", a, b, c), (torch.randn(3, 5), torch.randn(5, 7), torch.randn(7, 2))),
    (lambda a, b: torch.einsum("...ik,...jk->...ij", a, b), (torch.randn(2, 3, 5, 4), torch.randn(3, 6, 4))),
    (lambda x, w, b: F.linear(x, w, b), (torch.randn(2, 3, 5), torch.randn(7, 5), torch.randn(7))),
    (lambda q, k, v: F.scaled_dot_product_attention(q, k, v), (torch.randn(2, 5, 4), torch.randn(2, 6, 4),
                                                              torch.randn(2, 6, 3))),
])
def test_gemm_flops_match_flop_counter(fn, inputs):
    gm = normalize_pass(fx.symbolic_trace(fn)).graph_module
    shape_prop_pass(gm, inputs)
    classify_pass(gm)
    # (a method call such as .transpose is a call_function after normalize: a LAYOUT node)
    assert [n.meta["op_class"] for n in gm.graph.nodes
            if n.op == "call_function" and n.meta["op_class"] != "LAYOUT"] == ["GEMM"]
    assert check_flops_against_flop_counter(gm, inputs) == []


def test_matrix_vector_flops_are_counted_though_flop_counter_misses_them():
    # torch.matmul(matrix, vector) runs aten.mv, which FlopCounterMode does not count:
    # the cost model still counts 2*M*K, and the checker reports the disagreement.
    gm = normalize_pass(fx.symbolic_trace(lambda v, a: torch.matmul(a, v))).graph_module
    inputs = (torch.randn(7), torch.randn(5, 7))
    shape_prop_pass(gm, inputs)
    classify_pass(gm)
    assert [n.meta["cost"]["flops"] for n in gm.graph.nodes if n.op == "call_function"] == [70]
    assert [(b.expected, b.counted) for b in check_flops_against_flop_counter(gm, inputs)] == [(70, 0)]


def test_flop_counter_check_on_captured_modules_and_masks():
    from foldcompile.capture import trace

    gm, _ = _prepared(TinyRowAttention(), _inputs())
    assert check_flops_against_flop_counter(gm, _inputs()) == []
    seq = torch.nn.Sequential(torch.nn.LayerNorm(5), torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3))
    x = torch.randn(4, 13, 5)
    gm2 = normalize_pass(trace(seq, x)).graph_module  # the capture inlines the modules into ops
    shape_prop_pass(gm2, (x,), dims={"N_res": 13})
    classify_pass(gm2)
    assert [n.meta["op_class"] for n in gm2.graph.nodes if n.op == "call_function"] == \
        ["REDUCTION", "GEMM", "ELEMENTWISE", "GEMM"]
    assert check_flops_against_flop_counter(gm2, (x,)) == []


def test_call_module_nodes_are_refused_naming_the_module():
    seq = torch.nn.Sequential(torch.nn.Linear(5, 7))
    with pytest.raises(PassError, match="module '0' \\(Linear\\)"):
        normalize_pass(fx.symbolic_trace(seq))
    with pytest.raises(PassError, match="calls module '0' \\(Linear\\)"):
        shape_prop_pass(fx.symbolic_trace(seq), (torch.randn(3, 5),))


def test_flop_checker_reports_a_wrong_cost():
    gm, _ = _prepared(TinyRowAttention(), _inputs())
    node = _node(gm, "einsum_2")
    node.meta["cost"]["product_flops"] = node.meta["cost"]["flops"] = node.meta["cost"]["flops"] / 2
    bad = check_flops_against_flop_counter(gm, _inputs())
    assert [(b.node, b.op_class) for b in bad] == [("einsum_2", "GEMM")]
    assert bad[0].counted == 2 * bad[0].expected


def test_unknown_op_is_other_with_bytes_and_recorded():
    def mystery(x):
        return x.flip(0)

    g = fx.Graph()
    z = g.placeholder("z")
    g.output(g.call_function(mystery, (z,)))
    gm = fx.GraphModule(torch.nn.Module(), g)
    shape_prop_pass(gm, (torch.randn(13, 13, 4),))
    res = classify_pass(gm)
    node = _node(gm, "mystery")
    assert node.meta["op_class"] == "OTHER" and res.record["other"] == [{"node": "mystery", "op": "mystery"}]
    assert res.record["uncosted"] == [{"node": "mystery", "op": "mystery"}]  # named, not silently 0
    assert node.meta["cost"] == {"flops": 0, "bytes": 2 * 4 * R * R * 4}


def test_classify_needs_shapes():
    gm = fx.symbolic_trace(lambda a: a + 1)
    with pytest.raises(PassError, match="shape_prop_pass"):
        classify_pass(gm)


def test_totals_by_class_module_and_other_sizes():
    gm, _ = _prepared(TinyRowAttention(), _inputs())
    for n in gm.graph.nodes:  # as the capture front end attributes nodes
        n.meta["module_path"] = "blocks.0.att.gate" if n.name in ("linear_1", "sigmoid") else "blocks.0.att"
    totals = cost_totals(gm)
    by_class = totals.by_class()
    gemm_nodes = [n for n in gm.graph.nodes if n.meta.get("op_class") == "GEMM"]
    assert by_class["GEMM"]["count"] == len(gemm_nodes) == 6
    assert by_class["GEMM"]["flops"] == sympy.expand(sum(n.meta["cost"]["flops"] for n in gemm_nodes))
    gate = totals.module("blocks.0.att.gate")
    assert gate["GEMM"]["count"] == 1 and gate["ELEMENTWISE"]["count"] == 1
    assert totals.module("blocks.0")["GEMM"]["count"] == 6
    assert set(totals.by_module(depth=2)) == {"blocks.0"}
    at = totals.evaluate(N_seq=128, N_res=256)
    subs = {S: 128, R: 256}
    assert at["classes"]["GEMM"]["flops"] == int(by_class["GEMM"]["flops"].subs(subs))
    assert at["classes"]["GEMM"]["intensity"] == pytest.approx(
        at["classes"]["GEMM"]["flops"] / at["classes"]["GEMM"]["bytes"])
    # at the captured sizes the totals equal the concrete per-node sum
    here = totals.evaluate()
    assert here["total"]["flops"] == sum(int(sympy.sympify(n.meta["cost"]["flops"]).subs({S: 11, R: 13}))
                                         for n in gm.graph.nodes if n.meta["op_class"] not in ("INPUT", "OUTPUT"))
    with pytest.raises(PassError, match="unknown dims"):
        totals.evaluate(N_templ=4)


def test_totals_refuse_guarded_dims():
    gm, _ = _prepared(TinyRowAttention(), _inputs())
    gm.meta["guarded_dims"] = {"N_res"}
    totals = cost_totals(gm)
    assert totals.evaluate(N_seq=64, N_res=13)["dims"] == {"N_seq": 64, "N_res": 13}
    with pytest.raises(PassError, match="depends on N_res"):
        totals.evaluate(N_res=256)


def test_af2_evoformer_gemm_flops_at_af2_sizes():
    """The issue's check: AF2 dims, captured at N_seq=11, N_res=13 (distinct from every channel)."""
    from foldcompile.capture import trace
    from foldcompile.models.alphafold2.evoformer import EvoformerBlock
    from foldcompile.passes.normalize import normalize_pass

    torch.manual_seed(0)
    block = EvoformerBlock(c_m=256, c_z=128, c_hidden_msa_att=32, n_heads_msa=8, c_hidden_opm=32,
                           c_hidden_mul=128, c_hidden_pair_att=32, n_heads_pair=4).eval()
    m, z = torch.randn(11, 13, 256), torch.randn(13, 13, 128)
    gm = normalize_pass(trace(block, m, z)).graph_module
    inputs = (m, z) + tuple(n.args[0] if n.args else None for n in gm.graph.nodes if n.op == "placeholder")[2:]
    res = shape_prop_pass(gm, inputs)
    assert res.record["dims"] == {"N_seq": 11, "N_res": 13} and res.record["fallback"] == []
    rec = classify_pass(gm).record
    assert rec["other"] == []
    assert check_flops_against_flop_counter(gm, inputs) == []
    totals = cost_totals(gm)
    assert round(totals.evaluate(N_seq=128, N_res=256)["classes"]["GEMM"]["flops"] / 1e9, 2) == 216.09
    assert round(totals.evaluate(N_seq=128, N_res=1024)["classes"]["GEMM"]["flops"] / 1e9, 2) == 3702.26
    assert "tri_att_start" in totals.by_module(depth=1)


@pytest.mark.parametrize("name", ["evoformer_stack", "extra_msa_stack", "template_pair_stack", "pairformer_block",
                                  "structure_module"])
def test_zoo_gemm_flops_match_flop_counter(name):
    import inspect

    from foldcompile.capture import trace
    from foldcompile.models import zoo
    from foldcompile.passes.normalize import normalize_pass

    module, inputs = zoo.get(name, size="tiny")
    module.eval()
    gm = normalize_pass(trace(module, *inputs)).graph_module
    bound = inspect.signature(module.forward).bind(*inputs)
    bound.apply_defaults()
    flat = list(bound.args) + list(bound.kwargs.values())
    shape_prop_pass(gm, flat)
    rec = classify_pass(gm).record
    assert rec["counts"]["GEMM"] > 10 and rec["other"] == []
    assert check_flops_against_flop_counter(gm, flat) == []


# ---------------------------------------------------------------- defects fixed with the op registry


def test_op_name_of_torch_ops_overloads_names_the_op():
    from foldcompile.passes.registry import op_name

    g = fx.Graph()
    x = g.placeholder("x")
    add = g.call_function(torch.ops.aten.add.Tensor, (x, x))
    a2a = g.call_function(torch.ops._c10d_functional.all_to_all_single.default, (x, [2], [2], "g"))
    other = g.call_function(torch.ops._c10d_functional.all_gather_into_tensor_coalesced.default, ([x], 2, "g"))
    assert (op_name(add), op_name(a2a), op_name(other)) == \
        ("add", "all_to_all_single", "_c10d_functional.all_gather_into_tensor_coalesced")


def test_broadcast_to_is_layout_not_a_collective():
    gm, res = _prepared(lambda z: torch.broadcast_to(z[:, :1], (13, 13, 4)), (torch.randn(13, 13, 4),))
    node = _node(gm, "broadcast_to")
    assert node.meta["op_class"] == "LAYOUT" and res.record["counts"].get("COMM", 0) == 0


def test_masks_are_recognised_by_use_not_by_name():
    """Renaming the mask argument changes no class and no number."""
    import inspect

    class Renamed(TinyRowAttention):
        def forward(self, m, z, keep):  # the same code with the mask called `keep`
            return super().forward(m, z, keep)

    from foldcompile.capture import trace

    graphs = []
    for module in (TinyRowAttention(), Renamed()):
        gm = normalize_pass(trace(module, *_inputs())).graph_module
        shape_prop_pass(gm, _inputs())
        graphs.append((gm, classify_pass(gm).record))
    (base, rec_base), (renamed, rec) = graphs
    assert rec["mask_products"] == rec_base["mask_products"] != []
    assert "keep" in [n.name for n in renamed.graph.nodes if n.op == "placeholder"][2] \
        and "keep" in inspect.signature(Renamed.forward).parameters
    assert [(n.meta["op_class"], n.meta["cost"]) for n in base.graph.nodes] == \
        [(n.meta["op_class"], n.meta["cost"]) for n in renamed.graph.nodes]


def test_uncosted_ops_are_named_in_the_record_and_in_explain():
    from foldcompile.explain import explain_graph

    def f(m):
        return torch.cdist(m, m).sum() + torch.linalg.norm(m)

    report = explain_graph(fx.symbolic_trace(f), (torch.randn(11, 13, 4),))
    rec = report.passes["classify"]["record"]
    assert sorted(u["op"] for u in rec["uncosted"]) == ["cdist", "linalg_norm"]
    assert report.uncosted() == {"cdist": ["cdist"], "linalg_norm": ["linalg_norm"]}
    assert "un-costed ops" in str(report) and "cdist (1 node: cdist)" in str(report)
