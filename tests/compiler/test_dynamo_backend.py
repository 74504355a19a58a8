"""``torch.compile(model, backend="foldcompile")`` (foldcompile/dynamo_backend.py) on CPU.

The zoo Evoformer block through the backend equals eager (outputs and every parameter gradient,
training mode with dropout seeded alike), with fused kernels in its graph; a recompile on a new
shape (static) compiles again; graphs with symbolic sizes (``dynamic=True``, or Dynamo's automatic
dynamic shapes on the second shape) are handed on with the reason logged, and still compute the
model. The backend runs the eager executor on CPU (the selection rule).
"""
from __future__ import annotations

import logging
import os
import sys

import pytest
import torch

import foldcompile
from foldcompile.dynamo_backend import Backend, foldcompile_backend
from foldcompile.models import zoo

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "optimize"))
from foldcompile.verify import same_masks  # noqa: E402
from optimize_helpers import assert_same_function, flat, outputs_and_grads  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_registered_under_its_name():
    assert "foldcompile" in torch._dynamo.list_backends()


def _same_function_in_training(block, inputs, compiled, graphs, tol: float = 1e-5) -> None:
    """The compiled training-mode call computes its graph's function: its kernels draw their own dropout
    masks, so the reference is the backend graph's traced graph replaying them (``same_masks``), on the
    flat inputs the backend hands its executor; outputs and every parameter gradient within ``tol``
    (gradients relative to their size plus the model's RMS gradient size, as ``assert_same_function``)."""
    compiled(*inputs)
    graph = graphs[-1]
    seen, run = [], graph.executor
    graph.executor = lambda args, kwargs: (seen.append(args), run(args, kwargs))[1]
    compiled(*inputs)
    traced, fused = same_masks(graph.variant)
    params = [p for p in block.parameters() if p.requires_grad]
    (o_ref, g_ref), (o_got, g_got) = (outputs_and_grads(f, params, tuple(seen[0])) for f in (traced, fused))
    for a, b in zip(o_got, o_ref):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)
    rms = (sum(g.double().square().sum().item() for g in g_ref) / sum(g.numel() for g in g_ref)) ** 0.5
    for a, b in zip(g_got, g_ref):
        diff = torch.linalg.vector_norm((a - b).double()).item()
        assert diff <= tol * (torch.linalg.vector_norm(b.double()).item() + rms * b.numel() ** 0.5)


def test_zoo_evoformer_block_equals_eager_forward_and_gradients(caplog):
    block, inputs = zoo.get("evoformer_block")
    block.train()
    with caplog.at_level(logging.INFO, logger="foldcompile.dynamo_backend"):
        backend = Backend()
        compiled = torch.compile(block, backend=backend)
        _same_function_in_training(block, inputs, compiled, backend.graphs)
    lines = [r.getMessage() for r in caplog.records if "fused" in r.getMessage()]
    assert len(lines) == 1, lines
    assert "'ln_linear': 8" in lines[0] and "'triangle_multiplication': 2" in lines[0] and "'elementwise':" in lines[0] and "executor eager" in lines[0]


def test_fused_kernels_in_the_graph_and_the_report():
    block, inputs = zoo.get("evoformer_block")
    backend = Backend()
    out = torch.compile(block, backend=backend)(*inputs)
    for a, b in zip(flat(out), flat(block(*inputs))):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    (graph,) = backend.graphs
    counts = graph.report.counts()
    # the triangle multiplications take their four layer norms; the other eight feed projections
    assert counts["triangle_multiplication"]["matched"] == 2
    assert counts["ln_linear"]["matched"] == 8 and counts["elementwise"]["matched"] > 0
    # the zoo's tiny head dim (4) is below the attention kernel's minimum: rejected, with the reason
    assert counts["attention"]["matched"] == 0 and counts["attention"]["rejected"] == 4
    assert graph.report.executor == "eager"
    names = [n.name for n in graph.variant.graph.graph.find_nodes(op="placeholder")]
    assert names == ["msa_mask", "m", "pair_mask", "z"]  # the model's arguments, parameters as get_attr
    assert graph.variant.traced.meta["dims"] == {"N_seq": 5, "N_res": 11}


