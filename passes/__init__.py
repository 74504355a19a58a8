"""Compiler passes, one module each. A pass takes a GraphModule and returns a PassResult.

    normalize   methods as canonical functions, GEMMs annotated with einsum equations (no modules)
    shape_prop  shapes, dtypes, and sizes as sympy expressions over named dims (N_seq, N_res, ...),
                on real or fake tensors
    classify    op class (GEMM / REDUCTION / ELEMENTWISE / LAYOUT / COMM / OTHER) and symbolic cost
    explicit_autocast  autocast's casts written into the graph as x.to(dtype); the graph then runs with autocast off
    merge_chunk_loops  a layer run on chunks of rows in a Python loop -> the layer run once (before fuse)
    simplify_casts  casts that change no value (x.to(x.dtype), bf16 -> fp32 -> bf16) removed (fuse runs it first)
    fuse        the fusion rules of ``passes/rules`` (attention, softmax, layer norm) into the kernels
    shard       the DAP placement plan: a placement on every tensor, a redistribute at every change

The op IR under them:

    registry    one entry per op, keyed by its callables: class, shape rule, FLOPs, spelling, ...
    shape_rules the symbolic-shape rule contract (RuleContext, NoRule) and the rules' shared helpers
    op_*        the entries, one module per op family: op_pointwise, op_layout, op_reduction, op_gemm,
                op_creation (random ops too), op_comm (collectives), op_kernels (the kernels' torch.library ops)
    einsum      every GEMM-like node as an equation; letter sizes, FLOPs, batch/free/contracted
    placement   the planned graph's contract (Placed, redistribute); sharding_rules the ops' DAP rules
    labeling    exact min-sum labeling by variable elimination (the plan's search)
    meta        the node-meta schema: the keys the passes share, and rank/dtype readers
"""
from foldcompile.passes.base import PassError, PassResult, declare
from foldcompile.passes.classify import check_flops_against_flop_counter, classify_pass
from foldcompile.passes.cost_model import CostTotals, cost_totals
from foldcompile.passes.normalize import normalize_pass
from foldcompile.passes.shape_prop import shape_prop_pass
from foldcompile.passes.simplify_casts import simplify_casts_pass
from foldcompile.passes.fuse import fuse_pass  # noqa: E402  (after the passes its rules read)
from foldcompile.passes.shard import shard_pass  # noqa: E402

__all__ = ["PassError", "PassResult", "declare", "normalize_pass", "shape_prop_pass", "classify_pass",
           "check_flops_against_flop_counter", "cost_totals", "CostTotals", "fuse_pass", "shard_pass",
           "simplify_casts_pass"]
