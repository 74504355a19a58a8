"""A DAP-style block written by hand with the collectives (row attention over the pair
sharded on rows with an all_gathered pair bias, all_to_all to columns, column attention,
all_to_all back, a triangle-multiplication-like product with one operand gathered),
against the same block in one process: output, input gradient and every parameter
gradient (float64, rtol 1e-10), Partial parameter gradients summed by the bucketed
reducer during backward; and the order of issue / compute / wait in both directions."""
import pytest
import torch

import dist_cases as C

RTOL, ATOL = 1e-10, 1e-12


def close(actual, expected, what):
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}: {m}")


def between(log, phase, start, wait):
    """The events of ``phase`` strictly between the issue ``start`` and the wait ``wait``."""
    events = [e for e in log if e[0] == phase]
    i = events.index((phase, "issue", start))
    j = events.index((phase, "wait", wait))
    assert i < j, f"{phase}: {start} waited before it was issued"
    return events[i + 1:j]


@pytest.mark.parametrize("P,n", [(2, 7), (3, 13), (3, 5),
                                 pytest.param(8, 13, marks=pytest.mark.full),
                                 pytest.param(8, 5, marks=pytest.mark.full)])   # 5 over 8: empty shards
@pytest.mark.parametrize("loss", ["replicated", "sharded"])
def test_block_equals_one_process(pools, P, n, loss):
    res = pools.run(P, C.block_case, n, loss)
    out, gz, gp = C.block_ref(n, loss)
    assert len(gp) == 25
    for r, (o, g, grads, log) in enumerate(res):
        close(o, C.piece(out, 0, r, P), f"rank {r} output")
        close(g, C.piece(gz, 0, r, P), f"rank {r} input gradient")
        for k, ref in gp.items():
            close(grads[k], ref, f"rank {r} gradient of {k}")


def test_block_overlap_and_bucket_order(pools):
    res = pools.run(3, C.block_case, 13, "replicated")
    for r, (*_, log) in enumerate(res):
        # forward: the gathers are in flight while independent compute runs
        assert between(log, "forward", "all_gather:pair_bias", "all_gather:pair_bias") == [
            ("forward", "compute", "qkv")]
        assert between(log, "forward", "all_gather:tri_b", "all_gather:tri_b") == [
            ("forward", "compute", "tri_gate")]
        # backward: wait's backward issues the reduce-scatter, the same compute's backward
        # runs, then start's backward waits
        for name, tag in [("pair_bias", "qkv"), ("tri_b", "tri_gate")]:
            inside = between(log, "backward", f"reduce_scatter:{name}", f"reduce_scatter:{name}")
            assert ("backward", "compute", tag) in inside, (r, name, inside)
        # the output gather's backward is a local slice (replicated loss), no traffic
        assert ("backward", "issue", "local_slice:output") in log
        # Partial parameter gradients: buckets issued during backward, in bucket order, all
        # before the backward of the first layers had run; waited after backward
        issued = [e[2] for e in log if e[0] == "backward" and e[1] == "issue" and "grad_bucket" in e[2]]
        assert issued == [f"all_reduce:grad_bucket{i}" for i in range(len(issued))] and len(issued) > 10
        end = log.index(("backward", "end", ""))
        first_bucket = log.index(("backward", "issue", "all_reduce:grad_bucket0"))
        assert first_bucket < log.index(("backward", "compute", "qkv")) < end
        waits = [i for i, e in enumerate(log) if e[1] == "wait" and "grad_bucket" in e[2]]
        assert len(waits) == len(issued) and min(waits) > end
