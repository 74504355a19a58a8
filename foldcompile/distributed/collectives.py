"""DAP collectives as asynchronous autograd pairs, with exact gradients and uneven shards.

Every collective comes in three spellings::

    h = all_to_all_start(x, split_dim=1, cat_dim=0, cat_sizes=N)   # issues, returns a Handle
    ...                                                           # independent compute
    y = wait(h)                                                   # blocks, returns the tensor
    y = all_to_all(x, split_dim=1, cat_dim=0, cat_sizes=N)        # start + wait in one call

``start`` and ``wait`` are two autograd nodes. Forward: ``start`` issues the collective
(``async_op=True``) and ``wait`` blocks on it. Backward runs them in the other order:
``wait``'s backward ISSUES the transposed collective on the incoming gradient and
``start``'s backward waits for it, so whatever autograd runs between the two nodes (the
backward of the compute that sat between start and wait in forward) overlaps with the
communication in both directions. Nothing is global: the :class:`Handle` carries the
in-flight work, its buffers, the split sizes and the slot for the backward's work.

Backward rules (derivations in docs/DAP.md):

=====================================  =====================================================
collective (forward)                   backward (on the output's gradient)
=====================================  =====================================================
``all_to_all`` split s, concat c        ``all_to_all`` split c, concat s (the inverse)
``all_gather`` ``grad_placement=       ``reduce_scatter``: every rank's consumer gradient is a
"partial"``                             partial sum; the true gradient of a shard is their sum
``all_gather`` ``grad_placement=       local slice: every rank holds the whole, identical
"replicate"``                           gradient, so the shard's slice is already the answer
``reduce_scatter``                      ``all_gather`` (each summand gets the whole gradient)
``all_reduce`` ``grad_placement=       identity: y = sum_r x_r, so dL/dx_r = dL/dy, which every
"replicate"``                           rank already holds
``all_reduce`` ``grad_placement=       ``all_reduce``: dL/dy itself is spread over the ranks
"partial"``                             as a partial sum
=====================================  =====================================================

Uneven shards: a length ``n`` split over ``P`` ranks gives the first ``n % P`` ranks one
more element (:func:`split_sizes`; 13 over 3 is ``[5, 4, 4]``). A ``sizes`` argument is the
shard size of every rank, or the global length (an ``int``, split by :func:`split_sizes`),
or ``None`` for even shards (every rank's size equals this rank's). all_to_all sends exact
splits; all_gather pads to the largest shard inside the collective and slices the padding
off before returning, so the math around it never sees padding.

With a world size of 1 (or no process group at all) every collective is elided: ``wait``
returns the input tensor itself, no copy, no autograd node. ``force=True`` runs the real
collective anyway (it then needs a process group), e.g. to exercise NCCL on one GPU.

    >>> import torch
    >>> from foldcompile.distributed import all_to_all_start, wait, split_sizes
    >>> split_sizes(13, 3)
    [5, 4, 4]
    >>> x = torch.randn(5, 13, 8)                     # no process group: world size 1
    >>> h = all_to_all_start(x, split_dim=1, cat_dim=0, name="z")
    >>> wait(h) is x                                  # elided, zero overhead
    True
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Literal, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

__all__ = [
    "GradPlacement", "Sizes", "CollectiveEvent", "Handle", "split_sizes", "split_offsets",
    "all_to_all_start", "all_gather_start", "reduce_scatter_start", "all_reduce_start",
    "wait", "all_to_all", "all_gather", "reduce_scatter", "all_reduce", "shard",
    "world_and_rank",
]

GradPlacement = Literal["partial", "replicate"]
Sizes = Union[int, Sequence[int], None]


# --------------------------------------------------------------------------- split sizes

def split_sizes(length: int, parts: int) -> list[int]:
    """The shard sizes of ``length`` elements over ``parts`` ranks: the first
    ``length % parts`` ranks hold one more. Used by every collective here.

        >>> split_sizes(13, 3), split_sizes(7, 3), split_sizes(2, 3)
        ([5, 4, 4], [3, 2, 2], [1, 1, 0])
    """
    if not isinstance(length, int) or isinstance(length, bool) or length < 0:
        raise ValueError(f"split_sizes: length must be an int >= 0, got {length!r}")
    if not isinstance(parts, int) or isinstance(parts, bool) or parts < 1:
        raise ValueError(f"split_sizes: parts must be an int >= 1, got {parts!r}")
    base, extra = divmod(length, parts)
    return [base + 1 if r < extra else base for r in range(parts)]


_even_split = split_sizes  # for the functions whose ``split_sizes`` argument shadows it


def split_offsets(sizes: Sequence[int]) -> list[int]:
    """Start offsets of consecutive shards.

        >>> split_offsets([5, 4, 4])
        [0, 5, 9]
    """
    out, acc = [], 0
    for s in sizes:
        out.append(acc)
        acc += s
    return out


# --------------------------------------------------------------------------- events (test hook)

@dataclasses.dataclass(frozen=True)
class CollectiveEvent:
    """One step of a collective, passed to the ``hook`` of a ``*_start`` call.

    ``phase`` is ``"forward"`` or ``"backward"``, ``action`` is ``"issue"`` or ``"wait"``
    (recorded after the wait returned), ``collective`` the operation that ran in that
    phase (in backward the transposed one, e.g. ``"reduce_scatter"`` for an all_gather)
    and ``name`` the tensor's name given to ``start``.
    """
    phase: str
    action: str
    collective: str
    name: str


Hook = Callable[[CollectiveEvent], None]


# --------------------------------------------------------------------------- process group

@dataclasses.dataclass(frozen=True)
class _Comm:
    group: Optional[dist.ProcessGroup]
    rank: int
    world: int

    def native(self, t: torch.Tensor) -> bool:
        """Use NCCL's tensor collectives (all_gather_into_tensor, reduce_scatter_tensor)?
        Elsewhere (gloo) the portable forms: list all_gather, all_to_all_single."""
        return t.is_cuda and "nccl" in str(dist.get_backend(self.group)).lower()


def world_and_rank(group: Optional[dist.ProcessGroup] = None) -> tuple[int, int]:
    """``(world size, rank)`` of ``group``; ``(1, 0)`` when no process group exists.

        >>> from foldcompile.distributed import world_and_rank
        >>> world_and_rank()
        (1, 0)
    """
    if not (dist.is_available() and dist.is_initialized()):
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def _comm(kind: str, name: str, group: Optional[dist.ProcessGroup], force: bool) -> Optional[_Comm]:
    """The communicator, or None when the collective is elided (world size 1, not forced)."""
    if not (dist.is_available() and dist.is_initialized()):
        if force:
            raise RuntimeError(f"{kind} '{name}': force=True needs an initialized process group "
                               "(torch.distributed.init_process_group or foldcompile.distributed.spawn)")
        return None
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if rank < 0:
        raise RuntimeError(f"{kind} '{name}': this process is not a member of the given group")
    if world == 1 and not force:
        return None
    return _Comm(group, rank, world)


# --------------------------------------------------------------------------- checks

def _norm_dim(dim: int, ndim: int, what: str, where: str) -> int:
    if not isinstance(dim, int) or isinstance(dim, bool) or not -ndim <= dim < ndim:
        raise ValueError(f"{where}: {what}={dim!r} is out of range for a {ndim}-d tensor")
    return dim % ndim


def _sizes(sizes: Sizes, local: int, comm: _Comm, what: str, where: str) -> tuple[int, ...]:
    """Resolve a ``sizes`` argument to every rank's shard size and check this rank's."""
    if sizes is None:
        out = [local] * comm.world
    elif isinstance(sizes, int) and not isinstance(sizes, bool):
        out = split_sizes(sizes, comm.world)
    else:
        out = [int(s) for s in sizes]
        if len(out) != comm.world or any(s < 0 for s in out):
            raise ValueError(f"{where}: {what}={list(sizes)} must give one size >= 0 for each of "
                             f"the {comm.world} ranks")
    if out[comm.rank] != local:
        raise ValueError(f"{where}: the tensor's size {local} along the sharded dim does not match "
                         f"rank {comm.rank}'s shard size {out[comm.rank]} from {what}={out}")
    return tuple(out)


def _where(kind: str, name: str, comm: _Comm) -> str:
    return f"{kind} '{name}' on rank {comm.rank}"


def _check_tensor(x: object, kind: str, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{kind} '{name}': expected a torch.Tensor, got {type(x).__name__}")


# --------------------------------------------------------------------------- buffers

def _empty_lead(shape: Sequence[int], lead: int, like: torch.Tensor) -> torch.Tensor:
    """A fresh (non-view) tensor of ``shape`` whose memory has dim ``lead`` outermost and
    the other dims in order. Its ``movedim(lead, 0)`` is contiguous, so a collective can
    write it as one flat buffer and the result is returned without a copy or a view."""
    order = [lead] + [d for d in range(len(shape)) if d != lead]
    strides = [0] * len(shape)
    acc = 1
    for d in reversed(order):
        strides[d] = acc
        acc *= max(int(shape[d]), 1)
    return torch.empty_strided(tuple(shape), tuple(strides), dtype=like.dtype, device=like.device)


def _flat(t: torch.Tensor) -> torch.Tensor:
    """The flat 1-d view of a tensor made by :func:`_empty_lead` (or any dense tensor)."""
    return t.as_strided((t.numel(),), (1,))


def _with(shape: Sequence[int], dim: int, size: int) -> list[int]:
    s = list(shape)
    s[dim] = size
    return s


class _Inflight:
    """Issued communication: the work handle, the buffers it uses, and how to finish."""

    __slots__ = ("work", "keep", "finish")

    def __init__(self, work, keep: tuple, finish: Callable[[], torch.Tensor]):
        self.work, self.keep, self.finish = work, keep, finish

    def wait(self) -> torch.Tensor:
        if self.work is not None:
            self.work.wait()
        out = self.finish()
        self.work = self.keep = self.finish = None
        return out


# --------------------------------------------------------------------------- the collectives
# Each spec knows how to issue itself on a tensor and what its transpose (the backward) is.

@dataclasses.dataclass(frozen=True)
class _AllToAll:
    split_dim: int
    cat_dim: int
    split_sizes: tuple[int, ...]   # every rank's output shard along split_dim
    cat_sizes: tuple[int, ...]     # every rank's input shard along cat_dim
    kind = "all_to_all"

    def issue(self, x: torch.Tensor, comm: _Comm, where: str) -> _Inflight:
        s, c, r = self.split_dim, self.cat_dim, comm.rank
        if x.shape[c] != self.cat_sizes[r] or x.shape[s] != sum(self.split_sizes):
            raise ValueError(f"{where}: got shape {tuple(x.shape)}, expected size {self.cat_sizes[r]} "
                             f"along cat_dim={c} and {sum(self.split_sizes)} along split_dim={s}")
        # Send: for each destination j, the slab x[..., split j, ...] laid out with cat_dim
        # outermost, so what rank j receives from all ranks concatenates along cat_dim.
        send = x.new_empty(x.numel())
        in_splits, off = [], 0
        for j, (o, m) in enumerate(zip(split_offsets(self.split_sizes), self.split_sizes)):
            slab = x.narrow(s, o, m).movedim(c, 0)
            send[off:off + slab.numel()].view(slab.shape).copy_(slab)
            in_splits.append(slab.numel())
            off += slab.numel()
        out_shape = _with(_with(x.shape, s, self.split_sizes[r]), c, sum(self.cat_sizes))
        inner = math.prod(n for d, n in enumerate(out_shape) if d != c)  # elements per cat_dim row
        out = _empty_lead(out_shape, c, x)
        out_splits = [n * inner for n in self.cat_sizes]
        work = dist.all_to_all_single(_flat(out), send, out_splits, in_splits,
                                      group=comm.group, async_op=True)
        return _Inflight(work, (send,), lambda: out)

    def transpose(self) -> "_AllToAll":
        return _AllToAll(self.cat_dim, self.split_dim, self.cat_sizes, self.split_sizes)


@dataclasses.dataclass(frozen=True)
class _AllGather:
    dim: int
    sizes: tuple[int, ...]
    grad_placement: str
    kind = "all_gather"

    def issue(self, x: torch.Tensor, comm: _Comm, where: str) -> _Inflight:
        d, r, P = self.dim, comm.rank, comm.world
        if x.shape[d] != self.sizes[r]:
            raise ValueError(f"{where}: got shape {tuple(x.shape)}, expected size {self.sizes[r]} "
                             f"along dim={d}")
        mx = max(self.sizes)
        even = all(n == mx for n in self.sizes)
        moved = x.movedim(d, 0)
        if even and moved.is_contiguous():
            send = moved
        else:  # pad to the largest shard: the padding exists only inside the collective
            send = x.new_empty((mx,) + tuple(moved.shape[1:]))
            send[:self.sizes[r]].copy_(moved)
            send[self.sizes[r]:].zero_()
        out = _empty_lead(_with(x.shape, d, sum(self.sizes)), d, x)
        recv = out.movedim(d, 0) if even else x.new_empty((P * mx,) + tuple(moved.shape[1:]))
        if comm.native(x):
            work = dist.all_gather_into_tensor(recv, send, group=comm.group, async_op=True)
        else:
            work = dist.all_gather(list(recv.chunk(P)) if mx else [recv[:0]] * P, send,
                                   group=comm.group, async_op=True)

        def finish() -> torch.Tensor:
            if not even:  # slice the padding off, straight into the result
                dst = out.movedim(d, 0)
                for q, (o, n) in enumerate(zip(split_offsets(self.sizes), self.sizes)):
                    dst[o:o + n].copy_(recv[q * mx:q * mx + n])
            return out
        return _Inflight(work, (send, recv), finish)

    def transpose(self):
        if self.grad_placement == "partial":
            return _ReduceScatter(self.dim, self.sizes)
        return _LocalSlice(self.dim, self.sizes)


@dataclasses.dataclass(frozen=True)
class _ReduceScatter:
    dim: int
    sizes: tuple[int, ...]
    kind = "reduce_scatter"

    def issue(self, x: torch.Tensor, comm: _Comm, where: str) -> _Inflight:
        d, r, P = self.dim, comm.rank, comm.world
        if x.shape[d] != sum(self.sizes):
            raise ValueError(f"{where}: got shape {tuple(x.shape)}, expected size {sum(self.sizes)} "
                             f"along dim={d}")
        n = self.sizes[r]
        out = _empty_lead(_with(x.shape, d, n), d, x)
        moved = x.movedim(d, 0).contiguous()
        rest = tuple(moved.shape[1:])
        if comm.native(x) and all(s == n for s in self.sizes):
            work = dist.reduce_scatter_tensor(out.movedim(d, 0), moved, group=comm.group, async_op=True)
            return _Inflight(work, (moved,), lambda: out)
        # Portable and uneven: every rank sends rank j its rows of j's shard (one all_to_all,
        # the same bytes as a ring reduce-scatter) and sums what it receives in rank order.
        recv = x.new_empty((P * n,) + rest)
        work = dist.all_to_all_single(recv, moved, [n] * P, list(self.sizes),
                                      group=comm.group, async_op=True)

        def finish() -> torch.Tensor:
            torch.sum(recv.view((P, n) + rest), 0, out=out.movedim(d, 0))
            return out
        return _Inflight(work, (moved, recv), finish)

    def transpose(self) -> _AllGather:
        return _AllGather(self.dim, self.sizes, "replicate")


@dataclasses.dataclass(frozen=True)
class _AllReduce:
    grad_placement: str
    kind = "all_reduce"

    def issue(self, x: torch.Tensor, comm: _Comm, where: str) -> _Inflight:
        buf = x.clone(memory_format=torch.contiguous_format)
        work = dist.all_reduce(buf, group=comm.group, async_op=True)
        return _Inflight(work, (), lambda: buf)

    def transpose(self):
        return _AllReduce("replicate") if self.grad_placement == "partial" else _Identity()


@dataclasses.dataclass(frozen=True)
class _LocalSlice:
    """The backward of a replicated-gradient all_gather: this rank's slice, no traffic."""
    dim: int
    sizes: tuple[int, ...]
    kind = "local_slice"

    def issue(self, x: torch.Tensor, comm: _Comm, where: str) -> _Inflight:
        o = split_offsets(self.sizes)[comm.rank]
        return _Inflight(None, (), lambda: x.narrow(self.dim, o, self.sizes[comm.rank]))


