"""Random ops are one registry fact (``OpEntry.random``, :func:`registry.draws_random`), read by every
pass and executor that must treat them apart. Each of these kept its own list of op names before,
and the lists disagreed: ``torch.poisson``, ``Tensor.uniform_``, ``dropout2d`` were random to none or
some of them. Here each reader meets a random op that one of the old lists missed."""
from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
import torch.utils.checkpoint

from foldcompile.passes.registry import draws_random


def test_fuse_names_an_unfused_random_op_as_random():
    """``poisson`` was missing from fuse's list: it was reported as "no kernel for this op"."""
    from foldcompile.passes import classify_pass, normalize_pass, shape_prop_pass
    from foldcompile.passes.fuse import UNFUSED_REASONS, fuse_pass

    gm = normalize_pass(fx.symbolic_trace(lambda m: torch.poisson(m.abs()) * 2.0 + F.log_softmax(m, -1))).graph_module
    shape_prop_pass(gm, (torch.randn(5, 7, 3),))
    classify_pass(gm)
    reasons = {u["op"]: u["reason"] for u in fuse_pass(gm, rules=[]).record["unfused"]}
    assert reasons["poisson"] == UNFUSED_REASONS["random"]
    # log_softmax has no kernel of ours (the registry said it had one, sharing softmax's flags)
    assert reasons["log_softmax"] == UNFUSED_REASONS["no_kernel"]


class _Noisy(torch.nn.Module):
    """In-place and out-of-place draws that verify's old list did not know."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(3, 3))

    def forward(self, x):
        noise = torch.empty_like(x).uniform_()           # in place
        counts = torch.poisson(x.abs())                  # out of place
        return (x * noise + counts) @ self.w


def test_verify_replays_every_random_draw():
    """Each run of the graph (float64 truth, eager, optimized) sees the same draws; before, the
    un-listed draws were drawn anew in each run and verify reported the model as wrong."""
    from foldcompile.verify import verify

    torch.manual_seed(0)
    report = verify(_Noisy().eval(), torch.randn(5, 7, 3))
    assert report.ok, str(report)
    assert max(r["optimized"] for r in report.outputs) < 1e-5


def test_cuda_graphs_refuse_checkpointing_around_any_random_op():
    from foldcompile.executors.cuda_graph import cuda_graph_unsafe_reason

    for body_fn, op in ((lambda x: torch.poisson(x.abs()), "poisson"),
                        (lambda x: F.dropout2d(x, 0.5) * 2, "dropout2d"),
                        (lambda x: torch.empty_like(x).uniform_() + x, "uniform_")):
        g = fx.Graph()
        x = g.placeholder("x")
        b = g.get_attr("body")
        g.output(g.call_function(torch.utils.checkpoint.checkpoint, (b, x), {"use_reentrant": False}))
        root = torch.nn.Module()
        root.body = fx.symbolic_trace(body_fn)
        why = cuda_graph_unsafe_reason(fx.GraphModule(root, g))
        assert why is not None and f"checkpointing around a random op ({op})" in why, (op, why)


def test_a_sharded_variant_knows_it_draws_when_the_lowering_drew_whole():
    """The DAP lowering's own draws count (``draw_global_like`` was missing from the list that decides
    whether the ranks' generators are checked to agree)."""
    from foldcompile.distributed.sharded import _draws
    from foldcompile.distributed.sharded_random import draw_global_like

    g = fx.Graph()
    x = g.placeholder("x")
    nodes = [g.call_function(draw_global_like, ("rand_like", x), {"dim": 0, "sizes": [2, 1], "rank": 0}),
             g.call_function(torch.poisson, (x,)),
             g.call_function(F.dropout, (x, 0.5, False)),
             g.call_function(torch.sin, (x,))]
    assert [_draws(n) for n in nodes] == [True, True, False, False]


@pytest.mark.parametrize("build,op", [
    (lambda g, x: g.call_function(torch.poisson, (x,), name="y"), "poisson"),
    (lambda g, x: g.call_function(F.dropout2d, (x, 0.5, True), name="y"), "dropout2d"),
])
def test_the_lowering_refuses_a_random_op_it_cannot_draw_whole(build, op):
    from foldcompile.passes.base import PassError
    from foldcompile.passes.localize import localize_pass
    from foldcompile.passes.placement import Placed, Shard

    g = fx.Graph()
    build_out = build(g, g.placeholder("x"))
    g.output(build_out)
    gm = fx.GraphModule(torch.nn.Module(), g)
    rows = Placed(Shard(0), (2, 1), 3)
    for n in gm.graph.nodes:
        if n.op != "output":
            n.meta.update(shape=(3, 4), sym_shape=(3, 4), dtype=torch.float32, shard=rows)
    assert draws_random(next(n for n in gm.graph.nodes if n.name == "y"))
    with pytest.raises(PassError, match=f"the random op {op} on a sharded tensor would draw other values"):
        localize_pass(gm, 0, 2)
