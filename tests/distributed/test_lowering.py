"""The lowering of a planned graph (passes/localize.py, grad_placement.py, local_shape_check.py,
schedule_collectives.py) on a hand-planned DAP block (hand_plans.MiniDAP: every kind of
collective, mixed-consumer values and parameters, literal sizes, creation and random ops),
against one process: float64, rtol 1e-10, N_seq=5 and N_res=7 over 2 and 3 ranks (uneven)."""
import operator

import pytest
import torch

import hand_plans as H
import lowering_cases as L

RTOL, ATOL = 1e-10, 1e-12


def close(actual, expected, what):
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}: {m}")


@pytest.fixture(scope="module")
def reference():
    return L.mini_reference()


@pytest.mark.parametrize("P", [2, 3])
@pytest.mark.parametrize("loss", ["replicated", "sharded"])
def test_lowered_block_equals_one_process(pools, reference, P, loss):
    """Train mode (a replicated bernoulli mask and a dropout of a shard draw one process's
    values): outputs, input gradients and every parameter gradient."""
    outs, (gm, gz), grads = reference
    assert len(grads) == 7
    for r, (o, (lm, lz), g, places, _) in enumerate(pools.run(P, L.mini_case, loss)):
        for k, (a, b) in enumerate(zip(o, outs, strict=True)):
            p = places[k]
            sharded = loss == "sharded" and p.dim is not None
            close(a, L.piece(b, p.dim, r, P) if sharded else b, f"rank {r} output {k}")
        close(lm, gm, f"rank {r} gradient of m")
        close(lz, gz, f"rank {r} gradient of z")
        for name, ref in grads.items():
            close(g[name], ref, f"rank {r} gradient of {name}")


def _nokeep_case(rank, loss):
    import foldcompile.passes.localize as lz
    keep = lz._Lowering.keep_replicated_contributions
    lz._Lowering.keep_replicated_contributions = lambda self: None   # this rank process only, restored below
    try:
        return L.mini_case(rank, loss)
    finally:
        lz._Lowering.keep_replicated_contributions = keep


def test_without_keeping_the_replicated_contribution_the_gradient_is_wrong(pools, reference):
    """w_b feeds z's rows (Partial) and a replicated linear (Replicate); the gathered pair bias
    feeds the sharded logits and a replicated statistic. Summing such a gradient without keeping
    the replicated part on one rank counts it P times: the test sees it."""
    _, (_, gz), grads = reference
    (_, (_, lz), g, _, _), _ = pools.run(2, _nokeep_case, "replicated")
    assert not torch.allclose(g["w_b"], grads["w_b"], rtol=1e-6)
    assert not torch.allclose(lz, gz, rtol=1e-6)
    assert torch.allclose(g["w_q"], grads["w_q"], rtol=RTOL)   # parameters used one way only are right


