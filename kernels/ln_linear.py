"""Layer norm feeding several projections (``LN -> q, k, v, gate, pair bias``): one Triton kernel, forward and backward.

``layer_norm_linear(x, ln_weight, ln_bias, weights, biases, eps=, product_dtype=)`` computes, for ``x [..., K]``::

    y      = layer_norm(x) * ln_weight + ln_bias          (statistics in fp32, y rounded to x's dtype)
    out_p  = y.to(P) @ weights[p].to(P)^T + biases[p].to(P)   p = 0 .. n-1, weights[p] [N_p, K], biases[p] [N_p] or None

with ``P = product_dtype`` (x's dtype by default, where every cast is a no-op), and returns ``(out_0, ...,
out_{n-1})`` (each ``[..., N_p]``, contiguous, in P), and ``y`` last (x's dtype) with ``return_normalized=True``
(for a layer norm whose output is also read by something that is not a projection). This is eager's function,
rounding included: eager's ``F.layer_norm`` writes ``y`` in x's dtype and each ``F.linear`` reads that ``y``; here
``y`` is rounded to x's dtype in registers and fed to the products. Mixed precision (``P`` other than x's dtype)
is how bf16 autocast runs an fp32 model: the layer norm in fp32 on the fp32 residual stream, its output cast to
bf16 for the linear, whose fp32 parameters are cast to bf16 per call; here the fp32 weights are loaded and
rounded to P in registers (exactly ``W.to(P)``; nothing cast is written), the products accumulate in fp32, and
the outputs are rounded to P once, after the bias, as cuBLAS does.

Design (M rows of K channels, n projections of N = sum N_p output channels in all):

- ``ln_linear_fwd``: one program owns BLOCK_M whole rows. It loads them once (K ≤ ``MAX_TRITON_DIM``, a
  whole row block fits in registers), computes the exact two-pass mean and variance, normalises and
  applies ln_weight / ln_bias (the GEMM prologue, done once per row block rather than once per output
  tile), then loops over every projection and its BLOCK_N column tiles: ``y_tile @ W_p[tile]^T`` (fp32
  accumulator) + bias (the epilogue), stored into that projection's own output. Reads x once (M·K), the
  weights once per program (N·K, from L2: all of them together are a few hundred KiB), writes M·N, plus
  two fp32 statistics per row for the backward. ``y`` is never written (unless asked for).
  The weights are read where they are, one pointer and two strides each (a ``W.T`` view costs no copy):
  nothing is concatenated per call and nothing is cached, so there is no cache to invalidate when an
  optimizer updates a parameter. ln_weight / ln_bias are applied in the prologue, not folded into the
  weights: folding would round ``W * gamma`` to x's dtype, which is not eager's function.
- ``ln_linear_bwd``: one program per row block again, mirroring the forward: it accumulates
  ``dy = sum_p dout_p @ W_p`` in fp32 registers (the products' input gradient, never written to memory),
  adds the gradient of ``y`` itself where ``y`` was returned, then runs the layer-norm backward on it
  (``dx``, and per-row-block fp32 partial sums of ``dy·x̂`` and ``dy`` for ln_weight / ln_bias), writes
  the recomputed ``y`` (the operand of the weight gradients) and partial column sums of every
  ``dout_p`` (the bias gradients). Reads dout (M·N) and x (M·K), writes dx and y (2·M·K).
- The weight gradients ``dW_p = dout_p^T @ y`` are cuBLAS matmuls (torch.mm) on that ``y``: a product
  reduced over all M rows is what cuBLAS does best (split-K over a million rows at the pair
  representation); doing it in the row-block kernel would need [row blocks, N, K] fp32 partials.
  The partial sums are reduced by torch (``.sum(0)``, deterministic, no atomics).

Dispatch (``foldcompile.kernels._dispatch``): CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``, in
fp16 / bf16 / fp32 with ``K ≤ MAX_TRITON_DIM`` and at most ``MAX_PROJECTIONS`` projections run Triton;
anything else (float64, longer rows, no rows, plain CPU) runs ``layer_norm_linear_reference``.

Non-contiguous x: the leading dims are read in place when they collapse into at most three strided row
dims (the MSA column attention's ``m.transpose(-2, -3)`` does, with a batch dim too); otherwise, or when
the channel stride is not 1, x is copied once.

Example (AlphaFold's MSA row attention: one layer norm, q, k, v without bias and a gate with bias)::

    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.randn(3, 37, 24, generator=g)
    >>> gamma, beta = torch.randn(24, generator=g), torch.randn(24, generator=g)
    >>> ws = [torch.randn(16, 24, generator=g) for _ in range(4)]
    >>> bs = [None, None, None, torch.randn(16, generator=g)]
    >>> q, k, v, gate = layer_norm_linear(x, gamma, beta, ws, bs)
    >>> q.shape, gate.shape
    (torch.Size([3, 37, 16]), torch.Size([3, 37, 16]))
    >>> y = torch.nn.functional.layer_norm(x, (24,), gamma, beta)
    >>> torch.allclose(gate, torch.nn.functional.linear(y, ws[3], bs[3]), atol=1e-4)
    True
"""
import math
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from foldcompile.kernels._dispatch import check_offsets32, interpreting, note_launch, once_differentiable, use_triton
from foldcompile.kernels.layer_norm import layer_norm_reference