@dataclasses.dataclass(frozen=True)
class _Identity:
    """The backward of a replicated-gradient all_reduce."""
    kind = "identity"

    def issue(self, x: torch.Tensor, comm: _Comm, where: str) -> _Inflight:
        return _Inflight(None, (), lambda: x)


# --------------------------------------------------------------------------- the handle and the pair

class Handle:
    """An issued collective: returned by the ``*_start`` functions, consumed once by
    :func:`wait`. It carries everything the pair needs (the in-flight work and its
    buffers, the split sizes, the slot for the backward's work); nothing is global.
    """

    __slots__ = ("spec", "name", "comm", "hook", "_inflight", "_token", "_result",
                 "_grad_inflight", "_waited", "__weakref__")

    def __init__(self, spec, name: str, comm: Optional[_Comm], hook: Optional[Hook]):
        self.spec, self.name, self.comm, self.hook = spec, name, comm, hook
        self._inflight: Optional[_Inflight] = None
        self._token: Optional[torch.Tensor] = None
        self._result: Optional[torch.Tensor] = None
        self._grad_inflight: Optional[_Inflight] = None
        self._waited = False

    @property
    def kind(self) -> str:
        """The collective's name, e.g. ``"all_to_all"``."""
        return self.spec.kind

    @property
    def elided(self) -> bool:
        """True when no communication happens (world size 1, not forced)."""
        return self.comm is None

    def wait(self) -> torch.Tensor:
        """Same as :func:`wait` on this handle."""
        return wait(self)

    def _emit(self, phase: str, action: str, collective: str) -> None:
        if self.hook is not None:
            self.hook(CollectiveEvent(phase, action, collective, self.name))

    def _where(self) -> str:
        return _where(self.spec.kind, self.name, self.comm)

    def __repr__(self) -> str:
        state = "elided" if self.elided else ("waited" if self._waited else "in flight")
        return f"<Handle {self.spec.kind} '{self.name}' {state}>"


