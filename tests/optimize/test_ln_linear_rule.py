"""The layer norm -> projections rule (passes/rules/ln_multi_linear.py) through ``optimize``: spellings of a
projection (``F.linear``, ``@ W.T``, ``@ Wt``, ``.matmul(W.t())``, einsum both ways, a linear on a row-keeping
reshape, a hand-written layer norm), and the near misses: the layer norm's output also read elsewhere (allowed:
the kernel writes it too), a linear on permuted rows or over another dim, linears on other tensors, a weight
computed after the first reader, an in-place write between the projections, more projections than the kernel
unrolls, rows longer than it holds. Every case: optimized == eager, outputs and every gradient, fp32."""
from __future__ import annotations

import os
import sys

import pytest
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from optimize_helpers import assert_same_function  # noqa: E402

import foldcompile  # noqa: E402
from foldcompile.kernels.ln_linear import MAX_PROJECTIONS, MAX_TRITON_DIM  # noqa: E402

K = 24


def _p(*shape, seed):
    return nn.Parameter(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) / K ** 0.5)


class Projections(nn.Module):
    """One layer norm, then projections of its output spelled as ``spelling`` says."""

    def __init__(self, spelling: str, k: int = K):
        super().__init__()
        self.spelling = spelling
        self.ln = nn.LayerNorm(k)
        with torch.no_grad():
            self.ln.weight.add_(0.3 * torch.randn(k, generator=torch.Generator().manual_seed(9)))
            self.ln.bias.add_(0.3 * torch.randn(k, generator=torch.Generator().manual_seed(8)))
        self.lin = nn.Linear(k, 8)
        self.w = _p(5, k, seed=1)  # [N, K]
        self.wt = _p(k, 12, seed=2)  # [K, N]
        self.many = nn.ModuleList(nn.Linear(k, 3, bias=i % 2 == 0) for i in range(MAX_PROJECTIONS + 1))

    def forward(self, x, t):
        s = self.spelling
        y = self.ln(x)
        if s == "linear":
            return self.lin(y)
        if s == "matmul_w_T":
            return y @ self.w.T
        if s == "matmul_wt":
            return y @ self.wt
        if s == "method_t":
            return y.matmul(self.w.t())
        if s == "einsum_nk":
            return torch.einsum("...k,nk->...n", y, self.w)
        if s == "einsum_kn_weight_first":
            return torch.einsum("kn,bik->bin", self.wt, y)
        if s == "reshape_rows":  # a 2-d linear on the rows, viewed back
            return self.lin(y.reshape(-1, y.shape[-1])).view(*y.shape[:-1], 8)
        if s == "all_together":
            return (self.lin(y), y @ self.w.T, torch.einsum("...k,nk->...n", y, self.w), y @ self.wt,
                    self.lin(y.reshape(-1, y.shape[-1])))
        # near misses
        if s == "also_read_elsewhere":  # a residual reads y: allowed, the kernel writes y too
            return self.lin(y), y @ self.w.T, torch.sigmoid(y) + x
        if s == "permuted_rows":  # rows in another order: that linear keeps reading y
            return self.lin(y), self.lin(y.transpose(0, 1))
        if s == "permuted_rows_only":
            return self.lin(y.transpose(0, 1))
        if s == "over_another_dim":  # contracts the rows, not the channels
            return self.lin(y), y.transpose(-1, -2) @ t
        if s == "weight_from_y":  # a product with y itself is no projection
            return self.lin(y), y @ y.transpose(-1, -2)
        if s == "other_tensors":  # the layer norm's input and another tensor: not its projections
            return self.lin(y), self.lin(x), t @ self.wt
        if s == "weight_computed_late":
            q = self.lin(y)
            w = self.w * t.mean()  # an activation, computed after y's first reader
            return q, y @ w.T
        if s == "in_place_write_between":  # t [5, K]: the caller's tensor, a projection's weight
            q = self.lin(y)
            t.mul_(2.0)  # written between the two projections: the fused call would read it before
            return q, y @ t.T
        if s == "too_many":
            return tuple(lin(y) for lin in self.many)
        raise ValueError(s)


def _inputs(seed: int = 0, k: int = K):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(3, 7, k, generator=g) * 1.5 + 0.5).requires_grad_()
    return x, torch.randn(3, 7, k, generator=g)


def _ln_matches(fast):
    return [m for m in fast.report.matches if m["rule"] == "ln_linear"]


SPELLINGS = ["linear", "matmul_w_T", "matmul_wt", "method_t", "einsum_nk", "einsum_kn_weight_first", "reshape_rows"]


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_each_spelling_of_a_projection_is_fused_with_its_layer_norm(spelling):
    model = Projections(spelling)
    fast = foldcompile.optimize(model, *_inputs())
    counts = fast.report.counts()
    assert counts["ln_linear"] == {"matched": 1, "rejected": 0} and counts["layer_norm"]["matched"] == 0
    assert "fused_layer_norm_linear(" in fast.code and "fused_layer_norm(" not in fast.code
    assert "y written too" not in _ln_matches(fast)[0]["notes"][0]
    assert_same_function(model, _inputs(1), fast)


def test_all_spellings_together_are_one_call_with_every_projection():
    model = Projections("all_together")
    fast = foldcompile.optimize(model, *_inputs())
    (match,) = _ln_matches(fast)
    assert match["notes"][0] == "5 projections of widths [8, 5, 5, 12, 8]"
    assert fast.code.count("fused_layer_norm_linear(") == 1
    assert_same_function(model, _inputs(1), fast)
    model.train()
    assert_same_function(model, _inputs(2), fast)


