"""Placements of a sharded graph: the contract between the DAP planning pass and its lowering.

The vocabulary is ``torch.distributed.tensor``'s own placement types, used as plain values
(no DTensor, no runtime dispatch): ``Shard(d)`` (rank r holds rows
``split_offsets(s)[r] : + s[r]`` of dim d, ``s = split_sizes(n, P)``), ``Replicate()`` (every
rank holds the whole) and ``Partial()`` (the value is the sum of the ranks' tensors).

A planned graph (``shard_pass``) is still a single-process graph over GLOBAL sizes:

- every node that produces a tensor has ``node.meta["shard"]`` = :class:`Placed` (its output's
  placement and, for a ``Shard``, the per-rank split sizes of the sharded dim at the example
  sizes and the dim's symbolic global length); multi-output nodes hold a tuple of them;
- every change of placement is an explicit node ``redistribute(x, src, dst)``, which is the
  identity on one process, so a planned graph runs, verifies and shape-propagates as it is.

The lowering turns each ``redistribute`` into the collective of :func:`transition_kind`
(``foldcompile.distributed``'s start/wait pairs) and every literal size into the rank's local
size.

    >>> import torch
    >>> from foldcompile.passes.placement import Shard, Replicate, Partial, redistribute, transition_kind
    >>> x = torch.randn(4, 3)
    >>> redistribute(x, Shard(0), Shard(1)) is x
    True
    >>> transition_kind(Shard(0), Shard(1)), transition_kind(Shard(1), Replicate()), transition_kind(Partial(), Shard(0))
    ('all_to_all', 'all_gather', 'reduce_scatter')
    >>> transition_kind(Replicate(), Shard(0)), transition_kind(Partial(), Replicate()), transition_kind(Shard(0), Shard(0))
    ('slice', 'all_reduce', None)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import sympy
import torch
from torch.distributed.tensor import Partial, Replicate, Shard
from torch.distributed.tensor.placement_types import Placement

from foldcompile.passes.registry import COMM, register_op
from foldcompile.passes.shape_rules import RuleContext

__all__ = ["Shard", "Replicate", "Partial", "Placement", "Placed", "redistribute", "transition_kind",
           "TRANSITION_KINDS"]

# what a redistribute becomes at run time (docs/DAP.md, "The collectives and their backward rules")
TRANSITION_KINDS = ("all_to_all", "all_gather", "reduce_scatter", "all_reduce", "slice")


@dataclass(frozen=True)
class Placed:
    """``node.meta["shard"]``: where a node's output lives on the ranks.

    ``placement``: ``Shard(d)`` / ``Replicate()`` / ``Partial()``. For a ``Shard(d)``:
    ``split_sizes`` are the per-rank lengths of dim d at the example sizes (uneven where it does
    not divide: ``split_sizes(13, 3) == [5, 4, 4]``; a dim a view merged from several keeps the
    outermost one's split in blocks of the inner sizes: ``[5, 4, 4]`` times N_res for
    ``[N_seq, N_res] -> [N_seq * N_res]``) and ``global_size`` that dim's symbolic length
    (``N_res``), from which the lowering writes each rank's local size. Two placements of one
    dim with different split sizes are different placements (a redistribute between them goes
    through ``Replicate()``).
    """

    placement: Placement
    split_sizes: Optional[tuple[int, ...]] = None
    global_size: Optional[sympy.Expr] = None

    def __post_init__(self) -> None:
        if not isinstance(self.placement, (Shard, Replicate, Partial)):
            raise TypeError(f"Placed: placement must be Shard(d), Replicate() or Partial(), got {self.placement!r}")
        if isinstance(self.placement, Shard) and self.split_sizes is None:
            raise ValueError(f"Placed({self.placement}): a Shard needs its split sizes")
        if not isinstance(self.placement, Shard) and self.split_sizes is not None:
            raise ValueError(f"Placed({self.placement}): only a Shard has split sizes")

    @property
    def dim(self) -> Optional[int]:
        """The sharded dim, or None."""
        return self.placement.dim if isinstance(self.placement, Shard) else None

    def __repr__(self) -> str:
        if isinstance(self.placement, Shard):
            return f"Shard({self.placement.dim}, sizes={list(self.split_sizes or ())})"
        return "Replicate()" if isinstance(self.placement, Replicate) else "Partial()"


def transition_kind(src: Placement, dst: Placement) -> Optional[str]:
    """The collective that takes a tensor from placement ``src`` to ``dst`` (None: nothing to do)."""
    if src == dst:
        return None
    if isinstance(src, Shard):
        if isinstance(dst, Shard):
            return "all_to_all"
        if isinstance(dst, Replicate):
            return "all_gather"
    elif isinstance(src, Partial):
        if isinstance(dst, Shard):
            return "reduce_scatter"
        if isinstance(dst, Replicate):
            return "all_reduce"
    elif isinstance(src, Replicate):
        if isinstance(dst, Shard):
            return "slice"
    raise ValueError(f"no transition from {src} to {dst}: a sharded or replicated value never becomes Partial "
                     "by a collective")


def redistribute(x: torch.Tensor, src: Placement, dst: Placement) -> torch.Tensor:
    """A planned change of placement: the identity on one process (the lowering replaces it)."""
    transition_kind(src, dst)   # refuses an impossible pair where the plan is built, not at run time
    return x


_PlacementArg = Union[Shard, Replicate, Partial]


@register_op(redistribute, name="redistribute", op_class=COMM,
             samples=lambda: [((torch.randn(6, 5), Shard(0), Shard(1)), {})])
def _rule_redistribute(ctx: RuleContext):
    """Global shapes: a planned transition keeps its input's shape."""
    return ctx.tshape(0)[1]