class _Start(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, handle: Handle) -> torch.Tensor:  # type: ignore[override]
        handle._inflight = handle.spec.issue(x, handle.comm, handle._where())
        handle._emit("forward", "issue", handle.spec.kind)
        ctx.handle = handle
        return x.new_empty(0)  # the token: the autograd edge from start to wait

    @staticmethod
    @once_differentiable
    def backward(ctx, _token_grad: torch.Tensor):  # type: ignore[override]
        h: Handle = ctx.handle
        inflight, h._grad_inflight = h._grad_inflight, None
        if inflight is None:
            raise RuntimeError(f"{h._where()}: the backward of start ran before the backward of "
                               "wait issued the transposed collective")
        grad = inflight.wait()
        h._emit("backward", "wait", h.spec.transpose().kind)
        return grad, None


class _Wait(torch.autograd.Function):
    @staticmethod
    def forward(ctx, token: torch.Tensor, handle: Handle) -> torch.Tensor:  # type: ignore[override]
        out = handle._inflight.wait()
        handle._inflight = None
        handle._emit("forward", "wait", handle.spec.kind)
        ctx.handle = handle
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        h: Handle = ctx.handle
        t = h.spec.transpose()
        h._grad_inflight = t.issue(grad, h.comm, _where(t.kind, h.name, h.comm) + " (backward)")
        h._emit("backward", "issue", t.kind)
        return grad.new_zeros(0), None


