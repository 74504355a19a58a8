"""Shared pieces of the kernels' property tests (tests/kernels/test_properties_*.py).

Each property test draws shapes, broadcasts, dtypes and special values with hypothesis,
runs the kernel (Triton through the interpreter on CPU), and compares it with a float64
formulation written in the test itself, never the module's ``*_reference`` (which could
share a kernel's bug). The comparison (:func:`assert_close_special`) requires:

- NaN at exactly the same positions;
- ±inf at the same positions with the same sign, after rounding the float64 truth to the
  kernel's output dtype (a value past fp16's range is inf there, in eager too);
- on the remaining entries, ‖out − truth‖ / ‖truth‖ below the dtype's bar
  (PITFALLS.md, correctness guide).

Values come from a seeded ``torch.Generator`` (hypothesis draws the seed), so a failing
example reproduces from the printed arguments. Special values are written at a few drawn
positions: NaN, +inf, -inf, -1e9 (AlphaFold's additive mask) and 0.
"""
from __future__ import annotations

import math

import torch
from hypothesis import strategies as st

SPECIALS = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf"), "-1e9": -1e9, "zero": 0.0}

# hypothesis strategies -------------------------------------------------------------------------

dtypes = st.sampled_from([torch.float32, torch.float16])  # never bf16: wrong in the interpreter
seeds = st.integers(0, 2**31 - 1)


def specials(max_count: int = 3, kinds: tuple[str, ...] = tuple(SPECIALS)) -> st.SearchStrategy:
    """A (possibly empty) list of special-value kinds to inject into one tensor."""
    return st.lists(st.sampled_from(kinds), max_size=max_count)


@st.composite
def broadcast_shape(draw, shape: tuple[int, ...], min_rank: int = 0) -> tuple[int, ...]:
    """A shape that broadcasts to ``shape``: trailing dims of it, each either full or 1."""
    rank = draw(st.integers(min(min_rank, len(shape)), len(shape)))
    tail = shape[len(shape) - rank:]
    return tuple(n if draw(st.booleans()) else 1 for n in tail)


# tensors -----------------------------------------------------------------------------------------


def randn(gen: torch.Generator, shape, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    """Fresh normal values (never zeros or ones), drawn in float64 and rounded to ``dtype``."""
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


def inject(gen: torch.Generator, t: torch.Tensor, kinds: list[str]) -> torch.Tensor:
    """A copy of ``t`` with one special value per kind at random positions."""
    t = t.clone()
    if t.numel() == 0:
        return t
    flat = t.view(-1)
    for kind in kinds:
        flat[int(torch.randint(t.numel(), (1,), generator=gen))] = SPECIALS[kind]
    return t


def random_mask(gen: torch.Generator, shape, p_keep: float = 0.7) -> torch.Tensor:
    return torch.rand(shape, generator=gen) < p_keep


# comparison --------------------------------------------------------------------------------------


def _where(t: torch.Tensor) -> str:
    idx = t.nonzero()[:6].tolist()
    return f"{int(t.sum())} at {idx}{' ...' if int(t.sum()) > 6 else ''}"


def assert_close_special(name: str, got: torch.Tensor, truth: torch.Tensor, tol: float, floor: float = 1e-2,
                         summed_over: int = 1, plain: torch.Tensor | None = None) -> None:
    """Compare a kernel result with its float64 truth: NaN and ±inf positions exactly, the rest
    by relative error (see the module docstring).

    The error is relative to the truth's norm, floored at ``floor`` per element (RMS) times
    sqrt(``summed_over``): a result that is 0 mathematically (the gradient of a bias constant
    along the softmax dim, of a scalar bias) is the rounding noise of the terms that cancel,
    whose size is that of the terms (O(1) for the values drawn here, growing with the number
    of terms a broadcast gradient sums), and its error relative to 0 says nothing.

    ``plain``: the same formulation run by eager PyTorch in the kernel's dtype. Where the truth
    is out of the output dtype's range (±inf once rounded) and plain is NaN there (+inf - inf
    in a sum of overflowed terms, say), the kernel may be NaN too: it overflows as eager does."""
    assert got.shape == truth.shape, f"{name}: shape {tuple(got.shape)} vs truth {tuple(truth.shape)}"
    g = got.detach().double()
    t = truth.detach().double()
    t_out = truth.detach().to(got.dtype).double()  # the truth as the output dtype holds it
    nan_g, nan_t = torch.isnan(g), torch.isnan(t)
    if plain is not None:
        overflowed = torch.isinf(t_out) & torch.isnan(plain.detach().double()) & nan_g
        nan_t = nan_t | overflowed
        t_out = torch.where(overflowed, g, t_out)
    assert torch.equal(nan_g, nan_t), (f"{name}: NaN positions differ: kernel only {_where(nan_g & ~nan_t)}, "
                                       f"truth only {_where(nan_t & ~nan_g)}")
    inf_g, inf_t = torch.isinf(g), torch.isinf(t_out)
    assert torch.equal(inf_g, inf_t), (f"{name}: inf positions differ: kernel only {_where(inf_g & ~inf_t)}, "
                                       f"truth only {_where(inf_t & ~inf_g)}")
    assert torch.equal(g[inf_g], t_out[inf_g]), f"{name}: inf signs differ"
    fin = ~(nan_g | inf_g | nan_t)
    if not fin.any():
        return
    ref = t[fin]
    err = (g[fin] - ref).norm().item()
    scale = max(ref.norm().item(), floor * math.sqrt(ref.numel() * summed_over))
    rel = err / scale
    assert rel < tol, f"{name}: relative error {rel:.3g} >= {tol:g} (error norm {err:.3g}, truth norm {scale:.3g})"


def finite_upstream(gen: torch.Generator, shape, dtype: torch.dtype) -> torch.Tensor:
    """An upstream gradient: finite random values (NaN upstream gradients are tested by the
    element-wise property test, whose ops differ in how they pass them)."""
    return randn(gen, shape, dtype)


def numel(shape) -> int:
    return math.prod(shape)


def relative_error(got: torch.Tensor, truth: torch.Tensor) -> float:
    """‖got − truth‖ / ‖truth‖ over the entries finite in both (0 when there are none)."""
    g, t = got.detach().double(), truth.detach().double()
    fin = torch.isfinite(g) & torch.isfinite(t)
    if not fin.any():
        return 0.0
    return ((g[fin] - t[fin]).norm() / max(t[fin].norm().item(), 1e-2 * math.sqrt(int(fin.sum())))).item()


def plain_bar(tol: float, plain: torch.Tensor | None, truth: torch.Tensor) -> float:
    """The bar for a result: ``tol``, or 3x the error of the same formulation run by plain
    PyTorch in the kernel's dtype when that is larger (PITFALLS.md: "no worse than 3x the error
    of the plain PyTorch op in the same dtype"). E.g. a softmax gradient recomputed from the
    fp16 output cancels in ``dy - sum(y dy)``, in eager as in the kernel; an fp32 gradient
    that is 0 mathematically is the noise of terms of size 1e9 when v holds -1e9."""
    if plain is None:
        return tol
    return max(tol, 3.0 * relative_error(plain, truth))
