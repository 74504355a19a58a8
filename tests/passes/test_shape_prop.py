"""Symbolic shape propagation: rules op by op, dim inference, ambiguity errors."""
import operator

import pytest
import sympy
import torch
import torch.fx as fx
import torch.nn.functional as F

from foldcompile.passes.base import PassError
from foldcompile.passes.shape_prop import dim_symbol, infer_dims, shape_prop_pass

S, R = dim_symbol("N_seq"), dim_symbol("N_res")


def _by_name(gm):
    return {n.name: n for n in gm.graph.nodes}


def _functional_block(m, z):
    """Zoo-like functional code: every shape computed from the inputs."""
    n_seq, n_res = m.shape[0], m.shape[1]
    q = m.view(n_seq, n_res, 2, -1).permute(2, 0, 1, 3)                      # [2, S, R, c/2]
    opm = torch.einsum("sic,sjd->ijcd", m, m)                                 # [R, R, c, c]
    flat = opm.reshape(n_res, n_res, -1)                                      # [R, R, c*c]
    zz = torch.cat([z, z[:, : n_res // 2]], dim=1)                            # [R, R + R//2, cz]
    padded = F.pad(z, (0, 0, 0, 1))                                           # [R, R+1, cz]
    pairs = z.reshape(-1, z.shape[-1])                                        # [R*R, cz]
    halves = torch.chunk(m, 2, dim=0)                                         # ceil(S/2), rest
    row_sum = m.sum(-1, keepdim=True)                                         # [S, R, 1]
    bias = z.permute(2, 0, 1).unsqueeze(0)                                    # [1, cz, R, R]
    att = torch.matmul(q, q.transpose(-1, -2))                                # [2, S, R, R]
    return q, flat, zz, padded, pairs, halves[1], row_sum, bias, att


def test_symbolic_shapes_through_layout_and_einsum():
    gm = fx.symbolic_trace(_functional_block)
    res = shape_prop_pass(gm, (torch.randn(11, 13, 6), torch.randn(13, 13, 4)))
    assert res.changed is False and res.record["fallback"] == []
    assert res.record["dims"] == {"N_seq": 11, "N_res": 13} == gm.meta["dims"]
    out = [n for n in gm.graph.nodes if n.op == "output"][0]
    syms = out.meta["sym_shape"]
    assert syms[0] == (2, S, R, 3)
    assert syms[1] == (R, R, 36)
    assert syms[2] == (R, R + sympy.floor(R / 2), 4)
    assert syms[3] == (R, R + 1, 4)
    assert syms[4] == (R * R, 4)
    assert syms[5] == (S - sympy.ceiling(S / 2), R, 6)
    assert syms[6] == (S, R, 1)
    assert syms[7] == (1, 4, R, R)
    assert syms[8] == (2, S, R, R)
    nodes = _by_name(gm)
    assert nodes["m"].meta["shape"] == (11, 13, 6) and nodes["m"].meta["dtype"] == torch.float32
    assert nodes["floordiv"].meta["sym_value"] == sympy.floor(R / 2)


def test_same_symbolic_shapes_at_other_example_sizes():
    # the expressions do not depend on the example values they were derived at
    outs = []
    for s, r in [(11, 13), (7, 17)]:
        gm = fx.symbolic_trace(_functional_block)
        shape_prop_pass(gm, (torch.randn(s, r, 6), torch.randn(r, r, 4)))
        outs.append([n.meta["sym_shape"] for n in gm.graph.nodes])
    assert outs[0] == outs[1]


def test_hand_built_graph_with_literal_sizes_and_methods():
    # as a capture that specialised shapes writes it: literal ints, call_method nodes
    g = fx.Graph()
    z = g.placeholder("z")
    w = g.placeholder("w")
    flat = g.call_method("view", (z, 169, 8))                   # [R*R, c]
    lin = g.call_function(F.linear, (flat, w))                  # [R*R, 5]
    back = g.call_method("view", (lin, 13, 13, 5))              # [R, R, 5]
    heads = g.call_function(torch.reshape, (back, (13, 13, 5, 1)))
    t = g.call_function(torch.transpose, (back, 0, 1))
    ex = g.call_method("expand", (g.call_method("unsqueeze", (t, 0)), 3, -1, -1, -1))
    g.output((flat, back, heads, ex))
    gm = fx.GraphModule(torch.nn.Module(), g)
    res = shape_prop_pass(gm, (torch.randn(13, 13, 8), torch.randn(5, 8)), dims={"N_res": 13})
    out = [n for n in gm.graph.nodes if n.op == "output"][0].meta["sym_shape"]
    assert out == ((R**2, 8), (R, R, 5), (R, R, 5, 1), (3, R, R, 5))
    assert res.record["fallback"] == []
    assert _by_name(gm)["view"].meta["aliases_input"] is True


def test_unknown_op_falls_back_by_value_and_is_recorded():
    def mystery(x):
        return x.flip(0)[:, :1].squeeze(1).unsqueeze(0)

    g = fx.Graph()
    z = g.placeholder("z")
    y = g.call_function(mystery, (z,))
    g.output(y)
    gm = fx.GraphModule(torch.nn.Module(), g)
    res = shape_prop_pass(gm, (torch.randn(13, 13, 4),))
    assert [f["node"] for f in res.record["fallback"]] == ["mystery"]
    assert _by_name(gm)["mystery"].meta["sym_shape"] == (1, R, 4)


def test_names_inferred_from_inputs():
    gm = fx.symbolic_trace(lambda msa_mask, pair: pair.sum(-1) + msa_mask[0])
    shape_prop_pass(gm, (torch.randn(5, 9), torch.randn(9, 9, 3)))
    assert gm.meta["dims"] == {"N_seq": 5, "N_res": 9}
    assert infer_dims(gm, (torch.randn(2, 3, 5, 9), torch.randn(2, 9, 9, 3))) == {"N_seq": 5, "N_res": 9}


def test_explicit_dims_name_unnamed_inputs():
    gm = fx.symbolic_trace(lambda a, b: a @ b)
    shape_prop_pass(gm, (torch.randn(13, 8), torch.randn(8, 13)), dims={"N_res": 13})
    assert [n for n in gm.graph.nodes if n.op == "call_function"][0].meta["sym_shape"] == (R, R)


@pytest.mark.parametrize("inputs,dims,match", [
    ((torch.randn(11, 13, 8), torch.randn(13, 13, 13)), None, "channel size 13"),   # N_res == c_z
    ((torch.randn(13, 13, 8), torch.randn(13, 13, 4)), None, "both have example size 13"),  # N_seq == N_res
    ((torch.randn(11, 13, 8), torch.randn(13, 13, 4)), {"N_seq": 11, "N_templ": 11}, "both have example size 11"),
    ((torch.randn(1, 13, 8), torch.randn(13, 13, 4)), None, "size of N_seq is 1"),
    ((torch.randn(11, 13, 8), torch.randn(13, 13, 4)), {"N_res": 12}, "N_res"),
])
def test_ambiguous_sizes_are_errors(inputs, dims, match):
    gm = fx.symbolic_trace(lambda m, z: m.sum() + z.sum())
    with pytest.raises(PassError, match=match):
        shape_prop_pass(gm, inputs, dims=dims)


def test_parameter_size_equal_to_a_dim_is_an_error():
    gm = fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(4, 13)))
    with pytest.raises(PassError, match="parameter"):
        shape_prop_pass(gm, (torch.randn(13, 4),), dims={"N_res": 13})


def test_wrong_number_of_inputs_is_an_error():
    gm = fx.symbolic_trace(lambda m, z: m + z)
    with pytest.raises(PassError, match="2 inputs"):
        shape_prop_pass(gm, (torch.randn(3),))


def test_integer_arithmetic_and_split_sections():
    def f(z):
        n = z.shape[0]
        a, b = torch.split(z, [n - 2, 2], dim=0)
        return a.new_zeros(n * 2, 3), b, torch.stack([z, z], dim=-1), z.flatten(0, 1).unflatten(0, (n, n))

    gm = fx.symbolic_trace(f)
    shape_prop_pass(gm, (torch.randn(13, 13, 4),))
    out = [n for n in gm.graph.nodes if n.op == "output"][0].meta["sym_shape"]
    assert out == ((2 * R, 3), (2, R, 4), (R, R, 4, 2), (R, R, 4))
    assert operator.mul in {n.target for n in gm.graph.nodes}


def test_narrow_to_the_end_and_norms():
    def f(z, chunk: int = 13):
        rows = torch.narrow(z, 0, 0, 13)           # a specialised chunk loop's only chunk: all of N_res
        tail = torch.narrow(z, 1, 3, 10)           # reaches the end: N_res - 3
        mid = torch.narrow(z, 1, 1, 4)             # a constant
        return rows, tail, mid, torch.linalg.vector_norm(z, dim=-1), F.one_hot(z.argmax(-1), 5)

    gm = fx.symbolic_trace(f, concrete_args={"chunk": 13})
    res = shape_prop_pass(gm, (torch.randn(13, 13, 4),))
    out = [n for n in gm.graph.nodes if n.op == "output"][0].meta["sym_shape"]
    assert out == ((R, R, 4), (R, R - 3, 4), (R, 4, 4), (R, R), (R, R, 5))
    assert res.record["fallback"] == []


def _captured_zoo(name, n_seq, n_res):
    import inspect

    from foldcompile.capture import trace
    from foldcompile.models import zoo
    from foldcompile.passes.normalize import normalize_pass

    module, inputs = zoo.get(name, size="tiny", n_seq=n_seq, n_res=n_res)
    module.eval()
    gm = normalize_pass(trace(module, *inputs)).graph_module
    bound = inspect.signature(module.forward).bind(*inputs)
    bound.apply_defaults()
    return gm, list(bound.args) + list(bound.kwargs.values())


@pytest.mark.parametrize("name", ["evoformer_block", "pairformer_block", "structure_module"])
def test_zoo_symbolic_shapes_do_not_depend_on_the_example_sizes(name):
    shapes = []
    for n_seq, n_res in [(5, 11), (7, 13)]:
        gm, flat = _captured_zoo(name, n_seq, n_res)
        res = shape_prop_pass(gm, flat)
        assert res.record["fallback"] == []
        shapes.append([n.meta["sym_shape"] for n in gm.graph.nodes])
    assert shapes[0] == shapes[1]


def test_fake_tensor_propagation_through_kernel_ops_and_a_collective():
    """A graph no process could run as is (a collective, fused-kernel ops), annotated without data."""
    import foldcompile.kernels.ops  # noqa: F401  (torch.ops.foldcompile.*)
    from torch._subclasses.fake_tensor import FakeTensorMode

    from foldcompile.passes.classify import classify_pass
    from foldcompile.passes.normalize import normalize_pass

    K, C = torch.ops.foldcompile, torch.ops._c10d_functional
    g = fx.Graph()
    m = g.placeholder("m")                                                        # [N_seq, N_res, 8]
    ln = g.call_function(K.layer_norm.default, (m, None, None, 1e-5))
    heads = g.call_function(torch.Tensor.view, (ln, (5, 11, 2, 4)))               # literal sizes
    q = g.call_function(torch.permute, (heads, (2, 0, 1, 3)))                     # [2, N_seq, N_res, 4]
    att = g.call_function(K.attention.default, (q, q, q))
    probs = g.call_function(K.softmax.default, (att, -1))
    a2a = g.call_function(C.all_to_all_single.default, (m, [2, 3], [3, 2], "dap"))  # uneven splits
    done = g.call_function(C.wait_tensor.default, (a2a,))
    g.output((probs, done))
    gm = normalize_pass(fx.GraphModule(torch.nn.Module(), g)).graph_module
    with FakeTensorMode() as mode:
        fake_m = mode.from_tensor(torch.empty(5, 11, 8))
    res = shape_prop_pass(gm, (fake_m,))                                          # fake inputs: no data
    assert res.record["fallback"] == [] and res.record["dims"] == {"N_seq": 5, "N_res": 11}
    nodes = _by_name(gm)
    assert nodes["view"].meta["sym_args"] == {1: (S, R, 2, 4)}                   # the literal's meaning
    assert nodes["attention_default"].meta["sym_shape"] == (2, S, R, 4)
    assert nodes["softmax_default"].meta["sym_shape"] == (2, S, R, 4)
    assert nodes["all_to_all_single_default"].meta["sym_shape"] == (S, R, 8)
    rec = classify_pass(gm).record
    cls = {n.name: n.meta["op_class"] for n in gm.graph.nodes}
    assert cls["all_to_all_single_default"] == cls["wait_tensor_default"] == "COMM"
    assert cls["attention_default"] == "GEMM" and cls["layer_norm_default"] == cls["softmax_default"] == "REDUCTION"
    assert nodes["attention_default"].meta["cost"]["flops"] == 2 * 2 * S * R * R * (4 + 4)
    assert rec["other"] == [] and rec["uncosted"] == []


def test_literal_view_sizes_record_their_symbolic_meaning():
    g = fx.Graph()
    z = g.placeholder("z")
    g.output(g.call_function(torch.Tensor.view, (z, (11, 11, 2, -1))))
    gm = fx.GraphModule(torch.nn.Module(), g)
    shape_prop_pass(gm, (torch.randn(11, 11, 8),))
    node = next(n for n in gm.graph.nodes if n.op == "call_function")
    assert node.meta["sym_args"] == {1: (R, R, 2, -1)} and node.meta["sym_shape"] == (R, R, 2, 4)


def test_literal_sizes_of_splits_unflattens_and_narrows_record_their_meaning():
    """The other size-like literals a capture specialises: split sections, unflatten sizes, a
    narrow's length (a rewrite to local sizes reads them in ``meta["sym_args"]``)."""
    g = fx.Graph()
    m, z = g.placeholder("m"), g.placeholder("z")                                   # [N_seq, N_res, 4], [N_res, N_res, 4]
    both = g.call_function(torch.cat, ([m, z], 0))                                  # [N_seq + N_res, N_res, 4]
    parts = g.call_function(torch.split, (both, [5, 11], 0))
    flat = g.call_function(torch.flatten, (m, 0, 1))                                # [N_seq * N_res, 4]
    back = g.call_function(torch.unflatten, (flat, 0, (5, -1)))
    cut = g.call_function(torch.narrow, (z, 1, 0, 11))
    by_one = g.call_function(torch.split, (z, 4, 1))                                # a split by one size: no list
    g.output((parts, back, cut, by_one))
    gm = fx.GraphModule(torch.nn.Module(), g)
    res = shape_prop_pass(gm, (torch.randn(5, 11, 4), torch.randn(11, 11, 4)), fake=True)
    assert res.record["fallback"] == []
    nodes = {n.target: n for n in gm.graph.nodes if n.op == "call_function"}
    split = next(n for n in gm.graph.nodes if n.target is torch.split and isinstance(n.args[1], list))
    assert split.meta["sym_args"] == {1: (S, R)}
    assert nodes[torch.unflatten].meta["sym_args"] == {2: (S, -1)} and nodes[torch.unflatten].meta["sym_shape"] == (S, R, 4)
    assert nodes[torch.narrow].meta["sym_args"] == {3: R}
    assert "sym_args" not in by_one.meta


@pytest.mark.full  # a capture and two propagations
def test_fake_propagation_of_a_captured_block_equals_the_real_one():
    """No data is needed: the zoo block annotated on fake tensors gets the same shapes, symbolic
    shapes and costs as on real ones (so a rewritten graph can be annotated again)."""
    import copy

    from foldcompile.passes.classify import classify_pass

    gm, flat = _captured_zoo("evoformer_block", 5, 11)
    fake_gm = copy.deepcopy(gm)
    real = shape_prop_pass(gm, flat)
    fake = shape_prop_pass(fake_gm, flat, fake=True)
    assert real.record == fake.record
    classify_pass(gm)
    classify_pass(fake_gm)
    keys = ("shape", "sym_shape", "dtype", "sym_args", "op_class", "cost", "aliases_input")
    assert [[n.meta.get(k) for k in keys] for n in gm.graph.nodes] == \
        [[n.meta.get(k) for k in keys] for n in fake_gm.graph.nodes]
