"""The registry's op traits (passes/registry.py): every listed name is a real op, each trait finds its ops
in every spelling and no other, and the host-sync fact depends on the arguments where the op's does."""
from __future__ import annotations

import pytest
import torch
import torch.fx

from foldcompile.passes import registry as R

# what each trait held when it was a module-level list of op names (read through op_name) in
# executors/cuda_graph.py, passes/localize.py and passes/merge_chunk_loops.py
MOVED = {R.INDEXED_CREATION: {"arange", "linspace", "logspace", "eye", "tensor", "range"},
         R.SHARDED_DRAW: {"dropout", "bernoulli", "rand", "randn", "rand_like", "randn_like"},
         R.JOINS: {"cat", "concat", "concatenate"},
         R.FRESH_BUFFER: {"new_zeros", "new_empty", "new_ones", "new_full", "zeros", "empty", "ones", "full"}}


@pytest.mark.parametrize("trait", sorted(R._TRAIT_NAMES))
def test_every_name_of_a_trait_is_an_op(trait):
    for name in R._TRAIT_NAMES[trait].split():
        assert R.resolve_name(name) or hasattr(torch.ops.aten, name), f"{trait}: no op called {name!r}"


def _spellings() -> list[torch.fx.Node]:
    g = torch.fx.Graph()
    x = g.placeholder("x")
    nodes = [g.call_function(t, (x,)) for t in R.all_targets()]
    for name in set().union(*MOVED.values()):
        nodes += [g.call_function(t, (x,)) for t in R.resolve_name(name)]
        if hasattr(torch.ops.aten, name):
            packet = getattr(torch.ops.aten, name)
            nodes += [g.call_function(getattr(packet, o), (x,)) for o in packet.overloads()]
    nodes += [g.call_method(m, (x,)) for m in dir(torch.Tensor) if callable(getattr(torch.Tensor, m, None))]
    return nodes


@pytest.mark.parametrize("trait", sorted(MOVED))
def test_a_moved_trait_holds_exactly_the_ops_its_list_named(trait):
    nodes = _spellings()
    found = {R.op_name(n) for n in nodes if R.node_has_trait(n, trait)}
    assert found == MOVED[trait]
    assert all(R.node_has_trait(n, trait) for n in nodes if R.op_name(n) in MOVED[trait])


def test_a_user_function_sharing_an_op_s_name_has_none_of_its_traits():
    def cat(xs):
        return xs

    g = torch.fx.Graph()
    node = g.call_function(cat, (g.placeholder("x"),))
    assert R.op_name(node) == "cat" and not R.node_has_trait(node, R.JOINS)


def test_host_data_positions_are_the_data_arguments():
    assert {f: R.host_data_position(f) for f in (torch.tensor, torch.as_tensor, torch.Tensor.new_tensor)} == \
        {torch.tensor: 0, torch.as_tensor: 0, torch.Tensor.new_tensor: 1}
    assert R.host_data_position(torch.full) is None and R.host_data_position(torch.Tensor.new_zeros) is None


def _reads(fn, *inputs) -> list[str]:
    gm = torch.fx.symbolic_trace(fn)
    if inputs:
        from foldcompile.passes.shape_prop import shape_prop_pass
        shape_prop_pass(gm, inputs)
    return [n.name for n in gm.graph.nodes if R.reads_device_on_host(n)]


def test_host_syncs_that_always_read():
    assert _reads(lambda x: (x.item(), x.tolist(), x.nonzero(), torch.masked_select(x, x > 0), x.unique(),
                             torch.bincount(x, minlength=4), x.cpu(), torch.equal(x, x))) == \
        ["item", "tolist", "nonzero", "masked_select", "unique", "bincount", "cpu", "equal"]
    g = torch.fx.Graph()
    node = g.call_function(torch.ops.aten._local_scalar_dense.default, (g.placeholder("x"),))
    assert R.reads_device_on_host(node)  # what item() is in an ATen graph


def test_repeat_interleave_reads_only_a_tensor_of_repeats_without_an_output_size():
    assert _reads(lambda x: (x.repeat_interleave(2), torch.repeat_interleave(x, repeats=3, dim=0))) == []
    # an argument node counts as a tensor until its meta says otherwise (a false positive costs a CUDA graph)
    by_a_size = lambda x: x.repeat_interleave(x.shape[0], 0)  # noqa: E731
    assert _reads(by_a_size) == ["repeat_interleave"]
    assert _reads(by_a_size, torch.randn(3, 2)) == []
    assert _reads(lambda x, r: x.repeat_interleave(r), torch.randn(3), torch.tensor([1, 0, 2])) == ["repeat_interleave"]
    assert _reads(lambda x, r: (x.repeat_interleave(r), torch.repeat_interleave(r),
                                torch.repeat_interleave(x, r, dim=0, output_size=5))) == \
        ["repeat_interleave", "repeat_interleave_1"]
