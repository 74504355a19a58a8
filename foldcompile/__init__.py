"""foldcompile: make AlphaFold-family PyTorch models fast without rewriting them.

    >>> import foldcompile
    >>> from foldcompile.models import zoo
    >>> block, inputs = zoo.get("evoformer_block")
    >>> gm = foldcompile.trace(block, *inputs)      # one guarded torch.fx graph
    >>> gm.meta["capture"]
    {'graphs': 1, 'leaves': 0, 'tracer': 'dynamo'}
    >>> report = foldcompile.explain(block, *inputs)
    >>> sorted(report.to_dict()["classes"])[:3]
    ['COMM', 'ELEMENTWISE', 'GEMM']

Progress is logged under the ``foldcompile`` logger (``foldcompile.passes.<name>`` per pass):
``logging.getLogger("foldcompile").setLevel(logging.INFO)`` with a handler shows it.

``torch.compile(model, backend="foldcompile")`` runs the same pipeline on Dynamo's graphs
(:mod:`foldcompile.dynamo_backend`).

Note: ``foldcompile.explain``, ``.profile``, ``.optimize`` and ``.verify`` are the functions; their
modules are ``importlib.import_module("foldcompile.explain")`` and so on (``from foldcompile.explain
import Report`` works as usual). Nothing heavy is imported until a name is first used.
"""
import logging as _logging
import sys as _sys
import types as _types

from foldcompile._source_layout import ensure_subpackages as _ensure_subpackages

# one logger hierarchy: "foldcompile", "foldcompile.passes.<name>", "foldcompile.pass_manager", ...;
# silent unless the application configures logging
_logging.getLogger("foldcompile").addHandler(_logging.NullHandler())

__version__ = "0.1.0"
__all__ = ["trace", "explain", "profile", "Report", "ProfileReport", "CaptureError", "GuardError",
           "optimize", "OptimizedModule", "OptimizeReport", "verify", "VerifyReport"]

# The public names are imported on first use (PEP 562), so that `import foldcompile` and the
# `foldcompile --help` / `--version` command answer without importing torch (about a second).
_LAZY = {"trace": "capture", "CaptureError": "capture", "Report": "explain", "GuardError": "guards",
         "ProfileReport": "profile", "profile": "profile", "OptimizedModule": "optimize",
         "OptimizeReport": "optimize", "optimize": "optimize", "VerifyReport": "verify", "verify": "verify"}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'foldcompile' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"foldcompile.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


# functions whose modules share their names
_SHADOWED = ("explain", "profile", "optimize", "verify")


class _Package(_types.ModuleType):
    """``foldcompile.explain``, ``.profile``, ``.optimize`` and ``.verify`` are the functions, whose
    modules share their names. Python binds a submodule as an attribute of its package on its first
    import; with the lazy imports above that would replace the function, so that binding is skipped
    here (the modules stay importable: ``importlib.import_module("foldcompile.explain")``)."""

    def __setattr__(self, name: str, value):
        if name in _SHADOWED and isinstance(value, _types.ModuleType):
            return
        super().__setattr__(name, value)


_sys.modules[__name__].__class__ = _Package
_ensure_subpackages(__name__, __path__[0])


def explain(model, *example_inputs, **kwargs):
    """``explain(model, *example_inputs)``: the op classes and costs (:func:`foldcompile.explain.explain`);
    ``explain(optimized)``: an :class:`OptimizedModule`'s fusion report (matches, rejections, unfused)."""
    from foldcompile.explain import explain as explain_model
    from foldcompile.optimize import OptimizedModule

    if isinstance(model, OptimizedModule) and not example_inputs and not kwargs:
        return model.report
    return explain_model(model, *example_inputs, **kwargs)


def _register_backend_for_source_checkouts() -> None:
    """``torch.compile(model, backend="foldcompile")``: an installed package is found by Dynamo through
    its entry point (pyproject.toml, ``torch_dynamo_backends``); a source checkout (``PYTHONPATH=.``)
    has none, so the backend is registered here, when torch is already imported (``import
    foldcompile`` alone, and the CLI's ``--help``, stay free of torch)."""
    if "torch" not in _sys.modules:
        return
    from importlib.metadata import entry_points

    if any(ep.name == "foldcompile" for ep in entry_points(group="torch_dynamo_backends")):
        return
    from foldcompile.dynamo_backend import register

    register()


_register_backend_for_source_checkouts()
