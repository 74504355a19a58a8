"""The attention family: ``softmax(scale·(q kᵀ) + biases, masked) @ v [· sigmoid(gate)]`` -> one fused kernel.

Recognised on the math, not on names. The anchor is a softmax whose input is reached from
one two-operand product (any GEMM spelling: ``einsum``, ``matmul``/``@``, ``bmm``, ``linear``;
normalize gives each an explicit einsum equation in ``meta["einsum"]``) through a chain of

- scalings by Python numbers (``* c``, ``/ c``, on the logits; a scale already on q or k is
  just part of that operand),
- additive terms (``+ b``, ``- b``): every bias, including float masks such as
  ``(mask - 1) * 1e9`` — they stay additive so their −1e9 semantics are exact,
- boolean masks: ``masked_fill(x, c, fill)`` or ``torch.where(c, x, fill)`` /
  ``torch.where(c, fill, x)`` with ``c`` provably boolean (its dtype is ``torch.bool``) and
  ``fill`` ``-inf`` (anywhere in the chain) or the dtype's lowest value ``finfo.min`` (last, alone;
  any other value gives masked keys weight in eager and is refused); the fill a number or a
  0-dim constant built in ``forward`` (``torch.tensor(float("-inf"))``; a parameter or buffer
  is not a constant),
- no-op casts (``logits.to(torch.float32)`` on float32 logits: the same tensor),

and whose only user — through no-op casts (``w.to(v.dtype)`` when it is already ``v``'s dtype)
and at most one NaN clean-up of the weights (``torch.nan_to_num(w)``, ``torch.where(torch.isnan(w),
0, w)``, ``w.masked_fill(w.isnan(), 0)``: the fill exactly 0) — is a second product contracting the
softmax axis with v. The einsum
letters decide the roles: the softmax axis is the key axis, the letter contracted in the
logits is the head dim, the output letter of the non-key operand is the query axis, the
rest are batch axes (the last one is the kernel's head axis; K/V may lack it, as in global
column attention). Layouts (``view``/``transpose``/``permute``/``reshape`` before the
products) need no special case: the operands are taken as they are and re-viewed for the
kernel. A gate ``sigmoid(g) * layout(o)`` right after the attention (through single-user
``transpose``/``permute``/``reshape``/``view``) is folded into the kernel's gate.

Exactness: a row whose kept logits are all ``-inf`` (a mask keeping nothing after an ``-inf``
fill, or an additive bias holding ``-inf`` there: ``mask.log()``, ``where(m, 0, -inf)``; whether a
bias does is known only at run time, so every bias may) gives NaN in eager's softmax, and the
kernel writes that NaN itself, with torch's gradients (``empty_rows="nan"``); where the weights'
NaNs are cleaned up to 0, it writes 0, still with torch's gradients, which are NaN at the row's
kept entries (``empty_rows="nan_cleaned"``; a NaN that comes from the inputs themselves is cleaned
up by eager, not by the kernel). Where eager's fill is finite (all the row's logits equal, so the
weights are uniform), the replacement puts the mean of v back in the rows the mask empties, and
then no gate is folded; with a bias as well the candidate is refused (a row the bias empties
would average the masked keys in eager), as is a bias added after an ``-inf`` fill (eager's
gradient of that bias is NaN at the masked entries of such a row, the kernel's 0). SDPA gives 0
in a row with nothing left (torch's ``_safe_softmax``), the kernel's own ``"zero"``. The kernel takes two additive terms: ``bias`` (any shape broadcastable to
the logits) and ``key_bias`` (broadcastable to ``[..., H, 1, K]``: constant along the query
axis), added in fp32 as ``scale·q kᵀ + (bias + key_bias)``, the order the summed bias had. One
bias term is passed as ``bias``, a strided view. With several terms, those whose shape has
size 1 along the query axis (AlphaFold's key-mask bias ``1e9·(mask−1)``, ``[B, 1, 1, K]``) go
to ``key_bias`` (summed among themselves if several: their sum is at most ``[..., H, 1, K]``),
and a single remaining term to ``bias`` as a strided view, so triangle attention's pair bias
``[1, H, Q, K]`` and mask bias ``[B, 1, 1, K]`` are never summed into ``[B, H, Q, K]``. Only
terms that vary along queries beyond the first are summed into one tensor at their broadcast
shape. The match's notes say which happened (``biases: bias+key_bias``, ``biases: key_bias``,
``biases: summed [..]+key_bias``, ``biases: summed [..]``), and so does ``parts["biases"]``.

``scaled_dot_product_attention`` calls (no dropout, not causal) map to the kernel directly.

Kernel limits (``kernels/attention.py``): head dim 8..128, q/k/v of one dtype
(fp16/bf16/fp32; fp64 runs its reference), K/V head 1 or H. Outside them the candidate is
rejected with the reason, and the graph is left as it was.
"""
from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.fx

from foldcompile.kernels import attention as _attention_kernel
from foldcompile.passes.einsum import GEMM_TARGETS, gemm_operands
from foldcompile.passes.registry import cast_target, functional_form, holds_every_value
from foldcompile.passes.rules import Candidate, Context, Reject, Rule
from foldcompile.passes.rules import _meta as M
from foldcompile.passes.rules._values import constant_of

