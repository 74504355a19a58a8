"""The sharding rule of ``foldcompile.outer_product_mean``: batch dims, or one residue dim with its own
operand and mask, split; the sequences and the channels never; the weight and bias replicated."""
import torch
import torch.fx as fx

import foldcompile.kernels.ops  # noqa: F401  (torch.ops.foldcompile.*)
from foldcompile.distributed import split_sizes
from foldcompile.passes.normalize import normalize_pass
from foldcompile.passes.placement import Replicate
from foldcompile.passes.shape_prop import shape_prop_pass
from foldcompile.passes.sharding_rules import ensure_kernel_rules, strategies

P = 2


def _table(n):
    def short(p):
        if p is None:
            return None
        return "R" if p.placement == Replicate() else ("S", p.dim, p.split_sizes)
    return {(short(s.out), tuple(short(i) for i in s.inputs)) for s in strategies(n, P)}


def _sh(d, n):
    return ("S", d, tuple(split_sizes(n, P)))


def test_batch_and_residue_splits_never_the_sequences():
    ensure_kernel_rules()
    K = torch.ops.foldcompile

    def f(a, b, w, bias, mask):
        return K.outer_product_mean.default(a, b, w, bias, mask, mask, 1e-3)

    gm = normalize_pass(fx.symbolic_trace(f)).graph_module
    B, S, N, C = 3, 5, 7, 4
    args = (torch.randn(B, S, N, C), torch.randn(B, S, N, C), torch.randn(8, C * C), torch.randn(8),
            torch.ones(S, N))  # the mask broadcast over the batch
    shape_prop_pass(gm, args, dims={"N_batch": B, "N_seq": S, "N_res": N}, fake=True)
    (opm,) = [n for n in gm.graph.nodes if n.op == "call_function"]
    t = _table(opm)
    # inputs: a, b, weight, bias, mask_a, mask_b
    assert (_sh(0, B), (_sh(0, B), _sh(0, B), "R", "R", "R", "R")) in t          # batch: the mask is shared
    assert (_sh(1, N), (_sh(2, N), "R", "R", "R", _sh(1, N), "R")) in t          # i: a and its mask
    assert (_sh(2, N), ("R", _sh(2, N), "R", "R", "R", _sh(1, N))) in t          # j: b and its mask
    assert not any(ins[0] == _sh(1, S) or ins[1] == _sh(1, S) for _, ins in t)  # never the sequences
    assert not any(out == ("S", 3, tuple(split_sizes(8, P))) for out, _ in t)   # nor the channels
