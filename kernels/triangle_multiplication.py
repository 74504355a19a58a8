"""Fused triangle multiplicative update (AF2 Alg. 11/12, AF3 Alg. 12/13), forward and backward.

``triangle_multiplication(z, mask, params, outgoing=True)`` computes, for a pair
representation ``z [*, N, N, c_z]`` and a pair mask ``[*, N, N]`` (or None)::

    x = LN_in(z)
    a = mask * sigmoid(x W_ag^T + b_ag) * (x W_ap^T + b_ap)          [*, N, N, H]
    b = mask * sigmoid(x W_bg^T + b_bg) * (x W_bp^T + b_bp)
    g = sigmoid(x W_g^T + b_g)                                        [*, N, N, c_z]
    outgoing:  p_ij = sum_k a_ik b_jk        incoming:  p_ij = sum_k a_ki b_kj
    out = g * (LN_out(p) W_o^T + b_o)

The incoming formula is the supplements' (AF2 and AF3) and the Pairformer module's.
AF2's released code (and ``models/alphafold2/triangle.py``) writes incoming as
``sum_k a_kj b_ki``: the same function with the two projections swapped, so
:func:`params_from_module` swaps a and b for an AF2 incoming module and the kernel
has one incoming orientation. Biases may be None (the Pairformer's projections have
none); LayerNorm weights/biases may be None (no affine).

Kernels (M = B·N² pair rows, C = c_z, H = c_hidden; bytes for a 2-byte dtype):

- ``trimul_proj`` (LN prologue → the four gated-projection GEMMs → gating epilogue): a
  tile is BLOCK_M pair rows of one batch element; its z rows are read once (2·C bytes a
  row), normalised in registers (fp32 statistics, kept: 8 bytes a row), and for each of
  a and b the program loops over BLOCK_H-channel blocks of that projection's own weights
  ``W_*p`` / ``W_*g`` (read from the caller's parameter tensors: no concatenated copy;
  weights stay in L2), computing ``[channels, rows] = W · x^T`` (ROWS = 0, x^T the
  GEMM's shared-memory operand, the result already pair-contiguous) or
  ``[rows, channels] = x · W^T`` (ROWS = 1: x the register operand, which wgmma takes
  from registers with no shared-memory copy of x; the store transposes) or, ROWS = 2
  (added after the 2026-12-01 sweep), ``[rows, 2·BLOCK_H] = x · [W_p; W_g]^T``: the
  projection and gate of a channel block as *one* GEMM over interleaved weight rows
  (column 2j = proj channel j, 2j + 1 its gate), split afterwards into even / odd columns
  (reshape + split, which an MMA accumulator layout can do in registers: adjacent columns
  are in one thread): each wgmma twice as wide (N = 2·BLOCK_H), half as many issue/wait
  groups; so that the epilogue ``mask · sigmoid(gate) · proj`` stores a and b *channel-major*,
  ``ab[2, B, H, N, N]``, with the pair index contiguous: coalesced stores of exactly what
  the triangle product reads. Writes 2·2H bytes a row. The output gate ``g`` is *not*
  computed here: storing it would cost an N²·C write and read and N²·C of peak memory;
  the output kernel recomputes it from z (a C×C GEMM, ~1/5 of this kernel's FLOPs).
  Persistent form (config CTAS > 0): a grid of ~CTAS programs a multiprocessor, each
  looping over TILES tiles (pid, pid + P, ...: concurrent programs on neighbouring
  tiles), issuing the *next* tile's z and mask loads before the current tile's LN and
  GEMMs (a register prefetch: 2·C·BLOCK_M bytes, 32 registers a thread at 128 rows and
  8 warps), so one tile's HBM latency overlaps the previous tile's math.
- triangle product: a batched GEMM over the B·H channel matrices, outgoing
  ``P_c = A_c B_c^T``, incoming ``P_c = A_c^T B_c``. "Transposed for incoming" is a
  transposed *view* that both GEMMs read natively (cuBLAS's transpose flags, the Triton
  kernel's strides): no copy and no scattered transposed store. Writes p channel-major,
  ``[B, H, N, N]``, in z's dtype. Default ``torch.bmm`` (cuBLAS); ``product="triton"``
  runs ``trimul_bmm``, a grouped-tile Triton batched GEMM. Why cuBLAS by default: nothing
  can be fused into this stage (the next op, LN over the channels of p, needs all H
  channels of a pair, while a batched-GEMM program owns one channel), so the Triton kernel
  can at best tie cuBLAS, whose Hopper kernels (wgmma, TMA, tuned per shape) run this
  square bf16 problem (2·H·N³ FLOPs over 3·H·N² elements: ~340 FLOP/byte at N=1024) at
  the tensor-core rate (measured 2026-12-01, H200: 0.364 ms at N=1024, ~750 TFLOP/s).
- ``trimul_out`` (LN prologue → output projection, gate GEMM, gating epilogue): a tile
  is BLOCK_M pairs; the p tile ``[H, BLOCK_M]`` (channel-major layout, coalesced along
  the pairs), the same z rows and their saved statistics are all loaded first (two
  independent big loads in flight; the first version issued the z load only after the
  W_o GEMM); then LN over the channels of p, ``· W_o^T``, LN(z) from the statistics,
  ``g``; writes ``g · (LN(p) W_o^T + b_o)``. Reads 2·(H + C) bytes a row, writes 2·C.
  Same persistent form and next-tile prefetch (p, z and statistics) as ``trimul_proj``.
  Epilogue forms (the config's BLOCK_H is the output-channel block here): BLOCK_H ≥ C is the
  fused form the 2026-12-01 sweep measured (full-width fp32 o, g, LN(z), LN(p) tiles live at
  once: 255 registers at 64 rows / 4 warps, 2 programs an SM); BLOCK_H < C (added after it)
  rounds LN(p) and LN(z) to the GEMM dtype once and loops over BLOCK_H-wide column blocks of
  W_o / W_g (two GEMMs, gating, store a block): 156-185 registers at 64-128 rows (ptxas, sm_90,
  no spills), i.e. 3 programs an SM at 64 rows / 4 warps with BLOCK_H = 32 (48 KiB shared).

Forward traffic a pair row (bf16, C = H = 128): ours reads z twice and p once, writes
a, b, p and out once, and the GEMM reads a and b at least once: 2·(3C + 6H) elements,
≈ 2.3 KiB (2.3 GiB at N=1024, ~0.55 ms at 4.3 TB/s, against ~480 GFLOP of GEMMs, ~0.6 ms
at the ~800 TFLOP/s bf16 ceiling issue 11 measured: each stage is near balanced). The eager module
writes and reads LN(z), the four projections, two sigmoids, two products, two masked
products, the einsum's permuted operands and result, LN(p), the output projection, the
gate and its sigmoid: ~14 C-wide and ~28 H-wide passes, ≈ 10.5 KiB a row. Peak extra
memory here (forward, no grad): a, b and p, 3·N²·H·2 bytes (768 MiB at N=1024), plus
8 bytes a row of statistics (the mask is read in its own dtype, not copied).

Where the forward kernels' time went (N = 1024, bf16, C = H = 128). Measured 2026-12-01 on an
H200 (``bench/results/kernels_triangle_tune_NVIDIA_H200_2026-12-01.md``): proj 0.540 ms (1.51 TB/s
of its minimal bytes, 254 TFLOP/s), out 0.543 ms (1.50 TB/s, 127 TFLOP/s), each ~3× its byte
floor (~0.18 ms at 4.3 TB/s); the persistent forms with next-tile prefetch were *slower* (proj
0.64-1.0 ms, out 0.69-1.0 ms), and so were 128 × 128 projection tiles (0.83 ms) and 3 stages.
What follows is reasoned from those numbers and the ptxas reports, not measured: neither kernel
is bandwidth- or FLOP-bound; both run a serial per-tile chain (load → LayerNorm reductions →
GEMMs → epilogue → layout-converting store) with too few tiles in flight to hide it. The
projection's best shape holds 112 KiB of shared memory (2 programs an SM) and issues, per
128-row tile, eight [64, 128] × [128, 128] GEMMs (proj and gate, two channel blocks, a and b),
each waited on before its epilogue; it also re-reads all four weight matrices from L2 per tile
(128 KiB, more than the tile's 96 KiB of HBM traffic). The output kernel is register-bound
(255 registers: 2 programs, 8 warps an SM), so an SM has at most ~2 tiles' loads (~64 KiB) in
flight, and only between computations; sustaining 4.3 TB/s at ~1 µs of latency needs ~33 KiB
an SM in flight *continuously*. The persistent prefetch aimed at overlapping the chain but
cost registers (242-255: 1 program an SM): worse. Hence the two variants added for the next
sweep, aimed at concurrency and issue count rather than at the inner loop: ``out``
column-blocked (~40% fewer registers: 3 programs an SM at 64 rows; smaller live fp32 tiles),
``proj`` ROWS = 2 (one N = 2·BLOCK_H GEMM instead of two N = BLOCK_H ones a channel block:
half the GEMM issue/wait groups; 128 registers, 80-128 KiB). Expectation, to be checked by the
sweep: out ~0.35-0.4 ms if occupancy is its limit, proj ~0.4-0.45 ms. The ≤ 1.1 ms forward
target needs both near 0.3 ms, which these alone may not reach; the next lever would be weights
resident across tiles (no per-tile L2 re-read), which Triton does not let us pin explicitly.

Backward (z and every parameter). Saved: z (the caller holds it anyway), a, b
(channel-major, needed by the triangle product's backward), p, and z's LN statistics;
LN(z), the four projections, g, LN(p) and the output projection are recomputed.

- ``trimul_out_bwd``: recomputes LN(p), ``o``, ``g`` from p and z; ``do = dout · g``,
  ``dgate = dout · o · g(1-g)``; ``dLN(p) = do W_o``; LayerNorm backward in registers
  → dp, stored channel-major (the layout the triangle backward reads). Writes do, LN(p)
  and dgate row-major for the weight gradients, and one fp32 partial row a program:
  ``[dLN_out.weight | dLN_out.bias | d out_bias | d gate_bias]`` (column sums of its tile).
- triangle backward: two batched GEMMs (outgoing ``dA = dP B``, ``dB = dP^T A``;
  incoming ``dA = B dP^T``, ``dB = A dP``), by the same ``product`` choice.
- ``trimul_proj_bwd``: recomputes LN(z) and the gated projections tile by tile,
  forms the gradients of the four pre-activations from dA, dB and the mask, stores
  them row-major next to dgate in one ``du [M, 4H + C]`` buffer, accumulates
  ``dLN(z) = du · [W_ap; W_bp; W_ag; W_bg; W_g]`` in registers (the GEMM never leaves
  the program), and finishes with LN_in's backward → dz. Writes LN(z) for the weight
  gradient and one fp32 partial row a program: ``[dLN_in.weight | dLN_in.bias |
  d(a, b proj biases) | d(a, b gate biases)]``.
- weight gradients: ``du^T · LN(z)`` ([4H + C, M]·[M, C]) and ``do^T · LN(p)``
  ([C, M]·[M, H]) as two cuBLAS GEMMs in z's dtype (fp32 accumulation, one rounding:
  no fp32 result and cast); each parameter's gradient is a row slice (a view). These are
  reductions over all M rows: inside the fused kernels they would need an fp32
  [4H+C, C] accumulator per program (320 KiB of registers at C = H = 128) or M-wide
  atomics; cuBLAS does them at the tensor-core rate for the cost of writing and
  reading du, do and the two LN outputs once (2·(4H + 2C + H + C) bytes a row).
- bias and LN-affine gradients: the column sums of the two partial buffers
  (B·N²/BLOCK_M rows: 1024 × 640 fp32 at N=256, ~2.5 MiB), two small reductions and one
  cast each. The first version summed du ([M, 4H + C] bf16, 80 MiB at N=256) and do with
  ``Tensor.sum(0)``: ``at::native::reduce_kernel`` 0.123 + 0.032 ms of a 2.56 ms step
  (measured), now folded into the kernels' epilogues (registers already hold the values;
  +4·(2C + 4H) bytes a program of stores).

Host path (N=256 is launch-bound: 2026-12-01, H200 machine, host 0.41-0.43 ms a forward and
2.0-2.3 ms a forward+backward, i.e. ~1.6 ms a backward, against ~0.5 ms of GPU work for the
whole step by the sweep's per-kernel times). Earlier rounds removed the per-call weight
concatenations, constant creation, mask conversion, ``broadcast_shapes``, rebuilding the
parameters (now cached per module behind a signature of its submodules' and parameters'
identities, ``outgoing`` and the LN eps), Triton's autotuner wrapper and the big bias
reductions. This round, measured on the CPU-only CI host (``TRITON_INTERPRET=0 python -m
bench.kernels.triangle_tune --host-cpu``: the wrapper unchanged on CPU tensors, each Triton
launch replaced by Triton's own host-side binder / specialisation / cache-key code for an sm_90
target, the cuBLAS GEMMs by no-ops; median µs a call, N = 32, bf16, before → after on the same
idle-ish host): forward (no grad) 71 → 48, forward with grad 84 → 60, backward alone 145 → 110,
forward+backward 255 → 195 (three interleaved before/after pairs at load average 5 on 2 cores:
96-113 → 47-77, 109-138 → 56-77, 190-234 → 116-166, 261-411 → 189-281). What went:
host calls of ``triton.cdiv`` / ``triton.next_power_of_2`` (ConstexprFunctions that unwrap
their arguments; ~18 a step), the per-launch assembly of ~10 keyword arguments (now one cached
dict per kind, config, C, H, dtype and mask), ``_pick`` called per launch (a direct ``_TUNED``
lookup), one of the two statistics allocations, the ``reshape`` / ``view`` autograd nodes (none
for 4-d z), and in backward the per-parameter slices, dict and no-op ``.to`` calls (one
``split`` a source, casts only where the dtype differs), sums and GEMMs for gradients nobody
asked for, and a per-call set over parameter dtypes (recorded in forward). What the CPU
harness does not see: the CUDA driver's launch cost, cuBLAS's host code and the CUDA caching
allocator. The GPU machine's host spent ~6× this host's time on the same forward, so ~110 µs
here does not account for ~1.6 ms there: *the cause of the rest is not known*. The e2e rows of
``bench/kernels/triangle_tune.py`` now split the GPU host time (forward with grad, backward
alone, the backward body vs the autograd engine, each launch helper, the GEMMs) so the next
GPU run names it. Launches a forward: 2 Triton + 1 cuBLAS; a backward: 2 Triton + 4 cuBLAS +
2 small sums + ≤ 2 casts.

Tiles and tuning. A config is BLOCK_M, BLOCK_H, num_warps, num_stages, CTAS (0 = one tile
a program; k = persistent, ~k programs an SM) and ROWS (projection orientation: 0, 1, or 2 =
paired GEMM); for the forward output kernel BLOCK_H is its output-channel block (≥ C: fused).
Since the 2026-12-01 sweep each in-module list starts with the shape it measured fastest (the
untuned default) and leaves out its measured losers; the new variants follow, compiled for
sm_90 but not yet timed; the notes below on the original lists are from before that sweep. On the
GPU the first call for a (kernel, M bucket, C, H, dtype, mask) times each candidate of
``_GPU_CONFIGS`` once with ``triton.testing.do_bench`` (every kernel is idempotent, so a
rerun is harmless; candidates that fail to compile are skipped) and keeps the fastest;
later calls cost one dict lookup. ``FOLDCOMPILE_TRIMUL_TUNE=0`` takes the first entry.
The lists are reasoned from what compiles well, not from timings: every entry was
compiled here for sm_90 (Triton 3.6, ``ptxas -v``; ``python -m bench.kernels.triangle_tune
--ptxas`` repeats it on any machine, no GPU) and shapes that spill registers were dropped
(measured at compile time: e.g. the projection at 128 × 128 spills 496 bytes, 256 rows
80; the output kernel at 4 warps with prefetch spills 1.2 KB). What the compiler says
shapes the choice: the one-tile-a-program projection (the first version's shape) uses
126 registers and 112 KiB of shared memory (the LN'd x^T tile, two stages of both weight
tiles, the epilogue's layout conversion) at 128 rows / 8 warps, so at most 2 programs
(16 warps) fit an SM and each runs load → LN → GEMMs → store with nothing of its own in
flight; with the persistent loop and prefetch it uses 242 registers: 1 program an SM, but
the next tile's loads are always outstanding. The output kernel is register-bound (~5 fp32
[64, 128] tiles: p^T, LN(p)^T, o, g, LN(z)): 255 registers at 64 rows with 4 warps or with
8 warps plus prefetch, 140 at 8 warps without. The backward kernels hold more (recomputed
forward tiles plus gradients): most shapes spill a little; the spill-free ones (out_bwd
32 rows / 8 warps: 250 registers; proj_bwd 64 rows, BLOCK_H 32, 8 warps: 208) come first.
All 64- and 128-row shapes issue wgmma (Hopper's warpgroup MMA, counted in the PTX); the
32-row and BLOCK_H = 32 fallbacks fall back to mma.sync. num_stages matters little here:
the projection's inner loop is 2-4 steps and the output kernels have none (their prefetch
is the manual one), hence 1-2 stages. ``bench/kernels/triangle_tune.py`` times these and
a wider list per kernel at N = 256 and 1024 and prints the best: until it has run on an
H200 which shape wins is a lead, and the in-process tuner makes the choice on the card
it runs on either way. Under the interpreter there is one config a kind (16-row tiles,
the persistent form with 4 pretend SMs, the column-blocked output epilogue); the tests force
every in-module GPU candidate, every forward candidate of the sweep and each structural variant
(CTAS, ROWS 0/1/2, fused and column-blocked epilogue) through it.

Numerics: LayerNorm statistics, GEMM accumulators and epilogues are fp32; GEMM
operands, a, b, p and the output are in z's dtype (what a bf16 module computes).
fp32 GEMMs use TF32 only where ``torch.get_float32_matmul_precision()`` allows it
(Triton and cuBLAS alike). The mask takes no gradient (a mask that requires grad is
refused).

NaN and ±inf in z or a parameter give eager's NaN and ±inf at eager's positions, gradients
included: the backward zeroes the gate gradients of lanes past the tile and leaves padded rows out
of its partial sums, where 0 * inf would be NaN (tests/kernels/test_properties_triangle_multiplication.py).

Dispatch: CUDA tensors (or CPU tensors under ``TRITON_INTERPRET=1``) in fp16 / bf16 /
fp32 with c_z, c_hidden ≤ ``MAX_TRITON_DIM`` run the kernels; float64, other devices
and wider channels run :func:`triangle_multiplication_reference`.

Example (AF3's Pairformer module, 13 residues)::

    >>> from foldcompile.models.pairformer import TriangleMultiplicationIncoming
    >>> from foldcompile.models.zoo import randomize_parameters
    >>> module = randomize_parameters(TriangleMultiplicationIncoming(c_z=16, c_hidden=8))  # no zero layers
    >>> z, mask = torch.randn(1, 13, 13, 16), (torch.rand(1, 13, 13) > 0.1).float()
    >>> out = triangle_multiplication_module(module, z, mask)
    >>> out.shape
    torch.Size([1, 13, 13, 16])
    >>> torch.allclose(out, module(z, mask), atol=1e-5)
    True
"""
from __future__ import annotations

