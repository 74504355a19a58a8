"""Process pools for the distributed tests: one per world size, started on first use and
reused by every test of the session (a rank is a fork of a fork server that imported
torch once), closed at the end. Each pool has its own file:// rendezvous, so parallel
pytest-xdist workers never collide on a port."""
import pytest

from foldcompile.distributed import Pool

COLLECTIVE_TIMEOUT_S = 30.0  # a hung collective in a healthy test fails after this


class Pools:
    def __init__(self):
        self._pools = {}

    def run(self, world_size, fn, *args, timeout_s=None):
        """``fn(rank, *args)`` on the pool of ``world_size``; ``timeout_s``: the parent's deadline for
        the call (default: the collective timeout + 10 s; a whole-model build takes longer)."""
        pool = self._pools.get(world_size)
        if pool is None:
            pool = self._pools[world_size] = Pool(world_size, timeout_s=COLLECTIVE_TIMEOUT_S)
        return pool.run(fn, *args, timeout_s=timeout_s)

    def close(self):
        for pool in self._pools.values():
            pool.close()


@pytest.fixture(scope="session")
def pools():
    p = Pools()
    yield p
    p.close()
