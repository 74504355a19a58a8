"""The docstring examples of the DAP planning modules, run as doctests."""
import doctest
import importlib

import pytest


@pytest.mark.parametrize("name", ["foldcompile.passes.sharding_rules", "foldcompile.passes.labeling",
                                  "foldcompile.passes.shard", "foldcompile.passes.placement"])
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.attempted > 0, f"{name} has no docstring example"
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples failed in {name}"
