"""The bucketed all-reduce of Partial parameter gradients: Partial ones summed over the
ranks, Replicate ones untouched, accumulation over two backward passes, a parameter used
on one rank only, one unused everywhere, and misuse reported."""
import pytest
import torch

import dist_cases as C


@pytest.mark.parametrize("P", [2, 3])
@pytest.mark.parametrize("steps", [1, 2])
def test_partial_summed_replicate_untouched(pools, P, steps):
    n = 7
    res = pools.run(P, C.reducer_case, n, steps)
    ref = C.reducer_ref(n, steps, P)
    for r, grads in enumerate(res):
        for k in ("enc.weight", "enc.bias", "extra", "dec.weight", "dec.bias"):
            torch.testing.assert_close(grads[k], ref[k], rtol=1e-10, atol=1e-12,
                                       msg=lambda m: f"rank {r} {k}: {m}")
        # never used on any rank: summed zeros (every rank issued the same collectives)
        assert torch.equal(grads["unused"], torch.zeros(2, dtype=torch.float64))


def test_second_backward_before_wait_is_refused(pools):
    for msg, g in pools.run(2, C.reducer_misuse_case):
        assert msg is not None and "call wait() after each backward" in msg
        # the next step after wait() is summed as usual: 3 rows of ones on each of 2 ranks
        assert torch.equal(g, torch.full((2,), 6.0, dtype=torch.float64))
