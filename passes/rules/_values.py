"""What a node's value is known to be at compile time, for the rules: constants and no-op casts.

- :func:`constant_of`: the number a node stands for — a Python number, or a 0-dim tensor
  built from a literal in ``forward`` (``torch.tensor(float("-inf"))``, ``torch.scalar_tensor(v)``,
  ``torch.full((), v)``), as the op that reads it sees it (cast to that op's dtype: an fp32
  ``finfo.min`` read by an fp16 op is ``-inf``). A parameter or buffer is never a constant:
  its value may change after capture.
- :func:`is_noop_cast`: ``x.to(x.dtype)``, ``x.float()`` on a float32 ``x`` and friends, which
  return ``x`` itself (no copy): a rule may look through them.

    >>> import torch, foldcompile
    >>> from foldcompile.passes import normalize_pass, shape_prop_pass
    >>> class Fill(torch.nn.Module):
    ...     def forward(self, x, m):
    ...         return torch.where(m, x.to(torch.float32), torch.tensor(float("-inf")))
    >>> ex = (torch.randn(2, 3), torch.rand(2, 3) > 0.5)
    >>> gm = normalize_pass(foldcompile.trace(Fill(), *ex)).graph_module
    >>> _ = shape_prop_pass(gm, ex, dims={})
    >>> where = next(n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.where)
    >>> constant_of(where.args[2], where), is_noop_cast(where.args[1])
    (-inf, True)
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx

from foldcompile.passes.registry import cast_target
from foldcompile.passes.rules import _meta as M

__all__ = ["constant_of", "is_noop_cast"]

_CONSTANT_MAKERS = {"tensor", "scalar_tensor", "full"}


def _number(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x)


def constant_of(x: Any, reader: torch.fx.Node | None = None) -> float | None:
    """The value ``x`` stands for where ``reader`` reads it (None when it is not a known constant)."""
    v = _number(x)
    if v is not None or not isinstance(x, torch.fx.Node) or x.op != "call_function":
        return v
    name, a, kw = M.op_name(x), x.args, x.kwargs
    if set(kw) - {"dtype", "device", "requires_grad", "layout", "pin_memory"} or kw.get("requires_grad"):
        return None
    if name in ("tensor", "scalar_tensor") and len(a) == 1:
        v = _number(a[0])
    elif name == "full" and len(a) == 2 and isinstance(a[0], (list, tuple)) and len(a[0]) == 0:
        v = _number(a[1])
    if v is None or M.shape(x) != ():
        return None
    dt = M.dtype(x)
    out = M.dtype(reader) if reader is not None else dt
    if not isinstance(dt, torch.dtype) or not isinstance(out, torch.dtype):
        return None
    # the value as the reading op sees it: rounded to the constant's dtype, then to the op's
    return float(torch.tensor(v, dtype=dt).to(out).item())


def is_noop_cast(n: Any) -> bool:
    """``n`` returns its input itself: a cast to the dtype the input already has (no device, no copy)."""
    if not isinstance(n, torch.fx.Node) or n.op != "call_function" or not n.args:
        return False
    x = n.args[0]
    if not isinstance(x, torch.fx.Node) or M.dtype(x) is None or M.dtype(n) != M.dtype(x) or M.shape(n) != M.shape(x):
        return False
    # only dtype arguments (the registry's pure casts): a device, another tensor or ``copy=True`` may move or copy
    return cast_target(n) == M.dtype(x)
