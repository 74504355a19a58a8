"""Every zoo model through ``optimize``: match counts, and optimized == eager (outputs and every
parameter gradient, fp32, relative 1e-5), in eval and in training, on fresh random inputs.

The zoo's tiny sizes have head dim 4, below the attention kernel's minimum of 8: there every
attention must be *rejected with that reason* (and its softmax fused alone). The ``_h8``
builds are the same zoo classes with head dims 8 (a constructor argument, the model code is
untouched), where every attention must go into the fused kernel. Sequence sizes are not
multiples of the kernels' block sizes. Dropout stays on torch's generator, so training-mode
runs are compared exactly by seeding both runs alike.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from optimize_helpers import assert_same_function, rel  # noqa: E402

import foldcompile  # noqa: E402
from foldcompile.models import zoo  # noqa: E402
from foldcompile.models.alphafold2.evoformer import EvoformerBlock  # noqa: E402
from foldcompile.models.alphafold2.extra_msa import ExtraMSAStack  # noqa: E402
from foldcompile.models.alphafold2.model import AlphaFold2  # noqa: E402
from foldcompile.models.alphafold2.template import TemplatePairStack  # noqa: E402
from foldcompile.models.pairformer import PairformerBlock  # noqa: E402

full = pytest.mark.full


def _h8(name: str, seed: int = 0, **sizes):
    """Zoo model ``name`` with head dims 8 (every other size the zoo's tiny one) and zoo inputs."""
    _, inputs = zoo.get(name, seed=seed, **sizes)
    d = zoo._dims("tiny")
    if name == "evoformer_block":
        kw = zoo._evoformer_kwargs("tiny")
        kw.update(c_hidden_msa_att=8, c_hidden_pair_att=8)
        model = EvoformerBlock(**kw)
    elif name == "pairformer_block":
        kw = zoo._pf_dims("tiny")
        kw.update(c_hidden_single=8, c_hidden_pair=8)
        model = PairformerBlock(**kw)
    elif name == "extra_msa_stack":
        model = ExtraMSAStack(1, c_e=d["c_e"], c_z=d["c_z"], c_hidden_msa_att=8, n_heads_msa=2, c_hidden_opm=4,
                              c_hidden_mul=8, c_hidden_pair_att=8, n_heads_pair=2, transition_n=2)
    elif name == "template_pair_stack":
        model = TemplatePairStack(1, c_t=8, c_hidden_tri_att=8, n_heads_tri=2, c_hidden_tri_mul=8, transition_n=2)
    elif name == "alphafold2":
        kw = zoo._evoformer_kwargs("tiny")
        kw.update(c_hidden_msa_att=8, c_hidden_pair_att=8)
        model = AlphaFold2(n_evoformer_blocks=1, n_extra_blocks=1, n_template_blocks=1, n_recycle=1, **kw,
                           c_s=d["c_s"], c_e=d["c_e"], c_t=d["c_t"], c_hidden_extra_msa_att=8, n_heads_extra_msa=2,
                           c_hidden_template_att=8, n_heads_template=2, c_hidden_template_mul=8,
                           c_hidden_template_pointwise=8, n_heads_template_pointwise=2, c_ipa=4, n_heads_ipa=2,
                           n_query_points=2, n_value_points=2, c_resnet=8, n_structure_layers=2, n_distogram_bins=10)
    else:
        raise KeyError(name)
    return zoo.randomize_parameters(model, seed).eval(), inputs


# matches expected with head dims 8: every attention of the model in the fused kernel, the MSA
# stacks' outer product mean in its own (the Pairformer has none), both triangle multiplications in
# theirs (with their two layer norms each), and every other layer norm that feeds projections in a
# layer norm -> projections kernel (alone: only the template stack's final one)
EXPECTED_H8 = {
    "evoformer_block": {"attention": 4, "ln_linear": 8, "layer_norm": 0, "softmax": 0, "outer_product_mean": 1,
                        "triangle_multiplication": 2},
    "pairformer_block": {"attention": 3, "ln_linear": 6, "layer_norm": 0, "softmax": 0, "outer_product_mean": 0,
                         "triangle_multiplication": 2},
    "extra_msa_stack": {"attention": 4, "ln_linear": 8, "layer_norm": 0, "softmax": 0, "outer_product_mean": 1,
                        "triangle_multiplication": 2},
    "template_pair_stack": {"attention": 2, "ln_linear": 3, "layer_norm": 1, "softmax": 0, "outer_product_mean": 0,
                            "triangle_multiplication": 2},
}


def _matched(fast) -> dict[str, int]:
    return {rule: c["matched"] for rule, c in fast.report.counts().items()}


@pytest.mark.parametrize("name", ["evoformer_block", "pairformer_block"])
def test_trunk_blocks_every_attention_fused_eval_and_train(name):
    model, inputs = _h8(name)
    fast = foldcompile.optimize(model, *inputs)
    got = _matched(fast)
    assert {k: got[k] for k in EXPECTED_H8[name]} == EXPECTED_H8[name]
    assert fast.report.counts()["attention"]["rejected"] == 0
    assert assert_same_function(model, inputs, fast) <= 1e-5
    # fresh inputs, sizes not multiples of any block size
    _, fresh = zoo.get(name, seed=7, n_res=13, **({"n_seq": 6} if name == "evoformer_block" else {}))
    assert_same_function(model, fresh, fast)
    model.train()  # dropout: the same torch generator state for both runs
    assert_same_function(model, inputs, fast)
    assert len(fast.variants) == 3 and "training mode False -> True" in fast.variants.misses


_SLOW = ("alphafold2", "evoformer_stack", "pairformer_stack", "extra_msa_stack", "template_pair_stack",
         "structure_module")


# alphafold2 is covered by test_alphafold2_every_trunk_attention_fused (its IPA rejections included)
@pytest.mark.parametrize("name", [pytest.param(n, marks=full) if n in _SLOW else n for n in zoo.names()
                                  if n != "alphafold2"])
def test_every_zoo_model_at_tiny_size_rejects_head_dim_4_with_the_reason(name):
    model, inputs = zoo.get(name)
    fast = foldcompile.optimize(model, *inputs)
    counts = fast.report.counts()
    rejected = [r for r in fast.report.rejections if r["rule"] == "attention"]
    assert counts["attention"]["matched"] == 0 and rejected
    for r in rejected:  # IPA's weights have 3 users (its scalar, point and pair terms)
        assert r["reason"] == ("the attention weights have 3 users" if r["site"].endswith("ipa") else
                               "head dim 4 < 8"), r
    with torch.no_grad():
        assert_same_function(model, inputs, fast, grads=False)


@full
@pytest.mark.parametrize("name", ["extra_msa_stack", "template_pair_stack"])
def test_stacks_every_attention_fused(name):
    model, inputs = _h8(name)
    fast = foldcompile.optimize(model, *inputs)
    got = _matched(fast)
    assert {k: got[k] for k in EXPECTED_H8[name]} == EXPECTED_H8[name]
    assert fast.report.counts()["attention"]["rejected"] == 0
    assert_same_function(model, inputs, fast)  # training mode is checked on the blocks (quick tier)


@full
def test_alphafold2_every_trunk_attention_fused():
    model, inputs = _h8("alphafold2")
    fast = foldcompile.optimize(model, *inputs)
    rejected = [r for r in fast.report.rejections if r["rule"] == "attention"]
    # only IPA's softmax (weights with three users) is not an attention the kernel can take
    assert all(r["reason"] == "the attention weights have 3 users" and "ipa" in r["site"] for r in rejected)
    sites = {m["site"] for m in fast.report.matches if m["rule"] == "attention"}
    for part in ("msa_att_row", "msa_att_col", "tri_att_start", "tri_att_end", "global_attention",
                 "template_pointwise"):
        assert any(part in s for s in sites), (part, sorted(sites))
    opm_sites = sorted(m["site"] for m in fast.report.matches if m["rule"] == "outer_product_mean")
    # the Evoformer's and the extra MSA stack's, in every recycling iteration
    assert {s.split(".")[0] for s in opm_sites} == {"evoformer", "extra_msa_stack"}, opm_sites
    assert fast.report.counts()["outer_product_mean"]["rejected"] == 0
    assert_same_function(model, inputs, fast)


def test_optimizer_step_on_model_parameters_is_seen_by_the_next_call():
    model, inputs = _h8("pairformer_block")
    fast = foldcompile.optimize(model, *inputs)
    assert all(a is b for a, b in zip(fast.parameters(), model.parameters()))
    assert fast.state_dict().keys() == model.state_dict().keys()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)  # a small step: the model stays well-conditioned
    before = [t.detach().clone() for t in fast(*inputs)]
    loss = sum(t.square().sum() for t in fast(*inputs))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    opt.step()
    after = fast(*inputs)
    assert any(not torch.allclose(a, b) for a, b in zip(after, before))
    ref = model(*inputs)
    assert all(rel(a, b) <= 1e-5 for a, b in zip(after, ref)), [rel(a, b) for a, b in zip(after, ref)]


