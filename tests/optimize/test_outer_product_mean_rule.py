"""The outer product mean rule on its spellings (AF2's einsum, OpenFold's transposed einsum, an explicit
batch einsum, a reshaped bmm, ``ijec`` channel order, a matmul weight, the division before or after the
projection, with and without a mask) and its near misses (a count with no eps, a divisor that is not
the mask-product count, a mean over another axis, a count over another axis): matched ones compute what
the model computes (outputs and every gradient), refused ones are left as they were, with the reason.
"""
from __future__ import annotations

import doctest
import importlib
import os
import sys

import pytest
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from optimize_helpers import assert_same_function  # noqa: E402

import foldcompile  # noqa: E402
from foldcompile.models.alphafold2.outer_product_mean import OuterProductMean  # noqa: E402
from foldcompile.models.zoo import randomize_parameters  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from third_party.openfold_style import OFOuterProductMean  # noqa: E402

S, N, C_M, C, Z = 5, 11, 16, 4, 8
EPS = 1e-3


def _msa(seed: int = 0, batch: tuple = (), empty_residue: bool = True):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(*batch, S, N, C_M, generator=g).requires_grad_()
    mask = (torch.rand(*batch, S, N, generator=g) > 0.2).float()
    mask[..., 0, :] = 1.0
    if empty_residue:
        mask[..., 3] = 0.0  # a residue no sequence has: its pairs' count is eps only
    return m, mask


class Projected(nn.Module):
    """LN, two masked projections, then the outer product mean in the spelling ``style``."""

    def __init__(self, style: str):
        super().__init__()
        self.style = style
        self.ln = nn.LayerNorm(C_M)
        self.lin_a, self.lin_b = nn.Linear(C_M, C), nn.Linear(C_M, C)
        self.out = nn.Linear(C * C, Z)
        self.w = nn.Parameter(torch.randn(C * C, Z) / C)  # a [c·e, c_z] weight for the matmul spelling

    def forward(self, m, mask):
        x = self.ln(m)
        a = self.lin_a(x) * mask[..., None]
        b = self.lin_b(x) * mask[..., None]
        st = self.style
        count = None if st in ("bmm_mean", "mean_over_residues", "one_mask_sum", "count_over_other_rows") else \
            torch.einsum("...si,...sj->...ij", mask, mask)[..., None]
        if st == "batch_einsum":  # [B, S, N, c]
            o = torch.einsum("bsic,bsje->bijce", a, b)
            return self.out(o.reshape(*o.shape[:3], C * C)) / (EPS + count)
        if st == "bmm_mean":  # no mask in the mean: divided by S before the projection
            s, i, c = a.shape
            o = (a.reshape(s, i * c).t() @ b.reshape(s, i * c)).view(i, c, i, c).permute(0, 2, 1, 3)
            return self.out(o.reshape(i, i, c * c) / s)
        if st == "batch_swapped":  # [B, J, I, e·c]: b's residues first, its channels first
            o = torch.einsum("bsic,bsje->bjiec", a, b)
            return self.out(o.flatten(-2)) / (EPS + count.transpose(-2, -3))
        if st == "ijec":
            o = torch.einsum("sic,sje->ijec", a, b)
            return self.out(o.flatten(-2)) / (count + EPS)
        if st == "matmul_weight":
            o = torch.einsum("sic,sje->ijce", a, b)
            return (o.reshape(N, N, C * C) @ self.w) / (EPS + count)
        if st == "divided_before":
            o = torch.einsum("sic,sje->ijce", a, b) / (EPS + count[..., None])
            return self.out(o.reshape(N, N, C * C))
        # near misses
        o = self.out(torch.einsum("sic,sje->ijce", a, b).reshape(N, N, C * C))
        if st == "no_eps":
            return o / count
        if st == "zero_eps":
            return o / (0.0 + count)
        if st == "one_mask_sum":  # sequences with residue i, not with both
            return o / (EPS + mask.sum(0)[:, None, None])
        if st == "mean_over_residues":  # divides by the number of residues
            return o / m.shape[-2]
        if st == "count_over_other_rows":  # a product of masks over other rows than the summed sequences
            rows = torch.cat([mask, mask[:1]], 0)  # [S + 1, N]
            return o / (EPS + torch.einsum("ti,tj->ij", rows, rows)[..., None])
        raise KeyError(st)


