"""``optimize(model, *inputs, world_size=P)`` end to end (foldcompile/distributed/sharded.py): the
Dynamo capture of MiniDAP (hand_plans.py) planned by the hand planner, lowered on every rank,
called like the model; float64 against one process (rtol 1e-10) at P=2 and 3 (uneven shards),
train mode with dropout; the gradient reduction waited at the end of backward; the user's
contract errors; a dead rank and a hung one through optimize."""
import pytest
import torch

import foldcompile
from foldcompile.distributed import Pool, RankTimeoutError

import lowering_cases as L

RTOL, ATOL = 1e-10, 1e-12


def close(actual, expected, what):
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}: {m}")


@pytest.fixture(scope="module")
def reference():
    return L.mini_reference()


@pytest.mark.parametrize("P", [2, 3])
@pytest.mark.parametrize("loss", ["replicated", "sharded"])
def test_optimize_equals_one_process(pools, reference, P, loss):
    outs, (gm, gz), grads = reference
    for r, (o, (lm, lz), g, places, _, code, _) in enumerate(pools.run(P, L.optimize_mini_case, loss)):
        for k, (a, b) in enumerate(zip(o, outs, strict=True)):
            p = places[k]
            close(a, L.piece(b, p.dim, r, P) if p.dim is not None else b, f"rank {r} output {k}")
            assert (p.dim is not None) == (loss == "sharded" and k < 2)
        close(lm, gm, f"rank {r} gradient of m")
        close(lz, gz, f"rank {r} gradient of z")
        for name, ref in grads.items():
            close(g[name], ref, f"rank {r} gradient of {name}")


def test_optimizer_steps_unchanged(pools):
    """Three ``zero_grad(); loss.backward(); opt.step()`` steps in train mode, no explicit reduction:
    every rank's parameters equal one process's after them."""
    ref = L.train_steps_reference(3)
    for r, params in enumerate(pools.run(3, L.train_steps_case, 3)):
        for name, p in ref.items():
            close(params[name], p, f"rank {r} parameter {name} after 3 steps")


def test_fp32_fused_within_the_verify_bound(pools):
    truth = L.mini_reference(torch.float64, training=False)
    eager = L.mini_reference(torch.float32, training=False)

    def err(x, ref):
        return ((x.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()

    for r, (o, (lm, lz), g, _, fused, code, _) in enumerate(pools.run(2, L.optimize_mini_case, "replicated",
                                                                      torch.float32, False, True)):
        assert fused > 0 and "fused_" in code
        for k in range(len(o)):
            assert err(o[k], truth[0][k]) <= 4 * err(eager[0][k], truth[0][k]) + 1e-6, (r, k)
        for name in truth[2]:
            assert err(g[name], truth[2][name]) <= 4 * err(eager[2][name], truth[2][name]) + 1e-6, (r, name)


def test_code_and_explain_show_every_collective(pools):
    """``.code`` names the runtime calls; ``foldcompile.explain(module)`` lists every collective
    with its placements, gradient placement, symbolic bytes and position."""
    (_, _, _, _, _, code, report), _ = pools.run(2, L.optimize_mini_case, "replicated")
    assert "h_m_c = all_to_all_start(m_c, split_dim = 1, cat_dim = 0, cat_sizes = [3, 2], split_sizes = [4, 3]" in code
    assert "m_c_s1 = wait(h_m_c)" in code
    assert "b_1_full = wait(h_b_1)" in code and "m_s0 = shard(m, 0, grad_placement = 'replicate'" in code
    assert "keep_grad_on_rank(w_b)" in code and "sharded_dropout(" in code
    assert "DAP: rank 0 of 2, 11 collectives" in report
    for kind in ("all_to_all", "all_gather", "reduce_scatter", "all_reduce", "slice"):
        assert f"\n  {kind} " in report
    assert "32*N_res*floor(N_seq/2 + 1/2)" in report        # the all_to_all's bytes, symbolic in the local sizes


def test_dp_times_dap_on_a_2x2_mesh(pools):
    """Two data-parallel replicas, each sharded by DAP over its own group of 2 (``group=``): after
    the DP average every rank holds the one-process average of the two replicas' gradients."""
    ref = L.dp_dap_reference()
    for r, (grads, dap_rank) in enumerate(pools.run(4, L.dp_dap_case)):
        assert dap_rank == r % 2
        for name, g in ref.items():
            close(grads[name], g, f"rank {r} gradient of {name}")


def test_dp_times_dap_with_a_device_mesh(pools):
    """The same through ``mesh=DeviceMesh(("dp", "dap"))``: the module sums the Partial gradients over
    its DAP group and averages every gradient over the replicas itself, after each of two
    accumulating backward passes."""
    ref = L.dp_dap_accumulated_reference()
    for r, (grads, dap_rank, replica) in enumerate(pools.run(4, L.dp_dap_mesh_case)):
        assert (replica, dap_rank) == divmod(r, 2)
        for step in (0, 1):
            for name, g in ref[step].items():
                close(grads[step][name], g, f"rank {r} step {step} gradient of {name}")


def test_mesh_arguments_are_checked():
    model, inputs = L.H.MiniDAP(5, 7), L.H.mini_inputs()
    with pytest.raises(ValueError, match="a mesh is for DAP over world_size > 1 ranks"):
        foldcompile.optimize(model, *inputs, world_size=1, mesh=object())
    from foldcompile.distributed.sharded import groups_of_mesh

    class Mesh:
        mesh_dim_names = ("data", "model")
    with pytest.raises(ValueError, match="must be named 'dap'.*this mesh's dims are \\('data', 'model'\\)"):
        groups_of_mesh(Mesh(), None)
    with pytest.raises(ValueError, match="mesh= .* or group=, not both"):
        groups_of_mesh(Mesh(), object())


def test_the_contract_is_checked(pools):
    for r, msg in enumerate(pools.run(2, L.wrong_world_case)):
        assert "the process group has 2 ranks" in msg, msg
    for r, msg in enumerate(pools.run(2, L.different_parameters_case)):
        assert "rank 1's parameters and buffers differ from rank 0's (first at w_o)" in msg, msg
    for r, msg in enumerate(pools.run(2, L.generators_differ_case)):
        assert msg is not None and "random generators are in different states" in msg


def test_world_size_needs_a_group():
    model, inputs = L.H.MiniDAP(5, 7), L.H.mini_inputs()
    with pytest.raises(RuntimeError, match="needs an initialized process group of 3 ranks"):
        foldcompile.optimize(model, *inputs, world_size=3)


def test_a_dead_rank_ends_in_a_timeout_error():
    with Pool(2, timeout_s=20) as pool:
        with pytest.raises(RankTimeoutError, match="rank 1 died") as info:
            pool.run(L.rank_dies_case)
        assert info.value.ranks == [1]


@pytest.mark.full   # waits for the process group's timeout (15 s)
def test_a_hung_collective_ends_in_a_timeout_error():
    """Rank 1 never calls the module: rank 0 waits in its first collective until the timeout."""
    with Pool(2, timeout_s=15) as pool:
        with pytest.raises(RankTimeoutError, match="rank 0: a collective timed out") as info:
            # the parent's own deadline past the build (seconds on a busy machine) and the 15 s timeout
            pool.run(L.rank_skips_case, timeout_s=60)
        assert info.value.ranks == [0]
