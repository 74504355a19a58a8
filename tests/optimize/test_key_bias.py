"""The attention rule routes a key-only bias term to the kernel's ``key_bias``.

AlphaFold's triangle and MSA row attention add two terms to the logits: the key-mask bias
``1e9·(mask−1)`` ([B, 1, 1, K]) and the pair bias ([1, H, Q, K]). Summing them would
materialise [B, H, Q, K]; the rule must pass the pair bias as ``bias`` (a view) and the mask
bias as ``key_bias``, say so in the match notes, insert no add feeding the kernel, and still
compute what eager computes (outputs and every gradient, fp32, rel. 1e-5). Where more than
one term varies along queries, those are still summed, and the notes say that too.
"""
from __future__ import annotations

import operator
import os
import sys

import pytest
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from optimize_helpers import assert_same_function  # noqa: E402
from test_zoo_optimize import _h8  # noqa: E402  (zoo classes built with head dim 8)

import foldcompile  # noqa: E402
from foldcompile.passes.rules import attention as rule_mod  # noqa: E402
from foldcompile.passes.rules.attention import fused_attention  # noqa: E402


def _kernel_calls(fast) -> list[torch.fx.Node]:
    return [n for gm in fast.graph_module.modules() if isinstance(gm, torch.fx.GraphModule)
            for n in gm.graph.nodes if n.op == "call_function" and n.target is fused_attention]


def _inserted_ancestors(n: torch.fx.Node) -> list[torch.fx.Node]:
    """Nodes the attention rule inserted upstream of ``n`` (stopping at the model's own nodes)."""
    seen, todo = [], [n]
    while todo:
        x = todo.pop()
        if not isinstance(x, torch.fx.Node) or x in seen or x.meta.get("fused_by") != "attention":
            continue
        seen.append(x)
        todo += list(x.all_input_nodes)
    return seen


def _bias_adds(call: torch.fx.Node) -> list[torch.fx.Node]:
    found = []
    for name in ("bias", "key_bias"):
        t = call.kwargs.get(name)
        if isinstance(t, torch.fx.Node):
            found += [a for a in _inserted_ancestors(t) if a.target in (operator.add, torch.add)]
    return found


def _attention_notes(fast) -> dict[str, list[str]]:
    return {m["site"]: m["notes"] for m in fast.report.matches if m["rule"] == "attention"}


# The zoo attentions with a key-mask bias plus a pair bias (MSA column attention has the mask bias alone).
TWO_TERM_SITES = {
    "evoformer_block": ["msa_att_row", "tri_att_start", "tri_att_end"],
    "pairformer_block": ["tri_att_start", "tri_att_end", "attention_pair_bias"],
}


@pytest.mark.parametrize("name", ["evoformer_block", "pairformer_block"])
def test_zoo_triangle_and_row_attention_use_bias_plus_key_bias(name):
    model, inputs = _h8(name)
    fast = foldcompile.optimize(model, *inputs)
    notes = _attention_notes(fast)
    for site in TWO_TERM_SITES[name]:
        hits = [s for s in notes if s.split(".")[0] == site]
        assert len(hits) == 1, (site, notes)
        assert "biases: bias+key_bias" in notes[hits[0]], (site, notes[hits[0]])
    assert not any("summed" in n for ns in notes.values() for n in ns), notes
    calls = _kernel_calls(fast)
    assert len(calls) == len(notes)
    n_key = 0
    for call in calls:
        assert not _bias_adds(call), f"{call.name}: an add feeds the kernel's bias: {_bias_adds(call)}"
        kb = call.kwargs.get("key_bias")
        if kb is not None:
            n_key += 1
    assert n_key == len(TWO_TERM_SITES[name])
    # at run time: every key bias is constant along queries, and no rank-4 bias reaching the kernel
    # has the full [B, H, Q, K] logits shape (the pair bias is shared by the rows: a broadcast view)
    seen = []
    real = rule_mod._attention_kernel

    def spy(q, k, v, *, bias=None, key_bias=None, **kw):
        seen.append((tuple(q.shape[:-1]) + (k.shape[-2],), None if bias is None else tuple(bias.shape),
                     None if key_bias is None else tuple(key_bias.shape)))
        return real(q, k, v, bias=bias, key_bias=key_bias, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rule_mod, "_attention_kernel", spy)
        fast(*inputs)
    assert len(seen) == len(calls)
    with_key = [x for x in seen if x[2] is not None]
    assert len(with_key) == n_key
    for logits, bias, key_bias in with_key:
        assert key_bias[-2] == 1 and len(key_bias) == len(logits), (logits, key_bias)
        # rank 4 (triangle / MSA row): the pair bias broadcasts over one of the two leading axes
        # (AF3's pair-biased single attention is [H, Q, K]: there the pair bias is the logits' size)
        assert bias is not None and (len(logits) < 4 or 1 in bias[:2]), (logits, bias)
    # exact: outputs and every parameter gradient, in eval and training (dropout seeded alike)
    assert_same_function(model, inputs, fast=fast, tol=1e-5)
    model.train()
    assert_same_function(model, inputs, tol=1e-5)


