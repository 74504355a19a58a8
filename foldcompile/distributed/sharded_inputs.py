"""``optimize(..., world_size=P, inputs="sharded")``: each rank passes its own shards of the inputs.

The plan places every input of the captured graph (``passes/shard.py``'s seeds): an input shaped like
the MSA or the pair representation is ``Shard(d)`` on its first sequence axis, a mask and any other
input ``Replicate()`` (``dap_axes=`` overrides a seed). With ``inputs="sharded"`` a ``Shard(d)`` input
is passed as this rank's slice of dim ``d`` — rows ``split_offsets(s)[r] : ... + s[r]`` with ``s`` the
plan's split sizes (``split_sizes(n, P)``: the first ``n % P`` ranks one row more) — and a
``Replicate()`` input whole, as for ``inputs="full"``. This module holds that layout
(:class:`InputPlacement`, one per graph input), cuts whole inputs into a rank's shards
(:func:`shard_call`, behind ``ShardedModule.shard_inputs``), refuses a shard of another size
(:func:`check_shards`, naming the input, the dim, the expected local size and the rank), puts the
whole inputs back together from the ranks' shards when a new variant must be built
(:func:`gather_call`), and rewrites a capture's input guards to the local shapes (:func:`local_guards`).

    >>> import torch
    >>> from foldcompile.passes.placement import Placed, Replicate, Shard
    >>> z_rows = InputPlacement("z", Placed(Shard(0), (5, 4, 4), 13), (13, 13, 8))
    >>> z_rows.local_shape(1), InputPlacement("mask", Placed(Replicate()), (13,)).local_shape(1)
    ((4, 13, 8), (13,))
    >>> piece = z_rows.cut(torch.arange(13.0)[:, None, None].expand(13, 13, 8), rank=1)
    >>> piece.shape, piece[:, 0, 0].tolist()                 # rank 1 holds rows 5 .. 8
    (torch.Size([4, 13, 8]), [5.0, 6.0, 7.0, 8.0])
    >>> z_rows.mismatch(torch.zeros(13, 13, 8), rank=1, world=3)
    "input 'z' on rank 1 of 3: dim 0 has size 13, the plan expects this rank's shard of 4 (Shard(0) of 13, split [5, 4, 4])"
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.distributed as dist
import torch.fx
from torch.utils import _pytree as pytree

from foldcompile.capture import flat_inputs
from foldcompile.distributed.collectives import all_gather, split_offsets
from foldcompile.guards import Guards, TensorSpec
from foldcompile.passes.meta import SHARD
from foldcompile.passes.placement import Partial, Placed, Replicate

__all__ = ["InputPlacement", "ShardShapeError", "input_layout", "shard_call", "check_shards", "gather_call",
           "local_guards"]


class ShardShapeError(ValueError):
    """A call's input does not have the shape the plan expects on this rank (a wrong shard, or a whole
    input where the module takes shards)."""


@dataclass(frozen=True)
class InputPlacement:
    """Where one graph input lives: ``placed`` (``Shard(d)`` with the plan's split sizes, or
    ``Replicate()``) and its whole ``shape`` (None: not a tensor)."""

    name: str
    placed: Placed
    shape: Optional[tuple[int, ...]]

    @property
    def dim(self) -> Optional[int]:
        return self.placed.dim

    def local_shape(self, rank: int) -> Optional[tuple[int, ...]]:
        """The shape rank ``rank`` passes: the whole shape, the sharded dim at the rank's split size."""
        if self.shape is None or self.dim is None:
            return self.shape
        out = list(self.shape)
        out[self.dim] = self.placed.split_sizes[rank]
        return tuple(out)

    def cut(self, x: torch.Tensor, rank: int) -> torch.Tensor:
        """Rank ``rank``'s shard of the whole ``x`` (``x`` itself when replicated)."""
        if self.dim is None:
            return x
        sizes = self.placed.split_sizes
        return x.narrow(self.dim, split_offsets(sizes)[rank], sizes[rank])

    def mismatch(self, x: Any, rank: int, world: int) -> Optional[str]:
        """Why ``x`` is not what rank ``rank`` must pass for this input, or None."""
        want = self.local_shape(rank)
        if want is None:
            return None
        where = f"input {self.name!r} on rank {rank} of {world}"
        if not isinstance(x, torch.Tensor):
            return f"{where}: got {type(x).__name__}, the plan expects a tensor of shape {want}"
        got = tuple(x.shape)
        if len(got) != len(want):
            return f"{where}: got {len(got)} dims {got}, the plan expects {len(want)}: {want}"
        for d, (g, w) in enumerate(zip(got, want)):
            if g == w:
                continue
            if d == self.dim:
                return (f"{where}: dim {d} has size {g}, the plan expects this rank's shard of {w} (Shard({d}) "
                        f"of {self.shape[d]}, split {list(self.placed.split_sizes)})")
            kind = "shard" if self.dim is not None else "replicated (whole) input"
            return (f"{where}: dim {d} has size {g}, the plan expects {w} (a {kind} of the whole shape {self.shape}: "
                    "the module is built for the example inputs' sizes; optimize again for other sizes)")
        return None


