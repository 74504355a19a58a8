"""Code generator behind ``foldcompile.kernels.elementwise``: op rules, fragment IR, Triton source.

Internal: the public API (``fuse_elementwise``, ``FusedElementwise``) lives in
``elementwise.py``. The generator is four modules, one job each, in pipeline order:

- ``elementwise_rules``: the op vocabulary as data (``_RULES``: Triton expression,
  adjoints, PyTorch meaning per op);
- ``elementwise_lowering``: an fx fragment -> a small IR (``_lower``), one converter per
  supported spelling (``_FUNCTIONS`` / ``_METHODS``), and ``unsupported_reason``;
- ``elementwise_layout``: the IR specialised to one call's shapes, dtypes and strides
  (``_layout``, ``_geometry``);
- ``elementwise_source``: the forward or backward kernel written as Python source
  (``_gen_kernel``) and imported (``_compile``).

Adding an op is one rule plus its entries in ``_FUNCTIONS`` / ``_METHODS``. This module
re-exports every name the generator had when it was one file, so imports of
``foldcompile.kernels.elementwise_codegen`` keep working.
"""
from __future__ import annotations

from foldcompile.kernels.elementwise_rules import (  # noqa: F401
    _INV_SQRT_2PI,
    _ROUNDING_CASTS,
    _Rule,
    _RULES,
    _SIG_2INNER,
    _SQRT1_2,
    _SQRT_2_OVER_PI,
    _TANH_INNER,
    UnsupportedElementwiseOp,
)
from foldcompile.kernels.elementwise_lowering import (  # noqa: F401
    _binary,
    _cast,
    _converter,
    _describe,
    _dropout_node,
    _f_dropout,
    _Fragment,
    _FUNCTIONS,
    _gelu,
    _inplace_ok,
    _lower,
    _Lowering,
    _masked_fill,
    _METHODS,
    _module_rule,
    _only_kwargs,
    _own_dropout,
    _to_dtype,
    _torch_dropout,
    _unary,
    _Val,
    _where,
    unsupported_reason,
)
from foldcompile.kernels.elementwise_layout import (  # noqa: F401
    _aligned_strides,
    _collapse,
    _contiguous_strides,
    _eager_result_dtype,
    _geometry,
    _Layout,
    _layout,
    _Operand,
    _promote,
)
from foldcompile.kernels.elementwise_source import (  # noqa: F401
    _adjoint_set,
    _block_config,
    _compile,
    _COMPILE_LOCK,
    _COMPILED,
    _convert,
    _differentiable_set,
    _gen_kernel,
    _HEADER,
    _leading_false,
    _live_gouts,
    _SOURCE_DIR,
    _tile_config,
    _Writer,
)
from foldcompile.kernels.philox import _dropout_scale, _mask_shape, dropout  # noqa: F401  (the one file imported these)
