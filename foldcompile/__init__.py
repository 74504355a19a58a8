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

``torch.compile(model, backend="foldcompile")`` runs the same pipeline on Dynamo's graphs
(:mod:`foldcompile.dynamo_backend`).

Progress is logged under the ``foldcompile`` logger (``foldcompile.passes.<name>`` per pass):
``logging.getLogger("foldcompile").setLevel(logging.INFO)`` with a handler shows it.

Note: ``foldcompile.explain`` and ``foldcompile.profile`` are the functions; their modules
are ``importlib.import_module("foldcompile.explain")`` (``from foldcompile.explain import
Report`` works as usual).
"""
import logging as _logging

from foldcompile._source_layout import ensure_subpackages as _ensure_subpackages

# one logger hierarchy: "foldcompile", "foldcompile.passes.<name>", "foldcompile.pass_manager", ...;
# silent unless the application configures logging
_logging.getLogger("foldcompile").addHandler(_logging.NullHandler())

_ensure_subpackages(__name__, __path__[0])

from foldcompile.capture import CaptureError, trace  # noqa: E402
from foldcompile.explain import Report, explain  # noqa: E402
from foldcompile.guards import GuardError  # noqa: E402
from foldcompile.profile import ProfileReport, profile  # noqa: E402
from foldcompile.optimize import OptimizedModule, OptimizeReport, optimize  # noqa: E402
from foldcompile.verify import VerifyReport, verify  # noqa: E402
from foldcompile.explain import explain as _explain_model  # noqa: E402
from foldcompile import dynamo_backend  # noqa: E402

# torch.compile(model, backend="foldcompile"): registered here for source checkouts (PYTHONPATH=.), and
# through the entry point of an installed package (pyproject.toml, torch_dynamo_backends)
dynamo_backend.register()


def explain(model, *example_inputs, **kwargs):
    """``explain(model, *example_inputs)``: the op classes and costs (:func:`foldcompile.explain.explain`);
    ``explain(optimized)``: an :class:`OptimizedModule`'s fusion report (matches, rejections, unfused)."""
    if isinstance(model, OptimizedModule) and not example_inputs and not kwargs:
        return model.report
    return _explain_model(model, *example_inputs, **kwargs)

__version__ = "0.1.0"
__all__ = ["trace", "explain", "profile", "Report", "ProfileReport", "CaptureError", "GuardError",
           "optimize", "OptimizedModule", "OptimizeReport", "verify", "VerifyReport"]