@pytest.mark.full
def test_recompile_on_a_new_shape():
    block, inputs = zoo.get("evoformer_block")
    _, inputs2 = zoo.get("evoformer_block", n_seq=6, n_res=13)
    backend = Backend()
    compiled = torch.compile(block, backend=backend, dynamic=False)
    for x in (inputs, inputs2, inputs):
        for a, b in zip(flat(compiled(*x)), flat(block(*x))):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert len(backend.graphs) == 2 and not backend.handed_on
    assert backend.graphs[1].variant.traced.meta["dims"] == {"N_seq": 6, "N_res": 13}


@pytest.mark.parametrize("dynamic", [pytest.param(None, marks=pytest.mark.full), True],
                         ids=["automatic", "dynamic=True"])
def test_symbolic_sizes_are_handed_on_with_the_reason(dynamic, caplog):
    block, inputs = zoo.get("evoformer_block")
    _, inputs2 = zoo.get("evoformer_block", n_seq=6, n_res=13)
    backend = Backend(symbolic="eager")
    compiled = torch.compile(block, backend=backend, dynamic=dynamic)
    with caplog.at_level(logging.WARNING, logger="foldcompile.dynamo_backend"):
        for x in (inputs, inputs2):
            for a, b in zip(flat(compiled(*x)), flat(block(*x))):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert backend.handed_on and "symbolic sizes" in backend.handed_on[0]
    assert any("symbolic sizes" in r.getMessage() and "handed to eager" in r.getMessage() for r in caplog.records)
    # automatic dynamic: the first shape compiles static here, the second is symbolic
    assert len(backend.graphs) == (1 if dynamic is None else 0)


def test_options_through_torch_compile():
    block, inputs = zoo.get("evoformer_block")
    compiled = torch.compile(block, backend="foldcompile", options={"executor": "eager", "symbolic": "eager"})
    for a, b in zip(flat(compiled(*inputs)), flat(block(*inputs))):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['executer'\]"):
        foldcompile_backend(torch.fx.symbolic_trace(lambda x: x), [torch.ones(1)], options={"executer": "eager"})
    with pytest.raises(ValueError, match="mode='max-autotune' is not supported"):
        foldcompile_backend(torch.fx.symbolic_trace(lambda x: x), [torch.ones(1)], mode="max-autotune")


def test_a_replaced_parameter_builds_again():
    class Lin(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = torch.nn.LayerNorm(8)

        def forward(self, x):
            return torch.sigmoid(self.norm(x)) * x

    model, x = Lin(), torch.randn(4, 8)
    backend = Backend()
    compiled = torch.compile(model, backend=backend)
    torch.testing.assert_close(compiled(x), model(x))
    model.norm.weight = torch.nn.Parameter(torch.randn(8))  # another object: Dynamo does not recompile
    torch.testing.assert_close(compiled(x), model(x))
    # Dynamo passes parameters as graph inputs and does not recompile for a new object: the backend
    # sees it by identity and builds its graph again
    assert len(backend.graphs) == 1 and backend.graphs[0].rebuilds == 1


@pytest.mark.full
def test_grad_mode_and_training_flag_recompile():
    block, inputs = zoo.get("evoformer_block")
    backend = Backend()
    compiled = torch.compile(block, backend=backend)
    block.eval()
    with torch.no_grad():
        for a, b in zip(flat(compiled(*inputs)), flat(block(*inputs))):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    block.train()
    _same_function_in_training(block, inputs, compiled, backend.graphs)
    assert len(backend.graphs) == 2


def test_docstring_examples():
    import doctest
    import importlib

    module = importlib.import_module("foldcompile.dynamo_backend")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.attempted > 0 and result.failed == 0


def test_a_graph_the_pipeline_refuses_runs_as_dynamo_gave_it(monkeypatch, caplog):
    import importlib

    def refuse(*args, **kwargs):
        raise RuntimeError("no rule for this op")

    monkeypatch.setattr(importlib.import_module("foldcompile.dynamo_backend"), "fuse_graph", refuse)
    model, x = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.GELU()), torch.randn(3, 4)
    backend = Backend()
    with caplog.at_level(logging.WARNING, logger="foldcompile.dynamo_backend"):
        torch.testing.assert_close(torch.compile(model, backend=backend)(x), model(x))
    assert not backend.graphs and "pipeline refused the graph: RuntimeError: no rule for this op" in backend.handed_on[0]
    assert any("runs as Dynamo gave it" in r.getMessage() for r in caplog.records)
