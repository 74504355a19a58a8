"""Where one call's GPU time goes, by op class: our Triton kernels by family, GEMMs, Inductor, copies, other.

:func:`op_classes` sorts the kernels of one call (``bench.common.kernel_times``: torch.profiler) by
their names: our kernels are the ``@triton.jit`` functions of ``foldcompile.kernels`` (whose names
the profiler shows as they are written), the GEMMs are cuBLAS / cuBLASLt / CUTLASS kernels (and
Inductor's matmul templates), Inductor's generated Triton kernels are ``triton_poi_`` /
``triton_red_`` / ``triton_per_``, copies are the profiler's ``Memcpy`` / ``Memset`` entries.
:func:`fused_fraction` is the share of kernel time in our kernels.

    >>> times = [(6.0, "_attn_fwd_kernel"), (2.0, "nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTT"),
    ...          (1.0, "fused_elementwise_mul_add_fwd"), (1.0, "triton_poi_fused_add_0")]
    >>> classes = op_classes(times)
    >>> classes["attention"], classes["gemm"], classes["elementwise"], classes["inductor"]
    (6.0, 2.0, 1.0, 1.0)
    >>> fused_fraction(classes)
    0.7
    >>> describe(classes, times)
    'kernels 10.00 ms: attention 60%, elementwise 10%, gemm 20%, inductor 10% (ours 70%)'
"""
from __future__ import annotations

from typing import Callable

# our kernels' families, by the prefixes of their @triton.jit names (foldcompile/kernels/*.py); ln_linear
# before layer_norm (both begin with "_ln_")
FAMILIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("attention", ("_attn_",)),
    ("triangle_multiplication", ("_trimul_",)),
    ("outer_product_mean", ("_opm_",)),
    ("ln_linear", ("_ln_linear_",)),
    ("layer_norm", ("_ln_fwd", "_ln_bwd")),
    ("softmax", ("_softmax_",)),
    ("elementwise", ("fused_elementwise",)),
)
OURS = tuple(name for name, _ in FAMILIES)
# cuBLAS / cuBLASLt (nvjet_* on Hopper with CUDA 13, sm90_xmma_gemm_*), CUTLASS (cutlass*, Kernel2),
# split-K reductions, Inductor's matmul templates; on a CPU smoke run, the aten matmul ops
_GEMM = ("gemm", "nvjet", "cutlass", "xmma", "cublas", "splitkreduce", "kernel2", "triton_tem_",
         "aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm")
_INDUCTOR = ("triton_poi_", "triton_red_", "triton_per_")
_COPIES = ("memcpy", "memset")
CLASSES = OURS + ("gemm", "inductor", "copies", "other")


def op_class(name: str) -> str:
    """The class of one kernel by its name (see the module docstring).

    >>> op_class("_ln_linear_fwd_kernel"), op_class("_ln_fwd_kernel"), op_class("Memcpy DtoD (Device -> Device)")
    ('ln_linear', 'layer_norm', 'copies')
    """
    for family, prefixes in FAMILIES:
        if any(name.startswith(p) for p in prefixes):
            return family
    low = name.lower()
    if any(m in low for m in _INDUCTOR):
        return "inductor"
    if any(m in low for m in _GEMM):
        return "gemm"
    if any(m in low for m in _COPIES):
        return "copies"
    return "other"


def op_classes(times: list[tuple[float, str]]) -> dict[str, float]:
    """ms per class (every class of :data:`CLASSES`, zero where none ran) of ``(ms, kernel name)`` pairs."""
    out = dict.fromkeys(CLASSES, 0.0)
    for ms, name in times:
        out[op_class(name)] += ms
    return out


def fused_fraction(classes: dict[str, float]) -> float:
    """The share of kernel time in our kernels (0 where no kernel time was seen)."""
    total = sum(classes.values())
    return sum(classes[c] for c in OURS) / total if total else 0.0


def describe(classes: dict[str, float], times: list[tuple[float, str]], top_other: int = 3) -> str:
    """One line: total kernel time, each class's share (classes with time only), ours in all, and the
    longest ``other`` kernels by name (what is neither ours nor a GEMM nor Inductor's)."""
    total = sum(classes.values())
    if not total:
        return "no kernel time seen by the profiler"
    shares = ", ".join(f"{c} {100 * ms / total:.0f}%" for c, ms in classes.items() if ms > 0)
    line = f"kernels {total:.2f} ms: {shares} (ours {100 * fused_fraction(classes):.0f}%)"
    others = [(ms, name) for ms, name in times if op_class(name) == "other"][:top_other]
    if others:
        line += "; longest other: " + ", ".join(f"{name[:48]} {100 * ms / total:.0f}%" for ms, name in others)
    return line


def profile_call(call: Callable[[], object]) -> tuple[float, str]:
    """``(fused fraction, description)`` of one ``call()`` under the profiler (run after its timings)."""
    from bench.common import kernel_times

    times = kernel_times(call)
    classes = op_classes(times)
    return fused_fraction(classes), describe(classes, times)
