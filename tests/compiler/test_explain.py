"""explain: per-class and per-module costs, cost at other sizes, guards, JSON and the HTML picture.

Captures are slow (Dynamo), so each model is captured once per module (module-scoped fixtures).
"""
import json
import re

import pytest
import torch
import torch.nn.functional as F

from foldcompile.explain import Report, explain, structure_dependent_dims
from foldcompile.models import zoo
from foldcompile.passes.base import PassError
from foldcompile.passes.registry import OP_CLASSES


@pytest.fixture(scope="module")
def evo():
    module, inputs = zoo.get("evoformer_block", size="tiny")
    return explain(module, *inputs)


@pytest.fixture(scope="module")
def pairformer():
    module, inputs = zoo.get("pairformer_block", size="tiny")
    return explain(module, *inputs)


def _op_nodes(report: Report):
    return [n for n in report.graph_module.graph.nodes if n.op not in ("placeholder", "get_attr", "output")]


@pytest.mark.parametrize("which", ["evo", "pairformer"])
def test_counts_are_consistent(which, request):
    report = request.getfixturevalue(which)
    d = report.to_dict()
    nodes = _op_nodes(report)
    for cls in OP_CLASSES:
        assert d["classes"][cls]["count"] == sum(1 for n in nodes if n.meta["op_class"] == cls)
    assert d["total"]["count"] == len(nodes) == sum(e["count"] for e in d["classes"].values())
    # every node lands in exactly one module; modules add up to the classes
    for key in ("count", "flops", "bytes"):
        by_mod = sum(e[key] for cs in d["modules"].values() for e in cs.values())
        assert by_mod == d["total"][key]
    for cls in OP_CLASSES:
        e = d["classes"][cls]
        assert e["intensity"] == (e["flops"] / e["bytes"] if e["bytes"] else 0.0)
    assert d["classes"]["GEMM"]["flops"] > 0 and d["classes"]["LAYOUT"]["flops"] == 0
    # GEMM FLOPs dominate these blocks; elementwise ops are the low-intensity ones
    assert d["classes"]["GEMM"]["intensity"] > d["classes"]["ELEMENTWISE"]["intensity"]


def test_to_dict_structure(evo):
    d = evo.to_dict()
    assert set(d) >= {"classes", "modules", "capture", "dims", "total", "guarded_dims", "passes"}
    assert set(d["classes"]) == set(OP_CLASSES)
    assert all(set(e) >= {"count", "flops", "bytes"} for e in d["classes"].values())
    assert d["capture"] == {"graphs": 1, "leaves": 0, "tracer": "dynamo"}
    assert d["dims"] == {"N_seq": 5, "N_res": 11}
    assert d["guarded_dims"] == {}
    assert {"msa_att_row.mha.linear_q", "tri_att_start.mha.linear_q", "(root)"} <= set(d["modules"])
    cut = evo.to_dict(depth=1)["modules"]
    assert {"msa_att_row", "tri_mul_out", "tri_att_end", "pair_transition"} <= set(cut)
    assert sum(e["flops"] for e in cut["tri_mul_out"].values()) == sum(
        e["flops"] for p, cs in d["modules"].items() if p.startswith("tri_mul_out") for e in cs.values())
    assert list(d["passes"]) == ["normalize", "shape_prop", "classify"]


def test_cost_at_other_sizes_equals_a_fresh_capture(evo):
    module, inputs = zoo.get("evoformer_block", size="tiny", n_seq=7, n_res=9)
    fresh = explain(module, *inputs).to_dict()
    moved = evo.cost(N_seq=7, N_res=9)
    assert moved["dims"] == {"N_seq": 7, "N_res": 9} == fresh["dims"]
    assert moved["classes"] == fresh["classes"]
    assert moved["total"] == fresh["total"]
    assert moved["modules"] == fresh["modules"]
    # and it really moved
    assert moved["classes"]["GEMM"]["flops"] != evo.to_dict()["classes"]["GEMM"]["flops"]
    # one dim at a time keeps the other at its captured value
    assert evo.cost(N_res=11) == evo.cost()


def test_cost_refuses_unknown_and_bad_dims(evo):
    with pytest.raises(PassError, match="unknown dims.*N_templ"):
        evo.cost(N_templ=4)
    with pytest.raises(PassError, match="positive int"):
        evo.cost(N_res=0)


def test_chunked_capture_guards_its_dims():
    module, inputs = zoo.get("evoformer_block", size="tiny")
    report = explain(module, *inputs, chunk_size=4)
    assert set(report.guarded_dims) == {"N_seq", "N_res"}
    assert "chunk_size=4" in report.guarded_dims["N_res"]
    with pytest.raises(PassError, match="structure depends on N_res"):
        report.cost(N_res=64)
    assert report.cost(N_res=11)["total"] == report.to_dict()["total"]
    assert "guarded" in report.table()


class _TailSlices(torch.nn.Module):
    """A chunk loop over residues written with slices and a plain attribute (no 'chunk' name)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(6, 6))
        self.piece = 4

    def forward(self, m):
        outs = [F.linear(m[:, i:i + self.piece], self.w) for i in range(0, m.shape[1], self.piece)]
        return torch.cat(outs, 1)


class _Narrowed(_TailSlices):
    def forward(self, m):
        n = m.shape[1]
        parts = [F.linear(m.narrow(1, i, min(self.piece, n - i)), self.w).sum(1) for i in range(0, n, self.piece)]
        return sum(parts)


@pytest.mark.parametrize("cls", [_TailSlices, _Narrowed])
def test_unrolled_loops_are_found_in_the_graph(cls):
    report = explain(cls(), torch.randn(5, 11, 6))
    assert set(report.guarded_dims) == {"N_res"}
    assert "tail" in report.guarded_dims["N_res"]
    assert structure_dependent_dims(report.graph_module) == report.guarded_dims
    with pytest.raises(PassError, match="N_res"):
        report.cost(N_res=20)
    assert report.cost(N_seq=9)["dims"] == {"N_seq": 9, "N_res": 11}  # the unguarded dim still moves


def test_json_round_trips(evo, tmp_path):
    text = evo.to_json()
    assert json.loads(text) == evo.to_dict()
    path = tmp_path / "r.json"
    evo.to_json(str(path), depth=1)
    assert json.loads(path.read_text()) == evo.to_dict(depth=1)


def test_table_and_code(evo):
    text = str(evo)
    assert text == evo.table()
    for cls in OP_CLASSES:
        assert re.search(rf"^{cls}\s+\d+", text, re.M)
    assert "msa_att_row" in text and "N_seq=5" in text
    moved = evo.table(N_res=40)
    assert "N_res=40" in moved and moved != text
    assert "einsum" in evo.code and "def forward" in evo.code


def test_html_is_self_contained_and_shows_every_class(pairformer, tmp_path):
    # the page itself is tested in tests/compiler/test_report_html.py (numbers, a real browser)
    path = pairformer.to_html(str(tmp_path / "pf.html"), depth=1, at={"N_res": 32})
    page = open(path, encoding="utf-8").read()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    for cls in OP_CLASSES:
        assert cls in page
    # no network: the only URL is the SVG namespace
    assert set(re.findall(r"https?://[^\s\"'<>]+", page)) <= {"http://www.w3.org/2000/svg"}
    assert "<script src" not in page and "<link" not in page
    assert "tri_att_start" in page and "N_res=32</b>" in page and "#d62728" in page