"""DAP on paper (foldcompile.dap_scaling): ``explain(model, *inputs, world_size=P, link_GBps=...)`` plans
the model at each world size and prints, per block, the communication (volume and time per
collective) next to the compute per rank, and the memory per rank with the gathered operands and
their ring alternative; ``foldcompile explain --world-size``.

The quick tests plan the zoo's tiny Evoformer block (latency 0, so that its tiny channels are
split rather than replicated); the full tier a 2-block Evoformer stack at AlphaFold 2's channels."""
import json
import math

import pytest
import torch

import foldcompile
from foldcompile.cli import main
from foldcompile.dap_scaling import block_of, dap_scaling
from foldcompile.models import zoo
from foldcompile.passes.shard import ShardCosts

NO_LATENCY = ShardCosts(latency_s=0.0)


@pytest.fixture(scope="module")
def tiny_report():
    """``explain(..., world_size=4, ...)`` itself; the tests plan its graph again with other options."""
    torch.manual_seed(0)
    block, ex = zoo.get("evoformer_block")
    return foldcompile.explain(block, *ex, world_size=4, world_sizes=(2, 4), link_GBps=100)


def test_block_of():
    assert block_of("evoformer.blocks.3.msa_att_row.mha") == ("evoformer.blocks", "evoformer.blocks.3")
    assert block_of("mlp.fc1") == ("", "")          # a digit inside a name is not an index
    assert block_of("") == ("", "")


def test_collective_times_follow_the_link_and_the_plan(tiny_report):
    fast = dap_scaling(tiny_report, world_sizes=(2, 4), costs=NO_LATENCY)
    slow = dap_scaling(tiny_report, world_sizes=(2, 4), costs=NO_LATENCY, link_GBps=30)
    for p in (2, 4):
        a, b = fast.point(p), slow.point(p)
        sent = [t for t in a.record["transitions"] if t["kind"] != "slice"]
        assert a.per_block["collectives"] == len(sent) > 0
        assert a.per_block["bytes"] == sum(t["volume_at"] for t in sent)
        for c in a.collectives:
            assert c["seconds"] == pytest.approx(c["bytes"] / 300e9)
        for c in b.collectives:                  # (the planner may choose another plan on a slower link)
            assert c["seconds"] == pytest.approx(c["bytes"] / 30e9)
        assert b.per_block["comm_s"] == pytest.approx(sum(c["seconds"] for c in b.collectives))


def test_compute_and_sharded_memory_shrink_gathered_memory_does_not(tiny_report):
    s = dap_scaling(tiny_report, world_sizes=(2, 4, 8), costs=NO_LATENCY, at={"N_seq": 128, "N_res": 256})
    p2, p4, p8 = (s.point(p).per_block for p in (2, 4, 8))
    assert p2["compute_s"] > p4["compute_s"] > p8["compute_s"]
    assert p4["memory"]["sharded"] == pytest.approx(p2["memory"]["sharded"] / 2, rel=0.05)
    for m in (p4["memory"], p8["memory"]):
        assert 0 < m["gathered_ring"] < m["gathered"]         # a gathered operand of a product (the triangle's)
    stop = s.stops_scaling_at()
    assert stop is None or s.point(stop).per_block["comm_s"] > s.point(stop).per_block["compute_s"]


def test_explain_world_size_prints_the_scaling(tiny_report):
    report = tiny_report
    text = str(report)
    assert "DAP scaling of EvoformerBlock (the model as one block)" in text
    assert "link 100 GB/s" in text and "per collective of one block" in text
    assert "DAP plan over 4 ranks" in text                     # the plan at world_size=P itself
    assert [p.world_size for p in report.dap.points] == [2, 4]
    block, ex = zoo.get("evoformer_block")
    with pytest.raises(ValueError, match="link_GBps and dap_at are for the DAP scaling"):
        foldcompile.explain(block, *ex, link_GBps=100)


def test_cli_world_size(capsys):
    assert main(["explain", "evoformer_block", "--world-size", "4", "--world-sizes", "2", "--link-GBps", "50",
                 "--json"]) == 0
    d = json.loads(capsys.readouterr().out)["dap"]
    assert [p["world_size"] for p in d["points"]] == [2, 4] and d["link_bytes_per_s"] == 50e9
    assert d["points"][1]["per_block"]["collectives"] > 0
    assert main(["explain", "evoformer_block", "--link-GBps", "50"]) == 2
    assert "--link-GBps is for the DAP scaling" in capsys.readouterr().err


@pytest.mark.full
def test_evoformer_stack_per_block_at_alphafold_sizes():
    """Two AlphaFold 2 Evoformer blocks (their channels), at the training crop, P = 2 ... 512: a block's
    collectives, compute that stops shrinking once P passes N_res = 256, the gathered triangle operand
    whole on every rank (N_res^2 c_mul, fp32: 33.5 MB) and 2/P of it with the ring."""
    torch.manual_seed(0)
    model, ex = zoo.get("evoformer_stack", size="af2", n_seq=7, n_res=11, n_blocks=2)
    report = foldcompile.explain(model, *ex, world_sizes=(2, 8, 64, 256, 512))
    s = report.dap
    assert s.family == "blocks" and s.blocks == 2
    per = {p.world_size: p.per_block for p in s.points}
    assert per[8]["collectives"] >= 8
    assert per[2]["compute_s"] > per[8]["compute_s"] > per[64]["compute_s"] > per[256]["compute_s"]
    assert per[512]["compute_s"] == pytest.approx(per[256]["compute_s"], rel=0.05)
    assert per[512]["comm_s"] > per[512]["compute_s"]           # DAP has stopped scaling there
    operand = 256 ** 2 * 128 * 4                                   # the triangle multiplication's gathered b
    for p in (8, 64):
        assert per[p]["memory"]["gathered"] >= operand
        assert per[p]["memory"]["gathered"] - per[p]["memory"]["gathered_ring"] >= operand * (1 - 2 / p) * 0.99
    assert math.isfinite(s.stops_scaling_at() or 0)