def _start(spec_of: Callable[[_Comm], object], kind: str, x: torch.Tensor, name: str,
           group, force: bool, hook: Optional[Hook], validate: bool) -> Handle:
    _check_tensor(x, kind, name)
    comm = _comm(kind, name, group, force)
    if comm is None:  # elided: no copy, no autograd node
        h = Handle(_Elided(kind), name, None, hook)
        h._result = x
        return h
    if validate:  # every rank takes part in the exchange, so every rank raises the same error
        try:
            spec, err = spec_of(comm), None
        except ValueError as e:
            spec, err = None, str(e)
        _validate(kind, spec, err, x, name, comm)
    else:
        spec = spec_of(comm)
    h = Handle(spec, name, comm, hook)
    if torch.is_grad_enabled() and x.requires_grad:
        h._token = _Start.apply(x, h)
    else:
        h._inflight = spec.issue(x, comm, h._where())
        h._emit("forward", "issue", kind)
    return h


@dataclasses.dataclass(frozen=True)
class _Elided:
    kind: str


def wait(handle: Handle) -> torch.Tensor:
    """Block until ``handle``'s collective is done and return its result (once per handle).

    In backward this node issues the transposed collective; the matching ``start``
    waits for it.

        >>> import torch
        >>> from foldcompile.distributed import reduce_scatter_start, wait
        >>> h = reduce_scatter_start(torch.ones(4, 2), 0, name="g")
        >>> h
        <Handle reduce_scatter 'g' elided>
        >>> wait(h).shape
        torch.Size([4, 2])
    """
    if not isinstance(handle, Handle):
        raise TypeError(f"wait: expected a Handle from a *_start function, got {type(handle).__name__}")
    if handle._waited:
        raise RuntimeError(f"{handle.spec.kind} '{handle.name}': this handle was already waited")
    handle._waited = True
    if handle.comm is None:
        out, handle._result = handle._result, None
        return out
    if handle._token is not None:
        token, handle._token = handle._token, None
        return _Wait.apply(token, handle)
    out = handle._inflight.wait()
    handle._inflight = None
    handle._emit("forward", "wait", handle.spec.kind)
    return out


