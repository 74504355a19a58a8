"""The executor selection rule (foldcompile/executors/select.py) and the report's executor line, on CPU.

The CUDA paths themselves run in tests/executors/test_executors_gpu.py (GPU machine)."""
from __future__ import annotations

import doctest
import importlib
import logging

import pytest
import torch

import foldcompile
from foldcompile.executors import EXECUTOR_NAMES, select_executor


class _Gated(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = torch.nn.LayerNorm(8)
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x):
        return torch.sigmoid(self.lin(self.norm(x))) * x + 1.0


def test_auto_on_cpu_is_eager_and_the_report_says_why():
    model, x = _Gated(), torch.randn(3, 5, 8)
    fast = foldcompile.optimize(model, x)
    out = fast(x)
    assert torch.allclose(out, model(x), atol=1e-5)
    assert fast.report.executor == "eager"
    assert "tensors on cpu" in fast.report.executor_reason
    assert "executor: eager (auto: tensors on cpu" in str(fast.report)
    assert fast.report.execution["requested"] == "auto"


def test_requested_cuda_graph_on_cpu_falls_back_with_a_warning(caplog):
    model, x = _Gated(), torch.randn(3, 5, 8)
    with caplog.at_level(logging.WARNING, logger="foldcompile.executors"):
        fast = foldcompile.optimize(model, x, executor="cuda_graph")
    assert torch.allclose(fast(x), model(x), atol=1e-5)
    assert fast.report.executor == "eager"
    assert fast.report.executor_reason.startswith("cuda_graph: tensors on cpu")
    assert any("cuda_graph: tensors on cpu" in r.getMessage() for r in caplog.records)


def test_requested_eager():
    model, x = _Gated(), torch.randn(3, 5, 8)
    fast = foldcompile.optimize(model, x, executor="eager")
    fast(x)
    assert (fast.report.executor, fast.report.executor_reason) == ("eager", "requested")


def test_unknown_executor_is_refused_by_name():
    with pytest.raises(ValueError, match="executor='cudagraphs': expected one of 'auto', 'eager'"):
        foldcompile.optimize(_Gated(), torch.randn(2, 8), executor="cudagraphs")
    with pytest.raises(ValueError, match="expected one of"):
        select_executor(torch.fx.symbolic_trace(lambda x: x), "fast", [torch.ones(1)])
    assert EXECUTOR_NAMES == ("auto", "eager", "cuda_graph", "inductor")


def test_each_variant_gets_its_own_executor():
    model, x = _Gated(), torch.randn(3, 5, 8)
    fast = foldcompile.optimize(model, x)
    fast(x)
    with torch.no_grad():
        fast(x)  # another grad mode: another variant
    executors = {id(v.executor) for v in fast.variants.entries.values()}
    assert len(fast.variants) == 2 and len(executors) == 2


@pytest.mark.parametrize("name", ["foldcompile.executors", "foldcompile.executors.base", "foldcompile.executors.eager",
                                  "foldcompile.executors.select", "foldcompile.executors.cuda_graph",
                                  "foldcompile.executors.inductor"])
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.attempted > 0 and result.failed == 0
