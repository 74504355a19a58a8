"""Every zoo model through the whole front end: one graph, torch-level ops, equal to eager,
classified, with GEMM FLOPs equal to what torch's FlopCounterMode counts node by node."""
import pytest
import torch

from foldcompile import explain
from foldcompile.models import zoo
from foldcompile.pass_manager import max_rel_error
from foldcompile.passes import check_flops_against_flop_counter

ALLOWED_OTHER = {"_set_grad_enabled"}  # AlphaFold 2's no-grad recycling iterations


@pytest.fixture(scope="module", params=zoo.names())
def analysed(request):
    module, inputs = zoo.get(request.param, size="tiny")
    return request.param, module, inputs, explain(module, *inputs)


def test_one_graph_no_leaves_torch_level_targets(analysed):
    name, _, _, report = analysed
    assert report.capture["graphs"] == 1 and report.capture["leaves"] == 0
    ops = {n.op for n in report.graph_module.graph.nodes}
    assert "call_module" not in ops and "call_method" not in ops, name
    for node in report.graph_module.graph.nodes:
        if node.op == "call_function":
            module_name = getattr(node.target, "__module__", "") or ""
            assert not module_name.startswith("torch._ops"), f"{name}: aten op {node.target} left in the graph"


def test_normalised_graph_equals_eager_on_fresh_inputs(analysed):
    """Fresh random values (and mask patterns) of the captured shapes: a graph that baked in
    anything from its example inputs would part from the model here."""
    name, module, inputs, report = analysed
    fresh = zoo.get(name, size="tiny", seed=11)[1]
    assert any(not torch.equal(a, b) for a, b in zip(fresh, inputs) if a.is_floating_point())
    extra = report.example_values[len(fresh):]  # defaulted arguments (chunk_size=None, ...)
    expected = module(*fresh)  # grad mode as captured (the graph's guards check it)
    got = report.graph_module(*fresh, *extra)
    assert max_rel_error(got, expected) <= 1e-6, name


def test_symbolic_shapes_derived_without_guessing(analysed):
    name, _, _, report = analysed
    assert report.to_dict()["passes"]["shape_prop"]["record"]["fallback"] == [], name


def test_every_node_classified_and_gemm_flops_match_flop_counter(analysed):
    name, _, _, report = analysed
    classes = {n.meta.get("op_class") for n in report.graph_module.graph.nodes}
    assert None not in classes
    other = {n.target.__name__ for n in report.graph_module.graph.nodes
             if n.meta.get("op_class") == "OTHER" and callable(n.target)}
    assert other <= ALLOWED_OTHER, f"{name}: unclassified ops {other}"
    assert report.to_dict()["classes"]["GEMM"]["count"] > 0
    assert check_flops_against_flop_counter(report.graph_module, report.example_values) == []
