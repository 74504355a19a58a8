"""The softmax family: ``softmax(scale·x + bias, masked)`` not part of an attention -> :func:`kernels.softmax`.

Runs after the attention family, so it sees the softmaxes no attention took (a softmax
whose weights are used twice, an attention whose head dim the attention kernel refuses).
It folds, walking back from the softmax through single-user steps: additive bias terms
(one tensor; a second is left in the graph), scalings by Python numbers applied before
the bias, and ``masked_fill(x, c, -inf)`` / ``where(c, x, -inf)`` with a boolean ``c`` (the
``-inf`` a number or a 0-dim constant such as ``torch.tensor(float("-inf"))``)
(eager gives NaN in a row that keeps nothing: the kernel writes NaN there itself,
``empty_rows="nan"``, with no extra pass over the weights). A finite fill is not folded
(eager's weights are then uniform over the row).

Mixed precision: ``softmax(x.to(fp32) ...).to(x.dtype)`` with ``x`` fp16 / bf16 (autocast runs softmax in
fp32 on a cast input; its reader casts back), spelled ``.float()`` / ``.to(torch.float32)`` /
``.to(dtype=...)``, scale, bias and mask folded as above in fp32: the kernel on ``x`` itself, writing x's
dtype. The rounding is equal: the kernel loads x and converts it to fp32 (exact, as the cast), scales, adds
the bias (loaded as fp32: what fp32 promotion does to an fp16 / bf16 / fp32 bias), takes max, exp and sum
in fp32 and rounds once, when it stores the weights; eager rounds once, at the cast back. Not taken: a cast
back to another dtype than x's (``softmax(x_bf16.float()).to(fp16)``: the kernel would round to bf16), an
up-cast to fp64 (eager's softmax would run in fp64, the kernel's in fp32); those keep their casts and the
kernel runs on the fp32 value.
"""
from __future__ import annotations

import torch
import torch.fx

from foldcompile.kernels import softmax as _softmax_kernel
from foldcompile.passes.rules import Candidate, Context, Reject, Rule
from foldcompile.passes.rules import _meta as M
from foldcompile.passes.registry import cast_target, holds_every_value
from foldcompile.passes.rules._values import constant_of
from foldcompile.passes.rules.attention import _Builder, _num, _softmax_dim

__all__ = ["RULES", "fused_softmax"]

_MAX_ROW = 16384  # kernels/softmax.py MAX_TRITON_DIM
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def fused_softmax(x: torch.Tensor, dim: int, *, scale: float | None = None, bias: torch.Tensor | None = None,
                  mask: torch.Tensor | None = None) -> torch.Tensor:
    """``softmax(scale·x + bias)`` over ``dim`` with ``mask`` False left out, through :func:`kernels.softmax`,
    with torch's NaN on a row where nothing is left (every logit −inf or masked), which the kernel
    writes itself (``empty_rows="nan"``)."""
    return _softmax_kernel(x, dim, scale=scale, bias=bias, mask=mask, empty_rows="nan")