def test_a_hand_written_layer_norm_feeding_projections():
    class HandLN(nn.Module):
        def __init__(self):
            super().__init__()
            self.g, self.b = nn.Parameter(1 + 0.2 * torch.randn(K)), nn.Parameter(0.2 * torch.randn(K))
            self.q, self.k = nn.Linear(K, 8, bias=False), nn.Linear(K, 6)

        def forward(self, x, t):
            d = x - x.mean(-1, keepdim=True)
            y = d * torch.rsqrt(d.pow(2).mean(-1, keepdim=True) + 1e-5) * self.g + self.b
            return self.q(y), self.k(y)

    model = HandLN()
    fast = foldcompile.optimize(model, *_inputs())
    assert fast.report.counts()["ln_linear"]["matched"] == 1 and fast.report.counts()["hand_layer_norm"]["matched"] == 0
    assert_same_function(model, _inputs(1), fast)


@pytest.mark.parametrize("spelling, folded, readers", [
    ("also_read_elsewhere", "2 projections of widths [8, 5]", "sigmoid"),
    ("permuted_rows", "1 projection of widths [8]", "transpose"),
    ("over_another_dim", "1 projection of widths [8]", "transpose"),
    ("weight_from_y", "1 projection of widths [8]", "matmul, transpose"),
    ("weight_computed_late", "1 projection of widths [8]", "matmul"),
])
def test_other_readers_of_the_layer_norm_keep_reading_it(spelling, folded, readers):
    """What is not a projection of the layer norm's rows (or cannot be computed where the call runs) reads
    the layer norm's output, which the kernel then writes as well: same function, every gradient."""
    model = Projections(spelling)
    fast = foldcompile.optimize(model, *_inputs())
    (match,) = _ln_matches(fast)
    assert match["notes"][0].startswith(folded + "; y written too, for its other readers " + readers), match["notes"]
    assert fast.report.counts()["layer_norm"]["matched"] == 0
    assert_same_function(model, _inputs(1), fast)


def test_a_layer_norm_whose_only_linear_reads_permuted_rows_is_fused_alone():
    model = Projections("permuted_rows_only")
    fast = foldcompile.optimize(model, *_inputs())
    counts = fast.report.counts()
    assert counts["ln_linear"] == {"matched": 0, "rejected": 0} and counts["layer_norm"]["matched"] == 1
    assert_same_function(model, _inputs(1), fast)


def test_linears_on_other_tensors_are_not_taken():
    """A linear on the layer norm's input and a product of another tensor stay plain products."""
    model = Projections("other_tensors")
    fast = foldcompile.optimize(model, *_inputs())
    (match,) = _ln_matches(fast)
    assert match["notes"] == ["1 projection of widths [8]"]
    assert fast.code.count("F.linear(") == 1 and fast.code.count("torch.matmul(") == 1, fast.code
    assert_same_function(model, _inputs(1), fast)


def test_two_layer_norms_of_different_inputs_are_two_calls():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_a, self.ln_b = nn.LayerNorm(K), nn.LayerNorm(K)
            self.a, self.b = nn.Linear(K, 8), nn.Linear(K, 4, bias=False)

        def forward(self, x, t):
            yb = self.ln_b(t)
            return self.a(self.ln_a(x)) + self.b(yb).sum(-1, keepdim=True), self.a(yb)

    model = Two()
    fast = foldcompile.optimize(model, *_inputs())
    assert sorted(m["notes"][0] for m in _ln_matches(fast)) == ["1 projection of widths [8]",
                                                                "2 projections of widths [4, 8]"]
    assert_same_function(model, _inputs(1), fast)


def test_an_in_place_write_between_the_projections_is_refused():
    model = Projections("in_place_write_between")
    x, t = _inputs()[0], torch.randn(5, K)
    fast = foldcompile.optimize(model, x, t.clone())
    (rej,) = [r for r in fast.report.rejections if r["rule"] == "ln_linear"]
    assert rej["reason"].startswith("an in-place write (mul_) lies between the layer norm's first reader"), rej
    assert fast.report.counts()["layer_norm"]["matched"] == 1  # fused alone
    x, t = _inputs(1)[0], torch.randn(5, K)
    t1, t2 = t.clone(), t.clone()
    for a, b in zip(fast(x, t1), model(x, t2)):
        assert torch.allclose(a, b, atol=1e-5)
    assert torch.equal(t1, t2)


def test_projections_past_the_kernel_s_limit_read_the_layer_norm():
    model = Projections("too_many")
    fast = foldcompile.optimize(model, *_inputs())
    (match,) = _ln_matches(fast)
    assert match["notes"][0].startswith(f"{MAX_PROJECTIONS} projections of widths")
    assert any(f"more than {MAX_PROJECTIONS} projections" in n for n in match["notes"])
    assert_same_function(model, _inputs(1), fast)


def test_rows_longer_than_the_kernel_holds_are_refused_and_the_layer_norm_fused_alone():
    k = MAX_TRITON_DIM + 8
    model = Projections("linear", k=k)
    fast = foldcompile.optimize(model, *_inputs(k=k))
    (rej,) = [r for r in fast.report.rejections if r["rule"] == "ln_linear"]
    assert rej["reason"] == (f"not profitable at the stated size: rows of {k} > {MAX_TRITON_DIM} channels run the "
                             "kernel's reference (the layer norm is fused alone)")
    assert fast.report.counts()["layer_norm"]["matched"] == 1
