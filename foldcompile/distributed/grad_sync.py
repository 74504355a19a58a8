"""All-reduce of Partial parameter gradients, bucketed and overlapped with backward.

Under DAP every rank holds the same parameters, but a parameter used on a shard of the
activations gets only that shard's contribution to its gradient: the true gradient is the
sum over ranks (placement ``Partial``). A parameter used only in replicated compute (the
same inputs on every rank, a replicated loss) already has the whole gradient on every
rank (``Replicate``) and must NOT be summed (that would make it P times too large).

:class:`PartialGradReducer` takes the Partial ones. During backward, a hook on each
parameter copies its new gradient into a bucket as soon as autograd has it; a full bucket
is all-reduced asynchronously while the rest of backward runs. :meth:`wait` (before the
optimizer step) issues what is left, waits, and writes the sums into ``.grad``. Buckets
are issued strictly in bucket order, so every rank issues the same sequence of
collectives. Gradient accumulation works: a gradient already in ``.grad`` from an earlier
backward (already reduced) is kept, only the new contribution is summed.

    >>> import torch
    >>> from foldcompile.distributed import PartialGradReducer
    >>> lin = torch.nn.Linear(4, 4)
    >>> reducer = PartialGradReducer(lin.parameters())       # world size 1: does nothing
    >>> lin(torch.randn(3, 4)).sum().backward()
    >>> reducer.wait()
    >>> lin.weight.grad.shape
    torch.Size([4, 4])
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.distributed as dist

from foldcompile.distributed.collectives import CollectiveEvent, Hook, world_and_rank

__all__ = ["PartialGradReducer", "ReplicaGradReducer"]


class _Bucket:
    __slots__ = ("params", "numel", "flat", "new", "had_prior", "ready", "work")

    def __init__(self, params: list[torch.nn.Parameter]):
        self.params = params
        self.numel = sum(p.numel() for p in params)
        self.reset()

    def reset(self) -> None:
        self.flat: Optional[torch.Tensor] = None
        self.new: dict[int, torch.Tensor] = {}      # index in bucket -> this backward's gradient
        self.had_prior: dict[int, bool] = {}
        self.ready: set[int] = set()
        self.work = None


class PartialGradReducer:
    """Sum the gradients of ``params`` (Partial) over the ranks of ``group`` during backward.

    ``bucket_cap_mb`` bounds a bucket's size (parameters are bucketed in reverse order, the
    order backward tends to produce their gradients); ``hook`` receives a
    :class:`CollectiveEvent` (``name`` ``"grad_bucket<i>"``) at each issue and wait, as the
    collectives do. At world size 1 it registers nothing and :meth:`wait` returns at once
    (``force=True`` runs the all-reduces anyway). Call :meth:`remove` to detach the hooks.
    A parameter with no gradient in a backward counts as zeros (every rank must issue the
    same collectives); after :meth:`wait` it has a (summed) gradient.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], *, group: Optional[dist.ProcessGroup] = None,
                 bucket_cap_mb: float = 25.0, hook: Optional[Hook] = None, force: bool = False):
        seen: set[int] = set()
        plist = []
        for p in params:
            if not isinstance(p, torch.Tensor) or not p.requires_grad:
                raise ValueError("PartialGradReducer: every parameter must be a tensor that requires grad")
            if id(p) not in seen:
                seen.add(id(p))
                plist.append(p)
        self.group, self.hook = group, hook
        world, _ = world_and_rank(group)
        self.world = world
        self._handles: list = []
        self._buckets: list[_Bucket] = []
        self._next = 0  # the next bucket to issue
        self._active = world > 1 or force
        if force and not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("PartialGradReducer: force=True needs an initialized process group")
        if not self._active:
            return
        cap = max(1, int(bucket_cap_mb * 2 ** 20))
        current: list = []
        size = 0
        for p in reversed(plist):
            nbytes = p.numel() * p.element_size()
            if current and (size + nbytes > cap or p.dtype != current[0].dtype or p.device != current[0].device):
                self._buckets.append(_Bucket(current))
                current, size = [], 0
            current.append(p)
            size += nbytes
        if current:
            self._buckets.append(_Bucket(current))
        for b, bucket in enumerate(self._buckets):
            for i, p in enumerate(bucket.params):
                self._handles.append(p.register_hook(self._make_hook(b, i)))

    @property
    def buckets(self) -> list[list[torch.nn.Parameter]]:
        """The parameters of each bucket, in issue order."""
        return [list(b.params) for b in self._buckets]

    def _emit(self, action: str, b: int) -> None:
        if self.hook is not None:
            self.hook(CollectiveEvent("backward", action, "all_reduce", f"grad_bucket{b}"))

    def _make_hook(self, b: int, i: int):
        def on_grad(grad: torch.Tensor) -> None:
            bucket = self._buckets[b]
            if bucket.work is not None or i in bucket.ready:
                raise RuntimeError("PartialGradReducer: a second backward reached a parameter before "
                                   "wait() summed the first one's gradients; call wait() after each backward")
            p = bucket.params[i]
            bucket.had_prior[i] = p.grad is not None
            bucket.new[i] = grad
            bucket.ready.add(i)
            self._issue_ready()
        return on_grad

    def _issue(self, b: int) -> None:
        bucket = self._buckets[b]
        p0 = bucket.params[0]
        flat = torch.zeros(bucket.numel, dtype=p0.dtype, device=p0.device)
        off = 0
        for i, p in enumerate(bucket.params):
            if i in bucket.new:
                flat[off:off + p.numel()].view_as(p).copy_(bucket.new[i])
            off += p.numel()
        bucket.flat = flat
        bucket.work = dist.all_reduce(flat, group=self.group, async_op=True)
        self._emit("issue", b)

    def _issue_ready(self) -> None:
        while self._next < len(self._buckets):
            bucket = self._buckets[self._next]
            if len(bucket.ready) < len(bucket.params):
                return
            self._issue(self._next)
            self._next += 1

    def wait(self) -> None:
        """Issue the buckets not issued yet (missing gradients count as zeros), wait for all,
        and write the summed gradients into ``.grad``. Call before the optimizer step."""
        if not self._active:
            return
        while self._next < len(self._buckets):
            self._issue(self._next)
            self._next += 1
        for b, bucket in enumerate(self._buckets):
            bucket.work.wait()
            self._emit("wait", b)
            off = 0
            for i, p in enumerate(bucket.params):
                total = bucket.flat[off:off + p.numel()].view_as(p)
                off += p.numel()
                if p.grad is None:
                    p.grad = total.clone()
                elif bucket.had_prior.get(i, True) and i in bucket.new:
                    p.grad.add_(total - bucket.new[i])   # keep the earlier (reduced) gradient
                elif i in bucket.new:
                    p.grad.copy_(total)
                else:  # no gradient this backward: only the other ranks' contributions are new
                    p.grad.add_(total)
            bucket.reset()
        self._next = 0

    def remove(self) -> None:
        """Detach the hooks."""
        for h in self._handles:
            h.remove()
        self._handles = []


