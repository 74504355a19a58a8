"""Small rank functions used by the docstring examples of foldcompile.distributed (a
function sent to other processes must be importable, so they live here, not in the
docstrings). Each takes the rank first, as :func:`foldcompile.distributed.spawn` calls it.

    >>> from foldcompile.distributed import spawn
    >>> from foldcompile.distributed.examples import whoami
    >>> spawn(whoami, 2)
    [(0, 2), (1, 2)]
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from foldcompile.distributed.collectives import all_gather, all_to_all_start, split_offsets, split_sizes, wait


def whoami(rank: int) -> tuple[int, int]:
    """``(rank, world size)``."""
    return rank, dist.get_world_size()


def total(rank: int, x: torch.Tensor) -> torch.Tensor:
    """The sum over ranks of ``x * (rank + 1)`` (a plain torch.distributed all_reduce)."""
    y = x * (rank + 1)
    dist.all_reduce(y)
    return y


def rows_to_cols(rank: int) -> torch.Size:
    """A [13, 7] tensor sharded on rows ([5, 4, 4] over 3 ranks) becomes sharded on columns."""
    z = torch.arange(13 * 7.0).view(13, 7)
    sizes = split_sizes(13, dist.get_world_size())
    mine = z[split_offsets(sizes)[rank]:][:sizes[rank]]
    h = all_to_all_start(mine, split_dim=1, cat_dim=0, cat_sizes=13, name="z")
    return wait(h).shape


def gather_rows(rank: int) -> torch.Tensor:
    """Uneven shards [1, 2] of rows gathered on every rank."""
    mine = torch.full((rank + 1, 2), float(rank))
    return all_gather(mine, 0, sizes=[1, 2], grad_placement="replicate")


def bias_gradient(rank: int) -> torch.Tensor:
    """A pair bias sharded on rows, gathered and used by every rank's rows (consumers
    sharded: ``grad_placement="partial"``): each bias row's gradient is the sum of every
    rank's use of it. Rank r uses the whole bias with weight r + 1, so on 2 ranks each
    gradient is 1 + 2 = 3 (a plain split, FastFold's backward, would give 1 on rank 0)."""
    mine = torch.ones(1, 3, requires_grad=True)
    full = all_gather(mine, 0, grad_placement="partial", name="pair_bias")
    (full * (rank + 1)).sum().backward()
    return mine.grad


def kept_and_summed(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank r's use of a replicated tensor has weight r + 1. Its gradient kept on rank 0
    (``keep_grad_on_rank``): rank 0's own contribution there, zeros elsewhere. Summed over
    the ranks (``sum_grad``): 1 + 2 = 3 on 2 ranks, on every rank."""
    from foldcompile.distributed.grad_ops import keep_grad_on_rank, sum_grad

    kept, summed = torch.ones(2, requires_grad=True), torch.ones(2, requires_grad=True)
    (keep_grad_on_rank(kept) * (rank + 1)).sum().backward()
    (sum_grad(summed) * (rank + 1)).sum().backward()
    return kept.grad, summed.grad
