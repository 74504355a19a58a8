"""Identity-in-forward ops that fix the placement of a Replicate value's GRADIENT.

A Replicate value (every rank holds the same tensor) gets its gradient from its consumers.
A consumer that ran replicated under a replicated loss gives every rank the same, whole
contribution (Replicate); a consumer that ran on a shard gives each rank its part
(Partial: the true contribution is the sum over ranks). When one value has both kinds of
consumers, the two cannot simply be added: summing over ranks would count the replicated
part P times, and not summing would drop the other ranks' parts. The sharding lowering
(``passes/localize.py``) inserts these ops to make such a gradient one placement, exactly:

- :func:`keep_grad_on_rank` sits on the edge to the replicated consumers: forward the
  identity, backward the incoming gradient on one rank and zeros on every other rank. The
  replicated contribution becomes Partial (its sum over ranks is itself, counted once), so
  the whole gradient is Partial and one all-reduce (of a parameter's gradient, by
  :class:`~foldcompile.distributed.PartialGradReducer`, or an all_gather's reduce-scatter)
  makes it exact: no 1/P scaling, no rounding difference between ranks.
- :func:`sum_grad` turns a Partial gradient into a Replicate one: forward the identity,
  backward an all-reduce (sum) of the gradient. It sits on a full input whose gradient is
  Partial (so ``x.grad`` is whole on every rank) and, with ``outputs="sharded"``, on a
  Replicate output (whose loss terms the ranks sum).

With world size 1 (or no process group) both return their input itself.

    >>> import torch
    >>> from foldcompile.distributed.grad_ops import keep_grad_on_rank, sum_grad
    >>> x = torch.randn(3, requires_grad=True)
    >>> keep_grad_on_rank(x) is x and sum_grad(x) is x          # world size 1: nothing to do
    True

Across processes (``kept_and_summed`` in foldcompile/distributed/examples.py: rank r's
contribution ``r + 1`` kept on rank 0 only, then a sum of every rank's contribution):

    >>> from foldcompile.distributed import spawn
    >>> from foldcompile.distributed.examples import kept_and_summed
    >>> spawn(kept_and_summed, 2)
    [(tensor([1., 1.]), tensor([3., 3.])), (tensor([0., 0.]), tensor([3., 3.]))]
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from foldcompile.distributed.collectives import CollectiveEvent, Hook, world_and_rank

__all__ = ["keep_grad_on_rank", "sum_grad"]


class _KeepOnRank(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, keep: bool) -> torch.Tensor:  # type: ignore[override]
        ctx.keep = keep
        return x.view_as(x)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        # zeros, not None: every rank must run the same backward nodes upstream (SPMD)
        return (grad if ctx.keep else torch.zeros_like(grad)), None


def keep_grad_on_rank(x: torch.Tensor, *, rank: int = 0, group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """The identity; its backward keeps the gradient on ``rank`` and gives zeros elsewhere
    (a Replicate contribution made Partial, counted once). See the module docstring."""
    world, me = world_and_rank(group)
    if world == 1:
        return x
    if not 0 <= rank < world:
        raise ValueError(f"keep_grad_on_rank: rank {rank} is not in a group of {world}")
    return _KeepOnRank.apply(x, me == rank)


class _SumGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group, name: str, hook) -> torch.Tensor:  # type: ignore[override]
        ctx.group, ctx.name, ctx.hook = group, name, hook
        return x.view_as(x)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        total = grad.clone(memory_format=torch.contiguous_format)
        if ctx.hook is not None:
            ctx.hook(CollectiveEvent("backward", "issue", "all_reduce", ctx.name))
        dist.all_reduce(total, group=ctx.group)
        if ctx.hook is not None:
            ctx.hook(CollectiveEvent("backward", "wait", "all_reduce", ctx.name))
        return total, None, None, None


def sum_grad(x: torch.Tensor, *, group: Optional[dist.ProcessGroup] = None, name: str = "x",
             hook: Optional[Hook] = None) -> torch.Tensor:
    """The identity; its backward all-reduces (sums) the gradient over the ranks of ``group``
    (a Partial gradient made Replicate). ``hook`` receives the backward's issue and wait as
    :class:`~foldcompile.distributed.CollectiveEvent` (collective ``"all_reduce"``)."""
    world, _ = world_and_rank(group)
    if world == 1:
        return x
    return _SumGrad.apply(x, group, name, hook)
