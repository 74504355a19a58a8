"""profile on a CPU: wall-clock per node, every node accounted, costs from the same or another capture.

The CUDA-event path runs on GPUs only (bench/profile_evoformer.py); these tests check the
attribution, the totals and the cost side, which are the same code on both.
"""
import json
import math

import pytest
import torch

from foldcompile.explain import explain
from foldcompile.models import zoo
from foldcompile.passes.base import PassError
from foldcompile.passes.cost_model import OP_CLASSES
from foldcompile.profile import ProfileReport, profile


@pytest.fixture(scope="module")
def evo():
    module, inputs = zoo.get("evoformer_block", size="tiny")
    with torch.no_grad():
        # one timed run: its node times are disjoint parts of that run's wall time
        prof = profile(module, *inputs, warmup=1, reps=1)
        report = explain(module, *inputs)
    return module, inputs, prof, report


def test_every_node_timed_and_times_add_up(evo):
    _, _, prof, report = evo
    assert isinstance(prof, ProfileReport)
    assert prof.timing == "cpu_wall" and prof.device == "cpu"
    # every op node of the classified graph, once, in order
    ops = [n for n in report.graph_module.graph.nodes if n.op not in ("placeholder", "get_attr", "output")]
    assert [n.name for n in prof.nodes] == [n.name for n in ops]
    assert all(t.ms >= 0 for t in prof.nodes) and prof.profiled_ms > 0
    classes = prof.by_class()
    assert math.isclose(sum(e["ms"] for e in classes.values()), prof.profiled_ms, rel_tol=1e-9)
    assert math.isclose(sum(e["ms"] for e in prof.by_module().values()), prof.profiled_ms, rel_tol=1e-9)
    assert math.isclose(sum(e["ms"] for e in prof.by_module(depth=1).values()), prof.profiled_ms, rel_tol=1e-9)
    assert math.isclose(sum(e["share"] for e in classes.values()), 1.0, rel_tol=1e-9)
    assert sum(e["count"] for e in classes.values()) == len(ops)
    # the node times are disjoint parts of the run: their sum stays below its wall time
    assert prof.profiled_ms <= prof.instrumented_wall_ms
    assert prof.uninstrumented_ms > 0 and prof.eager_ms > 0 and prof.overhead > 0


def test_costs_match_explain_and_rates_follow(evo):
    _, _, prof, report = evo
    d = report.to_dict()
    classes = prof.by_class()
    for cls in OP_CLASSES:
        assert classes[cls]["count"] == d["classes"][cls]["count"]
        assert classes[cls]["flops"] == d["classes"][cls]["flops"]
        assert classes[cls]["bytes"] == d["classes"][cls]["bytes"]
    g = classes["GEMM"]
    assert math.isclose(g["tflops"], g["flops"] / (g["ms"] * 1e-3) / 1e12, rel_tol=1e-9)
    assert math.isclose(g["gbs"], g["bytes"] / (g["ms"] * 1e-3) / 1e9, rel_tol=1e-9)
    assert prof.dims == {"N_seq": 5, "N_res": 11}


def test_table_marks_cpu_timing_and_json_round_trips(evo):
    _, _, prof, _ = evo
    text = str(prof)
    assert "CPU wall-clock" in text and "GEMM" in text and "overhead" in text and "tri_att_start" in text
    d = json.loads(prof.to_json())
    assert d["timing"] == "cpu_wall" and len(d["nodes"]) == len(prof.nodes)
    assert d == json.loads(json.dumps(prof.to_dict()))
    rows = prof.rows(depth=1)
    assert {r["level"] for r in rows} == {"class", "module"}
    assert math.isclose(sum(r["ms"] for r in rows if r["level"] == "class"), prof.profiled_ms, rel_tol=1e-9)


def test_cost_from_a_capture_at_other_sizes(evo):
    module, inputs, _, report = evo
    small_module, small_inputs = zoo.get("evoformer_block", size="tiny", n_seq=7, n_res=9)
    small = explain(small_module, *small_inputs)
    with torch.no_grad():
        prof = profile(module, *inputs, cost_report=small, warmup=0, reps=1)
    assert prof.dims == {"N_seq": 5, "N_res": 11}
    want = report.to_dict()["classes"]
    got = prof.by_class()
    for cls in OP_CLASSES:
        assert (got[cls]["count"], got[cls]["flops"], got[cls]["bytes"]) == \
            (want[cls]["count"], want[cls]["flops"], want[cls]["bytes"])
    assert any("costs from a capture" in n for n in prof.notes)


def test_cost_report_of_another_model_is_refused(evo):
    module, inputs, _, _ = evo
    other_module, other_inputs = zoo.get("pairformer_block", size="tiny")
    other = explain(other_module, *other_inputs)
    with torch.no_grad(), pytest.raises(ValueError, match="cost_report has"):
        profile(module, *inputs, cost_report=other, warmup=0, reps=1)
    # the same model captured chunked: at other sizes its costs are refused (guarded dims) ...
    chunk_module, chunk_inputs = zoo.get("evoformer_block", size="tiny", n_seq=7, n_res=9)
    chunked = explain(chunk_module, *chunk_inputs, chunk_size=2)
    with torch.no_grad(), pytest.raises(PassError, match="structure depends on"):
        profile(module, *inputs, cost_report=chunked, warmup=0, reps=1)
    # ... and at the same sizes its graph does not match the unchunked one node for node
    same = explain(module, *inputs, chunk_size=2)
    with torch.no_grad(), pytest.raises(ValueError, match="op nodes"):
        profile(module, *inputs, cost_report=same, warmup=0, reps=1)


def test_bad_settings():
    module, inputs = zoo.get("pairformer_block", size="tiny")
    with pytest.raises(ValueError, match="reps"):
        profile(module, *inputs, reps=0)


class _OneHeavyOp(torch.nn.Module):
    """A 512x512x512 matrix product next to two element-wise ops on 16 numbers: the product is
    far more work, so a profile that credits time to the wrong node shows."""

    def forward(self, x, w, s):
        return torch.matmul(x, w), (s + 1.0) * 2.0


def test_time_is_attributed_to_the_node_that_spent_it():
    x, w, s = torch.randn(512, 512), torch.randn(512, 512), torch.randn(16)
    with torch.no_grad():
        prof = profile(_OneHeavyOp(), x, w, s, warmup=1, reps=3)
    heavy = [n for n in prof.nodes if n.op_class == "GEMM"]
    assert len(heavy) == 1 and len(prof.nodes) == 3
    assert heavy[0].ms > 0.8 * prof.profiled_ms, [(n.name, n.ms) for n in prof.nodes]
