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

__version__ = "0.1.0"
__all__ = ["trace", "explain", "profile", "Report", "ProfileReport", "CaptureError", "GuardError"]
