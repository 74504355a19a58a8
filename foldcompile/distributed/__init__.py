"""Dynamic Axial Parallelism runtime: collectives as async autograd pairs with exact
gradients and uneven shards, the Partial-gradient all-reduce, and a local launcher.

The sharding pass emits calls to these; they can also be used by hand (docs/DAP.md).

    >>> import torch
    >>> from foldcompile.distributed import all_to_all_start, wait, split_sizes
    >>> split_sizes(13, 3)
    [5, 4, 4]
    >>> z = torch.randn(13, 13, 8)
    >>> wait(all_to_all_start(z, split_dim=1, cat_dim=0)) is z    # world size 1: elided
    True
"""
from foldcompile.distributed.collectives import (
    CollectiveEvent, GradPlacement, Handle, Sizes, all_gather, all_gather_start, all_reduce,
    all_reduce_start, all_to_all, all_to_all_start, reduce_scatter, reduce_scatter_start, shard,
    split_offsets, split_sizes, wait, world_and_rank,
)
from foldcompile.distributed.grad_sync import PartialGradReducer, ReplicaGradReducer
from foldcompile.distributed.spawn import Pool, RankError, RankTimeoutError, spawn

__all__ = [
    "CollectiveEvent", "GradPlacement", "Handle", "Sizes", "all_gather", "all_gather_start",
    "all_reduce", "all_reduce_start", "all_to_all", "all_to_all_start", "reduce_scatter",
    "reduce_scatter_start", "shard", "split_offsets", "split_sizes", "wait", "world_and_rank",
    "PartialGradReducer", "ReplicaGradReducer", "Pool", "RankError", "RankTimeoutError", "spawn",
]