def _recognise(sm: torch.fx.Node, ctx: Context) -> Candidate | Reject | None:
    d = _softmax_dim(sm)
    if d is None:
        return None
    x = sm.args[0]
    xs = M.shape(x)
    parts = dict(dim=d, scale=None, bias=None, mask=None, x=x)
    region = [sm]
    # walk back: [masked_fill(-inf)] <- [+ bias] <- [* scale] <- x
    if isinstance(x, torch.fx.Node) and len(x.users) == 1 and x.op == "call_function":
        name, a = M.op_name(x), x.args
        cond = None
        if (name == "masked_fill" and len(a) == 3 and constant_of(a[2], x) == float("-inf")
                and M.dtype(a[1]) == torch.bool):
            cond, keep_if, inner = a[1], False, a[0]
        elif (name == "where" and len(a) == 3 and isinstance(a[0], torch.fx.Node) and M.dtype(a[0]) == torch.bool
              and constant_of(a[2], x) == float("-inf")):
            cond, keep_if, inner = a[0], True, a[1]
        if cond is not None and M.shape(inner) == xs:
            parts.update(mask=(cond, keep_if), x=inner)
            region.append(x)
            x = inner
    if isinstance(x, torch.fx.Node) and len(x.users) == 1 and M.op_name(x) == "add" and len(x.args) == 2:
        for i in (0, 1):
            base, term = x.args[i], x.args[1 - i]
            if (isinstance(base, torch.fx.Node) and isinstance(term, torch.fx.Node) and M.shape(base) == xs
                    and M.dtype(term) is not None and M.dtype(term).is_floating_point
                    and len(M.shape(term)) <= len(xs)):
                parts.update(bias=term, x=base)
                region.append(x)
                x = base
                break
    if isinstance(x, torch.fx.Node) and len(x.users) == 1 and M.op_name(x) in ("mul", "div") and len(x.args) == 2:
        for i in ((0, 1) if M.op_name(x) == "mul" else (0,)):
            c = _num(x.args[1 - i])
            base = x.args[i]
            if c is not None and isinstance(base, torch.fx.Node) and M.shape(base) == xs:
                parts.update(scale=c if M.op_name(x) == "mul" else 1.0 / c, x=base)
                region.append(x)
                break
    region, out, notes = region[::-1], sm, []
    narrow = _cast_round_trip(parts["x"], sm, region)
    if narrow is not None:  # the kernel reads x itself and writes x's dtype (module docstring)
        up, down = parts["x"], next(iter(sm.users))
        parts["x"] = up.args[0]
        region = ([up] if len(up.users) == 1 else []) + region + [down]
        out = down
        notes.append(f"mixed precision: reads {narrow} {parts['x'].name} (not its fp32 cast {up.name}), computes in "
                     f"fp32, writes {narrow} (the cast back {down.name})")
    return Candidate("softmax", sm, region, out, parts, notes)


def _cast_round_trip(up: object, sm: torch.fx.Node, region: list) -> torch.dtype | None:
    """x's dtype when ``up`` is ``x.to(fp32)`` (x fp16 / bf16), everything from there to the softmax is fp32,
    and the softmax's one reader casts it back to x's dtype; else None."""
    if not isinstance(up, torch.fx.Node) or cast_target(up) != torch.float32 or len(sm.users) != 1:
        return None
    x = up.args[0]
    narrow = M.dtype(x)
    if narrow not in (torch.float16, torch.bfloat16) or not holds_every_value(torch.float32, narrow):
        return None
    down = next(iter(sm.users))
    if cast_target(down) != narrow or any(M.dtype(r) != torch.float32 for r in region):
        return None
    return narrow


def _check(c: Candidate, ctx: Context) -> str | None:
    dt = M.dtype(c.parts["x"])
    if dt not in _DTYPES or (c.parts["bias"] is not None and M.dtype(c.parts["bias"]) not in _DTYPES):
        return f"unsupported dtype {dt}"
    if M.dtype(c.output) != dt:
        return "softmax changes the dtype"
    return None


def _profitable(c: Candidate, ctx: Context) -> str | None:
    # judged at the stated size, not the example's: a softmax over N_res keys is one row of 256 at the
    # training crop and may be longer than the kernel's rows at another
    row = M.dim_at(c.parts["x"], c.parts["dim"], ctx.subs)
    if row > _MAX_ROW:
        return f"not profitable at the stated size: rows of {row} > {_MAX_ROW} run the kernel's reference"
    return None


def _replace(c: Candidate, ctx: Context) -> torch.fx.Node:
    p = c.parts
    b = _Builder(ctx.gm.graph, c.output, c)
    mask = None
    if p["mask"] is not None:
        cond, keep_if = p["mask"]
        mask = cond if keep_if else b(torch.logical_not, cond)
    out = b(fused_softmax, p["x"], p["dim"], scale=p["scale"], bias=p["bias"], mask=mask)
    out.meta["shape"], out.meta["dtype"] = M.shape(c.output), M.dtype(c.output)
    return out


RULES = [Rule("softmax", "softmax", 60, _recognise, _check, _profitable, _replace,
              "softmax(scale·x + bias, masked) -> fused_softmax")]