__all__ = ["RULES", "fused_attention", "fill_fully_masked_rows"]

_MIN_D, _MAX_D = 8, 128  # the kernel's head-dim range (kernels/attention.py _check)
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_LAYOUT = {"transpose", "permute", "reshape", "view"}
_HEAD, _VAL = "#", "@"  # axis names for the head dim and v's value axis (never einsum letters)


# ------------------------------------------------------------------ what the rewritten graph calls
def fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, bias: torch.Tensor | None = None,
                    mask: torch.Tensor | None = None, gate: torch.Tensor | None = None,
                    scale: float = 1.0, key_bias: torch.Tensor | None = None,
                    empty_rows: str = "zero") -> torch.Tensor:
    """``sigmoid(gate) · softmax(scale·q kᵀ + (bias + key_bias), mask) v`` through
    :func:`foldcompile.kernels.attention` (``key_bias`` broadcasts to ``[..., H, 1, K]``; ``empty_rows``:
    what a row whose kept logits are all -inf gives, as there)."""
    return _attention_kernel(q, k, v, bias=bias, mask=mask, gate=gate, scale=scale, key_bias=key_bias,
                             empty_rows=empty_rows)


def fill_fully_masked_rows(out: torch.Tensor, mask: torch.Tensor, fill: Any) -> torch.Tensor:
    """Rows whose boolean mask keeps no key get ``fill`` (eager's value there), the rest ``out``."""
    return torch.where(mask.any(-1, keepdim=True), out, fill)


# ------------------------------------------------------------------ einsum helpers
def _gemm(n: Any) -> tuple[str, list[str], str, list[Any]] | None:
    """``(equation, input letter strings, output letters, operands)`` of a pure two-operand product."""
    if not isinstance(n, torch.fx.Node) or n.op != "call_function" or n.target not in GEMM_TARGETS:
        return None
    if n.target in (torch.addmm, torch.baddbmm):
        return None
    if n.target is torch.nn.functional.linear:
        b = n.args[2] if len(n.args) > 2 else n.kwargs.get("bias")
        if b is not None:
            return None
    eq = M.einsum(n)
    if not eq or "..." in eq or "->" not in eq:
        return None
    ops = gemm_operands(n)
    lhs, rhs = eq.split("->")
    ins = lhs.split(",")
    if len(ops) != 2 or len(ins) != 2 or not all(isinstance(o, torch.fx.Node) for o in ops):
        return None
    return eq, ins, rhs, ops


def _softmax_dim(n: torch.fx.Node) -> int | None:
    if n.op != "call_function" or M.op_name(n) != "softmax":
        return None
    dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
    dt = n.args[2] if len(n.args) > 2 and n.target is torch.softmax else n.kwargs.get("dtype")
    x = n.args[0] if n.args else n.kwargs.get("input")
    if not isinstance(dim, int) or not isinstance(x, torch.fx.Node) or M.shape(x) is None:
        return None
    if dt is not None and dt != M.dtype(x) and not (dt == torch.float32 and holds_every_value(dt, M.dtype(x))):
        return None  # softmax(x, dtype=torch.float32) on bf16 / fp16 x widens exactly, as the kernel computes
    return dim % len(M.shape(x))


def _num(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x)


def _peel_layout(x: torch.fx.Node, letters: str) -> tuple[torch.fx.Node, str, list[torch.fx.Node]]:
    """See through single-user ``transpose``/``permute`` of an operand: the letters move instead."""
    peeled = []
    while (isinstance(x, torch.fx.Node) and x.op == "call_function" and len(x.users) == 1
           and M.op_name(x) in ("transpose", "permute") and M.shape(x.args[0]) is not None):
        r, src = len(letters), list(letters)
        if M.op_name(x) == "transpose":
            if len(x.args) != 3 or not all(isinstance(a, int) for a in x.args[1:]):
                break
            i, j = x.args[1] % r, x.args[2] % r
            src[i], src[j] = letters[j], letters[i]
        else:
            perm = x.args[1]
            if not isinstance(perm, (tuple, list)) or len(perm) != r:
                break
            for i, pi in enumerate(perm):
                src[pi % r] = letters[i]
        peeled.append(x)
        x, letters = x.args[0], "".join(src)
    return x, letters, peeled


