"""Run the docstring examples of the public entry points as doctests.

Every public entry point's docstring carries a short runnable example and what it
prints (STYLE.md); this keeps those examples true. Modules are fetched with
``importlib.import_module`` because ``foldcompile.explain``, ``foldcompile.profile`` and
``foldcompile.kernels.{attention,layer_norm,softmax}`` are shadowed as attributes by
the functions their packages re-export. conftest.py sets ``TRITON_INTERPRET=1`` on a
machine without a GPU, so the kernel examples run the real Triton kernels.
"""
import doctest
import importlib
import os

import pytest


MODULES = [
    "foldcompile.capture",
    "foldcompile.guards",
    "foldcompile.state_watch",
    "foldcompile.regions",
    "foldcompile.explain",
    "foldcompile.profile",
    "foldcompile.pass_manager",
    "foldcompile.size_check",
    "foldcompile.passes.base",
    "foldcompile.passes.meta",
    "foldcompile.passes.einsum",
    "foldcompile.passes.registry",
    "foldcompile.passes.op_samples",
    "foldcompile.passes.shape_rules",
    "foldcompile.passes.op_pointwise",
    "foldcompile.passes.op_layout",
    "foldcompile.passes.op_reduction",
    "foldcompile.passes.op_gemm",
    "foldcompile.passes.op_creation",
    "foldcompile.passes.op_comm",
    "foldcompile.passes.op_kernels",
    "foldcompile.passes.normalize",
    "foldcompile.passes.simplify_casts",
    "foldcompile.passes.classify",
    "foldcompile.passes.cost_model",
    "foldcompile.kernels",
    "foldcompile.kernels.ops",
    "foldcompile.kernels.layer_norm",
    "foldcompile.kernels.softmax",
    "foldcompile.kernels.attention",
    "foldcompile.kernels.elementwise",
    "foldcompile.kernels.ln_linear",
    "foldcompile.passes.rules.ln_multi_linear",
    "foldcompile.models.zoo",
    "foldcompile.optimize",
    "foldcompile.variants",
    "foldcompile.passes.fuse",
    "foldcompile.verify",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.attempted > 0, f"{name} has no docstring example"
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples failed in {name} (see above)"


def test_package_docstring_examples() -> None:
    """The ``foldcompile`` package's own docstring."""
    import foldcompile

    assert foldcompile.__file__.endswith(os.path.join("foldcompile", "__init__.py"))
    result = doctest.testmod(foldcompile, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, "the foldcompile package docstring has no example"
    assert result.failed == 0