def _validate(kind: str, spec, err: Optional[str], x: torch.Tensor, name: str, comm: _Comm) -> None:
    """Cross-rank check (one blocking object all_gather): same dtype and device, the same
    collective with the same split sizes, shapes that agree with them. Every rank raises
    the same error, naming the rank at fault."""
    mine = (tuple(x.shape), str(x.dtype), x.device.type, spec, err)
    every: list = [None] * comm.world
    dist.all_gather_object(every, mine, group=comm.group)
    for q, (*_, e) in enumerate(every):
        if e is not None:
            raise ValueError(e)
    # judge everything by rank 0's view, so that every rank raises the same error
    shape0, dtype0, dev0, spec0, _ = every[0]
    for q, (*_, sp, _e) in enumerate(every):
        if sp != spec0:
            raise ValueError(f"{kind} '{name}' on rank {q}: called as {sp}, on rank 0 as {spec0}")
    free = {spec0.cat_dim} if isinstance(spec0, _AllToAll) else {spec0.dim} if isinstance(spec0, _AllGather) else set()
    sizes = spec0.cat_sizes if isinstance(spec0, _AllToAll) else spec0.sizes if isinstance(spec0, _AllGather) else None
    for q, (shape, dtype, dev, sp, _) in enumerate(every):
        where = f"{kind} '{name}' on rank {q}"
        if (dtype, dev) != (dtype0, dev0):
            raise ValueError(f"{where}: the tensor is {dtype} on {dev}, rank 0's is {dtype0} on {dev0}")
        if len(shape) != len(shape0) or any(a != b for d, (a, b) in enumerate(zip(shape, shape0))
                                             if d not in free):
            allowed = f" (they may differ only along dim {sorted(free)[0]})" if free else ""
            raise ValueError(f"{where}: the tensor has shape {shape}, rank 0's has {shape0}{allowed}")
        if sizes is not None:
            (d,) = free
            if shape[d] != sizes[q]:
                raise ValueError(f"{where}: the tensor has size {shape[d]} along dim {d}, but the "
                                 f"split sizes {list(sizes)} give rank {q} {sizes[q]}")