# ------------------------------------------------------------------ recognise
def _logits_chain(x: Any, region_ok) -> list[tuple[torch.fx.Node, list[tuple]]]:
    """Ways to reach a product from ``x`` through logit arithmetic: ``(gemm, ops in forward order)``.
    Each op is ``(node, kind, value)``: ``("add", term, sign)``, ``("scale", c)``, ``("fill", cond, keep_if, v)``."""
    if not isinstance(x, torch.fx.Node):
        return []
    if _gemm(x) is not None:
        return [(x, [])]
    if x.op != "call_function" or not region_ok(x):
        return []
    name, a = M.op_name(x), x.args
    # ``a += b`` / ``a.mul_(c)`` on the logits: the same arithmetic, its result in the logits' dtype
    # (the dtypes are checked in _recognise); only the written operand can be the logits
    inplace = functional_form(x)
    if inplace is not None:
        name = M.target_name(inplace[0])
        if name not in ("add", "sub", "mul", "div", "masked_fill"):
            return []
    sides = (0,) if inplace is not None else (0, 1)
    found: list[tuple[torch.fx.Node, list[tuple]]] = []
    if name in ("add", "sub") and len(a) == 2 and not x.kwargs:
        for i in sides:
            if name == "sub" and i == 1:
                break  # b - logits is not logits + bias
            for g, ops in _logits_chain(a[i], region_ok):
                found.append((g, ops + [(x, "add", a[1 - i], -1.0 if name == "sub" else 1.0)]))
    elif name in ("mul", "div") and len(a) == 2 and not x.kwargs:
        for i in sides if name == "mul" else (0,):
            c = _num(a[1 - i])
            if c is not None:
                for g, ops in _logits_chain(a[i], region_ok):
                    found.append((g, ops + [(x, "scale", c if name == "mul" else 1.0 / c)]))
    elif name == "masked_fill" and len(a) == 3:
        v = constant_of(a[2], x)
        if v is not None and isinstance(a[1], torch.fx.Node) and M.dtype(a[1]) == torch.bool:
            for g, ops in _logits_chain(a[0], region_ok):
                found.append((g, ops + [(x, "fill", a[1], False, v)]))
    elif name == "where" and len(a) == 3 and isinstance(a[0], torch.fx.Node) and M.dtype(a[0]) == torch.bool:
        for i, keep_if in ((1, True), (2, False)):
            v = constant_of(a[3 - i], x)
            if v is not None:
                for g, ops in _logits_chain(a[i], region_ok):
                    found.append((g, ops + [(x, "fill", a[0], keep_if, v)]))
    elif _float_cast(x) is not None:  # ``logits.to(torch.float32)``: checked in _recognise (_logit_dtypes)
        for g, ops in _logits_chain(a[0], region_ok):
            found.append((g, ops + [(x, "cast")]))
    return found


def _float_cast(x: Any) -> torch.dtype | None:
    """The floating dtype ``x`` casts its floating input to (a pure dtype cast, no device, no copy), else None."""
    if not isinstance(x, torch.fx.Node) or x.op != "call_function" or not x.args:
        return None
    dt, src = cast_target(x), M.dtype(x.args[0])
    if dt is None or not dt.is_floating_point or src is None or not src.is_floating_point:
        return None
    return dt


def _logit_dtypes(L: torch.fx.Node, ops: list[tuple]) -> list[tuple[str, torch.dtype]] | Reject:
    """The roundings of the logits eager makes on the way to the softmax, which the kernel skips (it computes
    ``scale·q kᵀ + bias`` in fp32): ``[(node name, the dtype rounded to)]``, or the reason it may not skip one.

    A step rounds where its result's dtype is narrower than its exact value's: ``a += b`` with an fp32 ``b``
    into bf16 logits (the sum is computed in fp32, stored in bf16), ``logits.to(torch.bfloat16)``. Skipping a
    rounding to bf16 changes no value by more than that rounding (bf16 has fp32's exponent range). A rounding
    to fp16 of a value computed in a wider range is refused: AlphaFold's mask bias ``1e9·(mask − 1)`` added in
    place to fp16 logits is -inf there in eager, which makes a row whose keys are all masked NaN, where the
    kernel's fp32 sum stays -1e9 and gives uniform weights. (The rounding of the logits' own arithmetic in
    their dtype, ``fp16 + fp16``, is the fused kernel's usual skipped rounding.) Widening casts are exact; to
    float64 only for float64 logits (the kernel would compute in fp32 what eager computes in fp64)."""
    cur = M.dtype(L)
    if cur is None or not cur.is_floating_point:
        return Reject(f"logits {L.name} of dtype {cur}")
    roundings = []
    for op in ops:
        node, kind = op[0], op[1]
        out = M.dtype(node)
        if out is None or not out.is_floating_point:
            return Reject(f"logit arithmetic {node.name} of dtype {out}")
        exact = out
        if kind == "add" and isinstance(op[2], torch.fx.Node) and M.dtype(op[2]) is not None:
            exact = torch.promote_types(cur, M.dtype(op[2]))
        elif kind == "cast":
            exact = cur
            if out == torch.float64 and cur != torch.float64:
                return Reject(f"the logits are widened to float64 at {node.name}: the kernel computes in fp32")
        if exact != out and not holds_every_value(out, exact):  # out cannot hold every exact value
            if out == torch.float16:
                return Reject(f"the logits are rounded to float16 at {node.name} ({M.op_name(node)}) from a "
                              f"{str(exact).replace('torch.', '')} value: a bias beyond fp16's range (the mask "
                              "bias 1e9·(mask − 1)) becomes -inf there in eager, a fully masked row NaN, while "
                              "the kernel adds in fp32")
            roundings.append((node.name, out))
        cur = out
    return roundings


