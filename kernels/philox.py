"""Philox 4x32-10 in plain PyTorch, bit-exact with Triton's ``tl.rand``, and the dropout op built on it.

Triton's ``tl.rand(seed, offset)`` (``triton/language/random.py``) runs ten Philox
rounds on the counter ``(offset_lo, offset_hi, 0, 0)`` with the key
``(seed_lo, seed_hi)``, keeps the first output word, reinterprets it as int32,
folds negatives onto ``-x - 1`` and scales by ``4.6566127342e-10`` in float32.
This module repeats every step in int64 tensor arithmetic (uint32 values kept in
the low 32 bits), so a dropout mask drawn inside a kernel can be regenerated on
any device, for a reference or a check, without running the kernel::

    >>> u = uniform_like_triton(seed=7, counters=torch.arange(4))
    >>> u.dtype, bool(((u >= 0) & (u < 1)).all())
    (torch.float32, True)
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch

_MASK32 = 0xFFFFFFFF
_PHILOX_KEY_A = 0x9E3779B9
_PHILOX_KEY_B = 0xBB67AE85
_PHILOX_ROUND_A = 0xD2511F53
_PHILOX_ROUND_B = 0xCD9E8D57
_N_ROUNDS = 10
# tl.rand's int32 -> float scale: the largest value with MAX_INT * scale < 1 in float32.
_UNIFORM_SCALE = 4.6566127342e-10
_MAX_SEED = 2**62  # seeds drawn in [0, 2**62): non-negative as int64 and as uint64


def _mul_hi_lo(k: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of the 64-bit product ``k * x`` (k, x < 2**32).

    The product can reach 2**64, past int64, so ``k`` is split into 16-bit halves
    and every partial product stays below 2**49.
    """
    k_hi, k_lo = k >> 16, k & 0xFFFF
    a = k_hi * x  # < 2**48
    b = k_lo * x  # < 2**48
    hi = (a + (b >> 16)) >> 16
    lo = (((a & 0xFFFF) << 16) + b) & _MASK32
    return hi, lo


