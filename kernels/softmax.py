"""Fused softmax with scaling, broadcast additive bias and boolean mask.

``softmax(x, dim=-1, scale=s, bias=b, mask=m)`` computes ``softmax(s·x + b)`` over
``dim`` with the entries where ``m`` is False left out, all in fp32 whatever x's dtype,
and returns x's dtype. A row with no True in its mask (or whose kept entries are all
−inf) returns 0 and passes 0 gradient, where torch.softmax would give NaN; with
``empty_rows="nan"`` it returns NaN there, as torch does (the forward kernel writes it: no
extra pass over the output), and its gradient is then torch's too (0 where the mask left an
entry out, NaN elsewhere in such a row). A row with a
NaN or +inf among its kept entries (in x, bias or the scaled logits) returns NaN in
every entry, as torch.softmax does; NaN at a masked-out entry is left out. AlphaFold masks with additive biases of −1e9 instead: a row
masked only that way gets the same values as the fp32 reference (uniform weights when
every entry carries the bias), because the kernel adds the bias in fp32 just like it.

Broadcasting is done by index arithmetic, never by materialising bias or mask at x's
size: each operand gets a stride of 0 on its broadcast dims, and the leading dims are
merged wherever every operand allows (so the usual AlphaFold layouts — pair bias
[H, Q, K] and key mask [S, 1, 1, K] against logits [S, H, Q, K] — become at most a
few index dims). Layouts needing more than ``_MAX_DIMS`` merged dims fall back to
materialising bias and mask at x's size (documented cost; rare).

Kernels (M rows of N entries):

- ``softmax_fwd``: several rows per program for short rows; reads x (M·N), bias and
  mask at their own (broadcast) addresses, writes y (M·N).
- ``softmax_bwd``: dz = y·(dy − Σ y·dy), 0 where the mask is False; writes dx = scale·dz
  (reads 2·M·N and the mask at its broadcast addresses, writes M·N). The bias gradient is reduced over the bias's broadcast dims inside the same
  kernel: program (i, g) owns a block of bias rows and loops over the x rows that map
  to them (its share g of them), summing dz in fp32 registers; with more than one share
  the [G, bias rows, N] fp32 partials are summed afterwards. No atomics.

``dim`` other than the last: x (and bias, mask) are moved so ``dim`` is last and x is
copied to contiguous (one extra read and write of x); the result is moved back.

Dispatch (``foldcompile.kernels._dispatch``): CUDA tensors, or CPU tensors under
``TRITON_INTERPRET=1``, run Triton; otherwise, and for float64 x (the kernels compute
in fp32) or rows longer than ``MAX_TRITON_DIM``, ``softmax_reference`` runs.

Example (MSA row attention logits with pair bias and key mask)::

    >>> logits = torch.randn(3, 2, 13, 13)            # [N_seq, H, N_res, N_res]
    >>> pair_bias = torch.randn(2, 13, 13)            # broadcast over N_seq
    >>> key_mask = torch.rand(3, 1, 1, 13) > 0.2      # True = attend
    >>> p = softmax(logits, scale=0.125, bias=pair_bias, mask=key_mask)
    >>> p.shape
    torch.Size([3, 2, 13, 13])
    >>> ref = softmax_reference(logits, scale=0.125, bias=pair_bias, mask=key_mask)
    >>> torch.allclose(p, ref, atol=1e-6)
    True
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from foldcompile.kernels import _dispatch

__all__ = ["softmax", "softmax_reference", "SoftmaxFunction", "MAX_TRITON_DIM"]

MAX_TRITON_DIM = 16384
_SUPPORTED = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_TILE = 4096
_MAX_DIMS = 4  # merged leading dims the forward kernel indexes
_MAX_SPLIT_DIMS = 3  # merged bias-varying / bias-broadcast dims the backward kernel indexes


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _softmax_fwd_kernel(X, BIAS, MASK, Y, M, N, S1, S2, S3,
                        sx0, sx1, sx2, sx3, sxn,
                        sb0, sb1, sb2, sb3, sbn,
                        sm0, sm1, sm2, sm3, smn,
                        scale,
                        HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, EMPTY_NAN: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # BLOCK_M rows a program: reads BLOCK_M·N of x (and bias/mask at their broadcast
    # addresses), writes BLOCK_M·N of y. Row r splits into 4 merged leading indices.
    pid = tl.program_id(0)
    rows = (pid * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    rmask = rows < M
    cmask = cols < N
    inb = rmask[:, None] & cmask[None, :]
    i3 = rows % S3
    t = rows // S3
    i2 = t % S2
    t = t // S2
    i1 = t % S1
    i0 = t // S1
    x_row = i0 * sx0 + i1 * sx1 + i2 * sx2 + i3 * sx3
    z = tl.load(X + x_row[:, None] + cols[None, :] * sxn, mask=inb, other=0.0).to(tl.float32) * scale
    if HAS_BIAS:
        b_row = i0 * sb0 + i1 * sb1 + i2 * sb2 + i3 * sb3
        z += tl.load(BIAS + b_row[:, None] + cols[None, :] * sbn, mask=inb, other=0.0).to(tl.float32)
    keep = inb
    if HAS_MASK:
        m_row = i0 * sm0 + i1 * sm1 + i2 * sm2 + i3 * sm3
        keep = keep & (tl.load(MASK + m_row[:, None] + cols[None, :] * smn, mask=inb, other=0) != 0)
    z = tl.where(keep, z, float("-inf"))
    zmax = tl.max(z, axis=1)
    # A fully masked row has max −inf: shift by 0 instead, so exp gives 0 everywhere.
    zmax = tl.where(zmax == float("-inf"), 0.0, zmax)
    e = tl.exp(z - zmax[:, None])
    denom = tl.sum(e, axis=1)
    # denom is 0 only where every exp is 0 (nothing kept): dividing by 1 there leaves 0.
    # Test == 0, not > 0: a NaN (or +inf) logit makes denom NaN, and dividing by it gives the
    # all-NaN row torch.softmax gives. (tl.max skips NaN on the GPU, so zmax stays finite and
    # only denom carries the NaN; a `denom > 0` guard would divide by 1 and hide it.)
    y = e / tl.where(denom == 0.0, 1.0, denom)[:, None]
    if EMPTY_NAN:
        # torch.softmax's value in a row that keeps nothing: NaN in every entry of the row
        y = tl.where((denom == 0.0)[:, None], float("nan"), y)
    tl.store(Y + rows[:, None] * N + cols[None, :], y.to(Y.dtype.element_ty), mask=inb)


@triton.jit
def _softmax_bwd_kernel(Y, DY, DX, PDB, MASK, MB, R, N,
                        B1, B2, cb0, cb1, cb2,
                        R1, R2, cr0, cr1, cr2,
                        S1, S2, S3, sm0, sm1, sm2, sm3, smn,
                        scale,
                        WRITE_DX: tl.constexpr, HAS_DBIAS: tl.constexpr, HAS_MASK: tl.constexpr,
                        ITERS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Program (i, g): bias rows [i·BLOCK_M, (i+1)·BLOCK_M), broadcast copies
    # [g·ITERS, (g+1)·ITERS). Each copy: reads y, dy (2·BLOCK_M·N), writes dx (BLOCK_M·N);
    # the dbias partial (BLOCK_M·N fp32) is written once at the end.
    # x row = (bias-row part) + (broadcast-copy part), both from contiguous row strides.
    pid = tl.program_id(0)
    g = tl.program_id(1)
    pb = (pid * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    pmask = pb < MB
    cmask = cols < N
    b2 = pb % B2
    t = pb // B2
    b1 = t % B1
    b0 = t // B1
    base = b0 * cb0 + b1 * cb1 + b2 * cb2
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for it in range(ITERS):
        j = (g * ITERS + it).to(tl.int64)
        r2 = j % R2
        u = j // R2
        r1 = u % R1
        r0 = u // R1
        rows = base + (r0 * cr0 + r1 * cr1 + r2 * cr2)
        msk = (pmask & (j < R))[:, None] & cmask[None, :]
        offs = rows[:, None] * N + cols[None, :]
        y = tl.load(Y + offs, mask=msk, other=0.0).to(tl.float32)
        dy = tl.load(DY + offs, mask=msk, other=0.0).to(tl.float32)
        dz = y * (dy - tl.sum(y * dy, axis=1)[:, None])
        if HAS_MASK:
            # Masked-out entries are left out, as masked_fill(~mask, -inf) leaves them: gradient
            # exactly 0 there. Without this a NaN row (y NaN at every entry, as torch's) would
            # pass NaN to them too. The mask is read at the forward plan's strides (x row ->
            # 4 merged leading indices), a broadcast mask from cache.
            i3 = rows % S3
            t3 = rows // S3
            i2 = t3 % S2
            t3 = t3 // S2
            i1 = t3 % S1
            i0 = t3 // S1
            m_row = i0 * sm0 + i1 * sm1 + i2 * sm2 + i3 * sm3
            keep = tl.load(MASK + m_row[:, None] + cols[None, :] * smn, mask=msk, other=0) != 0
            dz = tl.where(keep, dz, 0.0)
        if WRITE_DX:
            tl.store(DX + offs, (dz * scale).to(DX.dtype.element_ty), mask=msk)
        if HAS_DBIAS:
            acc += dz
    if HAS_DBIAS:
        tl.store(PDB + (g * MB + pb)[:, None] * N + cols[None, :], acc.to(PDB.dtype.element_ty),
                 mask=pmask[:, None] & cmask[None, :])


# ----------------------------------------------------------------------------- planning


def _row_blocking(n: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) for rows of n entries: ~_TILE elements per program, one warp per 512
    of them; rows of 1024 and more on 4 warps (an H200, rows of 1024 at 512 MiB: 57% of copy bandwidth
    against 49% on 8, bench/results/kernels_norm_tune*_NVIDIA_H200_2026-12-02.md)."""
    block_n = triton.next_power_of_2(n)
    block_m = max(1, min(64, _TILE // block_n))
    num_warps = 4 if block_n >= 1024 and block_m * block_n <= _TILE else min(16, max(4, block_m * block_n // 512))
    return block_m, block_n, num_warps


def _bcast_strides(t: torch.Tensor, shape: tuple[int, ...]) -> list[int]:
    """Strides of ``t`` broadcast to ``shape`` (0 on broadcast dims)."""
    lead = len(shape) - t.dim()
    out = []
    for d, size in enumerate(shape):
        td = d - lead
        if td < 0 or t.shape[td] == 1:
            out.append(0)
        else:
            out.append(t.stride(td))
    return out


def _merge(sizes: list[int], strides: list[list[int]]) -> list[tuple[int, list[int]]]:
    """Drop size-1 dims and merge neighbours that every operand can address as one dim."""
    merged: list[tuple[int, list[int]]] = []
    for i, size in enumerate(sizes):
        if size == 1:
            continue
        st = [s[i] for s in strides]
        if merged:
            psize, pst = merged[-1]
            if all(p == c * size for p, c in zip(pst, st)):
                merged[-1] = (psize * size, st)
                continue
        merged.append((size, st))
    return merged


def _fwd_plan(x: torch.Tensor, bias: torch.Tensor | None, mask: torch.Tensor | None):
    """Merged leading dims (size, [x, bias, mask] strides), padded to 4, or None if too many."""
    shape = tuple(x.shape)
    lead = list(shape[:-1])
    ops = [x] + [t for t in (bias, mask) if t is not None]
    strides = [_bcast_strides(t, shape)[:-1] for t in ops]
    merged = _merge(lead, strides)
    if len(merged) > _MAX_DIMS:
        return None
    merged = [(1, [0] * len(ops))] * (_MAX_DIMS - len(merged)) + merged
    sizes = [m[0] for m in merged]
    per_op = [[m[1][k] for m in merged] for k in range(len(ops))]
    return sizes, per_op


def _bwd_plan(lead: list[int], bias_shape: tuple[int, ...] | None):
    """Split x's leading dims into bias-varying (B) and bias-broadcast (R) groups.

    Returns ((B sizes, B row strides), (R sizes, R row strides)), each padded to 3
    merged dims, or None when a group needs more. Row strides are those of the
    contiguous y / dy. Without a bias, every dim is B (one program per row block).
    """
    row_strides = []
    acc = 1
    for size in reversed(lead):
        row_strides.append(acc)
        acc *= size
    row_strides.reverse()
    off = len(lead) + 1 - (len(bias_shape) if bias_shape is not None else 0)
    b_sizes, b_strides, r_sizes, r_strides = [], [], [], []
    for d, size in enumerate(lead):
        bd = d - off
        varies = bias_shape is None or (bd >= 0 and bias_shape[bd] != 1)
        if varies:
            b_sizes.append(size)
            b_strides.append(row_strides[d])
        else:
            r_sizes.append(size)
            r_strides.append(row_strides[d])
    groups = []
    for sizes, strides in ((b_sizes, b_strides), (r_sizes, r_strides)):
        merged = _merge(sizes, [strides])
        if len(merged) > _MAX_SPLIT_DIMS:
            return None
        merged = [(1, [0])] * (_MAX_SPLIT_DIMS - len(merged)) + merged
        groups.append(([m[0] for m in merged], [m[1][0] for m in merged]))
    return groups


def _num_programs_target(device: torch.device) -> int:
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter runs programs one after another: few, large ones are fastest


class SoftmaxFunction(torch.autograd.Function):
    """Autograd wrapper of the Triton softmax kernels over the last dim (inputs validated)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor | None, mask: torch.Tensor | None,
                scale: float, plan, empty_nan: bool = False) -> torch.Tensor:
        sizes, per_op = plan
        n = x.shape[-1]
        m = x.numel() // n
        y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        shape = tuple(x.shape)
        sx = per_op[0] + [x.stride(-1)]
        k = 1
        if bias is not None:
            sb = per_op[k] + [_bcast_strides(bias, shape)[-1]]
            k += 1
        else:
            sb = [0] * 5
        if mask is not None:
            sm = per_op[k] + [_bcast_strides(mask, shape)[-1]]
            mask_u8 = mask.view(torch.uint8)
        else:
            sm = [0] * 5
            mask_u8 = None
        block_m, block_n, num_warps = _row_blocking(n)
        if m > 0:
            _dispatch.note_launch("softmax_fwd")
            _softmax_fwd_kernel[(triton.cdiv(m, block_m),)](
                x, bias if bias is not None else x, mask_u8 if mask_u8 is not None else x, y,
                m, n, sizes[1], sizes[2], sizes[3], *sx, *sb, *sm, float(scale),
                HAS_BIAS=bias is not None, HAS_MASK=mask is not None, EMPTY_NAN=bool(empty_nan),
                BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps)
        ctx.save_for_backward(y, mask_u8)
        # The mask's addressing in backward: the forward plan's merged sizes and mask strides.
        ctx.mask_plan = (sizes[1], sizes[2], sizes[3], *sm) if mask is not None else None
        ctx.scale = float(scale)
        ctx.bias_shape = tuple(bias.shape) if bias is not None else None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y

    @staticmethod
    @_dispatch.once_differentiable  # not itself differentiable: a double backward raises
    def backward(ctx, dy: torch.Tensor):
        y, mask_u8 = ctx.saved_tensors
        need_dx, need_db = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_dx or need_db):
            return None, None, None, None, None, None
        n = y.shape[-1]
        lead = list(y.shape[:-1])
        dy = dy.contiguous()
        bias_shape = ctx.bias_shape if need_db else None
        groups = _bwd_plan(lead, bias_shape)
        # The forward plan has at most 4 merged dims, each wholly bias-varying or wholly
        # broadcast, so each group has at most 2 runs here (softmax() materialises otherwise).
        if groups is None:
            raise RuntimeError(f"softmax backward: no kernel plan for x {tuple(y.shape)} and bias {bias_shape}")
        (b_sizes, b_strides), (r_sizes, r_strides) = groups
        mb, r = math.prod(b_sizes), math.prod(r_sizes)
        block_m, block_n, num_warps = _row_blocking(n)
        # Few bias rows (e.g. a bias broadcast over every leading dim): no idle tile rows.
        block_m = min(block_m, triton.next_power_of_2(max(mb, 1)))
        btiles = triton.cdiv(mb, block_m) if mb > 0 else 0
        dx = torch.empty(y.shape, dtype=y.dtype, device=y.device) if need_dx else None
        if need_db:
            g_want = max(1, _num_programs_target(y.device) // max(btiles, 1))
            iters = triton.next_power_of_2(max(1, triton.cdiv(r, g_want)))
            g = max(1, triton.cdiv(r, iters))
            pdtype = ctx.bias_dtype if g == 1 else torch.float32
            pdb = torch.empty((g, mb, n), dtype=pdtype, device=y.device)
        else:
            iters, g, pdb = 1, r, None
        if btiles > 0 and r > 0:
            _dispatch.note_launch("softmax_bwd")
            mask_plan = ctx.mask_plan if ctx.mask_plan is not None else (1, 1, 1, 0, 0, 0, 0, 0)
            _softmax_bwd_kernel[(btiles, g)](
                y, dy, dx if need_dx else y, pdb if need_db else y, mask_u8 if mask_u8 is not None else y,
                mb, r, n, b_sizes[1], b_sizes[2], *b_strides, r_sizes[1], r_sizes[2], *r_strides,
                *mask_plan, ctx.scale, WRITE_DX=need_dx, HAS_DBIAS=need_db, HAS_MASK=mask_u8 is not None,
                ITERS=iters, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps)
        dbias = None
        if need_db:
            if btiles == 0 or r == 0:
                pdb.zero_()  # no rows: the kernel did not run, the gradient is 0
            full = pdb.sum(0) if g > 1 else pdb[0]
            # B dims are exactly the bias's non-1 leading dims, in order.
            dbias = full.view(*ctx.bias_shape[:-1], n)
            if ctx.bias_shape[-1] == 1 and n != 1:
                dbias = dbias.sum(-1, keepdim=True, dtype=torch.float32)
            dbias = dbias.reshape(ctx.bias_shape)
            dbias = dbias.to(ctx.bias_dtype)
        return dx, dbias, None, None, None, None


# ----------------------------------------------------------------------------- public API


_EMPTY_ROWS = ("zero", "nan")


def _check(x, dim, scale, bias, mask, empty_rows: str = "zero") -> int:
    """Validate the arguments; returns dim normalised to a non-negative index."""
    if empty_rows not in _EMPTY_ROWS:
        raise ValueError(f"softmax: empty_rows must be one of {_EMPTY_ROWS}, got {empty_rows!r}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"softmax: x must be a tensor, got {type(x).__name__}")
    if x.dtype not in _SUPPORTED:
        raise TypeError(f"softmax: x has dtype {x.dtype}; supported: float16, bfloat16, float32, float64")
    if x.dim() < 1:
        raise ValueError(f"softmax: x must have at least one dim, got shape {tuple(x.shape)}")
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"softmax: dim must be a Python int, got {type(dim).__name__} {dim!r}")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"softmax: dim={dim} is out of range for x of shape {tuple(x.shape)}")
    if x.shape[dim] == 0:
        raise ValueError(f"softmax: dim={dim} of x has size 0 (x shape {tuple(x.shape)}): nothing to normalise")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise TypeError(f"softmax: scale must be a Python number or None, got {type(scale).__name__}")
    for name, t in (("bias", bias), ("mask", mask)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"softmax: {name} must be a tensor or None, got {type(t).__name__}")
        if name == "bias" and t.dtype not in _SUPPORTED:
            raise TypeError(f"softmax: bias has dtype {t.dtype}; supported: float16, bfloat16, float32, float64")
        if name == "mask" and t.dtype != torch.bool:
            raise TypeError(f"softmax: mask must be torch.bool (True = keep), got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"softmax: {name} is on {t.device} but x is on {x.device}")
        ok = t.dim() <= x.dim() and all(
            ts in (1, xs) for ts, xs in zip(reversed(t.shape), reversed(x.shape)))
        if not ok:
            raise ValueError(f"softmax: {name} of shape {tuple(t.shape)} does not broadcast to "
                             f"x of shape {tuple(x.shape)}")
    return dim % x.dim()


def softmax_reference(x: torch.Tensor, dim: int = -1, *, scale: float | None = None,
                      bias: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                      empty_rows: str = "zero") -> torch.Tensor:
    """Plain-PyTorch ``softmax(scale·x + bias)`` over ``dim`` with mask False entries left out.

    Computes in fp32 (float64 for float64 x) and returns x's dtype. Rows with nothing
    kept give 0 (``empty_rows="nan"``: NaN) and pass 0 gradient. Differentiable by autograd
    in x and bias.
    """
    dim = _check(x, dim, scale, bias, mask, empty_rows)
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    z = x.to(ct)
    if scale is not None:
        z = z * scale
    if bias is not None:
        z = z + bias.to(ct)
    if mask is not None:
        z = z.masked_fill(~mask, float("-inf"))
    # Softmax is shift-invariant, so the shift needs no gradient; rows whose max is −inf
    # (nothing kept) shift by 0, their exps are all 0 and the output is 0, not NaN.
    zmax = z.detach().amax(dim=dim, keepdim=True)
    zmax = torch.where(zmax == float("-inf"), torch.zeros_like(zmax), zmax)
    e = torch.exp(z - zmax)
    denom = e.sum(dim=dim, keepdim=True)
    # == 0 (not > 0) so a NaN denominator (a NaN or +inf entry kept) makes the row NaN, as in torch.
    y = e / torch.where(denom == 0, torch.ones_like(denom), denom)
    if empty_rows == "nan":
        y = y.masked_fill(denom == 0, float("nan"))
    return y.to(x.dtype)


def softmax(x: torch.Tensor, dim: int = -1, *, scale: float | None = None,
            bias: torch.Tensor | None = None, mask: torch.Tensor | None = None,
            empty_rows: str = "zero") -> torch.Tensor:
    """Fused ``softmax(scale·x + bias)`` over ``dim``, entries with ``mask`` False left out.

    Args:
        x: logits, float16 / bfloat16 / float32 / float64.
        dim: the softmax dim; other than the last, x is copied with ``dim`` moved last.
        scale: multiplies x (in fp32), or None for 1.
        bias: additive, broadcastable to x (leading dims and/or the softmax dim); any float dtype.
        mask: bool, broadcastable to x; True = keep. Rows with no True give 0.
        empty_rows: ``"zero"`` (rows that keep nothing give 0) or ``"nan"`` (they give NaN, as
            ``torch.softmax`` of an all ``-inf`` row does), written by the forward kernel itself.

    Returns a tensor shaped and typed like x. Gradients flow to x and bias (the bias
    gradient summed over its broadcast dims, in bias's dtype); none to mask.
    """
    dim = _check(x, dim, scale, bias, mask, empty_rows)
    if not (_dispatch.use_triton(x, bias, mask) and x.dtype != torch.float64
            and x.shape[dim] <= MAX_TRITON_DIM):
        return softmax_reference(x, dim, scale=scale, bias=bias, mask=mask, empty_rows=empty_rows)
    # A 0-d bias or mask (one value for every entry) is viewed as 1-d: the kernels and the bias
    # gradient's reduction index a last dim (autograd routes the gradient back through the view).
    bias = bias.reshape(1) if bias is not None and bias.dim() == 0 else bias
    mask = mask.reshape(1) if mask is not None and mask.dim() == 0 else mask
    last = x.dim() - 1
    if dim != last:
        # Bring bias and mask to x's rank first so that moving dim moves the same axis in each.
        def to_rank(t):
            return None if t is None else t.reshape((1,) * (x.dim() - t.dim()) + tuple(t.shape))
        x = x.movedim(dim, -1).contiguous()
        bias = None if bias is None else to_rank(bias).movedim(dim, -1)
        mask = None if mask is None else to_rank(mask).movedim(dim, -1)
    for name, t in (("x", x), ("bias", bias), ("mask", mask)):
        if t is not None and t.dim() > 0:
            _dispatch.check_offsets32("softmax", name, t, (t.dim() - 1,))
    plan = _fwd_plan(x, bias, mask)
    # The backward needs its own plan for the bias gradient: the bias's size-1 dims (stride 0
    # dims of size > 1 count as varying) may split into more runs than the kernel indexes.
    if plan is None or (bias is not None and bias.requires_grad and _bwd_plan(list(x.shape[:-1]), tuple(
            (1,) * (x.dim() - bias.dim()) + tuple(bias.shape))) is None):
        # More broadcast patterns than the kernel indexes: materialise at x's size (rare).
        x = x.contiguous()
        bias = None if bias is None else bias.expand(x.shape).contiguous()
        mask = None if mask is None else mask.expand(x.shape).contiguous()
        plan = _fwd_plan(x, bias, mask)
    y = SoftmaxFunction.apply(x, bias, mask, 1.0 if scale is None else float(scale), plan, empty_rows == "nan")
    return y.movedim(-1, dim) if dim != last else y
