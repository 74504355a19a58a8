"""The chunk-merging rule: a Python loop of one attention over query or batch chunks, concatenated,
becomes one fused attention; loops whose pieces do not tile one attention stay one call per chunk.

Every case compares the optimized module with eager on outputs and every gradient; chunk
lengths do not divide the axis (the last chunk is shorter).
"""
from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from optimize_helpers import assert_same_function  # noqa: E402

import foldcompile  # noqa: E402

B, H, L, D = 5, 2, 7, 8


def _t(g, *shape):
    return torch.randn(*shape, generator=g).requires_grad_()


class QueryChunks(nn.Module):
    """Protenix-style: the queries (and the bias rows) cut into chunks, k / v and the key mask whole,
    each piece upcast with ``.to(torch.float32)``; ``spelling`` picks the slicing."""

    def __init__(self, chunk: int = 3, spelling: str = "getitem"):
        super().__init__()
        self.chunk, self.spelling = chunk, spelling

    def piece(self, q, k, v, bias, key_bias):
        logits = q.to(torch.float32) @ k.to(torch.float32).transpose(-1, -2) * D ** -0.5 + bias + key_bias
        return torch.softmax(logits, dim=-1).to(v.dtype) @ v

    def forward(self, q, k, v, bias, mask):
        key_bias = (mask[:, None, None, :] - 1.0) * 1e9  # [B, 1, 1, K]: no query axis, passed whole
        pieces = []
        for i in range(0, q.shape[-2], self.chunk):
            n = min(self.chunk, q.shape[-2] - i)
            if self.spelling == "narrow":
                qi, bi = q.narrow(-2, i, n), bias.narrow(-2, i, n)
            else:
                qi, bi = q[..., i:i + self.chunk, :], bias[:, :, i:i + self.chunk]
            pieces.append(self.piece(qi, k, v, bi, key_bias))
        return torch.cat(pieces, dim=-2)


class BatchChunks(nn.Module):
    """OpenFold-style ``_attention_chunked_trainable``: q, k, v and the mask bias cut along the
    batch (MSA row) axis, the pair bias (size 1 there) passed whole, each piece transposed to
    ``[*, Q, H, D]`` before the concatenation; a boolean ``-inf`` mask with rows that keep nothing."""

    def __init__(self, chunk: int = 2):
        super().__init__()
        self.chunk = chunk

    def forward(self, q, k, v, pair_bias, keep):
        pieces = []
        for i in range(0, q.shape[0], self.chunk):
            s = slice(i, i + self.chunk)
            a = torch.matmul(q[s], k[s].transpose(-1, -2)) / D ** 0.5 + pair_bias[:, :, :, :]
            a = a.masked_fill(~keep[s], float("-inf"))
            pieces.append(torch.matmul(torch.softmax(a, -1), v[s]).transpose(-2, -3))
        return torch.cat(pieces, dim=-4)


def _query_inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(B, L, generator=g) > 0.3).float()
    mask[:, 0] = 1.0
    return _t(g, B, H, L, D), _t(g, B, H, L, D), _t(g, B, H, L, D), _t(g, 1, H, L, L), mask


def _batch_inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(B, 1, 1, L, generator=g) > 0.4
    keep[1:, ..., 0] = True
    keep[3] = False  # a batch row whose queries keep no key: NaN there, as in eager
    return _t(g, B, H, L, D), _t(g, B, H, L, D), _t(g, B, H, L, D), _t(g, 1, H, L, L), keep


def _fused_calls(fast) -> int:
    return fast.code.count("fused_attention(")


@pytest.mark.parametrize("spelling", ["getitem", "narrow"])
def test_query_chunks_become_one_fused_attention(spelling):
    model = QueryChunks(spelling=spelling)
    fast = foldcompile.optimize(model, *_query_inputs(0))
    counts = fast.report.counts()
    assert counts["chunked_attention"] == {"matched": 1, "rejected": 0}, fast.report
    assert counts["attention"] == {"matched": 0, "rejected": 0}
    assert _fused_calls(fast) == 1 and "torch.cat(" not in fast.code
    (match,) = fast.report.matches[:1]
    assert "3 chunks along the queries merged" in match["notes"]
    assert "biases: bias+key_bias" in match["notes"]  # the key mask stays [B, 1, 1, K]
    assert_same_function(model, _query_inputs(1), fast)


def test_batch_chunks_with_a_boolean_mask_and_rows_that_keep_nothing():
    model = BatchChunks()
    fast = foldcompile.optimize(model, *_batch_inputs(0))
    assert fast.report.counts()["chunked_attention"] == {"matched": 1, "rejected": 0}, fast.report
    assert _fused_calls(fast) == 1 and "empty_rows = 'nan'" in fast.code  # the kernel writes eager's NaN
    inputs = _batch_inputs(1)
    out, ref = fast(*inputs), model(*inputs)
    assert torch.equal(torch.isnan(out), torch.isnan(ref)) and torch.isnan(ref[3]).all()
    keep = ~torch.isnan(ref)
    assert torch.allclose(out[keep], ref[keep], rtol=1e-5, atol=1e-6)


class NotOneAttention(nn.Module):
    """Pieces that are attentions but do not tile one: ``kind`` says how."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def attend(self, q, k, v, scale=D ** -0.5):
        return torch.softmax(q @ k.transpose(-1, -2) * scale, -1) @ v

    def forward(self, q, k, v, q2):
        kind = self.kind
        if kind == "overlap":  # rows 2..3 twice
            return torch.cat([self.attend(q[:, :, :4], k, v), self.attend(q[:, :, 2:], k, v)], dim=-2)
        if kind == "gap":  # row 3 left out
            return torch.cat([self.attend(q[:, :, :3], k, v), self.attend(q[:, :, 4:], k, v)], dim=-2)
        if kind == "other_scale":
            return torch.cat([self.attend(q[:, :, :3], k, v), self.attend(q[:, :, 3:], k, v, 0.5)], dim=-2)
        if kind == "other_tensor":
            return torch.cat([self.attend(q[:, :, :3], k, v), self.attend(q2[:, :, 3:], k, v)], dim=-2)
        if kind == "joined_elsewhere":  # cut along the queries, joined along the batch
            return torch.cat([self.attend(q[:, :, :3], k, v), self.attend(q[:, :, 3:6], k, v)], dim=0)
        raise ValueError(kind)


@pytest.mark.parametrize("kind, reason", [
    ("overlap", "do not tile the axis"),
    ("gap", "do not tile the axis"),
    ("other_scale", "not the same attention"),
    ("other_tensor", "the chunks' q are not slices of one tensor"),
    ("joined_elsewhere", "cut along another axis than the one they are joined on"),
])
def test_pieces_that_are_not_one_attention_stay_one_call_each(kind, reason):
    g = torch.Generator().manual_seed(0)
    inputs = tuple(_t(g, B, H, L, D) for _ in range(4))
    model = NotOneAttention(kind)
    fast = foldcompile.optimize(model, *inputs)
    counts = fast.report.counts()
    assert counts["chunked_attention"] == {"matched": 0, "rejected": 1}, fast.report
    assert reason in next(r["reason"] for r in fast.report.rejections if r["rule"] == "chunked_attention")
    assert counts["attention"] == {"matched": 2, "rejected": 0}
    assert_same_function(model, tuple(_t(g, B, H, L, D) for _ in range(4)), fast)


def test_chunks_doctest():
    import doctest

    module = importlib.import_module("foldcompile.passes.rules.attention_chunks")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