# --------------------------------------------------------------------------- public starts

def all_to_all_start(x: torch.Tensor, split_dim: int, cat_dim: int, *, cat_sizes: Sizes = None,
                     split_sizes: Sizes = None, group: Optional[dist.ProcessGroup] = None,
                     name: str = "x", hook: Optional[Hook] = None, force: bool = False,
                     validate: bool = False) -> Handle:
    """Start an all_to_all: ``x`` is sharded along ``cat_dim`` (whole along ``split_dim``);
    the result is whole along ``cat_dim`` and sharded along ``split_dim``.

    ``cat_sizes``: every rank's shard size along ``cat_dim`` (a sequence), or that dim's
    global length (an int, split by :func:`split_sizes`), or None for even shards.
    ``split_sizes``: how ``split_dim`` is split over the ranks (a sequence, or None or its
    length for :func:`split_sizes`). ``name`` names the tensor in errors and events;
    ``hook`` receives a :class:`CollectiveEvent` at each issue and wait (forward and
    backward); ``force`` runs the collective at world size 1; ``validate`` checks shapes,
    dtypes and split sizes across ranks (one extra blocking exchange). Backward: the
    inverse all_to_all.

    Across processes (``rows_to_cols`` in foldcompile/distributed/examples.py shards a
    [13, 7] tensor on rows, [5, 4, 4], and calls
    ``wait(all_to_all_start(mine, split_dim=1, cat_dim=0, cat_sizes=13))``):

        >>> from foldcompile.distributed import spawn
        >>> from foldcompile.distributed.examples import rows_to_cols
        >>> spawn(rows_to_cols, 3)
        [torch.Size([13, 3]), torch.Size([13, 2]), torch.Size([13, 2])]
    """
    def spec(comm: _Comm) -> _AllToAll:
        w = _where("all_to_all", name, comm)
        s = _norm_dim(split_dim, x.ndim, "split_dim", w)
        c = _norm_dim(cat_dim, x.ndim, "cat_dim", w)
        if s == c:
            raise ValueError(f"{w}: split_dim and cat_dim must differ (both {s})")
        cs = _sizes(cat_sizes, x.shape[c], comm, "cat_sizes", w)
        if isinstance(split_sizes, int) and split_sizes != x.shape[s]:
            raise ValueError(f"{w}: split_sizes={split_sizes} must equal the size {x.shape[s]} of "
                             f"split_dim={s}")
        if split_sizes is None or isinstance(split_sizes, int):
            ss = tuple(_even_split(x.shape[s], comm.world))
        else:
            ss = tuple(int(v) for v in split_sizes)
        if len(ss) != comm.world or sum(ss) != x.shape[s] or min(ss) < 0:
            raise ValueError(f"{w}: split sizes {list(ss)} must be {comm.world} sizes >= 0 summing to "
                             f"the size {x.shape[s]} of split_dim={s}")
        return _AllToAll(s, c, ss, cs)
    return _start(spec, "all_to_all", x, name, group, force, hook, validate)


def _placement(p: object, kind: str, name: str) -> str:
    if p not in ("partial", "replicate"):
        raise ValueError(f"{kind} '{name}': grad_placement must be 'partial' (the consumers are "
                         f"sharded: every rank's gradient is a partial sum) or 'replicate' (every "
                         f"rank's gradient is the same whole gradient), got {p!r}")
    return p  # type: ignore[return-value]