import dataclasses
import os
import weakref
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
import triton.testing

from foldcompile.kernels._dispatch import interpreting, note_launch, once_differentiable, use_triton

__all__ = ["triangle_multiplication", "triangle_multiplication_reference", "triangle_multiplication_module",
           "TriangleMultiplicationParams", "params_from_module", "TriangleMultiplicationFunction",
           "MAX_TRITON_DIM"]

_SUPPORTED = (torch.float16, torch.bfloat16, torch.float32)
# Whole rows of z (C channels) and of p (H channels) are held in registers for the LayerNorms,
# and the output tiles are [BLOCK_M, C]: 256 channels is the widest that keeps them in registers.
MAX_TRITON_DIM = 256


# --------------------------------------------------------------------------- configs
# A config is a dict: BLOCK_M (pair rows a tile), BLOCK_H (output channels an inner step; the
# projection kernels), num_warps, num_stages, and CTAS: 0 = one tile a program (grid = tiles),
# k > 0 = persistent: about k programs per multiprocessor, each looping over TILES tiles
# (a power of two, so few compiled variants) with the next tile's loads issued before the
# current tile's math (register prefetch).
_KEYS = ("BLOCK_M", "BLOCK_H", "num_warps", "num_stages", "CTAS", "ROWS")
_GPU_CONFIGS = {
    # Ordered by the 2026-12-01 H200 sweep (bench/results/kernels_triangle_tune_NVIDIA_H200_2026-12-01.md,
    # bf16, C = H = 128): the measured best first (the one used when tuning is off,
    # FOLDCOMPILE_TRIMUL_TUNE=0), then the new structural variants (not yet timed: compiled for
    # sm_90 here with `python -m bench.kernels.triangle_tune --ptxas`, registers / shared memory in
    # the comments), then small fallbacks for fp32 / 256 channels. Measured losers (persistent
    # forms, 128 x 128 projection tiles) were dropped from the in-process lists; the sweep keeps them.
    # ROWS (proj): 0 = W · x^T, 1 = x · W^T, 2 = x · [W_p; W_g]^T, one GEMM a channel block (paired).
    # BLOCK_H (out): output-channel block; >= C is the fused single-block epilogue that was measured.
    "proj": [(128, 64, 8, 2, 0),        # 0.540 ms at N=1024 (1.51 TB/s); 126 regs, 112 KiB
             (128, 32, 8, 1, 0, 2),     # paired GEMM, [128, 64] accumulators: 124 regs, 48 KiB (2 an SM)
             (64, 32, 4, 1, 0, 2),      # paired GEMM: 146 regs, 32 KiB (3 programs an SM)
             (128, 64, 8, 2, 0, 2),     # paired GEMM, [128, 128] accumulators (N = 128): 128 regs, 128 KiB
             (64, 64, 4, 2, 0),         # 0.673 ms
             (64, 32, 4, 1, 0)],        # small fallback (fp32, 256 channels)
    "out": [(64, 128, 4, 1, 0),         # 0.543 ms at N=1024 (1.50 TB/s): fused epilogue, 255 regs
            (64, 64, 4, 2, 0),          # column-blocked epilogue: 156 regs, 104 KiB
            (64, 32, 4, 1, 0),          # column-blocked: 157 regs, 48 KiB (3 programs an SM)
            (128, 64, 8, 2, 0),         # column-blocked, 128-row tiles: 176 regs, 144 KiB
            (32, 128, 4, 1, 0)],        # small fallback
    "out_bwd": [(32, 64, 4, 1, 0),      # 1.74 ms at N=1024 (best of the sweep; spills 28 bytes)
                (32, 64, 8, 1, 0),      # 250 regs, 40 KiB, no spill
                (64, 64, 8, 2, 0)],     # 255, spills 420 bytes
    "proj_bwd": [(64, 32, 4, 2, 0),     # 2.25 ms at N=1024 (best of the sweep)
                 (32, 64, 4, 2, 0),     # 2.36 ms
                 (64, 32, 8, 2, 0),     # 208 regs, 48 KiB, no spill
                 (32, 64, 8, 2, 0)],    # 244, no spill
}
# Under the interpreter: small tiles (13- and 19-residue tests hit every tail) and the persistent
# form (CTAS = 1 with _num_sms() = 4), so the tile loop and its prefetch are tested on CPU.
_INTERP_CONFIGS = {k: [(16, 16, 4, 1, 1 if k in ("proj", "out") else 0)] for k in _GPU_CONFIGS}
# kind -> config forced by tests and by bench/kernels/triangle_tune.py (skips the tuner).
_FORCED: dict[str, dict] = {}
_TUNED: dict[tuple, dict] = {}
_SMS: dict[int, int] = {}