class ReplicaGradReducer:
    """Average (or sum) the gradients of ``params`` over the data-parallel replicas of ``group``.

    DP x DAP: each DAP group shards one replica of the model, the replicas train on their own
    batches, and after each backward (once the DAP group's Partial gradients are summed) every
    parameter's gradient is averaged over the ranks that hold the same shard position in the other
    replicas (the DP group). :meth:`reduce` does it in one all-reduce per dtype and device: the
    gradients flattened (a missing one as zeros) with one presence flag each, so a parameter that
    got no gradient on any replica keeps ``grad=None``. Gradient accumulation works: after a
    reduce the gradients are equal across replicas, so averaging the accumulated sum again
    averages only the new contribution.

        >>> import torch
        >>> lin = torch.nn.Linear(3, 3)
        >>> lin(torch.randn(2, 3)).sum().backward()
        >>> ReplicaGradReducer(lin.parameters()).reduce()      # world size 1: nothing to do
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], *, group: Optional[dist.ProcessGroup] = None,
                 op: str = "mean"):
        if op not in ("mean", "sum"):
            raise ValueError(f"ReplicaGradReducer: op must be 'mean' or 'sum', got {op!r}")
        seen: set[int] = set()
        self.params = [p for p in params if p.requires_grad and not (id(p) in seen or seen.add(id(p)))]
        self.group, self.op = group, op
        self.world, _ = world_and_rank(group)

    def reduce(self) -> None:
        if self.world == 1:
            return
        buckets: dict[tuple, list[torch.nn.Parameter]] = {}
        for p in self.params:
            buckets.setdefault((p.dtype, p.device), []).append(p)
        for (dtype, device), params in buckets.items():
            sizes = [p.numel() for p in params]
            flat = torch.zeros(sum(sizes) + len(params), dtype=dtype, device=device)
            off = 0
            for k, p in enumerate(params):
                if p.grad is not None:
                    flat[off:off + sizes[k]].copy_(p.grad.reshape(-1))
                    flat[sum(sizes) + k] = 1
                off += sizes[k]
            dist.all_reduce(flat, group=self.group)
            if self.op == "mean":
                flat[:sum(sizes)] /= self.world
            off = 0
            for k, p in enumerate(params):
                if flat[sum(sizes) + k] > 0:
                    total = flat[off:off + sizes[k]].view_as(p)
                    if p.grad is None:
                        p.grad = total.clone()
                    else:
                        p.grad.copy_(total)
                off += sizes[k]
