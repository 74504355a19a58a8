"""The layer-norm family: ``layer_norm`` over the last dim -> :func:`foldcompile.kernels.layer_norm`.

Matches ``torch.nn.functional.layer_norm(x, (N,), weight, bias, eps)`` (every module and
method spelling reaches this one after normalize) with ``N`` the last dim of ``x`` and
weight/bias ``[N]`` or None. Refused: normalising over more than the last dim (the kernel
normalises one row), dtypes the kernel lacks. Profitability: the kernel moves the same
bytes as eager's layer norm (read x, write y); ties are fused, and rows longer than the
kernel's Triton limit (it would run its reference) are not.
"""
from __future__ import annotations

import torch
import torch.fx

from foldcompile.kernels import layer_norm as _layer_norm_kernel
from foldcompile.passes.rules import Candidate, Context, Reject, Rule
from foldcompile.passes.rules import _meta as M
from foldcompile.passes.rules.attention import _Builder

__all__ = ["RULES", "fused_layer_norm"]

_MAX_ROW = 16384  # kernels/layer_norm.py MAX_TRITON_DIM: longer rows run the reference
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def fused_layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                     eps: float) -> torch.Tensor:
    """Layer norm over the last dim through :func:`foldcompile.kernels.layer_norm`."""
    return _layer_norm_kernel(x, weight, bias, eps)


def _arg(n: torch.fx.Node, i: int, name: str, default=None):
    return n.args[i] if len(n.args) > i else n.kwargs.get(name, default)


def _recognise(n: torch.fx.Node, ctx: Context) -> Candidate | Reject | None:
    if n.op != "call_function" or n.target is not torch.nn.functional.layer_norm:
        return None
    x, shape = _arg(n, 0, "input"), _arg(n, 1, "normalized_shape")
    w, b, eps = _arg(n, 2, "weight"), _arg(n, 3, "bias"), _arg(n, 4, "eps", 1e-5)
    xs = M.shape(x)
    if xs is None:
        return Reject("layer_norm input without a known shape")
    shape = tuple(shape) if isinstance(shape, (list, tuple)) else (shape,)
    if len(shape) != 1 or shape[0] != xs[-1]:
        return Reject(f"layer_norm over {len(shape)} trailing dims (the kernel normalises the last one)")
    for t in (w, b):
        if t is not None and (not isinstance(t, torch.fx.Node) or M.shape(t) != (xs[-1],)):
            return Reject("layer_norm weight/bias not a [N] tensor")
    if not isinstance(eps, (int, float)):
        return Reject("layer_norm eps is not a number")
    return Candidate("layer_norm", n, [n], n, dict(x=x, weight=w, bias=b, eps=float(eps), N=xs[-1]))


def _check(c: Candidate, ctx: Context) -> str | None:
    dts = {M.dtype(t) for t in (c.parts["x"], c.parts["weight"], c.parts["bias"]) if t is not None}
    if not dts <= set(_DTYPES):
        return f"unsupported dtype {sorted(map(str, dts))}"
    return None


def _profitable(c: Candidate, ctx: Context) -> str | None:
    if c.parts["N"] > _MAX_ROW:
        return f"not profitable at the stated size: rows of {c.parts['N']} > {_MAX_ROW} run the kernel's reference"
    return None


def _replace(c: Candidate, ctx: Context) -> torch.fx.Node:
    p = c.parts
    out = _Builder(ctx.gm.graph, c.output, c)(fused_layer_norm, p["x"], p["weight"], p["bias"], p["eps"])
    out.meta["shape"], out.meta["dtype"] = M.shape(c.output), M.dtype(c.output)
    return out


RULES = [Rule("layer_norm", "layer_norm", 50, _recognise, _check, _profitable, _replace,
              "layer_norm over the last dim -> fused_layer_norm")]
