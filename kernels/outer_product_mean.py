"""Fused outer product mean (AlphaFold 2 Alg. 10), forward and backward, never writing the outer product.

``outer_product_mean(a, b, weight, bias, mask_a=, mask_b=, eps=)`` computes, for the two projections
``a [*, S, I, C]`` and ``b [*, S, J, E]`` of an MSA (S sequences, I and J residues)::

    o[i, j, c, e] = sum_s a[s, i, c] b[s, j, e]                          [*, I, J, C, E]
    p[i, j, :]    = flatten(o[i, j]) @ weight^T                           weight [Z, C·E], index c·E + e
    out[i, j, :]  = (p[i, j, :] + bias) / d[i, j]                         (bias_divided, AlphaFold's order)
                  =  p[i, j, :] / d[i, j] + bias                          (bias_divided=False)
    d[i, j]       = eps + sum_s mask_a[s, i] mask_b[s, j]                 (no masks: eps + S)

``a`` and ``b`` are taken as they are: AlphaFold multiplies them by the MSA mask first, and that is the
caller's (the model's own ops). The masks only give the count of sequences where both residues are
present. ``weight`` may also be given as ``[Z, C, E]`` (any strides: a permuted view of a ``[Z, E·C]``
weight for an ``...ijec`` spelling costs no copy).

Eager PyTorch writes ``o`` (I·J·C·E values: 1 G elements, 2 GiB in bf16 at N_res = 1024, c = 32),
usually twice (the einsum's permuted result, then its copy into the flattened layout), and reads
it into the linear. Here it lives in registers only.

Kernels (per batch element; C, E padded to powers of two inside with masked loads):

- ``opm_fwd``: one program per tile of BI x BJ residue pairs. For each chunk of CB channels c it
  computes ``o`` for the tile as one GEMM over the sequences, ``[BI·CB, S] @ [S, BJ·E]``
  (fp32 accumulator), rounds it to the input dtype (eager's ``o`` has that dtype too),
  re-lays it out in registers as ``[BI·BJ pairs, CB·E]`` and multiplies it by the matching rows
  of the weight, ``[CB·E, Z]``, into the ``[BI·BJ, Z]`` fp32 output tile; the epilogue adds the
  bias and divides by d. Reads a once and b once per c chunk (both stay in L2: S·N·c elements,
  8 MiB each at the sizes above), the weight once per tile; writes the output once. FLOPs:
  2·S·I·J·C·E + 2·I·J·C·E·Z, the same as eager.
- ``opm_bwd_da``: da[s, i, c] = sum_{j, e} do[i, j, c, e] b[s, j, e] with do = (dout / d) @ W
  recomputed per tile (the forward's second GEMM run backwards); one program per (I block,
  c chunk, S block) loops over the J blocks: ``[BI·BJ, Z] @ [Z, CB·E]`` then ``[BI·CB, BJ·E] @
  [BJ·E, BS]``. db is the same kernel on the mirrored problem (a and b, i and j, c and e
  swapped: strided views of dout, d and the weight, no copies).
- ``opm_bwd_dw``: dW = sum over pairs of (dout / d)^T o, with o recomputed per tile (the
  forward's first GEMM); one program per (c chunk, share of the pair tiles), the [Z, CB·E]
  fp32 partial in registers; the partials ([splits, Z, C, E] fp32, a few MiB) are summed by
  torch. The bias gradient (sum of dout / d, or of dout) rides along in the c-chunk-0 programs.
  No atomics; o is never stored (the alternative, saving o for backward, is the 2 GiB this
  kernel exists to avoid).

NaN and ±inf in a, b or the weight, and a zero count (eps = 0), give eager's NaN and ±inf at eager's
positions, gradients included: lanes past the problem's edge are zeroed before each product, since
0 * inf there is NaN (tests/kernels/test_properties_outer_product_mean.py).

The count d is one small batched GEMM over the masks done by torch in fp32 ([*, I, J]: 4 MiB at
N_res = 1024), read by every kernel. Backward FLOPs are ~3x the forward's (three recomputed GEMMs
of the forward's size, three gradient GEMMs).

Block sizes are chosen by rule (``_config``), not autotuned: a first version, correctness
first (``bench/kernels/outer_product_mean.py`` records them). On the GPU ``tl.dot`` needs every
dim ≥ 16, so the tile sizes grow for small c (the tiny zoo models have c = 4).

Dispatch (``foldcompile.kernels._dispatch``): CUDA tensors, or CPU tensors under
``TRITON_INTERPRET=1``, in fp16 / bf16 / fp32 run Triton; anything else (float64, other CPU calls)
runs ``outer_product_mean_reference``.

Example (AlphaFold's masked outer product mean, 5 sequences, 7 residues, c = 4, c_z = 8)::

    >>> g = torch.Generator().manual_seed(0)
    >>> msa_mask = (torch.rand(5, 7, generator=g) > 0.2).float()
    >>> a = torch.randn(5, 7, 4, generator=g) * msa_mask[..., None]
    >>> b = torch.randn(5, 7, 4, generator=g) * msa_mask[..., None]
    >>> w, bias = torch.randn(8, 16, generator=g), torch.randn(8, generator=g)
    >>> out = outer_product_mean(a, b, w, bias, mask_a=msa_mask, mask_b=msa_mask, eps=1e-3)
    >>> out.shape
    torch.Size([7, 7, 8])
    >>> o = torch.einsum("sic,sje->ijce", a, b).reshape(7, 7, 16)
    >>> eager = (o @ w.T + bias) / (1e-3 + torch.einsum("si,sj->ij", msa_mask, msa_mask))[..., None]
    >>> torch.allclose(out, eager, atol=1e-5)
    True
"""
import math