def _weights_casts(sm: torch.fx.Node, epilogue: list[torch.fx.Node], v: torch.fx.Node) -> str | Reject:
    """Casts of the attention weights before the product with v: widening ones are exact; a narrowing one
    must go to v's dtype, the rounding the kernel makes itself (``p.to(v.dtype)`` before its ``p @ v``).
    Returns a note ("" for none) or the reason a cast is refused."""
    cur, note = M.dtype(sm), ""
    for n in epilogue:
        dt = _float_cast(n)
        if dt is None:
            continue
        if dt == torch.float64 and cur != torch.float64:
            return Reject(f"the attention weights are widened to float64 at {n.name}: the kernel computes "
                          "p @ v in fp32")
        if not holds_every_value(dt, cur):
            if dt != M.dtype(v):
                return Reject(f"the attention weights are rounded to {dt} at {n.name}, but v is {M.dtype(v)}: "
                              "the kernel rounds them to v's dtype only")
            note = f"the weights' cast to {str(dt).replace('torch.', '')} ({n.name}): the kernel rounds them to v's dtype"
        cur = dt
    return note


def _nan_cleanup(w: torch.fx.Node) -> tuple[torch.fx.Node, list[torch.fx.Node]] | None:
    """``w`` with its NaN entries set to 0, as ``(the cleaned value, the nodes that compute it)``:
    ``torch.nan_to_num(w)`` (nan=0), ``torch.where(torch.isnan(w), 0, w)``,
    ``w.masked_fill(torch.isnan(w), 0)`` (the fill a number, a 0-dim constant or ``zeros_like(w)``)."""
    users = list(w.users)
    if len(users) == 1 and M.op_name(users[0]) == "nan_to_num" and users[0].args[0] is w:
        u = users[0]
        nan = u.args[1] if len(u.args) > 1 else u.kwargs.get("nan", 0.0)
        return (u, [u]) if nan is None or constant_of(nan) == 0.0 else None
    isnan = [u for u in users if M.op_name(u) == "isnan" and u.args[0] is w and len(u.users) == 1]
    if len(isnan) != 1:
        return None
    sel = next(iter(isnan[0].users))
    zeros = [u for u in users if M.op_name(u) == "zeros_like" and u.args[0] is w and set(u.users) == {sel}]
    if set(users) - {isnan[0], sel, *zeros}:
        return None
    name, a = M.op_name(sel), sel.args

    def zero(x: Any) -> bool:
        return (x in zeros and M.dtype(x) == M.dtype(w)) or constant_of(x, sel) == 0.0

    if name == "where" and len(a) == 3 and a[0] is isnan[0] and a[2] is w and zero(a[1]):
        return sel, [isnan[0], *zeros, sel]
    if name == "masked_fill" and len(a) == 3 and a[0] is w and a[1] is isnan[0] and zero(a[2]):
        return sel, [isnan[0], *zeros, sel]
    return None


def _weights_epilogue(sm: torch.fx.Node) -> tuple[torch.fx.Node, list[torch.fx.Node], bool]:
    """Follow the softmax through casts and at most one NaN clean-up of the weights:
    ``(the value the product with v reads, the nodes passed, whether NaNs were set to 0)``."""
    cur, nodes, cleaned = sm, [], False
    while True:
        users = list(cur.users)
        if len(users) == 1 and _float_cast(users[0]) is not None:  # checked against v in _weights_casts
            cur = users[0]
            nodes.append(cur)
            continue
        clean = None if cleaned else _nan_cleanup(cur)
        if clean is None or M.shape(clean[0]) != M.shape(sm) or M.dtype(clean[0]) != M.dtype(cur):
            return cur, nodes, cleaned
        cur, cleaned = clean[0], True
        nodes += clean[1]