def test_world_size_above_one_needs_a_process_group_of_that_size():
    """DAP sharding (tests/distributed/test_optimize_sharded.py) runs on every rank of a group."""
    model, inputs = zoo.get("evoformer_block")
    with pytest.raises(RuntimeError, match="needs an initialized process group of 2 ranks"):
        foldcompile.optimize(model, *inputs, world_size=2)


def test_explain_of_an_optimized_module_is_its_report():
    model, inputs = _h8("evoformer_block")
    fast = foldcompile.optimize(model, *inputs)
    report = foldcompile.explain(fast)
    text = str(report)
    assert "attention#0" in text and "msa_att_row.mha" in text and "left unfused" in text
    assert report.record["at"] == {"N_seq": 128, "N_res": 256}
    # every unfused reduction/element-wise node has a reason from the closed list
    from foldcompile.passes.fuse import UNFUSED_REASONS
    assert report.unfused and all(any(u["reason"].startswith(r) for r in UNFUSED_REASONS.values())
                                  for u in report.unfused)
    assert report.record["coverage"]["fraction"] >= 0.9
    code = fast.code
    assert "l_m_" not in code and "arg0" not in code
    assert code.startswith("def forward(self, m, z, msa_mask, pair_mask, chunk_size):")
    assert code.count("fused_attention(") == 4 and code.count("fused_layer_norm_linear(") == 8
    assert code.count("fused_triangle_multiplication(") == 2


def test_chunked_inference_merges_every_chunk_loop():
    """The Evoformer's Python chunk loops over rows (chunk_size=4: 2 + 3 + 3 + 3 chunks over the four
    attentions, and the transitions' and the outer product mean's loops) unroll in the capture; each
    loop is one row-independent layer, merged back into the layer run once
    (passes/merge_chunk_loops.py), so each attention is ONE fused call, as without chunking."""
    model, inputs = _h8("evoformer_block")
    with torch.no_grad():
        fast = foldcompile.optimize(model, *inputs, chunk_size=4)
        counts = fast.report.counts()
        assert counts["chunk_loop"] == {"matched": 7, "rejected": 0}, fast.report
        assert counts["attention"] == {"matched": 4, "rejected": 0}
        assert counts["outer_product_mean"] == {"matched": 1, "rejected": 0}
        assert fast.code.count("fused_attention(") == 4 and "torch.cat(" not in fast.code
        out, ref = fast(*inputs, chunk_size=4), model(*inputs, chunk_size=4)
    assert all(rel(a, b) <= 1e-5 for a, b in zip(out, ref))
