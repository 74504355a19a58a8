"""The docstring examples of the DAP lowering and of its runtime glue."""
import doctest
import importlib

import pytest

MODULES = ["foldcompile.passes.localize", "foldcompile.passes.grad_placement", "foldcompile.passes.local_shape_check",
           "foldcompile.passes.schedule_collectives", "foldcompile.passes.plan_io",
           "foldcompile.passes.dependence", "foldcompile.passes.schedule_model", "foldcompile.passes.overlap_compute",
           "foldcompile.dap_scaling",
           "foldcompile.distributed.grad_ops", "foldcompile.distributed.sharded_random"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{name} has no docstring example"
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"


@pytest.mark.full   # trains an Evoformer block on 2 ranks with the planning pass
def test_sharded_module_example():
    module = importlib.import_module("foldcompile.distributed.sharded")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
