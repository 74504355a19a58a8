"""The node-meta schema: every ``node.meta`` key the passes share, named once.

The values are the literal key strings the passes have always written, so code that
reads ``node.meta["shape"]`` and code that reads ``node.meta[SHAPE]`` see the same entry.
Each key has one writer (the pass that ``ensures`` it); every other pass only reads it.

=================  =====================  ==========================================================
constant           key                    written by, and what it holds
=================  =====================  ==========================================================
``SHAPE``          ``"shape"``            shape_prop: concrete sizes (tuple; tuple of tuples when
                                          ``MULTI_OUTPUT``; ``None`` for non-tensors)
``DTYPE``          ``"dtype"``            shape_prop: ``torch.dtype`` (tuple when ``MULTI_OUTPUT``)
``SYM_SHAPE``      ``"sym_shape"``        shape_prop: sizes as sympy expressions over named dims
``SYM_VALUE``      ``"sym_value"``        shape_prop: an integer node's expression (``N_res // 2``)
``SYM_ARGS``       ``"sym_args"``         shape_prop: literal size-like arguments with their symbolic
                                          meaning (``{1: (N_res, N_res, 2, 4)}`` for
                                          ``view(x, (11, 11, 2, 4))``; split sections,
                                          unflatten sizes, a narrow's length), by position
``MULTI_OUTPUT``   ``"multi_output"``     shape_prop: the op returns several tensors (``split``)
``ALIASES_INPUT``  ``"aliases_input"``    shape_prop: the output shares storage with an input (a view)
``OP_CLASS``       ``"op_class"``         classify: GEMM / REDUCTION / ELEMENTWISE / LAYOUT / COMM /
                                          OTHER, ``"INPUT"`` / ``"OUTPUT"`` for graph ends
``COST``           ``"cost"``             classify: ``{"flops", "bytes"}`` sympy expressions (+
                                          ``product_flops``, ``bias_flops``)
``EINSUM``         ``"einsum"``           normalize: a GEMM-like node's equation (a string; SDPA's
                                          two products as a tuple of two)
``NORMALIZED_FROM````"normalized_from"``  normalize: the method/operator a node was spelled as
``MODULE_PATH``    ``"module_path"``      capture: the module the node came from (``blocks.0.mha``)
``STACK_TRACE``    ``"stack_trace"``      capture (fx): the user's source lines
``ORIGIN``         ``"origin"``           rewrites: the traced nodes a new node replaces
``SHARD``          ``"shard"``            sharding: the placement of the node's output
``EXAMPLE_VALUE``  ``"example_value"``    Dynamo: a fake tensor of the captured output
``REGION``         ``"region"``           capture (foldcompile/regions.py): ``(region id, block path)``
                                          of a node stamped from a region of identical blocks
=================  =====================  ==========================================================

Rank and dtype of a node are read through :func:`rank_of` and :func:`dtype_of`, one place.

    >>> import torch, torch.fx
    >>> gm = torch.fx.symbolic_trace(lambda x: x + 1)
    >>> rank_of(next(iter(gm.graph.nodes))) is None       # nothing known before shape_prop
    True
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx

__all__ = ["SHAPE", "DTYPE", "SYM_SHAPE", "SYM_VALUE", "SYM_ARGS", "MULTI_OUTPUT", "ALIASES_INPUT", "OP_CLASS",
           "COST", "EINSUM", "NORMALIZED_FROM", "MODULE_PATH", "STACK_TRACE", "ORIGIN", "SHARD", "EXAMPLE_VALUE",
           "REGION", "NODE_KEYS", "rank_of", "dtype_of", "shape_of", "memory_of"]

SHAPE = "shape"
DTYPE = "dtype"
SYM_SHAPE = "sym_shape"
SYM_VALUE = "sym_value"
SYM_ARGS = "sym_args"
MULTI_OUTPUT = "multi_output"
ALIASES_INPUT = "aliases_input"
OP_CLASS = "op_class"
COST = "cost"
EINSUM = "einsum"
NORMALIZED_FROM = "normalized_from"
MODULE_PATH = "module_path"
STACK_TRACE = "stack_trace"
ORIGIN = "origin"
SHARD = "shard"
EXAMPLE_VALUE = "example_value"
REGION = "region"

NODE_KEYS = frozenset({SHAPE, DTYPE, SYM_SHAPE, SYM_VALUE, SYM_ARGS, MULTI_OUTPUT, ALIASES_INPUT, OP_CLASS, COST,
                       EINSUM, NORMALIZED_FROM, MODULE_PATH, STACK_TRACE, ORIGIN, SHARD, EXAMPLE_VALUE, REGION})


def _tensor_value(node: torch.fx.Node) -> torch.Tensor | None:
    # a tracer's own record of the output: Dynamo's example_value, make_fx's val
    for key in ("val", EXAMPLE_VALUE):
        v = node.meta.get(key)
        if isinstance(v, torch.Tensor):
            return v
    return None


def shape_of(node: Any) -> tuple[int, ...] | None:
    """A tensor node's concrete sizes: shape_prop's, else the tracer's; ``None`` when unknown."""
    if not isinstance(node, torch.fx.Node):
        return None
    s = node.meta.get(SHAPE)
    if isinstance(s, tuple) and not node.meta.get(MULTI_OUTPUT):
        return s
    v = _tensor_value(node)
    if v is not None:
        return tuple(v.shape)
    tm = node.meta.get("tensor_meta")  # torch.fx.passes.shape_prop.ShapeProp
    if tm is not None and hasattr(tm, "shape"):
        return tuple(tm.shape)
    return None


def rank_of(node: Any) -> int | None:
    """A tensor node's rank from whatever recorded its shape; ``None`` when unknown."""
    s = shape_of(node)
    return None if s is None else len(s)


def dtype_of(node: Any) -> torch.dtype | None:
    """A tensor node's dtype from shape_prop or the tracer; ``None`` when unknown."""
    if not isinstance(node, torch.fx.Node):
        return None
    d = node.meta.get(DTYPE)
    if isinstance(d, torch.dtype):
        return d
    v = _tensor_value(node)
    if v is not None:
        return v.dtype
    tm = node.meta.get("tensor_meta")
    return getattr(tm, "dtype", None)


def memory_of(node: Any) -> Any:
    """Identity of the memory a node's example value lives in (views share it; fake tensors too),
    or None where unknown. Compare with ``==``: the identity is an int."""
    v = node.meta.get(EXAMPLE_VALUE) if isinstance(node, torch.fx.Node) else None
    try:
        return v.untyped_storage()._cdata if isinstance(v, torch.Tensor) else None
    except Exception:
        return None
