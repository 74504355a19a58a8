"""The Inductor executor (foldcompile/executors/inductor.py) on CPU.

``to_library_ops`` gives Dynamo a graph it traces whole: our attention, layer-norm(-projection) and
triangle-multiplication kernels as their ``torch.library`` ops, the generated element-wise kernels as the ops they fused. Checked:
the rewrite leaves no Python kernel wrapper, computes what the fused graph computes, and has zero
graph breaks (``torch._dynamo.explain``); in the full tier Inductor (CPU, default mode) compiles it
and forward and gradients equal eager.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

import foldcompile
from foldcompile.executors.inductor import softmax_via_op, to_library_ops
from foldcompile.kernels.elementwise import FusedElementwise
from foldcompile.passes.rules.softmax import fused_softmax

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "optimize"))
from optimize_helpers import assert_same_function  # noqa: E402
from test_zoo_optimize import _h8  # noqa: E402


@pytest.fixture(scope="module")
def fused():
    """The zoo Evoformer block (head dims 8) in training mode, optimized: (model, inputs, optimized)."""
    model, inputs = _h8("evoformer_block")
    model.train()
    return model, inputs, foldcompile.optimize(model, *inputs)


def test_rewrite_uses_the_library_ops_and_computes_the_same(fused):
    model, inputs, fast = fused
    gm = fast.graph_module
    program = to_library_ops(gm)
    targets = [n.target for n in program.graph.nodes if n.op == "call_function"]
    assert not any(isinstance(getattr(t, "kernel", None), FusedElementwise) for t in targets)
    assert not any(getattr(t, "__name__", "").startswith("fused_") for t in targets)
    counts = fast.report.counts()
    assert targets.count(torch.ops.foldcompile.attention.default) == counts["attention"]["matched"] == 4
    # the triangle multiplications take their layer norms; every other layer norm of the block feeds
    # projections: each is one layer-norm -> projections kernel
    assert (targets.count(torch.ops.foldcompile.triangle_multiplication.default)
            == counts["triangle_multiplication"]["matched"] == 2)
    assert targets.count(torch.ops.foldcompile.layer_norm_linear.default) == counts["ln_linear"]["matched"] == 8
    assert targets.count(torch.ops.foldcompile.layer_norm.default) == counts["layer_norm"]["matched"] == 0
    assert not program._forward_pre_hooks  # the executor checks the guards
    args = gm.guards.bind(inputs, {}).args
    torch.manual_seed(0)  # the same dropout masks (torch's generator in both)
    got = program(*args)
    torch.manual_seed(0)
    for a, b in zip(got, gm(*args)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_rewrite_has_no_graph_break(fused):
    _, inputs, fast = fused
    program = to_library_ops(fast.graph_module)
    args = fast.graph_module.guards.bind(inputs, {}).args
    torch._dynamo.reset()
    explained = torch._dynamo.explain(program)(*args)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def test_softmax_via_op_keeps_the_nan_of_fully_masked_rows():
    x = torch.randn(3, 5, 7)
    mask = torch.rand(3, 1, 7) > 0.5
    mask[1] = False
    for kwargs in ({}, {"scale": 0.5, "mask": mask}, {"bias": torch.randn(5, 7), "mask": mask}):
        torch.testing.assert_close(softmax_via_op(x, -1, **kwargs), fused_softmax(x, -1, **kwargs), equal_nan=True)


@pytest.mark.full
def test_inductor_on_cpu_equals_eager_forward_and_gradients():
    """Training mode: Inductor is told to draw dropout masks from torch's generator (fallback_random), so
    both runs, seeded alike, draw the same masks."""
    import torch._inductor.config as inductor_config

    torch._dynamo.reset()
    model, inputs = _h8("evoformer_block")
    model.train()
    fast = foldcompile.optimize(model, *inputs, executor="inductor")
    with inductor_config.patch(fallback_random=True):
        assert_same_function(model, inputs, fast, tol=1e-5)
    torch._dynamo.reset()
    assert fast.report.executor == "inductor", fast.report.executor_reason
    assert fast.report.execution["mode"] == "default"


def _graph(in_place: bool) -> torch.fx.GraphModule:
    """``x.add_(1); return x * 2`` (in place) or ``return (x + 1) * 2``."""
    g = torch.fx.Graph()
    x = g.placeholder("x")
    y = g.call_function(torch.Tensor.add_ if in_place else torch.add, (x, 1.0))
    g.output(g.call_function(torch.mul, (x if in_place else y, 2.0)))
    return torch.fx.GraphModule({}, g)


def _failing_backend(gm, example_inputs):
    raise RuntimeError("no kernels for this graph")


def _backend_whose_program_fails(gm, example_inputs):
    def run(*args):
        gm(*args)  # the graph's writes happen
        raise ValueError("the model's own error")
    return run


def test_a_first_call_failure_of_a_graph_without_writes_runs_eagerly_with_the_reason():
    from foldcompile.executors.inductor import InductorExecutor

    for backend in (_failing_backend, _backend_whose_program_fails):
        torch._dynamo.reset()
        executor = InductorExecutor(_graph(in_place=False), requested="inductor", reason="test", mode=None,
                                    backend=backend)
        x = torch.zeros(3)
        torch.testing.assert_close(executor((x,), {}), torch.full((3,), 2.0))
        torch.testing.assert_close(x, torch.zeros(3))
        assert executor.name == "eager"
    torch._dynamo.reset()
    executor = InductorExecutor(_graph(in_place=False), requested="inductor", reason="test", mode=None,
                                backend=_failing_backend)
    executor((torch.zeros(3),), {})
    assert "no kernels for this graph" in executor.describe()["reason"]  # the backend's own message


def test_a_first_call_failure_of_a_graph_that_writes_in_place_is_raised_not_repeated():
    """The first call compiles and runs in one step: a failure may come after the write, so running the
    graph again eagerly could write the input twice. The executor raises, naming the write."""
    from foldcompile.executors.inductor import InductorExecutor

    for backend, written in ((_failing_backend, 0.0), (_backend_whose_program_fails, 1.0)):
        torch._dynamo.reset()
        executor = InductorExecutor(_graph(in_place=True), requested="inductor", reason="test", mode=None,
                                    backend=backend)
        x = torch.zeros(3)
        with pytest.raises(RuntimeError, match="not re-run eagerly because the graph writes in place at node"):
            executor((x,), {})
        torch.testing.assert_close(x, torch.full((3,), written))  # never written twice
        assert executor.fallback is None
