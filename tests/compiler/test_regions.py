"""Identical blocks captured once (foldcompile/regions.py): the graph is the whole-model capture's, with
each block's own parameters, paths and names, and near misses never share a region."""
from __future__ import annotations

import logging
import os
import sys

import pytest
import torch
import torch.nn as nn

from foldcompile import regions
from foldcompile.capture import CaptureError, regions_disabled, trace
from foldcompile.guards import GuardError
from foldcompile.models import zoo

sys.path.insert(0, os.path.dirname(__file__))
import region_blocks  # noqa: E402  (a block in a module of its own)

N_SEQ, N_RES = 3, 5


def _ops(gm: torch.fx.GraphModule) -> list[tuple]:
    return [(n.op, n.target if n.op != "get_attr" else str(n.target), n.meta.get("module_path"))
            for n in gm.graph.nodes]


def _members(gm: torch.fx.GraphModule) -> dict[str, int]:
    """Block path -> the region it was stamped from."""
    return {path: r["id"] for r in gm.meta.get("regions", []) for path in r["members"]}


# ---------------------------------------------------------------- the 48-block Evoformer stack


@pytest.fixture(scope="module")
def stack48():
    model, inputs = zoo.get("evoformer_stack", n_blocks=48, n_seq=N_SEQ, n_res=N_RES)
    return model, inputs, trace(model, *inputs)


def test_48_blocks_are_two_regions_stamped_out_with_their_own_parameters(stack48):
    model, inputs, gm = stack48
    found = gm.meta["regions"]
    # block 0 reads inputs that do not require grad, the 47 others read their predecessor's outputs
    assert [len(r["members"]) for r in found] == [1, 47]
    assert _members(gm)["blocks.0"] != _members(gm)["blocks.47"]
    params = dict(model.named_parameters())
    targets = [str(n.target) for n in gm.graph.find_nodes(op="get_attr")]
    assert sorted(targets) == sorted(params)  # every parameter read once, by the model's own name
    for n in gm.graph.find_nodes(op="get_attr"):
        assert gm.get_parameter(str(n.target)) is params[str(n.target)]
    block17 = [n for n in gm.graph.nodes if n.meta.get("region", (None, None))[1] == "blocks.17"]
    assert block17 and all(n.meta["module_path"].startswith("blocks.17") for n in block17)
    assert all(n.name.startswith(("blocks_17_", "l__self___blocks_17_")) for n in block17)
    assert any("msa_att_row" in n.meta["module_path"] for n in block17)
    assert all("evoformer.py" in n.meta["stack_trace"] for n in block17 if n.op == "call_function")


