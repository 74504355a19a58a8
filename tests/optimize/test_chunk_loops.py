"""Chunk loops of a whole layer (passes/merge_chunk_loops.py): a layer run on chunks of rows in a
Python loop — projections, attention, gate and output linear per chunk, or a transition — and joined
(stored into a preallocated buffer, or concatenated) is merged into the layer run once, so its
attention becomes ONE fused attention; loops that are not one row-independent layer stay, with the
reason. Every case: optimized == eager on fresh inputs, outputs and every gradient; the last chunk
is shorter than the others.
"""
from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

sys.path.insert(0, os.path.dirname(__file__))
from optimize_helpers import assert_same_function  # noqa: E402

import foldcompile  # noqa: E402

H, D = 2, 8
C = H * D


class GatedAttention(nn.Module):
    """Gated multi-head attention over the second-to-last dim with an additive key-mask bias."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(C, C, bias=False), nn.Linear(C, C, bias=False), nn.Linear(C, C, bias=False)
        self.g, self.o = nn.Linear(C, C), nn.Linear(C, C)

    def forward(self, x, bias):  # x [B, L, C], bias [B or 1, 1, 1, L]
        def heads(t):
            return t.view(t.shape[:-1] + (H, D)).transpose(-2, -3)

        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        w = torch.softmax(q @ k.transpose(-1, -2) * D ** -0.5 + bias, dim=-1)
        o = (w @ v).transpose(-2, -3)
        o = torch.sigmoid(self.g(x)).view(o.shape) * o
        return self.o(o.reshape(x.shape))


class BufferLoop(nn.Module):
    """OpenFold's ``chunk_layer``: rows of x (and of the bias where it has them) in chunks, each
    chunk's layer output written into a buffer preallocated on the first chunk."""

    def __init__(self, chunk: int = 3):
        super().__init__()
        self.chunk, self.norm, self.att = chunk, nn.LayerNorm(C), GatedAttention()

    def forward(self, x, mask):
        x = self.norm(x)
        bias = (1e9 * (mask - 1))[:, None, None, :]
        out = None
        for s in range(0, x.shape[0], self.chunk):
            res = self.att(x[s:s + self.chunk], bias[s:s + self.chunk])
            if out is None:
                out = res.new_zeros((x.shape[0],) + res.shape[1:])
            out[s:s + self.chunk] = res
        return out


class CatNarrowTransition(nn.Module):
    """The zoo's ``_chunk_loop`` on a SwiGLU transition: ``narrow`` chunks along dim -2, concatenated."""

    def __init__(self, chunk: int = 4):
        super().__init__()
        self.chunk = chunk
        self.norm, self.a, self.b, self.out = nn.LayerNorm(C), nn.Linear(C, 2 * C), nn.Linear(C, 2 * C), nn.Linear(2 * C, C)

    def layer(self, x):
        x = self.norm(x)
        return self.out(F.silu(self.a(x)) * self.b(x))

    def forward(self, z):
        n = z.shape[-2]
        pieces = [self.layer(z.narrow(-2, s, min(self.chunk, n - s))) for s in range(0, n, self.chunk)]
        return torch.cat(pieces, dim=-2)


class PairBiasQueryChunks(nn.Module):
    """Pairformer-style attention with pair bias: queries and the pair rows in chunks (``q[:, s:e]``,
    the bias computed per chunk from ``z[s:e]``), k and v whole, pieces concatenated along the queries."""

    def __init__(self, chunk: int = 3):
        super().__init__()
        self.chunk = chunk
        self.norm_s, self.norm_z = nn.LayerNorm(C), nn.LayerNorm(8)
        self.q, self.k, self.v = nn.Linear(C, C), nn.Linear(C, C, bias=False), nn.Linear(C, C, bias=False)
        self.pair_bias = nn.Linear(8, H, bias=False)

    def forward(self, s, z):  # s [L, C], z [L, L, 8]
        a = self.norm_s(s)
        q, k, v = (f(a).view(a.shape[0], H, D) for f in (self.q, self.k, self.v))
        pieces = []
        for i in range(0, s.shape[0], self.chunk):
            b = self.pair_bias(self.norm_z(z[i:i + self.chunk])).permute(2, 0, 1)  # [H, c, L]
            logits = torch.einsum("ihd,jhd->hij", q[i:i + self.chunk], k) * D ** -0.5 + b
            pieces.append(torch.einsum("hij,jhd->ihd", torch.softmax(logits, -1), v))
        return torch.cat(pieces, dim=0).reshape(s.shape)