__all__ = ["layer_norm_linear", "layer_norm_linear_reference", "LayerNormLinearFunction", "MAX_TRITON_DIM",
           "MAX_PROJECTIONS"]

# A row block is held whole in registers (fp32 statistics, the normalised tile in x's dtype as the
# products' left operand): 512 channels at 32 rows is 64 values a thread at 8 warps.
MAX_TRITON_DIM = 512
# The projections are unrolled at compile time (one code path each): more than this many is a long compile.
MAX_PROJECTIONS = 8
_SUPPORTED = (torch.float16, torch.bfloat16, torch.float32)

# Loop bounds annotated with this name (the projections' widths) are run-time ints on the GPU (one compiled
# kernel serves every width) and constants under the interpreter, which cannot loop to a run-time bound
# (docs/PITFALLS-FOUND.md; the module must not use ``from __future__ import annotations`` for this to work).
constexpr = tl.constexpr if interpreting() else None


# --------------------------------------------------------------------------- kernels
@triton.jit
def _row_offsets(rows, D1, D2, sx0, sx1, sx2):
    """Element offsets of rows of x whose leading dims collapse into three strided dims [D0, D1, D2]."""
    r64 = rows.to(tl.int64)
    return (r64 // (D1 * D2)) * sx0 + ((r64 // D2) % D1) * sx1 + (r64 % D2) * sx2


@triton.jit
def _normalised(X, LNW, LNB, x_rows, ok, ks, k_ok, K, eps, HAS_LNW: tl.constexpr, HAS_LNB: tl.constexpr):
    """(x̂, mean, rstd, y) for one row block: x̂ = (x - mean) · rstd (0 outside the problem), y = x̂·w + b, fp32."""
    mask = ok[:, None] & k_ok[None, :]
    x = tl.load(X + x_rows[:, None] + ks[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / K
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / K + eps)
    xhat = xc * rstd[:, None]
    y = xhat
    if HAS_LNW:
        y = y * tl.load(LNW + ks, mask=k_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_LNB:
        y = y + tl.load(LNB + ks, mask=k_ok, other=0.0).to(tl.float32)[None, :]
    return xhat, mean, rstd, y


@triton.jit
def _ln_linear_fwd_kernel(X, LNW, LNB, Ws, Bs, Os, Y, Mean, Rstd,
                          M, D1, D2, sx0, sx1, sx2, K, eps, Ns: constexpr, SWN, SWK,
                          HAS_B: tl.constexpr, HAS_LNW: tl.constexpr, HAS_LNB: tl.constexpr, STORE_Y: tl.constexpr,
                          NUM: tl.constexpr, PRECISION: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    # One program: BLOCK_M whole rows through every projection. Reads its rows of x once and every weight
    # once; writes its rows of every output (and of y with STORE_Y) and two statistics per row.
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    ok = rows < M
    ks = tl.arange(0, BLOCK_K)
    k_ok = ks < K
    _, mean, rstd, y = _normalised(X, LNW, LNB, _row_offsets(rows, D1, D2, sx0, sx1, sx2), ok, ks, k_ok, K, eps,
                                   HAS_LNW, HAS_LNB)
    tl.store(Mean + rows, mean, mask=ok)
    tl.store(Rstd + rows, rstd, mask=ok)
    # the products' left operand: y rounded to the product dtype (the outputs' dtype; x's unless the layer norm's
    # output is cast for the products, as autocast casts an fp32 layer norm's output to bf16)
    # (through x's dtype, as eager rounds y there first: one rounding for fp32 x, two for fp16 x read in bf16)
    yq = y.to(X.dtype.element_ty).to(Os[0].dtype.element_ty)
    r64 = rows.to(tl.int64)
    if STORE_Y:  # eager's layer-norm output itself, in x's dtype
        tl.store(Y + r64[:, None] * K + ks[None, :], y.to(Y.dtype.element_ty), mask=ok[:, None] & k_ok[None, :])
    cols = tl.arange(0, BLOCK_N)
    for p in tl.static_range(NUM):
        # (Ns[p] is never assigned to a name: the interpreter turns every assigned value into a tensor,
        # and a tensor is no loop bound there)
        # W_p^T tile [BLOCK_K, BLOCK_N]: element (k, n) of the transposed weight at n·swn + k·swk
        w_ptr = Ws[p] + cols[None, :] * SWN[p] + ks[:, None] * SWK[p]
        o_ptr = Os[p] + r64[:, None] * Ns[p] + cols[None, :]
        for n0 in range(0, Ns[p], BLOCK_N):
            n_ok = cols < Ns[p] - n0
            # weights (and biases) of another dtype are rounded to the product dtype here: exactly W.to(P)
            wt = tl.load(w_ptr, mask=k_ok[:, None] & n_ok[None, :], other=0.0).to(yq.dtype)
            acc = tl.dot(yq, wt, input_precision=PRECISION)
            if (HAS_B >> p) & 1:
                acc += tl.load(Bs[p] + n0 + cols, mask=n_ok, other=0.0).to(yq.dtype).to(tl.float32)[None, :]
            tl.store(o_ptr, acc.to(yq.dtype), mask=ok[:, None] & n_ok[None, :])
            w_ptr += BLOCK_N * SWN[p]
            o_ptr += BLOCK_N


@triton.jit
def _recomputed(X, LNW, LNB, Mean, Rstd, x_rows, rows, ok, ks, k_ok, HAS_LNW: tl.constexpr, HAS_LNB: tl.constexpr):
    """(x̂, y) of a row block from x and the forward's saved statistics (0 outside the problem), fp32."""
    mask = ok[:, None] & k_ok[None, :]
    x = tl.load(X + x_rows[:, None] + ks[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.load(Mean + rows, mask=ok, other=0.0)
    rstd = tl.load(Rstd + rows, mask=ok, other=0.0)
    xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
    y = xhat
    if HAS_LNW:
        y = y * tl.load(LNW + ks, mask=k_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_LNB:
        y = y + tl.load(LNB + ks, mask=k_ok, other=0.0).to(tl.float32)[None, :]
    return xhat, y


@triton.jit
def _ln_linear_bwd_kernel(X, LNW, LNB, DOs, Ws, DYX, DX, Y, Mean, Rstd, PW, PB, PDB,
                          M, D1, D2, sx0, sx1, sx2, K, N_TOTAL, Ns: constexpr, OFFS, SWN, SWK,
                          HAS_G: tl.constexpr, NEED_DB: tl.constexpr, HAS_LNW: tl.constexpr, HAS_LNB: tl.constexpr,
                          HAS_DYX: tl.constexpr, NEED_DX: tl.constexpr, NEED_Y: tl.constexpr,
                          NEED_DLN: tl.constexpr, NUM: tl.constexpr, PRECISION: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    # One program: BLOCK_M rows. dy = sum_p dout_p @ W_p (+ the gradient of y itself) in fp32 registers,
    # then the layer-norm backward on it. Reads its rows of every dout once, x once, every weight once;
    # writes its rows of dx and of the recomputed y, and one partial row of each reduction: PW, PB
    # [blocks, K] (ln_weight, ln_bias), PDB [blocks, N_TOTAL] (projection p's bias at columns OFFS[p]..).
    # HAS_G / NEED_DB are bit masks over the projections (bit p: dout_p given / its bias needs a gradient).
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    ok = rows < M
    r64 = rows.to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    k_ok = ks < K
    mask = ok[:, None] & k_ok[None, :]
    cols = tl.arange(0, BLOCK_N)
    dy = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    if HAS_DYX:
        dy += tl.load(DYX + r64[:, None] * K + ks[None, :], mask=mask, other=0.0).to(tl.float32)
    for p in tl.static_range(NUM):
        if (HAS_G >> p) & 1:
            g_ptr = DOs[p] + r64[:, None] * Ns[p] + cols[None, :]
            w_ptr = Ws[p] + cols[:, None] * SWN[p] + ks[None, :] * SWK[p]  # W_p tile [BLOCK_N, BLOCK_K]
            db_ptr = PDB + pid * N_TOTAL + OFFS[p] + cols
            for n0 in range(0, Ns[p], BLOCK_N):
                n_ok = cols < Ns[p] - n0
                g = tl.load(g_ptr, mask=ok[:, None] & n_ok[None, :], other=0.0)  # in the product dtype
                wt = tl.load(w_ptr, mask=n_ok[:, None] & k_ok[None, :], other=0.0).to(g.dtype)
                dy += tl.dot(g, wt, input_precision=PRECISION)
                if (NEED_DB >> p) & 1:
                    tl.store(db_ptr, tl.sum(g.to(tl.float32), axis=0), mask=n_ok)
                g_ptr += BLOCK_N
                w_ptr += BLOCK_N * SWN[p]
                db_ptr += BLOCK_N
    if NEED_DX or NEED_Y or NEED_DLN:
        xhat, y = _recomputed(X, LNW, LNB, Mean, Rstd, _row_offsets(rows, D1, D2, sx0, sx1, sx2), rows, ok, ks, k_ok,
                              HAS_LNW, HAS_LNB)
        if NEED_Y:
            tl.store(Y + r64[:, None] * K + ks[None, :], y.to(Y.dtype.element_ty), mask=mask)
        if NEED_DLN:
            tl.store(PW + pid * K + ks, tl.sum(dy * xhat, axis=0), mask=k_ok)
            tl.store(PB + pid * K + ks, tl.sum(dy, axis=0), mask=k_ok)
        if NEED_DX:
            if HAS_LNW:
                wdy = dy * tl.load(LNW + ks, mask=k_ok, other=0.0).to(tl.float32)[None, :]
            else:
                wdy = dy
            # dx = rstd · (w·dy − mean(w·dy) − x̂ · mean(x̂ · w·dy)); x̂ and dy are 0 outside the problem
            c1 = tl.sum(xhat * wdy, axis=1) / K
            c2 = tl.sum(wdy, axis=1) / K
            rstd = tl.load(Rstd + rows, mask=ok, other=0.0)
            dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
            tl.store(DX + r64[:, None] * K + ks[None, :], dx.to(DX.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- launch helpers
def _np2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _empty(shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every kernel output is allocated here (tests poison them with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: TF32 only for fp32 when torch allows it for matmuls (ignored for fp16 / bf16)."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def _config(kind: str, K: int, dtype: torch.dtype) -> dict:
    """Block sizes (powers of two, every ``tl.dot`` dim ≥ 16) and launch options, by rule.

    Forward: the normalised row block [BLOCK_M, BLOCK_K] is the products' left operand, kept in
    registers; a [BLOCK_K, BLOCK_N] weight tile streams through shared memory per step. Backward: the
    fp32 ``dy`` accumulator [BLOCK_M, BLOCK_K] plus the layer-norm backward's temporaries of that size,
    hence fewer rows. Under the interpreter (cost per program and op, not per element) small column
    tiles make small tests cross tile boundaries."""
    bk = max(16, _np2(K))
    if interpreting():
        return dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=bk, num_warps=4, num_stages=1)
    wide = dtype == torch.float32
    # bf16 choices measured on an H200 (bench/results/kernels_ln_linear_sweep_NVIDIA_H200_2026-12-02.md, GPU
    # time of CUDA-graph replays): forward K=128 at 10^6 rows 64 x 64 tiles on 4 warps, 4 stages (0.87 ms
    # against 1.08 with 128 x 128 on 8); backward K=128 (pair, N_res=256) 64 x 64 on 4 warps (0.27 against
    # 0.33 ms on 8); backward K=256 (MSA rows) 32 x 32 on 4 warps, 3 stages (0.32 against 0.43 ms)
    if kind == "fwd":
        # the fp32 statistics pass holds a few [BLOCK_M, BLOCK_K] fp32 tiles; a weight tile of BLOCK_K·BLOCK_N
        # per pipeline stage in shared memory
        if bk <= 128:
            bm, bn, warps, stages = 64, 64, 4, 4
        elif bk <= 256:
            bm, bn, warps, stages = 64, 128, 8, 2
        else:
            bm, bn, warps, stages = 32, 64, 8, 2
        if wide and bm > 16:
            bm //= 2
        return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)
    if bk <= 128:
        bm, bn, warps, stages = 64, 64, 4, 2
    elif bk <= 256:
        bm, bn, warps, stages = 32, 32, 4, 3
    else:  # not measured: the first rule's choice
        bm, bn, warps, stages = 16, 32, 8 if 16 * bk >= 8192 else 4, 2
    if wide and bm > 16:
        bm //= 2
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)


def _rows_of(x: torch.Tensor) -> tuple[torch.Tensor, int, tuple[int, int], tuple[int, int, int]]:
    """``(x', M, (D1, D2), (s0, s1, s2))``: the rows of ``x`` as three strided dims [D0, D1, D2] (row r at
    element offset ``(r // (D1·D2))·s0 + ((r // D2) % D1)·s1 + (r % D2)·s2`` of ``x'``); ``x' = x`` itself
    when its leading dims collapse into at most three such dims and its channel stride is 1, else a
    contiguous copy."""
    if x.shape[-1] > 1 and x.stride(-1) != 1:
        x = x.contiguous()
    groups: list[list[int]] = []  # [size, stride] of collapsed leading dims, innermost first
    for size, stride in zip(reversed(x.shape[:-1]), reversed(x.stride()[:-1])):
        if size == 1:
            continue
        if groups and stride == groups[-1][0] * groups[-1][1]:
            groups[-1][0] *= size
        else:
            groups.append([size, stride])
    if len(groups) > 3:
        x = x.contiguous()
        groups = [[math.prod(x.shape[:-1]), x.shape[-1]]]
    (d2, s2), (d1, s1), (d0, s0) = (groups + [[1, 0]] * 3)[:3]
    return x, d0 * d1 * d2, (d1, d2), (s0, s1, s2)


def _tile_dtype(product_dtype: torch.dtype, weights: Sequence[torch.Tensor]) -> torch.dtype:
    """The dtype the block sizes are chosen for: fp32 where the products or the weight tiles loaded are fp32."""
    return torch.float32 if torch.float32 in (product_dtype, *(w.dtype for w in weights)) else product_dtype


def _bits(flags: Sequence[bool]) -> int:
    return sum(1 << p for p, f in enumerate(flags) if f)


# --------------------------------------------------------------------------- autograd
class LayerNormLinearFunction(torch.autograd.Function):
    """The Triton kernels (inputs already validated): ``apply(x, ln_weight, ln_bias, eps, return_normalized,
    product_dtype, *weights, *biases)`` with n weights [N_p, K] (any strides) and n biases (contiguous [N_p] or
    None); the products run in ``product_dtype``, weights and biases rounded to it."""

    @staticmethod
    def forward(ctx, x, ln_weight, ln_bias, eps: float, return_normalized: bool, product_dtype: torch.dtype,
                *params):
        n = len(params) // 2
        P = product_dtype
        weights, biases = params[:n], params[n:]
        K, lead = x.shape[-1], x.shape[:-1]
        xs, M, dims, strides = _rows_of(x)
        # allocated in their final shapes (row-major [M, N_p] in memory): no output is a view of a tensor
        # made here, so a model may write into one in place as it may into F.linear's result
        outs = [_empty((*lead, w.shape[0]), P, x.device) for w in weights]
        y = _empty((*lead, K), x.dtype, x.device) if return_normalized else None
        mean = _empty((M,), torch.float32, x.device)
        rstd = _empty((M,), torch.float32, x.device)
        cfg = _config("fwd", K, _tile_dtype(P, weights))
        note_launch("ln_linear_fwd")
        _ln_linear_fwd_kernel[(_cdiv(M, cfg["BLOCK_M"]),)](
            xs, ln_weight if ln_weight is not None else xs, ln_bias if ln_bias is not None else xs,
            tuple(weights), tuple(b if b is not None else xs for b in biases), tuple(outs),
            y if y is not None else xs, mean, rstd, M, *dims, *strides, K, float(eps),
            tuple(w.shape[0] for w in weights), tuple(w.stride(0) for w in weights),
            tuple(w.stride(1) for w in weights),
            HAS_B=_bits([b is not None for b in biases]), HAS_LNW=ln_weight is not None, HAS_LNB=ln_bias is not None,
            STORE_Y=y is not None, NUM=n, PRECISION=_precision(P), **cfg)
        ctx.set_materialize_grads(False)
        # x itself is saved too (unused by the kernels): xs may be a copy made under no_grad, and the
        # double-backward guard (_dispatch.once_differentiable) anchors its error on x.
        ctx.save_for_backward(xs, ln_weight, ln_bias, mean, rstd, y, x, *weights)
        ctx.geometry = (M, dims, strides, lead)
        ctx.n, ctx.return_normalized, ctx.product_dtype = n, return_normalized, P
        ctx.bias_dtypes = [b.dtype if b is not None else None for b in biases]
        return tuple(outs) + ((y,) if y is not None else ())

    @staticmethod
    @once_differentiable  # not itself differentiable: a double backward raises
    def backward(ctx, *grads):
        xs, ln_weight, ln_bias, mean, rstd, y_saved, x, *weights = ctx.saved_tensors
        n, P = ctx.n, ctx.product_dtype
        M, dims, strides, lead = ctx.geometry
        K = x.shape[-1]
        needs = ctx.needs_input_grad
        need_x, need_lnw, need_lnb = needs[0], needs[1], needs[2]
        need_w, need_b = needs[6:6 + n], needs[6 + n:6 + 2 * n]
        douts = [None if g is None else g.reshape(M, w.shape[0]).to(P).contiguous()
                 for g, w in zip(grads[:n], weights)]
        dyx = grads[n] if ctx.return_normalized else None
        dyx = None if dyx is None else dyx.reshape(M, K).to(x.dtype).contiguous()
        nothing = (None,) * (6 + 2 * n)
        if all(g is None for g in douts) and dyx is None:
            return nothing  # no gradient reached any output: every input gradient is zero
        has_g = [g is not None for g in douts]
        want_w = [bool(nw) and h for nw, h in zip(need_w, has_g)]
        want_b = [bool(nb) and h for nb, h in zip(need_b, has_g)]
        need_y = any(want_w) and y_saved is None
        need_dln = bool(need_lnw or need_lnb)
        widths = [w.shape[0] for w in weights]
        offs = [sum(widths[:p]) for p in range(n)]
        cfg = _config("bwd", K, _tile_dtype(P, weights))
        blocks = _cdiv(M, cfg["BLOCK_M"])
        dx = _empty((*lead, K), x.dtype, x.device) if need_x else None
        y = _empty((M, K), P, x.device) if need_y else None  # the weight gradients' operand: y in the product dtype
        pw = _empty((blocks, K), torch.float32, x.device) if need_dln else None
        pb = _empty((blocks, K), torch.float32, x.device) if need_dln else None
        pdb = _empty((blocks, sum(widths)), torch.float32, x.device) if any(want_b) else None
        if need_x or need_y or need_dln or any(want_b):
            dummy = xs
            note_launch("ln_linear_bwd")
            _ln_linear_bwd_kernel[(blocks,)](
                xs, ln_weight if ln_weight is not None else dummy, ln_bias if ln_bias is not None else dummy,
                tuple(g if g is not None else dummy for g in douts), tuple(weights),
                dyx if dyx is not None else dummy, dx if dx is not None else dummy, y if y is not None else dummy,
                mean, rstd, pw if pw is not None else dummy, pb if pb is not None else dummy,
                pdb if pdb is not None else dummy, M, *dims, *strides, K, sum(widths), tuple(widths), tuple(offs),
                tuple(w.stride(0) for w in weights), tuple(w.stride(1) for w in weights),
                HAS_G=_bits(has_g), NEED_DB=_bits(want_b), HAS_LNW=ln_weight is not None,
                HAS_LNB=ln_bias is not None, HAS_DYX=dyx is not None, NEED_DX=bool(need_x), NEED_Y=need_y,
                NEED_DLN=need_dln, NUM=n, PRECISION=_precision(P), **cfg)
        # (the returned y is in x's dtype; the forward rounded exactly that fp32 value to P for the products)
        y_for_w = y if y is not None else (y_saved.reshape(M, K).to(P) if y_saved is not None else None)
        # the weight gradients: dout_p^T @ y, one cuBLAS product each (eager's own products)
        dws = [torch.mm(g.t(), y_for_w).to(w.dtype) if want else None
               for g, w, want in zip(douts, weights, want_w)]
        # (rounded to P first: eager's bias gradient of a product in P is a P tensor, cast back for a wider bias)
        dbs = [pdb[:, o:o + wd].sum(0).to(P).to(dt) if want else None
               for o, wd, dt, want in zip(offs, widths, ctx.bias_dtypes, want_b)]
        dlnw = pw.sum(0).to(ln_weight.dtype) if need_lnw else None
        dlnb = pb.sum(0).to(ln_bias.dtype) if need_lnb else None
        return (dx, dlnw, dlnb, None, None, None, *dws, *dbs)


# --------------------------------------------------------------------------- public API
def _check(x, ln_weight, ln_bias, weights, biases, eps, return_normalized,
           product_dtype=None) -> tuple[list, list, torch.dtype]:
    """Validate the arguments; returns (weights, biases) as lists of one length, and the product dtype."""
    op = "layer_norm_linear"
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: x must be a tensor, got {type(x).__name__}")
    if x.dtype not in _SUPPORTED + (torch.float64,):
        raise TypeError(f"{op}: x has dtype {x.dtype}; supported: float16, bfloat16, float32, float64")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"{op}: x must have a non-empty last dim, got shape {tuple(x.shape)}")
    K = x.shape[-1]
    for name, p in (("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        if p is None:
            continue
        if not isinstance(p, torch.Tensor) or not p.is_floating_point():
            raise TypeError(f"{op}: {name} must be a float tensor or None, got {getattr(p, 'dtype', type(p))}")
        if tuple(p.shape) != (K,):
            raise ValueError(f"{op}: {name} has shape {tuple(p.shape)}, expected ({K},) to match the last dim of "
                             f"x {tuple(x.shape)}")
    if isinstance(weights, torch.Tensor) or not isinstance(weights, (list, tuple)) or not weights:
        raise TypeError(f"{op}: weights must be a non-empty list of [N, {K}] tensors")
    weights = list(weights)
    biases = [None] * len(weights) if biases is None else list(biases)
    if len(biases) != len(weights):
        raise ValueError(f"{op}: {len(weights)} weights but {len(biases)} biases (give None for a projection "
                         "without bias)")
    for p, (w, b) in enumerate(zip(weights, biases)):
        if not isinstance(w, torch.Tensor) or w.dim() != 2 or w.shape[1] != K:
            raise ValueError(f"{op}: weights[{p}] must be a [N, {K}] tensor for x {tuple(x.shape)}, got "
                             f"{tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__}")
        if product_dtype is None and w.dtype != x.dtype:
            raise TypeError(f"{op}: weights[{p}] has dtype {w.dtype} but x has {x.dtype} (as F.linear, one dtype; "
                            "give product_dtype to round y and the weights to one dtype for the products)")
        if product_dtype is not None and w.dtype not in _SUPPORTED + (torch.float64,):
            raise TypeError(f"{op}: weights[{p}] has dtype {w.dtype}; supported: float16, bfloat16, float32, float64")
        if b is not None and (not isinstance(b, torch.Tensor) or tuple(b.shape) != (w.shape[0],)
                              or (b.dtype != x.dtype if product_dtype is None else not b.is_floating_point())):
            raise ValueError(f"{op}: biases[{p}] must be None or a {x.dtype if product_dtype is None else 'float'} "
                             f"[{w.shape[0]}] tensor, got {getattr(b, 'dtype', type(b).__name__)} "
                             f"{tuple(getattr(b, 'shape', ()))}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0 or not math.isfinite(eps):
        raise ValueError(f"{op}: eps must be a finite Python number >= 0, got {eps!r}")
    if not isinstance(return_normalized, bool):
        raise TypeError(f"{op}: return_normalized must be a bool, got {return_normalized!r}")
    if product_dtype is not None and product_dtype not in _SUPPORTED + (torch.float64,):
        raise TypeError(f"{op}: product_dtype {product_dtype}; supported: float16, bfloat16, float32, float64")
    devices = {t.device for t in (x, ln_weight, ln_bias, *weights, *biases) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"{op}: all inputs must be on one device, got {sorted(map(str, devices))}")
    return weights, biases, product_dtype if product_dtype is not None else x.dtype


def layer_norm_linear_reference(x: torch.Tensor, ln_weight: Optional[torch.Tensor], ln_bias: Optional[torch.Tensor],
                                weights: Sequence[torch.Tensor], biases: Optional[Sequence[Optional[torch.Tensor]]] = None,
                                *, eps: float = 1e-5, return_normalized: bool = False,
                                product_dtype: Optional[torch.dtype] = None) -> tuple[torch.Tensor, ...]:
    """Plain PyTorch :func:`layer_norm_linear`: the layer norm (statistics in fp32, float64 for float64 x;
    ``y`` in x's dtype, as ``F.layer_norm`` gives it), then one ``F.linear`` per projection, on ``y``, the
    weights and the biases cast to ``product_dtype`` (x's dtype when None: no cast). Differentiable by autograd."""
    weights, biases, P = _check(x, ln_weight, ln_bias, weights, biases, eps, return_normalized, product_dtype)
    y = layer_norm_reference(x, ln_weight, ln_bias, eps)
    outs = tuple(torch.nn.functional.linear(y.to(P), w.to(P), b.to(P) if b is not None else None)
                 for w, b in zip(weights, biases))
    return outs + (y,) if return_normalized else outs


def layer_norm_linear(x: torch.Tensor, ln_weight: Optional[torch.Tensor], ln_bias: Optional[torch.Tensor],
                      weights: Sequence[torch.Tensor], biases: Optional[Sequence[Optional[torch.Tensor]]] = None,
                      *, eps: float = 1e-5, return_normalized: bool = False,
                      product_dtype: Optional[torch.dtype] = None) -> tuple[torch.Tensor, ...]:
    """``linear(layer_norm(x), W_p, b_p)`` for every projection p, as one kernel (module docstring).

    Args:
        x: ``[..., K]`` float16 / bfloat16 / float32 / float64, any strides.
        ln_weight, ln_bias: ``[K]`` (any float dtype) or None.
        weights: n ≥ 1 tensors ``[N_p, K]`` (a Linear's weight; any strides) of x's dtype (of any float dtype
            with ``product_dtype``).
        biases: n entries, each ``[N_p]`` of x's dtype (any float dtype with ``product_dtype``) or None; or None
            (no projection has a bias).
        eps: added to the variance.
        return_normalized: also return the layer norm's output ``y`` (last, in x's dtype), for its other readers.
        product_dtype: the dtype the products run in (None: x's): ``y``, the weights and the biases are rounded
            to it, ``linear(y.to(P), W.to(P), b.to(P))``, as autocast runs a linear on an fp32 layer norm.

    Returns the n projections ``[..., N_p]`` in the product dtype (and ``y`` ``[..., K]`` in x's).
    Differentiable in x, ln_weight, ln_bias, every weight and bias.
    """
    weights, biases, P = _check(x, ln_weight, ln_bias, weights, biases, eps, return_normalized, product_dtype)
    tensors = (x, ln_weight, ln_bias, *weights, *biases)
    if (x.dtype in _SUPPORTED and P in _SUPPORTED and all(w.dtype in _SUPPORTED for w in weights)
            and use_triton(*tensors) and x.shape[-1] <= MAX_TRITON_DIM
            and len(weights) <= MAX_PROJECTIONS and x.numel() > 0 and min(w.shape[0] for w in weights) > 0):
        for p, w in enumerate(weights):
            check_offsets32("layer_norm_linear", f"weights[{p}]", w, (0, 1))
        # the kernels index these with unit stride: contiguous here (a no-op for parameters), so autograd
        # routes their gradients back through the copy
        ln_weight = ln_weight.contiguous() if ln_weight is not None else None
        ln_bias = ln_bias.contiguous() if ln_bias is not None else None
        biases = [b.contiguous() if b is not None else None for b in biases]
        return LayerNormLinearFunction.apply(x, ln_weight, ln_bias, float(eps), return_normalized, P, *weights,
                                             *biases)
    return layer_norm_linear_reference(x, ln_weight, ln_bias, weights, biases, eps=eps,
                                       return_normalized=return_normalized, product_dtype=P)