def _recognise(sm: torch.fx.Node, ctx: Context) -> Candidate | Reject | None:
    d = _softmax_dim(sm)
    if d is None:
        return None
    x = sm.args[0]
    chains = _logits_chain(x, lambda n: not M.is_barrier(n))
    if not chains:
        return None  # no product feeds this softmax: the softmax family's
    if len(chains) > 1:
        return Reject("two products feed the logits")
    L, ops = chains[0]
    # every interior value (the logits and each step after them) feeds only the next step
    interior = [L] + [op[0] for op in ops]
    for n in interior:
        if len(n.users) != 1:
            return Reject(f"multiple users of an interior value ({n.name} is used {len(n.users)} times)")
        if M.shape(n) != M.shape(L):
            return Reject(f"a term broadcasts the logits from {M.shape(L)} to {M.shape(n)}")
    roundings = _logit_dtypes(L, ops)
    if isinstance(roundings, Reject):
        return roundings
    _, (la, lb), lo, (oa, ob) = _gemm(L)
    r = len(lo)
    if len(M.shape(x)) != r:
        return Reject("logits change rank before the softmax")
    kL = lo[d]
    contracted = (set(la) & set(lb)) - set(lo)
    if len(contracted) != 1 or (set(la) ^ set(lb)) - set(lo):
        return Reject(f"logits product {L.name} ({M.einsum(L)}) is not one contraction over a head dim")
    dL = contracted.pop()
    if (kL in la) == (kL in lb):
        return Reject(f"the softmax axis is not a key axis of {L.name} ({M.einsum(L)})")
    (ql, qop), (kl, kop) = ((la, oa), (lb, ob)) if kL in lb else ((lb, ob), (la, oa))
    q_only = [c for c in lo if c in ql and c not in kl]
    if len(q_only) != 1:
        return Reject(f"no single query axis in {L.name} ({M.einsum(L)})")
    qL = q_only[0]
    batch = [c for c in lo if c not in (qL, kL)]
    lshape = dict(zip(lo, M.shape(L)))
    qshape = dict(zip(ql, M.shape(qop)))
    if any(c not in ql or qshape[c] != lshape[c] for c in batch):
        return Reject("q is broadcast over a batch axis")
    if set(kl) - set(batch) - {kL, dL}:
        return Reject("k has an axis the logits do not")
    # the weights' only user contracts the key axis with v (through no-op casts and a NaN clean-up)
    w, epilogue, nan_cleaned = _weights_epilogue(sm)
    if len(w.users) != 1:
        return Reject(f"the attention weights have {len(w.users)} users")
    pv = next(iter(w.users))
    g2 = _gemm(pv)
    if g2 is None:
        return Reject(f"the attention weights feed {M.op_name(pv)}, not a product with v")
    _, (pa, pb), po, (p0, p1) = g2
    if (p0 is w) == (p1 is w):
        return Reject("the attention weights are not exactly one operand of the product")
    (pl, vl, vop) = (pa, pb, p1) if p0 is w else (pb, pa, p0)
    role = dict(zip(pl, lo))  # PV letter -> logits letter
    back = {v_: k_ for k_, v_ in role.items()}
    pk = back[kL]
    if pk not in vl or pk in po:
        return Reject("the product after the softmax does not contract the key axis with v")
    dv = [c for c in vl if c not in pl]
    if len(dv) != 1 or dv[0] not in po:
        return Reject("v has no single value axis")
    if set(vl) - set(pl) - {dv[0]} or any(role.get(c) in (qL,) for c in vl):
        return Reject("v has an axis the weights do not")
    if set(po) != {back[c] for c in batch} | {back[qL], dv[0]} or len(po) != len(batch) + 2:
        return Reject("the attention output is not [batch, query, value]")
    weights_cast = _weights_casts(sm, epilogue, vop)
    if isinstance(weights_cast, Reject):
        return weights_cast
    vroles = "".join(role.get(c, _VAL) for c in vl)  # v's axes in logits letters (and the value axis)
    oroles = "".join(role.get(c, _VAL) for c in po)

    qop, ql, peel_q = _peel_layout(qop, ql)
    kop, kl, peel_k = _peel_layout(kop, kl)
    vop, vroles, peel_v = _peel_layout(vop, vroles)
    parts: dict[str, Any] = dict(q=qop, q_letters=ql, k=kop, k_letters=kl, v=vop, v_letters=vroles,
                                 batch=batch, qL=qL, kL=kL, dL=dL, lo=lo, out_letters=oroles,
                                 D=qshape[dL], Dv=dict(zip(vl, M.shape(vop)))[dv[0]])
    terms, scale, masks, finite_fill = [], 1.0, [], None
    notes = [f"skips eager's rounding of the logits to {str(dt).replace('torch.', '')} at {n}" for n, dt in roundings]
    if weights_cast:
        notes.append(weights_cast)
    for i, op in enumerate(ops):
        kind = op[1]
        if kind == "cast":
            continue  # the same tensor
        if finite_fill is not None:
            return Reject("logit arithmetic after a masked_fill with a finite value")
        if kind == "add":
            term, sign = op[2], op[3]
            if not isinstance(term, torch.fx.Node):
                return Reject("a number added to the logits")
            if M.dtype(term) is None or not M.dtype(term).is_floating_point:
                return Reject(f"bias term {term.name} is not a floating tensor")
            if masks:
                # the kernel leaves masked entries out of every term's gradient; eager passes this term
                # dS at its masked entries too, which is NaN in a row whose kept logits are all -inf
                return Reject(f"bias term {term.name} added after a -inf mask fill: in a row whose kept logits "
                              "are all -inf eager's gradient of the term is NaN at the masked entries too, "
                              "the kernel's 0")
            terms.append([term, sign])
        elif kind == "scale":
            c = op[2]
            if not c > 0 and masks:
                return Reject("a non-positive scale after a -inf mask")
            scale *= c
            for t in terms:
                t[1] *= c
        else:
            cond, keep_if, v = op[2], op[3], op[4]
            if v != float("-inf"):
                # only -inf or the dtype's lowest value give a masked key exactly no weight; any other
                # value (0, -10, +inf) is part of the function and must stay as written
                dt = M.dtype(op[0])
                lowest = torch.finfo(dt).min if dt is not None and dt.is_floating_point else None
                if lowest is None or v > lowest:
                    return Reject(f"mask fill value {v:g} ({M.op_name(op[0])}) is neither -inf nor the dtype's "
                                  "lowest value: masked keys keep weight in eager")
                if masks:
                    return Reject("a finite masked_fill after another mask: eager's fully masked rows "
                                  "cannot be reproduced")
                finite_fill = v
            masks.append((cond, keep_if))
    empty_rows = _empty_rows(terms, finite_fill, nan_cleaned)
    if isinstance(empty_rows, Reject):
        return empty_rows
    bias_terms, key_terms, biases = _split_terms(terms, lo, qL, batch + [qL, kL])
    if len(terms) > 1:
        notes.append(f"biases: {biases}")
    if nan_cleaned:
        notes.append("the weights' NaN clean-up folded: a row that keeps no key gives 0, as the kernel does "
                     "(empty_rows='nan_cleaned', with torch's gradients)")
    parts.update(terms=terms, bias_terms=bias_terms, key_terms=key_terms, biases=biases, scale=scale, masks=masks,
                 finite_fill=finite_fill, nan_cleaned=nan_cleaned, empty_rows=empty_rows)
    region = peel_q + peel_k + peel_v + interior + [sm] + epilogue + [pv]
    output = pv
    # gate: sigmoid(g) * layout(o) with the same shape
    chain, cur = [], pv
    while len(cur.users) == 1:
        u = next(iter(cur.users))
        name = M.op_name(u)
        if name in _LAYOUT and u.args and u.args[0] is cur:
            chain.append(u)
            cur = u
            continue
        if name == "mul" and len(u.args) == 2 and not u.kwargs:
            other = u.args[1] if u.args[0] is cur else u.args[0]
            if (isinstance(other, torch.fx.Node) and M.op_name(other) == "sigmoid" and other is not cur
                    and M.shape(other) == M.shape(cur) and M.dtype(other) == M.dtype(cur)):
                parts["gate_chain"] = chain
                parts["gate"] = other.args[0]
                parts["gate_mul"] = u
        break
    if "gate" in parts and finite_fill is not None:
        notes.append("gate not folded: a finite masked_fill needs its fully-masked-row fix-up before the gate")
        parts.pop("gate")
    if "gate" in parts:
        region += parts["gate_chain"] + [parts["gate_mul"]]
        output = parts["gate_mul"]
    return Candidate("attention", sm, region, output, parts, notes)


