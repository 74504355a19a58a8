"""The pass manager: order, stop_after, history snapshots, readable code, compare."""
import operator
from functools import partial

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F

from foldcompile.pass_manager import PassManager, copy_graph_module, max_rel_error
from foldcompile.passes.base import PassError, PassResult
from foldcompile.passes.base import declare
from foldcompile.passes.classify import classify_pass
from foldcompile.passes.normalize import normalize_pass
from foldcompile.passes.shape_prop import shape_prop_pass


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(5, 4))

    def forward(self, z):
        h = F.linear(z, self.w)
        return torch.sigmoid(h) + h


def _inputs():
    return (torch.randn(13, 13, 4, generator=torch.Generator().manual_seed(1)),)


def sigmoid_to_tanh_pass(gm):
    """A deliberately wrong rewrite (sigmoid -> tanh), in place, to see compare catch it."""
    n = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is torch.sigmoid:
            node.target = torch.tanh
            n += 1
    gm.recompile()
    return PassResult(gm, n > 0, {"rewritten": n})


def add_to_torch_add_pass(gm):
    """A correct rewrite: operator.add -> torch.add."""
    n = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is operator.add:
            node.target = torch.add
            n += 1
    gm.recompile()
    return PassResult(gm, n > 0, {"rewritten": n})


def _manager():
    return PassManager([normalize_pass, ("shape_prop", partial(shape_prop_pass, example_inputs=_inputs())),
                        classify_pass, add_to_torch_add_pass, sigmoid_to_tanh_pass])


def test_runs_in_order_and_keeps_every_graph():
    pm = _manager()
    assert pm.names == ["normalize", "shape_prop", "classify", "add_to_torch_add", "sigmoid_to_tanh"]
    captured = fx.symbolic_trace(Block())
    out = pm.run(captured)
    assert list(pm.history) == pm.names
    assert pm.history["classify"].result.record["counts"]["GEMM"] == 1
    assert pm.history["add_to_torch_add"].result.changed is True
    assert pm.history["shape_prop"].result.changed is False
    # each snapshot prints as readable code of its own graph
    assert "torch.sigmoid" in pm.code("add_to_torch_add") and "torch.tanh" in pm.code("sigmoid_to_tanh")
    assert "torch.add" in pm.code("add_to_torch_add") and "torch.add" not in pm.code("classify")
    # later in-place rewrites did not reach earlier snapshots, nor the captured module
    assert "torch.sigmoid" in captured.code and "op_class" not in next(iter(captured.graph.nodes)).meta
    # meta written by a pass travels with the snapshot
    node = next(n for n in pm.history["classify"].graph_module.graph.nodes if n.name == "linear")
    assert node.meta["op_class"] == "GEMM" and pm.history["classify"].graph_module.meta["dims"] == {"N_res": 13}
    assert "torch.tanh" in out.code
    # snapshots share the captured parameters
    assert pm.history["classify"].graph_module.w is captured.w


def test_compare_measures_each_intermediate_graph():
    pm = _manager()
    pm.run(fx.symbolic_trace(Block()))
    errs = pm.compare_all(*_inputs())
    assert errs["shape_prop"] == 0.0 and errs["classify"] == 0.0 and errs["add_to_torch_add"] == 0.0
    assert errs["sigmoid_to_tanh"] > 0.1
    assert pm.compare("sigmoid_to_tanh", *_inputs()) == errs["sigmoid_to_tanh"]


def test_stop_after():
    pm = _manager()
    gm = pm.run(fx.symbolic_trace(Block()), stop_after="classify")
    assert list(pm.history) == ["normalize", "shape_prop", "classify"]
    assert "torch.add" not in gm.code
    with pytest.raises(PassError, match="passes run"):
        pm.compare("sigmoid_to_tanh", *_inputs())
    with pytest.raises(PassError, match="not a pass"):
        pm.run(fx.symbolic_trace(Block()), stop_after="fuse")


