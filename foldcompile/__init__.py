"""foldcompile: make AlphaFold-family PyTorch models fast without rewriting them."""
from foldcompile._source_layout import ensure_subpackages as _ensure_subpackages

_ensure_subpackages(__name__, __path__[0])

__version__ = "0.1.0"
