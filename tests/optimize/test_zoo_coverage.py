"""The coverage criterion, per zoo model: at the training crop (``N_seq=128, N_res=256``, the default
``at``), at least 90% of the bytes the unfused graph's REDUCTION and ELEMENTWISE ops move go into
fused kernels, and every such op left unfused is listed with a reason from the closed list.

The models are the zoo's, in training mode, with head dims 8 (the kernels' minimum; the zoo's tiny
builds have 4, where every attention is rightly rejected), so the fraction is the compiler's, not the
tiny head dim's. ``COVERAGE_GAPS`` holds the models known to fall short today, with the reason; for
those the test demands that shortfall be exactly what it says (so fixing it fails the test until the
entry goes), and the listing with reasons still holds.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from test_zoo_optimize import _h8  # noqa: E402

import foldcompile  # noqa: E402
from foldcompile.models import zoo  # noqa: E402
from foldcompile.models.alphafold2.evoformer import EvoformerStack  # noqa: E402
from foldcompile.models.alphafold2.structure_module import StructureModule  # noqa: E402
from foldcompile.models.pairformer import PairformerStack  # noqa: E402
from foldcompile.passes.fuse import DEFAULT_AT, UNFUSED_REASONS  # noqa: E402

# model -> (why it is short of 90% today, the op whose unfused bytes make up the shortfall). None at
# present: the structure module (81.8% before the elementwise_sum rule: IPA's squared point distances
# were summed from a written [N, N, H, P, 3] product) is at 96%.
COVERAGE_GAPS: dict[str, tuple[str, str]] = {}


def _build(name: str):
    """The zoo model ``name`` with head dims 8 and its zoo inputs."""
    if name in ("evoformer_block", "pairformer_block", "extra_msa_stack", "template_pair_stack", "alphafold2"):
        return _h8(name)
    _, inputs = zoo.get(name)
    if name == "evoformer_stack":
        kw = zoo._evoformer_kwargs("tiny")
        kw.update(c_hidden_msa_att=8, c_hidden_pair_att=8)
        model = EvoformerStack(2, c_s=zoo._dims("tiny")["c_s"], **kw)
    elif name == "pairformer_stack":
        kw = zoo._pf_dims("tiny")
        kw.update(c_hidden_single=8, c_hidden_pair=8)
        model = PairformerStack(2, **kw)
    elif name == "structure_module":
        d = zoo._dims("tiny")
        model = StructureModule(c_s=d["c_s"], c_z=d["c_z"], c_ipa=8, n_heads_ipa=2, n_query_points=2,
                                n_value_points=2, c_resnet=8, n_layers=2)
    else:
        raise KeyError(f"{name}: a zoo model this test does not build; add it")
    return zoo.randomize_parameters(model, 0), inputs


_QUICK = {"evoformer_block", "pairformer_block"}


@pytest.mark.parametrize("name", [n if n in _QUICK else pytest.param(n, marks=pytest.mark.full) for n in zoo.names()])
def test_ninety_percent_of_reduction_and_elementwise_bytes_go_into_kernels(name):
    model, inputs = _build(name)
    fast = foldcompile.optimize(model.train(), *inputs)
    record = fast.report.record
    assert record["at"] and all(DEFAULT_AT[k] == v for k, v in record["at"].items())  # the training crop
    cov = record["coverage"]
    assert cov["total_bytes"] > 0
    unfused = fast.report.unfused
    # the rest is listed, each with a reason from the closed list
    assert all(any(u["reason"].startswith(r) for r in UNFUSED_REASONS.values()) for u in unfused), unfused
    left = sum(u["bytes"] for u in unfused)
    assert left <= cov["total_bytes"] - cov["fused_bytes"] + 1
    if name not in COVERAGE_GAPS:
        assert cov["fraction"] >= 0.9, (name, str(fast.report))
        return
    why, op = COVERAGE_GAPS[name]
    assert cov["fraction"] < 0.9, f"{name} now reaches {cov['fraction']:.1%}: remove it from COVERAGE_GAPS"
    gap = sum(u["bytes"] for u in unfused if u["op"] == op)
    assert (cov["fused_bytes"] + gap) / cov["total_bytes"] >= 0.9, (why, str(fast.report))


def test_every_zoo_model_is_covered():
    for name in zoo.names():
        _build(name)  # raises for a model this test does not know
    assert set(COVERAGE_GAPS) <= set(zoo.names())