S, L, H, D = 3, 13, 2, 8
C = H * D


class TwoTerms(nn.Module):
    """Triangle-attention style: per-row key-mask bias [S, 1, 1, L] and a shared pair bias [1, H, L, L],
    both learnable-dependent (the mask bias gets a gradient through a parameter)."""

    def __init__(self, extra_query_term: bool = False, key_terms: int = 1):
        super().__init__()
        self.qkv = nn.Linear(C, 3 * C, bias=False)
        self.b = nn.Linear(5, H, bias=False)
        self.w = nn.Parameter(torch.tensor(1.5))
        self.extra, self.key_terms = extra_query_term, key_terms

    def forward(self, x, pair, mask):
        q, k, v = self.qkv(x).view(S, L, 3, H, D).permute(2, 0, 3, 1, 4)
        logits = torch.einsum("shqd,shkd->shqk", q, k) / D ** 0.5
        logits = logits + 1e9 * (mask[:, None, None, :] - 1)
        logits = logits + self.b(pair).permute(2, 0, 1)[None]
        if self.key_terms > 1:
            logits = logits + self.w * mask[:, None, None, :]  # a second key-only term, with a gradient
        if self.extra:
            logits = logits - self.b(pair).permute(2, 1, 0)[None] * 0.5  # a second query-varying term
        o = torch.einsum("shqk,shkd->shqd", torch.softmax(logits, -1), v)
        return o.transpose(1, 2).reshape(S, L, C)


def _inputs():
    g = torch.Generator().manual_seed(0)
    mask = (torch.rand(S, L, generator=g) > 0.3).float()
    mask[1] = 0.0  # a row whose keys are all masked by the -1e9 bias alone
    return torch.randn(S, L, C, generator=g), torch.randn(L, L, 5, generator=g), mask


@pytest.mark.parametrize("extra,key_terms,want", [(False, 1, "bias+key_bias"), (False, 2, "bias+key_bias"),
                                                   (True, 1, f"summed [1, {H}, {L}, {L}]+key_bias")])
def test_split_and_fallback_are_recorded_and_exact(extra, key_terms, want):
    torch.manual_seed(1)
    model = TwoTerms(extra, key_terms)
    inputs = _inputs()
    fast = foldcompile.optimize(model, *inputs)
    notes = list(_attention_notes(fast).values())
    assert notes == [[f"biases: {want}"]], notes
    (call,) = _kernel_calls(fast)
    assert call.kwargs.get("key_bias") is not None
    if not extra:
        assert not _bias_adds(call) or key_terms > 1  # two key terms are summed at [S, 1, 1, L] only
        for a in _bias_adds(call):
            assert a.meta.get("shape") in (None, (S, 1, 1, L)), a.meta.get("shape")
    assert_same_function(model, inputs, fast=fast, tol=1e-5)


class QueryTermsOnly(nn.Module):
    """Two query-varying terms and no key-only one: the split is impossible, today's sum stays."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(C, 3 * C, bias=False)
        self.b = nn.Linear(5, H, bias=False)

    def forward(self, x, pair):
        q, k, v = self.qkv(x).view(S, L, 3, H, D).permute(2, 0, 3, 1, 4)
        logits = torch.einsum("shqd,shkd->shqk", q, k) * D ** -0.5 + self.b(pair).permute(2, 0, 1)[None]
        logits = logits + x[:, None, :, :1]  # [S, 1, L, 1]: per query
        o = torch.einsum("shqk,shkd->shqd", torch.softmax(logits, -1), v)
        return o.transpose(1, 2).reshape(S, L, C)


def test_no_key_term_falls_back_to_the_sum():
    torch.manual_seed(2)
    model = QueryTermsOnly()
    g = torch.Generator().manual_seed(3)
    inputs = (torch.randn(S, L, C, generator=g), torch.randn(L, L, 5, generator=g))
    fast = foldcompile.optimize(model, *inputs)
    assert list(_attention_notes(fast).values()) == [[f"biases: summed [{S}, {H}, {L}, {L}]"]]
    (call,) = _kernel_calls(fast)
    assert call.kwargs.get("key_bias") is None
    assert _bias_adds(call)  # the summed [S, H, L, L] tensor: the check above does see such adds
    assert_same_function(model, inputs, fast=fast, tol=1e-5)
