"""The examples in shape_prop's docstrings run and print what they say."""
import doctest

import foldcompile.passes.shape_prop as shape_prop


def test_shape_prop_docstring_examples_run():
    results = doctest.testmod(shape_prop, verbose=False)
    assert results.failed == 0
    assert results.attempted > 0


def test_shape_prop_pass_docstring_has_an_example():
    # the captured-zoo example must stay in shape_prop_pass's own docstring, not only the module's
    tests = {t.name: t for t in doctest.DocTestFinder().find(shape_prop)}
    assert len(tests["foldcompile.passes.shape_prop.shape_prop_pass"].examples) >= 5
    assert tests["foldcompile.passes.shape_prop"].examples