def _params(model):
    return randomize_parameters(model, 0)


MATCHED = [("zoo_af2", "bias divided", None), ("openfold", "bias divided", None),
           ("batch_einsum", "count of sequences", (2,)), ("batch_swapped", "count of sequences", (2,)),
           ("bmm_mean", "plain mean", None),
           ("ijec", "permuted view", None), ("matmul_weight", "count of sequences", None),
           ("divided_before", "divided before the projection", None)]


@pytest.mark.parametrize("style, note, batch", MATCHED)
def test_spellings_are_fused_and_compute_what_the_model_computes(style, note, batch):
    if style == "zoo_af2":
        model = _params(OuterProductMean(C_M, Z, C))
    elif style == "openfold":
        model = _params(OFOuterProductMean(C_M, Z, C, chunk_size=None))
    else:
        model = _params(Projected(style))
    inputs = _msa(0, batch or ())
    fast = foldcompile.optimize(model, *inputs)
    assert fast.report.counts()["outer_product_mean"] == {"matched": 1, "rejected": 0}, fast.report.rejections
    (match,) = [m for m in fast.report.matches if m["rule"] == "outer_product_mean"]
    assert any(note in n for n in match["notes"]), match["notes"]
    assert "fused_outer_product_mean(" in fast.code
    # the outer product, its projection and the count are gone from the graph
    assert not any(w in fast.code for w in ("einsum(", "matmul(", "bmm(", "F.linear(reshape", "F.linear(flatten"))
    assert_same_function(model, _msa(1, batch or ()), fast)


NEAR_MISSES = [("no_eps", "has no eps"), ("zero_eps", "eps 0 is not positive"),
               ("one_mask_sum", "not a product of two tensors"), ("mean_over_residues", "not by the number of sequences"),
               ("count_over_other_rows", "not over the 5 sequences")]


@pytest.mark.parametrize("style, reason", NEAR_MISSES)
def test_near_misses_are_refused_with_the_reason(style, reason):
    model = _params(Projected(style))
    inputs = _msa(0)
    fast = foldcompile.optimize(model, *inputs)
    assert fast.report.counts()["outer_product_mean"] == {"matched": 0, "rejected": 1}
    (rej,) = [r for r in fast.report.rejections if r["rule"] == "outer_product_mean"]
    assert reason in rej["reason"], rej["reason"]
    assert "fused_outer_product_mean(" not in fast.code
    with torch.no_grad():
        assert_same_function(model, _msa(1, empty_residue=False), fast, grads=False)  # no division by 0


def test_doctest():
    mod = importlib.import_module("foldcompile.passes.rules.outer_product_mean")
    assert doctest.testmod(mod).failed == 0


def test_a_chunk_loop_is_merged_back_and_fused_once():
    """AF2's ``chunk_size``: each chunk's outer product ends in a ``cat``; the loop is merged back into one
    layer (passes/merge_chunk_loops.py) and that layer's outer product mean is one fused call."""
    model = _params(OuterProductMean(C_M, Z, C))
    m, mask = _msa(0)
    with torch.no_grad():
        fast = foldcompile.optimize(model, m, mask, 4)
        assert fast.report.counts()["chunk_loop"] == {"matched": 1, "rejected": 0}
        assert fast.report.counts()["outer_product_mean"] == {"matched": 1, "rejected": 0}
        assert torch.allclose(fast(m, mask, 4), model(m, mask, 4), atol=1e-6)