def _configs(kind: str) -> list[dict]:
    """Candidate configs of one kernel kind, chosen at import time (one under the interpreter).

    Hopper reasoning (C = H = 128, bf16): see the module docstring, "Tiles"."""
    table = _INTERP_CONFIGS if interpreting() else _GPU_CONFIGS
    return [_cfg(c) for c in table[kind]]


def _cfg(c: tuple) -> dict:
    """A config tuple (ROWS may be left out: 0) as the dict the launchers take."""
    return dict(zip(_KEYS, tuple(c) + (0,) * (len(_KEYS) - len(c))))


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _np2(n: int) -> int:
    """next power of two >= n (n >= 1); ``triton.next_power_of_2`` is a ConstexprFunction whose host
    call costs a few microseconds (argument unwrapping), this is one int operation."""
    return 1 << (n - 1).bit_length()


def _num_sms(device: torch.device) -> int:
    if interpreting() or device.type != "cuda":
        return 4
    i = device.index if device.index is not None else torch.cuda.current_device()
    if i not in _SMS:
        _SMS[i] = torch.cuda.get_device_properties(i).multi_processor_count
    return _SMS[i]


def _persistent_grid(total: int, cfg: dict, device: torch.device) -> tuple[int, int]:
    """(programs, TILES) of a launch over ``total`` tiles. One tile a program for CTAS = 0;
    otherwise min(total, CTAS · SMs) programs, program pid taking tiles pid, pid + P, ... while
    they exist: balanced to one tile, whatever the tile count. TILES, the loop's compile-time
    trip count (the interpreter cannot loop to a run-time bound; iterations past the last tile
    skip their body), is rounded up to a power of two, so a new N recompiles only when it
    crosses a power of two."""
    if not cfg["CTAS"]:
        return total, 1
    progs = max(1, min(total, _num_sms(device) * cfg["CTAS"]))
    return progs, _np2(_cdiv(total, progs))


def _pick(kind: str, key: tuple, launch) -> dict:
    """The config to launch ``kind`` with: forced, cached, or (GPU, several candidates, tuning on)
    the fastest of the candidates timed once per key with ``launch(cfg)`` (every kernel here is
    idempotent: a rerun rewrites the same outputs). The key buckets M to a power of two so a new
    N of similar size reuses the choice."""
    if _FORCED and kind in _FORCED:
        return _FORCED[kind]
    full = (kind, *key)
    cfg = _TUNED.get(full)                     # the per-call path: one dict lookup
    if cfg is not None:
        return cfg
    cfgs = _configs(kind)
    if interpreting():
        cfg = cfgs[0]
    elif len(cfgs) == 1 or os.environ.get("FOLDCOMPILE_TRIMUL_TUNE", "1") == "0":
        # No timing: the first candidate that compiles and launches here (fp32 operands or 256
        # channels can run a config out of shared memory or registers).
        cfg = None
        for c in cfgs:
            try:
                launch(c)
            except Exception:  # noqa: BLE001
                if c is cfgs[-1]:
                    raise
                continue
            cfg = c
            break
    else:
        best = (float("inf"), cfgs[0])
        for c in cfgs:
            try:
                t = triton.testing.do_bench(lambda c=c: launch(c), warmup=5, rep=20)
            except Exception:  # noqa: BLE001 - out of shared memory / registers: not a candidate here
                continue
            best = min(best, (t, c), key=lambda x: x[0])
        cfg = best[1]
    _TUNED[full] = cfg
    return cfg


