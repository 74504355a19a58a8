"""The docstring examples of foldcompile.distributed, the multi-process ones included
(they spawn ranks running the functions of foldcompile/distributed/examples.py)."""
import doctest
import importlib

import pytest


@pytest.mark.parametrize("name", ["foldcompile.distributed", "foldcompile.distributed.collectives",
                                  "foldcompile.distributed.grad_sync", "foldcompile.distributed.spawn",
                                  "foldcompile.distributed.examples", "foldcompile.distributed.selfcheck",
                                  "foldcompile.distributed.sharded_inputs"])
def test_docstring_examples(name):
    module = importlib.import_module(name)  # the package's `spawn` attribute is the function
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{name} has no docstring example"
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"


def test_selfcheck_command_line(capsys):
    """The check meant for the GPU machine (NCCL, forced collectives at world size 1) runs
    here on gloo with 3 uneven ranks and reports every collective."""
    from foldcompile.distributed.selfcheck import main

    assert main(["--backend", "gloo", "--world-size", "3"]) == 0
    text = capsys.readouterr().out
    assert text.count("  ok   ") == 8 and "FAIL" not in text
    assert "backward issue reduce_scatter:b" in text