def input_layout(planned: torch.fx.GraphModule, flat: Sequence[Any]) -> list[InputPlacement]:
    """The plan's placement of every input of ``planned`` (one per placeholder, with ``flat`` the
    whole example values the placeholders take)."""
    out = []
    for ph, value in zip([n for n in planned.graph.nodes if n.op == "placeholder"], flat):
        placed = ph.meta.get(SHARD)
        if not isinstance(placed, Placed) or not isinstance(value, torch.Tensor):
            placed = Placed(Replicate())
        if isinstance(placed.placement, Partial):
            raise ValueError(f"optimize: the plan places input {ph.name!r} as Partial; an input is whole or sharded")
        if placed.dim is not None and sum(placed.split_sizes) != value.shape[placed.dim]:
            raise ValueError(f"optimize: the plan splits input {ph.name!r} dim {placed.dim} as "
                             f"{list(placed.split_sizes)}, which does not sum to its size {value.shape[placed.dim]}")
        out.append(InputPlacement(ph.name, placed, tuple(value.shape) if isinstance(value, torch.Tensor) else None))
    return out


def _by_identity(gm: torch.fx.GraphModule, layout: Sequence[InputPlacement], args: tuple,
                 kwargs: Mapping[str, Any]) -> dict[int, InputPlacement]:
    """Each tensor of a call (by identity) -> the layout of the graph input it is."""
    flat = flat_inputs(gm, args, kwargs)
    if len(flat) != len(layout):
        raise ShardShapeError(f"optimize(inputs='sharded'): this call has {len(flat)} graph inputs, the plan "
                              f"{len(layout)} ({[p.name for p in layout]})")
    found: dict[int, InputPlacement] = {}
    for value, place in zip(flat, layout):
        if not isinstance(value, torch.Tensor):
            continue
        other = found.setdefault(id(value), place)
        if other.placed != place.placed:
            raise ShardShapeError(f"optimize(inputs='sharded'): one tensor is passed as input {other.name!r} "
                                  f"({other.placed!r}) and as {place.name!r} ({place.placed!r}); pass two tensors")
    return found


def _map_tensors(args: tuple, kwargs: Mapping[str, Any], fn) -> tuple[tuple, dict]:
    new_args, new_kwargs = pytree.tree_map(lambda x: fn(x) if isinstance(x, torch.Tensor) else x,
                                           (tuple(args), dict(kwargs)))
    return tuple(new_args), dict(new_kwargs)