# --------------------------------------------------------------------------- kernels
@triton.jit
def _ln_rows(x, ok, w, b, n, eps):
    """LayerNorm over axis 1 of an fp32 [rows, channels] tile; masked lanes (ok False) stay 0.
    Returns (normalised x̂, affine output, mean, rstd)."""
    mean = tl.sum(x, axis=1) / n
    xc = tl.where(ok, x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / n
    rstd = 1.0 / tl.sqrt(var + eps)
    xhat = xc * rstd[:, None]
    return xhat, xhat * w[None, :] + b[None, :], mean, rstd


@triton.jit
def _tile_rows(t, TILES_B, TOTAL, NN, BLOCK_M: tl.constexpr):
    """Tile t (of TOTAL = B · TILES_B): (batch element, pair indices, row mask, flat rows)."""
    b = (t // TILES_B).to(tl.int64)
    rs = (t % TILES_B) * BLOCK_M + tl.arange(0, BLOCK_M)
    r_ok = (rs < NN) & (t < TOTAL)
    return b, rs, r_ok, b * NN + rs


@triton.jit
def _proj_load(Z, MASK, t, TILES_B, TOTAL, NN, C: tl.constexpr, HAS_MASK: tl.constexpr,
               BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr):
    """Raw (z's dtype) z rows and the mask of tile t: what the projection kernel prefetches."""
    b, rs, r_ok, rows = _tile_rows(t, TILES_B, TOTAL, NN, BLOCK_M)
    cols = tl.arange(0, BLOCK_C)
    zc_ok = r_ok[:, None] & (cols < C)[None, :]
    x = tl.load(Z + rows[:, None] * C + cols[None, :], mask=zc_ok, other=0.0)
    if HAS_MASK:
        mk = tl.load(MASK + rows, mask=r_ok, other=0.0).to(tl.float32)
    else:
        mk = tl.full([BLOCK_M], 1.0, tl.float32)
    return x, mk


@triton.jit
def _proj_half(x1, mk, b, rs, r_ok, W_P, W_G, B_P, B_G, AB, NN,
               C: tl.constexpr, H: tl.constexpr, HAS_MASK: tl.constexpr, PRECISION: tl.constexpr,
               BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, ROWS: tl.constexpr):
    """One of a / b for one tile, gated, masked and stored channel-major into AB ([B, H, N, N]
    of this half), the pair index contiguous. ``x1`` is the LN'd tile in z's dtype: with
    ROWS = 0 (x1 given as x^T, [BLOCK_C, BLOCK_M]) each step is [BLOCK_H, BLOCK_M] = W · x^T,
    x^T the GEMM's shared-memory operand and the result already pair-contiguous; with ROWS = 1
    (x1 given as [BLOCK_M, BLOCK_C]) it is [BLOCK_M, BLOCK_H] = x · W^T, x the register operand
    (wgmma takes A from registers: no shared-memory copy of x) and the store transposes."""
    if ROWS == 2:
        _proj_half_pair(x1, mk, b, rs, r_ok, W_P, W_G, B_P, B_G, AB, NN, C, H, HAS_MASK, PRECISION,
                        BLOCK_C, BLOCK_H)
    elif ROWS == 1:
        _proj_half_rows(x1, mk, b, rs, r_ok, W_P, W_G, B_P, B_G, AB, NN, C, H, HAS_MASK, PRECISION,
                        BLOCK_C, BLOCK_H)
    else:
        _proj_half_cols(x1, mk, b, rs, r_ok, W_P, W_G, B_P, B_G, AB, NN, C, H, HAS_MASK, PRECISION,
                        BLOCK_C, BLOCK_H)


@triton.jit
def _proj_half_rows(x1, mk, b, rs, r_ok, W_P, W_G, B_P, B_G, AB, NN,
                    C: tl.constexpr, H: tl.constexpr, HAS_MASK: tl.constexpr, PRECISION: tl.constexpr,
                    BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr):
    cols = tl.arange(0, BLOCK_C)
    c_ok = cols < C
    base = AB + b * (H * NN)
    for h0 in range(0, H, BLOCK_H):
        hh = h0 + tl.arange(0, BLOCK_H)
        h_ok = hh < H
        w_ok = c_ok[:, None] & h_ok[None, :]
        # W^T tiles [BLOCK_C, BLOCK_H]: w_t[k, h] = W[h, k].
        wpt = tl.load(W_P + hh[None, :] * C + cols[:, None], mask=w_ok, other=0.0).to(x1.dtype)
        wgt = tl.load(W_G + hh[None, :] * C + cols[:, None], mask=w_ok, other=0.0).to(x1.dtype)
        bp = tl.load(B_P + hh, mask=h_ok, other=0.0).to(tl.float32)
        bg = tl.load(B_G + hh, mask=h_ok, other=0.0).to(tl.float32)
        up = tl.dot(x1, wpt, input_precision=PRECISION) + bp[None, :]   # [BLOCK_M, BLOCK_H]
        ug = tl.dot(x1, wgt, input_precision=PRECISION) + bg[None, :]
        v = tl.sigmoid(ug) * up
        if HAS_MASK:
            v = v * mk[:, None]
        tl.store(base + hh[None, :].to(tl.int64) * NN + rs[:, None], v.to(AB.dtype.element_ty),
                 mask=r_ok[:, None] & h_ok[None, :])


@triton.jit
def _proj_half_pair(x1, mk, b, rs, r_ok, W_P, W_G, B_P, B_G, AB, NN,
                    C: tl.constexpr, H: tl.constexpr, HAS_MASK: tl.constexpr, PRECISION: tl.constexpr,
                    BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr):
    """ROWS = 2: as ROWS = 1 (x the left operand, [BLOCK_M, BLOCK_C]) but each channel block's
    projection and gate are ONE GEMM, [BLOCK_M, 2·BLOCK_H] = x · [W_p; W_g]^T with the weight
    rows interleaved (column 2j is proj channel h0 + j, column 2j + 1 its gate), so each wgmma is
    twice as wide (N = 2·BLOCK_H) and there are half as many; the accumulator is then split
    into its even and odd columns (reshape [BLOCK_M, BLOCK_H, 2] + split: adjacent columns sit
    in the same thread of an MMA accumulator, so no data moves)."""
    cols = tl.arange(0, BLOCK_C)
    c_ok = cols < C
    base = AB + b * (H * NN)
    jj = tl.arange(0, 2 * BLOCK_H)
    is_g = (jj % 2) == 1
    is_p = (jj % 2) == 0
    for h0 in range(0, H, BLOCK_H):
        hp = h0 + jj // 2                                  # the channel of interleaved column jj
        hp_ok = hp < H
        # [BLOCK_C, 2·BLOCK_H] transposed weight tile, columns alternating W_p / W_g rows (two
        # disjointly masked loads, both from L2, merged by a select).
        w_ok = c_ok[:, None] & hp_ok[None, :]
        wpt = tl.load(W_P + hp[None, :] * C + cols[:, None], mask=w_ok & is_p[None, :], other=0.0)
        wgt = tl.load(W_G + hp[None, :] * C + cols[:, None], mask=w_ok & is_g[None, :], other=0.0)
        wt = tl.where(is_g[None, :], wgt.to(x1.dtype), wpt.to(x1.dtype))
        bp = tl.load(B_P + hp, mask=hp_ok & is_p, other=0.0).to(tl.float32)
        bg = tl.load(B_G + hp, mask=hp_ok & is_g, other=0.0).to(tl.float32)
        u = tl.dot(x1, wt, input_precision=PRECISION) + (bp + bg)[None, :]   # [BLOCK_M, 2·BLOCK_H]
        up, ug = tl.split(tl.reshape(u, (x1.shape[0], BLOCK_H, 2)))
        v = tl.sigmoid(ug) * up
        if HAS_MASK:
            v = v * mk[:, None]
        hh = h0 + tl.arange(0, BLOCK_H)
        tl.store(base + hh[None, :].to(tl.int64) * NN + rs[:, None], v.to(AB.dtype.element_ty),
                 mask=r_ok[:, None] & (hh < H)[None, :])


@triton.jit
def _proj_half_cols(x1t, mk, b, rs, r_ok, W_P, W_G, B_P, B_G, AB, NN,
                    C: tl.constexpr, H: tl.constexpr, HAS_MASK: tl.constexpr, PRECISION: tl.constexpr,
                    BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr):
    cols = tl.arange(0, BLOCK_C)
    c_ok = cols < C
    base = AB + b * (H * NN)
    for h0 in range(0, H, BLOCK_H):
        hh = h0 + tl.arange(0, BLOCK_H)
        h_ok = hh < H
        w_ok = h_ok[:, None] & c_ok[None, :]
        # [BLOCK_H, BLOCK_C] tiles of the [H, C] weights (row-major, as nn.Linear stores them).
        wp = tl.load(W_P + hh[:, None] * C + cols[None, :], mask=w_ok, other=0.0).to(x1t.dtype)
        wg = tl.load(W_G + hh[:, None] * C + cols[None, :], mask=w_ok, other=0.0).to(x1t.dtype)
        bp = tl.load(B_P + hh, mask=h_ok, other=0.0).to(tl.float32)
        bg = tl.load(B_G + hh, mask=h_ok, other=0.0).to(tl.float32)
        up = tl.dot(wp, x1t, input_precision=PRECISION) + bp[:, None]   # [BLOCK_H, BLOCK_M]
        ug = tl.dot(wg, x1t, input_precision=PRECISION) + bg[:, None]
        v = tl.sigmoid(ug) * up
        if HAS_MASK:
            v = v * mk[None, :]
        tl.store(base + hh[:, None].to(tl.int64) * NN + rs[None, :], v.to(AB.dtype.element_ty),
                 mask=h_ok[:, None] & r_ok[None, :])


@triton.jit
def _trimul_proj_kernel(Z, MASK, LNW, LNB, WAP, WBP, WAG, WBG, BAP, BBP, BAG, BBG, AB, MEAN, RSTD,
                        NN, TILES_B, TOTAL, BHNN, eps,
                        C: tl.constexpr, H: tl.constexpr, HAS_MASK: tl.constexpr, PRECISION: tl.constexpr,
                        BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, TILES: tl.constexpr,
                        ROWS: tl.constexpr):
    # Program pid handles tiles pid, pid + P, pid + 2P, ... below TOTAL (P programs; concurrent
    # programs work on neighbouring tiles). Each tile: reads BLOCK_M·C of z (once) and BLOCK_M
    # mask values; writes BLOCK_M·2H of a/b channel-major and 2 fp32 statistics a row. With
    # TILES > 1 the next tile's z and mask loads are issued before this tile's LN and GEMMs, so
    # the HBM latency of one tile overlaps the math of the previous one.
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_C)
    c_ok = cols < C
    w = tl.load(LNW + cols, mask=c_ok, other=0.0).to(tl.float32)
    b1 = tl.load(LNB + cols, mask=c_ok, other=0.0).to(tl.float32)
    x_n, mk_n = _proj_load(Z, MASK, pid, TILES_B, TOTAL, NN, C, HAS_MASK, BLOCK_C, BLOCK_M)
    for i in range(TILES):
        t = pid + i * nprog
        if t < TOTAL:                                     # TILES is rounded up: skip the excess
            x_c, mk_c = x_n, mk_n
            if TILES > 1:
                x_n, mk_n = _proj_load(Z, MASK, t + nprog, TILES_B, TOTAL, NN, C, HAS_MASK, BLOCK_C, BLOCK_M)
            b, rs, r_ok, rows = _tile_rows(t, TILES_B, TOTAL, NN, BLOCK_M)
            zc_ok = r_ok[:, None] & c_ok[None, :]
            _, x1, mean, rstd = _ln_rows(x_c.to(tl.float32), zc_ok, w, b1, C, eps)
            tl.store(MEAN + rows, mean, mask=r_ok)
            tl.store(RSTD + rows, rstd, mask=r_ok)
            if ROWS != 0:
                xo = x1.to(Z.dtype.element_ty)                # [BLOCK_M, BLOCK_C]: the GEMMs' left operand
            else:
                xo = tl.trans(x1.to(Z.dtype.element_ty))      # [BLOCK_C, BLOCK_M]: the GEMMs' right operand
            _proj_half(xo, mk_c, b, rs, r_ok, WAP, WAG, BAP, BAG, AB, NN, C, H, HAS_MASK, PRECISION,
                       BLOCK_C, BLOCK_H, ROWS)
            _proj_half(xo, mk_c, b, rs, r_ok, WBP, WBG, BBP, BBG, AB + BHNN, NN, C, H, HAS_MASK, PRECISION,
                       BLOCK_C, BLOCK_H, ROWS)


@triton.jit
def _out_load(P, Z, MEAN, RSTD, t, TILES_B, TOTAL, NN, C: tl.constexpr, H: tl.constexpr,
              BLOCK_C: tl.constexpr, BLOCK_HF: tl.constexpr, BLOCK_M: tl.constexpr):
    """Raw loads of tile t for the output kernels: the p^T tile [H, BLOCK_M] (channel-major, so
    contiguous along the pairs: a coalesced read), the z rows and their LN statistics. Both big
    loads are issued together, before any math."""
    b, rs, r_ok, rows = _tile_rows(t, TILES_B, TOTAL, NN, BLOCK_M)
    hh = tl.arange(0, BLOCK_HF)
    cols = tl.arange(0, BLOCK_C)
    pt = tl.load(P + b * (H * NN) + hh[:, None].to(tl.int64) * NN + rs[None, :],
                 mask=(hh < H)[:, None] & r_ok[None, :], other=0.0)
    x = tl.load(Z + rows[:, None] * C + cols[None, :], mask=r_ok[:, None] & (cols < C)[None, :], other=0.0)
    mean1 = tl.load(MEAN + rows, mask=r_ok, other=0.0)
    rstd1 = tl.load(RSTD + rows, mask=r_ok, other=0.0)
    return pt, x, mean1, rstd1


@triton.jit
def _out_math(pt, x, mean1, rstd1, r_ok, LN1W, LN1B, LN2W, LN2B, WO, BO, WGO, BGO, eps2,
              C: tl.constexpr, H: tl.constexpr, PRECISION: tl.constexpr,
              BLOCK_C: tl.constexpr, BLOCK_HF: tl.constexpr):
    """LN(p) from a channel-major tile, the output projection o = LN(p) W_o^T + b_o, and the
    gate g = sigmoid(LN(z) W_g^T + b_g) (shared by the output kernel and its backward)."""
    hh = tl.arange(0, BLOCK_HF)
    h_ok = hh < H
    cols = tl.arange(0, BLOCK_C)
    c_ok = cols < C
    pt_ok = h_ok[:, None] & r_ok[None, :]
    ptf = pt.to(tl.float32)
    mean2 = tl.sum(ptf, axis=0) / H
    pc = tl.where(pt_ok, ptf - mean2[None, :], 0.0)
    var2 = tl.sum(pc * pc, axis=0) / H
    rstd2 = 1.0 / tl.sqrt(var2 + eps2)
    yhat_t = pc * rstd2[None, :]                         # [H, BLOCK_M]
    w2 = tl.load(LN2W + hh, mask=h_ok, other=0.0).to(tl.float32)
    b2 = tl.load(LN2B + hh, mask=h_ok, other=0.0).to(tl.float32)
    y_t = (yhat_t * w2[:, None] + b2[:, None]).to(pt.dtype)
    # W_o is [C, H] row-major; its transpose as a [H, C] tile.
    wo_t = tl.load(WO + cols[None, :] * H + hh[:, None], mask=h_ok[:, None] & c_ok[None, :],
                   other=0.0).to(y_t.dtype)
    bo = tl.load(BO + cols, mask=c_ok, other=0.0).to(tl.float32)
    o = tl.dot(tl.trans(y_t), wo_t, input_precision=PRECISION) + bo[None, :]        # [BLOCK_M, C]
    zc_ok = r_ok[:, None] & c_ok[None, :]
    w1 = tl.load(LN1W + cols, mask=c_ok, other=0.0).to(tl.float32)
    b1 = tl.load(LN1B + cols, mask=c_ok, other=0.0).to(tl.float32)
    x1 = (tl.where(zc_ok, (x.to(tl.float32) - mean1[:, None]) * rstd1[:, None], 0.0) * w1[None, :] + b1[None, :])
    # W_g is [C, C] row-major; its transpose as a tile: wg_t[k, c] = W_g[c, k].
    wg_t = tl.load(WGO + cols[None, :] * C + cols[:, None], mask=c_ok[:, None] & c_ok[None, :],
                   other=0.0).to(y_t.dtype)
    bg = tl.load(BGO + cols, mask=c_ok, other=0.0).to(tl.float32)
    g = tl.sigmoid(tl.dot(x1.to(y_t.dtype), wg_t, input_precision=PRECISION) + bg[None, :])
    return hh, h_ok, cols, c_ok, zc_ok, yhat_t, y_t, rstd2, w2, o, g


@triton.jit
def _out_cols(pt, x, mean1, rstd1, rows, r_ok, LN1W, LN1B, LN2W, LN2B, WO, BO, WGO, BGO, OUT, eps2,
              C: tl.constexpr, H: tl.constexpr, PRECISION: tl.constexpr,
              BLOCK_C: tl.constexpr, BLOCK_HF: tl.constexpr, BLOCK_N: tl.constexpr):
    """The output kernel's math with the C output channels in BLOCK_N-wide blocks: LN(p) and
    LN(z) are formed once, rounded to the GEMM dtype (half the registers of fp32 tiles), then each
    block is two [BLOCK_M, BLOCK_N] GEMMs (W_o and W_g column blocks), the gating, and its store.
    Live state is two operand tiles and two BLOCK_N-wide fp32 accumulators instead of the fused
    form's full-width fp32 o, g, LN(z) and LN(p): fewer registers a thread (larger tiles or more
    programs an SM), and one block's store is in flight while the next block's GEMMs run."""
    hh = tl.arange(0, BLOCK_HF)
    h_ok = hh < H
    cols = tl.arange(0, BLOCK_C)
    c_ok = cols < C
    ptf = pt.to(tl.float32)
    mean2 = tl.sum(ptf, axis=0) / H
    pc = tl.where(h_ok[:, None] & r_ok[None, :], ptf - mean2[None, :], 0.0)
    rstd2 = 1.0 / tl.sqrt(tl.sum(pc * pc, axis=0) / H + eps2)
    w2 = tl.load(LN2W + hh, mask=h_ok, other=0.0).to(tl.float32)
    b2 = tl.load(LN2B + hh, mask=h_ok, other=0.0).to(tl.float32)
    y = tl.trans((pc * rstd2[None, :] * w2[:, None] + b2[:, None]).to(pt.dtype))     # [BLOCK_M, H]
    w1 = tl.load(LN1W + cols, mask=c_ok, other=0.0).to(tl.float32)
    b1 = tl.load(LN1B + cols, mask=c_ok, other=0.0).to(tl.float32)
    x1 = (tl.where(r_ok[:, None] & c_ok[None, :], (x.to(tl.float32) - mean1[:, None]) * rstd1[:, None], 0.0)
          * w1[None, :] + b1[None, :]).to(pt.dtype)                                   # [BLOCK_M, C]
    for n0 in range(0, C, BLOCK_N):
        nn = n0 + tl.arange(0, BLOCK_N)
        n_ok = nn < C
        wo_t = tl.load(WO + nn[None, :] * H + hh[:, None], mask=h_ok[:, None] & n_ok[None, :],
                       other=0.0).to(pt.dtype)                                         # [H, BLOCK_N]
        wg_t = tl.load(WGO + nn[None, :] * C + cols[:, None], mask=c_ok[:, None] & n_ok[None, :],
                       other=0.0).to(pt.dtype)                                         # [C, BLOCK_N]
        bo = tl.load(BO + nn, mask=n_ok, other=0.0).to(tl.float32)
        bg = tl.load(BGO + nn, mask=n_ok, other=0.0).to(tl.float32)
        o = tl.dot(y, wo_t, input_precision=PRECISION) + bo[None, :]
        g = tl.sigmoid(tl.dot(x1, wg_t, input_precision=PRECISION) + bg[None, :])
        tl.store(OUT + rows[:, None] * C + nn[None, :], (g * o).to(OUT.dtype.element_ty),
                 mask=r_ok[:, None] & n_ok[None, :])


@triton.jit
def _trimul_out_kernel(P, Z, MEAN, RSTD, LN1W, LN1B, LN2W, LN2B, WO, BO, WGO, BGO, OUT,
                       NN, TILES_B, TOTAL, eps2,
                       C: tl.constexpr, H: tl.constexpr, PRECISION: tl.constexpr,
                       BLOCK_C: tl.constexpr, BLOCK_HF: tl.constexpr, BLOCK_M: tl.constexpr,
                       TILES: tl.constexpr, BLOCK_N: tl.constexpr):
    # Each tile: reads BLOCK_M·H of p and BLOCK_M·C of z, writes BLOCK_M·C of the output. LN(p),
    # the projection and the gate never leave registers. Tiles as in _trimul_proj_kernel (the
    # next tile's p, z and statistics are in flight while this tile computes).
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    pt_n, x_n, m_n, r_n = _out_load(P, Z, MEAN, RSTD, pid, TILES_B, TOTAL, NN, C, H, BLOCK_C, BLOCK_HF, BLOCK_M)
    for i in range(TILES):
        t = pid + i * nprog
        if t < TOTAL:                                     # TILES is rounded up: skip the excess
            pt_c, x_c, m_c, r_c = pt_n, x_n, m_n, r_n
            if TILES > 1:
                pt_n, x_n, m_n, r_n = _out_load(P, Z, MEAN, RSTD, t + nprog, TILES_B, TOTAL, NN, C, H, BLOCK_C,
                                                BLOCK_HF, BLOCK_M)
            b, rs, r_ok, rows = _tile_rows(t, TILES_B, TOTAL, NN, BLOCK_M)
            if BLOCK_N < BLOCK_C:                         # column-blocked epilogue (config BLOCK_H < C)
                _out_cols(pt_c, x_c, m_c, r_c, rows, r_ok, LN1W, LN1B, LN2W, LN2B, WO, BO, WGO, BGO, OUT, eps2,
                          C, H, PRECISION, BLOCK_C, BLOCK_HF, BLOCK_N)
            else:
                hh, h_ok, cols, c_ok, zc_ok, yhat_t, y_t, rstd2, w2, o, g = _out_math(
                    pt_c, x_c, m_c, r_c, r_ok, LN1W, LN1B, LN2W, LN2B, WO, BO, WGO, BGO, eps2,
                    C, H, PRECISION, BLOCK_C, BLOCK_HF)
                tl.store(OUT + rows[:, None] * C + cols[None, :], (g * o).to(OUT.dtype.element_ty), mask=zc_ok)


@triton.jit
def _trimul_out_bwd_kernel(P, Z, MEAN, RSTD, LN1W, LN1B, LN2W, LN2B, WO, BO, WGO, BGO, DOUT,
                           DP, DO, Y, DU, PART,
                           NN, TILES_B, TOTAL, eps2, LD_DU, GATE_OFF, LD_PART,
                           C: tl.constexpr, H: tl.constexpr, PRECISION: tl.constexpr,
                           BLOCK_C: tl.constexpr, BLOCK_HF: tl.constexpr, BLOCK_M: tl.constexpr):
    # One program: tile t = program_id(0). Reads p (H), z (C) and dout (C) a row; writes dp (H,
    # channel-major), do (C), LN(p) (H) and dgate (C) a row, and one fp32 partial row
    # PART[t] = [LN_out dweight (H) | LN_out dbias (H) | d out_bias (C) | d gate_bias (C)]:
    # the bias gradients are column sums over all rows, folded in here instead of a separate
    # reduction over do and dgate.
    t = tl.program_id(0)
    b, rs, r_ok, rows = _tile_rows(t, TILES_B, TOTAL, NN, BLOCK_M)
    pt, x, mean1, rstd1 = _out_load(P, Z, MEAN, RSTD, t, TILES_B, TOTAL, NN, C, H, BLOCK_C, BLOCK_HF, BLOCK_M)
    hh, h_ok, cols, c_ok, zc_ok, yhat_t, y_t, rstd2, w2, o, g = _out_math(
        pt, x, mean1, rstd1, r_ok, LN1W, LN1B, LN2W, LN2B, WO, BO, WGO, BGO, eps2,
        C, H, PRECISION, BLOCK_C, BLOCK_HF)
    dout = tl.load(DOUT + rows[:, None] * C + cols[None, :], mask=zc_ok, other=0.0).to(tl.float32)
    # 0 outside the tile's rows and channels: the gate there is sigmoid of 0 * (LN(z), which may hold
    # ±inf) = NaN, and 0 * NaN would reach real entries through the products and sums below (eager
    # forms no such lanes).
    do = tl.where(zc_ok, dout * g, 0.0)
    dgate = tl.where(zc_ok, dout * o * g * (1.0 - g), 0.0)
    do_c = do.to(y_t.dtype)
    tl.store(DO + rows[:, None] * C + cols[None, :], do_c, mask=zc_ok)
    tl.store(DU + rows[:, None] * LD_DU + GATE_OFF + cols[None, :], dgate.to(DU.dtype.element_ty), mask=zc_ok)
    pt_ok = h_ok[:, None] & r_ok[None, :]
    tl.store(Y + rows[None, :] * H + hh[:, None], y_t, mask=pt_ok)
    # dLN(p)^T [H, BLOCK_M] = W_o^T · do^T   (W_o [C, H] row-major, read as an [H, C] tile).
    wo_t = tl.load(WO + cols[None, :] * H + hh[:, None], mask=h_ok[:, None] & c_ok[None, :],
                   other=0.0).to(y_t.dtype)
    dy_t = tl.dot(wo_t, tl.trans(do_c), input_precision=PRECISION)
    prow = PART + t.to(tl.int64) * LD_PART
    # The column sums over the tile's rows leave out the padded rows: there dy is 0 * W_o (NaN
    # where W_o holds ±inf).
    tl.store(prow + hh, tl.sum(tl.where(pt_ok, dy_t * yhat_t, 0.0), axis=1), mask=h_ok)
    tl.store(prow + H + hh, tl.sum(tl.where(pt_ok, dy_t, 0.0), axis=1), mask=h_ok)
    tl.store(prow + 2 * H + cols, tl.sum(do, axis=0), mask=c_ok)
    tl.store(prow + 2 * H + C + cols, tl.sum(dgate, axis=0), mask=c_ok)
    # LayerNorm backward over the channels (axis 0): dp = rstd·(dŷ − mean(dŷ) − ŷ·mean(ŷ·dŷ)).
    dyh = dy_t * w2[:, None]
    c1 = tl.sum(yhat_t * dyh, axis=0) / H
    c2 = tl.sum(dyh, axis=0) / H
    dp_t = (dyh - (yhat_t * c1[None, :] + c2[None, :])) * rstd2[None, :]
    tl.store(DP + b * (H * NN) + hh[:, None].to(tl.int64) * NN + rs[None, :], dp_t.to(DP.dtype.element_ty),
             mask=pt_ok)


@triton.jit
def _proj_bwd_half(x1, x1t, mk, rows, rs, r_ok, b, dx1, W_P, W_G, B_P, B_G, DAB, DU, prow, NN, LD_DU,
                   HALF: tl.constexpr, C: tl.constexpr, H: tl.constexpr, HAS_MASK: tl.constexpr,
                   PRECISION: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr):
    """Backward of one of a / b for one tile: recompute the projections, form the gradients of
    the two pre-activations, store them into du, accumulate dLN(z) and the bias partial sums."""
    cols = tl.arange(0, BLOCK_C)
    c_ok = cols < C
    base = DAB + b * (H * NN)
    for h0 in range(0, H, BLOCK_H):
        hh = h0 + tl.arange(0, BLOCK_H)
        h_ok = hh < H
        w_ok = h_ok[:, None] & c_ok[None, :]
        wp = tl.load(W_P + hh[:, None] * C + cols[None, :], mask=w_ok, other=0.0).to(x1.dtype)
        wg = tl.load(W_G + hh[:, None] * C + cols[None, :], mask=w_ok, other=0.0).to(x1.dtype)
        bp = tl.load(B_P + hh, mask=h_ok, other=0.0).to(tl.float32)
        bg = tl.load(B_G + hh, mask=h_ok, other=0.0).to(tl.float32)
        up = tl.dot(wp, x1t, input_precision=PRECISION) + bp[:, None]      # [BLOCK_H, BLOCK_M]
        sg = tl.sigmoid(tl.dot(wg, x1t, input_precision=PRECISION) + bg[:, None])
        ht_ok = h_ok[:, None] & r_ok[None, :]
        dab = tl.load(base + hh[:, None].to(tl.int64) * NN + rs[None, :], mask=ht_ok, other=0.0).to(tl.float32)
        if HAS_MASK:
            dab = dab * mk[None, :]
        dup_f = dab * sg                                   # d(proj pre-activation)
        dug_f = dab * up * sg * (1.0 - sg)                 # d(gate pre-activation)
        ch = HALF * H + hh                                 # column in du's [a | b] blocks
        tl.store(prow + 2 * C + ch, tl.sum(dup_f, axis=1), mask=h_ok)
        tl.store(prow + 2 * C + 2 * H + ch, tl.sum(dug_f, axis=1), mask=h_ok)
        dup = dup_f.to(x1.dtype)
        dug = dug_f.to(x1.dtype)
        tl.store(DU + rows[None, :] * LD_DU + ch[:, None], dup, mask=ht_ok)
        tl.store(DU + rows[None, :] * LD_DU + 2 * H + ch[:, None], dug, mask=ht_ok)
        dx1 += tl.dot(tl.trans(dup), wp, input_precision=PRECISION)
        dx1 += tl.dot(tl.trans(dug), wg, input_precision=PRECISION)
    return dx1


@triton.jit
def _trimul_proj_bwd_kernel(Z, MASK, MEAN, RSTD, LNW, LNB, WAP, WBP, WAG, WBG, BAP, BBP, BAG, BBG, WGO,
                            DAB, DU, X1, DZ, PART,
                            NN, TILES_B, TOTAL, BHNN, LD_DU, LD_PART,
                            C: tl.constexpr, H: tl.constexpr, HAS_MASK: tl.constexpr, PRECISION: tl.constexpr,
                            BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr):
    # One program: tile t = program_id(0). Reads z (C), dA/dB (2H, channel-major), dgate (C) and
    # the mask a row; writes du's 4H pre-activation gradients, LN(z) (C) and dz (C) a row, and one
    # fp32 partial row PART[t] = [LN_in dweight (C) | LN_in dbias (C) | d(a, b proj bias) (2H) |
    # d(a, b gate bias) (2H)]. dLN(z) = du · W_cat stays in registers.
    t = tl.program_id(0)
    b, rs, r_ok, rows = _tile_rows(t, TILES_B, TOTAL, NN, BLOCK_M)
    cols = tl.arange(0, BLOCK_C)
    c_ok = cols < C
    zc_ok = r_ok[:, None] & c_ok[None, :]
    x = tl.load(Z + rows[:, None] * C + cols[None, :], mask=zc_ok, other=0.0).to(tl.float32)
    mean = tl.load(MEAN + rows, mask=r_ok, other=0.0)
    rstd = tl.load(RSTD + rows, mask=r_ok, other=0.0)
    w1 = tl.load(LNW + cols, mask=c_ok, other=0.0).to(tl.float32)
    b1 = tl.load(LNB + cols, mask=c_ok, other=0.0).to(tl.float32)
    xhat = tl.where(zc_ok, (x - mean[:, None]) * rstd[:, None], 0.0)
    x1 = (xhat * w1[None, :] + b1[None, :]).to(Z.dtype.element_ty)
    tl.store(X1 + rows[:, None] * C + cols[None, :], x1, mask=zc_ok)
    x1t = tl.trans(x1)
    if HAS_MASK:
        mk = tl.load(MASK + rows, mask=r_ok, other=0.0).to(tl.float32)
    else:
        mk = tl.full([BLOCK_M], 1.0, tl.float32)
    prow = PART + t.to(tl.int64) * LD_PART
    dx1 = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    dx1 = _proj_bwd_half(x1, x1t, mk, rows, rs, r_ok, b, dx1, WAP, WAG, BAP, BAG, DAB, DU, prow, NN, LD_DU,
                         0, C, H, HAS_MASK, PRECISION, BLOCK_C, BLOCK_H)
    dx1 = _proj_bwd_half(x1, x1t, mk, rows, rs, r_ok, b, dx1, WBP, WBG, BBP, BBG, DAB + BHNN, DU, prow, NN, LD_DU,
                         1, C, H, HAS_MASK, PRECISION, BLOCK_C, BLOCK_H)
    dgate = tl.load(DU + rows[:, None] * LD_DU + 4 * H + cols[None, :], mask=zc_ok, other=0.0).to(x1.dtype)
    wgo = tl.load(WGO + cols[:, None] * C + cols[None, :], mask=c_ok[:, None] & c_ok[None, :],
                  other=0.0).to(x1.dtype)
    dx1 += tl.dot(dgate, wgo, input_precision=PRECISION)
    tl.store(prow + cols, tl.sum(dx1 * xhat, axis=0), mask=c_ok)
    tl.store(prow + C + cols, tl.sum(dx1, axis=0), mask=c_ok)
    dxh = dx1 * w1[None, :]
    c1 = tl.sum(xhat * dxh, axis=1) / C
    c2 = tl.sum(dxh, axis=1) / C
    dz = (dxh - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
    tl.store(DZ + rows[:, None] * C + cols[None, :], dz.to(DZ.dtype.element_ty), mask=zc_ok)


def _bmm_configs() -> list[triton.Config]:
    """Batched-GEMM tiles: the usual Hopper bf16 GEMM shapes (128x128 / 128x256 output tiles,
    64-deep K steps, 3-4 shared-memory stages, grouped row blocks for L2 reuse)."""
    if interpreting():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2}, num_warps=4,
                              num_stages=1)]
    shapes = [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 128, 64, 4, 4), (64, 64, 32, 4, 2)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=w, num_stages=st)
            for m, n, k, w, st in shapes]