def _empty_rows(terms: list, finite_fill: float | None, nan_cleaned: bool) -> str | Reject:
    """The kernel's ``empty_rows`` mode that gives eager's value in a row whose kept logits are all
    -inf. Whether a bias holds -inf (``mask.log()``, ``where(m, 0, -inf)``) is known only at run time,
    so every bias may: eager's softmax then gives NaN there (``"nan"``), or 0 once the weights' NaNs
    are cleaned up (``"nan_cleaned"``), with torch's gradients in both. A finite fill keeps the
    kernel's 0, which the replacement turns into the mean of v in the rows the mask empties; with a
    bias term eager's value in a row the bias empties is the masked keys' mean of v (or NaN), which
    no kernel mode gives: refused."""
    if finite_fill is not None:
        if terms:
            return Reject(f"a finite mask fill ({finite_fill:g}) with an additive bias term: in a row whose kept "
                          "logits a bias makes -inf, eager averages v over the masked keys, which the kernel "
                          "cannot give")
        return "zero"
    return "nan_cleaned" if nan_cleaned else "nan"


def _aligned(term: torch.fx.Node, rank: int, shape_of) -> tuple | None:
    s = shape_of(term)
    return None if s is None else (1,) * (rank - len(s)) + tuple(s)


def _split_terms(terms: list, lo: str, qL: str, want: list[str]) -> tuple[list, list, str]:
    """Route the additive terms: ``(bias terms, key-bias terms, description)``.

    A term whose (right-aligned) size along the query axis is 1 -- in the traced shape and,
    where the graph has one, in the symbolic shape -- is a key-bias term: the kernel adds it
    per (row, head, key). With one term in all it stays the bias (as before: a strided view).
    The rest go to ``bias``: one as a view, several summed at their broadcast shape."""
    if len(terms) <= 1:
        return list(terms), [], "bias" if terms else "none"
    r, iq = len(lo), lo.index(qL)

    def keyish(t: torch.fx.Node) -> bool:
        s, ss = _aligned(t, r, M.shape), _aligned(t, r, M.sym_shape)
        return s is not None and s[iq] == 1 and (ss is None or ss[iq] == 1)

    key_terms = [t for t in terms if keyish(t[0])]
    bias_terms = [t for t in terms if not keyish(t[0])]
    if len(bias_terms) > 1:
        shapes = [_aligned(t[0], r, M.shape) for t in bias_terms]
        if any(s is None for s in shapes):
            desc = "summed"
        else:
            full = torch.broadcast_shapes(*shapes)
            desc = "summed [" + ", ".join(str(full[lo.index(w)]) for w in want) + "]"
    else:
        desc = "bias" if bias_terms else ""
    if key_terms:
        desc = desc + "+key_bias" if desc else "key_bias"
    return bias_terms, key_terms, desc


def _check(c: Candidate, ctx: Context) -> str | None:
    p = c.parts
    if not _MIN_D <= p["D"] <= _MAX_D:
        return f"head dim {p['D']} {'<' if p['D'] < _MIN_D else '>'} {_MIN_D if p['D'] < _MIN_D else _MAX_D}"
    if p["Dv"] != p["D"]:
        return f"value dim {p['Dv']} != head dim {p['D']} (the kernel needs k and v of one shape)"
    dts = {M.dtype(p[n]) for n in ("q", "k", "v")}
    if len(dts) != 1 or next(iter(dts)) not in _KERNEL_DTYPES:
        return f"unsupported dtype {sorted(map(str, dts))} (q, k, v of one of fp16/bf16/fp32/fp64)"
    return None


