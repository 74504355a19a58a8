"""Flash-style attention with pair bias, boolean mask and sigmoid gating.

``attention(q, k, v, bias=, mask=, gate=, scale=, key_bias=)`` computes::

    sigmoid(gate) * softmax(scale * q @ k^T + (bias + key_bias), masked) @ v

the attention of every AlphaFold trunk module (MSA row attention with pair bias,
MSA column and global column attention, triangle attention, AF3's pair-biased
single attention), without materialising the ``[..., Q, K]`` logits: the forward
kernel keeps a running max and sum per query row (online softmax), so triangle
attention at ``N_res`` residues needs O(N_res^2) memory, not O(N_res^3).

Shapes: q ``[..., H, Q, D]``; k and v ``[..., H or 1, K, D]`` (one K/V head may be
shared by all query heads, as AF2's global column attention does); bias any float
tensor broadcastable to ``[..., H, Q, K]`` (AlphaFold's pair bias is
``[1, H, Q, K]``, shared by every row of the leading dim); mask a bool tensor
broadcastable to ``[..., H, Q, K]`` (True = attend); gate pre-sigmoid logits shaped
like the output; key_bias an optional second additive term broadcastable to
``[..., H, 1, K]`` (constant along queries: the key-mask bias ``1e9 * (mask - 1)`` of
triangle and MSA row attention, ``[B, 1, 1, K]``), loaded as one K-vector per (row, head)
and added to the bias tile in fp32 in the forward and in every backward kernel that
recomputes P, so a ``[1, H, Q, K]`` pair bias and a ``[B, 1, 1, K]`` key bias are never
summed into a ``[B, H, Q, K]`` tensor. Head dims 8..128, any, including non-powers of two (padded to a
power of two inside the kernel with masked loads).

Numerics: logits, bias, mask and softmax statistics are fp32 whatever the input
dtype; fp32 matrix products use TF32 only where ``torch.get_float32_matmul_precision()``
allows it ("high" / "medium"). An empty query row (its boolean mask has no True, or
every kept logit is -inf, e.g. from a ``mask.log()`` bias) returns 0 and passes 0
gradient; with ``empty_rows="nan"`` it returns torch.softmax's NaN and passes torch's
gradients (``"nan_cleaned"``: 0, as a NaN clean-up of the weights gives, with torch's
gradients), written by the forward and backward kernels themselves (the row is marked by
its log-sum of +inf). A row masked only by additive -1e9 biases averages v
uniformly, exactly as the fp32 reference (and AlphaFold's own code) does: the
backward recomputes probabilities from the row max and the log of the row sum kept
*separately*, because folding them into one logsumexp would round ``log(sum)`` away
against a max of -1e9 (fp32's spacing there is 64). A NaN or +inf logit makes its row
NaN, as torch.softmax does; entries masked out by the boolean mask get exactly 0
gradient even then (as ``masked_fill``'s backward gives). In fp16 the backward keeps
dS = P * (dP - delta) in fp32 for the dq and dk products (a TF32 dot: fp16's mantissa,
fp32's range), so a large |dout| * |v| (loss scaling) cannot overflow it to inf.

Forward kernel: one program per (query block, b, h) streams key blocks. Where the
bias is shared by every row of the leading dim (triangle and MSA row attention) a
program takes two rows b, b+1 (``ROW_PAIRS``), so each bias tile is read once for
both: at triangle attention's inference sizes the bias re-reads, B*H*Q*K elements,
are the largest memory stream.

Backward kernels (all without atomics):
- ``attention_bwd_pre``: delta = rowsum(dO * O); with a gate, also dO_attn and dgate.
- ``attention_bwd_dkdv``: one program per (key block, K/V head) loops over query
  blocks (and over all query heads when the K/V head is shared), so dk and dv are
  summed in registers.
  With a key bias that requires grad, the same program also sums dS over the query
  blocks of each query head (one row-sum of a tile it already holds) and stores the
  key-bias gradient of (b, h, key block) once: ``[B, H, K]`` fp32 (O(N^2) for triangle
  attention), then summed by torch over the dims the key bias broadcasts over. A key
  bias without grad costs one K-vector load per tile and nothing else.
- ``attention_bwd_dq``: one program per (query block, head) loops over key blocks.
  When the bias is not broadcast at all its gradient is dS itself and this kernel
  writes it (each element once).
- ``attention_bwd_dbias``: for a bias broadcast over rows / heads / queries / keys.
  One program per bias tile (bias head, query block, key block) loops over the
  B rows (and heads, and query or key blocks) that share that tile, recomputing P
  from the saved row statistics and accumulating dS in registers, then stores the
  tile once. The alternatives were rejected: atomic adds from the dq or dk/dv
  kernels would put B (= N_res for triangle attention) atomic adds on every bias
  element, and per-row partial sums would need the O(N^3) memory this kernel exists
  to avoid. The price is recomputing two tile products (q k^T and dO v^T) per row,
  ~2/7 more backward FLOPs, with no extra memory beyond the fp32 bias gradient.

Measured on an H100 (bf16, triangle attention N_res=1024, 4 heads x 32, bf16 bias,
key mask; bench/results/kernels_attention_NVIDIA_H100_80GB_HBM3_2026-11-27.md): forward 4.48 ms,
forward+backward 17.93 ms,
64 MiB extra memory. At the training crop the calls are host-bound (``fwd_host_ms`` in that
table: ~0.3 ms of Python and launch overhead per forward).

Cost of odd layouts: q, k, v and gate are viewed as ``[B, H, L, D]`` (leading dims
flattened); where a strided input's leading dims cannot be flattened as a view,
``reshape`` copies it. Inner strides are passed to the kernels as they are. A bias
whose leading dims are neither all 1 nor all full (e.g. ``[1, S2, H, Q, K]`` against
leading dims ``(S1, S2)``) is expanded to the full leading shape (a copy of
``B * H * Q * K`` elements) and its gradient summed back by autograd.

Example (MSA row attention: 3 rows, 2 heads, 13 residues, head dim 8)::

    >>> q, k, v, gate = (torch.randn(3, 2, 13, 8) for _ in range(4))
    >>> pair_bias = torch.randn(1, 2, 13, 13)             # shared by every row
    >>> key_mask = torch.rand(3, 1, 1, 13) > 0.2           # True = attend
    >>> o = attention(q, k, v, bias=pair_bias, mask=key_mask, gate=gate)
    >>> o.shape
    torch.Size([3, 2, 13, 8])
    >>> ref = attention_reference(q, k, v, bias=pair_bias, mask=key_mask, gate=gate)
    >>> torch.allclose(o, ref, atol=1e-5)
    True
    >>> mask_bias = 1e9 * (key_mask.float() - 1)            # [3, 1, 1, 13]: AlphaFold's key-mask bias
    >>> o2 = attention(q, k, v, bias=pair_bias, key_bias=mask_bias, gate=gate)   # never sums to [3, 2, 13, 13]
    >>> torch.allclose(o2, attention_reference(q, k, v, bias=pair_bias + mask_bias, gate=gate), atol=1e-5)
    True
"""
import math

import torch
import triton
import triton.language as tl

from foldcompile.kernels._dispatch import check_offsets32, interpreting, note_launch, once_differentiable, use_triton

__all__ = ["attention", "attention_reference"]

_SUPPORTED = (torch.float16, torch.bfloat16, torch.float32)
_MIN_D, _MAX_D = 8, 128
_LOG2E = 1.4426950408889634

# Loop bounds (sequence lengths, rows, heads) are annotated ``constexpr``, this
# module-level name, not ``tl.constexpr``. On the GPU it is None, so they are run-time
# ints and one compiled kernel serves every length. Triton 3.6's interpreter cannot
# loop to a run-time bound (with numpy 2 it fails turning its 1-element scalar into an
# index); it re-reads each kernel's source with postponed annotations and takes the
# literal annotation "constexpr" for a compile-time constant, so under the interpreter
# these bounds are constants. This only works because this module does not use
# ``from __future__ import annotations`` (the GPU compiler must see the value None).
constexpr = tl.constexpr if interpreting() else None


