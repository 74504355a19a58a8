"""The launcher: results come back in rank order; a rank that raises, a collective that
hangs (one rank skips it), a rank that dies and a rank that never finishes each end in a
clear error naming the rank, within a few seconds, never a silent hang."""
import pytest
import torch

import dist_cases as C
from foldcompile.distributed import Pool, RankError, RankTimeoutError, spawn


def test_spawn_returns_every_rank_result():
    res = spawn(C.ranks_case, 2, torch.ones(2, dtype=torch.float64))
    assert [r[:2] for r in res] == [(0, 2), (1, 2)]
    assert torch.equal(res[1][2], torch.full((2,), 2.0, dtype=torch.float64))


def test_rank_error_names_the_rank_and_pool_recovers():
    with Pool(2, timeout_s=5) as pool:
        with pytest.raises(RankError, match=r"rank 1 raised ValueError: boom on purpose") as info:
            pool.run(C.raise_case)
        assert info.value.rank == 1 and "raise_case" in info.value.remote_traceback
        assert pool.run(C.ranks_case, 1.0)[1][:2] == (1, 2)  # fresh processes, same pool


def test_hung_collective_is_a_timeout_naming_the_rank():
    with Pool(2, timeout_s=2) as pool:
        with pytest.raises(RankTimeoutError) as info:
            pool.run(C.hang_case)
    msg = str(info.value)
    assert info.value.ranks == [0] and isinstance(info.value, TimeoutError)
    assert "rank 0: a collective timed out after 2 s" in msg and "ranks [1] finished hang_case" in msg


def test_dead_rank_is_reported():
    with Pool(2, timeout_s=20) as pool:
        with pytest.raises(RankTimeoutError, match=r"rank 1 died \(exit code 7\)") as info:
            pool.run(C.die_case)
    assert info.value.ranks == [1]


def test_parent_deadline_names_the_unfinished_rank():
    with Pool(2, timeout_s=20) as pool:
        with pytest.raises(RankTimeoutError, match=r"ranks \[1\] did not finish sleep_case within 1 s"):
            pool.run(C.sleep_case, 30.0, timeout_s=1.0)


def test_unpicklable_function_is_refused():
    with Pool(1) as pool:
        with pytest.raises(TypeError, match="must be picklable"):
            pool.run(lambda rank: rank)
