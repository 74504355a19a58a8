"""A layer norm and the projections of its output -> one :func:`foldcompile.kernels.ln_linear.layer_norm_linear` call.

Recognised on the math. The anchor is a layer norm over the last dim, as the layer-norm family
recognises it (``F.layer_norm`` in any module or method spelling, or written out by hand: this rule
asks :mod:`passes.rules.layer_norm` whether a node is one, so both spellings come for free). The
layer norm's output ``y`` (``[..., K]``) is then followed to its readers; a reader is a *projection*
when it is a two-operand product that contracts ``y``'s channel dim, and only it, with a 2-d tensor
``W`` that does not depend on ``y``, and keeps ``y``'s rows in order (its output is ``y``'s leading
dims, then W's other dim):

    F.linear(y, W[, b])      y @ W.T      y @ Wt      y.matmul(W.t())      torch.einsum("...k,nk->...n", y, W)

also through views that keep every row whole and in place (``y.reshape(-1, K)``, ``y.view(B, S, R, K)``,
``unsqueeze`` / ``squeeze`` of a leading dim: their output's last dim is still the channel): the
projection is computed on ``y``'s rows and re-viewed. Up to ``MAX_PROJECTIONS`` projections, in graph
order, go into the one call; the layer norm is normalised in the kernel's prologue and never written.

Other readers of ``y`` are allowed: anything that is not such a projection (an element-wise op, a
product whose other operand depends on ``y``, a linear on a *permuted* ``y`` whose rows come in another
order, a linear over a dim that is not the channel, a slice of ``y``'s rows as a chunk loop takes)
keeps reading ``y``, which the kernel then also writes (``return_normalized``: the bytes of the layer
norm's own output, no more than eager writes). What that costs is stated in the match's notes.

Mixed precision (bf16 autocast on an fp32 model, made explicit): ``y`` (fp32) cast to the product dtype P
once on the way (``y.to(torch.bfloat16)``, ``y.bfloat16()``, ``y.to(dtype=...)``, before or after the views),
and the projection's weight and bias casts of parameters (``F.linear(y16, W.to(bf16), b.to(bf16))``): the
kernel computes the layer norm in fp32, rounds y to y's dtype and then to P (eager's two casts; one for fp32
y), and reads the fp32 parameters themselves, rounding them to P in registers (exactly ``W.to(P)``; the cast
nodes go where nothing else reads them); the outputs are in P. One P per call: the first projection's.
Not taken (y stays their input): a second cast on the way (``y.to(fp16).to(bf16)`` rounds twice), a
projection whose weight is in another dtype than the y it reads (``linear(y16, W)`` with fp32 ``W`` is
no autocast spelling, and torch refuses it).

The call runs where ``y`` is first read: the projections' parameters (and views and casts of them, ``W.T``)
are moved up to it; a projection whose weight or bias is computed after that from activations (from ``y``
itself, say), or whose dtype is not its y's, stays another reader of ``y``; so do the
projections past the first ``MAX_PROJECTIONS``.

Left alone (``None``, not a candidate: the layer-norm family takes the layer norm alone): a layer norm
no projection reads. Refused, with the reason: rows longer than the kernel holds (``MAX_TRITON_DIM``
channels; its reference would run), an in-place write between the call and the last projection that
may touch what the call reads.

    >>> import torch, foldcompile
    >>> class Heads(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.ln = torch.nn.LayerNorm(16)
    ...         self.q, self.k = torch.nn.Linear(16, 8, bias=False), torch.nn.Linear(16, 8)
    ...         self.v = torch.nn.Parameter(torch.randn(16, 8))
    ...     def forward(self, x):
    ...         y = self.ln(x)
    ...         return self.q(y), self.k(y), y @ self.v
    >>> x = torch.randn(3, 5, 16)
    >>> fast = foldcompile.optimize(Heads(), x)
    >>> fast.report.counts()["ln_linear"]
    {'matched': 1, 'rejected': 0}
    >>> "fused_layer_norm_linear(" in fast.code
    True
    >>> all(torch.allclose(a, b, atol=1e-5) for a, b in zip(fast(x), Heads.forward(fast.model, x)))
    True
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
import torch.fx

from foldcompile.kernels.ln_linear import MAX_PROJECTIONS, MAX_TRITON_DIM
from foldcompile.kernels.ln_linear import layer_norm_linear as _layer_norm_linear_kernel
from foldcompile.passes.einsum import GEMM_TARGETS, gemm_operands
from foldcompile.passes.meta import memory_of
from foldcompile.passes.registry import cast_target, writes_in_place
from foldcompile.passes.rules import Candidate, Context, Reject, Rule
from foldcompile.passes.rules import _meta as M
from foldcompile.passes.rules import layer_norm as _ln_rules
from foldcompile.passes.rules._values import is_noop_cast
from foldcompile.passes.rules.attention import _Builder

__all__ = ["RULES", "fused_layer_norm_linear"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_ROW_VIEWS = {"reshape", "view", "flatten", "unsqueeze", "squeeze", "contiguous"}


# ------------------------------------------------------------------ what the rewritten graph calls
def fused_layer_norm_linear(x: torch.Tensor, ln_weight: Optional[torch.Tensor], ln_bias: Optional[torch.Tensor],
                            weights: Sequence[torch.Tensor], biases: Sequence[Optional[torch.Tensor]], eps: float,
                            return_normalized: bool, product_dtype: Optional[torch.dtype] = None
                            ) -> tuple[torch.Tensor, ...]:
    """``linear(layer_norm(x).to(P), W_p.to(P), b_p.to(P))`` for every projection (and ``layer_norm(x)`` last
    with ``return_normalized``), ``P = product_dtype`` (None: x's dtype, no casts), through
    :func:`foldcompile.kernels.ln_linear.layer_norm_linear`."""
    return _layer_norm_linear_kernel(x, ln_weight, ln_bias, list(weights), list(biases), eps=eps,
                                     return_normalized=return_normalized, product_dtype=product_dtype)


# ------------------------------------------------------------------ recognise
@dataclass
class _Projection:
    node: torch.fx.Node  # the product (its value is replaced)
    weight: torch.fx.Node  # as the product reads it
    transposed: bool  # weight is [K, N] (``y @ Wt``): the kernel takes its transpose
    bias: Optional[torch.fx.Node]
    views: list[torch.fx.Node] = field(default_factory=list)  # row-keeping views (and y's cast) from y on
    cast: Optional[torch.fx.Node] = None  # y cast to the product dtype on the way (``y.to(bf16)``), or None

    def reads(self, t: Optional[torch.fx.Node]) -> Optional[torch.fx.Node]:
        """What the kernel reads for the weight or bias ``t``: the parameter itself where ``t`` casts one (the
        kernel rounds it to the product dtype in registers, exactly ``t``), else ``t``."""
        if t is not None and cast_target(t) is not None and isinstance(t.args[0], torch.fx.Node) \
                and _parameter_expression(t.args[0]) and M.dtype(t.args[0]) in _DTYPES:
            return t.args[0]
        return t


def _arg(n: torch.fx.Node, i: int, name: str) -> Any:
    return n.args[i] if len(n.args) > i else n.kwargs.get(name)


def _as_projection(u: torch.fx.Node, y: torch.fx.Node, K: int) -> _Projection | None:
    """``u`` as a projection of ``y``'s channels that keeps ``y``'s rows in order, or None."""
    if u.op != "call_function" or u.meta.get("fuse_disabled") or u.meta.get("fused_by"):
        return None
    if u.target is torch.nn.functional.linear:
        w, bias = _arg(u, 1, "weight"), _arg(u, 2, "bias")
        if _arg(u, 0, "input") is not y or not isinstance(w, torch.fx.Node) or M.shape(w) is None \
                or len(M.shape(w)) != 2 or M.shape(w)[1] != K or w is y:
            return None
        if bias is not None and (not isinstance(bias, torch.fx.Node) or M.shape(bias) != (M.shape(w)[0],)):
            return None
        return _Projection(u, w, False, bias)
    if u.target not in GEMM_TARGETS or u.target in (torch.addmm, torch.baddbmm):
        return None
    eq = M.einsum(u)
    ops = gemm_operands(u)
    if not isinstance(eq, str) or "..." in eq or "->" not in eq or len(ops) != 2:
        return None
    (la, lb), out = eq.split("->")[0].split(","), eq.split("->")[1]
    for i in (0, 1):
        ly, lw, w = (la, lb, ops[1]) if i == 0 else (lb, la, ops[0])
        if ops[i] is not y or not isinstance(w, torch.fx.Node) or w is y or len(lw) != 2:
            continue
        k = ly[-1] if ly else None
        if len(set(ly)) != len(ly) or k not in lw or lw[0] == lw[1]:
            return None
        n = lw[1] if lw[0] == k else lw[0]
        if n in ly or out != ly[:-1] + n or M.shape(w) is None:
            return None
        return _Projection(u, w, lw[0] == k, None)
    return None


def _keeps_rows(v: torch.fx.Node, src: torch.fx.Node, K: int) -> bool:
    """``v`` is a view of ``src`` after which every row is still whole and in order: the last dim is still
    the channel (a reshape in row-major order keeps rows when both last dims are the K channels)."""
    if v.op != "call_function" or not v.args or v.args[0] is not src or v.meta.get("fuse_disabled"):
        return False
    name = M.op_name(v)
    if not (name in _ROW_VIEWS or is_noop_cast(v)):
        return False
    shape, before = M.shape(v), M.shape(src)
    if shape is None or not shape or shape[-1] != K:
        return False
    if name == "unsqueeze" and isinstance(v.args[1] if len(v.args) > 1 else None, int):
        d = v.args[1] % (len(before) + 1)
        return d < len(before)  # not a new last dim
    if name == "squeeze":
        return shape[-1] == before[-1] and (K != 1)
    if name == "flatten":
        end = _arg(v, 2, "end_dim")
        return end is not None and end % len(before) != len(before) - 1
    return True


def _product_cast(u: torch.fx.Node, src: torch.fx.Node) -> bool:
    """``u`` casts ``src`` (the layer norm's output, in its dtype) to another float dtype the kernel runs products
    in: it rounds y to that dtype once, from the fp32 it computes y in through y's own dtype, as eager does."""
    t = cast_target(u) if u.op == "call_function" and u.args and u.args[0] is src else None
    return t is not None and t in _DTYPES and t != M.dtype(src) and M.shape(u) == M.shape(src) \
        and not u.meta.get("fuse_disabled")


def _readers(y: torch.fx.Node, K: int, chain: list[torch.fx.Node], found: list[_Projection],
             other: list[torch.fx.Node], cast: Optional[torch.fx.Node] = None) -> None:
    """Sort the readers of ``y`` (through row-keeping views and at most one cast to the product dtype,
    ``chain``) into projections and others."""
    for u in y.users:
        proj = _as_projection(u, y, K)
        if proj is not None:
            proj.views, proj.cast = list(chain), cast
            found.append(proj)
        elif _keeps_rows(u, y, K):
            _readers(u, K, [*chain, u], found, other, cast)
        elif cast is None and _product_cast(u, y):
            _readers(u, K, [*chain, u], found, other, u)
        else:
            other.append(u)


def _recognise(n: torch.fx.Node, ctx: Context) -> Candidate | Reject | None:
    ln = _ln_rules._recognise(n, ctx) or _ln_rules._recognise_by_hand(n, ctx)
    if not isinstance(ln, Candidate) or _ln_rules._check(ln, ctx) is not None:
        return None  # not a layer norm, or one the layer-norm family rejects itself (with its reason)
    if any(r.meta.get("fuse_disabled") for r in ln.region) or not ln.output.users:
        return None
    y, K = ln.output, ln.parts["N"]
    found: list[_Projection] = []
    other: list[torch.fx.Node] = []
    _readers(y, K, [], found, other)
    order = {m: i for i, m in enumerate(n.graph.nodes)}
    found.sort(key=lambda pr: order[pr.node])
    # the call runs where y is first read: a projection whose weight or bias does not exist there yet
    # (computed later from activations, perhaps from y itself; parameters are moved up), or of another
    # dtype, keeps reading y as it did
    first = min(y.users, key=order.__getitem__)
    projections, notes = [], []
    product = None  # the one dtype the call's products run in: y's, or what the first projection casts y to
    for pr in found:
        late = [t for t in (pr.weight, pr.bias) if isinstance(t, torch.fx.Node) and order[t] >= order[first]
                and not _parameter_expression(t)]
        mine = M.dtype(pr.cast) if pr.cast is not None else M.dtype(y)
        dts = {M.dtype(t) for t in (pr.node, pr.weight, pr.bias) if t is not None}
        if late or dts != {mine} or mine != (product or mine) or len(projections) == MAX_PROJECTIONS:
            other.append(pr.views[0] if pr.views else pr.node)
            notes.append(f"{pr.node.name} reads y: " + (f"its operand {late[0].name} is computed after y's first "
                                                          f"reader {first.name}" if late else
                                                          f"another dtype ({sorted(map(str, dts))}, y's "
                                                          f"products in {mine})" if dts != {mine} else
                                                          f"products in {mine}, not {product}" if mine != product else
                                                          f"more than {MAX_PROJECTIONS} projections"))
        else:
            product = mine
            projections.append(pr)
    if not projections:
        return None
    last = projections[-1].node
    region = list(ln.region) + [v for pr in projections for v in pr.views] + [pr.node for pr in projections]
    inputs = [ln.parts["x"], ln.parts["weight"], ln.parts["bias"], *[pr.reads(t) for pr in projections
                                                                     for t in (pr.weight, pr.bias)]]
    write = _write_between(order, first, last, set(region), [t for t in inputs if isinstance(t, torch.fx.Node)])
    if write is not None:
        return Reject(f"an in-place write ({write.name}) lies between the layer norm's first reader and its last "
                      "projection: the fused call would read its inputs before it")
    widths = [M.shape(pr.node)[-1] for pr in projections]
    others = sorted({o.name for o in other})
    notes.insert(0, f"{len(projections)} projection{'s' if len(projections) > 1 else ''} of widths {widths}"
                 + (f"; y written too, for its other readers {', '.join(others)}" if others else "")
                 + (f"; products in {product} (y cast from {M.dtype(y)})" if product != M.dtype(y) else "")
                 + "".join(f"; {t.name} read as {pr.reads(t).name} and rounded in the kernel"
                           for pr in projections for t in (pr.weight, pr.bias) if t is not None and pr.reads(t) is not t))
    parts = dict(ln=ln, projections=projections, return_normalized=bool(other), K=K, product=product)
    return Candidate("ln_linear", n, sorted(set(region), key=order.__getitem__), projections[0].node, parts, notes)


_PARAMETER_VIEWS = {"t", "transpose", "permute", "contiguous", "view", "reshape"}


def _parameter_expression(t: torch.fx.Node) -> bool:
    """``t`` is a parameter, buffer or input, or a view / cast of one (``W.T``, ``W.t()``, ``W.to(bf16)`` as
    autocast casts fp32 parameters per call): it can be read earlier than where the graph reads it (Dynamo
    places ``get_attr`` nodes at their first use)."""
    if t.op in ("get_attr", "placeholder"):
        return True
    if t.op != "call_function" or writes_in_place(t) or not t.args or not isinstance(t.args[0], torch.fx.Node):
        return False
    name = M.op_name(t)
    view = name in _PARAMETER_VIEWS or cast_target(t) is not None or (name == "getattr"
                                                                       and t.args[1:] in (("T",), ("mT",)))
    return view and all(_parameter_expression(a) for a in t.all_input_nodes)


def _hoist(graph: torch.fx.Graph, nodes: Sequence[Any], before: torch.fx.Node) -> None:
    """Move the parameter expressions among ``nodes`` that come after ``before`` (and their inputs) right before
    it, keeping their order: the fused call there reads them."""
    order = {m: i for i, m in enumerate(graph.nodes)}
    late: set[torch.fx.Node] = set()
    work = [t for t in nodes if isinstance(t, torch.fx.Node)]
    while work:
        t = work.pop()
        if order[t] > order[before] and t not in late:
            late.add(t)
            work.extend(t.all_input_nodes)
    for t in sorted(late, key=order.__getitem__):
        before.prepend(t)


def _write_between(order: dict, first: torch.fx.Node, last: torch.fx.Node, members: set,
                   inputs: list[torch.fx.Node]) -> torch.fx.Node | None:
    """An in-place write after the call's position (``first``) and before the last projection that may
    change memory the call reads (it reads its inputs at ``first``, eager's projections later)."""
    lo, hi = order[first], order[last]
    read = {memory_of(t) for t in inputs}
    for w, i in order.items():
        if lo <= i < hi and w not in members and writes_in_place(w):
            written = memory_of(w.args[0]) if w.args else None
            if written is None or None in read or written in read:
                return w
    return None


# ------------------------------------------------------------------ check, profit
def _check(c: Candidate, ctx: Context) -> str | None:
    p = c.parts
    dts = {M.dtype(t) for pr in p["projections"] for t in (pr.node, pr.weight, pr.bias) if t is not None}
    dts.add(p["product"])
    y = M.dtype(p["ln"].output)
    read = {M.dtype(pr.reads(t)) for pr in p["projections"] for t in (pr.weight, pr.bias) if t is not None}
    if len(dts) != 1 or next(iter(dts)) not in _DTYPES or y not in _DTYPES or not read <= set(_DTYPES):
        return (f"unsupported dtypes {sorted(map(str, dts | {y}))} (y, and the products' y, weights and biases "
                "in one of fp16/bf16/fp32/fp64)")
    return None


def _profitable(c: Candidate, ctx: Context) -> str | None:
    p = c.parts
    if p["K"] > MAX_TRITON_DIM:
        return (f"not profitable at the stated size: rows of {p['K']} > {MAX_TRITON_DIM} channels run the kernel's "
                "reference (the layer norm is fused alone)")
    before = sum(M.cost_bytes_at(n, ctx.subs) for n in c.region)
    ln = p["ln"].parts
    after = sum(M.bytes_at(t, ctx.subs) for t in (ln["x"], ln["weight"], ln["bias"]) if t is not None)
    after += sum(M.bytes_at(t, ctx.subs) for pr in p["projections"] for t in (pr.weight, pr.bias, pr.node)
                 if t is not None)
    if p["return_normalized"]:
        after += M.bytes_at(p["ln"].output, ctx.subs)
    if before and after > before:
        return f"not profitable at the stated size: {after} bytes fused vs {before} unfused"
    return None


# ------------------------------------------------------------------ replace
def _copy_meta(dst: torch.fx.Node, src: torch.fx.Node, last_of: torch.fx.Node | None = None) -> None:
    """``src``'s shape, symbolic shape and dtype on ``dst``, with ``last_of``'s last dim when given."""
    shape, sym = M.shape(src), M.sym_shape(src)
    if last_of is not None:
        shape = (*shape[:-1], M.shape(last_of)[-1]) if shape is not None else None
        sym_last = M.sym_shape(last_of)
        sym = (*sym[:-1], sym_last[-1]) if sym is not None and sym_last is not None else None
    dst.meta["shape"], dst.meta["dtype"] = shape, M.dtype(src)
    if sym is not None:
        dst.meta["sym_shape"] = sym


def _replace(c: Candidate, ctx: Context) -> torch.fx.Node:
    p = c.parts
    ln, projections = p["ln"], p["projections"]
    y = ln.output
    order = {m: i for i, m in enumerate(ctx.gm.graph.nodes)}
    first = min(y.users, key=order.__getitem__)
    reads = [(pr.reads(pr.weight), pr.reads(pr.bias)) for pr in projections]
    _hoist(ctx.gm.graph, [t for wb in reads for t in wb], first)
    b = _Builder(ctx.gm.graph, first, c)
    weights = [b(torch.transpose, w, 0, 1) if pr.transposed else w for pr, (w, _) in zip(projections, reads)]
    # the product dtype is stated where y is cast or a weight / bias is read in another dtype than the products'
    mixed = p["product"] != M.dtype(y) or any(M.dtype(t) != p["product"] for wb in reads for t in wb if t is not None)
    call = b(fused_layer_norm_linear, ln.parts["x"], ln.parts["weight"], ln.parts["bias"], weights,
             [bias for _, bias in reads], ln.parts["eps"], p["return_normalized"],
             **({"product_dtype": p["product"]} if mixed else {}))
    call.meta["multi_output"] = True
    values = []
    for i, pr in enumerate(projections):
        out = b(operator.getitem, call, i)
        _copy_meta(out, y, last_of=pr.node)
        out.meta["dtype"] = M.dtype(pr.node)
        if M.shape(out) != M.shape(pr.node):  # the projection read y through row-keeping views
            out = b(torch.reshape, out, M.shape(pr.node))
            _copy_meta(out, pr.node)
        out.meta["replaces"] = pr.node.name
        values.append(out)
    if p["return_normalized"]:
        normalized = b(operator.getitem, call, len(projections))
        _copy_meta(normalized, y)
        normalized.meta["replaces"] = y.name
        y.replace_all_uses_with(normalized)  # the other readers, and views the projections no longer need
    for pr, v in zip(projections, values):
        pr.node.replace_all_uses_with(v)
    # the call itself, for the record's match id (the report reads the kernel and its outputs' bytes there);
    # the first projection's readers were handed their value above, so the fuse pass has none to move
    return call


RULES = [Rule("ln_linear", "ln_multi_linear", 55, _recognise, _check, _profitable, _replace,
              "layer_norm(x) feeding projections -> fused_layer_norm_linear (one kernel, y never written)")]
