"""Random ops on sharded tensors that draw exactly what one process draws.

A random op's values are a function of the generator's state and of each element's place in
the tensor it fills. On a shard that tensor is smaller, so a plain call would draw other
numbers than one process does (and the ranks' generators would drift apart). Here every rank
draws the WHOLE tensor, with the same call one process makes, and keeps its slice: the values
are then those of one process, element for element (the same generator calls on the same
shape and memory layout), and every rank's generator advances exactly as one process's.
That costs the global-sized draw on every rank, transiently (the slice is copied out).

It relies on every rank's generator being in the same state before the call:
:func:`check_generators_agree` compares them across ranks (the sharded module calls it
before every call of a graph with random ops) and raises when they differ.

- :func:`sharded_dropout` — ``F.dropout`` of a shard: the mask is ``F.dropout`` of ones of
  the global shape (the same draw as ``F.dropout`` of the whole input, since dropout draws
  one mask of its input's shape and multiplies), sliced, times the shard.
- :func:`draw_global` — a draw from a whole input (``torch.bernoulli`` of a probability tensor of
  the global shape), sliced; :func:`draw_global_like` — ``rand_like`` / ``randn_like`` of a shard,
  drawn for the whole tensor, sliced.

With a single process these are the op itself on the whole tensor.

    >>> import torch, torch.nn.functional as F
    >>> from foldcompile.distributed.sharded_random import sharded_dropout
    >>> x = torch.randn(7, 4)
    >>> torch.manual_seed(0); whole = F.dropout(x, 0.5, True)
    <torch._C.Generator object at ...>
    >>> torch.manual_seed(0); rows = sharded_dropout(x[3:5], 0.5, True, dim=0, sizes=[3, 2, 2], rank=1)
    <torch._C.Generator object at ...>
    >>> torch.equal(rows, whole[3:5])                        # rank 1 of 3 keeps rows 3:5 of one draw
    True
"""
from __future__ import annotations

import hashlib
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from foldcompile.distributed.collectives import split_offsets

__all__ = ["sharded_dropout", "draw_global", "draw_global_like", "check_generators_agree", "GeneratorMismatchError"]


class GeneratorMismatchError(RuntimeError):
    """The ranks' random generators are not in the same state: sharded random ops would draw
    different values on different ranks than one process does."""