def _profitable(c: Candidate, ctx: Context) -> str | None:
    before = sum(M.cost_bytes_at(n, ctx.subs) for n in c.region)
    p = c.parts
    after = sum(M.bytes_at(p[n], ctx.subs) for n in ("q", "k", "v")) + M.bytes_at(c.output, ctx.subs)
    # key-bias terms are read (and, if several, summed) at their own [..., H, 1, K] size
    after += sum(M.bytes_at(t[0], ctx.subs) for t in p["key_terms"]) * (1 if len(p["key_terms"]) == 1 else 3)
    if len(p["bias_terms"]) == 1:
        after += M.bytes_at(p["bias_terms"][0][0], ctx.subs)
    elif p["bias_terms"]:
        # the summed bias is written once and read once, at the logits' size at most
        after += (2 * sum(M.bytes_at(t[0], ctx.subs) for t in p["bias_terms"])
                  + 3 * M.bytes_at(c.region[0], ctx.subs))
    if "gate" in p:
        after += M.bytes_at(p["gate"], ctx.subs)
    if before and after > before:
        return f"not profitable at the stated size: {after} bytes fused vs {before} unfused"
    return None


# ------------------------------------------------------------------ replace
class _Builder:
    """Inserts nodes before ``where``, each carrying the pattern's origin and source meta."""

    def __init__(self, graph: torch.fx.Graph, where: torch.fx.Node, c: Candidate):
        self.graph, self.where, self.c = graph, where, c
        self.meta = {"origin": [n.name for n in c.region], "module_path": M.module_path(c.anchor),
                     "fused_by": c.rule}
        if "stack_trace" in c.anchor.meta:
            self.meta["stack_trace"] = c.anchor.meta["stack_trace"]

    def __call__(self, target, *args, **kwargs) -> torch.fx.Node:
        with self.graph.inserting_before(self.where):
            n = self.graph.call_function(target, args, kwargs)
        n.meta.update(self.meta)
        return n


def _to_letters(b: _Builder, x: torch.fx.Node, have: str, want: list[str]) -> torch.fx.Node:
    """``x`` (axes named by ``have``) as a view with axes ``want``: permuted, with unit axes
    inserted for letters it lacks (it broadcasts over them)."""
    present = [w for w in want if w in have]
    perm = [have.index(w) for w in present]
    if perm != list(range(len(have))):
        x = b(torch.permute, x, tuple(perm))
    for i, w in enumerate(want):
        if w not in have:
            x = b(torch.unsqueeze, x, i)
    return x


def _align_rank(b: _Builder, x: torch.fx.Node, rank: int) -> torch.fx.Node:
    """Right-align a broadcastable term to the logits' rank (leading unit axes, a view)."""
    for _ in range(rank - len(M.shape(x))):
        x = b(torch.unsqueeze, x, 0)
    return x


def _replace(c: Candidate, ctx: Context) -> torch.fx.Node:
    p, graph = c.parts, ctx.gm.graph
    b = _Builder(graph, c.output, c)
    batch, qL, kL, dL, lo = p["batch"], p["qL"], p["kL"], p["dL"], p["lo"]
    q_sizes = dict(zip(p["q_letters"], M.shape(p["q"])))
    q = _to_letters(b, p["q"], p["q_letters"], batch + [qL, dL])
    kv = []
    for name, have in (("k", p["k_letters"].replace(dL, _HEAD)), ("v", p["v_letters"].replace(_VAL, _HEAD))):
        x = _to_letters(b, p[name], have, batch + [kL, _HEAD])
        shape = dict(zip(have, M.shape(p[name])))
        # the kernel takes a shared (size-1) K/V head, but the other leading axes must be full
        lead = batch[:-1]
        if any(shape.get(w, 1) != q_sizes[w] for w in lead):
            x = b(torch.Tensor.expand, x, tuple(q_sizes[w] for w in lead) + (-1, -1, -1))
        kv.append(x)
    k, v = kv
    want = batch + [qL, kL]

    def summed(terms: list) -> torch.fx.Node | None:
        acc = None
        for term, factor in terms:
            t = _to_letters(b, _align_rank(b, term, len(lo)), lo, want)
            if factor != 1.0:
                t = b(operator.mul, t, factor)
            acc = t if acc is None else b(operator.add, acc, t)
        return acc

    bias, key_bias = summed(p["bias_terms"]), summed(p["key_terms"])
    mask = None
    for cond, keep_if in p["masks"]:
        m = _to_letters(b, _align_rank(b, cond, len(lo)), lo, want)
        if not keep_if:
            m = b(torch.logical_not, m)
        mask = m if mask is None else b(torch.logical_and, mask, m)
    gate = None
    if "gate" in p:
        gate = p["gate"]
        for u in reversed(p["gate_chain"]):  # undo the layout between the attention and the gate
            gate = _undo_layout(b, u, gate)
        gate = _to_letters(b, gate, p["out_letters"], batch + [qL, _VAL])
    unit = not batch  # the kernel needs a leading axis
    if unit:
        q, k, v = (b(torch.unsqueeze, t, 0) for t in (q, k, v))
        bias = b(torch.unsqueeze, bias, 0) if bias is not None else None
        key_bias = b(torch.unsqueeze, key_bias, 0) if key_bias is not None else None
        mask = b(torch.unsqueeze, mask, 0) if mask is not None else None
        gate = b(torch.unsqueeze, gate, 0) if gate is not None else None
    kw = {"key_bias": key_bias} if key_bias is not None else {}
    out = b(fused_attention, q, k, v, bias=bias, mask=mask, gate=gate, scale=p["scale"], **kw,
            empty_rows=p["empty_rows"])
    if mask is not None and p["finite_fill"] is not None:
        # eager's value in a row that keeps no key after a finite fill: uniform weights, the mean of v
        # (an -inf fill's NaN, or 0 after a clean-up, the kernel writes itself: p["empty_rows"])
        out = b(fill_fully_masked_rows, out, mask, b(torch.mean, v, -2, True))
    if unit:
        out = b(torch.squeeze, out, 0)
    out = _to_letters(b, out, "".join(batch) + qL + _VAL, list(p["out_letters"]))
    if "gate" in p:
        for u in p["gate_chain"]:  # the user's layout after the attention, replayed on the result
            with graph.inserting_before(c.output):
                out = graph.node_copy(u, lambda a, u=u, out=out: out if a is u.args[0] else a)
            out.meta.update(b.meta)
    out.meta["shape"], out.meta["dtype"] = M.shape(c.output), M.dtype(c.output)
    return out


