"""shard_pass: seeds, the record, uneven and empty shards, in-place writes, ops without a rule, the
checker, speed; and the property that a planned graph is still the same single-process function."""
import time
from functools import lru_cache

import pytest
import torch
import torch.fx as fx
import torch.utils._pytree as pytree

import foldcompile
from foldcompile.capture import flat_inputs
from foldcompile.models import zoo
from foldcompile.pass_manager import copy_graph_module
from foldcompile.passes import classify_pass, normalize_pass, shape_prop_pass
from foldcompile.passes.base import PassError
from foldcompile.passes.placement import Placed, Replicate, Shard, redistribute
from foldcompile.passes.shard import ShardCosts, check_plan, plan_table, plan_violations, shard_pass
from _one_thread import one_thread  # noqa: F401  (autouse fixture)

FREE_LATENCY = ShardCosts(latency_s=0.0)  # tiny models: without it, replicating small tensors wins


@lru_cache(maxsize=None)
def _captured(name, **kw):
    model, ex = zoo.get(name, **dict(kw))
    gm = normalize_pass(foldcompile.trace(model, *ex)).graph_module
    flat = flat_inputs(gm, ex)
    shape_prop_pass(gm, flat)
    classify_pass(gm)
    return gm, flat, model, ex


def captured(name, **kw):
    gm, flat, model, ex = _captured(name, **kw)
    return copy_graph_module(gm), flat, model, ex


def annotated(fn, *inputs, dims):
    gm = normalize_pass(fx.symbolic_trace(fn)).graph_module
    shape_prop_pass(gm, inputs, dims=dims)
    classify_pass(gm)
    return gm


def placed(gm, name):
    return next(n for n in gm.graph.nodes if n.name == name).meta["shard"]


def redistributes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is redistribute]


# ----------------------------------------------------------------------------- seeds

def test_default_seeds():
    gm, *_ = captured("evoformer_block")
    record = shard_pass(gm, 3).record
    assert placed(gm, "l_m_").placement == Shard(0) and placed(gm, "l_z_").placement == Shard(0)
    assert placed(gm, "l_msa_mask_") == placed(gm, "l_pair_mask_") == Placed(Replicate())
    assert record["seeds"]["l_msa_mask_"]["reason"].startswith("mask")
    assert placed(gm, "l_m_").split_sizes == (2, 2, 1)            # N_seq = 5 over 3 ranks


def test_dap_axes_override_and_bad_names():
    gm, *_ = captured("evoformer_block")
    shard_pass(gm, 2, dap_axes={"m": 1, "l_z_": None})
    assert placed(gm, "l_m_").placement == Shard(1) and placed(gm, "l_z_") == Placed(Replicate())
    gm, *_ = captured("evoformer_block")
    with pytest.raises(PassError, match="not tensor inputs.*l_m_"):
        shard_pass(gm, 2, dap_axes={"msa": 0})
    with pytest.raises(PassError, match="not a model dim"):
        shard_pass(gm, 2, dap_axes={"m": 2})                       # the channel dim


def test_one_rank_plans_nothing():
    gm, flat, model, ex = captured("evoformer_block")
    result = shard_pass(gm, 1)
    assert result.record["transitions"] == [] and not redistributes(gm)
    assert all(n.meta["shard"] == Placed(Replicate()) for n in gm.graph.nodes if n.op == "call_function"
               and n.meta.get("shape") is not None)


def test_a_planned_graph_is_refused():
    gm, *_ = captured("evoformer_block")
    shard_pass(gm, 2)
    with pytest.raises(PassError, match="already planned"):
        shard_pass(gm, 2)


# ----------------------------------------------------------------------------- the record

def test_record_lists_every_transition_with_its_volume():
    gm, *_ = captured("evoformer_block")
    record = shard_pass(gm, 2, costs=FREE_LATENCY).record
    made = {n.name for n in redistributes(gm)}
    assert {t["node"] for t in record["transitions"]} == made
    for t in record["transitions"]:
        assert set(t) >= {"kind", "tensor", "node", "src", "dst", "module", "consumers", "volume", "volume_at",
                          "position"}
        assert (t["kind"] == "slice") == (t["volume_at"] == 0)
        assert str(t["volume"]) != "0" or t["kind"] == "slice"
    text = plan_table(record)
    assert "all_to_all" in text and "DAP plan over 2 ranks" in text
    assert record["objective"]["comm_bytes_at"] == sum(t["volume_at"] for t in record["transitions"])


def test_explain_shows_the_plan_of_a_planned_graph():
    from foldcompile.explain import explain_graph
    gm, flat, model, ex = captured("evoformer_block")
    shard_pass(gm, 2, costs=FREE_LATENCY)
    text = str(explain_graph(gm, ex))
    assert "DAP plan over 2 ranks" in text and "all_to_all" in text