def test_bad_passes_are_errors():
    with pytest.raises(PassError, match="two passes"):
        PassManager([classify_pass, ("classify", classify_pass)])
    with pytest.raises(PassError, match="callable"):
        PassManager([("x", 3)])
    pm = PassManager([("broken", lambda gm: gm)])
    with pytest.raises(PassError, match="not a PassResult"):
        pm.run(fx.symbolic_trace(Block()))
    with pytest.raises(PassError, match="GraphModule"):
        PassManager([]).run(Block())


def test_copy_graph_module_is_independent():
    gm = fx.symbolic_trace(Block())
    cp = copy_graph_module(gm)
    next(n for n in cp.graph.nodes if n.target is torch.sigmoid).target = torch.tanh
    cp.recompile()
    assert "torch.sigmoid" in gm.code and "torch.tanh" in cp.code


def test_max_rel_error():
    a = torch.randn(4, 5)
    assert max_rel_error((a, [a]), (a, [a])) == 0.0
    assert max_rel_error(a * 1.01, a) == pytest.approx(0.01, rel=1e-5)
    assert max_rel_error(torch.full((2,), float("nan")), a[0, :2]) == float("inf")
    with pytest.raises(PassError, match="shape"):
        max_rel_error(a, a.T)
    with pytest.raises(PassError, match="structure"):
        max_rel_error((a, a), (a,))


def test_captured_zoo_block_through_normalize_shape_prop_classify():
    from foldcompile.capture import trace
    from foldcompile.models.alphafold2.evoformer import EvoformerBlock
    from foldcompile.passes.normalize import normalize_pass

    torch.manual_seed(0)
    block = EvoformerBlock(c_m=16, c_z=8, c_hidden_msa_att=4, n_heads_msa=2, c_hidden_opm=4, c_hidden_mul=8,
                           c_hidden_pair_att=4, n_heads_pair=2).eval()
    m, z = torch.randn(5, 7, 16), torch.randn(7, 7, 8)
    captured = trace(block, m, z)
    flat = (m, z, None, None, None)  # the graph's placeholders: forward's full signature
    pm = PassManager([normalize_pass, ("shape_prop", partial(shape_prop_pass, example_inputs=flat)), classify_pass])
    pm.run(captured)
    assert pm.compare_all(m, z) == {"normalize": 0.0, "shape_prop": 0.0, "classify": 0.0}
    assert pm.history["shape_prop"].graph_module.meta["dims"] == {"N_seq": 5, "N_res": 7}
    assert pm.history["classify"].result.record["other"] == []
    assert "def forward(self, m, z, msa_mask, pair_mask, chunk_size)" in pm.code("classify")


def test_a_pass_whose_requires_are_missing_is_refused_naming_pass_and_key():
    # classify reads the einsum equations normalize writes: without normalize it must not run
    pm = PassManager([("shape_prop", partial(shape_prop_pass, example_inputs=_inputs())), classify_pass])
    with pytest.raises(PassError, match="pass 'classify' requires node meta 'einsum'"):
        pm.run(fx.symbolic_trace(Block()))
    assert list(pm.history) == ["shape_prop"]  # refused before it ran

    @declare(requires=("op_class",), ensures=("shard",))
    def shard_pass(gm):
        return PassResult(gm, False, {})

    with pytest.raises(PassError, match="pass 'shard' requires node meta 'op_class'"):
        PassManager([normalize_pass, shard_pass]).run(fx.symbolic_trace(Block()))
    # declared through functools.partial, and satisfied by the passes before it
    pm = PassManager([normalize_pass, ("shape_prop", partial(shape_prop_pass, example_inputs=_inputs())),
                      classify_pass, shard_pass])
    gm = pm.run(fx.symbolic_trace(Block()))
    assert set(gm.meta["ensured"]) >= {"einsum", "shape", "sym_shape", "op_class", "cost", "shard"}
