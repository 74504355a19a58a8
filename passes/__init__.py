"""Compiler passes, one module each. A pass takes a GraphModule and returns a PassResult.

    normalize   modules inlined, methods as functions, GEMMs annotated with einsum equations
    shape_prop  shapes, dtypes, and sizes as sympy expressions over named dims (N_seq, N_res, ...)
    shape_rules the per-op symbolic-shape rules shape_prop applies (RULES; the rule contract)
    classify    op class (GEMM / REDUCTION / ELEMENTWISE / LAYOUT / COMM / OTHER) and symbolic cost
    fuse        the fusion rules of ``passes/rules`` (attention, softmax, layer norm) into the kernels
"""
from foldcompile.passes.base import PassError, PassResult
from foldcompile.passes.classify import check_flops_against_flop_counter, classify_pass
from foldcompile.passes.cost_model import CostTotals, cost_totals
from foldcompile.passes.normalize import normalize_pass
from foldcompile.passes.shape_prop import shape_prop_pass
from foldcompile.passes.fuse import fuse_pass  # noqa: E402  (after the passes its rules read)

__all__ = ["PassError", "PassResult", "normalize_pass", "shape_prop_pass", "classify_pass",
           "check_flops_against_flop_counter", "cost_totals", "CostTotals", "fuse_pass"]