def test_48_blocks_outputs_and_gradients_equal_eager(stack48, one_thread):
    model, inputs, gm = stack48
    results = []
    for f in (gm, model):
        model.zero_grad()
        out = f(*inputs)
        (out[0].square().sum() + out[1].square().sum() + out[2].sum()).backward()
        results.append([o.detach() for o in out] + [p.grad.clone() for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_a_small_stack_is_the_whole_model_capture():
    torch.manual_seed(0)
    model = Stack([Block() for _ in range(6)])
    gm = trace(model, X)
    with regions_disabled():
        plain = trace(model, X)
    assert [len(r["members"]) for r in gm.meta["regions"]] == [1, 5] and "regions" not in plain.meta
    assert _ops(gm) == _ops(plain)
    assert [n.name for n in gm.graph.nodes if n.meta.get("module_path") == "blocks.4.lin"][-1] == "blocks_4_linear"


def test_a_global_read_by_a_helper_of_the_blocks_module_is_guarded():
    model = Stack([region_blocks.GainBlock() for _ in range(6)])
    gm = trace(model, X)
    assert "regions" in gm.meta
    torch.testing.assert_close(gm(X), model(X))
    try:
        region_blocks.GAIN = 3.0
        with pytest.raises(GuardError, match="GAIN"):
            gm(X)
    finally:
        region_blocks.GAIN = 2.0
    torch.testing.assert_close(gm(X), model(X))


@pytest.mark.full
def test_the_graph_is_the_whole_model_capture():
    model, inputs = zoo.get("evoformer_stack", n_blocks=6, n_seq=N_SEQ, n_res=N_RES)
    gm = trace(model, *inputs)
    with regions_disabled():
        plain = trace(model, *inputs)
    assert "regions" in gm.meta and "regions" not in plain.meta
    assert _ops(gm) == _ops(plain)  # same calls, same parameters, same module paths, in the same order


def test_checkpointed_training_blocks_are_regions_with_equal_gradients(one_thread):
    model, inputs = zoo.get("evoformer_stack", n_blocks=6, n_seq=N_SEQ, n_res=N_RES)
    model.checkpoint = True
    model.train()
    m, z = inputs[0].clone().requires_grad_(), inputs[1].clone().requires_grad_()
    gm = trace(model, m, z, *inputs[2:])
    assert [len(r["members"]) for r in gm.meta["regions"]] == [6]
    assert sum(n.target is torch.utils.checkpoint.checkpoint for n in gm.graph.nodes) == 6
    results = []
    for f in (gm, model):
        torch.manual_seed(0)  # the same dropout masks
        model.zero_grad()
        m.grad = z.grad = None
        out = f(m, z, *inputs[2:])
        (out[0].sum() + out[1].square().sum()).backward()
        results.append([*out, m.grad, z.grad, *[p.grad for p in model.parameters()]])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- near misses


class Block(nn.Module):
    def __init__(self, width: int = 4, flag: bool = True):
        super().__init__()
        self.lin = nn.Linear(4, width)
        self.out = nn.Linear(width, 4)
        self.flag = flag
        self.register_buffer("shift", torch.zeros(4))

    def forward(self, x):
        y = self.out(torch.relu(self.lin(x)))
        return x + (y if self.flag else -y) + self.shift


class Stack(nn.Module):
    def __init__(self, blocks):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


X = torch.randn(2, 4)


def _near_miss(odd: Block) -> Stack:
    torch.manual_seed(0)
    return Stack([Block() for _ in range(3)] + [odd] + [Block() for _ in range(3)])


@pytest.mark.parametrize("odd", [
    lambda: Block(flag=False),                                       # another flag
    lambda: Block(width=6),                                          # another parameter shape
    lambda: _with(Block(), lambda b: b.register_buffer("shift", torch.zeros(1))),  # a buffer of another shape
    lambda: _with(Block(), lambda b: b.lin.register_forward_hook(lambda *a: None)),  # a hook inside
    lambda: _with(Block(), lambda b: b.register_forward_pre_hook(lambda *a: None)),  # a hook on it
    lambda: _with(Block(), lambda b: setattr(b.out, "weight", b.lin.weight)),  # tied weights
    lambda: _with(Block(), lambda b: b.lin.weight.requires_grad_(False)),  # a frozen parameter
], ids=["flag", "param_shape", "buffer_shape", "hook_inside", "hook", "tied", "frozen"])
def test_a_near_miss_gets_no_share_of_the_region(odd):
    model = _near_miss(odd())
    gm = trace(model, X)
    members = _members(gm)
    assert "blocks.3" not in members  # traced inline, as the whole-model capture does
    assert {"blocks.1", "blocks.2", "blocks.4", "blocks.5", "blocks.6"} <= set(members)
    assert not any(n.meta.get("region", (0, ""))[1] == "blocks.3" for n in gm.graph.nodes)
    assert any(n.meta.get("module_path", "").startswith("blocks.3") for n in gm.graph.nodes)
    torch.testing.assert_close(gm(X), model(X), rtol=0, atol=0)


def _with(block: Block, change) -> Block:
    change(block)
    return block


def test_block_keys():
    a, b = Block(), Block()
    assert regions.block_key(a) == regions.block_key(b)
    assert regions.block_key(Block(flag=False)) != regions.block_key(a)
    b.lin.register_forward_hook(lambda *x: None)
    assert regions.block_key(b) is None
    c = Block()
    c.forward = c.forward  # an instance forward (another library's wrapper, say)
    assert regions.block_key(c) is None
    nested = Stack([Stack([Block(), Block()]) for _ in range(4)])
    groups = regions.block_groups(nested, min_members=2)
    assert [[p for p, _ in g] for g in groups] == [["blocks.0", "blocks.1", "blocks.2", "blocks.3"]]


# ---------------------------------------------------------------- calls regions specialise on


class Attend(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x, y):
        return torch.softmax(self.q(x) @ self.k(y).transpose(-1, -2), -1) @ y


class Calls(nn.Module):
    """Blocks called with one tensor twice, with two of them, and under no_grad."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(Attend() for _ in range(6))

    def forward(self, x, y):
        for b in self.blocks[:2]:
            x = b(x, x)
        for b in self.blocks[2:4]:
            x = b(x, y)
        with torch.no_grad():
            z = self.blocks[4](x, y)
        return self.blocks[5](x, x) + z


def test_aliased_arguments_and_grad_mode_are_part_of_the_call():
    model, y = Calls(), torch.randn(2, 4)
    gm = trace(model, X, y)
    assert len(gm.meta["regions"]) >= 3
    torch.testing.assert_close(gm(X, y), model(X, y), rtol=0, atol=0)
    out = gm(X, y)
    assert out.requires_grad  # the no_grad part is inside the graph's own no_grad region
    ref = model(X, y)
    out.sum().backward()
    grads = [p.grad for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    ref.sum().backward()
    for a, b in zip(grads, (p.grad for p in model.parameters())):
        assert (a is None) == (b is None)  # blocks[4] ran under no_grad: no gradient, in both
        if a is not None:
            torch.testing.assert_close(a, b)


# ---------------------------------------------------------------- what regions refuse


class InPlace(Block):
    def forward(self, x):
        x.mul_(2)  # writes its input
        return super().forward(x)


class Counting(Block):
    def forward(self, x):
        self.calls = getattr(self, "calls", 0) + 1
        return super().forward(x)


def test_a_block_writing_its_input_is_traced_inline(caplog):
    torch.manual_seed(0)
    model = Stack([InPlace() for _ in range(6)])
    with caplog.at_level(logging.INFO, logger="foldcompile.regions"):
        gm = trace(model, X)
    assert "regions" not in gm.meta and "writes into its input in place" in caplog.text
    torch.testing.assert_close(gm(X.clone()), model(X.clone()), rtol=0, atol=0)


def test_a_side_effect_in_a_block_is_refused_as_without_regions():
    model = Stack([Counting() for _ in range(6)])
    with pytest.raises(CaptureError) as with_regions:
        trace(model, X)
    with regions_disabled(), pytest.raises(CaptureError) as without:
        trace(model, X)
    assert str(with_regions.value) == str(without.value)
    assert "calls" in str(with_regions.value) and not hasattr(model.blocks[0], "calls")


def test_blocks_called_on_ever_other_inputs_are_traced_inline_at_little_cost(caplog):
    class Growing(Stack):
        def forward(self, x):
            for i, b in enumerate(self.blocks):
                x = torch.cat([x, b(x[: i + 1])[:1]])  # every block sees one more row: a key of its own
            return x

    torch.manual_seed(0)
    model = Growing([Block() for _ in range(6)])
    with caplog.at_level(logging.INFO, logger="foldcompile.regions"):
        gm = trace(model, X)
    assert "regions" not in gm.meta and "about one call key per block" in caplog.text
    torch.testing.assert_close(gm(X), model(X), rtol=0, atol=0)


def test_dropout_draws_the_random_numbers_eager_draws():
    class Drop(Block):
        def forward(self, x):
            return torch.nn.functional.dropout(super().forward(x), 0.5, self.training)

    torch.manual_seed(0)
    model = Stack([Drop() for _ in range(6)]).train()
    gm = trace(model, X)
    assert "regions" in gm.meta
    torch.manual_seed(1)
    a = gm(X)
    torch.manual_seed(1)
    torch.testing.assert_close(a, model(X), rtol=0, atol=0)


@pytest.mark.full
def test_optimize_fuses_every_copy_as_without_regions():
    import foldcompile

    model, inputs = zoo.get("evoformer_stack", n_blocks=6, n_seq=N_SEQ, n_res=N_RES)
    fast = foldcompile.optimize(model, *inputs)
    assert [len(r["members"]) for r in fast.variant_for(*inputs).traced.meta["regions"]] == [1, 5]
    with regions_disabled():
        plain = foldcompile.optimize(model, *inputs)
    assert fast.report.counts() == plain.report.counts()
    assert fast.report.counts()["ln_linear"]["matched"] == 6 * 8  # and 2 triangle multiplications a block
    assert fast.report.counts()["triangle_multiplication"]["matched"] == 6 * 2
    for a, b in zip(fast(*inputs), model(*inputs)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
