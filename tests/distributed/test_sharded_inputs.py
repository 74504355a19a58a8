"""``optimize(model, *whole_example_inputs, world_size=P, inputs="sharded")``: every rank passes its own
shards (``module.shard_inputs``), float64 against one process at rtol 1e-10: outputs, the shards'
gradients (the matching shard of the one-process gradient) and every parameter gradient, at P=2 and
P=3 (uneven: N_seq=5, N_res=7 over 3), with ``outputs="full"`` and ``"sharded"``; a replicated input
that requires grad stays whole and gets the whole gradient; whole inputs or a wrong shard are refused
naming the input, the dim, the expected local size and the rank; new variants (a failed guard,
model.eval()) are built from the all-gathered shards.

Budget: the quick test one MiniDAP build on 2 ranks (~5 s idle); the full tier four more builds of
MiniDAP and one of the zoo Evoformer block (~35 s idle)."""
import pytest
import torch

from foldcompile.distributed import split_offsets

import lowering_cases as L
import sharded_input_cases as C
import zoo_cases as Z

RTOL, ATOL = 1e-10, 1e-12


def close(actual, expected, what):
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}: {m}")


def shard_of(x, placed, rank):
    if placed.dim is None:
        return x
    return x.narrow(placed.dim, split_offsets(placed.split_sizes)[rank], placed.split_sizes[rank])


@pytest.fixture(scope="module")
def reference():
    return L.mini_reference()


def check_mini(results, reference, P, outputs, validate=False):
    outs, (gm, gz), grads = reference
    for r, res in enumerate(results):
        ins = res["input_placements"]
        assert list(ins) == ["m", "z", "msa_mask"]
        assert [p.split_sizes for p in ins.values()] == [tuple(L.split_sizes(n, P)) for n in (5, 7, 5)]
        assert "inputs: the module takes this rank's shards of the Shard inputs; the plan places m Shard(0, sizes=" \
            f"{L.split_sizes(5, P)}), z Shard(0, sizes={L.split_sizes(7, P)})" in res["report"]
        assert len(res["outputs"]) == len(outs) == len(res["places"])
        for k, (a, b, p) in enumerate(zip(res["outputs"], outs, res["places"], strict=True)):
            assert (p.dim is not None) == (outputs == "sharded" and k < 2), (k, p)
            close(a, shard_of(b, p, r), f"rank {r} output {k}")
        close(res["input_grads"][0], shard_of(gm, ins["m"], r), f"rank {r} gradient of m's shard")
        close(res["input_grads"][1], shard_of(gz, ins["z"], r), f"rank {r} gradient of z's shard")
        assert set(res["grads"]) == set(grads)
        for name, ref in grads.items():
            close(res["grads"][name], ref, f"rank {r} gradient of {name}")
        q = 0 if validate else r     # validated: every rank raises the first rank's error
        local = L.split_sizes(5, P)[q]
        assert res["whole_inputs_error"] == (
            f"ShardShapeError: optimize(inputs='sharded'): input 'm' on rank {q} of {P}: dim 0 has size 5, the plan "
            f"expects this rank's shard of {local} (Shard(0) of 5, split {L.split_sizes(5, P)}); each rank passes its "
            "own shard of every sharded input (module.input_placements; module.shard_inputs(*whole_inputs) cuts "
            "them) and every replicated input whole")


def test_sharded_inputs_equal_one_process(pools, reference):
    check_mini(pools.run(2, C.mini_case, "full"), reference, 2, "full")


@pytest.mark.full
def test_sharded_inputs_and_outputs_uneven_with_a_wrong_shard_on_one_rank(pools, reference):
    """P=3, outputs sharded; with validate=True rank 1 alone passes a shard a row short: every rank
    raises the same error naming rank 1, none hangs."""
    results = pools.run(3, C.mini_case, "sharded", True)
    check_mini(results, reference, 3, "sharded", validate=True)
    for res in results:
        assert res["wrong_shard_error"].startswith(
            "ShardShapeError: optimize(inputs='sharded'): input 'm' on rank 1 of 3: dim 0 has size 1, the plan expects "
            "this rank's shard of 2 (Shard(0) of 5, split [2, 2, 1])"), res["wrong_shard_error"]


@pytest.mark.full
def test_new_variants_are_built_from_the_gathered_shards(pools):
    """A failed guard and model.eval() need new variants: built from the whole inputs all-gathered from
    the shards, they compute what one process computes."""
    train = L.mini_reference()[0]
    evaluated = L.mini_reference(training=False)[0]
    for r, (first, again, ev, misses) in enumerate(pools.run(3, C.mini_rebuild_case)):
        # the guard's rebuild is two entries (why it was dropped, then its build under the same key)
        assert misses[0] == "first call" and "guard failed" in misses[1] and len(misses) == 4, misses
        assert misses[3] == "training mode True -> False"
        for k, (a, b, c, t, e) in enumerate(zip(first, again, ev, train, evaluated, strict=True)):
            close(a, t, f"rank {r} output {k}")
            close(b, t, f"rank {r} output {k} after the rebuild")
            close(c, e, f"rank {r} output {k} in eval mode")


@pytest.mark.full
def test_a_replicated_input_stays_whole(pools):
    """The zoo Evoformer block with the pair representation replicated (``dap_axes={"z": None}``): m is
    passed as shards, z whole; z's gradient (a Partial sum over the ranks, all-reduced) is whole."""
    from foldcompile.distributed.sharded import make_plan

    axes = {"z": None}
    model, inputs = Z.setup("evoformer_block")
    plan = make_plan(model, *inputs, world_size=2, dap_axes=axes)
    outs, in_grads, grads = Z.reference("evoformer_block")
    for r, (o, gi, gp, ins, summed) in enumerate(pools.run(2, C.zoo_case, "evoformer_block", plan, axes,
                                                          timeout_s=300)):
        assert [repr(p) for p in ins.values()] == ["Shard(0, sizes=[3, 2])", "Replicate()", "Replicate()",
                                                   "Replicate()"]
        assert summed == ["z"]
        for k, (a, b) in enumerate(zip(o, outs, strict=True)):
            close(a, b, f"rank {r} output {k}")
        for (name, p), a, b in zip(ins.items(), gi, in_grads, strict=True):
            if b is None:
                assert a is None, name
                continue
            close(a, shard_of(b, p, r), f"rank {r} gradient of {name}")
        assert set(gp) == set(grads)
        for name, b in grads.items():
            if b is None:
                assert gp[name] is None or not gp[name].any(), name
                continue
            close(gp[name], b, f"rank {r} gradient of {name}")