import torch
import triton
import triton.language as tl

from foldcompile.kernels._dispatch import check_offsets32, interpreting, note_launch, once_differentiable, use_triton

__all__ = ["outer_product_mean", "outer_product_mean_reference", "OuterProductMeanFunction"]

_SUPPORTED = (torch.float16, torch.bfloat16, torch.float32)

# Loop bounds annotated with this name are run-time ints on the GPU (one compiled kernel serves
# every N_seq) and constants under the interpreter, which cannot loop to a run-time bound (see
# kernels/attention.py, where this trick is explained; this module must not use
# ``from __future__ import annotations`` for it to work).
constexpr = tl.constexpr if interpreting() else None

# CUDA limits grid axes 1 and 2 to 65535 programs.
_MAX_GRID_YZ = 65535


# --------------------------------------------------------------------------- kernels
# Index arithmetic: pointers are built once outside each loop and advanced by a scalar step inside
# it (fewer integer ops on the GPU, and far fewer under the interpreter, which checks every int32
# op for overflow); residue indices are int64 so that row offsets of large pair tensors cannot wrap.
@triton.jit
def _outer_chunk(A_b, B_b, a_rows, a_ok, b_cols, b_ok, sas, sbs, S: constexpr, PRECISION: tl.constexpr,
                 M1: tl.constexpr, N1: tl.constexpr, BS: tl.constexpr):
    """o for one pair tile and one channel chunk, [M1 = BI·CB, N1 = BJ·EP] (rows (i, c), columns (j, e)),
    summed over every sequence in fp32. ``a_rows`` / ``b_cols``: the element offsets of those rows of a
    and columns of b at sequence 0; ``a_ok`` / ``b_ok``: which exist."""
    ks = tl.arange(0, BS)
    a_ptr = A_b + a_rows[:, None] + ks[None, :] * sas
    b_ptr = B_b + ks[:, None] * sbs + b_cols[None, :]
    o = tl.zeros([M1, N1], tl.float32)
    for s0 in range(0, S, BS):
        s_ok = ks < S - s0
        at = tl.load(a_ptr, mask=a_ok[:, None] & s_ok[None, :], other=0.0)
        bt = tl.load(b_ptr, mask=s_ok[:, None] & b_ok[None, :], other=0.0)
        o += tl.dot(at, bt, input_precision=PRECISION)
        a_ptr += BS * sas
        b_ptr += BS * sbs
    # Lanes outside the problem are 0 * (a value of the other operand): NaN where that value is
    # ±inf. Zero them, or they reach real entries through the next product (0 * NaN; eager's
    # result there is ±inf, not NaN).
    return tl.where(a_ok[:, None] & b_ok[None, :], o, 0.0)


@triton.jit
def _pairs_by_channels(o, BI: tl.constexpr, CB: tl.constexpr, BJ: tl.constexpr, EP: tl.constexpr):
    """[BI·CB, BJ·EP] (rows (i, c), columns (j, e)) -> [BI·BJ, CB·EP] (rows (i, j), columns (c, e))."""
    return tl.reshape(tl.permute(tl.reshape(o, [BI, CB, BJ, EP]), (0, 2, 1, 3)), [BI * BJ, CB * EP])


@triton.jit
def _scaled_grad(g_ptr, d_ptr, ok2, z_ok, den_const, HAS_DEN: tl.constexpr):
    """(dout / d, dout) for a [BI·BJ, BZ] pair tile in fp32 (0 outside the problem)."""
    ok = ok2[:, None] & z_ok[None, :]
    g = tl.load(g_ptr, mask=ok, other=0.0).to(tl.float32)
    if HAS_DEN:
        # where, not just the load's 0: a zero count (eps = 0) makes the padded channels 0 / 0 = NaN
        return tl.where(ok, g / tl.load(d_ptr, mask=ok2, other=1.0)[:, None], 0.0), g
    return g / den_const, g