class CheckpointedBufferLoop(nn.Module):
    """A chunk loop inside an activation checkpoint (inference chunking of a checkpointed block)."""

    def __init__(self):
        super().__init__()
        self.inner = BufferLoop()

    def forward(self, x, mask):
        return checkpoint(self.inner, x, mask, use_reentrant=False) * 2.0


def _x(g, *shape):
    return torch.randn(*shape, generator=g).requires_grad_()


def _rows_inputs(seed, rows=8, length=7):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(rows, length, generator=g) > 0.3).float()
    mask[:, 0] = 1.0
    return _x(g, rows, length, C), mask


def _counts(fast):
    return fast.report.counts()


def _check_merged(model, inputs, fresh, attentions=1):
    fast = foldcompile.optimize(model, *inputs)
    counts = _counts(fast)
    assert counts["chunk_loop"] == {"matched": 1, "rejected": 0}, fast.report
    assert counts["attention"]["matched"] == attentions, fast.report
    assert fast.code.count("fused_attention(") == attentions
    assert "chunk_loop#0" in str(fast.report) and "chunks of" in fast.report.matches[0]["notes"][0]
    assert_same_function(model, fresh, fast)
    return fast


def test_a_layer_stored_chunk_by_chunk_into_a_buffer_is_one_fused_attention():
    fast = _check_merged(BufferLoop(), _rows_inputs(0), _rows_inputs(1))
    assert "new_zeros" not in fast.code and "setitem" not in fast.code
    counts = fast.report.counts()  # the layer norm once (with the projections it feeds), not per chunk
    assert counts["layer_norm"]["matched"] + counts["ln_linear"]["matched"] == 1
    assert "3 chunks of 3 rows merged" in fast.report.matches[0]["notes"][0]


def test_a_transition_in_narrow_chunks_along_a_middle_dim_is_one_layer():
    model = CatNarrowTransition()
    g = torch.Generator().manual_seed(0)
    fast = foldcompile.optimize(model, _x(g, 3, 10, C))
    counts = _counts(fast)
    assert counts["chunk_loop"] == {"matched": 1, "rejected": 0}, fast.report
    # the layer norm with the first projection, once: one layer-norm -> projections call
    assert counts["ln_linear"] == {"matched": 1, "rejected": 0} and counts["elementwise"]["matched"] == 1
    assert fast.code.count("fused_layer_norm_linear(") == 1 and "torch.cat(" not in fast.code
    assert_same_function(model, (_x(g, 3, 10, C),), fast)


def test_query_chunks_with_a_per_chunk_pair_bias_are_one_fused_attention():
    model = PairBiasQueryChunks()
    g = torch.Generator().manual_seed(0)
    fast = _check_merged(model, (_x(g, 7, C), _x(g, 7, 7, 8)), (_x(g, 7, C), _x(g, 7, 7, 8)))
    counts = fast.report.counts()  # the pair's layer norm once, not per chunk (alone or with its projections)
    assert counts["layer_norm"]["matched"] + counts["ln_linear"]["matched"] == 2


@pytest.mark.full
def test_a_chunk_loop_inside_a_checkpoint_body_is_merged_there():
    model = CheckpointedBufferLoop().train()
    fast = _check_merged(model, _rows_inputs(0), _rows_inputs(1))
    assert fast.report.matches[0]["graph"] == "GraphModule"
    body = fast.code.split("# wrap_body_0")[1]
    assert "fused_attention(" in body


def test_eval_mode_chunking_of_a_whole_layer_verifies_and_the_merge_can_be_disabled():
    """verify compares the merged layer with the traced loop in float64; bisect's switch
    (``disabled``) leaves the loop as it was, each chunk's attention fused on its own."""
    model = BufferLoop().eval()
    inputs = _rows_inputs(2)
    report = foldcompile.verify(model, *inputs)
    assert report.ok, str(report)
    from foldcompile.optimize import build_variant
    variant = build_variant(model, inputs, {}, disabled=["chunk_loop#0"])
    assert variant.record["disabled"][0]["id"] == "chunk_loop#0"
    assert variant.record["counts"]["attention"]["matched"] == 3


@pytest.mark.full
def test_a_merged_layer_that_does_not_run_keeps_the_loop(monkeypatch):
    """Annotating the merged graph runs it at the full row count; should that fail, the variant keeps
    the loop (each chunk fused on its own) and the report says why."""
    optimize_module = importlib.import_module("foldcompile.optimize")
    real = optimize_module._annotate

    def failing(gm, values, dims):
        if any(n.meta.get("merged_by") for n in gm.graph.nodes):
            raise RuntimeError("view size is not compatible with input tensor's size and stride")
        return real(gm, values, dims)

    monkeypatch.setattr(optimize_module, "_annotate", failing)
    model = BufferLoop()
    fast = foldcompile.optimize(model, *_rows_inputs(0))
    counts = _counts(fast)
    assert counts["chunk_loop"] == {"matched": 0, "rejected": 1} and counts["attention"]["matched"] == 3
    (why,) = [r["reason"] for r in fast.report.rejections if r["rule"] == "chunk_loop"]
    assert "the merged layer does not run at the full row count" in why
    assert_same_function(model, _rows_inputs(1), fast)


