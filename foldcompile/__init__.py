"""foldcompile: make AlphaFold-family PyTorch models fast without rewriting them.

    >>> import foldcompile
    >>> from foldcompile.models import zoo
    >>> block, inputs = zoo.get("evoformer_block")
    >>> gm = foldcompile.trace(block, *inputs)      # one guarded torch.fx graph
    >>> gm.meta["capture"]
    {'graphs': 1, 'leaves': 0, 'tracer': 'dynamo'}
"""
from foldcompile._source_layout import ensure_subpackages as _ensure_subpackages

_ensure_subpackages(__name__, __path__[0])

from foldcompile.capture import CaptureError, trace  # noqa: E402
from foldcompile.guards import GuardError  # noqa: E402

__version__ = "0.1.0"
__all__ = ["trace", "CaptureError", "GuardError"]
