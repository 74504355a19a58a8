"""The layer-norm family: a layer norm over the last dim -> :func:`foldcompile.kernels.layer_norm`.

``layer_norm`` matches ``torch.nn.functional.layer_norm(x, (N,), weight, bias, eps)`` (every
module and method spelling reaches this one after normalize) with ``N`` the last dim of ``x``
and weight/bias ``[N]`` or None. Refused: normalising over more than the last dim (the kernel
normalises one row), dtypes the kernel lacks. Profitability: the kernel moves the same
bytes as eager's layer norm (read x, write y); ties are fused, and rows longer than the
kernel's Triton limit (it would run its reference) are not.

``hand_layer_norm`` matches the same math written out, on the math: with
``mu = x.mean(-1, keepdim=True)`` and ``d = x - mu`` (one node or several equal ones),

    d * torch.rsqrt(var + eps)     d * (var + eps) ** -0.5     d / torch.sqrt(var + eps)     d / (var + eps) ** 0.5

where ``var`` is the BIASED variance over the last dim: ``(d ** 2).mean(-1, keepdim=True)``
(``d.pow(2)``, ``d.square()``, ``d * d``) or ``x.var(-1, keepdim=True, unbiased=False)`` /
``correction=0``; ``eps`` a positive number added inside the root; then optionally ``* weight``
and ``+ bias`` with ``[N]`` tensors (either order of operands). Refused, with the reason: an
unbiased variance (``Tensor.var``'s default divides by N - 1), ``eps`` outside the root
(``d / (sqrt(var) + eps)`` is another function), a mean or variance over another dim, an
interior value used elsewhere. An RMS norm (no ``x - mean``) is not a candidate at all.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx

from foldcompile.kernels import layer_norm as _layer_norm_kernel
from foldcompile.passes.rules import Candidate, Context, Reject, Rule
from foldcompile.passes.rules import _meta as M
from foldcompile.passes.rules.attention import _Builder, _num

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
    row = M.dim_at(c.parts["x"], -1, ctx.subs)  # at the stated size (a named last dim moves with it)
    if row > _MAX_ROW:
        return f"not profitable at the stated size: rows of {row} > {_MAX_ROW} run the kernel's reference"
    return None


def _replace(c: Candidate, ctx: Context) -> torch.fx.Node:
    p = c.parts
    out = _Builder(ctx.gm.graph, c.output, c)(fused_layer_norm, p["x"], p["weight"], p["bias"], p["eps"])
    out.meta["shape"], out.meta["dtype"] = M.shape(c.output), M.dtype(c.output)
    return out


# ------------------------------------------------------------------ written out by hand
def _last_dim_reduction(n: Any, name: str) -> tuple[torch.fx.Node, dict] | None:
    """``(input, extra arguments)`` when ``n`` is ``name`` (mean / var) over the last dim with keepdim."""
    if not isinstance(n, torch.fx.Node) or n.op != "call_function" or M.op_name(n) != name or not n.args:
        return None
    x, a, kw = n.args[0], list(n.args[1:]), dict(n.kwargs)
    if not isinstance(x, torch.fx.Node) or M.shape(x) is None or not M.shape(x):
        return None
    names = ["dim", "unbiased", "keepdim"] if name == "var" else ["dim", "keepdim"]  # their positional orders
    for k, v in zip(names, a):
        kw.setdefault(k, v)
    if len(a) > len(names) or kw.get("dtype") is not None or kw.get("keepdim") is not True:
        return None
    dim, rank = kw.get("dim"), len(M.shape(x))
    dims = tuple(dim) if isinstance(dim, (list, tuple)) else (dim,)
    if len(dims) != 1 or not isinstance(dims[0], int) or dims[0] % rank != rank - 1:
        return None
    return x, kw


def _centred(d: Any) -> tuple[torch.fx.Node, torch.fx.Node] | None:
    """``(x, mu)`` when ``d`` is ``x - mu`` with ``mu`` the mean of ``x`` over its last dim."""
    if not isinstance(d, torch.fx.Node) or M.op_name(d) != "sub" or len(d.args) != 2 or d.kwargs:
        return None
    x, mu = d.args
    got = _last_dim_reduction(mu, "mean")
    return (x, mu) if got is not None and got[0] is x and M.shape(d) == M.shape(x) else None


def _power_of(n: Any) -> tuple[Any, float] | None:
    """``(base, p)`` when ``n`` is ``base ** p`` (``pow``), ``rsqrt`` (-0.5) or ``sqrt`` (0.5)."""
    if not isinstance(n, torch.fx.Node) or n.op != "call_function" or not n.args:
        return None
    name = M.op_name(n)
    if name in ("rsqrt", "sqrt") and len(n.args) == 1 and not n.kwargs:
        return n.args[0], -0.5 if name == "rsqrt" else 0.5
    if name == "pow" and len(n.args) == 2 and not n.kwargs and _num(n.args[1]) is not None:
        return n.args[0], _num(n.args[1])
    return None


def _square_of(n: Any) -> Any:
    """``d`` when ``n`` is ``d ** 2``, ``d.square()`` or ``d * d``."""
    p = _power_of(n)
    if p is not None and p[1] == 2.0:
        return p[0]
    if isinstance(n, torch.fx.Node) and M.op_name(n) == "square" and len(n.args) == 1:
        return n.args[0]
    if isinstance(n, torch.fx.Node) and M.op_name(n) == "mul" and len(n.args) == 2 and n.args[0] is n.args[1]:
        return n.args[0]
    return None


def _same_centred(d: Any, x: torch.fx.Node, mu: torch.fx.Node) -> bool:
    return _centred(d) == (x, mu)


def _biased_variance(v: Any, x: torch.fx.Node, mu: torch.fx.Node) -> tuple[list[torch.fx.Node], str | None] | None:
    """The nodes of ``v`` if it is the variance of ``x`` over the last dim, with a reason it is not
    the biased one (None when it is); None when ``v`` is no variance of ``x`` at all."""
    got = _last_dim_reduction(v, "var")
    if got is not None and got[0] is x:
        kw = got[1]
        correction = kw.get("correction", 0 if kw.get("unbiased", True) is False else 1)
        if correction != 0:
            return [v], ("unbiased variance: Tensor.var's default divides by N - 1 (a layer norm divides by N; "
                         "unbiased=False or correction=0 is the biased one)")
        return [v], None
    got = _last_dim_reduction(v, "mean")
    if got is None:
        return None
    sq = got[0]
    d = _square_of(sq)
    if d is None or not _same_centred(d, x, mu):
        return None
    return [v, sq, d], None


def _recognise_by_hand(n: torch.fx.Node, ctx: Context) -> Candidate | Reject | None:
    if n.op != "call_function" or M.op_name(n) not in ("mul", "div") or len(n.args) != 2 or n.kwargs:
        return None
    name = M.op_name(n)
    for i in ((0, 1) if name == "mul" else (0,)):
        centred = _centred(n.args[i])
        if centred is not None:
            d, root = n.args[i], n.args[1 - i]
            break
    else:
        return None
    x, mu = centred
    xs = M.shape(x)
    if M.shape(n) != xs or M.dtype(n) != M.dtype(x) or not isinstance(M.dtype(x), torch.dtype) \
            or not M.dtype(x).is_floating_point:
        return Reject("a centred value scaled to another shape or dtype")
    p = _power_of(root)
    want = -0.5 if name == "mul" else 0.5
    if p is None:
        if (isinstance(root, torch.fx.Node) and M.op_name(root) == "add" and len(root.args) == 2
                and any(_power_of(a) is not None for a in root.args)):
            return Reject("eps added outside the root: x - mean(x) divided by sqrt(var) + eps, not sqrt(var + eps)")
        return None  # x - mean(x) times another value (d * d): no normalisation here
    if p[1] != want:
        return Reject(f"x - mean(x) {'times' if name == 'mul' else 'divided by'} something that is not "
                      f"{'rsqrt' if name == 'mul' else 'sqrt'}(var + eps)")
    e = p[0]
    eps = None
    if isinstance(e, torch.fx.Node) and M.op_name(e) == "add" and len(e.args) == 2 and not e.kwargs:
        for j in (0, 1):
            c = _num(e.args[1 - j])
            if c is not None:
                v, eps = e.args[j], c
                break
    if eps is None:
        return Reject("no eps added to the variance inside the root (eps outside the root is another function)")
    if not eps > 0:
        return Reject(f"eps {eps:g} is not positive")
    var = _biased_variance(v, x, mu)
    if var is None:
        return Reject("the root's argument is not the variance of x over the last dim plus eps")
    var_nodes, why = var
    if why is not None:
        return Reject(why)
    region = [mu, d, *var_nodes, e, root, n]
    out, parts = n, dict(x=x, weight=None, bias=None, eps=float(eps), N=xs[-1])
    for role in ("weight", "bias"):
        if len(out.users) != 1:
            break
        u = next(iter(out.users))
        if M.op_name(u) != ("mul" if role == "weight" else "add") or len(u.args) != 2 or u.kwargs:
            break
        other = u.args[1] if u.args[0] is out else u.args[0]
        if (not isinstance(other, torch.fx.Node) or other is out or M.shape(other) != (xs[-1],)
                or M.dtype(other) != M.dtype(x) or M.shape(u) != xs):
            break
        parts[role] = other
        region.append(u)
        out = u
    members = set(region)
    for r in region:
        if r is not out and any(u not in members for u in r.users):
            return Reject(f"multiple users of an interior value ({r.name} is used outside the layer norm)")
    order = {r: k for k, r in enumerate(n.graph.nodes)}
    return Candidate("hand_layer_norm", n, sorted(members, key=order.get), out, parts,
                     [f"written out by hand: eps {eps:g}" + ("" if parts["weight"] is not None else ", no weight")
                      + ("" if parts["bias"] is not None else ", no bias")])


RULES = [Rule("layer_norm", "layer_norm", 50, _recognise, _check, _profitable, _replace,
              "layer_norm over the last dim -> fused_layer_norm"),
         Rule("hand_layer_norm", "layer_norm", 50, _recognise_by_hand, _check, _profitable, _replace,
              "(x - mean) * rsqrt(biased var + eps) [* w] [+ b] over the last dim -> fused_layer_norm")]