def all_gather_start(x: torch.Tensor, dim: int, *, grad_placement: GradPlacement, sizes: Sizes = None,
                     group: Optional[dist.ProcessGroup] = None, name: str = "x",
                     hook: Optional[Hook] = None, force: bool = False,
                     validate: bool = False) -> Handle:
    """Start an all_gather of ``x`` (sharded along ``dim``, shard sizes ``sizes``): the
    result is the whole tensor on every rank.

    ``grad_placement`` states what the result's gradient is, and so the backward:
    ``"partial"`` when the consumers are sharded (each rank's gradient is a partial sum;
    backward reduce-scatters it) and ``"replicate"`` when every rank's gradient is the
    same whole gradient (backward takes this rank's slice). Getting it wrong gives a
    P-times gradient (replicate declared partial) or drops the other ranks' contributions
    (partial declared replicate: FastFold's bug). Other arguments as in
    :func:`all_to_all_start`.

        >>> import torch
        >>> from foldcompile.distributed import all_gather_start, wait
        >>> b = torch.randn(4, 13, 2)                 # world size 1: elided
        >>> wait(all_gather_start(b, 0, grad_placement="partial", sizes=4, name="bias")) is b
        True

    Across processes, a bias row used by both ranks (weights 1 and 2) gets the sum of
    their uses (``bias_gradient`` in foldcompile/distributed/examples.py):

        >>> from foldcompile.distributed import spawn
        >>> from foldcompile.distributed.examples import bias_gradient
        >>> spawn(bias_gradient, 2)
        [tensor([[3., 3., 3.]]), tensor([[3., 3., 3.]])]
    """
    def spec(comm: _Comm) -> _AllGather:
        w = _where("all_gather", name, comm)
        d = _norm_dim(dim, x.ndim, "dim", w)
        return _AllGather(d, _sizes(sizes, x.shape[d], comm, "sizes", w),
                          _placement(grad_placement, "all_gather", name))
    _placement(grad_placement, "all_gather", name)
    return _start(spec, "all_gather", x, name, group, force, hook, validate)


def reduce_scatter_start(x: torch.Tensor, dim: int, *, sizes: Sizes = None,
                         group: Optional[dist.ProcessGroup] = None, name: str = "x",
                         hook: Optional[Hook] = None, force: bool = False,
                         validate: bool = False) -> Handle:
    """Start a reduce_scatter: ``x`` is a partial sum (same shape on every rank); the
    result is this rank's shard along ``dim`` of the sum over ranks. ``sizes``: the output
    shard sizes (sequence) or None for :func:`split_sizes` of the dim's length. Backward:
    all_gather of the shards' gradients (every summand receives the whole gradient).

        >>> import torch
        >>> from foldcompile.distributed import reduce_scatter_start, wait
        >>> g = torch.randn(13, 8)
        >>> wait(reduce_scatter_start(g, 0, name="grad")) is g   # world size 1: elided
        True
    """
    def spec(comm: _Comm) -> _ReduceScatter:
        w = _where("reduce_scatter", name, comm)
        d = _norm_dim(dim, x.ndim, "dim", w)
        n = x.shape[d]
        if sizes is None or isinstance(sizes, int):
            if isinstance(sizes, int) and sizes != n:
                raise ValueError(f"{w}: sizes={sizes} must equal the size {n} of dim={d}")
            ss = tuple(_even_split(n, comm.world))
        else:
            ss = tuple(int(v) for v in sizes)
            if len(ss) != comm.world or sum(ss) != n or min(ss) < 0:
                raise ValueError(f"{w}: sizes {list(ss)} must be {comm.world} sizes >= 0 summing to {n}")
        return _ReduceScatter(d, ss)
    return _start(spec, "reduce_scatter", x, name, group, force, hook, validate)


def all_reduce_start(x: torch.Tensor, *, grad_placement: GradPlacement,
                     group: Optional[dist.ProcessGroup] = None, name: str = "x",
                     hook: Optional[Hook] = None, force: bool = False,
                     validate: bool = False) -> Handle:
    """Start a sum all_reduce (Partial -> Replicate). ``x`` is not modified.

    Backward, by ``grad_placement`` (what the result's gradient is): ``"replicate"``
    (every rank holds the whole dL/dy): identity, since dL/dx_r = dL/dy for every summand;
    ``"partial"`` (the consumers are sharded): an all_reduce of the gradient.

        >>> import torch
        >>> from foldcompile.distributed import all_reduce_start, wait
        >>> p = torch.randn(3)
        >>> wait(all_reduce_start(p, grad_placement="replicate")) is p   # world size 1
        True
    """
    gp = _placement(grad_placement, "all_reduce", name)
    return _start(lambda comm: _AllReduce(gp), "all_reduce", x, name, group, force, hook, validate)