def shard_call(gm: torch.fx.GraphModule, layout: Sequence[InputPlacement], rank: int, args: tuple,
               kwargs: Mapping[str, Any]) -> tuple[tuple, dict]:
    """The call ``(args, kwargs)`` (whole inputs) with every sharded input replaced by rank ``rank``'s
    shard: a contiguous copy, a leaf that requires grad as the whole input does (its ``.grad`` is then
    the shard's gradient); replicated inputs are passed on as they are."""
    places = _by_identity(gm, layout, args, kwargs)

    def cut(x: torch.Tensor) -> torch.Tensor:
        place = places.get(id(x))
        if place is None or place.dim is None:
            return x
        if tuple(x.shape) != place.shape:
            raise ShardShapeError(f"shard_inputs takes the whole inputs: input {place.name!r} has shape "
                                  f"{tuple(x.shape)}, the plan's whole shape is {place.shape}")
        return place.cut(x, rank).detach().clone(memory_format=torch.contiguous_format).requires_grad_(x.requires_grad)

    return _map_tensors(args, kwargs, cut)


def check_shards(gm: torch.fx.GraphModule, layout: Sequence[InputPlacement], rank: int, world: int, args: tuple,
                 kwargs: Mapping[str, Any]) -> Optional[str]:
    """The first input of the call that is not what rank ``rank`` must pass (as a message), or None."""
    try:
        _by_identity(gm, layout, args, kwargs)
    except ShardShapeError as e:
        return str(e)
    flat = flat_inputs(gm, args, kwargs)
    for value, place in zip(flat, layout):
        why = place.mismatch(value, rank, world)
        if why:
            return why
    return None


def contiguous_call(args: tuple, kwargs: Mapping[str, Any]) -> tuple[tuple, dict]:
    """The call with every tensor contiguous (the rank's graph is built for contiguous shards; a
    ``.contiguous()`` copy keeps the caller's autograd link)."""
    return _map_tensors(args, kwargs, lambda x: x if x.is_contiguous() else x.contiguous())


def gather_call(gm: torch.fx.GraphModule, layout: Sequence[InputPlacement], args: tuple, kwargs: Mapping[str, Any],
                group: Optional[dist.ProcessGroup] = None) -> tuple[tuple, dict]:
    """The whole inputs of a call made with the ranks' shards (every rank calls it, in the same order):
    each sharded input all-gathered (no autograd; ``requires_grad`` as the shard's), replicated ones as
    they are. Used to build a variant for a call the cache has not seen."""
    places = _by_identity(gm, layout, args, kwargs)
    kw = {"group": group} if group is not None else {}

    def whole(x: torch.Tensor) -> torch.Tensor:
        place = places.get(id(x))
        if place is None or place.dim is None:
            return x
        with torch.no_grad():
            full = all_gather(x.detach().contiguous(), place.dim, grad_placement="replicate",
                              sizes=list(place.placed.split_sizes), name=place.name, **kw)
        return full.clone().requires_grad_(x.requires_grad)

    return _map_tensors(args, kwargs, whole)


def _contiguous_strides(shape: Sequence[int]) -> tuple[Optional[int], ...]:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(None if n == 1 else step)
        step *= max(int(n), 1)
    return tuple(reversed(strides))


def local_guards(guards: Guards, example_args: tuple, example_kwargs: Mapping[str, Any], gm: torch.fx.GraphModule,
                 layout: Sequence[InputPlacement], rank: int) -> Guards:
    """A copy of a capture's guards whose sharded inputs are guarded at this rank's local, contiguous
    shapes (``example_args``: the whole example call the capture saw)."""
    places = _by_identity(gm, layout, example_args, example_kwargs)
    bound = guards.bind(tuple(example_args), dict(example_kwargs))
    inputs = {}
    for name, (spec, leaf_specs) in guards.inputs.items():
        leaves = pytree.tree_leaves(bound.arguments[name])
        new_specs = list(leaf_specs)
        for i, (leaf, want) in enumerate(zip(leaves, leaf_specs)):
            place = places.get(id(leaf)) if isinstance(leaf, torch.Tensor) else None
            if place is not None and place.dim is not None and isinstance(want, TensorSpec):
                shape = place.local_shape(rank)
                new_specs[i] = TensorSpec(shape, want.dtype, want.device, want.layout, want.requires_grad,
                                          _contiguous_strides(shape))
        inputs[name] = (spec, new_specs)
    out = copy.copy(guards)
    out.inputs = inputs
    out.fast = None
    return out
