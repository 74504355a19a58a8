"""A narrow's literal length keeps its symbolic meaning through the DAP lowering: the lowering
rewrites the length to this rank's share, and ``meta["sym_args"]`` says so (not the global size)."""
from __future__ import annotations

import torch
import torch.fx as fx

from foldcompile.passes.localize import localize_pass
from foldcompile.passes.placement import Placed, Shard
from foldcompile.passes.shape_prop import dim_symbol, shape_prop_pass


def test_a_whole_dim_narrow_on_a_shard_gets_the_local_length_and_its_meaning():
    R = dim_symbol("N_res")
    g = fx.Graph()
    z = g.placeholder("z")
    g.output(g.call_function(torch.narrow, (z, 0, 0, 5), name="y"))      # a chunk loop of one chunk
    gm = fx.GraphModule(torch.nn.Module(), g)
    shape_prop_pass(gm, (torch.randn(5, 3),), dims={"N_res": 5})
    y = next(n for n in gm.graph.nodes if n.name == "y")
    assert y.meta["sym_args"] == {3: R}
    rows = Placed(Shard(0), (3, 2), R)
    for n in gm.graph.nodes:
        if n.op != "output":
            n.meta["shard"] = rows
    local = localize_pass(gm, 1, 2).graph_module
    y = next(n for n in local.graph.nodes if n.name == "y")
    assert y.args[3] == 2                                                   # rank 1 holds 2 of the 5 rows
    assert y.meta["sym_args"][3] != R and int(y.meta["sym_args"][3].subs(R, 5)) == 2