@triton.autotune(configs=_bmm_configs(), key=["N"])
@triton.jit
def _trimul_bmm_kernel(X, Y, OUT, sxb, sxm, sxk, syb, syk, syn,
                       N: tl.constexpr, PRECISION: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # OUT[c] = X[c] @ Y[c] for one channel matrix c = program_id(1) (N x N x N, any operand
    # strides, so transposed views cost nothing). Reads (N/BLOCK_N + N/BLOCK_M)·N² elements per
    # channel (mostly L2 hits thanks to the grouped order), writes N². N is a compile-time
    # constant: the interpreter cannot loop to a run-time bound, and the autotuner keys on N anyway.
    pid = tl.program_id(0)
    c = tl.program_id(1).to(tl.int64)
    num_m = tl.cdiv(N, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pm = first_m + (pid % per_group) % group_size
    pn = (pid % per_group) // group_size
    offs_m = pm * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < N
    n_ok = offs_n < N
    x_base = X + c * sxb
    y_base = Y + c * syb
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, N, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < N
        x = tl.load(x_base + offs_m[:, None] * sxm + offs_k[None, :] * sxk, mask=m_ok[:, None] & k_ok[None, :],
                    other=0.0)
        y = tl.load(y_base + offs_k[:, None] * syk + offs_n[None, :] * syn, mask=k_ok[:, None] & n_ok[None, :],
                    other=0.0)
        acc = tl.dot(x, y, acc, input_precision=PRECISION)
    tl.store(OUT + c * (N * N) + offs_m[:, None] * N + offs_n[None, :], acc.to(OUT.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


# --------------------------------------------------------------------------- launch helpers
def _precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: TF32 only for fp32 when the user allowed it (as cuBLAS does)."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee" if dtype == torch.float32 else "tf32"  # ignored for fp16 / bf16 operands


def _tune_key(B: int, NN: int, C: int, H: int, dt: torch.dtype, extra) -> tuple:
    return (_np2(B * NN), C, H, dt, extra)


# (kind, config values, C, H, dtype, has_mask, precision) -> the launch's keyword arguments (constexprs
# and launch options): built once, so a launch spends no host time assembling them.
_KW: dict[tuple, dict] = {}


def _launch_kw(kind: str, cfg: dict, C: int, H: int, dt: torch.dtype, has_mask: bool) -> dict:
    prec = _precision(dt)
    key = (kind, tuple(cfg.values()), C, H, dt, has_mask, prec)
    kw = _KW.get(key)
    if kw is None:
        kw = dict(C=C, H=H, BLOCK_C=max(16, _np2(C)), BLOCK_M=cfg["BLOCK_M"], PRECISION=prec,
                  num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        if kind in ("proj", "proj_bwd"):
            kw.update(HAS_MASK=has_mask, BLOCK_H=cfg["BLOCK_H"])
        else:
            kw.update(BLOCK_HF=max(16, _np2(H)))
        if kind == "out":      # output-channel block of the forward output kernel: >= BLOCK_C = one block
            kw.update(BLOCK_N=min(cfg["BLOCK_H"], kw["BLOCK_C"]))
        if kind == "proj":
            kw.update(ROWS=cfg.get("ROWS", 0))
        _KW[key] = kw
    return kw


_PRODUCTS = ("cublas", "triton")


def _bmm(x: torch.Tensor, y: torch.Tensor, out: torch.Tensor, product: str) -> torch.Tensor:
    """out[c] = x[c] @ y[c] over [B·H, N, N] channel matrices (x, y possibly transposed views)."""
    if product == "cublas":
        return torch.bmm(x, y, out=out)
    n = x.shape[-1]
    note_launch("trimul_bmm")
    _trimul_bmm_kernel[lambda meta: (_cdiv(n, meta["BLOCK_M"]) * _cdiv(n, meta["BLOCK_N"]), x.shape[0])](
        x, y, out, *x.stride(), *y.stride(), N=n, PRECISION=_precision(x.dtype))
    return out


# Parameter order of the canonical argument list (forward's inputs after z and the mask).
_PARAM_ORDER = ("ln_in_weight", "ln_in_bias", "a_proj_weight", "b_proj_weight", "a_gate_weight", "b_gate_weight",
                "a_proj_bias", "b_proj_bias", "a_gate_bias", "b_gate_bias", "gate_weight", "gate_bias",
                "ln_out_weight", "ln_out_bias", "out_weight", "out_bias")
_CONST_VALUE = {"ln_in_weight": 1.0, "ln_out_weight": 1.0}   # absent LN weights are ones, other absents zeros
_CONSTS: dict[tuple, torch.Tensor] = {}


def _const(n: int, value: float, device: torch.device) -> torch.Tensor:
    """A cached read-only fp32 vector standing in for an absent bias / LayerNorm affine: created
    once per (size, value, device), never written (the kernels only read it; it takes no grad)."""
    key = (n, value, device)
    t = _CONSTS.get(key)
    if t is None:
        t = _CONSTS[key] = torch.full((n,), value, dtype=torch.float32, device=device)
    return t


# Size of each parameter vector in _PARAM_ORDER as (uses C, uses H): for the absent-parameter constants.
_VEC_DIM = ("C", "C", None, None, None, None, "H", "H", "H", "H", None, "C", "H", "H", None, "C")


def _filled(ps, C: int, H: int, device) -> list:
    """The 16 parameters with cached constants in place of the absent ones (contiguous)."""
    out = []
    for n, d, t in zip(_PARAM_ORDER, _VEC_DIM, ps):
        if t is None:
            t = _const(C if d == "C" else H, _CONST_VALUE.get(n, 0.0), device)
        elif not t.is_contiguous():
            t = t.contiguous()
        out.append(t)
    return out


def _launch_proj(cfg, z4, mask3, ps, ab, mean, rstd, eps1):
    B, N, _, C = z4.shape
    H = ps[2].shape[0]
    NN = N * N
    tiles_b = _cdiv(NN, cfg["BLOCK_M"])
    total = B * tiles_b
    progs, tiles = _persistent_grid(total, cfg, z4.device)
    _trimul_proj_kernel[(progs,)](
        z4, mask3 if mask3 is not None else z4, *ps[:10], ab, mean, rstd,
        NN, tiles_b, total, B * H * NN, eps1, TILES=tiles, **_launch_kw("proj", cfg, C, H, z4.dtype, mask3 is not None))


def _launch_out(cfg, p, z4, mean, rstd, ps, out, eps2):
    B, N, _, C = z4.shape
    H = ps[2].shape[0]
    NN = N * N
    tiles_b = _cdiv(NN, cfg["BLOCK_M"])
    total = B * tiles_b
    progs, tiles = _persistent_grid(total, cfg, z4.device)
    _trimul_out_kernel[(progs,)](
        p, z4, mean, rstd, ps[0], ps[1], ps[12], ps[13], ps[14], ps[15], ps[10], ps[11], out, NN, tiles_b, total,
        eps2, TILES=tiles, **_launch_kw("out", cfg, C, H, z4.dtype, False))


def _part_width(kind: str, C: int, H: int) -> int:
    return 2 * H + 2 * C if kind == "out_bwd" else 2 * C + 4 * H


def _launch_out_bwd(cfg, p, z4, mean, rstd, ps, dout, dp, do, y, du, part, eps2):
    """part: fp32 [B · cdiv(NN, BLOCK_M), 2H + 2C] partial sums (one row a program)."""
    B, N, _, C = z4.shape
    H = ps[2].shape[0]
    NN = N * N
    tiles_b = _cdiv(NN, cfg["BLOCK_M"])
    total = B * tiles_b
    _trimul_out_bwd_kernel[(total,)](
        p, z4, mean, rstd, ps[0], ps[1], ps[12], ps[13], ps[14], ps[15], ps[10], ps[11], dout, dp, do, y, du, part,
        NN, tiles_b, total, eps2, du.shape[1], 4 * H, part.shape[1],
        **_launch_kw("out_bwd", cfg, C, H, z4.dtype, False))


def _launch_proj_bwd(cfg, z4, mask3, mean, rstd, ps, dab, du, x1, dz, part):
    """part: fp32 [B · cdiv(NN, BLOCK_M), 2C + 4H] partial sums (one row a program)."""
    B, N, _, C = z4.shape
    H = ps[2].shape[0]
    NN = N * N
    tiles_b = _cdiv(NN, cfg["BLOCK_M"])
    total = B * tiles_b
    _trimul_proj_bwd_kernel[(total,)](
        z4, mask3 if mask3 is not None else z4, mean, rstd, *ps[:11],
        dab, du, x1, dz, part, NN, tiles_b, total, B * H * NN, du.shape[1], part.shape[1],
        **_launch_kw("proj_bwd", cfg, C, H, z4.dtype, mask3 is not None))


def _part_buffer(kind: str, cfg: dict, B: int, NN: int, C: int, H: int, device) -> torch.Tensor:
    return torch.empty((B * _cdiv(NN, cfg["BLOCK_M"]), _part_width(kind, C, H)), dtype=torch.float32,
                       device=device)


def _forward(z4, mask3, ps, eps1, eps2, outgoing, product, keep):
    """Run the three forward stages on canonical inputs (``ps``: the 16 parameters, constants
    filled in); returns out and (if keep) the saved tensors."""
    B, N, _, C = z4.shape
    H = ps[2].shape[0]
    NN = N * N
    dev, dt = z4.device, z4.dtype
    stats = torch.empty((2, B * NN), dtype=torch.float32, device=dev)   # one allocation: mean, rstd
    mean, rstd = stats.unbind(0)
    ab = torch.empty((2, B * H, N, N), dtype=dt, device=dev)
    key = _tune_key(B, NN, C, H, dt, mask3 is not None)
    note_launch("trimul_proj")
    cfg = _TUNED.get(("proj", *key)) if not _FORCED else None
    if cfg is None:
        cfg = _pick("proj", key, lambda c: _launch_proj(c, z4, mask3, ps, ab, mean, rstd, eps1))
    _launch_proj(cfg, z4, mask3, ps, ab, mean, rstd, eps1)
    p = torch.empty((B * H, N, N), dtype=dt, device=dev)
    a, b = ab.unbind(0)
    if outgoing:                                              # P_c = A_c B_c^T
        _bmm(a, b.transpose(1, 2), p, product)
    else:                                                     # P_c = A_c^T B_c
        _bmm(a.transpose(1, 2), b, p, product)
    del a, b
    if not keep:
        del ab
        ab = None
    out = torch.empty((B, N, N, C), dtype=dt, device=dev)
    note_launch("trimul_out")
    cfg = _TUNED.get(("out", *key)) if not _FORCED else None
    if cfg is None:
        cfg = _pick("out", key, lambda c: _launch_out(c, p, z4, mean, rstd, ps, out, eps2))
    _launch_out(cfg, p, z4, mean, rstd, ps, out, eps2)
    return out, (ab, p, mean, rstd)


def _wgrad(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a^T b: on the GPU one cuBLAS GEMM in the operands' dtype (fp32 accumulation, one rounding
    to the output: what the module's own bf16 weight gradient gets); on the CPU (interpreter
    tests) upcast so the reduction over all rows is not rounded on the way."""
    if a.device.type == "cpu":
        return a.float().t() @ b.float()
    return a.t() @ b


# Where each parameter's gradient comes from, in _PARAM_ORDER: (source, piece). Sources: 0 = the
# partial sums of trimul_proj_bwd, split [C, C, H, H, H, H] = [dLN_in.w | dLN_in.b | d(a_p, b_p, a_g,
# b_g) biases]; 1 = those of trimul_out_bwd, split [H, H, C, C] = [dLN_out.w | dLN_out.b | d out bias |
# d gate bias]; 2 = du^T LN(z), split [H, H, H, H, C] = [W_ap; W_bp; W_ag; W_bg; W_g]; 3 = do^T LN(p).
_GRAD_SRC = ((0, 0), (0, 1), (2, 0), (2, 1), (2, 2), (2, 3), (0, 2), (0, 3), (0, 4), (0, 5),
             (2, 4), (1, 3), (1, 0), (1, 1), (3, 0), (1, 2))


class TriangleMultiplicationFunction(torch.autograd.Function):
    """Autograd wrapper of the fused kernels on canonical, validated inputs:
    z [B, N, N, C] contiguous; mask [B, N, N] contiguous (float, or bool viewed as uint8) or
    None; then the 16 parameters in ``_PARAM_ORDER`` (None where absent: a cached constant
    stands in, and its gradient is None), eps_in, eps_out, outgoing, product. The parameters are
    the caller's own tensors (no concatenated copies), so an in-place update is always seen."""

    @staticmethod
    def forward(ctx, z4, mask3, *rest):
        params, (eps1, eps2, outgoing, product) = rest[:16], rest[16:]
        C, H = z4.shape[-1], params[2].shape[0]
        ps = _filled(params, C, H, z4.device)
        out, (ab, p, mean, rstd) = _forward(z4, mask3, ps, eps1, eps2, outgoing, product, keep=True)
        ctx.save_for_backward(z4, mask3, *ps, ab, p, mean, rstd)
        # One attribute: which parameters are present, their dtypes, and the scalars.
        ctx.meta = (tuple(None if t is None else t.dtype for t in params), eps1, eps2, outgoing, product)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        saved = ctx.saved_tensors
        z4, mask3, ps, (ab, p, mean, rstd) = saved[0], saved[1], saved[2:18], saved[18:]
        dtypes, eps1, eps2, outgoing, product = ctx.meta
        B, N, _, C = z4.shape
        H = ps[2].shape[0]
        NN, M = N * N, B * N * N
        dev, dt = z4.device, z4.dtype
        if not dout.is_contiguous():
            dout = dout.contiguous()
        key = _tune_key(B, NN, C, H, dt, mask3 is not None)
        du = torch.empty((M, 4 * H + C), dtype=dt, device=dev)   # [d(a_p, b_p) | d(a_g, b_g) | dgate]
        dp = torch.empty((B * H, N, N), dtype=dt, device=dev)
        do = torch.empty((M, C), dtype=dt, device=dev)
        y = torch.empty((M, H), dtype=dt, device=dev)
        note_launch("trimul_out_bwd")
        cfg2 = _TUNED.get(("out_bwd", *key)) if not _FORCED else None
        if cfg2 is None:
            cfg2 = _pick("out_bwd", key, lambda c: _launch_out_bwd(
                c, p, z4, mean, rstd, ps, dout, dp, do, y, du, _part_buffer("out_bwd", c, B, NN, C, H, dev), eps2))
        part2 = _part_buffer("out_bwd", cfg2, B, NN, C, H, dev)
        _launch_out_bwd(cfg2, p, z4, mean, rstd, ps, dout, dp, do, y, du, part2, eps2)
        dab = torch.empty((2, B * H, N, N), dtype=dt, device=dev)
        da, db = dab.unbind(0)
        a, b = ab.unbind(0)
        if outgoing:                                          # P = A B^T
            _bmm(dp, b, da, product)
            _bmm(dp.transpose(1, 2), a, db, product)
        else:                                                 # P = A^T B
            _bmm(b, dp.transpose(1, 2), da, product)
            _bmm(a, dp, db, product)
        del dp, da, db
        x1 = torch.empty((M, C), dtype=dt, device=dev)
        dz = torch.empty(z4.shape, dtype=dt, device=dev)
        note_launch("trimul_proj_bwd")
        cfg1 = _TUNED.get(("proj_bwd", *key)) if not _FORCED else None
        if cfg1 is None:
            cfg1 = _pick("proj_bwd", key, lambda c: _launch_proj_bwd(
                c, z4, mask3, mean, rstd, ps, dab, du, x1, dz, _part_buffer("proj_bwd", c, B, NN, C, H, dev)))
        part1 = _part_buffer("proj_bwd", cfg1, B, NN, C, H, dev)
        _launch_proj_bwd(cfg1, z4, mask3, mean, rstd, ps, dab, du, x1, dz, part1)
        need = ctx.needs_input_grad
        # Only what some requested gradient needs: the GEMMs, the partial-row sums, one cast each
        # (when all present parameters share a dtype other than fp32), split into views in one call.
        want = [need[2 + i] and dtypes[i] is not None for i in range(16)]
        srcs: list = [None, None, None, None]
        used = {_GRAD_SRC[i][0] for i in range(16) if want[i]}
        pdt = {d for d in dtypes if d is not None}
        one = pdt.pop() if len(pdt) == 1 else None
        if 0 in used:
            s1 = part1.sum(0)
            srcs[0] = (s1 if one is None or one == s1.dtype else s1.to(one)).split([C, C, H, H, H, H])
        if 1 in used:
            s2 = part2.sum(0)
            srcs[1] = (s2 if one is None or one == s2.dtype else s2.to(one)).split([H, H, C, C])
        if 2 in used:
            srcs[2] = _wgrad(du, x1).split([H, H, H, H, C])   # [4H + C, C] in one GEMM
        if 3 in used:
            srcs[3] = (_wgrad(do, y),)                        # [C, H]
        grads: list[Optional[torch.Tensor]] = [dz if need[0] else None, None]
        for i in range(16):
            if want[i]:
                src, k = _GRAD_SRC[i]
                g = srcs[src][k]
                grads.append(g if g.dtype == dtypes[i] else g.to(dtypes[i]))
            else:
                grads.append(None)
        grads += [None] * 4
        return tuple(grads)

# --------------------------------------------------------------------------- public API
@dataclasses.dataclass
class TriangleMultiplicationParams:
    """Parameters of one triangle multiplicative update (nn.Linear layout: weight [out, in]).

    ``a_*`` and ``b_*`` are the two gated projections ([H, C] weights), ``gate_*`` the output
    gate ([C, C]), ``out_*`` the output projection ([C, H]); ``ln_in_*`` over C channels,
    ``ln_out_*`` over H. Every bias and LayerNorm affine may be None.
    """

    a_proj_weight: torch.Tensor
    a_gate_weight: torch.Tensor
    b_proj_weight: torch.Tensor
    b_gate_weight: torch.Tensor
    gate_weight: torch.Tensor
    out_weight: torch.Tensor
    a_proj_bias: Optional[torch.Tensor] = None
    a_gate_bias: Optional[torch.Tensor] = None
    b_proj_bias: Optional[torch.Tensor] = None
    b_gate_bias: Optional[torch.Tensor] = None
    gate_bias: Optional[torch.Tensor] = None
    out_bias: Optional[torch.Tensor] = None
    ln_in_weight: Optional[torch.Tensor] = None
    ln_in_bias: Optional[torch.Tensor] = None
    ln_out_weight: Optional[torch.Tensor] = None
    ln_out_bias: Optional[torch.Tensor] = None
    eps_in: float = 1e-5
    eps_out: float = 1e-5


def _layer_norm_of(module, attr: str, n: int, where: str) -> tuple:
    ln = getattr(module, attr)
    if not isinstance(ln, torch.nn.LayerNorm) or tuple(ln.normalized_shape) != (n,):
        raise TypeError(f"params_from_module: {where}.{attr} must be an nn.LayerNorm over {n} channels, got {ln!r}")
    return ln.weight, ln.bias, float(ln.eps)


def params_from_module(module: torch.nn.Module) -> tuple[TriangleMultiplicationParams, bool]:
    """``(params, outgoing)`` of a zoo triangle multiplication module: AF2's
    ``TriangleMultiplicativeUpdate`` (``linear_a_p`` / ``linear_a_g`` ..., ``linear_z``) or the
    Pairformer's ``TriangleMultiplication`` (``linear_a`` / ``linear_a_gate`` ..., ``linear_out``).

    AF2's incoming update is ``sum_k a_kj b_ki`` (its released code), i.e. the supplement's
    ``sum_k a_ki b_kj`` with a and b swapped: the swap is made here.
    """
    name = type(module).__name__
    if not isinstance(getattr(module, "outgoing", None), bool):
        raise TypeError(f"params_from_module: {name} has no boolean `outgoing` attribute (not a known triangle "
                        f"multiplication module)")
    if all(hasattr(module, n) for n in ("linear_a_p", "linear_a_g", "linear_b_p", "linear_b_g", "linear_z")):
        a_p, a_g, b_p, b_g, out = (module.linear_a_p, module.linear_a_g, module.linear_b_p, module.linear_b_g,
                                   module.linear_z)
        swap = not module.outgoing
    elif all(hasattr(module, n) for n in ("linear_a", "linear_a_gate", "linear_b", "linear_b_gate", "linear_out")):
        a_p, a_g, b_p, b_g, out = (module.linear_a, module.linear_a_gate, module.linear_b, module.linear_b_gate,
                                   module.linear_out)
        swap = False
    else:
        raise TypeError(f"params_from_module: {name} is not a known triangle multiplication module (expected "
                        f"AF2's linear_a_p/linear_a_g/.../linear_z or the Pairformer's "
                        f"linear_a/linear_a_gate/.../linear_out)")
    if swap:
        a_p, a_g, b_p, b_g = b_p, b_g, a_p, a_g
    c_z, c_h = a_p.in_features, a_p.out_features
    w_in, b_in, eps_in = _layer_norm_of(module, "layer_norm_in", c_z, name)
    w_out, b_out, eps_out = _layer_norm_of(module, "layer_norm_out", c_h, name)
    params = TriangleMultiplicationParams(
        a_proj_weight=a_p.weight, a_gate_weight=a_g.weight, b_proj_weight=b_p.weight, b_gate_weight=b_g.weight,
        gate_weight=module.linear_g.weight, out_weight=out.weight,
        a_proj_bias=a_p.bias, a_gate_bias=a_g.bias, b_proj_bias=b_p.bias, b_gate_bias=b_g.bias,
        gate_bias=module.linear_g.bias, out_bias=out.bias,
        ln_in_weight=w_in, ln_in_bias=b_in, ln_out_weight=w_out, ln_out_bias=b_out, eps_in=eps_in, eps_out=eps_out)
    return params, module.outgoing


def _check(z: torch.Tensor, mask: Optional[torch.Tensor], params: TriangleMultiplicationParams) -> tuple[int, int]:
    """Validate the inputs; returns (C, H)."""
    op = "triangle_multiplication"
    if not isinstance(z, torch.Tensor):
        raise TypeError(f"{op}: z must be a tensor, got {type(z).__name__}")
    if z.dtype not in (*_SUPPORTED, torch.float64):
        raise TypeError(f"{op}: z has dtype {z.dtype}; supported: float16, bfloat16, float32, float64")
    if z.dim() < 3 or z.shape[-2] != z.shape[-3]:
        raise ValueError(f"{op}: z must be [..., N, N, c_z], got shape {tuple(z.shape)}")
    if not isinstance(params, TriangleMultiplicationParams):
        raise TypeError(f"{op}: params must be a TriangleMultiplicationParams (see params_from_module), "
                        f"got {type(params).__name__}")
    C = z.shape[-1]
    if C == 0 or z.shape[-2] == 0:
        raise ValueError(f"{op}: z has an empty residue or channel dim, shape {tuple(z.shape)}")
    H = params.a_proj_weight.shape[0] if params.a_proj_weight.dim() == 2 else -1
    if H <= 0:
        raise ValueError(f"{op}: a_proj_weight must be [c_hidden, c_z], got {tuple(params.a_proj_weight.shape)}")
    shapes = {"a_proj_weight": (H, C), "a_gate_weight": (H, C), "b_proj_weight": (H, C), "b_gate_weight": (H, C),
              "gate_weight": (C, C), "out_weight": (C, H), "a_proj_bias": (H,), "a_gate_bias": (H,),
              "b_proj_bias": (H,), "b_gate_bias": (H,), "gate_bias": (C,), "out_bias": (C,),
              "ln_in_weight": (C,), "ln_in_bias": (C,), "ln_out_weight": (H,), "ln_out_bias": (H,)}
    zdev = z.device
    for name, shape in shapes.items():
        t = getattr(params, name)
        if t is None:
            if name.endswith("_weight") and not name.startswith("ln_"):
                raise ValueError(f"{op}: params.{name} is required")
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: params.{name} must be a tensor or None, got {type(t).__name__}")
        if t.shape != shape:
            raise ValueError(f"{op}: params.{name} has shape {tuple(t.shape)}, expected {shape} "
                             f"(c_z={C} from z {tuple(z.shape)}, c_hidden={H} from a_proj_weight)")
        if not t.is_floating_point():
            raise TypeError(f"{op}: params.{name} has dtype {t.dtype}; expected a floating dtype")
        if t.device != zdev:
            raise ValueError(f"{op}: params.{name} is on {t.device} but z is on {z.device}")
    for name in ("eps_in", "eps_out"):
        if not getattr(params, name) >= 0:
            raise ValueError(f"{op}: params.{name} must be >= 0, got {getattr(params, name)}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"{op}: mask must be a tensor or None, got {type(mask).__name__}")
        if not (mask.is_floating_point() or mask.dtype == torch.bool):
            raise TypeError(f"{op}: mask has dtype {mask.dtype}; expected bool or floating (1 = keep)")
        ok = mask.shape == z.shape[:-1]                  # the common case, without broadcast_shapes' cost
        if not ok:
            try:
                ok = torch.broadcast_shapes(mask.shape, z.shape[:-1]) == z.shape[:-1]
            except RuntimeError:
                ok = False
        if not ok:
            raise ValueError(f"{op}: mask has shape {tuple(mask.shape)}, expected one broadcastable to "
                             f"z.shape[:-1] = {tuple(z.shape[:-1])}")
        if mask.device != z.device:
            raise ValueError(f"{op}: mask is on {mask.device} but z is on {z.device}")
        if mask.requires_grad:
            raise ValueError(f"{op}: mask requires grad; the mask takes no gradient here (detach it)")
    return C, H


def triangle_multiplication_reference(z: torch.Tensor, mask: Optional[torch.Tensor],
                                      params: TriangleMultiplicationParams, outgoing: bool = True) -> torch.Tensor:
    """Plain-PyTorch triangle multiplicative update with the semantics of :func:`triangle_multiplication`.

    Computes in fp32 (fp64 for fp64 z) with ``F.layer_norm``, ``F.linear`` and ``einsum``,
    materialising every intermediate; differentiable by autograd; returns z's dtype.
    """
    _check(z, mask, params)
    ct = torch.float64 if z.dtype == torch.float64 else torch.float32
    up = lambda t: None if t is None else t.to(ct)  # noqa: E731
    P = params
    x = F.layer_norm(z.to(ct), (z.shape[-1],), up(P.ln_in_weight), up(P.ln_in_bias), P.eps_in)
    m = torch.ones((), dtype=ct, device=z.device) if mask is None else mask.to(ct).unsqueeze(-1)
    a = m * torch.sigmoid(F.linear(x, up(P.a_gate_weight), up(P.a_gate_bias))) * F.linear(
        x, up(P.a_proj_weight), up(P.a_proj_bias))
    b = m * torch.sigmoid(F.linear(x, up(P.b_gate_weight), up(P.b_gate_bias))) * F.linear(
        x, up(P.b_proj_weight), up(P.b_proj_bias))
    if outgoing:
        p = torch.einsum("...ikc,...jkc->...ijc", a, b)
    else:
        p = torch.einsum("...kic,...kjc->...ijc", a, b)
    y = F.layer_norm(p, (p.shape[-1],), up(P.ln_out_weight), up(P.ln_out_bias), P.eps_out)
    g = torch.sigmoid(F.linear(x, up(P.gate_weight), up(P.gate_bias)))
    return (g * F.linear(y, up(P.out_weight), up(P.out_bias))).to(z.dtype)


def triangle_multiplication(z: torch.Tensor, mask: Optional[torch.Tensor], params: TriangleMultiplicationParams,
                            outgoing: bool = True, *, product: str = "cublas") -> torch.Tensor:
    """Fused triangle multiplicative update (see the module docstring for the formula).

    Args:
        z: ``[..., N, N, c_z]`` pair representation, fp16 / bf16 / fp32 (fp64 runs the reference).
        mask: ``[..., N, N]`` (or broadcastable), bool or float, 1 = keep; multiplies a and b.
            None means no mask. Takes no gradient.
        params: the update's parameters (:class:`TriangleMultiplicationParams`,
            e.g. from :func:`params_from_module`).
        outgoing: ``p_ij = sum_k a_ik b_jk`` if True, else ``p_ij = sum_k a_ki b_kj``.
        product: which batched GEMM runs the triangle product (forward and backward) on the
            kernel path: ``"cublas"`` (``torch.bmm``, the default) or ``"triton"`` (this module's
            ``trimul_bmm`` kernel), kept so the benchmark can compare the two.

    Returns ``[..., N, N, c_z]`` in z's dtype; differentiable in z and every parameter.
    """
    if not isinstance(outgoing, bool):
        raise TypeError(f"triangle_multiplication: outgoing must be a bool, got {type(outgoing).__name__}")
    if product not in _PRODUCTS:
        raise ValueError(f"triangle_multiplication: product must be one of {_PRODUCTS}, got {product!r}")
    C, H = _check(z, mask, params)
    P = params
    ps = [getattr(P, n) for n in _PARAM_ORDER]
    # _check put every parameter and the mask on z's device: z alone decides the path.
    if (z.dtype not in _SUPPORTED or C > MAX_TRITON_DIM or H > MAX_TRITON_DIM or not use_triton(z)):
        return triangle_multiplication_reference(z, mask, params, outgoing)
    shape = z.shape
    N = shape[-2]
    four = len(shape) == 4
    if four:                                   # [B, N, N, C]: no reshape, no view node in the graph
        B, z4 = shape[0], z
    else:
        B = z.numel() // (N * N * C)
        z4 = z.reshape(B, N, N, C)
    if not z4.is_contiguous():
        z4 = z4.contiguous()
    mask3 = None
    if mask is not None:
        # The kernels read the mask in its own dtype (bool as bytes) and upcast in registers: no
        # conversion launch; a copy only when the mask broadcasts or is strided.
        m = mask if mask.shape == shape[:-1] else mask.expand(shape[:-1])
        if m.dim() != 3:
            m = m.reshape(B, N, N)
        if not m.is_contiguous():
            m = m.contiguous()
        mask3 = m.view(torch.uint8) if m.dtype == torch.bool else m
    args = (z4, mask3, *ps, float(P.eps_in), float(P.eps_out), outgoing, product)
    if torch.is_grad_enabled() and (z.requires_grad or any(t is not None and t.requires_grad for t in ps)):
        out = TriangleMultiplicationFunction.apply(*args)
    else:
        # Inference: nothing is saved, so a and b are freed as soon as the triangle product ran.
        out, _ = _forward(z4, mask3, _filled(ps, C, H, z.device), float(P.eps_in), float(P.eps_out), outgoing,
                          product, keep=False)
    return out if four else out.view(shape)


def triangle_multiplication_module(module: torch.nn.Module, z: torch.Tensor,
                                   mask: Optional[torch.Tensor] = None, *, product: str = "cublas") -> torch.Tensor:
    """``module(z, mask)`` for a zoo triangle multiplication module, through the fused kernels.

    Gradients reach the module's own parameters.
    """
    params, outgoing = _module_params(module)
    return triangle_multiplication(z, mask, params, outgoing, product=product)


# module -> (signature, (params, outgoing)). The params hold the module's own parameter tensors
# (never copies), so in-place updates (optimizer steps, load_state_dict, .to() on the module)
# are seen without any invalidation; the signature catches what would make them stale: a
# re-assigned submodule or parameter, a changed `outgoing` or LayerNorm eps.
_MODULE_PARAMS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _signature(module: torch.nn.Module) -> tuple:
    sig = [module.__dict__.get("outgoing")]
    for sub in module._modules.values():
        if sub is None:
            continue
        sig.append(id(sub))
        sig.extend(id(t) for t in sub._parameters.values())
        if isinstance(sub, torch.nn.LayerNorm):
            sig.append(sub.eps)
    return tuple(sig)


def _module_params(module: torch.nn.Module) -> tuple[TriangleMultiplicationParams, bool]:
    """:func:`params_from_module`, cached per module (a dict lookup and a signature check
    instead of ~30 ``nn.Module.__getattr__`` calls and the dataclass construction)."""
    sig = _signature(module)
    hit = _MODULE_PARAMS.get(module)
    if hit is not None and hit[0] == sig:
        return hit[1]
    res = params_from_module(module)
    _MODULE_PARAMS[module] = (sig, res)
    return res

