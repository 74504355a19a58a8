"""Layer norm over the last dim: Triton forward and backward, autograd.Function, reference.

``layer_norm(x, weight, bias, eps)`` normalises every row of ``x`` (all leading dims
flattened into rows) with statistics computed in fp32 whatever the input dtype, then
applies the optional per-channel ``weight`` and ``bias``. The output has ``x``'s dtype.

Kernels (memory traffic per call, M rows of N channels):

- ``layer_norm_fwd``: several rows per program for short rows (AlphaFold's rows are
  64..384 long); reads M·N, writes M·N plus two fp32 statistics per row.
- ``layer_norm_bwd``: recomputes x̂ from x and the saved statistics; reads x and dy
  (2·M·N), writes dx (M·N). dweight and dbias are reduced in two stages: each of G
  programs sums its contiguous slab of rows into an fp32 partial row ([G, N]), and
- ``layer_norm_bwd_reduce`` sums the G partials per column and writes dweight/dbias
  in the parameters' dtypes. No atomics, so the result is deterministic.

Dispatch (``foldcompile.kernels._dispatch``): CUDA tensors, or CPU tensors under
``TRITON_INTERPRET=1``, run the Triton kernels; everything else runs
``layer_norm_reference``. Two exceptions run the reference as well, because the
kernels compute in fp32 and hold a whole row in registers: float64 inputs, and rows
longer than ``MAX_TRITON_DIM`` channels.

Non-contiguous inputs: rows are taken from ``x.reshape(-1, N)``, which is a view
(no copy) whenever the leading dims can be flattened with one row stride, and a copy
otherwise; a last dim with stride ≠ 1 is copied to contiguous.

Example::

    >>> x = torch.randn(4, 37, 24)
    >>> w, b = torch.randn(24), torch.randn(24)
    >>> y = layer_norm(x, w, b)
    >>> y.shape
    torch.Size([4, 37, 24])
    >>> torch.allclose(y, layer_norm_reference(x, w, b), atol=1e-5)
    True
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from foldcompile.kernels import _dispatch

__all__ = ["layer_norm", "layer_norm_reference", "LayerNormFunction", "MAX_TRITON_DIM"]

# Rows are held whole in registers (fp32): 16384 channels is 32 values a thread at 16 warps.
MAX_TRITON_DIM = 16384
_SUPPORTED = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Target elements of one [BLOCK_M, BLOCK_N] tile: enough bytes in flight per program
# to keep HBM busy, few enough registers to keep several programs resident per SM.
_TILE = 4096


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _ln_fwd_kernel(X, W, B, Y, Mean, Rstd, M, N, stride_xm, eps,
                   HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # One program normalises BLOCK_M whole rows: reads BLOCK_M·N, writes BLOCK_M·N + 2·BLOCK_M.
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    rmask = rows < M
    cmask = cols < N
    mask = rmask[:, None] & cmask[None, :]
    rows64 = rows.to(tl.int64)
    x = tl.load(X + rows64[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / N
    xc = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / N
    rstd = 1.0 / tl.sqrt(var + eps)
    y = xc * rstd[:, None]
    if HAS_W:
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
        y = y * w[None, :]
    if HAS_B:
        b = tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)
        y = y + b[None, :]
    tl.store(Y + rows64[:, None] * N + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(Mean + rows, mean, mask=rmask)
    tl.store(Rstd + rows, rstd, mask=rmask)


@triton.jit
def _ln_bwd_kernel(X, W, DY, DX, Mean, Rstd, PW, PB, M, N, stride_xm,
                   HAS_W: tl.constexpr, NEED_DX: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
                   ITERS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Program g owns rows [g·ITERS·BLOCK_M, (g+1)·ITERS·BLOCK_M): reads x and dy there,
    # writes dx there, and one fp32 partial row of dweight and of dbias (stage one).
    # ITERS is a compile-time power of two: loops with run-time bounds fail in Triton 3.6's
    # interpreter under numpy 2, and powers of two bound the number of GPU specialisations.
    g = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    cmask = cols < N
    if HAS_W:
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    acc_w = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_N], dtype=tl.float32)
    row_start = g * (ITERS * BLOCK_M)
    for it in range(ITERS):
        rows = row_start + it * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < M
        mask = rmask[:, None] & cmask[None, :]
        rows64 = rows.to(tl.int64)
        x = tl.load(X + rows64[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows64[:, None] * N + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(Mean + rows, mask=rmask, other=0.0)
        rstd = tl.load(Rstd + rows, mask=rmask, other=0.0)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        if NEED_DW:
            acc_w += tl.sum(dy * xhat, axis=0)
        if NEED_DB:
            acc_b += tl.sum(dy, axis=0)
        if NEED_DX:
            if HAS_W:
                wdy = dy * w[None, :]
            else:
                wdy = dy
            # dx = rstd · (w·dy − mean(w·dy) − x̂ · mean(x̂ · w·dy)); masked lanes are 0 in both sums.
            c1 = tl.sum(xhat * wdy, axis=1) / N
            c2 = tl.sum(wdy, axis=1) / N
            dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
            tl.store(DX + rows64[:, None] * N + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
    if NEED_DW:
        tl.store(PW + g * N + cols, acc_w, mask=cmask)
    if NEED_DB:
        tl.store(PB + g * N + cols, acc_b, mask=cmask)


@triton.jit
def _ln_bwd_reduce_kernel(PW, PB, DW, DB, G, N,
                          NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
                          ITERS: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr):
    # Stage two: column sums of the [G, N] fp32 partials; reads 2·G·N, writes 2·N.
    pid = tl.program_id(0)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    acc_w = tl.zeros([BLOCK_G, BLOCK_N], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_G, BLOCK_N], dtype=tl.float32)
    for it in range(ITERS):
        gs = it * BLOCK_G + tl.arange(0, BLOCK_G)
        mask = (gs < G)[:, None] & cmask[None, :]
        offs = gs[:, None] * N + cols[None, :]
        if NEED_DW:
            acc_w += tl.load(PW + offs, mask=mask, other=0.0)
        if NEED_DB:
            acc_b += tl.load(PB + offs, mask=mask, other=0.0)
    if NEED_DW:
        tl.store(DW + cols, tl.sum(acc_w, axis=0).to(DW.dtype.element_ty), mask=cmask)
    if NEED_DB:
        tl.store(DB + cols, tl.sum(acc_b, axis=0).to(DB.dtype.element_ty), mask=cmask)


# ----------------------------------------------------------------------------- launch helpers


def _row_blocking(n: int, element_size: int = 4, backward: bool = False) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) for rows of n channels.

    Measured on an H200 (bench/results/kernels_norm_tune*_NVIDIA_H200_2026-12-02.md, rows of 128 at
    N_res = 1024 and 2048): the forward in 2-byte dtypes is fastest with 16384-element tiles and 16 warps
    (89% of copy bandwidth against 79% with 4096); fp32 keeps 4096-element tiles. The backward wants
    8192-element tiles on 4 warps: 2.1x (bf16) and 1.7x (fp32) faster than 4096 on 8 warps (rows of up to 128
    channels, where it was measured)."""
    block_n = triton.next_power_of_2(n)
    if backward and block_n <= 128:  # measured at 128 channels; wider rows keep the first rule
        tile, per_warp = 2 * _TILE, 2048
    elif element_size <= 2 and not backward:
        tile, per_warp = 4 * _TILE, 1024
    else:
        tile, per_warp = _TILE, 512
    block_m = max(1, min(64 if tile <= 2 * _TILE else 128, tile // block_n))
    # a long row keeps at most 32 fp32 values of each live tile a thread (the rule before the sweep)
    num_warps = min(16, max(4, block_m * block_n // per_warp, block_n // 1024))
    return block_m, block_n, num_warps


def _bwd_split(m: int, block_m: int, device: torch.device) -> tuple[int, int]:
    """(G, ITERS): G stage-one programs of ITERS row blocks each, G about a few per SM."""
    if device.type == "cuda":
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        # The interpreter runs programs one after another: few, large programs are fastest.
        target = 4
    blocks = triton.cdiv(m, block_m)
    iters = triton.next_power_of_2(triton.cdiv(blocks, target))
    return triton.cdiv(blocks, iters), iters


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as an [M, N] matrix with unit column stride (a view when possible, else a copy)."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return x2


class LayerNormFunction(torch.autograd.Function):
    """Autograd wrapper of the Triton layer norm kernels (inputs already validated)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                eps: float) -> torch.Tensor:
        n = x.shape[-1]
        x2 = _rows(x)
        m = x2.shape[0]
        y = torch.empty((m, n), dtype=x.dtype, device=x.device)
        mean = torch.empty(m, dtype=torch.float32, device=x.device)
        rstd = torch.empty(m, dtype=torch.float32, device=x.device)
        block_m, block_n, num_warps = _row_blocking(n, x2.element_size())
        if m > 0:
            _dispatch.note_launch("layer_norm_fwd")
            _ln_fwd_kernel[(triton.cdiv(m, block_m),)](
                x2, weight if weight is not None else x2, bias if bias is not None else x2, y, mean, rstd,
                m, n, x2.stride(0), float(eps),
                HAS_W=weight is not None, HAS_B=bias is not None,
                BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps)
        # x itself is saved too (unused by the kernels): x2 was made under no_grad, and the
        # double-backward guard (_dispatch.once_differentiable) anchors its error on x.
        ctx.save_for_backward(x2, weight, bias, mean, rstd, x)
        ctx.x_shape = x.shape
        return y.view(x.shape)

    @staticmethod
    @_dispatch.once_differentiable  # not itself differentiable: a double backward raises
    def backward(ctx, dy: torch.Tensor):
        x2, weight, bias, mean, rstd, _ = ctx.saved_tensors
        need_dx, need_dw, need_db = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        m, n = x2.shape
        dy2 = dy.reshape(m, n).contiguous()
        dx = torch.empty((m, n), dtype=x2.dtype, device=x2.device) if need_dx else None
        dw = torch.empty_like(weight) if need_dw else None
        db = torch.empty_like(bias) if need_db else None
        if m == 0:
            return (dx.view(ctx.x_shape) if need_dx else None,
                    dw.zero_() if need_dw else None, db.zero_() if need_db else None, None)
        block_m, block_n, num_warps = _row_blocking(n, x2.element_size(), backward=True)
        g, iters = _bwd_split(m, block_m, x2.device)
        pw = torch.empty((g, n), dtype=torch.float32, device=x2.device) if need_dw else None
        pb = torch.empty((g, n), dtype=torch.float32, device=x2.device) if need_db else None
        dummy = dy2
        _dispatch.note_launch("layer_norm_bwd")
        _ln_bwd_kernel[(g,)](
            x2, weight if weight is not None else dummy, dy2, dx if need_dx else dummy, mean, rstd,
            pw if need_dw else dummy, pb if need_db else dummy,
            m, n, x2.stride(0),
            HAS_W=weight is not None, NEED_DX=need_dx, NEED_DW=need_dw, NEED_DB=need_db,
            ITERS=iters, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps)
        if need_dw or need_db:
            block_nr = min(128, triton.next_power_of_2(n))
            block_g = 32
            _dispatch.note_launch("layer_norm_bwd_reduce")
            _ln_bwd_reduce_kernel[(triton.cdiv(n, block_nr),)](
                pw if need_dw else pb, pb if need_db else pw, dw if need_dw else dummy, db if need_db else dummy,
                g, n, NEED_DW=need_dw, NEED_DB=need_db,
                ITERS=triton.next_power_of_2(triton.cdiv(g, block_g)), BLOCK_G=block_g, BLOCK_N=block_nr, num_warps=4)
        return (dx.view(ctx.x_shape) if need_dx else None, dw, db, None)


# ----------------------------------------------------------------------------- public API


def _check(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"layer_norm: x must be a tensor, got {type(x).__name__}")
    if x.dtype not in _SUPPORTED:
        raise TypeError(f"layer_norm: x has dtype {x.dtype}; supported: float16, bfloat16, float32, float64")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"layer_norm: x must have a non-empty last dim, got shape {tuple(x.shape)}")
    n = x.shape[-1]
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None:
            continue
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"layer_norm: {name} must be a tensor or None, got {type(p).__name__}")
        if p.shape != (n,):
            raise ValueError(f"layer_norm: {name} has shape {tuple(p.shape)}, expected ({n},) "
                             f"to match the last dim of x {tuple(x.shape)}")
        if p.dtype not in _SUPPORTED:
            raise TypeError(f"layer_norm: {name} has dtype {p.dtype}; supported: float16, bfloat16, float32, float64")
        if p.device != x.device:
            raise ValueError(f"layer_norm: {name} is on {p.device} but x is on {x.device}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"layer_norm: eps must be a Python number, got {type(eps).__name__} {eps!r}")
    if not eps >= 0:  # also refuses NaN
        raise ValueError(f"layer_norm: eps must be >= 0, got {eps}")


def layer_norm_reference(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                         eps: float = 1e-5) -> torch.Tensor:
    """Plain-PyTorch layer norm over the last dim, statistics in fp32 (float64 for float64 x).

    Same function as ``layer_norm``; differentiable by autograd; output dtype is x's.
    """
    _check(x, weight, bias, eps)
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(ct)
    mean = xf.mean(dim=-1, keepdim=True)
    xc = xf - mean
    var = (xc * xc).mean(dim=-1, keepdim=True)
    y = xc * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.to(ct)
    if bias is not None:
        y = y + bias.to(ct)
    return y.to(x.dtype)


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
               eps: float = 1e-5) -> torch.Tensor:
    """Layer norm over the last dim of ``x`` (any number of leading dims).

    Args:
        x: [..., N] float16 / bfloat16 / float32 / float64.
        weight, bias: [N] per-channel scale and shift, or None.
        eps: added to the variance.

    Returns ``(x - mean) / sqrt(var + eps) * weight + bias`` in x's dtype; mean and var
    are computed in fp32. Differentiable in x, weight and bias.
    """
    _check(x, weight, bias, eps)
    if (_dispatch.use_triton(x, weight, bias) and x.dtype != torch.float64
            and x.shape[-1] <= MAX_TRITON_DIM):
        # The kernels index weight and bias with unit stride: make them contiguous here
        # (a no-op for the usual parameters) so autograd routes their gradients back through the copy.
        weight = weight.contiguous() if weight is not None else None
        bias = bias.contiguous() if bias is not None else None
        return LayerNormFunction.apply(x, weight, bias, float(eps))
    return layer_norm_reference(x, weight, bias, eps)