@triton.jit
def _opm_fwd_kernel(A, Bm, W, BIAS, DEN, OUT,
                    saz, sas, sai, sac, sbz, sbs, sbj, sbe, swz, swc, swe, sdz, sdi, sdj,
                    S: constexpr, I, J, C: tl.constexpr, E, Z, den_const,
                    HAS_BIAS: tl.constexpr, HAS_DEN: tl.constexpr, BIAS_DIVIDED: tl.constexpr,
                    PRECISION: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr, CB: tl.constexpr,
                    EP: tl.constexpr, BZ: tl.constexpr, BS: tl.constexpr):
    # One program: BI x BJ residue pairs of one batch element. Reads its a rows once and its b
    # rows once per c chunk, the weight once; writes BI·BJ·Z outputs. o never leaves registers.
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    bz = tl.program_id(2).to(tl.int64)
    r1 = tl.arange(0, BI * CB)
    i1 = pid_i * BI + r1 // CB
    c1 = r1 % CB
    q1 = tl.arange(0, BJ * EP)
    j1 = pid_j * BJ + q1 // EP
    e1 = q1 % EP
    b_cols = j1.to(tl.int64) * sbj + e1 * sbe
    b_ok = (j1 < J) & (e1 < E)
    k2 = tl.arange(0, CB * EP)
    z = tl.arange(0, BZ)
    z_ok = z < Z
    w_ptr = W + z[None, :] * swz + ((k2 // EP) * swc + (k2 % EP) * swe)[:, None]
    w_ok0 = (k2 % EP < E)[:, None] & z_ok[None, :]
    acc = tl.zeros([BI * BJ, BZ], tl.float32)
    for c0 in range(0, C, CB):
        a_rows = i1.to(tl.int64) * sai + (c0 + c1) * sac
        o = _outer_chunk(A + bz * saz, Bm + bz * sbz, a_rows, (i1 < I) & (c0 + c1 < C), b_cols, b_ok, sas, sbs,
                         S, PRECISION, BI * CB, BJ * EP, BS)
        o2 = _pairs_by_channels(o.to(A.dtype.element_ty), BI, CB, BJ, EP)
        wt = tl.load(w_ptr + c0 * swc, mask=w_ok0 & (c0 + k2 // EP < C)[:, None], other=0.0)
        acc += tl.dot(o2, wt, input_precision=PRECISION)
    r2 = tl.arange(0, BI * BJ)
    i2 = (pid_i * BI + r2 // BJ).to(tl.int64)
    j2 = (pid_j * BJ + r2 % BJ).to(tl.int64)
    ok2 = (i2 < I) & (j2 < J)
    if HAS_DEN:
        den = tl.load(DEN + bz * sdz + i2 * sdi + j2 * sdj, mask=ok2, other=1.0)[:, None]
    else:
        den = den_const
    if HAS_BIAS:
        bias = tl.load(BIAS + z, mask=z_ok, other=0.0).to(tl.float32)[None, :]
        if BIAS_DIVIDED:
            acc = (acc + bias) / den
        else:
            acc = acc / den + bias
    else:
        acc = acc / den
    # OUT is contiguous [B, I, J, Z]
    tl.store(OUT + ((bz * I + i2) * J + j2)[:, None] * Z + z[None, :], acc.to(OUT.dtype.element_ty),
             mask=ok2[:, None] & z_ok[None, :])


@triton.jit
def _opm_bwd_da_kernel(DOUT, DEN, W, Bm, DA,
                       sgz_b, sgi, sgj, sgz, sdz, sdi, sdj, swz, swc, swe, sbz, sbs, sbj, sbe,
                       S, I, J: constexpr, C, E, Z, den_const, N_CHUNKS,
                       HAS_DEN: tl.constexpr, PRECISION: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr,
                       CB: tl.constexpr, EP: tl.constexpr, BZ: tl.constexpr, BS: tl.constexpr):
    # One program: da for BI residues, CB channels and BS sequences of one batch element; loops
    # over the J blocks, recomputing do = (dout / d) @ W for each pair tile, then da += do · b.
    # da [B, S, I, C] contiguous.
    pid0 = tl.program_id(0)
    pid_i = pid0 // N_CHUNKS
    c0 = (pid0 % N_CHUNKS) * CB
    s = tl.program_id(1) * BS + tl.arange(0, BS)
    bz = tl.program_id(2).to(tl.int64)
    r2 = tl.arange(0, BI * BJ)
    i2 = (pid_i * BI + r2 // BJ).to(tl.int64)
    jl2 = r2 % BJ
    z = tl.arange(0, BZ)
    z_ok = z < Z
    k2 = tl.arange(0, CB * EP)
    ck = c0 + k2 // EP
    ek = k2 % EP
    wc = tl.load(W + z[:, None] * swz + (ck * swc + ek * swe)[None, :],
                 mask=z_ok[:, None] & ((ck < C) & (ek < E))[None, :], other=0.0)  # [BZ, CB·EP], kept
    q = tl.arange(0, BJ * EP)
    jl = q // EP
    e = q % EP
    g_ptr = DOUT + bz * sgz_b + (i2 * sgi + jl2 * sgj)[:, None] + z[None, :] * sgz
    d_ptr = DEN + bz * sdz + i2 * sdi + jl2 * sdj
    b_ptr = Bm + bz * sbz + s[None, :] * sbs + (jl.to(tl.int64) * sbj + e * sbe)[:, None]
    be_ok = (e < E)[:, None] & (s < S)[None, :]
    acc = tl.zeros([BI * CB, BS], tl.float32)
    for j0 in range(0, J, BJ):
        g, _ = _scaled_grad(g_ptr, d_ptr, (i2 < I) & (jl2 < J - j0), z_ok, den_const, HAS_DEN)
        do = tl.dot(g.to(W.dtype.element_ty), wc, input_precision=PRECISION)  # [BI·BJ, CB·EP]
        # 0 outside the problem: a padded pair is 0 * W (NaN where W holds ±inf) and a padded
        # channel 0 * g (NaN where a zero count made g ±inf); either would reach da as 0 * NaN.
        do = tl.where(((i2 < I) & (jl2 < J - j0))[:, None] & ((ck < C) & (ek < E))[None, :], do, 0.0)
        do = tl.reshape(tl.permute(tl.reshape(do.to(W.dtype.element_ty), [BI, BJ, CB, EP]), (0, 2, 1, 3)),
                        [BI * CB, BJ * EP])
        bt = tl.load(b_ptr, mask=(jl < J - j0)[:, None] & be_ok, other=0.0)  # [BJ·EP, BS]
        acc += tl.dot(do, bt, input_precision=PRECISION)
        g_ptr += BJ * sgj
        d_ptr += BJ * sdj
        b_ptr += BJ * sbj
    r1 = tl.arange(0, BI * CB)
    i1 = (pid_i * BI + r1 // CB).to(tl.int64)
    c1 = c0 + r1 % CB
    tl.store(DA + ((bz * S + s[None, :]) * I + i1[:, None]) * C + c1[:, None], acc.to(DA.dtype.element_ty),
             mask=((i1 < I) & (c1 < C))[:, None] & (s < S)[None, :])


@triton.jit
def _opm_bwd_dw_kernel(A, Bm, DOUT, DEN, PDW, PDB,
                       saz, sas, sai, sac, sbz, sbs, sbj, sbe, sgz_b, sgi, sgj, sgz, sdz, sdi, sdj,
                       S: constexpr, I, J, C, E, Z, den_const, NB, TILES_I, TILES_J, TILES_PER: constexpr,
                       HAS_DEN: tl.constexpr, HAS_BIAS: tl.constexpr, BIAS_DIVIDED: tl.constexpr,
                       PRECISION: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr, CB: tl.constexpr,
                       EP: tl.constexpr, BZ: tl.constexpr, BS: tl.constexpr):
    # One program: channels [c0, c0 + CB) of dW over its share of the pair tiles (TILES_PER
    # consecutive tiles of the B·TILES_I·TILES_J), o recomputed per tile; writes one fp32
    # [Z, CB·E] partial (PDW [splits, Z, C, E]) and, in the c0 = 0 programs, one bias-gradient
    # partial (PDB [splits, Z]).
    cc = tl.program_id(0)
    split = tl.program_id(1)
    c0 = cc * CB
    r1 = tl.arange(0, BI * CB)
    c1 = c0 + r1 % CB
    q1 = tl.arange(0, BJ * EP)
    e1 = q1 % EP
    r2 = tl.arange(0, BI * BJ)
    z = tl.arange(0, BZ)
    z_ok = z < Z
    acc = tl.zeros([BZ, CB * EP], tl.float32)
    acc_b = tl.zeros([BZ], tl.float32)
    for t in range(0, TILES_PER):
        tile = split * TILES_PER + t
        live = tile < NB * TILES_I * TILES_J
        tile = tl.where(live, tile, 0)
        bz = (tile // (TILES_I * TILES_J)).to(tl.int64)
        rem = tile % (TILES_I * TILES_J)
        i1 = (rem // TILES_J) * BI + r1 // CB
        j1 = (rem % TILES_J) * BJ + q1 // EP
        o = _outer_chunk(A + bz * saz, Bm + bz * sbz, i1.to(tl.int64) * sai + c1 * sac, live & (i1 < I) & (c1 < C),
                         j1.to(tl.int64) * sbj + e1 * sbe, (j1 < J) & (e1 < E), sas, sbs,
                         S, PRECISION, BI * CB, BJ * EP, BS)
        o2 = _pairs_by_channels(o.to(A.dtype.element_ty), BI, CB, BJ, EP)  # [BI·BJ, CB·EP]
        i2 = ((rem // TILES_J) * BI + r2 // BJ).to(tl.int64)
        j2 = ((rem % TILES_J) * BJ + r2 % BJ).to(tl.int64)
        g, dout = _scaled_grad(DOUT + bz * sgz_b + (i2 * sgi + j2 * sgj)[:, None] + z[None, :] * sgz,
                               DEN + bz * sdz + i2 * sdi + j2 * sdj, live & (i2 < I) & (j2 < J), z_ok,
                               den_const, HAS_DEN)
        acc += tl.dot(tl.trans(g.to(A.dtype.element_ty)), o2, input_precision=PRECISION)
        if HAS_BIAS:
            if BIAS_DIVIDED:
                acc_b += tl.sum(g, 0)
            else:
                acc_b += tl.sum(dout, 0)
    k2 = tl.arange(0, CB * EP)
    ck = c0 + k2 // EP
    ek = k2 % EP
    tl.store(PDW + ((split * Z + z[:, None]) * C + ck[None, :]) * E + ek[None, :], acc,
             mask=z_ok[:, None] & ((ck < C) & (ek < E))[None, :])
    if HAS_BIAS:
        tl.store(PDB + split * Z + z, acc_b, mask=z_ok & (cc == 0))


# --------------------------------------------------------------------------- planning
def _empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every kernel output is allocated here (uninitialised: each kernel writes every element it
    owns), so tests can swap in NaN-filled buffers to catch unwritten elements."""
    return torch.empty(shape, dtype=dtype, device=device)


def _np2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: TF32 only for fp32 when the user allowed it (ignored for fp16 / bf16)."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def _config(kind: str, C: int, E: int, Z: int, S: int) -> dict:
    """Block sizes (powers of two) and launch options for one kernel kind.

    ``tl.dot`` on the GPU needs each dim ≥ 16: BI·CB, BJ·EP, BI·BJ, CB·EP and BS are kept ≥ 16.
    On Hopper (c = 32, c_z = 128) the forward tile is 8 x 8 pairs and 8 channels a chunk: a
    [64, 256] fp32 o chunk and a [64, 128] fp32 output tile (~100 registers a thread at 8 warps).
    Under the interpreter (whose cost is per program and op, not per element) 4-channel chunks and
    16-sequence blocks make small tests cross chunk and block boundaries."""
    CP, EP, BZ = _np2(C), _np2(E), max(16, _np2(Z))
    small = interpreting()
    CB = min(CP, 4 if (small or kind == "dw") else 8)
    while CB * EP < 16:  # the weight chunk's K dim (masked channels past C cost only work)
        CB *= 2
    bi = bj = 8
    BI = max(bi, 16 // CB)
    BJ = max(bj, 16 // EP)
    BS = 16 if small else (32 if kind != "da" else 64)
    BS = min(BS, max(16, _np2(S)))
    warps = 4 if small else 8
    return dict(BI=BI, BJ=BJ, CB=CB, EP=EP, BZ=BZ, BS=BS, num_warps=warps, num_stages=1 if small else 2)


def _splits(device: torch.device, chunks: int, tiles: int) -> int:
    """Programs per c chunk of the dW kernel: ~2 programs a multiprocessor in all (4 under the interpreter)."""
    target = 2 * torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return max(1, min(tiles, _cdiv(target, chunks)))


def _b_slices(B: int, per_b_limit: bool) -> list[tuple[int, int]]:
    """Batch ranges whose grid axis 2 stays within CUDA's limit."""
    return [(b0, min(b0 + _MAX_GRID_YZ, B)) for b0 in range(0, B, _MAX_GRID_YZ)] if per_b_limit else [(0, B)]


# --------------------------------------------------------------------------- launches
def _launch_fwd(a, b, w3, bias, den, den_const, bias_divided, out):
    B, S, I, C = a.shape
    J, E = b.shape[2], b.shape[3]
    Z = w3.shape[0]
    cfg = _config("fwd", C, E, Z, S)
    meta = {k: cfg[k] for k in ("BI", "BJ", "CB", "EP", "BZ", "BS")}
    dsz = den.stride() if den is not None else (0, 0, 0)
    for b0, b1 in _b_slices(B, True):
        grid = (_cdiv(I, cfg["BI"]), _cdiv(J, cfg["BJ"]), b1 - b0)
        if grid[1] > _MAX_GRID_YZ:
            raise ValueError(f"outer_product_mean: {J} residues exceed the CUDA grid limit")
        note_launch("opm_fwd")
        _opm_fwd_kernel[grid](
            a[b0:b1], b[b0:b1], w3, bias if bias is not None else a, den[b0:b1] if den is not None else a,
            out[b0:b1], *a.stride(), *b.stride(), *w3.stride(), *dsz,
            S, I, J, C, E, Z, float(den_const),
            HAS_BIAS=bias is not None, HAS_DEN=den is not None, BIAS_DIVIDED=bool(bias_divided),
            PRECISION=_precision(a.dtype), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **meta)


def _launch_da(dout, den, den_const, w3, b, da, swapped: bool):
    """da (or, ``swapped``, db: the mirrored problem) into the contiguous ``da``."""
    B, S, I, C = da.shape
    J, E = b.shape[2], b.shape[3]
    Z = w3.shape[0]
    cfg = _config("da", C, E, Z, S)
    meta = {k: cfg[k] for k in ("BI", "BJ", "CB", "EP", "BZ", "BS")}
    sg = dout.stride()
    sd = den.stride() if den is not None else (0, 0, 0)
    sw = w3.stride()
    if swapped:  # the mirrored problem: dout[b, j, i], d[b, j, i], W[z, e, c]
        sg = (sg[0], sg[2], sg[1], sg[3])
        sd = (sd[0], sd[2], sd[1])
        sw = (sw[0], sw[2], sw[1])
    n_chunks = _cdiv(_np2(C), cfg["CB"])
    for b0, b1 in _b_slices(B, True):
        grid = (_cdiv(I, cfg["BI"]) * n_chunks, _cdiv(S, cfg["BS"]), b1 - b0)
        if grid[1] > _MAX_GRID_YZ:
            raise ValueError(f"outer_product_mean: {S} sequences exceed the CUDA grid limit")
        note_launch("opm_bwd_da")
        _opm_bwd_da_kernel[grid](
            dout[b0:b1], den[b0:b1] if den is not None else dout, w3, b[b0:b1], da[b0:b1],
            *sg, *sd, *sw, *b.stride(), S, I, J, C, E, Z, float(den_const), n_chunks,
            HAS_DEN=den is not None, PRECISION=_precision(b.dtype), num_warps=cfg["num_warps"],
            num_stages=cfg["num_stages"], **meta)


def _launch_dw(a, b, dout, den, den_const, has_bias, bias_divided, Z):
    B, S, I, C = a.shape
    J, E = b.shape[2], b.shape[3]
    cfg = _config("dw", C, E, Z, S)
    meta = {k: cfg[k] for k in ("BI", "BJ", "CB", "EP", "BZ", "BS")}
    n_chunks = _cdiv(_np2(C), cfg["CB"])
    ti, tj = _cdiv(I, cfg["BI"]), _cdiv(J, cfg["BJ"])
    tiles = B * ti * tj
    splits = _splits(a.device, n_chunks, tiles)
    per = _cdiv(tiles, splits)
    splits = _cdiv(tiles, per)
    pdw = _empty((splits, Z, C, E), torch.float32, a.device)
    pdb = _empty((splits, Z), torch.float32, a.device) if has_bias else pdw
    if splits > _MAX_GRID_YZ:
        raise ValueError(f"outer_product_mean: {splits} dW partials exceed the CUDA grid limit")
    note_launch("opm_bwd_dw")
    _opm_bwd_dw_kernel[(n_chunks, splits)](
        a, b, dout, den if den is not None else dout, pdw, pdb,
        *a.stride(), *b.stride(), *dout.stride(), *(den.stride() if den is not None else (0, 0, 0)),
        S, I, J, C, E, Z, float(den_const), B, ti, tj, per,
        HAS_DEN=den is not None, HAS_BIAS=has_bias, BIAS_DIVIDED=bool(bias_divided),
        PRECISION=_precision(a.dtype), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **meta)
    return pdw.sum(0), (pdb.sum(0) if has_bias else None)


# --------------------------------------------------------------------------- autograd
class OuterProductMeanFunction(torch.autograd.Function):
    """The Triton kernels on canonical tensors: a [B, S, I, C], b [B, S, J, E], w3 [Z, C, E] (any strides),
    bias [Z] or None, den [B, I, J] fp32 or None (then every d is ``den_const``). No gradient for den."""

    @staticmethod
    def forward(ctx, a, b, w3, bias, den, den_const: float, bias_divided: bool):
        B, S, I, _ = a.shape
        J, Z = b.shape[2], w3.shape[0]
        out = _empty((B, I, J, Z), a.dtype, a.device)
        _launch_fwd(a, b, w3, bias, den, den_const, bias_divided, out)
        ctx.save_for_backward(a, b, w3, den)
        ctx.den_const, ctx.bias_divided = den_const, bias_divided
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return out

    @staticmethod
    @once_differentiable  # not itself differentiable: a double backward raises
    def backward(ctx, dout):
        a, b, w3, den = ctx.saved_tensors
        need_a, need_b, need_w, need_bias = ctx.needs_input_grad[:4]
        da = db = dw = dbias = None
        if need_a:
            da = _empty(a.shape, a.dtype, a.device)
            _launch_da(dout, den, ctx.den_const, w3, b, da, swapped=False)
        if need_b:
            db = _empty(b.shape, b.dtype, b.device)
            _launch_da(dout, den, ctx.den_const, w3, a, db, swapped=True)
        if need_w or need_bias:
            pdw, pdb = _launch_dw(a, b, dout, den, ctx.den_const, need_bias, ctx.bias_divided, w3.shape[0])
            dw = pdw.to(w3.dtype) if need_w else None
            dbias = pdb.to(ctx.bias_dtype) if need_bias else None
        return da, db, dw, dbias, None, None, None


# --------------------------------------------------------------------------- public API
def _check(a, b, weight, bias, mask_a, mask_b, eps, bias_divided) -> tuple[int, int, int, int, int, int]:
    """Validate the arguments; returns (S, I, J, C, E, Z)."""
    for name, t in (("a", a), ("b", b), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"outer_product_mean: {name} must be a tensor, got {type(t).__name__}")
    for name, t in (("bias", bias), ("mask_a", mask_a), ("mask_b", mask_b)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"outer_product_mean: {name} must be a tensor or None, got {type(t).__name__}")
    if a.dim() < 3 or b.dim() != a.dim():
        raise ValueError(f"outer_product_mean: a and b must be [..., S, N, c] of one rank, got a {tuple(a.shape)}, "
                         f"b {tuple(b.shape)}")
    if a.shape[:-2] != b.shape[:-2]:
        raise ValueError(f"outer_product_mean: a {tuple(a.shape)} and b {tuple(b.shape)} must share their leading "
                         "dims and their sequence dim (-3)")
    if a.dtype not in _SUPPORTED + (torch.float64,) or b.dtype != a.dtype or weight.dtype != a.dtype:
        raise TypeError(f"outer_product_mean: a, b and weight must share one of float16/bfloat16/float32/float64, "
                        f"got {a.dtype}, {b.dtype}, {weight.dtype}")
    S, I, C = a.shape[-3:]
    J, E = b.shape[-2:]
    if weight.dim() == 2 and weight.shape[1] == C * E:
        Z = weight.shape[0]
    elif weight.dim() == 3 and tuple(weight.shape[1:]) == (C, E):
        Z = weight.shape[0]
    else:
        raise ValueError(f"outer_product_mean: weight must be [Z, {C}·{E}] or [Z, {C}, {E}] for a {tuple(a.shape)} "
                         f"and b {tuple(b.shape)}, got {tuple(weight.shape)}")
    if bias is not None and (tuple(bias.shape) != (Z,) or not bias.is_floating_point()):
        raise ValueError(f"outer_product_mean: bias must be a float [{Z}], got {bias.dtype} {tuple(bias.shape)}")
    if (mask_a is None) != (mask_b is None):
        raise ValueError("outer_product_mean: give both mask_a and mask_b (the count of sequences where both "
                         "residues are present), or neither (the count is then S)")
    for name, m, want in (("mask_a", mask_a, a.shape[:-1]), ("mask_b", mask_b, b.shape[:-1])):
        if m is None:
            continue
        try:
            ok = torch.broadcast_shapes(m.shape, want) == want
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(f"outer_product_mean: {name} of shape {tuple(m.shape)} does not broadcast to "
                             f"{tuple(want)} (the [..., S, N] of its projection)")
        if m.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"outer_product_mean: {name} requires grad; the count of present sequences gets no "
                             "gradient here")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps):
        raise TypeError(f"outer_product_mean: eps must be a finite Python number, got {eps!r}")
    if not isinstance(bias_divided, bool):
        raise TypeError(f"outer_product_mean: bias_divided must be a bool, got {bias_divided!r}")
    devices = {t.device for t in (a, b, weight, bias, mask_a, mask_b) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"outer_product_mean: all inputs must be on one device, got {sorted(map(str, devices))}")
    return S, I, J, C, E, Z


def _count(mask_a: torch.Tensor, mask_b: torch.Tensor, lead_s_i: torch.Size, lead_s_j: torch.Size,
           dtype: torch.dtype) -> torch.Tensor:
    """sum_s mask_a[s, i] mask_b[s, j] in ``dtype``: [..., I, J]."""
    ma = mask_a.to(dtype).expand(lead_s_i)
    mb = mask_b.to(dtype).expand(lead_s_j)
    return torch.einsum("...si,...sj->...ij", ma, mb)


def outer_product_mean_reference(a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor,
                                 bias: torch.Tensor | None = None, *, mask_a: torch.Tensor | None = None,
                                 mask_b: torch.Tensor | None = None, eps: float = 0.0,
                                 bias_divided: bool = True) -> torch.Tensor:
    """Plain-PyTorch :func:`outer_product_mean`: materialises o (in fp32, float64 for float64 inputs) and
    returns a's dtype. Differentiable by autograd in a, b, weight and bias."""
    S, I, J, C, E, Z = _check(a, b, weight, bias, mask_a, mask_b, eps, bias_divided)
    ct = torch.float64 if a.dtype == torch.float64 else torch.float32
    o = torch.einsum("...sic,...sje->...ijce", a.to(ct), b.to(ct))
    p = o.reshape(*o.shape[:-2], C * E) @ weight.to(ct).reshape(Z, C * E).T
    if mask_a is not None:
        den = (eps + _count(mask_a, mask_b, a.shape[:-1], b.shape[:-1], ct))[..., None]
    else:
        den = eps + S
    if bias is None:
        out = p / den
    elif bias_divided:
        out = (p + bias.to(ct)) / den
    else:
        out = p / den + bias.to(ct)
    return out.to(a.dtype)


def outer_product_mean(a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                       *, mask_a: torch.Tensor | None = None, mask_b: torch.Tensor | None = None, eps: float = 0.0,
                       bias_divided: bool = True) -> torch.Tensor:
    """``(flatten(sum_s a_s ⊗ b_s) @ weight^T + bias) / (eps + count)``, the outer product never written.

    Args:
        a: ``[..., S, I, C]`` (AlphaFold: the masked first projection of the layer-normed MSA).
        b: ``[..., S, J, E]``, same leading dims, S and dtype.
        weight: ``[Z, C·E]`` (a Linear's weight over the flattened ``(c, e)``, c major) or ``[Z, C, E]``.
        bias: ``[Z]`` or None.
        mask_a, mask_b: ``[..., S, I]`` and ``[..., S, J]`` (broadcastable; any dtype), both or neither:
            the count is ``sum_s mask_a[s, i] mask_b[s, j]``, or S without masks. No gradient.
        eps: added to the count.
        bias_divided: the bias is inside the division (AlphaFold's ``linear(o) / (eps + count)``), or
            added after it (``linear(o / (eps + count))``).

    Returns ``[..., I, J, Z]`` in a's dtype. Gradients flow to a, b, weight and bias.
    """
    S, I, J, C, E, Z = _check(a, b, weight, bias, mask_a, mask_b, eps, bias_divided)
    tensors = (a, b, weight, bias, mask_a, mask_b)
    if (a.dtype not in _SUPPORTED or not use_triton(*tensors) or min(S, I, J, C, E, Z) == 0):
        return outer_product_mean_reference(a, b, weight, bias, mask_a=mask_a, mask_b=mask_b, eps=eps,
                                            bias_divided=bias_divided)
    lead = a.shape[:-3]
    B = math.prod(lead)
    a4 = a.reshape(B, S, I, C)
    b4 = b.reshape(B, S, J, E)
    w3 = weight.reshape(Z, C, E) if weight.dim() == 2 else weight
    for name, t in (("a", a4), ("b", b4), ("weight", w3)):
        check_offsets32("outer_product_mean", name, t, tuple(range(1, t.dim())) if name != "weight" else (0, 1, 2))
    den, den_const = None, float(eps + S)
    if mask_a is not None:
        den = (eps + _count(mask_a, mask_b, a.shape[:-1], b.shape[:-1], torch.float32)).reshape(B, I, J)
    out = OuterProductMeanFunction.apply(a4, b4, w3, bias, den, den_const, bias_divided)
    return out.reshape(*lead, I, J, Z)