# --------------------------------------------------------------------------- configs
def _configs(kind: str) -> list[triton.Config]:
    """Autotune lists, chosen at import time (the interpreter takes exactly one config)."""
    if interpreting():
        # Small blocks keep the interpreter fast and make 37/61-long tests hit the tails.
        return [triton.Config({"BLOCK_Q": 32, "BLOCK_K": 32}, num_warps=4, num_stages=1)]
    # A short list per kernel: every config is compiled per dtype / head-dim / flag
    # combination, and the autotuner re-benchmarks them for every new length.
    if kind == "fwd":
        shapes = [(64, 64, 4, 3), (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2)]
    elif kind == "pre":
        shapes = [(64, 16, 4, 1)]
    elif kind == "dkdv":
        shapes = [(64, 64, 4, 3), (32, 64, 4, 3), (64, 128, 8, 3)]
    elif kind == "dq":
        shapes = [(64, 64, 4, 3), (128, 64, 8, 3), (64, 32, 4, 3)]
    else:  # dbias
        shapes = [(64, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2)]
    return [triton.Config({"BLOCK_Q": bq, "BLOCK_K": bk}, num_warps=w, num_stages=s) for bq, bk, w, s in shapes]


# --------------------------------------------------------------------------- kernels
@triton.jit
def _load_mask(base, offs_r, offs_c, s_r, s_c, ok_r, ok_c, ROWS_ONLY: tl.constexpr, COLS_ONLY: tl.constexpr):
    """A [rows, cols] tile of the boolean mask (True = attend). A key mask ([..., 1, K],
    the usual AlphaFold one) is constant along the query axis: load one vector and
    broadcast it instead of a full tile of repeated bytes."""
    if COLS_ONLY:
        m = tl.load(base + offs_c * s_c, mask=ok_c, other=0)[None, :] != 0
    elif ROWS_ONLY:
        m = tl.load(base + offs_r * s_r, mask=ok_r, other=0)[:, None] != 0
    else:
        m = tl.load(base + offs_r[:, None] * s_r + offs_c[None, :] * s_c, mask=ok_r[:, None] & ok_c[None, :],
                    other=0) != 0
    return m & ok_r[:, None] & ok_c[None, :]


@triton.jit
def _load_kb(base, offs_k, s_n, k_ok):
    """The key bias of one (row, head) over a block of keys, in fp32 (0 past the last key)."""
    return tl.load(base + offs_k * s_n, mask=k_ok, other=0.0).to(tl.float32)