def _empty_laid_out_like(x: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """An empty tensor of ``shape`` whose dims are laid out in memory in ``x``'s order (the
    layout ``empty_like`` would give the whole tensor), contiguous when ``x``'s order is unclear."""
    if x.dim() == 0 or x.is_contiguous() or not _dense(x):
        return torch.empty(tuple(shape), dtype=x.dtype, device=x.device)
    order = sorted(range(x.dim()), key=lambda d: (-x.stride(d), d))      # outermost first
    base = torch.empty(tuple(shape[d] for d in order), dtype=x.dtype, device=x.device)
    inverse = [order.index(d) for d in range(x.dim())]
    return base.permute(inverse)


def _dense(x: torch.Tensor) -> bool:
    """Non-overlapping and dense: its strides are a permutation of a contiguous tensor's."""
    dims = sorted((d for d in range(x.dim()) if x.shape[d] > 1), key=lambda d: x.stride(d))
    expected = 1
    for d in dims:
        if x.stride(d) != expected:
            return False
        expected *= x.shape[d]
    return True


def _whole_shape(x: torch.Tensor, dim: int, sizes: Sequence[int], rank: int, what: str) -> list[int]:
    if not 0 <= rank < len(sizes):
        raise ValueError(f"{what}: rank {rank} has no entry in sizes={list(sizes)}")
    if x.shape[dim] != sizes[rank]:
        raise ValueError(f"{what}: the shard has size {x.shape[dim]} along dim {dim}, but sizes={list(sizes)} "
                         f"give rank {rank} {sizes[rank]}")
    shape = list(x.shape)
    shape[dim] = int(sum(sizes))
    return shape


def _my_slice(whole: torch.Tensor, dim: int, sizes: Sequence[int], rank: int) -> torch.Tensor:
    # a copy, so the global-sized draw is freed as soon as the op returns
    return whole.narrow(dim, split_offsets(sizes)[rank], sizes[rank]).clone()


def sharded_dropout(x: torch.Tensor, p: float, training: bool, *, dim: int, sizes: Sequence[int],
                    rank: int) -> torch.Tensor:
    """``F.dropout`` of the whole tensor, restricted to this rank's shard ``x`` (rows
    ``split_offsets(sizes)[rank]:`` of dim ``dim``). See the module docstring."""
    if not training or p == 0.0:
        return x
    shape = _whole_shape(x, dim, sizes, rank, "sharded_dropout")
    mask = F.dropout(_empty_laid_out_like(x, shape).fill_(1), p, True)
    return x * _my_slice(mask, dim, sizes, rank)


# the draws by name (a lowered graph names them: a function object is no literal of generated code)
_DRAWS: dict[str, Callable[..., torch.Tensor]] = {"bernoulli": torch.bernoulli, "rand_like": torch.rand_like,
                                                  "randn_like": torch.randn_like}


def _draw(op: str | Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    if callable(op):
        return op
    if op not in _DRAWS:
        raise ValueError(f"sharded random draw: unknown op {op!r} (known: {sorted(_DRAWS)})")
    return _DRAWS[op]


def draw_global(op: str | Callable[..., torch.Tensor], whole_input: torch.Tensor, *args: Any, dim: int,
                sizes: Sequence[int], rank: int, **kwargs: Any) -> torch.Tensor:
    """``op(whole_input, *args, **kwargs)`` drawn at the global shape (``whole_input`` is the whole
    tensor, e.g. the probabilities of ``torch.bernoulli``), sliced to this rank's shard along ``dim``.
    ``op`` is the function or its name (``"bernoulli"``).

        >>> import torch
        >>> from foldcompile.distributed.sharded_random import draw_global
        >>> probs = torch.full((1, 7, 2), 0.5)
        >>> torch.manual_seed(1); whole = torch.bernoulli(probs)
        <torch._C.Generator object at ...>
        >>> torch.manual_seed(1); mine = draw_global(torch.bernoulli, probs, dim=1, sizes=[4, 3], rank=0)
        <torch._C.Generator object at ...>
        >>> torch.equal(mine, whole[:, :4])
        True
    """
    whole = _draw(op)(whole_input, *args, **kwargs)
    if whole.shape[dim] != sum(sizes):
        raise ValueError(f"draw_global: {getattr(op, '__name__', op)} gave size {whole.shape[dim]} along dim {dim}, "
                         f"but the shards {list(sizes)} sum to {sum(sizes)}")
    return _my_slice(whole, dim, sizes, rank)


def draw_global_like(op: str | Callable[..., torch.Tensor], x: torch.Tensor, *args: Any, dim: int, sizes: Sequence[int],
                     rank: int, **kwargs: Any) -> torch.Tensor:
    """``op`` (``torch.rand_like``, ``torch.randn_like``, or its name) of the whole tensor whose shard is ``x``,
    sliced to this rank's shard: the draw one process makes for the whole tensor.

        >>> import torch
        >>> from foldcompile.distributed.sharded_random import draw_global_like
        >>> torch.manual_seed(2); whole = torch.rand(5, 3)
        <torch._C.Generator object at ...>
        >>> torch.manual_seed(2); mine = draw_global_like(torch.rand_like, torch.empty(2, 3), dim=0, sizes=[3, 2], rank=1)
        <torch._C.Generator object at ...>
        >>> torch.equal(mine, whole[3:])
        True
    """
    shape = _whole_shape(x, dim, sizes, rank, f"draw_global_like({getattr(op, '__name__', op)})")
    return _my_slice(_draw(op)(_empty_laid_out_like(x, shape), *args, **kwargs), dim, sizes, rank)


def _digest(states: list[torch.Tensor]) -> int:
    h = hashlib.blake2b(digest_size=7)   # 56 bits: fits an int64 with its negation
    for s in states:
        h.update(s.cpu().numpy().tobytes())
    return int.from_bytes(h.digest(), "little")


def check_generators_agree(devices: Sequence[torch.device] = (), *,
                           group: Optional[dist.ProcessGroup] = None) -> None:
    """Raise :class:`GeneratorMismatchError` unless every rank of ``group`` has the same CPU
    generator state (and the same state of each CUDA device in ``devices``). One small
    all-reduce; nothing to do without a process group or at world size 1.

        >>> from foldcompile.distributed.sharded_random import check_generators_agree
        >>> check_generators_agree()          # no process group: nothing to compare
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return
    states = [torch.get_rng_state()]
    states += [torch.cuda.get_rng_state(d) for d in devices if torch.device(d).type == "cuda"]
    h = _digest(states)
    backend = str(dist.get_backend(group)).lower()
    where = "cuda" if "nccl" in backend else "cpu"
    both = torch.tensor([h, -h], dtype=torch.int64, device=where)
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    if int(both[0]) != -int(both[1]):   # max(h) == min(h) iff every rank has the same h
        raise GeneratorMismatchError(
            f"rank {dist.get_rank(group)}: the ranks' random generators are in different states, so the "
            "sharded model's random ops (dropout) would not draw one process's values; seed every rank the "
            "same (torch.manual_seed(seed) on every rank) and draw the same random numbers on every rank "
            "between calls")
