"""The docstring examples of foldcompile.distributed, the multi-process ones included
(they spawn ranks running the functions of foldcompile/distributed/examples.py)."""
import doctest
import importlib

import pytest


@pytest.mark.parametrize("name", ["foldcompile.distributed", "foldcompile.distributed.collectives",
                                  "foldcompile.distributed.grad_sync", "foldcompile.distributed.spawn",
                                  "foldcompile.distributed.examples"])
def test_docstring_examples(name):
    module = importlib.import_module(name)  # the package's `spawn` attribute is the function
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{name} has no docstring example"
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