def _undo_layout(b: _Builder, u: torch.fx.Node, x: torch.fx.Node) -> torch.fx.Node:
    name, src = M.op_name(u), u.args[0]
    if name == "transpose":
        return b(torch.transpose, x, u.args[1], u.args[2])
    if name == "permute":
        perm = u.args[1]
        inv = [0] * len(perm)
        for i, pi in enumerate(perm):
            inv[pi % len(perm)] = i
        return b(torch.permute, x, tuple(inv))
    return b(torch.reshape, x, tuple(M.shape(src)))


# ------------------------------------------------------------------ SDPA
_SDPA = torch.nn.functional.scaled_dot_product_attention


def _sdpa_arg(n: torch.fx.Node, i: int, name: str, default: Any) -> Any:
    return n.args[i] if len(n.args) > i else n.kwargs.get(name, default)


def _recognise_sdpa(n: torch.fx.Node, ctx: Context) -> Candidate | Reject | None:
    if n.op != "call_function" or n.target is not _SDPA:
        return None
    q, k, v = (_sdpa_arg(n, i, nm, None) for i, nm in enumerate(("query", "key", "value")))
    mask = _sdpa_arg(n, 3, "attn_mask", None)
    if _sdpa_arg(n, 4, "dropout_p", 0.0) not in (0, 0.0):
        return Reject("scaled_dot_product_attention with dropout (the kernel has none)")
    if _sdpa_arg(n, 5, "is_causal", False):
        return Reject("causal scaled_dot_product_attention (the kernel has no causal mask)")
    if n.kwargs.get("enable_gqa"):
        return Reject("grouped-query scaled_dot_product_attention")
    qs, ks = M.shape(q), M.shape(k)
    if qs is None or ks is None or len(qs) < 3 or len(ks) != len(qs) or ks[:-3] != qs[:-3] or ks[-3] not in (1, qs[-3]):
        return Reject("q/k layouts the kernel does not take (k must be [..., H or 1, K, D] like q)")
    scale = _sdpa_arg(n, 6, "scale", None)
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        # e.g. a scale computed from a traced size or a tensor: a graph value, not a number the kernel
        # can take at rewrite time
        return Reject(f"scale is a value computed in the graph ({type(scale).__name__}), not a number")
    if mask is not None and not isinstance(mask, torch.fx.Node):
        return Reject(f"attn_mask is a {type(mask).__name__} constant, not a tensor of the graph")
    parts = dict(q=q, k=k, v=v, D=qs[-1], Dv=M.shape(v)[-1], attn_mask=mask,
                 scale=float(scale) if scale is not None else qs[-1] ** -0.5)
    if isinstance(mask, torch.fx.Node) and M.dtype(mask) not in (torch.bool,) and not M.dtype(mask).is_floating_point:
        return Reject(f"attn_mask of dtype {M.dtype(mask)}")
    return Candidate("sdpa_attention", n, [n], n, parts)


def _replace_sdpa(c: Candidate, ctx: Context) -> torch.fx.Node:
    p = c.parts
    b = _Builder(ctx.gm.graph, c.output, c)
    mask = p["attn_mask"]
    kw: dict[str, Any] = {}
    if isinstance(mask, torch.fx.Node):
        kw["mask" if M.dtype(mask) == torch.bool else "bias"] = mask
    # SDPA gives 0 in a row that keeps no key (a boolean mask with no True, or a float mask of -inf
    # there), with no gradient: torch's math definition (``_safe_softmax``), the kernel's own value.
    return b(fused_attention, p["q"], p["k"], p["v"], scale=p["scale"], **kw)


def _profitable_sdpa(c: Candidate, ctx: Context) -> str | None:
    return None  # the same work either way; the fused kernel never materialises the logits


RULES = [
    Rule("attention", "attention", 100, _recognise, _check, _profitable, _replace,
         "softmax(scale·q kᵀ + biases, masked) v [· sigmoid(gate)] -> fused_attention"),
    Rule("sdpa_attention", "attention", 100, _recognise_sdpa, _check, _profitable_sdpa, _replace_sdpa,
         "scaled_dot_product_attention -> fused_attention"),
]