@triton.jit
def _fwd_step(q, k_base, v_base, mask_base, bias, offs_q, offs_k, offs_d, q_ok, k_ok, d_ok,
              skn, skd, svn, svd, smm, smn, scale, m_i, l_i, acc,
              HAS_MASK: tl.constexpr, MASK_KEYS: tl.constexpr, PRECISION: tl.constexpr):
    """One key block of the online softmax for one query block of one (b, h)."""
    kt = tl.load(k_base + offs_k[None, :] * skn + offs_d[:, None] * skd, mask=d_ok[:, None] & k_ok[None, :],
                 other=0.0)
    s = tl.dot(q, kt, input_precision=PRECISION) * scale + bias
    if HAS_MASK:
        keep = _load_mask(mask_base, offs_q, offs_k, smm, smn, q_ok, k_ok, False, MASK_KEYS)
    else:
        keep = q_ok[:, None] & k_ok[None, :]
    # Scale to base 2 only after the fp32 sum, so equal logits (e.g. all -1e9) stay equal.
    s = tl.where(keep, s * 1.4426950408889634, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row with nothing kept so far has max -inf: shift by 0 so exp2 gives 0, not NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_base + offs_k[:, None] * svn + offs_d[None, :] * svd, mask=k_ok[:, None] & d_ok[None, :],
                other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def _fwd_finish(acc, m_i, l_i, b, h, H, GATE, OUT, OATT, ROWMAX, LOGSUM, sgb, sgh, sgm, sgd,
                offs_q, offs_d, q_ok, d_ok, QLEN, D, HAS_GATE: tl.constexpr, EMPTY_NAN: tl.constexpr):
    """Normalise, gate and store one query block; store its row statistics."""
    # Empty row (nothing kept, or only -inf logits): output 0 (EMPTY_NAN: torch.softmax's NaN),
    # and a log-sum of +inf, which marks the row for the backward kernels (see _empty_row_ds).
    empty = l_i == 0.0
    o = acc / tl.where(empty, 1.0, l_i)[:, None]
    if EMPTY_NAN:
        o = tl.where(empty[:, None], float("nan"), o)
    bh = b * H + h
    row = bh * QLEN + offs_q
    tl.store(ROWMAX + row, tl.where(empty, 0.0, m_i), mask=q_ok)
    tl.store(LOGSUM + row, tl.where(empty, float("inf"), tl.log2(tl.where(empty, 1.0, l_i))), mask=q_ok)
    # Outputs are contiguous [B, H, Q, D].
    o_off = bh * QLEN * D + offs_q[:, None] * D + offs_d[None, :]
    io_ok = q_ok[:, None] & d_ok[None, :]
    if HAS_GATE:
        g = tl.load(GATE + b * sgb + h * sgh + offs_q[:, None] * sgm + offs_d[None, :] * sgd,
                    mask=io_ok, other=0.0).to(tl.float32)
        tl.store(OATT + o_off, o.to(OATT.dtype.element_ty), mask=io_ok)
        o = o * tl.sigmoid(g)
    tl.store(OUT + o_off, o.to(OUT.dtype.element_ty), mask=io_ok)


@triton.autotune(configs=_configs("fwd"),
                 key=["QLEN", "KLEN", "BLOCK_D", "HAS_BIAS", "HAS_KB", "HAS_MASK", "MASK_KEYS", "HAS_GATE",
                      "ROW_PAIRS", "EMPTY_NAN"])
@triton.jit
def _attn_fwd_kernel(
    Q, K, V, BIAS, KB, MASK, GATE, OUT, OATT, ROWMAX, LOGSUM,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sbb, sbh, sbm, sbn,
    szb, szh, szn,
    smb, smh, smm, smn,
    sgb, sgh, sgm, sgd,
    H, QLEN: constexpr, KLEN: constexpr, D, scale,
    HAS_BIAS: tl.constexpr, HAS_KB: tl.constexpr, HAS_MASK: tl.constexpr, MASK_KEYS: tl.constexpr,
    HAS_GATE: tl.constexpr, ROW_PAIRS: tl.constexpr, EMPTY_NAN: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # One program: BLOCK_Q query rows of one (b, h) -- or, with ROW_PAIRS, of two
    # rows b, b+1 that share the bias (triangle / MSA row attention), so each bias
    # tile is read once for both, halving the dominant bias traffic. Reads q once,
    # streams k, v, bias and mask over the key axis; writes BLOCK_Q x D outputs and
    # two fp32 statistics per row. Logits live only in registers.
    pid_q = tl.program_id(0)
    pid_bh = tl.program_id(1)
    h = (pid_bh % H).to(tl.int64)
    if ROW_PAIRS:
        b = (pid_bh // H).to(tl.int64) * 2
    else:
        b = (pid_bh // H).to(tl.int64)
    b1 = b + 1
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_d = tl.arange(0, BLOCK_D)
    q_ok = offs_q < QLEN
    d_ok = offs_d < D
    qd_ok = q_ok[:, None] & d_ok[None, :]
    q_off = h * sqh + offs_q[:, None] * sqm + offs_d[None, :] * sqd
    q = tl.load(Q + b * sqb + q_off, mask=qd_ok, other=0.0)
    m_i = tl.full([BLOCK_Q], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_Q], tl.float32)
    acc = tl.zeros([BLOCK_Q, BLOCK_D], tl.float32)
    if ROW_PAIRS:
        q1 = tl.load(Q + b1 * sqb + q_off, mask=qd_ok, other=0.0)
    else:
        q1 = q
    m_1 = tl.full([BLOCK_Q], float("-inf"), tl.float32)
    l_1 = tl.zeros([BLOCK_Q], tl.float32)
    acc1 = tl.zeros([BLOCK_Q, BLOCK_D], tl.float32)
    bias_base = BIAS + b * sbb + h * sbh  # ROW_PAIRS only when sbb == 0
    for start in range(0, KLEN, BLOCK_K):
        offs_k = start + tl.arange(0, BLOCK_K)
        k_ok = offs_k < KLEN
        bias = 0.0
        if HAS_BIAS:
            bias = tl.load(bias_base + offs_q[:, None] * sbm + offs_k[None, :] * sbn,
                           mask=q_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        bias0 = bias
        bias1 = bias
        if HAS_KB:  # the key bias: one vector per (row, head), added to the bias tile in fp32
            bias0 = bias + _load_kb(KB + b * szb + h * szh, offs_k, szn, k_ok)[None, :]
            if ROW_PAIRS:
                bias1 = bias + _load_kb(KB + b1 * szb + h * szh, offs_k, szn, k_ok)[None, :]
        m_i, l_i, acc = _fwd_step(q, K + b * skb + h * skh, V + b * svb + h * svh, MASK + b * smb + h * smh, bias0,
                                  offs_q, offs_k, offs_d, q_ok, k_ok, d_ok, skn, skd, svn, svd, smm, smn, scale,
                                  m_i, l_i, acc, HAS_MASK, MASK_KEYS, PRECISION)
        if ROW_PAIRS:
            m_1, l_1, acc1 = _fwd_step(q1, K + b1 * skb + h * skh, V + b1 * svb + h * svh,
                                       MASK + b1 * smb + h * smh, bias1, offs_q, offs_k, offs_d, q_ok, k_ok, d_ok,
                                       skn, skd, svn, svd, smm, smn, scale, m_1, l_1, acc1,
                                       HAS_MASK, MASK_KEYS, PRECISION)
    _fwd_finish(acc, m_i, l_i, b, h, H, GATE, OUT, OATT, ROWMAX, LOGSUM, sgb, sgh, sgm, sgd,
                offs_q, offs_d, q_ok, d_ok, QLEN, D, HAS_GATE, EMPTY_NAN)
    if ROW_PAIRS:
        _fwd_finish(acc1, m_1, l_1, b1, h, H, GATE, OUT, OATT, ROWMAX, LOGSUM, sgb, sgh, sgm, sgd,
                    offs_q, offs_d, q_ok, d_ok, QLEN, D, HAS_GATE, EMPTY_NAN)


@triton.autotune(configs=_configs("pre"), key=["QLEN", "BLOCK_D", "HAS_GATE"])
@triton.jit
def _attn_bwd_pre_kernel(
    DOUT, OATT, GATE, DOATT, DGATE, DELTA,
    sgb, sgh, sgm, sgd,
    H, QLEN: constexpr, D,
    HAS_GATE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # delta = rowsum(dO_attn * O_attn), read once; with a gate, also
    # dO_attn = dout * sigmoid(g) and dgate = dout * O_attn * sigmoid'(g).
    pid_q = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_d = tl.arange(0, BLOCK_D)
    q_ok = offs_q < QLEN
    io_ok = q_ok[:, None] & (offs_d < D)[None, :]
    off = pid_bh.to(tl.int64) * QLEN * D + offs_q[:, None] * D + offs_d[None, :]
    do = tl.load(DOUT + off, mask=io_ok, other=0.0).to(tl.float32)
    o = tl.load(OATT + off, mask=io_ok, other=0.0).to(tl.float32)
    if HAS_GATE:
        g = tl.load(GATE + b * sgb + h * sgh + offs_q[:, None] * sgm + offs_d[None, :] * sgd,
                    mask=io_ok, other=0.0).to(tl.float32)
        sig = tl.sigmoid(g)
        tl.store(DGATE + off, (do * o * sig * (1.0 - sig)).to(DGATE.dtype.element_ty), mask=io_ok)
        do = do * sig
        tl.store(DOATT + off, do.to(DOATT.dtype.element_ty), mask=io_ok)
    tl.store(DELTA + pid_bh.to(tl.int64) * QLEN + offs_q, tl.sum(do * o, 1), mask=q_ok)


@triton.jit
def _probs(s_dot, bias, keep, rowmax, logsum, scale, EMPTY_NAN: tl.constexpr):
    """P from raw q.k products, recomputed exactly as the forward did (base 2). In an empty row
    (log-sum +inf) P is 0, or with EMPTY_NAN torch.softmax's NaN at every key (masked ones too:
    the softmax of an all -inf row is NaN everywhere, so eager's dv = Pᵀ dO is NaN at every key)."""
    s = tl.where(keep, (s_dot * scale + bias) * 1.4426950408889634, float("-inf"))
    p = tl.exp2((s - rowmax) - logsum)
    if EMPTY_NAN:
        p = tl.where(logsum == float("inf"), float("nan"), p)
    return p


@triton.jit
def _empty_row_ds(ds, keep, logsum, EMPTY_DS_NAN: tl.constexpr):
    """dS with its empty rows (log-sum +inf) and masked-out entries settled. Masked-out entries get
    exactly 0, as masked_fill's gradient gives (in a NaN row P is NaN there too). An empty row gets 0
    (no gradient, even from a NaN in v or dout), or with EMPTY_DS_NAN torch's NaN at its kept entries:
    there every kept logit is -inf, torch.softmax's output is NaN, and so is its backward
    y·(dy − Σ y·dy), whatever dy is (a NaN clean-up of the weights zeroes dy, not y)."""
    if EMPTY_DS_NAN:
        ds = tl.where(logsum == float("inf"), float("nan"), ds)
    else:
        ds = tl.where(logsum == float("inf"), 0.0, ds)
    return tl.where(keep, ds, 0.0)


@triton.autotune(configs=_configs("dkdv"),
                 key=["QLEN", "KLEN", "BLOCK_D", "HAS_BIAS", "HAS_KB", "HAS_MASK", "MASK_KEYS", "HQ_PER_KV",
                      "STORE_DKB", "EMPTY_NAN", "EMPTY_DS_NAN"])
@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, BIAS, KB, MASK, DO, ROWMAX, LOGSUM, DELTA, DK, DV, DKB,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sbb, sbh, sbm, sbn,
    szb, szh, szn,
    smb, smh, smm, smn,
    H, HKV, HQ_PER_KV: constexpr, QLEN: constexpr, KLEN: constexpr, D, scale,
    HAS_BIAS: tl.constexpr, HAS_KB: tl.constexpr, HAS_MASK: tl.constexpr, MASK_KEYS: tl.constexpr,
    STORE_DKB: tl.constexpr, DS_FP32: tl.constexpr, EMPTY_NAN: tl.constexpr, EMPTY_DS_NAN: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # One program: BLOCK_K keys of one (b, K/V head). Loops over every query block of
    # every query head reading this K/V head, so dk and dv are complete sums in registers.
    # Works transposed ([keys, queries] tiles) so no result needs a transpose.
    # With STORE_DKB it also sums dS over the queries of each query head: the key-bias
    # gradient of (b, h) over this key block, [B, H, K] fp32, stored once per head.
    pid_k = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // HKV).to(tl.int64)
    hk = (pid_bh % HKV).to(tl.int64)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, BLOCK_D)
    k_ok = offs_k < KLEN
    d_ok = offs_d < D
    kd_ok = k_ok[:, None] & d_ok[None, :]
    k = tl.load(K + b * skb + hk * skh + offs_k[:, None] * skn + offs_d[None, :] * skd, mask=kd_ok, other=0.0)
    v = tl.load(V + b * svb + hk * svh + offs_k[:, None] * svn + offs_d[None, :] * svd, mask=kd_ok, other=0.0)
    dk = tl.zeros([BLOCK_K, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_K, BLOCK_D], tl.float32)
    for hh in range(0, HQ_PER_KV):
        h = hk * HQ_PER_KV + hh
        q_base = Q + b * sqb + h * sqh
        do_base = DO + (b * H + h) * QLEN * D  # dO is contiguous [B, H, Q, D]
        row_base = (b * H + h) * QLEN
        kb = 0.0
        if HAS_KB:
            kb = _load_kb(KB + b * szb + h * szh, offs_k, szn, k_ok)[:, None]
        dkb = tl.zeros([BLOCK_K], tl.float32)
        for start in range(0, QLEN, BLOCK_Q):
            offs_q = start + tl.arange(0, BLOCK_Q)
            q_ok = offs_q < QLEN
            qd_ok = d_ok[:, None] & q_ok[None, :]
            qt = tl.load(q_base + offs_q[None, :] * sqm + offs_d[:, None] * sqd, mask=qd_ok, other=0.0)
            do = tl.load(do_base + offs_q[:, None] * D + offs_d[None, :], mask=tl.trans(qd_ok), other=0.0)
            rmax = tl.load(ROWMAX + row_base + offs_q, mask=q_ok, other=0.0)
            lsum = tl.load(LOGSUM + row_base + offs_q, mask=q_ok, other=0.0)
            delta = tl.load(DELTA + row_base + offs_q, mask=q_ok, other=0.0)
            keep = k_ok[:, None] & q_ok[None, :]
            bias = 0.0
            if HAS_BIAS:
                bias = tl.load(BIAS + b * sbb + h * sbh + offs_k[:, None] * sbn + offs_q[None, :] * sbm,
                               mask=keep, other=0.0).to(tl.float32)
            if HAS_KB:
                bias = bias + kb
            if HAS_MASK:
                keep = _load_mask(MASK + b * smb + h * smh, offs_k, offs_q, smn, smm, k_ok, q_ok, MASK_KEYS, False)
            pt = _probs(tl.dot(k, qt, input_precision=PRECISION), bias, keep, rmax[None, :], lsum[None, :], scale,
                        EMPTY_NAN)
            dv += tl.dot(pt.to(do.dtype), do, input_precision=PRECISION)
            dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)
            dst = _empty_row_ds(pt * (dpt - delta[None, :]), keep, lsum[None, :], EMPTY_DS_NAN)
            if STORE_DKB:
                dkb += tl.sum(dst, 1)
            if DS_FP32:  # see _ds_fp32
                dk += tl.dot(dst, tl.trans(qt).to(tl.float32), input_precision="tf32")
            else:
                dk += tl.dot(dst.to(qt.dtype), tl.trans(qt), input_precision=PRECISION)
        if STORE_DKB:  # DKB is contiguous fp32 [B, H, K]
            tl.store(DKB + (b * H + h) * KLEN + offs_k, dkb, mask=k_ok)
    out_off = pid_bh.to(tl.int64) * KLEN * D + offs_k[:, None] * D + offs_d[None, :]
    tl.store(DK + out_off, (dk * scale).to(DK.dtype.element_ty), mask=kd_ok)
    tl.store(DV + out_off, dv.to(DV.dtype.element_ty), mask=kd_ok)


@triton.autotune(configs=_configs("dq"),
                 key=["QLEN", "KLEN", "BLOCK_D", "HAS_BIAS", "HAS_KB", "HAS_MASK", "MASK_KEYS", "STORE_DS",
                      "EMPTY_NAN", "EMPTY_DS_NAN"])
@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, BIAS, KB, MASK, DO, ROWMAX, LOGSUM, DELTA, DQ, DBIAS,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sbb, sbh, sbm, sbn,
    szb, szh, szn,
    smb, smh, smm, smn,
    H, QLEN: constexpr, KLEN: constexpr, D, scale,
    HAS_BIAS: tl.constexpr, HAS_KB: tl.constexpr, HAS_MASK: tl.constexpr, MASK_KEYS: tl.constexpr,
    STORE_DS: tl.constexpr, EMPTY_NAN: tl.constexpr, EMPTY_DS_NAN: tl.constexpr,
    DS_FP32: tl.constexpr, PRECISION: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # One program: BLOCK_Q query rows of one (b, h); loops over key blocks summing dq.
    # With STORE_DS (bias not broadcast anywhere) dS is the bias gradient: written once.
    pid_q = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_d = tl.arange(0, BLOCK_D)
    q_ok = offs_q < QLEN
    d_ok = offs_d < D
    qd_ok = q_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * sqb + h * sqh + offs_q[:, None] * sqm + offs_d[None, :] * sqd, mask=qd_ok, other=0.0)
    row = pid_bh.to(tl.int64) * QLEN + offs_q
    do = tl.load(DO + pid_bh.to(tl.int64) * QLEN * D + offs_q[:, None] * D + offs_d[None, :], mask=qd_ok, other=0.0)
    rmax = tl.load(ROWMAX + row, mask=q_ok, other=0.0)
    lsum = tl.load(LOGSUM + row, mask=q_ok, other=0.0)
    delta = tl.load(DELTA + row, mask=q_ok, other=0.0)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    dq = tl.zeros([BLOCK_Q, BLOCK_D], tl.float32)
    for start in range(0, KLEN, BLOCK_K):
        offs_k = start + tl.arange(0, BLOCK_K)
        k_ok = offs_k < KLEN
        dk_ok = d_ok[:, None] & k_ok[None, :]
        kt = tl.load(k_base + offs_k[None, :] * skn + offs_d[:, None] * skd, mask=dk_ok, other=0.0)
        vt = tl.load(v_base + offs_k[None, :] * svn + offs_d[:, None] * svd, mask=dk_ok, other=0.0)
        keep = q_ok[:, None] & k_ok[None, :]
        bias = 0.0
        if HAS_BIAS:
            bias = tl.load(BIAS + b * sbb + h * sbh + offs_q[:, None] * sbm + offs_k[None, :] * sbn,
                           mask=keep, other=0.0).to(tl.float32)
        if HAS_KB:
            bias = bias + _load_kb(KB + b * szb + h * szh, offs_k, szn, k_ok)[None, :]
        tile_ok = keep
        if HAS_MASK:
            keep = _load_mask(MASK + b * smb + h * smh, offs_q, offs_k, smm, smn, q_ok, k_ok, False, MASK_KEYS)
        p = _probs(tl.dot(q, kt, input_precision=PRECISION), bias, keep, rmax[:, None], lsum[:, None], scale,
                   EMPTY_NAN)
        dp = tl.dot(do, vt, input_precision=PRECISION)
        ds = _empty_row_ds(p * (dp - delta[:, None]), keep, lsum[:, None], EMPTY_DS_NAN)
        if STORE_DS:
            tl.store(DBIAS + pid_bh.to(tl.int64) * QLEN * KLEN + offs_q[:, None] * KLEN + offs_k[None, :], ds,
                     mask=tile_ok)
        if DS_FP32:  # see _ds_fp32
            dq += tl.dot(ds, tl.trans(kt).to(tl.float32), input_precision="tf32")
        else:
            dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=PRECISION)
    tl.store(DQ + pid_bh.to(tl.int64) * QLEN * D + offs_q[:, None] * D + offs_d[None, :],
             (dq * scale).to(DQ.dtype.element_ty), mask=qd_ok)


@triton.autotune(configs=_configs("dbias"),
                 key=["QLEN", "KLEN", "BLOCK_D", "HAS_KB", "HAS_MASK", "MASK_KEYS", "ROWS", "HEADS", "Q_BCAST",
                      "K_BCAST", "EMPTY_NAN", "EMPTY_DS_NAN"])
@triton.jit
def _attn_bwd_dbias_kernel(
    Q, K, V, BIAS, KB, MASK, DO, ROWMAX, LOGSUM, DELTA, DBIAS,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sbb, sbh, sbm, sbn,
    szb, szh, szn,
    smb, smh, smm, smn,
    H, HB, ROWS: constexpr, HEADS: constexpr, QLEN: constexpr, KLEN: constexpr, D, scale,
    HAS_KB: tl.constexpr, HAS_MASK: tl.constexpr, MASK_KEYS: tl.constexpr, Q_BCAST: tl.constexpr, K_BCAST: tl.constexpr,
    EMPTY_NAN: tl.constexpr, EMPTY_DS_NAN: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # One program owns one tile of the (broadcast) bias gradient and sums dS over
    # every (row, head, query block, key block) that shares it: ROWS rows
    # (B when the bias is shared by all rows, else 1), HEADS heads (H when shared,
    # else 1), all query / key blocks when the bias broadcasts over queries / keys.
    # Per row it reads a q, dO, k and v tile and recomputes P and dP; the bias tile
    # is read once (it is constant over everything looped). No atomics, no O(N^3).
    pid_q = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_bh = tl.program_id(2)
    bb = (pid_bh // HB).to(tl.int64)
    hb = (pid_bh % HB).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    offs_q0 = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_k0 = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    # Broadcast dims have stride 0, so this tile is valid for every block looped below.
    bias = tl.load(BIAS + bb * sbb + hb * sbh + offs_q0[:, None] * sbm + offs_k0[None, :] * sbn,
                   mask=(offs_q0 < QLEN)[:, None] & (offs_k0 < KLEN)[None, :], other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_Q, BLOCK_K], tl.float32)
    for r in range(0, ROWS):
        b = bb + r
        for hh in range(0, HEADS):
            h = hb + hh
            row_base = (b * H + h) * QLEN
            for qi in range(0, (QLEN + BLOCK_Q - 1) // BLOCK_Q if Q_BCAST else 1):
                offs_q = offs_q0 + qi * BLOCK_Q
                q_ok = offs_q < QLEN
                qd_ok = q_ok[:, None] & d_ok[None, :]
                q = tl.load(Q + b * sqb + h * sqh + offs_q[:, None] * sqm + offs_d[None, :] * sqd,
                            mask=qd_ok, other=0.0)
                do = tl.load(DO + row_base * D + offs_q[:, None] * D + offs_d[None, :], mask=qd_ok, other=0.0)
                rmax = tl.load(ROWMAX + row_base + offs_q, mask=q_ok, other=0.0)
                lsum = tl.load(LOGSUM + row_base + offs_q, mask=q_ok, other=0.0)
                delta = tl.load(DELTA + row_base + offs_q, mask=q_ok, other=0.0)
                for ki in range(0, (KLEN + BLOCK_K - 1) // BLOCK_K if K_BCAST else 1):
                    offs_k = offs_k0 + ki * BLOCK_K
                    k_ok = offs_k < KLEN
                    dk_ok = d_ok[:, None] & k_ok[None, :]
                    kt = tl.load(K + b * skb + h * skh + offs_k[None, :] * skn + offs_d[:, None] * skd,
                                 mask=dk_ok, other=0.0)
                    vt = tl.load(V + b * svb + h * svh + offs_k[None, :] * svn + offs_d[:, None] * svd,
                                 mask=dk_ok, other=0.0)
                    keep = q_ok[:, None] & k_ok[None, :]
                    if HAS_MASK:
                        keep = _load_mask(MASK + b * smb + h * smh, offs_q, offs_k, smm, smn, q_ok, k_ok, False,
                                          MASK_KEYS)
                    tile_bias = bias
                    if HAS_KB:
                        tile_bias = bias + _load_kb(KB + b * szb + h * szh, offs_k, szn, k_ok)[None, :]
                    p = _probs(tl.dot(q, kt, input_precision=PRECISION), tile_bias, keep, rmax[:, None],
                               lsum[:, None], scale, EMPTY_NAN)
                    dp = tl.dot(do, vt, input_precision=PRECISION)
                    acc += _empty_row_ds(p * (dp - delta[:, None]), keep, lsum[:, None], EMPTY_DS_NAN)
    # DBIAS is contiguous fp32 [Bb, Hb, Qb, Kb].
    if Q_BCAST:
        if K_BCAST:
            tl.store(DBIAS + pid_bh.to(tl.int64), tl.sum(tl.sum(acc, 1), 0))
        else:
            tl.store(DBIAS + pid_bh.to(tl.int64) * KLEN + offs_k0, tl.sum(acc, 0), mask=offs_k0 < KLEN)
    else:
        if K_BCAST:
            tl.store(DBIAS + pid_bh.to(tl.int64) * QLEN + offs_q0, tl.sum(acc, 1), mask=offs_q0 < QLEN)
        else:
            tl.store(DBIAS + pid_bh.to(tl.int64) * QLEN * KLEN + offs_q0[:, None] * KLEN + offs_k0[None, :], acc,
                     mask=(offs_q0 < QLEN)[:, None] & (offs_k0 < KLEN)[None, :])


# --------------------------------------------------------------------------- helpers
# What an empty row (every kept logit -inf, or nothing kept) gives, as the kernels' flags:
# EMPTY_NAN, the forward value NaN and P NaN in backward; EMPTY_DS_NAN, dS NaN at its kept entries.
_EMPTY_FLAGS = {
    "zero": dict(EMPTY_NAN=False, EMPTY_DS_NAN=False),  # 0, no gradient
    "nan": dict(EMPTY_NAN=True, EMPTY_DS_NAN=True),  # torch.softmax's NaN, and its gradients
    "nan_cleaned": dict(EMPTY_NAN=False, EMPTY_DS_NAN=True),  # nan_to_num(softmax): 0, torch's gradients
}


def _check_empty_rows(empty_rows: str) -> None:
    if empty_rows not in _EMPTY_FLAGS:
        raise ValueError(f"attention: empty_rows must be one of {tuple(_EMPTY_FLAGS)}, got {empty_rows!r}")


def _empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every kernel output is allocated here (uninitialised: each kernel writes every
    element), so tests can swap in NaN-filled buffers to catch unwritten elements."""
    return torch.empty(shape, dtype=dtype, device=device)


def _precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: TF32 only for fp32 when the user allowed it."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee" if dtype == torch.float32 else "tf32"  # ignored for fp16 / bf16 operands


# fp16 backward: dS = P * (dP - delta) is kept in fp32 for the dq and dk products instead of
# being rounded to fp16 first. |dS| grows with |dout| * |v| (loss scaling multiplies dout by up
# to 2**16), and past 65504 the fp16 rounding gives inf and then NaN gradients where the fp32
# reference is finite. The product runs as a TF32 dot (k / q upcast exactly): the same 10-bit
# mantissa as fp16, fp32's exponent range. bf16 already has fp32's range and keeps its bf16
# dot. Module level so the benchmark can time the old fp16 path against it
# (bench/kernels/attention.py, impl "foldcompile_ds_fp16").
_FP16_DS_IN_FP32 = True


def _ds_fp32(dtype: torch.dtype) -> bool:
    return dtype == torch.float16 and _FP16_DS_IN_FP32


def _keys_only(mask: torch.Tensor | None) -> bool:
    """Whether a (4-d) mask is a key mask, constant along the query axis."""
    return mask is not None and (mask.shape[2] == 1 or mask.stride(2) == 0)


def _strides(t: torch.Tensor) -> tuple[int, int, int, int]:
    """Strides of a 4-d tensor with 0 on size-1 (broadcast) dims."""
    return tuple(0 if n == 1 else s for n, s in zip(t.shape, t.stride()))


def _kb_strides(kb: torch.Tensor | None) -> tuple[int, int, int]:
    """(row, head, key) strides of a 4-d key bias [1|B, 1|H, 1, 1|K], 0 on broadcast dims."""
    if kb is None:
        return (0, 0, 0)
    sb, sh, _, sn = _strides(kb)
    return (sb, sh, sn)


def _bcast_4d(t: torch.Tensor, lead: torch.Size, name: str) -> torch.Tensor:
    """View ``t`` (already checked to broadcast to ``lead + (H, Q, K)``) as
    ``[1 or B, Hb, Qb, Kb]``: leading dims all 1 or all full keep a view; a mix is
    expanded to the full leading shape (a copy; autograd sums its gradient back)."""
    t = t.reshape((1,) * (len(lead) + 3 - t.dim()) + tuple(t.shape))
    t_lead, tail = tuple(t.shape[: len(lead)]), tuple(t.shape[len(lead):])
    if all(n == 1 for n in t_lead):
        return t.reshape((1,) + tail)
    if t_lead != tuple(lead):
        t = t.expand(tuple(lead) + tail)
    return t.reshape((math.prod(lead),) + tail)


def _check_scale(scale) -> float | None:
    """``scale`` as a float (None stays None), or a TypeError naming it: a bool is refused
    (``scale=True`` would silently mean 1.0), and so is a tensor (its value would be read on the host)."""
    if scale is None:
        return None
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"attention: scale must be a Python number or None, got {type(scale).__name__} {scale!r}")
    return float(scale)


def _check(q, k, v, bias, mask, gate, key_bias=None) -> None:
    for name, t in (("bias", bias), ("key_bias", key_bias), ("mask", mask), ("gate", gate)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"attention: {name} must be a tensor or None, got {type(t).__name__}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"attention: {name} must be a tensor, got {type(t).__name__}")
        if t.dim() < 3:
            raise ValueError(f"attention: {name} must be [..., H, L, D], got shape {tuple(t.shape)}")
        if t.dtype not in _SUPPORTED + (torch.float64,):
            raise TypeError(f"attention: {name} has unsupported dtype {t.dtype} (fp16, bf16, fp32, fp64)")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"attention: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"attention: k and v must have the same shape, got k {tuple(k.shape)}, v {tuple(v.shape)}")
    H, D = q.shape[-3], q.shape[-1]
    if k.dim() != q.dim() or k.shape[:-3] != q.shape[:-3] or k.shape[-3] not in (1, H) or k.shape[-1] != D:
        raise ValueError(f"attention: k/v shape {tuple(k.shape)} does not match q {tuple(q.shape)}: expected "
                         f"[{', '.join(map(str, q.shape[:-3]))}{', ' if q.dim() > 3 else ''}{H} or 1, K, {D}]")
    if not _MIN_D <= D <= _MAX_D:
        raise ValueError(f"attention: head dim D={D} of q {tuple(q.shape)} is out of range [{_MIN_D}, {_MAX_D}]")
    if q.shape[-2] == 0 or k.shape[-2] == 0:
        raise ValueError(f"attention: empty sequence, q {tuple(q.shape)}, k {tuple(k.shape)}")
    logits = tuple(q.shape[:-1]) + (k.shape[-2],)
    for name, t, floating in (("bias", bias, True), ("mask", mask, False)):
        if t is None:
            continue
        if floating and not t.is_floating_point():
            raise TypeError(f"attention: bias must be floating point, got {t.dtype}")
        if not floating and t.dtype != torch.bool:
            raise TypeError(f"attention: mask must be bool (True = attend), got {t.dtype}")
        try:
            ok = torch.broadcast_shapes(t.shape, logits) == torch.Size(logits)
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(f"attention: {name} shape {tuple(t.shape)} does not broadcast to the logits "
                             f"[..., H, Q, K] = {logits}")
    if key_bias is not None:
        if not key_bias.is_floating_point():
            raise TypeError(f"attention: key_bias must be floating point, got {key_bias.dtype}")
        keys = tuple(q.shape[:-2]) + (1, k.shape[-2])
        try:
            ok = torch.broadcast_shapes(key_bias.shape, keys) == torch.Size(keys)
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(f"attention: key_bias shape {tuple(key_bias.shape)} does not broadcast to "
                             f"[..., H, 1, K] = {keys}: a key bias varies only along keys (and heads and "
                             "leading dims), never along queries; pass a per-query term as bias")
    if gate is not None and gate.shape != q.shape:
        raise ValueError(f"attention: gate shape {tuple(gate.shape)} must equal the output shape {tuple(q.shape)}")
    if gate is not None and not gate.is_floating_point():
        raise TypeError(f"attention: gate must be floating point, got {gate.dtype}")
    devices = {t.device for t in (q, k, v, bias, key_bias, mask, gate) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"attention: all inputs must be on one device, got {sorted(map(str, devices))}")


# CUDA limits grid axes 1 and 2 to 65535 programs. Launches that put B·H (or Bb·Hb) on
# such an axis are split into slices along B when the product exceeds it (module level
# so tests can lower it); typical sizes keep one launch.
_MAX_GRID_YZ = 65535


def _b_slices(B: int, per_b: int, step: int = 1) -> list[tuple[int, int]]:
    """[b0, b1) ranges of rows whose launch has (b1 - b0) // step * per_b <= _MAX_GRID_YZ
    programs on a limited grid axis; ``step`` (2 for row pairs) divides every slice but the last."""
    if (B // step) * per_b <= _MAX_GRID_YZ:
        return [(0, B)]
    n = (_MAX_GRID_YZ // per_b) * step
    if n == 0:
        raise ValueError(f"attention: {per_b} heads exceed the CUDA grid limit of {_MAX_GRID_YZ} programs "
                         "on one axis; split the heads")
    return [(b0, min(b0 + n, B)) for b0 in range(0, B, n)]


def _rows_of(t: torch.Tensor | None, b0: int, b1: int) -> torch.Tensor | None:
    """Rows [b0, b1) of a [B, ...] tensor (a view: the kernel sees a shifted base pointer);
    a [1, ...] tensor broadcast over the rows is passed whole."""
    if t is None or t.shape[0] == 1:
        return t
    return t[b0:b1]


# --------------------------------------------------------------------------- autograd
class _AttentionFn(torch.autograd.Function):
    """Triton forward/backward on canonical 4-d tensors ([B, H, L, D]; bias/mask [1|B, *, *, *])."""

    @staticmethod
    def forward(ctx, q, k, v, bias, key_bias, mask, gate, scale: float, empty_rows: str = "zero"):
        B, H, Q, D = q.shape
        K = k.shape[2]
        block_d = max(16, triton.next_power_of_2(D))
        dev = q.device
        out = _empty((B, H, Q, D), q.dtype, dev)
        oatt = _empty(out.shape, out.dtype, dev) if gate is not None else out
        rowmax = _empty((B * H, Q), torch.float32, dev)
        logsum = _empty((B * H, Q), torch.float32, dev)
        ctx.scale = scale
        ctx.empty_flags = _EMPTY_FLAGS[empty_rows]
        if B * H * Q * K == 0:  # nothing to compute (the backward returns empty gradients)
            ctx.save_for_backward(q, k, v, bias, key_bias, mask, gate, oatt, rowmax, logsum)
            return out
        dummy = q  # stands in for absent bias / mask / gate pointers (never read)
        mask_u8 = mask.view(torch.uint8) if mask is not None else None
        kv_h = lambda t: (t.stride(0), 0 if t.shape[1] == 1 else t.stride(1), t.stride(2), t.stride(3))  # noqa: E731
        precision = _precision(q.dtype)
        # Two rows per program where a bias is shared by every row (triangle / MSA row attention).
        pairs = bias is not None and bias.shape[0] == 1 and B % 2 == 0
        step = 2 if pairs else 1
        for b0, b1 in _b_slices(B, H, step):
            nb = b1 - b0
            grid = lambda meta, nb=nb: (triton.cdiv(Q, meta["BLOCK_Q"]), (nb // step) * H)  # noqa: E731
            rs = slice(b0 * H, b1 * H)  # rows of the [B·H, Q] statistics
            note_launch("attention_fwd")
            _attn_fwd_kernel[grid](
                q[b0:b1], k[b0:b1], v[b0:b1], _rows_of(bias, b0, b1) if bias is not None else dummy,
                _rows_of(key_bias, b0, b1) if key_bias is not None else dummy,
                _rows_of(mask_u8, b0, b1) if mask is not None else dummy,
                gate[b0:b1] if gate is not None else dummy, out[b0:b1], oatt[b0:b1], rowmax[rs], logsum[rs],
                *q.stride(), *kv_h(k), *kv_h(v),
                *(_strides(bias) if bias is not None else (0, 0, 0, 0)), *_kb_strides(key_bias),
                *(_strides(mask_u8) if mask is not None else (0, 0, 0, 0)),
                *(gate.stride() if gate is not None else (0, 0, 0, 0)),
                H, Q, K, D, scale,
                HAS_BIAS=bias is not None, HAS_KB=key_bias is not None, HAS_MASK=mask is not None,
                MASK_KEYS=_keys_only(mask),
                HAS_GATE=gate is not None, ROW_PAIRS=pairs, EMPTY_NAN=ctx.empty_flags["EMPTY_NAN"],
                PRECISION=precision, BLOCK_D=block_d,
            )
        ctx.save_for_backward(q, k, v, bias, key_bias, mask, gate, oatt, rowmax, logsum)
        return out

    @staticmethod
    @once_differentiable  # not itself differentiable: a double backward raises
    def backward(ctx, dout):
        q, k, v, bias, key_bias, mask, gate, oatt, rowmax, logsum = ctx.saved_tensors
        scale = ctx.scale
        B, H, Q, D = q.shape
        HKV, K = k.shape[1], k.shape[2]
        need_dbias = bias is not None and ctx.needs_input_grad[3]
        need_dkb = key_bias is not None and ctx.needs_input_grad[4]
        if B * H * Q * K == 0:
            # Empty problem: every gradient is empty or 0 (and H // HKV below would divide by 0).
            return (torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v),
                    torch.zeros_like(bias) if need_dbias else None,
                    torch.zeros_like(key_bias) if need_dkb else None, None,
                    torch.zeros_like(gate) if gate is not None else None, None, None)
        block_d = max(16, triton.next_power_of_2(D))
        precision = _precision(q.dtype)
        dev = q.device
        dout = dout.contiguous()
        dummy = q
        mask_u8 = mask.view(torch.uint8) if mask is not None else dummy
        mask_st = _strides(mask_u8) if mask is not None else (0, 0, 0, 0)
        bias_t = bias if bias is not None else dummy
        bias_st = _strides(bias) if bias is not None else (0, 0, 0, 0)
        kv_h = lambda t: (t.stride(0), 0 if t.shape[1] == 1 else t.stride(1), t.stride(2), t.stride(3))  # noqa: E731
        kb_t = key_bias if key_bias is not None else dummy
        kb_st = _kb_strides(key_bias)
        flags = dict(HAS_BIAS=bias is not None, HAS_KB=key_bias is not None, HAS_MASK=mask is not None,
                     MASK_KEYS=_keys_only(mask), **ctx.empty_flags,
                     PRECISION=precision, BLOCK_D=block_d)

        # 1. delta (and the gate's share): reads dout, O; writes delta [, dO_attn, dgate].
        delta = _empty((B * H, Q), torch.float32, dev)
        dgate = _empty(dout.shape, gate.dtype, dev) if gate is not None else None
        do_att = _empty(dout.shape, q.dtype, dev) if gate is not None else dout
        for b0, b1 in _b_slices(B, H):
            nb, rs = b1 - b0, slice(b0 * H, b1 * H)
            note_launch("attention_bwd_pre")
            _attn_bwd_pre_kernel[lambda meta, nb=nb: (triton.cdiv(Q, meta["BLOCK_Q"]), nb * H)](
                dout[b0:b1], oatt[b0:b1], gate[b0:b1] if gate is not None else dummy, do_att[b0:b1],
                dgate[b0:b1] if gate is not None else dummy, delta[rs],
                *(gate.stride() if gate is not None else (0, 0, 0, 0)), H, Q, D,
                HAS_GATE=gate is not None, BLOCK_D=block_d,
            )
        common = (*q.stride(), *kv_h(k), *kv_h(v), *bias_st, *kb_st, *mask_st)

        def per_rows(b0: int, b1: int) -> tuple:
            """The row-indexed operands of the dk/dv, dq and dbias kernels for rows [b0, b1)."""
            rs = slice(b0 * H, b1 * H)
            return (q[b0:b1], k[b0:b1], v[b0:b1], _rows_of(bias_t, b0, b1) if bias is not None else dummy,
                    _rows_of(kb_t, b0, b1) if key_bias is not None else dummy,
                    _rows_of(mask_u8, b0, b1) if mask is not None else dummy, do_att[b0:b1],
                    rowmax[rs], logsum[rs], delta[rs])

        # 2. dk, dv: [B, HKV, K, D], summed over the query heads sharing a K/V head; with a key
        #    bias that needs a gradient, also dS summed over queries per (b, h): [B, H, K] fp32.
        dk = _empty((B, HKV, K, D), k.dtype, dev)
        dv = _empty((B, HKV, K, D), v.dtype, dev)
        dkb = _empty((B, H, K), torch.float32, dev) if need_dkb else None
        for b0, b1 in _b_slices(B, HKV):
            nb = b1 - b0
            note_launch("attention_bwd_dkdv")
            _attn_bwd_dkdv_kernel[lambda meta, nb=nb: (triton.cdiv(K, meta["BLOCK_K"]), nb * HKV)](
                *per_rows(b0, b1), dk[b0:b1], dv[b0:b1], dkb[b0:b1] if need_dkb else dummy, *common,
                H, HKV, H // HKV, Q, K, D, scale, STORE_DKB=need_dkb, DS_FP32=_ds_fp32(q.dtype), **flags,
            )

        # 3. dq (and dS itself when the bias is per (b, h, q, k)).
        full_bias = need_dbias and tuple(bias.shape) == (B, H, Q, K)
        dbias = _empty(bias.shape, torch.float32, dev) if need_dbias else None
        dq = _empty(q.shape, q.dtype, dev)
        for b0, b1 in _b_slices(B, H):
            nb = b1 - b0
            note_launch("attention_bwd_dq")
            _attn_bwd_dq_kernel[lambda meta, nb=nb: (triton.cdiv(Q, meta["BLOCK_Q"]), nb * H)](
                *per_rows(b0, b1), dq[b0:b1], dbias[b0:b1] if full_bias else dummy, *common,
                H, Q, K, D, scale, STORE_DS=full_bias, DS_FP32=_ds_fp32(q.dtype), **flags,
            )

        # 4. Broadcast bias: its own reduction kernel (see the module docstring).
        if need_dbias and not full_bias:
            Bb, Hb, Qb, Kb = bias.shape
            q_bcast, k_bcast = Qb == 1, Kb == 1
            # A bias shared by every row (Bb == 1) loops over all B rows in one program: only
            # a per-row bias (Bb == B) is sliced.
            for b0, b1 in _b_slices(Bb, Hb):
                nb = b1 - b0
                grid = lambda meta, nb=nb: (1 if q_bcast else triton.cdiv(Q, meta["BLOCK_Q"]),  # noqa: E731
                                            1 if k_bcast else triton.cdiv(K, meta["BLOCK_K"]), nb * Hb)
                note_launch("attention_bwd_dbias")
                _attn_bwd_dbias_kernel[grid](
                    *per_rows(*((b0, b1) if Bb != 1 else (0, B))), dbias[b0:b1], *common,
                    H, Hb, B if Bb == 1 else 1, H if Hb == 1 else 1, Q, K, D, scale,
                    HAS_KB=key_bias is not None, HAS_MASK=mask is not None, MASK_KEYS=_keys_only(mask),
                    Q_BCAST=q_bcast, K_BCAST=k_bcast, **ctx.empty_flags,
                    PRECISION=precision, BLOCK_D=block_d,
                )
        if dbias is not None:
            dbias = dbias.to(bias.dtype)
        if dkb is not None:
            # Sum [B, H, 1, K] over the dims the key bias broadcasts over (a small O(B·H·K) reduction).
            dkb = dkb.view(B, H, 1, K)
            dims = tuple(i for i in (0, 1, 3) if key_bias.shape[i] == 1 and dkb.shape[i] != 1)
            if dims:
                dkb = dkb.sum(dims, keepdim=True)
            dkb = dkb.to(key_bias.dtype)
        return dq, dk, dv, dbias, dkb, None, dgate, None, None


# --------------------------------------------------------------------------- public API
def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, bias: torch.Tensor | None = None,
                        mask: torch.Tensor | None = None, gate: torch.Tensor | None = None,
                        scale: float | None = None, key_bias: torch.Tensor | None = None,
                        empty_rows: str = "zero") -> torch.Tensor:
    """Plain-PyTorch attention with the same semantics as :func:`attention`.

    Materialises the logits. Computes in fp32 (fp64 for fp64 inputs) and returns
    q's dtype. Empty rows (every kept logit -inf, or nothing kept) give 0 with 0 gradient
    (``empty_rows="zero"``), or what ``torch.softmax`` gives there (``"nan"``), or what
    ``torch.nan_to_num(torch.softmax(...))`` gives (``"nan_cleaned"``), gradients included: for
    those two modes the weights are ``torch.softmax`` itself. The two additive terms are summed
    first, ``s + (bias + key_bias)``, as the kernel adds them.
    """
    _check(q, k, v, bias, mask, gate, key_bias)
    _check_empty_rows(empty_rows)
    scale = _check_scale(scale)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    s = torch.matmul(q.to(ct), k.to(ct).transpose(-1, -2)) * scale
    if bias is not None and key_bias is not None:
        s = s + (bias.to(ct) + key_bias.to(ct))
    elif bias is not None:
        s = s + bias.to(ct)
    elif key_bias is not None:
        s = s + key_bias.to(ct)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    if empty_rows == "zero":
        # Softmax is shift invariant, so a detached max is exact; a fully masked row
        # (max -inf) is shifted by 0 so that every probability is exp(-inf) = 0.
        m = s.detach().amax(-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        p = torch.exp(s - m)
        denom = p.sum(-1, keepdim=True)
        p = p / torch.where(denom == 0, torch.ones_like(denom), denom)
    else:
        p = torch.softmax(s, -1)
        if empty_rows == "nan_cleaned":  # only the empty rows: a NaN from the inputs stays NaN, as in the kernel
            p = torch.where((s == float("-inf")).all(-1, keepdim=True), torch.zeros_like(p), p)
    o = torch.matmul(p, v.to(ct))
    if gate is not None:
        o = o * torch.sigmoid(gate.to(ct))
    return o.to(q.dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, bias: torch.Tensor | None = None,
              mask: torch.Tensor | None = None, gate: torch.Tensor | None = None,
              scale: float | None = None, key_bias: torch.Tensor | None = None,
              empty_rows: str = "zero") -> torch.Tensor:
    """``sigmoid(gate) * softmax(scale * q @ k^T + (bias + key_bias), masked) @ v``, flash-style.

    Args:
        q: ``[..., H, Q, D]`` queries, fp16 / bf16 / fp32 (fp64 runs the reference), D in 8..128.
        k, v: ``[..., H or 1, K, D]``, same leading dims and dtype as q.
        bias: float, broadcastable to ``[..., H, Q, K]``; added in fp32. Gets a gradient.
        key_bias: float, broadcastable to ``[..., H, 1, K]`` (constant along queries: AlphaFold's
            mask bias ``1e9 * (mask - 1)`` shaped ``[B, 1, 1, K]``); added to ``bias`` in fp32
            inside the kernel, so ``bias=[1, H, Q, K]`` plus ``key_bias=[B, 1, 1, K]`` never
            materialises their ``[B, H, Q, K]`` sum. Gets a gradient (only when it requires one).
        mask: bool, broadcastable to ``[..., H, Q, K]``, True = attend. A row with no
            True gives output 0 and gradient 0.
        gate: pre-sigmoid gate logits shaped like the output (``q.shape``).
        scale: logit scale, default ``1 / sqrt(D)``.
        empty_rows: what a row gives whose kept logits are all -inf (a -inf bias, or a mask
            keeping nothing): ``"zero"`` 0 with no gradient; ``"nan"`` what ``torch.softmax`` of
            the masked logits gives there (NaN, with torch's gradients: NaN dq and dbias at the
            row's kept entries, NaN dk at its kept keys, NaN dv at every key of its (row, head));
            ``"nan_cleaned"`` what ``torch.nan_to_num`` of those weights gives (0, with torch's
            gradients: NaN at the kept entries as for ``"nan"``, but no NaN in dv). Written by the
            kernels themselves: no extra pass.

    Returns:
        ``[..., H, Q, D]`` in q's dtype.

    Dispatch: CUDA tensors (or CPU tensors with ``TRITON_INTERPRET=1``) in fp16 /
    bf16 / fp32 run the Triton kernels; anything else runs :func:`attention_reference`.
    """
    _check(q, k, v, bias, mask, gate, key_bias)
    _check_empty_rows(empty_rows)
    scale = _check_scale(scale)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if q.dtype not in _SUPPORTED or not use_triton(q, k, v, bias, key_bias, mask, gate):
        return attention_reference(q, k, v, bias=bias, mask=mask, gate=gate, scale=scale, key_bias=key_bias,
                                   empty_rows=empty_rows)
    for name, t in (("q", q), ("k", k), ("v", v), ("bias", bias), ("key_bias", key_bias), ("mask", mask),
                    ("gate", gate)):
        if t is not None:
            check_offsets32("attention", name, t, tuple(range(max(0, t.dim() - 2), t.dim())))
    lead = q.shape[:-3]
    B = math.prod(lead)
    H, Q, D = q.shape[-3:]
    q4 = q.reshape(B, H, Q, D)
    k4 = k.reshape(B, k.shape[-3], k.shape[-2], D)
    v4 = v.reshape(B, v.shape[-3], v.shape[-2], D)
    bias4 = _bcast_4d(bias, lead, "bias") if bias is not None else None
    kb4 = _bcast_4d(key_bias, lead, "key_bias") if key_bias is not None else None
    mask4 = _bcast_4d(mask, lead, "mask") if mask is not None else None
    gate4 = gate.reshape(B, H, Q, D) if gate is not None else None
    out = _AttentionFn.apply(q4, k4, v4, bias4, kb4, mask4, gate4, scale, empty_rows)
    return out.reshape(q.shape)