# --------------------------------------------------------------------------- synchronous forms

def all_to_all(x: torch.Tensor, split_dim: int, cat_dim: int, **kw) -> torch.Tensor:
    """``wait(all_to_all_start(x, split_dim, cat_dim, **kw))``.

        >>> import torch
        >>> from foldcompile.distributed import all_to_all
        >>> all_to_all(torch.ones(3, 5), split_dim=1, cat_dim=0).shape   # world size 1
        torch.Size([3, 5])
    """
    return wait(all_to_all_start(x, split_dim, cat_dim, **kw))


def all_gather(x: torch.Tensor, dim: int, *, grad_placement: GradPlacement, **kw) -> torch.Tensor:
    """``wait(all_gather_start(x, dim, grad_placement=..., **kw))``.

        >>> import torch
        >>> from foldcompile.distributed import all_gather
        >>> all_gather(torch.ones(2, 3), 1, grad_placement="replicate").shape
        torch.Size([2, 3])
    """
    return wait(all_gather_start(x, dim, grad_placement=grad_placement, **kw))


def reduce_scatter(x: torch.Tensor, dim: int, **kw) -> torch.Tensor:
    """``wait(reduce_scatter_start(x, dim, **kw))``.

        >>> import torch
        >>> from foldcompile.distributed import reduce_scatter
        >>> reduce_scatter(torch.ones(6, 2), 0).shape                    # world size 1
        torch.Size([6, 2])
    """
    return wait(reduce_scatter_start(x, dim, **kw))


def all_reduce(x: torch.Tensor, *, grad_placement: GradPlacement, **kw) -> torch.Tensor:
    """``wait(all_reduce_start(x, grad_placement=..., **kw))``.

        >>> import torch
        >>> from foldcompile.distributed import all_reduce
        >>> all_reduce(torch.ones(2), grad_placement="partial")          # world size 1
        tensor([1., 1.])
    """
    return wait(all_reduce_start(x, grad_placement=grad_placement, **kw))


# --------------------------------------------------------------------------- Replicate -> Shard

class _Shard(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, sizes, grad_placement, comm):  # type: ignore[override]
        ctx.args = (dim, sizes, grad_placement, comm, x.shape)
        o = split_offsets(sizes)[comm.rank]
        return x.narrow(dim, o, sizes[comm.rank]).clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        dim, sizes, gp, comm, shape = ctx.args
        if gp == "replicate":  # every rank needs the whole gradient: gather the shards' grads
            full = _AllGather(dim, sizes, "replicate").issue(grad, comm, f"shard (backward) on rank {comm.rank}")
            return full.wait(), None, None, None, None
        out = grad.new_zeros(shape)  # partial: this rank's part, zeros elsewhere; sums to the whole
        out.narrow(dim, split_offsets(sizes)[comm.rank], sizes[comm.rank]).copy_(grad)
        return out, None, None, None, None


def shard(x: torch.Tensor, dim: int, *, grad_placement: GradPlacement, sizes: Sizes = None,
          group: Optional[dist.ProcessGroup] = None, name: str = "x", force: bool = False) -> torch.Tensor:
    """Replicate -> Shard: this rank's slice of ``x`` along ``dim`` (shard sizes ``sizes``, a
    sequence; default :func:`split_sizes` of the dim), no communication in forward. ``grad_placement`` states the gradient wanted for the
    replicated ``x``: ``"partial"`` (this rank's slice gradient, zeros elsewhere: the sum over
    ranks is the whole gradient; no traffic) or ``"replicate"`` (all_gather of the slices'
    gradients, so every rank holds the whole gradient).

        >>> import torch
        >>> from foldcompile.distributed import shard
        >>> z = torch.randn(13, 13, 4)
        >>> shard(z, 0, grad_placement="partial") is z            # world size 1
        True
    """
    _check_tensor(x, "shard", name)
    gp = _placement(grad_placement, "shard", name)
    comm = _comm("shard", name, group, force)
    if comm is None:
        return x
    w = _where("shard", name, comm)
    d = _norm_dim(dim, x.ndim, "dim", w)
    if sizes is None or isinstance(sizes, int):
        ss = tuple(split_sizes(x.shape[d], comm.world))
    else:
        ss = tuple(int(v) for v in sizes)
        if len(ss) != comm.world or sum(ss) != x.shape[d] or min(ss) < 0:
            raise ValueError(f"{w}: sizes {list(ss)} must be {comm.world} sizes >= 0 summing to the size "
                             f"{x.shape[d]} of dim={d}")
    return _Shard.apply(x, d, ss, gp, comm)