# ------------------------------------------------------------------------------------- near misses


class NearMiss(nn.Module):
    """A buffer loop over a gated attention whose chunks are NOT one row-independent layer: ``kind``."""

    def __init__(self, kind: str, chunk: int = 3):
        super().__init__()
        self.kind, self.chunk = kind, chunk
        self.att = GatedAttention()
        self.row_scale = nn.Parameter(torch.rand(chunk, 1, 1) + 0.5)

    def piece(self, x, bias, s):
        kind = self.kind
        if kind == "softmax_over_rows":  # each chunk normalises across its own rows
            x = x * torch.softmax(x, dim=0)
        elif kind == "mean_over_rows":  # each chunk centres on its own rows' mean
            x = x - x.mean(dim=0, keepdim=True)
        elif kind == "per_chunk_parameter":  # a parameter laid along the chunk's rows
            x = x * self.row_scale[: x.shape[0]]
        elif kind == "rows_merged_by_a_view":  # the rows merged into one dim with the sequence
            x = torch.softmax(x.reshape(-1, C), dim=0).reshape(x.shape)
        elif kind == "other_op_in_a_chunk" and s > 0:
            x = x * 2.0
        elif kind == "dropout":
            x = F.dropout(x, 0.25, self.training)
        return self.att(x, bias)

    def forward(self, x, mask):
        bias = (1e9 * (mask - 1))[:, None, None, :]
        n = x.shape[0]
        if self.kind == "overlap":  # rows 2..3 stored twice (the second write wins)
            cuts = [(0, 4), (2, n)]
        elif self.kind == "gap":  # row 3 never written: it keeps the buffer's zeros
            cuts = [(0, 3), (4, n)]
        else:
            cuts = [(s, min(s + self.chunk, n)) for s in range(0, n, self.chunk)]
        out = None
        for s, e in cuts:
            res = self.piece(x[s:e], bias[s:e], s)
            if out is None:
                out = res.new_zeros((n,) + res.shape[1:])
            out[s:e] = res
        return out


_full = pytest.mark.full


@pytest.mark.parametrize("kind, reason", [
    ("softmax_over_rows", "no rule shows its rows independent"),
    pytest.param("mean_over_rows", "no rule shows its rows independent", marks=_full),
    pytest.param("per_chunk_parameter", "no rule shows its rows independent", marks=_full),
    pytest.param("rows_merged_by_a_view", "no rule shows its rows independent", marks=_full),
    ("other_op_in_a_chunk", "does not run the same ops as chunk 0"),
    ("overlap", "do not tile the rows in order"),
    pytest.param("gap", "do not tile the rows in order", marks=_full),
])
def test_loops_that_are_not_one_row_independent_layer_stay(kind, reason):
    model = NearMiss(kind)
    fast = foldcompile.optimize(model, *_rows_inputs(0))
    counts = _counts(fast)
    assert counts["chunk_loop"] == {"matched": 0, "rejected": 1}, fast.report
    (why,) = [r["reason"] for r in fast.report.rejections if r["rule"] == "chunk_loop"]
    assert reason in why, why
    assert counts["attention"]["matched"] == 2 if kind in ("overlap", "gap") else 3
    assert_same_function(model, _rows_inputs(1), fast)


@pytest.mark.full
def test_a_loop_that_draws_dropout_per_chunk_stays_in_training():
    """One dropout over all rows draws other numbers than one per chunk: the loop stays (train)."""
    model = NearMiss("dropout").train()
    fast = foldcompile.optimize(model, *_rows_inputs(0))
    (why,) = [r["reason"] for r in fast.report.rejections if r["rule"] == "chunk_loop"]
    assert "draws random numbers" in why
    assert_same_function(model, _rows_inputs(1), fast)
    model.eval()  # no dropout in eval: one layer
    fast = foldcompile.optimize(model, *_rows_inputs(0))
    assert _counts(fast)["chunk_loop"] == {"matched": 1, "rejected": 0}, fast.report


def test_chunk_loops_doctest():
    import doctest

    module = importlib.import_module("foldcompile.passes.merge_chunk_loops")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