def test_lowered_block_fp32_fused_within_the_verify_bound(pools):
    """fp32 with fusion on (eval mode): fused regions > 0 on every rank; error against the float64
    one-process truth within verify's bound (4 x eager fp32's own error + 1e-6)."""
    truth = L.mini_reference(torch.float64, training=False)
    eager = L.mini_reference(torch.float32, training=False)
    for r, (o, (lm, lz), g, _, fused) in enumerate(pools.run(3, L.mini_case, "replicated", torch.float32,
                                                             False, True)):
        assert fused > 0

        def err(x, ref):
            return ((x.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()

        pairs = [(o[k], eager[0][k], truth[0][k], f"output {k}") for k in range(len(o))]
        pairs += [(lm, eager[1][0], truth[1][0], "grad m"), (lz, eager[1][1], truth[1][1], "grad z")]
        pairs += [(g[k], eager[2][k], truth[2][k], f"grad {k}") for k in truth[2]]
        for mine, theirs, ref, what in pairs:
            assert err(mine, ref) <= 4 * err(theirs, ref) + 1e-6, (r, what, err(mine, ref), err(theirs, ref))


def test_collectives_issue_in_need_order_and_backward_mirrors_forward(pools):
    """Static order (each wait right before its first consumer, each start right after its
    producer unless the need order holds it back) and the events of a forward and a backward."""
    for r, (log, sched, lowered, code) in enumerate(pools.run(2, L.mini_events_case)):
        names = [c["tensor"] for c in lowered if c["start"] is not None]
        assert len(names) == 7
        fwd = [e for e in log if e[0] == "forward" and e[1] in ("issue", "wait")]
        bwd = [e for e in log if e[0] == "backward"]
        issued = [e[2].split(":")[1] for e in fwd if e[1] == "issue"]
        waited = [e[2].split(":")[1] for e in fwd if e[1] == "wait"]
        by_start = {c["start"]: c["tensor"] for c in lowered}
        assert issued == [by_start[c["start"]] for c in sched]          # issue order = the schedule's need order
        assert waited == issued                                          # waits in need order too
        for c in sched:
            assert c["between"] <= c["allowed"]
            if c["between"] < c["allowed"]:
                assert c["delayed"] == "issued after the collectives needed before it"
        # backward: wait's backward issues (reverse wait order), start's backward waits (reverse issue order)
        assert [e[2].split(":")[1] for e in bwd if e[1] == "issue"] == waited[::-1]
        assert [e[2].split(":")[1] for e in bwd if e[1] == "wait"] == issued[::-1]
        kinds = {e[2] for e in bwd}
        # the gathered bias (move) and outer-product operand (move_3): reduce-scatters; the Partial sum
        # reduce-scattered (move_1): all_gather; the all_to_all back; the replicated outputs: local slices
        assert kinds == {"reduce_scatter:move", "reduce_scatter:move_3", "all_gather:move_1", "all_to_all:move_2",
                         "identity:move_5", "local_slice:dropout", "local_slice:add_6"}
        assert "h_move_2 = foldcompile_distributed_collectives_all_to_all_start(move_2" in code


def test_shard_with_explicit_sizes(pools):
    """A slice of a merged dim is planned with its own sizes ([1, 3] here, not split_sizes' [2, 2])."""
    (a0, gx0, gy0), (a1, gx1, gy1) = pools.run(2, L.shard_sizes_case)
    assert a0.tolist() == [[0.0, 1.0]] and a1.tolist() == [[2.0, 3.0], [4.0, 5.0], [6.0, 7.0]]
    assert gx0.tolist() == [[1.0, 1.0], [0, 0], [0, 0], [0, 0]]          # partial: this rank's rows only
    assert gx1.tolist() == [[0, 0], [2.0, 2.0], [2.0, 2.0], [2.0, 2.0]]
    assert gy0.tolist() == gy1.tolist() == [[1.0, 1.0], [2.0, 2.0], [2.0, 2.0], [2.0, 2.0]]  # replicate: gathered


def test_static_schedule():
    """In the lowered graph: every wait sits right before its first consumer; every start right
    after the last of its producer and the starts needed before it."""
    from foldcompile.passes.localize import collective_of

    _, _, gm, _, sched, _ = L.lower_mini(1, 3, outputs="full")
    sched = sched["collectives"]
    nodes = list(gm.graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    starts = [n for n in nodes if collective_of(n)]
    assert [s.name for s in starts] == [c["start"] for c in sched]       # program order = need order
    for s in starts:
        (w,) = s.users
        first = min(index[u] for u in w.users)
        between = nodes[index[w] + 1:first]
        assert all(b.target in (w.target,) or collective_of(b) for b in between), (w.name, between)
        producer = max(index[p] for p in s.all_input_nodes)
        assert index[s] > producer


def test_world_size_one_is_the_unsharded_graph():
    model, inputs, plan = H.mini_plan(1)
    one = L.localize_pass(plan, 0, 1).graph_module
    assert "redistribute" not in one.code and "foldcompile_distributed" not in one.code
    plain = [n.target for n in plan.graph.nodes if n.target is not H.redistribute]
    assert [n.target for n in one.graph.nodes] == plain
    torch.manual_seed(0)
    a = one(*inputs)
    torch.manual_seed(0)
    b = model(*inputs)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_local_sizes_and_records():
    _, _, gm, record, _, _ = L.lower_mini(2, 3, outputs="sharded")
    # S=5 over 3 is [2, 2, 1]; R=7 is [3, 2, 2]: rank 2 views 1 row of m and reshapes 2 rows of z
    assert {(x["node"], x["local"]) for x in record["local_sizes"]} == {("view", 1), ("reshape", 1), ("reshape_1", 2)}
    assert record["partial_params"] == ["w_b", "w_q", "w_o", "w_t", "w_a", "w_oz", "w_pos"]
    assert record["kept_on_one_rank"] == [{"value": "w_b", "consumers": ["linear_6"]},
                                          {"value": "redistribute", "consumers": ["mul"]}]
    assert record["built_whole"] == [{"node": "arange", "op": "arange", "dim": 0}]
    assert record["random"] == [{"node": "dropout", "op": "dropout", "dim": 0}]
    # m and z need whole gradients (slices' gradients gathered); the mask needs none
    kinds = [(c["kind"], c.get("grad_placement")) for c in record["collectives"]]
    assert kinds == [("slice", "replicate")] * 2 + [("slice", "partial"), ("all_gather", "partial"), ("reduce_scatter", None),
                                                     ("all_to_all", None), ("all_gather", "partial"),
                                                     ("slice", "partial"), ("all_reduce", "replicate")]
    view = next(n for n in gm.graph.nodes if n.name == "view")
    assert view.meta["shape"] == (1, 7, 2, 4) and str(view.meta["sym_shape"][0]) == "floor(N_seq/3)"
    assert str(view.meta["sym_args"][1][0]) == "floor(N_seq/3)"


def test_fusion_keeps_every_collective_a_barrier():
    """fp32 with fusion on: kernels are made (so some regions lie between collectives), every runtime
    call of the lowered graph survives, and no fused region took one in."""
    from foldcompile.passes.localize import is_runtime_call

    _, _, before, _, _, _ = L.lower_mini(1, 2, outputs="full", dtype=torch.float32, training=False)
    _, _, gm, _, _, fused = L.lower_mini(1, 2, outputs="full", dtype=torch.float32, training=False, fuse=True)
    assert fused > 0
    runtime = sorted(n.name for n in before.graph.nodes if is_runtime_call(n))
    assert sorted(n.name for n in gm.graph.nodes if is_runtime_call(n)) == runtime
    for n in gm.graph.nodes:
        if n.meta.get("fused_by"):
            assert not set(n.meta.get("origin", ())) & set(runtime), n.name


def test_a_parameter_read_twice_gets_one_gradient_placement():
    """Two get_attr nodes of one parameter, one used on shards and one replicated: the parameter is
    Partial, and the replicated node's uses are kept on one rank."""
    from foldcompile.passes.grad_placement import gradient_placements
    from foldcompile.passes.placement import Placed, Replicate, Shard

    g = torch.fx.Graph()
    x = g.placeholder("x")
    w1, w2 = g.get_attr("w"), g.get_attr("w")
    a = g.call_function(torch.mul, (x, w1), name="a")          # sharded
    b = g.call_function(torch.sin, (w2,), name="b")            # replicated
    g.output((a, b))
    root = torch.nn.Module()
    root.w = torch.nn.Parameter(torch.ones(3))
    gm = torch.fx.GraphModule(root, g)
    rows = Placed(Shard(0), (2, 1), 3)
    for n, p in zip(gm.graph.nodes, [rows, Placed(Replicate()), Placed(Replicate()), rows, Placed(Replicate())]):
        n.meta.update(shard=p, dtype=torch.float32)
    places = gradient_placements(gm, inputs_requiring_grad={"x": False})
    assert places.of[w1.name] == places.of[w2.name] == "partial"
    assert places.keep_edges == [(w2.name, "b")]


def _two_gathers():
    """x -> a, b (both gathered); c independent work; the gathers are needed by d and e, late."""
    from foldcompile.distributed import all_gather_start, wait

    g = torch.fx.Graph()
    x = g.placeholder("x")
    a = g.call_function(torch.sin, (x,), name="a")
    b = g.call_function(torch.cos, (x,), name="b")
    ha = g.call_function(all_gather_start, (a, 0), {"grad_placement": "partial"}, name="h_a")
    wa = g.call_function(wait, (ha,), name="a_full")
    hb = g.call_function(all_gather_start, (b, 0), {"grad_placement": "partial"}, name="h_b")
    wb = g.call_function(wait, (hb,), name="b_full")
    c1 = g.call_function(torch.exp, (x,), name="c1")
    c2 = g.call_function(torch.exp, (c1,), name="c2")
    d = g.call_function(torch.add, (wa, c2), name="d")
    e = g.call_function(torch.add, (wb, d), name="e")
    g.output(e)
    gm = torch.fx.GraphModule(torch.nn.Module(), g)
    for n in gm.graph.nodes:
        n.meta.update(shape=(4, 4), dtype=torch.float32)      # 64 bytes each
    return gm


def test_schedule_need_order_and_bytes_in_flight():
    from foldcompile.passes.schedule_collectives import schedule_collectives_pass

    gm = _two_gathers()
    rec = schedule_collectives_pass(gm).record["collectives"]
    order = [n.name for n in gm.graph.nodes]
    # both issued right after their producers (a's first: it is needed first), waited right before use
    assert order == ["x", "a", "h_a", "b", "h_b", "c1", "c2", "a_full", "d", "b_full", "e", "output"]
    assert [(c["start"], c["between"], c["allowed"], c["delayed"]) for c in rec] == [
        ("h_a", 3, 3, None), ("h_b", 3, 3, None)]
    gm = _two_gathers()
    rec = schedule_collectives_pass(gm, max_bytes_in_flight=100).record["collectives"]   # one at a time
    order = [n.name for n in gm.graph.nodes]
    assert order == ["x", "a", "h_a", "b", "c1", "c2", "a_full", "h_b", "d", "b_full", "e", "output"]
    assert rec[1]["delayed"] == "waits for bytes in flight (at most 100)" and rec[1]["between"] == 1


def test_schedule_keeps_a_pair_in_its_grad_mode_region():
    """A pair placed next to its producer in a grad-enabled region is waited before a no-grad
    region starts, though its consumer comes after it (run under no_grad, the wait would record
    no autograd node and the gradient would be lost)."""
    from foldcompile.distributed import all_gather_start, wait
    from foldcompile.passes.schedule_collectives import schedule_collectives_pass

    g = torch.fx.Graph()
    x = g.placeholder("x")
    a = g.call_function(torch.sin, (x,), name="a")
    h = g.call_function(all_gather_start, (a, 0), {"grad_placement": "partial"}, name="h_a")
    w = g.call_function(wait, (h,), name="a_full")
    off = g.call_function(torch._C._set_grad_enabled, (False,), name="grad_off")
    c = g.call_function(torch.exp, (x,), name="c")
    on = g.call_function(torch._C._set_grad_enabled, (True,), name="grad_on")
    d = g.call_function(torch.add, (w, c), name="d")
    g.output(d)
    gm = torch.fx.GraphModule(torch.nn.Module(), g)
    for n in gm.graph.nodes:
        n.meta.update(shape=(4, 4) if n.name not in ("grad_off", "grad_on") else None, dtype=torch.float32)
    schedule_collectives_pass(gm)
    assert [n.name for n in gm.graph.nodes] == ["x", "a", "h_a", "a_full", "grad_off", "c", "grad_on", "d", "output"]


def _plan_of(build, places):
    """A hand-built graph with the given placements (by node name) and (3, 4) float shapes."""
    g = torch.fx.Graph()
    out = build(g)
    g.output(out)
    gm = torch.fx.GraphModule(torch.nn.Module(), g)
    for n in gm.graph.nodes:
        if n.op != "output":
            n.meta.update(shape=(3, 4), sym_shape=(3, 4), dtype=torch.float32, shard=places.get(n.name))
    return gm


def test_plans_the_lowering_refuses():
    from foldcompile.passes.base import PassError
    from foldcompile.passes.localize import localize_pass
    from foldcompile.passes.placement import Placed, Replicate, Shard, redistribute

    rows = Placed(Shard(0), (2, 1), 3)
    rep = Placed(Replicate())
    sin = lambda g: g.call_function(torch.sin, (g.placeholder("x"),), name="y")   # noqa: E731
    with pytest.raises(PassError, match="'y'.*has no placement"):
        localize_pass(_plan_of(sin, {"x": rows}), 0, 2)
    with pytest.raises(PassError, match="planned as Shard\\(0, sizes=\\[2, 1\\]\\) for 2 ranks, but the lowering is "
                                        "for world_size=3"):
        localize_pass(_plan_of(sin, {"x": rows, "y": rows}), 0, 3)

    def moved(g):
        return g.call_function(redistribute, (g.placeholder("x"), Shard(1), Replicate()), name="r")
    with pytest.raises(PassError, match="moves x from S\\(1\\), but x is planned as Shard\\(0"):
        localize_pass(_plan_of(moved, {"x": rows, "r": rep}), 0, 2)

    def draw(g):
        return g.call_function(torch.randint_like, (g.placeholder("x"), 5), name="y")
    with pytest.raises(PassError, match="randint_like on a sharded tensor would draw other values"):
        localize_pass(_plan_of(draw, {"x": rows, "y": rows}), 0, 2)

    def cut(g):
        return g.call_function(torch.narrow, (g.placeholder("x"), 0, 1, 2), name="y")
    with pytest.raises(PassError, match="narrows \\[1, 1 \\+ 2\\) of the dim 0 the plan shards"):
        localize_pass(_plan_of(cut, {"x": rows, "y": rows}), 0, 2)


def test_size_queries_of_a_shard_answer_the_global_size():
    """``x.shape[0]`` of a sharded x is the global size (a mean over all ranks divides by it); a
    view sized by it gets the local size like any literal."""
    from foldcompile.passes.localize import localize_pass
    from foldcompile.passes.placement import Placed, Shard

    g = torch.fx.Graph()
    x = g.placeholder("x")
    shape = g.call_function(getattr, (x, "shape"), name="shape")
    rows = g.call_function(operator.getitem, (shape, 0), name="rows")
    view = g.create_node("call_method", "view", (x, rows, -1), name="flat")
    scaled = g.call_function(operator.truediv, (view, rows), name="scaled")
    g.output(scaled)
    gm = torch.fx.GraphModule(torch.nn.Module(), g)
    rows_p = Placed(Shard(0), (2, 1), 3)
    for n in gm.graph.nodes:
        if n.name in ("x", "flat", "scaled"):
            n.meta.update(shape=(3, 4), sym_shape=(3, 4), dtype=torch.float32, shard=rows_p)
        else:
            n.meta.update(shape=None, dtype=None)
    gm.meta["dims"] = {}
    res = localize_pass(gm, 1, 2, inputs="sharded", outputs="sharded")
    assert res.record["global_size_queries"] == [{"node": "shape", "of": "x", "value": (3, 4)}]
    out = res.graph_module(torch.ones(1, 4))
    assert torch.equal(out, torch.full((1, 4), 1 / 3))
