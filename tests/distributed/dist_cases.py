"""Rank functions for the distributed tests (module level, so the pool can pickle them)
and the single-process references they are compared with.

Every tensor is float64 and drawn from a seeded generator, so the parent (the reference)
and every rank draw the same full tensors; a rank keeps its shard.
"""
from __future__ import annotations

import math
import os

import torch
import torch.distributed as dist

from foldcompile.distributed import (
    PartialGradReducer, all_gather, all_gather_start, all_reduce, all_reduce_start, all_to_all,
    all_to_all_start, reduce_scatter, reduce_scatter_start, shard, split_offsets, split_sizes, wait,
)

F64 = torch.float64


def rand(seed: int, *shape: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=F64)


def piece(x: torch.Tensor, dim: int, rank: int, world: int) -> torch.Tensor:
    """Rank ``rank``'s shard of ``x`` along ``dim`` (split_sizes convention)."""
    s = split_sizes(x.shape[dim], world)
    return x.narrow(dim, split_offsets(s)[rank], s[rank])


def leaf(x: torch.Tensor) -> torch.Tensor:
    return x.detach().clone().requires_grad_()


def world() -> int:
    return dist.get_world_size()


def wsin(w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The test loss sum(w * sin(y)): nonlinear, so a misrouted gradient shows."""
    return (w * torch.sin(y)).sum()


# --------------------------------------------------------------------------- collectives

def a2a_case(rank, shape, split_dim, cat_dim, loss):
    P = world()
    X, W = rand(1, *shape), rand(2, *shape)
    x = leaf(piece(X, cat_dim, rank, P))
    y = all_to_all(x, split_dim, cat_dim, cat_sizes=shape[cat_dim], name="x", validate=True)
    if loss == "sharded":
        wsin(piece(W, split_dim, rank, P), y).backward()
    else:  # replicated output: gather it back, every rank computes the same whole loss
        Y = all_gather(y, split_dim, sizes=shape[split_dim], grad_placement="replicate")
        wsin(W, Y).backward()
    return y.detach(), x.grad


def a2a_ref(shape):
    X, W = leaf(rand(1, *shape)), rand(2, *shape)
    wsin(W, X).backward()
    return X.detach(), X.grad


def gather_replicate_case(rank, shape, dim, declared="replicate"):
    """Replicated consumers: every rank computes the same loss on the gathered tensor."""
    P = world()
    X, W = rand(3, *shape), rand(4, *shape)
    x = leaf(piece(X, dim, rank, P))
    y = all_gather(x, dim, sizes=shape[dim], grad_placement=declared, validate=True)
    wsin(W, y).backward()
    return y.detach(), x.grad


def gather_replicate_ref(shape):
    X, W = leaf(rand(3, *shape)), rand(4, *shape)
    wsin(W, X).backward()
    return X.detach(), X.grad


def gather_partial_case(rank, n, k, m, dim, declared="partial"):
    """Sharded consumers (a triangle-multiplication-like product): out_i = sum_k a_ik b_jk
    with a sharded on i and b gathered; ``dim`` is the dim of b (stored as [n, k] for 0,
    as [k, n] for 1) that is sharded and gathered."""
    P = world()
    A, B, W = rand(5, m, k), rand(6, n, k), rand(7, m, n)
    Bs = B if dim == 0 else B.t().contiguous()
    a, b = leaf(piece(A, 0, rank, P)), leaf(piece(Bs, dim, rank, P))
    full = all_gather(b, dim, sizes=n, grad_placement=declared)
    bb = full if dim == 0 else full.t()
    out = torch.einsum("ik,jk->ij", a, bb)
    wsin(piece(W, 0, rank, P), out).backward()
    return out.detach(), a.grad, b.grad


def gather_partial_ref(n, k, m, dim):
    A, B, W = leaf(rand(5, m, k)), rand(6, n, k), rand(7, m, n)
    Bs = leaf(B if dim == 0 else B.t().contiguous())
    bb = Bs if dim == 0 else Bs.t()
    out = torch.einsum("ik,jk->ij", A, bb)
    wsin(W, out).backward()
    return out.detach(), A.grad, Bs.grad


def reduce_scatter_case(rank, shape, dim, loss):
    P = world()
    x = leaf(rand(100 + rank, *shape))  # a partial sum: rank r holds its own summand
    W = rand(8, *shape)
    y = reduce_scatter(x, dim, validate=True)
    if loss == "sharded":
        wsin(piece(W, dim, rank, P), y).backward()
    else:
        Y = all_gather(y, dim, sizes=shape[dim], grad_placement="replicate")
        wsin(W, Y).backward()
    return y.detach(), x.grad


def reduce_scatter_ref(shape, P):
    xs = [leaf(rand(100 + q, *shape)) for q in range(P)]
    Y = sum(xs)
    wsin(rand(8, *shape), Y).backward()
    return Y.detach(), [x.grad for x in xs]


def all_reduce_case(rank, m, k, n, mode):
    """replicate: every rank computes the same loss of Y = sum_r x_r; partial: out_i = a_i Y
    with a sharded on rows i."""
    P = world()
    x = leaf(rand(200 + rank, k, n))
    Y = all_reduce(x, grad_placement=mode, validate=True)
    if mode == "replicate":
        wsin(rand(9, k, n), Y).backward()
        return Y.detach(), x.grad, None
    a = leaf(piece(rand(10, m, k), 0, rank, P))
    out = a @ Y
    wsin(piece(rand(11, m, n), 0, rank, P), out).backward()
    return out.detach(), x.grad, a.grad


def all_reduce_ref(m, k, n, mode, P):
    xs = [leaf(rand(200 + q, k, n)) for q in range(P)]
    Y = sum(xs)
    if mode == "replicate":
        wsin(rand(9, k, n), Y).backward()
        return Y.detach(), [x.grad for x in xs], None
    A = leaf(rand(10, m, k))
    out = A @ Y
    wsin(rand(11, m, n), out).backward()
    return out.detach(), [x.grad for x in xs], A.grad


def shard_case(rank, shape, dim, mode):
    P = world()
    X = leaf(rand(12, *shape))  # replicated: the same on every rank
    y = shard(X, dim, grad_placement=mode)
    wsin(piece(rand(13, *shape), dim, rank, P), y).backward()
    return y.detach(), X.grad


def shard_ref(shape):
    X = leaf(rand(12, *shape))
    wsin(rand(13, *shape), X).backward()
    return X.detach(), X.grad


def forced_p1_case(rank):
    """World size 1 with force=True: the real collectives run and equal the identity."""
    X = rand(14, 5, 3, 2)
    out = {}
    for name, fn in {
        "all_to_all": lambda x: all_to_all(x, 1, 0, force=True),
        "all_gather_partial": lambda x: all_gather(x, 2, grad_placement="partial", force=True),
        "all_gather_replicate": lambda x: all_gather(x, 2, grad_placement="replicate", force=True),
        "reduce_scatter": lambda x: reduce_scatter(x, 1, force=True),
        "all_reduce_partial": lambda x: all_reduce(x, grad_placement="partial", force=True),
        "all_reduce_replicate": lambda x: all_reduce(x, grad_placement="replicate", force=True),
        "shard": lambda x: shard(x, 0, grad_placement="replicate", force=True),
    }.items():
        x = leaf(X)
        y = fn(x)
        wsin(rand(15, 5, 3, 2), y).backward()
        out[name] = (y.detach(), x.grad, y is x, y.grad_fn is not None)
    return out


# --------------------------------------------------------------------------- errors

def error_messages_case(rank):
    """Errors raised on every rank alike (so no rank is left in a collective)."""
    msgs = {}
    x = rand(16, 4, 5)

    def catch(key, f):
        try:
            f()
            msgs[key] = None
        except (ValueError, TypeError, RuntimeError) as e:
            msgs[key] = f"{type(e).__name__}: {e}"
    # this rank's shard does not match the sizes it was given
    catch("sizes", lambda: all_to_all_start(piece(x, 0, rank, world()), 1, 0, cat_sizes=[9] * world(), name="m"))
    catch("dim", lambda: all_gather_start(x, 3, grad_placement="partial", name="bias"))
    catch("placement", lambda: all_gather_start(x, 0, grad_placement="sharded", name="bias"))
    catch("same_dims", lambda: all_to_all_start(x, 1, 1, name="z"))
    catch("not_tensor", lambda: reduce_scatter_start([1, 2], 0, name="g"))
    # cross-rank validation: rank 1 disagrees on the sizes; every rank raises the same error
    bad = [3, 1] + [0] * (world() - 2) if rank == 1 else [2, 2] + [0] * (world() - 2)
    mine = x[:bad[rank]] if rank < 2 else x[:0]
    catch("validate_sizes", lambda: all_gather_start(mine, 0, sizes=bad, grad_placement="partial",
                                                     name="pair_bias", validate=True))
    # cross-rank validation: rank 1 has another dtype
    y = rand(17, 4, 6)
    catch("validate_dtype", lambda: all_to_all_start(y.float() if rank == 1 else y, 1, 0, name="msa",
                                                     validate=True))
    # still healthy afterwards: a collective works
    msgs["after"] = all_reduce(torch.ones(2, dtype=F64), grad_placement="replicate").tolist()
    return msgs


def hang_case(rank):
    """Rank 1 skips the collective that rank 0 enters."""
    if rank == 0:
        all_reduce(torch.ones(3, dtype=F64), grad_placement="replicate")
    return rank


def die_case(rank):
    if rank == 1:
        os._exit(7)
    all_reduce(torch.ones(3, dtype=F64), grad_placement="replicate")
    return rank


def sleep_case(rank, seconds):
    import time
    if rank == 1:
        time.sleep(seconds)
    return rank


def raise_case(rank):
    if rank == 1:
        raise ValueError("boom on purpose")
    return rank


def ranks_case(rank, x):
    return rank, dist.get_world_size(), x * (rank + 1)


# --------------------------------------------------------------------------- overlap evidence

class Mark(torch.autograd.Function):
    """Identity that logs ("compute", label) when it runs, in forward and in backward."""

    @staticmethod
    def forward(ctx, x, log, label):
        log.append(("forward", "compute", label))
        ctx.log, ctx.label = log, label
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        ctx.log.append(("backward", "compute", ctx.label))
        return g, None, None


def recorder(log):
    return lambda ev: log.append((ev.phase, ev.action, f"{ev.collective}:{ev.name}"))


def overlap_case(rank, kind):
    """start -> independent compute -> wait, then backward; returns the event log."""
    P = world()
    log = []
    x = leaf(rand(20 + rank, 7, 5))
    w = leaf(rand(30, 5, 5))
    hook = recorder(log)
    if kind == "all_to_all":
        h = all_to_all_start(x, 1, 0, cat_sizes=[7] * P, name="t", hook=hook)
    elif kind == "all_gather":
        h = all_gather_start(x, 0, sizes=[7] * P, grad_placement="partial", name="t", hook=hook)
    elif kind == "reduce_scatter":
        h = reduce_scatter_start(x, 0, name="t", hook=hook)
    else:
        h = all_reduce_start(x, grad_placement="partial", name="t", hook=hook)
    indep = Mark.apply(torch.tanh(x.detach() @ w), log, "independent")  # does not use the result
    y = wait(h)
    (torch.sin(y).sum() + indep.sum()).backward()
    return log


# --------------------------------------------------------------------------- the DAP mini-block

class MiniBlock(torch.nn.Module):
    """A pair-stack-like block written plainly (one process) and by hand with DAP:
    row attention with a pair bias, column attention, a triangle-multiplication-like
    update, and a head. Channels c, heads h of width d."""

    def __init__(self, c=4, h=2, d=3):
        super().__init__()
        L = torch.nn.Linear
        self.h, self.d = h, d
        self.ln1, self.ln2, self.ln3 = (torch.nn.LayerNorm(c) for _ in range(3))
        self.qkv1, self.bias1, self.o1 = L(c, 3 * h * d), L(c, h, bias=False), L(h * d, c)
        self.qkv2, self.o2 = L(c, 3 * h * d), L(h * d, c)
        self.pa, self.pb, self.gate, self.o3 = L(c, c), L(c, c), L(c, c), L(c, c)
        self.head = L(c, 2)

    def _heads(self, t):
        q, k, v = t.unflatten(-1, (3, self.h, self.d)).unbind(-3)
        return q, k, v

    # ---- the three updates, on whatever slice of rows they are given
    def row_attention(self, z, bias):
        """z: [rows, N, c]; bias: [N, N, h] (all rows j, k). Attention within each row."""
        q, k, v = self._heads(self.qkv1(self.ln1(z)))                   # [rows, N, h, d]
        logits = torch.einsum("ijhd,ikhd->ihjk", q, k) / math.sqrt(self.d) + bias.permute(2, 0, 1)
        o = torch.einsum("ihjk,ikhd->ijhd", logits.softmax(-1), v)
        return z + self.o1(o.flatten(-2))

    def col_attention(self, z):
        """z: [N, cols, c]. Attention within each column (over rows)."""
        q, k, v = self._heads(self.qkv2(self.ln2(z)))
        logits = torch.einsum("ijhd,kjhd->jhik", q, k) / math.sqrt(self.d)
        o = torch.einsum("jhik,kjhd->ijhd", logits.softmax(-1), v)
        return z + self.o2(o.flatten(-2))

    def forward(self, z):
        """The single-process reference."""
        z = self.row_attention(z, self.bias1(self.ln1(z)))
        z = self.col_attention(z)
        zn = self.ln3(z)
        t = torch.einsum("ikc,jkc->ijc", self.pa(zn), self.pb(zn))
        return z + torch.sigmoid(self.gate(zn)) * self.o3(t)

    def forward_dap(self, z, n, log, hook):
        """The same block on z sharded on rows ([n_r, n, c]), with the collectives by hand."""
        hb = all_gather_start(self.bias1(self.ln1(z)), 0, sizes=n, grad_placement="partial",
                              name="pair_bias", hook=hook)
        zn1 = self.ln1(z)
        q, k, v = self._heads(self.qkv1(zn1))
        q = Mark.apply(q, log, "qkv")                                  # overlaps the bias gather
        bias = wait(hb)
        logits = torch.einsum("ijhd,ikhd->ihjk", q, k) / math.sqrt(self.d) + bias.permute(2, 0, 1)
        o = torch.einsum("ihjk,ikhd->ijhd", logits.softmax(-1), v)
        z = z + self.o1(o.flatten(-2))
        zc = wait(all_to_all_start(z, 1, 0, cat_sizes=n, name="rows_to_cols", hook=hook))
        zc = self.col_attention(zc)
        z = wait(all_to_all_start(zc, 0, 1, cat_sizes=n, name="cols_to_rows", hook=hook))
        zn = self.ln3(z)
        hb3 = all_gather_start(self.pb(zn), 0, sizes=n, grad_placement="partial", name="tri_b", hook=hook)
        a = self.pa(zn)
        g = Mark.apply(torch.sigmoid(self.gate(zn)), log, "tri_gate")   # overlaps the gather
        t = torch.einsum("ikc,jkc->ijc", a, wait(hb3))
        return z + g * self.o3(t)


def block_ref(n, loss):
    torch.manual_seed(0)
    m = MiniBlock().double()
    Z = leaf(rand(40, n, n, 4))
    out = m(Z)
    if loss == "sharded":
        y = m.head(out)
        wsin(rand(41, n, n, 2), y).backward()
    else:
        wsin(rand(42, n, n, 2), m.head(out)).backward()
    return out.detach(), Z.grad, {k: p.grad for k, p in m.named_parameters()}


def block_case(rank, n, loss):
    P = world()
    torch.manual_seed(0)
    m = MiniBlock().double()
    log = []
    hook = recorder(log)
    z = leaf(piece(rand(40, n, n, 4), 0, rank, P))
    partial = [p for k, p in m.named_parameters() if loss == "sharded" or not k.startswith("head.")]
    reducer = PartialGradReducer(partial, bucket_cap_mb=1e-4, hook=hook)  # ~1 parameter a bucket
    out = m.forward_dap(z, n, log, hook)
    if loss == "sharded":  # the head on the shard: its gradient is Partial too
        wsin(piece(rand(41, n, n, 2), 0, rank, P), m.head(out)).backward()
    else:  # gather the output; the head and the loss run replicated (head.* is Replicate)
        full = all_gather(out, 0, sizes=n, grad_placement="replicate", name="output", hook=hook)
        wsin(rand(42, n, n, 2), m.head(full)).backward()
    log.append(("backward", "end", ""))
    reducer.wait()
    return out.detach(), z.grad, {k: p.grad for k, p in m.named_parameters()}, log


# --------------------------------------------------------------------------- the Partial-gradient reducer

class TwoPart(torch.nn.Module):
    """``enc`` runs on this rank's rows (Partial gradients); ``dec`` runs replicated on the
    gathered result (Replicate gradients); ``extra`` is used only on rank 0 (when asked)."""

    def __init__(self):
        super().__init__()
        self.enc = torch.nn.Linear(3, 4)
        self.dec = torch.nn.Linear(4, 2)
        self.extra = torch.nn.Parameter(torch.ones(4, dtype=F64))
        self.unused = torch.nn.Parameter(torch.ones(2, dtype=F64))

    def forward(self, x, use_extra, n):   # x: this rank's rows; returns the replicated loss
        h = torch.tanh(self.enc(x))
        if use_extra:
            h = h * self.extra
        full = all_gather(h, 0, sizes=n, grad_placement="replicate") if dist.is_initialized() else h
        return wsin(rand(51, n, 2), self.dec(full))


def reducer_case(rank, n, steps):
    """Two backward passes accumulated (one wait after each); ``extra`` used on rank 0 only."""
    P = world()
    torch.manual_seed(0)
    m = TwoPart().double()
    red = PartialGradReducer([*m.enc.parameters(), m.extra, m.unused], bucket_cap_mb=1e-4)
    for step in range(steps):
        x = piece(rand(50 + step, n, 3), 0, rank, P)
        # the loss is replicated: each rank's enc/extra gradient is the part from its rows
        m(x, use_extra=(rank == 0), n=n).backward()
        red.wait()
    return {k: p.grad for k, p in m.named_parameters()}


def reducer_ref(n, steps, P):
    """One process: ``extra`` multiplies rank 0's rows only."""
    torch.manual_seed(0)
    m = TwoPart().double()
    for step in range(steps):
        X = rand(50 + step, n, 3)
        h = torch.tanh(m.enc(X))
        s = split_sizes(n, P)[0]
        h = torch.cat([h[:s] * m.extra, h[s:]])
        wsin(rand(51, n, 2), m.dec(h)).backward()
    return {k: p.grad for k, p in m.named_parameters()}


def reducer_misuse_case(rank):
    lin = torch.nn.Linear(2, 2).double()
    red = PartialGradReducer(lin.parameters())
    lin(rand(60, 3, 2)).sum().backward()
    try:
        lin(rand(61, 3, 2)).sum().backward()
        msg = None
    except RuntimeError as e:
        msg = str(e)
    red.wait()  # completes the first backward's reduction; the ranks stay in step
    lin.zero_grad(set_to_none=True)
    lin(rand(62, 3, 2)).sum().backward()  # and the next step works
    red.wait()
    return msg, lin.bias.grad


def inplace_case(rank):
    """A wait's result is a fresh tensor (not a view), so it can be modified in place and
    still backpropagate: y *= 3 then sum(y) gives every input element a gradient of 3."""
    P = world()
    out = {}
    for kind in ("all_to_all", "all_gather", "reduce_scatter", "all_reduce"):
        x = leaf(rand(70 + rank, 5, 4))
        if kind == "all_to_all":
            y = all_to_all(x, 1, 0, cat_sizes=[5] * P)
        elif kind == "all_gather":
            y = all_gather(x, 1, sizes=[4] * P, grad_placement="replicate")
        elif kind == "reduce_scatter":
            y = reduce_scatter(x, 1)
        else:
            y = all_reduce(x, grad_placement="replicate")
        is_view = y._base is not None
        y.mul_(3.0)
        y.sum().backward()  # replicated results: the same loss on every rank
        out[kind] = (is_view, x.grad)
    return out


def custom_piece(x, dim, sizes, rank):
    return x.narrow(dim, split_offsets(sizes)[rank], sizes[rank])


def explicit_sizes_case(rank, cat_list, split_list):
    """Shard sizes other than split_sizes' (e.g. a user's own split), given explicitly."""
    X, W = rand(80, sum(cat_list), sum(split_list), 2), rand(81, sum(cat_list), sum(split_list), 2)
    x = leaf(custom_piece(X, 0, cat_list, rank))
    y = all_to_all(x, 1, 0, cat_sizes=cat_list, split_sizes=split_list, validate=True)
    back = all_to_all(y, 0, 1, cat_sizes=split_list, split_sizes=cat_list)
    full = all_gather(y, 1, sizes=split_list, grad_placement="replicate")
    wsin(W, full).backward()
    return y.detach(), back.detach(), x.grad


def explicit_rs_case(rank, sizes):
    x = leaf(rand(90 + rank, sum(sizes), 3))
    y = reduce_scatter(x, 0, sizes=sizes, validate=True)
    wsin(custom_piece(rand(91, sum(sizes), 3), 0, sizes, rank), y).backward()
    return y.detach(), x.grad