def philox_uint32(seed: "int | torch.Tensor", counters: torch.Tensor) -> torch.Tensor:
    """First Philox 4x32-10 output word for each counter, as int64 in [0, 2**32).

    ``counters`` are the int64 offsets handed to ``tl.rand`` (the low word is
    counter 0, the high word counter 1, as Triton splits a 64-bit offset). ``seed`` is a Python
    int or a 0-dim int64 tensor on the counters' device (read there, never on the host).
    """
    if counters.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"philox counters must be int32 or int64, got {counters.dtype}")
    counters = counters.to(torch.int64)
    if isinstance(seed, torch.Tensor):
        # A device seed (a 0-dim int64 tensor) is never read on the host: no check of its value,
        # and the key words are tensors too. Its bits are the key, as tl.rand reads an int64 seed.
        if seed.dtype != torch.int64 or seed.dim() != 0:
            raise TypeError(f"a philox seed tensor must be a 0-dim int64 tensor, got {seed.dtype} {list(seed.shape)}")
    else:
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
            raise ValueError(f"philox seed must be an int in [0, 2**63), got {seed!r}")
        if counters.numel() and int(counters.min()) < 0:
            raise ValueError("philox counters must be non-negative")
    c0 = counters & _MASK32
    c1 = (counters >> 32) & _MASK32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(_N_ROUNDS):
        hi_b, lo_b = _mul_hi_lo(_PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(_PHILOX_ROUND_A, c0)
        c0, c2 = hi_b ^ c1 ^ k0, hi_a ^ c3 ^ k1
        c1, c3 = lo_b, lo_a
        k0 = (k0 + _PHILOX_KEY_A) & _MASK32
        k1 = (k1 + _PHILOX_KEY_B) & _MASK32
    return c0


def uint32_to_uniform(x: torch.Tensor) -> torch.Tensor:
    """Triton's ``uint_to_uniform_float`` for 32-bit words: float32 in [0, 1)."""
    signed = torch.where(x >= 2**31, x - 2**32, x)  # bitcast uint32 -> int32
    folded = torch.where(signed < 0, -signed - 1, signed)
    return folded.to(torch.float32) * torch.tensor(_UNIFORM_SCALE, dtype=torch.float32, device=x.device)


def uniform_like_triton(seed: "int | torch.Tensor", counters: torch.Tensor) -> torch.Tensor:
    """``tl.rand(seed, counters)`` computed in PyTorch, bit for bit (float32)."""
    return uint32_to_uniform(philox_uint32(seed, counters))


# ---------------------------------------------------------------------------------
# The explicit dropout op
# ---------------------------------------------------------------------------------


def draw_dropout_seed(like: torch.Tensor) -> torch.Tensor:
    """A fresh dropout state on ``like``'s device: an int64 tensor ``[seed, offset]`` (offset 0).

    Drawn by torch's generator on the device itself (``torch.randint``), so nothing is read on the
    host: on CUDA it is CUDA-graph safe (each replay draws a new seed from the graph's Philox
    state), and under activation checkpointing the recomputation, which restores the generator's
    state, draws the same seed, hence the same masks. The kernels load both words::

        >>> s = draw_dropout_seed(torch.empty(3))
        >>> s.dtype, list(s.shape), int(s[1])
        (torch.int64, [2], 0)
    """
    seed = torch.randint(0, _MAX_SEED, (1,), dtype=torch.int64, device=like.device)
    return torch.cat([seed, torch.zeros_like(seed)])


def as_dropout_state(seed: "int | torch.Tensor", device: torch.device | str) -> torch.Tensor:
    """``seed`` as the kernels' device state ``[seed, offset]``: a Python int (offset 0, copied to
    the device: not for CUDA-graph capture), or such a state tensor itself, checked by its metadata
    only (never read on the host)."""
    if isinstance(seed, torch.Tensor):
        if seed.dtype != torch.int64 or tuple(seed.shape) != (2,):
            raise ValueError(f"a dropout state must be an int64 tensor [seed, offset] of shape (2,), got "
                             f"{seed.dtype} {list(seed.shape)}")
        if seed.device != torch.device(device):
            raise ValueError(f"the dropout state is on {seed.device}, the tensors on {device}")
        return seed
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an int in [0, 2**63) or an int64 [seed, offset] tensor, got {seed!r}")
    return torch.tensor([seed, 0], dtype=torch.int64, device=device)


def dropout_mask_reference(seed: "int | torch.Tensor", offset: int, mask_shape: Sequence[int], p: float,
                           device: torch.device | str | None = None) -> torch.Tensor:
    """The boolean keep-mask (True = kept) the kernels draw for ``mask_shape``.

    Element ``i`` (flat, row-major in ``mask_shape``) is kept when
    ``tl.rand(seed, i + base + offset) >= p``, both sides float32. ``seed`` is a Python int (base 0)
    or a device state ``[seed, base]`` (:func:`draw_dropout_seed`), read on its device only::

        >>> s = torch.tensor([7, 0])
        >>> torch.equal(dropout_mask_reference(s, 5, (2, 3), 0.5), dropout_mask_reference(7, 5, (2, 3), 0.5))
        True
    """
    _check_p(p, "p")
    if not isinstance(offset, int) or offset < 0:
        raise ValueError(f"dropout offset must be a non-negative int, got {offset!r}")
    shape = tuple(int(s) for s in mask_shape)
    numel = math.prod(shape)
    if isinstance(seed, torch.Tensor):
        state = as_dropout_state(seed, seed.device if device is None else device)
        device, key = state.device, state[0]
        counters = torch.arange(numel, dtype=torch.int64, device=device) + (state[1] + offset)
    else:
        device = "cpu" if device is None else device
        key = seed
        counters = torch.arange(numel, dtype=torch.int64, device=device) + offset
    u = uniform_like_triton(key, counters)
    return (u >= torch.tensor(p, dtype=torch.float32, device=device)).reshape(shape)


def dropout(x: torch.Tensor, p: float = 0.5, *, shared_dims: Sequence[int] = (), training: bool = True,
            seed: "int | torch.Tensor | None" = None, offset: int = 0, rescale: bool = True) -> torch.Tensor:
    """Dropout whose mask is shared along ``shared_dims`` (size 1 there), from (seed, offset).

    ``x * keep * 1/(1-p)`` (``rescale=False``: ``x * keep``, the product with a Bernoulli mask of
    keep probability ``1 - p``); p = 1 gives ``x * 0``, as torch's dropout does.
    Inside a fragment given to :func:`fuse_elementwise` the fused call supplies
    ``seed`` and ``offset`` (leave them out here). Called eagerly it runs the
    PyTorch reference; ``seed=None`` then draws a device state (:func:`draw_dropout_seed`):
    nothing is read on the host. Under ``torch.fx`` tracing it records itself as one graph node.
    """
    if torch.overrides.has_torch_function((x,)):
        return torch.overrides.handle_torch_function(
            dropout, (x,), x, p, shared_dims=shared_dims, training=training, seed=seed, offset=offset,
            rescale=rescale)
    _check_p(p, "p")
    if not training or p == 0.0:
        return x
    if seed is None:
        seed = draw_dropout_seed(x)
    mask_shape = _mask_shape(tuple(x.shape), tuple(shared_dims), "x")
    keep = dropout_mask_reference(seed, offset, mask_shape, p, device=x.device)
    return x * keep * (_dropout_scale(p) if rescale else 1.0)


def _check_p(p: Any, what: str) -> None:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= float(p) <= 1.0:
        raise ValueError(f"dropout {what} must be a number in [0, 1], got {p!r}")


def _dropout_scale(p: float) -> float:
    return 0.0 if p >= 1.0 else 1.0 / (1.0 - p)


def _mask_shape(shape: tuple[int, ...], shared_dims: tuple[int, ...], what: str) -> tuple[int, ...]:
    """The dropout mask's shape: ``shape`` with size 1 along the shared dims."""
    out = list(shape)
    for d in shared_dims:
        if not isinstance(d, int) or not -len(shape) <= d < len(shape):
            raise ValueError(f"dropout shared_dims {shared_dims} out of range for {what} of shape {list(shape)}")
        out[d % len(shape)] = 1
    return tuple(out)