def test_op_without_rule_runs_replicated_and_is_listed():
    gm = annotated(lambda x: torch.diagonal(x, 0, 0, 1).sum(-1) + x.sum((0, 1)), torch.randn(5, 5, 3),
                   dims={"N_res": 5})
    record = shard_pass(gm, 2, dap_axes={"x": 0}).record
    assert record["no_rule"] == {"diagonal": 1}
    diag = next(r for r in record["replicated"] if r["op"] == "diagonal")
    assert diag["reason"] == "no sharding rule for 'diagonal'"
    assert any(t["kind"] == "all_gather" and t["tensor"] == "x" for t in record["transitions"])
    check_plan(gm)


# ----------------------------------------------------------------------------- shapes and writes

def test_uneven_and_empty_shards():
    gm, flat, model, ex = captured("evoformer_block", n_seq=5, n_res=3)
    shard_pass(gm, 8, costs=FREE_LATENCY)                          # N_res = 3 over 8 ranks: 5 empty shards
    check_plan(gm)
    assert placed(gm, "l_z_").split_sizes == (1, 1, 1, 0, 0, 0, 0, 0)
    assert all(torch.equal(a, b) for a, b in zip(gm(*flat), model(*ex)))


def test_no_redistribute_reads_memory_written_in_place():
    def f(x):
        y = x * 2
        y.mul_(3)
        return torch.softmax(y, 0), y
    gm = annotated(f, torch.randn(5, 7, 3), dims={"N_seq": 5, "N_res": 7})
    assert any(n.target is torch.Tensor.mul_ for n in gm.graph.nodes)  # normalize kept it (y is read after)
    shard_pass(gm, 2, costs=FREE_LATENCY)
    y = next(n for n in gm.graph.nodes if n.op == "call_function" and n.name == "mul")
    assert not [u for u in y.users if u.target is redistribute]
    check_plan(gm)
    x = torch.randn(5, 7, 3)
    assert all(torch.equal(a, b) for a, b in zip(gm(x), f(x)))


def test_checker_finds_violations():
    gm, *_ = captured("evoformer_block")
    shard_pass(gm, 2, costs=FREE_LATENCY)
    assert plan_violations(gm) == []
    r = next(n for n in redistributes(gm) if n.args[1] != Replicate())
    r.args = (r.args[0], Replicate(), r.args[2])                    # src no longer its input's placement
    softmax = next(n for n in gm.graph.nodes if n.name == "weights")  # the row attention's, over N_res
    softmax.meta["shard"] = Placed(Shard(3), (6, 5), softmax.meta["sym_shape"][3])  # split the softmax dim
    found = "\n".join(plan_violations(gm))
    assert f"{r.name}: redistribute from Replicate()" in found and "weights (softmax)" in found
    with pytest.raises(PassError, match="breaks its contract"):
        check_plan(gm)


# ----------------------------------------------------------------------------- speed

@pytest.mark.full  # the capture of four blocks takes longer than the plan
def test_four_block_stack_plans_in_seconds():
    gm, *_ = captured("evoformer_stack", n_blocks=4)
    assert len(gm.graph.nodes) > 1100
    t0 = time.perf_counter()
    result = shard_pass(gm, 8)
    elapsed = time.perf_counter() - t0
    assert elapsed < 10, elapsed                                   # about half a second on a CI core
    assert result.record["solver"]["conditioned"] == 0             # solved exactly


# ----------------------------------------------------------------------------- the property, on every zoo model

QUICK = ["evoformer_block", "pairformer_block", "structure_module"]


@lru_cache(maxsize=None)
def reference_outputs(name):
    gm, flat, *_ = _captured(name)
    return pytree.tree_leaves(copy_graph_module(gm)(*flat))


def check_model(name, world, costs):
    gm, flat, model, ex = captured(name)
    reference = reference_outputs(name)
    shard_pass(gm, world, costs=costs)
    for n in gm.graph.nodes:                                       # every tensor has a placement
        if n.op != "output" and (n.meta.get("shape") is not None or n.meta.get("multi_output")):
            assert n.meta.get("shard") is not None, n.name
    for r in redistributes(gm):                                    # src is the input's placement
        assert r.args[0].meta["shard"].placement == r.args[1] and r.meta["shard"].placement == r.args[2]
    check_plan(gm)                                                 # every op's inputs satisfy its rule
    out = pytree.tree_leaves(gm(*flat))
    assert len(out) == len(reference)
    assert all(torch.equal(a, b) for a, b in zip(out, reference) if isinstance(a, torch.Tensor))


@pytest.mark.parametrize("world", [2, 3, 8])
@pytest.mark.parametrize("name", QUICK)
def test_planned_graph_is_the_same_function(name, world):
    check_model(name, world, FREE_LATENCY)


def test_planned_graph_with_the_default_costs():
    check_model("evoformer_block", 3, ShardCosts())


@pytest.mark.full
@pytest.mark.parametrize("world", [2, 3, 8])
@pytest.mark.parametrize("name", [n for n in zoo.names() if n not in QUICK])
def test_planned_zoo_model_is_the_same_function(name, world):
    check_model(name, world, FREE_LATENCY)
